"""Rollouts through the service: creation, gates, commands, reports, rollback, dependencies."""

from __future__ import annotations

import json
import threading

import pytest
from sqlalchemy import func, select, update

from controller.db import models as m
from controller.errors import Conflict, RequirementsUnmet, RolloutError
from controller.reports import _numbers
from controller.rollout import planner as p
from controller.rollout.scheduler import PhaseSpec
from controller.service import ControllerConfig, ControllerService
from firmware_bundles.bundle import hash_file, verify_release
from firmware_bundles.commands import verify_command


def _commands(svc, device_id=None):
    with svc.sessions() as s:
        q = select(m.Command).order_by(m.Command.id)
        if device_id:
            q = q.where(m.Command.device_id == device_id)
        return list(s.scalars(q))


def _report_all(svc, outcome="committed", health=None):
    with svc.sessions() as s:
        rows = list(s.scalars(select(m.RolloutDevice).where(m.RolloutDevice.state == "commanded")))
    for rd in rows:
        ev = {
            "type": "result",
            "outcome": outcome,
            "bundle_id": json.loads(_commands(svc, rd.device_id)[-1].body)["signed"]["args"][
                "bundle_id"
            ],
        }
        if health is not None:
            ev["health"] = health
        svc.on_event(rd.device_id, ev)
    return len(rows)


def test_staged_rollout_runs_to_the_end_with_one_signed_command_per_device(
    svc, fleet, release, clock
):
    devices = fleet.enroll(20, digest=release["v1"])
    gate = p.Gate(min_successes=1, soak_seconds=60)
    ro = svc.scheduler.create(
        fleet.ops,
        name="r1",
        release_id=release["id"],
        trial_devices=devices[:2],
        trial_gate=gate,
        phases=[PhaseSpec("p10", 10, gate), PhaseSpec("all", 100, gate)],
        max_in_flight=5,
    )
    assert [g["total"] for g in ro["groups"]] == [2, 2, 16]
    svc.scheduler.start(fleet.ops, ro["id"])
    for _ in range(200):
        svc.tick()
        _report_all(svc)
        clock.now += 30
        if svc.scheduler.status(ro["id"])["state"] == "finished":
            break
    st = svc.scheduler.status(ro["id"])
    assert st["state"] == "finished", st
    cmds = _commands(svc)
    assert sorted(c.device_id for c in cmds) == sorted(devices)
    trust = svc.releases.trust()
    for c in cmds[:3]:
        cmd = verify_command(c.body, trust, device_id=c.device_id, last_counter=0, now=int(clock()))
        assert cmd.args["bundle_id"] == release["id"]
        assert "payload" in cmd.args  # a controller-made delta from v1
    starts = [d for d in reversed(st["decisions"]) if d["action"] == "StartGroup"]
    assert [d["detail"]["group"] for d in starts] == ["trial", "p10", "all"]


def test_delta_prepared_per_base_and_full_fallback_for_unknown_base(svc, fleet, release):
    fleet.enroll(3, digest=release["v1"], prefix="a")
    fleet.enroll(2, digest="ab" * 32, prefix="b")
    ro = svc.scheduler.create(
        fleet.ops, name="r", release_id=release["id"], phases=[PhaseSpec("all", 100, p.Gate())]
    )
    payloads = svc.releases.show(release["id"])["payloads"]
    assert sorted(x["kind"] for x in payloads) == ["delta", "full"]
    delta = next(x for x in payloads if x["kind"] == "delta")
    assert delta["base_sha256"] == release["v1"]
    full = next(x for x in payloads if x["kind"] == "full")
    assert delta["size"] < full["size"] / 4
    svc.scheduler.start(fleet.ops, ro["id"])
    svc.tick()
    svc.tick()
    kinds = {}
    for c in _commands(svc):
        args = json.loads(c.body)["signed"]["args"]
        kinds[c.device_id] = "payload" in args
    assert kinds == {"a0000": True, "a0001": True, "a0002": True, "b0000": False, "b0001": False}
    # The chunk source serves each device what it was offered, and nothing to others.
    assert svc.resolve_chunk("a0000", release["id"], 0) is not None
    assert svc.resolve_chunk("a0000", release["id"], 0) != svc.resolve_chunk(
        "b0000", release["id"], 0
    )
    assert svc.resolve_chunk("zzz", release["id"], 0) is None
    assert svc.resolve_chunk("a0000", release["id"], 10**6) is None


