"""The pure core: every illegal order raises, plans check the device, loops end, floors rise once."""

from __future__ import annotations

import ast
import hashlib
from dataclasses import replace
from pathlib import Path

import pytest

from agent.core.commands import (
    FetchChunks,
    MarkBad,
    MarkGood,
    PersistJournal,
    RaiseSecurityVersion,
    Reboot,
    RunSelfTest,
    SetBootOnce,
    VerifySlot,
    WriteChunk,
)
from agent.core.events import (
    Booted,
    ChunkFetched,
    ChunkWritten,
    EnvView,
    InstallRequested,
    MigrationsDone,
    SelfTestFailed,
    SelfTestPassed,
    SlotVerified,
)
from agent.core.machine import EDGES, edges_as_rows, make_install_plan, step
from agent.core.states import (
    MAX_ATTEMPTS,
    AgentState,
    BootSlot,
    BootState,
    ChunkSpec,
    PayloadKind,
    Phase,
    Release,
    SlotInfo,
)
from agent.errors import AgentBusy, AlreadyInstalled, SlotTooSmall
from firmware_bundles.errors import BaseMismatch, FormatInvalid, VersionRollback

A, B = BootSlot.A, BootSlot.B
OLD_SHA = "0" * 64
DATA = [b"chunk-0", b"chunk-1", b"chunk-2"]
NEW_SHA = "f" * 64
CLEAN = EnvView(A, upgrade_available=False, bootcount=0)


def release(**kw) -> Release:
    base = {
        "bundle_id": "b1",
        "version": "2.0",
        "security_version": 3,
        "target_size": 300,
        "target_sha256": NEW_SHA,
        "kind": PayloadKind.FULL,
        "chunks": tuple(ChunkSpec(len(d), hashlib.sha256(d).hexdigest(), 100) for d in DATA),
    }
    base.update(kw)
    return Release(**base)


def fresh(**kw) -> AgentState:
    s = AgentState.initial(A, SlotInfo(BootState.GOOD, "1.0", OLD_SHA, 200))
    return replace(s, **kw)


def started() -> AgentState:
    s, _ = step(fresh(), Booted(A, CLEAN))
    return s


def plan(state: AgentState | None = None, **kw):
    return make_install_plan(
        release(**kw), state or started(), target_capacity=1000, checkpoint_bytes=200
    )


def downloaded() -> AgentState:
    s, cmds = step(started(), InstallRequested(plan(), counter=5))
    assert isinstance(cmds[0], PersistJournal)
    assert isinstance(cmds[-1], FetchChunks)
    for i, d in enumerate(DATA):
        s, cmds = step(s, ChunkFetched(i, d))
        assert isinstance(cmds[0], WriteChunk)
        assert cmds[0].slot is B
        s, cmds = step(s, ChunkWritten(i))
    assert s.phase is Phase.VERIFYING
    assert isinstance(cmds[-1], VerifySlot)
    return s


def staged() -> AgentState:
    s, cmds = step(downloaded(), SlotVerified(NEW_SHA))
    assert s.phase is Phase.STAGED
    kinds = [type(c) for c in cmds]
    assert kinds.index(PersistJournal) < kinds.index(SetBootOnce) < kinds.index(Reboot)
    return s


def trial_env(n=1) -> EnvView:
    return EnvView(B, upgrade_available=True, bootcount=n)


def test_full_happy_path_commits_and_raises_floor_once() -> None:
    s, cmds = step(staged(), Booted(B, trial_env()))
    assert s.phase is Phase.TRIAL_BOOT
    assert s.update.migrated
    s, cmds = step(s, MigrationsDone())
    assert s.phase is Phase.SELF_TEST
    assert isinstance(cmds[-1], RunSelfTest)
    before = s.security_version
    s, cmds = step(s, SelfTestPassed())
    assert before == 0
    assert s.phase is Phase.COMMITTED
    assert s.primary is B
    assert s.security_version == 3
    kinds = [type(c) for c in cmds]
    # persist "committing" -> env says good -> persist committed -> floor in env
    assert kinds[:4] == [PersistJournal, MarkGood, PersistJournal, RaiseSecurityVersion]
    assert cmds[0].state.phase is Phase.COMMITTING
    assert cmds[0].state.security_version == 0
    # idempotent: a start after the commit re-asserts the same floor, never lowers it
    s2, cmds2 = step(s, Booted(B, EnvView(B, False, 0, security_version=3)))
    assert s2.security_version == 3
    assert not any(isinstance(c, RaiseSecurityVersion) for c in cmds2)
    _s3, cmds3 = step(s, Booted(B, EnvView(B, False, 0, security_version=1)))
    assert any(isinstance(c, RaiseSecurityVersion) and c.value == 3 for c in cmds3)
    s4, _ = step(s, Booted(B, EnvView(B, False, 0, security_version=9)))
    assert s4.security_version == 9


def test_self_test_failure_reverts_and_never_raises_floor() -> None:
    s, _ = step(staged(), Booted(B, trial_env()))
    s, _ = step(s, MigrationsDone())
    s, cmds = step(s, SelfTestFailed("selftest.failed", "nope"))
    assert s.phase is Phase.REVERTING
    assert s.security_version == 0
    assert any(isinstance(c, MarkBad) and c.slot is B for c in cmds)
    assert isinstance(cmds[-1], Reboot)
    s, _ = step(s, Booted(A, EnvView(A, False, 0)))
    assert s.phase is Phase.REVERTED
    assert s.primary is A
    assert s.last_result.code == "selftest.failed"
    assert s.slot(B).state is BootState.BAD
    assert s.security_version == 0


