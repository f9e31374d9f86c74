"""The operator's side of a run: keys, images, bundles, release, sites, devices, rollout.

Everything goes through the real code an operator's commands use: ``firmware_bundles.keyring``
and ``build_bundle`` for keys and bundles, the controller service for release upload, sites,
enrollment (token, device CSR from the agent's enroll code, fleet CA certificate) and the
rollout. The simulator adds only the choices a scenario makes.
"""

from __future__ import annotations

import hashlib
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from simulator.env import Controller
from simulator.images import make_images
from simulator.plan import DeviceSpec, trial_group
from simulator.scenario import Scenario


@dataclass(frozen=True)
class DeviceFirmware:
    """What a worker needs to boot its devices (plain data: crosses process boundaries)."""

    base_image: str  # path of the factory image (slot A of every device, hard-linked)
    image_size: int
    from_version: str
    to_version: str
    from_sha256: str
    to_sha256: str
    trust_root: bytes  # trust.json bytes the devices were given at enrollment


@dataclass(frozen=True)
class Firmware:
    """The run's firmware and release."""

    directory: Path
    release_id: str
    bundle_path: Path
    bundle_bytes: int
    device: DeviceFirmware
    build_seconds: float

    def for_devices(self) -> DeviceFirmware:
        """The worker's view."""
        return self.device


def prepare(scenario: Scenario, directory: Path, controller: Controller) -> Firmware:
    """Keys, trust root, both images, the bundle; the controller gets its keys and the release."""
    from firmware_bundles.bundle import build_bundle  # noqa: PLC0415
    from firmware_bundles.keyring import generate_keyset  # noqa: PLC0415
    from firmware_bundles.keys import write_key_file  # noqa: PLC0415
    from firmware_bundles.trust import Role  # noqa: PLC0415

    t = time.monotonic()
    directory.mkdir(parents=True, exist_ok=True)
    fw = scenario.firmware
    now = int(time.time())
    keyset = generate_keyset(directory / "keys", now=now)
    old, new = make_images(fw.image_size, fw.change, scenario.meta.seed)
    old_path = directory / f"image-{fw.from_version}.img"
    new_path = directory / f"image-{fw.to_version}.img"
    old_path.write_bytes(old)
    new_path.write_bytes(new)
    hardware = sorted({g.hardware for g in scenario.fleet})
    bundle = directory / f"release-{fw.to_version}-{fw.payload}.slb"
    manifest = build_bundle(
        new_path, bundle, release_keys=keyset.signers(Role.RELEASE), version=fw.to_version,
        hardware=hardware, now=now, base=old_path if fw.payload == "delta" else None,
        security_version=1, chunk_out_size=fw.chunk_size,
        notes=f"simulated release for scenario {scenario.meta.name}",
    )
    # The controller holds the command key (never a release key) and the trust root.
    data_dir = controller.data_dir
    (data_dir / "keys").mkdir(parents=True, exist_ok=True)
    write_key_file(data_dir / "keys" / "command.key", keyset.signers(Role.COMMAND)[0], "command")
    trust_bytes = (directory / "keys" / "trust.json").read_bytes()
    shutil.copyfile(directory / "keys" / "trust.json", data_dir / "trust.json")
    from controller.service import SYSTEM  # noqa: PLC0415

    release = controller.call(lambda s: s.releases.add(SYSTEM, bundle))
    release_id = release.get("bundle_id", manifest.bundle_id)
    device = DeviceFirmware(
        base_image=str(old_path), image_size=fw.image_size, from_version=fw.from_version,
        to_version=fw.to_version, from_sha256=hashlib.sha256(old).hexdigest(),
        to_sha256=hashlib.sha256(new).hexdigest(), trust_root=trust_bytes,
    )
    return Firmware(directory, release_id, bundle, bundle.stat().st_size, device,
                    time.monotonic() - t)


def register_fleet(scenario: Scenario, specs: Sequence[DeviceSpec], controller: Controller) -> None:
    """Sites (time zone, bandwidth budget) and every device, enrolled as a field engineer would."""
    from agent.enroll_cli import make_csr  # noqa: PLC0415
    from controller.service import SYSTEM  # noqa: PLC0415

    svc = controller.service
    for site in scenario.sites:
        # The controller's budget is bytes/s for updates; leave headroom for control traffic.
        budget = None if site.bandwidth is None else max(1, site.bandwidth * 9 // 80)
        svc.put_site(SYSTEM, site.name, tz=site.timezone, bandwidth_bps=budget)
    for d in specs:
        token = svc.issue_enrollment_token(SYSTEM, d.site, d.hardware, tags=sorted(d.tags))
        _key, csr = make_csr(d.device_id)
        svc.enroll(token["token"], d.device_id, f"SIM{d.index:07d}", d.hardware, csr.decode())


def start_rollout(scenario: Scenario, specs: Sequence[DeviceSpec], controller: Controller,
                  fw: Firmware) -> int:
    """Create and start the scenario's rollout as an operator would; returns its id."""
    from controller.rollout.planner import ErrorAction, Gate  # noqa: PLC0415
    from controller.rollout.scheduler import PhaseSpec  # noqa: PLC0415
    from controller.service import SYSTEM  # noqa: PLC0415

    r = scenario.rollout
    action = ErrorAction.PAUSE if r.on_gate_failure == "pause" else ErrorAction.ABORT

    def gate() -> Any:
        return Gate(min_successes=r.min_successes, max_failure_pct=r.max_failure_rate,
                    soak_seconds=round(r.soak), error_action=action)

    phases = [PhaseSpec(f"wave-{pct}pct", pct, gate()) for pct in r.phases]
    trial = [d.device_id for d in trial_group(scenario, specs)]
    svc = controller.service
    created = svc.scheduler.create(
        SYSTEM, name=r.name, release_id=fw.release_id,
        hardware_models=list(r.target.hardware), tags=list(r.target.tags),
        sites=list(r.target.sites), trial_devices=trial, trial_gate=gate() if trial else None,
        phases=phases, max_in_flight=r.concurrency or 100_000,
    )
    svc.scheduler.start(SYSTEM, created["id"])
    return int(created["id"])