def test_failures_over_gate_pause_with_reason_and_resume_accepts_them(svc, fleet, release):
    fleet.enroll(10, digest=release["v1"])
    ro = svc.scheduler.create(
        fleet.ops,
        name="r",
        release_id=release["id"],
        phases=[PhaseSpec("all", 100, p.Gate(max_failure_pct=10))],
        max_in_flight=10,
    )
    svc.scheduler.start(fleet.ops, ro["id"])
    svc.tick()
    svc.tick()
    _report_all(svc, outcome="reverted")
    svc.tick()
    st = svc.scheduler.status(ro["id"])
    assert st["state"] == "paused"
    assert "devices failed" in st["reason"]
    assert st["groups"][0]["state"] == "error"
    assert st["groups"][0]["errors"] == {"reverted": 10}
    svc.scheduler.resume(fleet.ops, ro["id"])
    svc.tick()
    assert svc.scheduler.status(ro["id"])["state"] in {"running", "finished"}


def test_paused_rollout_commands_nobody(svc, fleet, release):
    fleet.enroll(5, digest=release["v1"])
    ro = svc.scheduler.create(
        fleet.ops, name="r", release_id=release["id"], phases=[PhaseSpec("all", 100, p.Gate())]
    )
    svc.scheduler.start(fleet.ops, ro["id"])
    svc.scheduler.pause(fleet.ops, ro["id"])
    for _ in range(3):
        svc.tick()
    assert _commands(svc) == []
    with pytest.raises(Conflict):
        svc.scheduler.pause(fleet.ops, ro["id"])


def test_health_worse_than_devices_left_behind_stops_rollout(svc, fleet, release):
    devices = fleet.enroll(10, digest=release["v1"])
    for d in devices:
        svc.on_state(d, {"health": {"errors": 1.0}})
    gate = p.Gate(min_successes=2, health_tolerance_pct=20, error_action=p.ErrorAction.ABORT)
    ro = svc.scheduler.create(
        fleet.ops,
        name="r",
        release_id=release["id"],
        trial_devices=devices[:2],
        trial_gate=gate,
        phases=[PhaseSpec("all", 100, p.Gate())],
    )
    svc.scheduler.start(fleet.ops, ro["id"])
    svc.tick()
    svc.tick()
    _report_all(svc, health={"errors": 5.0})
    svc.tick()
    st = svc.scheduler.status(ro["id"])
    assert st["state"] == "stopped"
    assert "health of updated devices" in st["reason"]
    assert len(_commands(svc)) == 2


def test_rollback_flips_updated_devices_without_payload_and_cancels_in_flight(svc, fleet, release):
    fleet.enroll(4, digest=release["v1"])
    ro = svc.scheduler.create(
        fleet.ops,
        name="r",
        release_id=release["id"],
        phases=[PhaseSpec("all", 100, p.Gate())],
        max_in_flight=4,
    )
    svc.scheduler.start(fleet.ops, ro["id"])
    svc.tick()
    svc.tick()
    installs = _commands(svc)
    for c in installs[:2]:
        svc.on_event(c.device_id, {"type": "result", "outcome": "committed"})
    svc.drain_reports()
    svc.scheduler.rollback(fleet.ops, ro["id"])
    after = [c for c in _commands(svc) if c.action != "install"]
    assert sorted((c.device_id, c.action) for c in after) == sorted(
        [
            (installs[0].device_id, "rollback"),
            (installs[1].device_id, "rollback"),
            (installs[2].device_id, "cancel"),
            (installs[3].device_id, "cancel"),
        ]
    )
    for c in after:
        signed = json.loads(c.body)["signed"]
        assert signed["counter"] == 2
        assert "manifest" not in signed["args"]
        assert "payload" not in signed["args"]
    st = svc.scheduler.status(ro["id"])
    assert st["state"] == "stopped"
    assert "rolled back by ops" in st["reason"]
    svc.scheduler.rollback(fleet.ops, ro["id"])  # a second rollback sends nothing new
    assert len(_commands(svc)) == 8