@pytest.mark.parametrize("phase", [Phase.TRIAL_BOOT, Phase.SELF_TEST])
def test_boot_loop_on_new_slot_ends_in_revert(phase) -> None:
    s, _ = step(staged(), Booted(B, trial_env()))
    s = replace(s, phase=phase)
    for n in range(2, 20):
        s, _cmds = step(s, Booted(B, trial_env(n)))
        assert s.update is None or s.update.attempts <= MAX_ATTEMPTS
        if s.phase is Phase.REVERTING:
            break
        s = replace(s, phase=phase)
    assert s.phase is Phase.REVERTING
    assert n <= MAX_ATTEMPTS + 1
    assert s.update.failure.code == "boot.loop"


def test_crash_loop_during_download_gives_up() -> None:
    s, _ = step(started(), InstallRequested(plan()))
    for _ in range(20):
        s, _ = step(s, Booted(A, CLEAN))
        if s.phase is Phase.FAILED:
            break
    assert s.phase is Phase.FAILED
    assert s.last_result.code == "agent.no_progress"


def test_staged_fallback_is_detected_from_bootcount() -> None:
    s, _ = step(staged(), Booted(A, EnvView(A, False, 4)))
    assert s.phase is Phase.REVERTED
    assert s.last_result.code == "boot.fallback"


def test_staged_switch_that_never_landed_is_retried_then_abandoned() -> None:
    s = staged()
    for _ in range(10):
        s, cmds = step(s, Booted(A, CLEAN))
        if s.phase is not Phase.STAGED:
            break
        assert isinstance(cmds[1], SetBootOnce)
    assert s.phase is Phase.FAILED
    assert s.primary is A


def test_corrupt_chunk_is_never_written() -> None:
    s, _ = step(started(), InstallRequested(plan()))
    s, cmds = step(s, ChunkFetched(0, b"evil"))
    assert s.phase is Phase.DOWNLOADING
    assert not any(isinstance(c, WriteChunk) for c in cmds)


@pytest.mark.parametrize(
    ("event", "phase"),
    [
        (ChunkFetched(0, b"x"), Phase.IDLE),
        (ChunkWritten(0), Phase.IDLE),
        (SlotVerified(NEW_SHA), Phase.IDLE),
        (SelfTestPassed(), Phase.IDLE),
        (SelfTestPassed(), Phase.DOWNLOADING),
        (MigrationsDone(), Phase.VERIFYING),
        (SlotVerified(NEW_SHA), Phase.DOWNLOADING),
        (ChunkWritten(0), Phase.DOWNLOADING),
    ],
)
def test_out_of_order_events_raise(event, phase) -> None:
    s = started()
    if phase is not Phase.IDLE:
        s, _ = step(s, InstallRequested(plan()))
        s = replace(s, phase=phase)
    with pytest.raises(RuntimeError):
        step(s, event)


def test_chunk_out_of_order_raises() -> None:
    s, _ = step(started(), InstallRequested(plan()))
    with pytest.raises(RuntimeError):
        step(s, ChunkFetched(1, DATA[1]))


def test_install_while_busy_is_refused_without_state_change() -> None:
    s, _ = step(started(), InstallRequested(plan()))
    s2, cmds = step(s, InstallRequested(plan(state=started())))
    assert s2 == s
    assert cmds[0].event["code"] == "agent.busy"
    with pytest.raises(AgentBusy):
        make_install_plan(release(), s, target_capacity=1000)


def test_plan_checks() -> None:
    st = replace(started(), security_version=5)
    with pytest.raises(VersionRollback):
        make_install_plan(release(), st, target_capacity=1000)
    with pytest.raises(SlotTooSmall):
        make_install_plan(release(), started(), target_capacity=299)
    with pytest.raises(BaseMismatch):
        make_install_plan(
            release(kind=PayloadKind.DELTA, base_sha256="1" * 64), started(), target_capacity=1000
        )
    with pytest.raises(FormatInvalid):
        make_install_plan(release(target_size=301), started(), target_capacity=1000)
    with pytest.raises(AlreadyInstalled):
        make_install_plan(release(target_sha256=OLD_SHA), started(), target_capacity=1000)
    p = make_install_plan(
        release(kind=PayloadKind.DELTA, base_sha256=OLD_SHA), started(), target_capacity=1000
    )
    assert p.base_slot is A
    assert p.target_slot is B
    assert [c.offset for c in p.chunks] == [0, 100, 200]


def test_target_slot_is_marked_unusable_before_its_first_byte() -> None:
    st = started().with_slot(B, SlotInfo(BootState.GOOD, "0.9", "9" * 64, 10))
    _s, cmds = step(st, InstallRequested(plan(state=st)))
    assert cmds[0].state.slot(B).state is not BootState.GOOD


def test_table_lines_are_all_reachable_names() -> None:
    rows = edges_as_rows()
    assert len(rows) == len(EDGES) > 30
    assert all(r["event"] and r["action"] for r in rows)


def test_core_is_pure() -> None:
    """agent/core imports no I/O: no asyncio, os, socket, subprocess, threading, open()."""
    banned = {"asyncio", "os", "socket", "subprocess", "threading", "pathlib", "shutil", "io"}
    core = Path(__file__).parents[2] / "agent" / "core"
    for path in core.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                names = {(node.module or "").split(".")[0]}
            elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "open":
                names = {"open"}
            else:
                continue
            assert not names & (banned | {"open"}), f"{path.name} uses {names & (banned | {'open'})}"
