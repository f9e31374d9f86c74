"""The power-cut proof: cut power after every durable operation of an update, for every k.

For full and delta bundles, for a good image, one whose self-test fails and one that never
boots: run the update once to count its durable operations N (slot writes and fsyncs, journal
temp/fsync/rename/dir-fsync, boot env writes, including the bootloader's own bootcount writes),
then replay it N times, cutting power after operation k, in three crash modes (drop what was not
fsynced; tear the last write; keep everything). Every boot goes through the simulated U-Boot.
Checked after each replay: every boot ran a verified image (else "bricked"); the device settles
on the old or the new version with journal and boot env agreeing; the update either finished
(committed / reverted as the image deserves) or was abandoned cleanly, and the device then takes
the same update again to the expected end.
"""

from __future__ import annotations

import asyncio
import hashlib

import pytest
from agent_device import Device, derived, image, make_bundle

from agent.adapters.bootenv import RedundantEnv, env_view
from agent.adapters.state_file import FileJournal
from agent.core.states import Phase
from agent.journal import decode

ENV, JOURNAL = "/boot/uboot.env", "/data/agent/journal.json"
OLD = image(1)
NEW = derived(OLD, 7)
EXPECT = {"good": "2.0", "fails": "1.0", "never_boots": "1.0"}
RESULTS: dict[str, tuple[int, int]] = {}


def _settled_ok(dev: Device, behaviour: str) -> list[str]:
    """Problems with a settled device (empty list = fine)."""
    problems: list[str] = []
    agent = dev.last_agent
    assert agent is not None
    st = agent.state
    if st.phase.busy:
        problems.append(f"settled in busy phase {st.phase}")
    booted = dev.boots[-1]
    sha, _ = dev.identify(booted)
    running = {hashlib.sha256(OLD).hexdigest(): "1.0", hashlib.sha256(NEW).hexdigest(): "2.0"}[sha]
    if st.primary is not booted:
        problems.append("journal primary is not the booted slot")
    if st.version != running:
        problems.append(f"journal says {st.version}, running {running}")
    env = env_view(RedundantEnv(ENV, fs=dev.fs).read())
    if env.boot_part is not booted or env.upgrade_available:
        problems.append(f"boot env not settled: {env}")
    journal = decode(FileJournal(JOURNAL, fs=dev.fs).load() or b"")
    if journal.primary is not booted or journal.phase.busy:
        problems.append("journal on disk disagrees")
    if running == "2.0" and behaviour != "good":
        problems.append("a bad image was committed")
    return problems


def _replay(kind: str, behaviour: str) -> tuple[int, int, list[str]]:
    bundle = make_bundle(NEW, version="2.0", base=OLD if kind == "delta" else None)

    def fresh() -> Device:
        dev = Device(OLD)
        dev.learn(OLD, "good")
        dev.learn(NEW, behaviour)
        return dev

    ref = fresh()
    before = ref.fs.ops
    assert ref.run(bundle) == "settled"
    assert not _settled_ok(ref, behaviour)
    assert ref.last_agent is not None
    assert ref.last_agent.state.version == EXPECT[behaviour]
    total = ref.fs.ops - before
    cuts = bricked = 0
    failures: list[str] = []
    for mode in ("drop", "tear", "keep"):
        for k in range(1, total + 1):
            dev = fresh()
            end = asyncio.run(dev.arun(bundle, cut_after=k, mode=mode))
            cuts += dev.cuts
            where = f"{kind}/{behaviour}/{mode}/k={k}"
            if dev.bricked or end != "settled":
                bricked += 1
                failures.append(f"{where}: {end} {dev.bricked}")
                continue
            problems = _settled_ok(dev, behaviour)
            if problems:
                failures.append(f"{where}: {problems}")
                continue
            # Abandoned or finished: the same update again (no faults) must reach the expected end.
            assert dev.last_agent is not None
            if dev.last_agent.state.version != EXPECT[behaviour] or behaviour != "good":
                end = asyncio.run(dev.arun(bundle))
                if end != "settled" or dev.bricked or _settled_ok(dev, behaviour):
                    failures.append(f"{where}: retry ended {end} {_settled_ok(dev, behaviour)}")
                    continue
                if dev.last_agent.state.version != EXPECT[behaviour]:
                    failures.append(f"{where}: retry ended on {dev.last_agent.state.version}")
                    continue
                r = dev.last_agent.state.last_result
                if behaviour != "good" and (r is None or r.outcome != "reverted"):
                    failures.append(f"{where}: retry result {r}")
    return cuts, bricked, failures


@pytest.mark.parametrize("kind", ["full", "delta"])
@pytest.mark.parametrize("behaviour", ["good", "fails", "never_boots"])
def test_power_cut_after_every_durable_op_never_bricks(kind: str, behaviour: str) -> None:
    cuts, bricked, failures = _replay(kind, behaviour)
    RESULTS[f"{kind}/{behaviour}"] = (cuts, bricked)
    print(f"\npower-cut {kind}/{behaviour}: {cuts} cuts, {bricked} bricked")
    assert cuts > 50
    assert bricked == 0
    assert not failures, "\n".join(failures[:20])


def test_power_cut_summary() -> None:
    if len(RESULTS) < 6:
        pytest.skip("run with the parametrized power-cut tests")
    cuts = sum(c for c, _ in RESULTS.values())
    bricked = sum(b for _, b in RESULTS.values())
    print(f"\npower-cut total: {cuts} cuts, {bricked} bricked devices")
    assert bricked == 0


def test_phase_is_resting_after_reference_runs() -> None:
    assert not Phase.COMMITTED.busy