def test_requirements_no_device_meets_are_refused_with_clear_message(svc, fleet):
    v = fleet.image("app", seed=3)
    rel = fleet.upload(fleet.bundle(v, "3.0", component="app", requires={"modem": ">=2.1"}))
    fleet.enroll(3, versions={"modem": "2.0"})
    with pytest.raises(RequirementsUnmet, match=r"modem >=2.1 \(has 2.0\)"):
        svc.scheduler.create(fleet.ops, name="r", release_id=rel["bundle_id"])


def test_rollout_needing_another_component_waits_for_its_rollout(svc, fleet):
    modem = fleet.upload(fleet.bundle(fleet.image("modem", seed=4), "2.2", component="modem"))
    app = fleet.upload(
        fleet.bundle(
            fleet.image("app", seed=5), "3.0", component="app", requires={"modem": ">=2.1"}
        )
    )
    fleet.enroll(2, versions={"modem": "2.0"})
    r_modem = svc.scheduler.create(
        fleet.ops,
        name="modem",
        release_id=modem["bundle_id"],
        phases=[PhaseSpec("all", 100, p.Gate())],
    )
    r_app = svc.scheduler.create(
        fleet.ops, name="app", release_id=app["bundle_id"], phases=[PhaseSpec("all", 100, p.Gate())]
    )
    assert r_app["after_rollout"] == r_modem["id"]
    svc.scheduler.start(fleet.ops, r_app["id"])
    svc.scheduler.start(fleet.ops, r_modem["id"])
    for _ in range(3):
        svc.tick()
    assert {c.rollout_id for c in _commands(svc)} == {r_modem["id"]}
    for _ in range(6):
        _report_all(svc)
        svc.tick()
    assert svc.scheduler.status(r_modem["id"])["state"] == "finished"
    assert {c.rollout_id for c in _commands(svc)} == {r_modem["id"], r_app["id"]}


def test_rollout_waiting_for_a_stopped_one_pauses_with_the_reason(svc, fleet):
    modem = fleet.upload(fleet.bundle(fleet.image("modem", seed=4), "2.2", component="modem"))
    app = fleet.upload(
        fleet.bundle(
            fleet.image("app", seed=5), "3.0", component="app", requires={"modem": ">=2.1"}
        )
    )
    fleet.enroll(2, versions={"modem": "2.0"})
    r_modem = svc.scheduler.create(fleet.ops, name="modem", release_id=modem["bundle_id"])
    r_app = svc.scheduler.create(fleet.ops, name="app", release_id=app["bundle_id"])
    svc.scheduler.start(fleet.ops, r_app["id"])
    svc.scheduler.abort(fleet.ops, r_modem["id"])
    svc.tick()
    st = svc.scheduler.status(r_app["id"])
    assert st["state"] == "paused"
    assert f"rollout {r_modem['id']} it waits for was stopped" in st["reason"]
    assert _commands(svc) == []


