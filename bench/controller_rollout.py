"""Controller cost per device-update for a large rollout, driven through the service API.

Synthetic devices answer every install command with a phase event, a result event and a new
retained state (what the agent sends), fed through ``ControllerService.on_event/on_state`` as
the MQTT gateway would. Only the controller's own calls are timed (``tick``, the inbox calls,
draining reports); the synthetic device side and the gateway's MQTT work are not. Database
writes are counted at the cursor (rows of INSERT/UPDATE/DELETE, executemany counted per row).

    python -m bench.controller_rollout --devices 10000 --db sqlite
    python -m bench.controller_rollout --devices 10000 --db postgres --pg postgresql+psycopg://postgres@127.0.0.1:5432/test
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import random
import tempfile
import time
import uuid
from pathlib import Path

from sqlalchemy import create_engine, event, insert, text

from controller.auth import Role
from controller.db import models as m
from controller.rollout import planner as p
from controller.rollout.scheduler import PhaseSpec
from controller.service import ControllerConfig, ControllerService, Principal
from firmware_bundles.bundle import build_bundle, hash_file
from firmware_bundles.keyring import generate_keyset
from firmware_bundles.trust import Role as TrustRole


class Outbox:
    """The bench's DeviceGateway: keeps what would go on the wire."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes]] = []

    def publish_command(self, device_id: str, command: bytes) -> None:
        self.sent.append((device_id, command))


class Meter:
    def __init__(self) -> None:
        self.cpu = 0.0
        self.rows = 0
        self.statements = 0

    def run(self, fn, *a, **kw):
        t = time.process_time()
        try:
            return fn(*a, **kw)
        finally:
            self.cpu += time.process_time() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--devices", type=int, default=10_000)
    ap.add_argument("--db", choices=["sqlite", "postgres"], default="sqlite")
    ap.add_argument("--pg", default="postgresql+psycopg://postgres@127.0.0.1:5432/test")
    ap.add_argument("--max-in-flight", type=int, default=2000)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="ctl-bench-"))
    schema = None
    if args.db == "sqlite":
        url = f"sqlite:///{tmp / 'c.db'}"
    else:
        schema = "bench_" + uuid.uuid4().hex[:8]
        eng = create_engine(args.pg)
        with eng.begin() as c:
            c.execute(text(f"CREATE SCHEMA {schema}"))
        eng.dispose()
        url = f"{args.pg}?options=-csearch_path%3D{schema}"
    outbox = Outbox()
    now = int(time.time())
    svc = ControllerService(ControllerConfig(database_url=url, data_dir=tmp / "data"),
                            gateway=outbox)
    try:
        _run(svc, outbox, args, tmp, now)
    finally:
        svc.close()
        if schema is not None:
            eng = create_engine(args.pg)
            with eng.begin() as c:
                c.execute(text(f"DROP SCHEMA {schema} CASCADE"))
            eng.dispose()


def _run(svc, outbox, args, tmp, now):
    keys = generate_keyset(tmp / "keys", now=now - 60)
    svc.releases.provision((tmp / "keys" / "trust.json").read_bytes(),
                           keys.signers(TrustRole.COMMAND)[0])
    ops = Principal("bench", Role.OPERATOR)
    rng = random.Random(1)
    v1 = tmp / "v1.img"
    v1.write_bytes(rng.randbytes(256 * 1024))
    data = bytearray(v1.read_bytes())
    for i in range(0, len(data), 8192):
        data[i] ^= 0xFF
    v2 = tmp / "v2.img"
    v2.write_bytes(bytes(data))
    for img, version in ((v1, "1.0"), (v2, "2.0")):
        out = tmp / f"{version}.slb"
        build_bundle(img, out, release_keys=keys.signers(TrustRole.RELEASE), version=version,
                     hardware=["m1"], now=now - 30)
        rel = svc.releases.add(ops, out)
    d1, d2 = hash_file(v1).sha256, hash_file(v2).sha256

    # Setup (not measured): devices registered in bulk, each on v1, at one of 20 sites.
    ids = [f"dev-{i:06d}" for i in range(args.devices)]
    enrolled = dt.datetime.now(dt.UTC)
    with svc.sessions.begin() as s:
        s.execute(insert(m.Device), [
            {"id": d, "hardware_model": "m1", "serial": d, "site": f"site-{i % 20}",
             "tags": [], "status": "active", "cert_serial": format(i, "x"), "enrolled_at": enrolled,
             "online": True, "active_digest": d1, "versions": {"rootfs": "1.0"},
             "health": {"errors": 1.0}, "state": {}, "command_counter": 0}
            for i, d in enumerate(ids)
        ])
    gate = p.Gate(min_successes=1, max_failure_pct=5)
    ro = svc.scheduler.create(
        ops, name="bench", release_id=rel["bundle_id"], trial_devices=ids[:10], trial_gate=gate,
        phases=[PhaseSpec(f"p{x}", x, gate) for x in (1, 10, 50, 100)],
        max_in_flight=args.max_in_flight,
    )
    svc.scheduler.start(ops, ro["id"])

    meter = Meter()

    @event.listens_for(svc.engine, "before_cursor_execute")
    def _count(_conn, _cur, statement, parameters, _ctx, executemany):
        meter.statements += 1
        if statement.lstrip()[:6].upper() in {"INSERT", "UPDATE", "DELETE"}:
            meter.rows += len(parameters) if executemany else 1

    wall = time.perf_counter()
    for _ in range(100_000):
        meter.run(svc.tick)
        batch, outbox.sent = outbox.sent, []
        for device_id, body in batch:
            bundle = json.loads(body)["signed"]["args"].get("bundle_id")
            meter.run(svc.on_event, device_id,
                      {"type": "phase", "phase": "downloading", "bundle_id": bundle})
            meter.run(svc.on_event, device_id,
                      {"type": "result", "outcome": "committed", "bundle_id": bundle})
            meter.run(svc.on_state, device_id,
                      {"active_digest": d2, "versions": {"rootfs": "2.0"},
                       "health": {"errors": 1.0}, "phase": "idle"})
        meter.run(svc.drain_reports)
        if svc.scheduler.status(ro["id"])["state"] != "running":
            break
    wall = time.perf_counter() - wall
    st = svc.scheduler.status(ro["id"])
    updated = sum(g["counts"].get("succeeded", 0) for g in st["groups"])
    result = {
        "db": args.db, "devices": args.devices, "state": st["state"], "updated": updated,
        "controller_cpu_s": round(meter.cpu, 3),
        "cpu_ms_per_device_update": round(1000 * meter.cpu / max(updated, 1), 3),
        "db_rows_written": meter.rows,
        "db_rows_written_per_device_update": round(meter.rows / max(updated, 1), 2),
        "db_statements": meter.statements, "wall_s": round(wall, 2),
        "max_in_flight": args.max_in_flight, "cpus": os.cpu_count(),
    }
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