def test_maintenance_window_closed_commands_nobody_at_that_site(svc, fleet, release, clock):
    fleet.enroll(2, digest=release["v1"], site="berlin", prefix="b")
    fleet.enroll(2, digest=release["v1"], site="tokyo", prefix="t")
    clock.now = 1_799_913_600  # 2027-01-14 08:00 UTC: 09:00 in Berlin, 17:00 in Tokyo
    svc.put_site(fleet.ops, "berlin", "Europe/Berlin", [{"start": "08:30", "end": "10:00"}])
    svc.put_site(fleet.ops, "tokyo", "Asia/Tokyo", [{"start": "02:00", "end": "04:00"}])
    ro = svc.scheduler.create(
        fleet.ops, name="r", release_id=release["id"], phases=[PhaseSpec("all", 100, p.Gate())]
    )
    svc.scheduler.start(fleet.ops, ro["id"])
    svc.tick()
    svc.tick()
    assert sorted(c.device_id for c in _commands(svc)) == ["b0000", "b0001"]


def test_empty_target_is_refused(svc, fleet, release):
    with pytest.raises(RolloutError, match="no active device"):
        svc.scheduler.create(fleet.ops, name="r", release_id=release["id"])


def test_device_counter_strictly_increases_across_rollouts(svc, fleet, release):
    fleet.enroll(1, digest=release["v1"])
    for name in ("a", "b"):
        ro = svc.scheduler.create(
            fleet.ops, name=name, release_id=release["id"], phases=[PhaseSpec("all", 100, p.Gate())]
        )
        svc.scheduler.start(fleet.ops, ro["id"])
        svc.tick()
        svc.tick()
        svc.scheduler.abort(fleet.ops, ro["id"])
    counters = [json.loads(c.body)["signed"]["counter"] for c in _commands(svc)]
    assert counters == sorted(set(counters))
    with svc.sessions() as s:
        assert s.scalar(select(func.count()).select_from(m.Command)) == 4


def test_expired_install_is_reissued_with_the_next_counter(svc, fleet, release, clock):
    fleet.enroll(2, digest=release["v1"])
    ro = svc.scheduler.create(
        fleet.ops, name="r", release_id=release["id"], phases=[PhaseSpec("all", 100, p.Gate())]
    )
    svc.scheduler.start(fleet.ops, ro["id"])
    svc.tick()
    svc.tick()
    svc.on_event("d0000", {"type": "phase", "phase": "downloading", "progress": 5})
    clock.now += svc.config.command_ttl_seconds - 10
    svc.tick()  # d0000 reported meanwhile: not expired; d0001 silent but not yet expired
    assert len(_commands(svc)) == 2
    clock.now += 20
    svc.tick()
    cmds = _commands(svc, "d0001")
    assert [json.loads(c.body)["signed"]["counter"] for c in cmds] == [1, 2]
    assert len(_commands(svc, "d0000")) == 1
    st = svc.scheduler.status(ro["id"])
    assert any(d["action"] == "ReissueExpired" for d in st["decisions"])
    svc.on_event("d0001", {"type": "result", "outcome": "committed", "bundle_id": release["id"]})
    svc.tick()
    assert st["groups"][0]["counts"]["commanded"] == 2
    assert svc.scheduler.status(ro["id"])["groups"][0]["counts"]["succeeded"] == 1


def test_api_created_rollout_gets_its_deltas_on_the_next_tick_then_is_ready(svc, fleet, release):
    fleet.enroll(2, digest=release["v1"])
    ro = svc.scheduler.create(
        fleet.ops,
        name="r",
        release_id=release["id"],
        prepare_now=False,
        phases=[PhaseSpec("all", 100, p.Gate())],
    )
    assert ro["state"] == "creating"
    assert [x["kind"] for x in svc.releases.show(release["id"])["payloads"]] == ["full"]
    with pytest.raises(Conflict):
        svc.scheduler.start(fleet.ops, ro["id"])
    svc.tick()
    assert svc.scheduler.status(ro["id"])["state"] == "ready"
    assert sorted(x["kind"] for x in svc.releases.show(release["id"])["payloads"]) == [
        "delta",
        "full",
    ]


def test_delta_not_smaller_than_full_is_dropped_for_the_full_payload(svc, fleet):
    unrelated = fleet.image("other", seed=9)
    fleet.upload(fleet.bundle(unrelated, "0.9"))
    rel = fleet.upload(fleet.bundle(fleet.image("v3", seed=10), "3.0"))
    fleet.enroll(2, digest=hash_file(unrelated).sha256)
    svc.scheduler.create(
        fleet.ops, name="r", release_id=rel["bundle_id"], phases=[PhaseSpec("all", 100, p.Gate())]
    )
    assert [x["kind"] for x in svc.releases.show(rel["bundle_id"])["payloads"]] == ["full"]


def test_delta_only_release_gets_a_controller_made_full_payload_for_other_bases(svc, fleet):
    v1 = fleet.image("v1", seed=1)
    v2 = fleet.mutate(v1, "v2")
    fleet.upload(fleet.bundle(v1, "1.0"))
    rel = fleet.upload(fleet.bundle(v2, "2.0", base=v1))
    fleet.enroll(1, digest=hash_file(v1).sha256, prefix="a")
    fleet.enroll(1, digest="cd" * 32, prefix="b")
    ro = svc.scheduler.create(
        fleet.ops, name="r", release_id=rel["bundle_id"], phases=[PhaseSpec("all", 100, p.Gate())]
    )
    payloads = svc.releases.show(rel["bundle_id"])["payloads"]
    assert sorted((x["kind"], x["controller_made"]) for x in payloads) == [
        ("delta", False),
        ("full", True),
    ]
    svc.scheduler.start(fleet.ops, ro["id"])
    svc.tick()
    svc.tick()
    args = {c.device_id: json.loads(c.body)["signed"]["args"] for c in _commands(svc)}
    assert "payload" not in args["a0000"]  # the release's own delta from v1
    assert args["b0000"]["payload"]["signed"]["payload"]["kind"] == "full"
    trust = svc.releases.trust()
    verified = verify_release(
        args["b0000"]["manifest"],
        trust,
        now=int(fleet.clock()),
        payload_doc=args["b0000"]["payload"],
        hardware="m1",
    )
    assert verified.payload.kind.value == "full"


def test_rollout_that_cannot_sign_pauses_with_the_reason(svc, fleet, release, data_dir):
    fleet.enroll(2, digest=release["v1"])
    ro = svc.scheduler.create(
        fleet.ops, name="r", release_id=release["id"], phases=[PhaseSpec("all", 100, p.Gate())]
    )
    svc.scheduler.start(fleet.ops, ro["id"])
    (data_dir / "keys" / "command.key").unlink()
    restarted = ControllerService(svc.config, clock=svc.clock)  # the key file is gone
    try:
        restarted.tick()
        restarted.tick()
        st = restarted.scheduler.status(ro["id"])
        assert st["state"] == "paused"
        assert st["reason"].startswith("controller.no_command_key")
        assert _commands(restarted) == []
    finally:
        restarted.close()


@pytest.mark.postgres
def test_two_replicas_ticking_together_command_each_device_once(
    pg_db_url, data_dir, clock, tmp_path, fleet_cls
):
    config = ControllerConfig(database_url=pg_db_url, data_dir=data_dir)
    a = ControllerService(config, clock=clock)
    b = ControllerService(config, clock=clock)
    try:
        fleet = fleet_cls(a, tmp_path, clock)
        v1 = fleet.image("v1", seed=1)
        fleet.upload(fleet.bundle(v1, "1.0"))
        rel = fleet.upload(fleet.bundle(fleet.mutate(v1, "v2"), "2.0"))
        ids = fleet.enroll(40, digest=hash_file(v1).sha256)
        ro = a.scheduler.create(
            fleet.ops,
            name="r",
            release_id=rel["bundle_id"],
            phases=[PhaseSpec("half", 50, p.Gate()), PhaseSpec("all", 100, p.Gate())],
            max_in_flight=7,
        )
        a.scheduler.start(fleet.ops, ro["id"])
        for _ in range(40):
            barrier = threading.Barrier(2)

            def round_(svc, barrier=barrier):
                barrier.wait()
                svc.tick()

            threads = [threading.Thread(target=round_, args=(x,)) for x in (a, b)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            _report_all(a)
            if a.scheduler.status(ro["id"])["state"] == "finished":
                break
        assert a.scheduler.status(ro["id"])["state"] == "finished"
        installs = [c.device_id for c in _commands(a) if c.action == "install"]
        assert sorted(installs) == sorted(ids)
    finally:
        a.close()
        b.close()


def test_health_gate_compares_the_metric_the_rollout_names(svc, fleet, release):
    devices = fleet.enroll(6, digest=release["v1"])
    for d in devices:
        svc.on_state(d, {"health": {"errors": 1.0, "reboots": 0.0}})
    gate = p.Gate(min_successes=2, health_tolerance_pct=0)
    ro = svc.scheduler.create(
        fleet.ops,
        name="r",
        release_id=release["id"],
        trial_devices=devices[:2],
        trial_gate=gate,
        health_metric="reboots",
        phases=[PhaseSpec("all", 100, p.Gate())],
    )
    svc.scheduler.start(fleet.ops, ro["id"])
    svc.tick()
    svc.tick()
    _report_all(svc, health={"errors": 1.0, "reboots": 3.0})  # errors unchanged, reboots worse
    svc.tick()
    st = svc.scheduler.status(ro["id"])
    assert st["state"] == "paused"
    assert "health of updated devices 3" in st["reason"]


def test_hostile_health_numbers_are_dropped_not_raised() -> None:
    got = _numbers({"errors": 10**400, "ok": 3, "flag": True, "nan": float("nan"), "s": "x"})
    assert got == {"ok": 3.0}


def test_site_relay_is_served_what_its_site_was_offered(svc, fleet, release):
    fleet.enroll(3, digest=release["v1"], site="s1")
    ro = svc.scheduler.create(
        fleet.ops, name="r", release_id=release["id"], phases=[PhaseSpec("all", 100, p.Gate())]
    )
    assert svc.resolve_chunk("relay-s1", release["id"], 0) is None  # nothing offered yet
    svc.scheduler.start(fleet.ops, ro["id"])
    svc.tick()
    svc.tick()
    # The relay (docs/protocol.md: identity relay-<site>) gets the site's payload, no other site's.
    assert svc.resolve_chunk("relay-s1", release["id"], 0) == svc.resolve_chunk(
        "d0000", release["id"], 0
    )
    assert svc.resolve_chunk("relay-s1", release["id"], 0) is not None
    assert svc.resolve_chunk("relay-s2", release["id"], 0) is None
    assert svc.site_of("relay-s1") == "s1"
    assert svc.site_of("d0000") == "s1"


def test_device_enrolled_as_a_relay_id_before_the_reservation_gets_no_site_offers(
    svc, fleet, release
):
    """Enrollment refuses relay-<site> now; a row from before stays a device, not site s2's relay."""
    fleet.enroll(2, digest=release["v1"], site="s2", prefix="s2d")
    [legacy] = fleet.enroll(1, digest=release["v1"], site="s1", prefix="legacy")
    with svc.sessions.begin() as s:  # what an enrollment under "relay-s2" left behind
        s.execute(update(m.Device).where(m.Device.id == legacy).values(id="relay-s2"))
    svc._caches.site_of.clear()
    ro = svc.scheduler.create(
        fleet.ops,
        name="r",
        release_id=release["id"],
        sites=["s2"],  # offered to site s2 only, not to the legacy device at s1
        phases=[PhaseSpec("all", 100, p.Gate())],
    )
    svc.scheduler.start(fleet.ops, ro["id"])
    svc.tick()
    svc.tick()
    assert svc.resolve_chunk("s2d0000", release["id"], 0) is not None  # s2 was offered it
    assert svc.resolve_chunk("relay-s2", release["id"], 0) is None
    assert svc.site_of("relay-s2") == "s1"
    assert svc.relay_site("relay-s2") is None
    assert svc.relay_site("relay-s1") == "s1"
