"""The update state machine: ``step(state, event) -> (state, commands)``, no I/O.

Rules (the decision note is ``docs/agent-state-machine.md``):

1. The transitions are the table :data:`EDGES`, one line per edge: source phases, event type,
   guard, target phase, action. ``step`` takes the first line that matches; an event with no
   matching line is programmer misuse and raises ``RuntimeError``. Every event that comes from
   the outside world (a boot, a command) has a line in every phase.
2. Persist before acting: a command list that changes the world starts with
   ``PersistJournal`` of a state that says "this may have happened"; reconciliation at the next
   ``Booted`` finds out from the slot that booted and the boot env whether it did.
3. The target slot is marked not GOOD in the journal before its first byte is written, becomes
   a trial only after its read-back digest equals the release-signed target digest, and becomes
   primary only after the self-test passed on it.
4. ``Update.attempts`` counts starts without progress and trial boots; past ``MAX_ATTEMPTS`` the
   update fails (before the switch) or reverts (after it). The bootloader's own ``bootlimit``
   bounds the boots the agent never sees.
5. ``security_version`` rises only in the state persisted at commit, as ``max(old, new)``.

Example::

    state, cmds = step(state, InstallRequested(plan, counter=7))
    # cmds == [PersistJournal(...), Publish(...), FetchChunks(bundle_id, 0, n)]
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from agent.core.commands import (
    Command,
    FetchChunks,
    MarkActive,
    MarkBad,
    MarkGood,
    PersistJournal,
    Publish,
    RaiseSecurityVersion,
    Reboot,
    RunMigrations,
    RunSelfTest,
    SetBootOnce,
    SyncSlot,
    UndoMigrations,
    VerifySlot,
    WriteChunk,
)
from agent.core.events import (
    Booted,
    CancelRequested,
    ChunkFetched,
    ChunkWritten,
    EnvWriteFailed,
    Event,
    FetchFailed,
    InstallRequested,
    MigrationsDone,
    MigrationsFailed,
    Rejected,
    RollbackRequested,
    SelfTestFailed,
    SelfTestPassed,
    SlotVerified,
    WriteFailed,
)
from agent.core.states import (
    MAX_ATTEMPTS,
    AgentState,
    BootSlot,
    BootState,
    InstallPlan,
    PayloadKind,
    Phase,
    PlannedChunk,
    Release,
    Result,
    SlotInfo,
    Update,
)
from agent.errors import AgentBusy, AlreadyInstalled, SlotTooSmall
from firmware_bundles.errors import BaseMismatch, FormatInvalid, VersionRollback

# A chunk source that keeps failing (corrupt chunks, lost link) ends the update after this many
# failures without a checkpoint in between.
MAX_FETCH_FAILURES = 12
DEFAULT_CHECKPOINT_BYTES = 8 * 1024 * 1024

Outcome = tuple[AgentState, list[Command]]
Guard = Callable[[AgentState, Any], bool]
Action = Callable[[AgentState, Any], Outcome]


# --------------------------------------------------------------------------------------------
# Planning (RAUC r_install_make_plans): release + device state -> where every chunk goes.


def make_install_plan(
    release: Release,
    state: AgentState,
    *,
    target_capacity: int,
    checkpoint_bytes: int = DEFAULT_CHECKPOINT_BYTES,
) -> InstallPlan:
    """Check a verified release against this device and place its chunks in the inactive slot.

    Args:
        release: the release, already signature-checked by ``firmware_bundles``.
        state: the agent's current state (primary slot, its digest, the security floor).
        target_capacity: size in bytes of the inactive slot.
        checkpoint_bytes: sync the slot and journal the progress at least this often.

    Returns:
        The plan: target slot, chunk offsets, the digest the slot must read back as.

    Raises:
        AgentBusy: an update is in flight.
        AlreadyInstalled: the primary slot already holds this exact image.
        VersionRollback: ``security_version`` below the committed floor.
        BaseMismatch: a delta whose base is not the primary slot's image.
        SlotTooSmall: the image does not fit.
        FormatInvalid: the chunk table does not add up to the target.
    """
    if state.phase.busy:
        raise AgentBusy(f"update in phase {state.phase.value}; cancel it first")
    primary = state.slot(state.primary)
    if primary.sha256 == release.target_sha256:
        raise AlreadyInstalled(f"{release.version} is already the primary slot's image")
    if release.security_version < state.security_version:
        raise VersionRollback(
            f"security_version {release.security_version} < committed {state.security_version}"
        )
    if release.target_size <= 0 or not release.chunks:
        raise FormatInvalid("empty target image")
    if release.target_size > target_capacity:
        raise SlotTooSmall(f"image of {release.target_size} B > slot of {target_capacity} B")
    if sum(c.out_size for c in release.chunks) != release.target_size:
        raise FormatInvalid("chunk table does not add up to the target size")
    base: BootSlot | None = None
    if release.kind is PayloadKind.DELTA:
        if release.base_sha256 is None or release.base_sha256 != primary.sha256:
            raise BaseMismatch("delta base is not the image in the primary slot")
        if release.base_size is not None and release.base_size != primary.size:
            raise BaseMismatch("delta base size differs from the primary slot's image")
        base = state.primary
    planned: list[PlannedChunk] = []
    offset = 0
    for index, c in enumerate(release.chunks):
        planned.append(PlannedChunk(index, offset, c.size, c.sha256, c.out_size))
        offset += c.out_size
    return InstallPlan(
        bundle_id=release.bundle_id,
        version=release.version,
        security_version=release.security_version,
        target_slot=state.primary.other,
        kind=release.kind,
        base_slot=base,
        target_size=release.target_size,
        target_sha256=release.target_sha256,
        chunks=tuple(planned),
        checkpoint_bytes=max(1, checkpoint_bytes),
        rollout=release.rollout,
        from_version=primary.version,
    )


# --------------------------------------------------------------------------------------------
# Helpers


def _upd(state: AgentState) -> Update:
    if state.update is None:
        raise RuntimeError(f"phase {state.phase.value} without an update")
    return state.update


def _event_doc(state: AgentState, **extra: Any) -> Publish:
    doc: dict[str, Any] = {"type": "phase", "phase": state.phase.value}
    if state.update is not None:
        doc["bundle_id"] = state.update.plan.bundle_id
        doc["version"] = state.update.plan.version
    doc.update({k: v for k, v in extra.items() if v is not None})
    return Publish(doc)


def _result_doc(state: AgentState, result: Result) -> Publish:
    return Publish(
        {
            "type": "result",
            "phase": state.phase.value,
            "outcome": result.outcome,
            "code": result.code,
            "message": result.message,
            "bundle_id": result.bundle_id,
            "version": result.version,
        }
    )


def _next_index(u: Update) -> int:
    return u.written + u.pending


def _with_update(state: AgentState, phase: Phase, update: Update | None) -> AgentState:
    return replace(state, phase=phase, update=update)


def _finish(state: AgentState, phase: Phase, result: Result) -> AgentState:
    return replace(state, phase=phase, update=None, last_result=result)


def _failed_result(u: Update, outcome: str, code: str, message: str) -> Result:
    return Result(outcome, code, message, u.plan.bundle_id, u.plan.version)


def _target_unusable(state: AgentState, u: Update, bad: bool) -> AgentState:
    # design 3: a slot that is not fully verified and tested is never GOOD in the journal, so a
    # fleet rollback can never point the bootloader at it.
    info = SlotInfo(state=BootState.BAD if bad else BootState.UNKNOWN)
    return state.with_slot(u.plan.target_slot, info)


# --------------------------------------------------------------------------------------------
# Guards


def _at_primary(s: AgentState, e: Booted) -> bool:
    return e.slot is s.primary


def _at_target(s: AgentState, e: Booted) -> bool:
    return s.update is not None and e.slot is s.update.plan.target_slot


def _stray(s: AgentState, e: Booted) -> bool:
    return not _at_primary(s, e) and not _at_target(s, e)


def _stray_good(s: AgentState, e: Booted) -> bool:
    return _stray(s, e) and s.slot(e.slot).state is BootState.GOOD and s.update is None


def _attempts_left(s: AgentState, _e: object) -> bool:
    return _upd(s).attempts < MAX_ATTEMPTS


def _no_attempts_left(s: AgentState, e: object) -> bool:
    return not _attempts_left(s, e)


def _switch_seen(s: AgentState, e: Booted) -> bool:
    # The bootloader tried the trial slot and fell back (altbootcmd keeps bootcount > 0); a
    # switch that never reached the env leaves bootcount at 0, as every env write of ours does.
    return e.slot is s.primary and e.env.bootcount > 0


def _switch_not_seen(s: AgentState, e: Booted) -> bool:
    return e.slot is s.primary and e.env.bootcount == 0


def _always(_s: AgentState, _e: object) -> bool:
    return True


def _both(a: Guard, b: Guard) -> Guard:
    def guard(s: AgentState, e: Any) -> bool:
        return a(s, e) and b(s, e)

    guard.__name__ = f"{a.__name__}_and{b.__name__}"
    return guard


def _chunk_ok(s: AgentState, e: ChunkFetched) -> bool:
    u = _upd(s)
    return (
        hashlib.sha256(e.data).hexdigest() == u.plan.chunks[e.index].sha256
        and len(e.data) == u.plan.chunks[e.index].size
    )


def _chunk_bad(s: AgentState, e: ChunkFetched) -> bool:
    return not _chunk_ok(s, e)


def _fetch_retries_left(s: AgentState, _e: object) -> bool:
    return _upd(s).fetch_failures + 1 < MAX_FETCH_FAILURES


def _fetch_exhausted(s: AgentState, e: object) -> bool:
    return not _fetch_retries_left(s, e)


def _last_chunk(s: AgentState, _e: ChunkWritten) -> bool:
    u = _upd(s)
    return _next_index(u) + 1 == len(u.plan.chunks)


def _checkpoint_due(s: AgentState, e: ChunkWritten) -> bool:
    u = _upd(s)
    done = u.plan.chunks[u.written : _next_index(u) + 1]
    return not _last_chunk(s, e) and sum(c.out_size for c in done) >= u.plan.checkpoint_bytes


def _plain_chunk(s: AgentState, e: ChunkWritten) -> bool:
    return not _last_chunk(s, e) and not _checkpoint_due(s, e)


def _digest_ok(s: AgentState, e: SlotVerified) -> bool:
    return e.sha256 == _upd(s).plan.target_sha256


def _digest_bad(s: AgentState, e: SlotVerified) -> bool:
    return not _digest_ok(s, e)


def _rollback_possible(s: AgentState, _e: object) -> bool:
    other = s.slot(s.primary.other)
    return other.state is BootState.GOOD and other.sha256 is not None


def _no_rollback(s: AgentState, e: object) -> bool:
    return not _rollback_possible(s, e)


def _booted_target(s: AgentState, _e: object) -> bool:
    return s.update is not None and s.booted is s.update.plan.target_slot


def _booted_primary(s: AgentState, e: object) -> bool:
    return not _booted_target(s, e)


# --------------------------------------------------------------------------------------------
# Actions: each returns the new state and the commands, persisting before acting.


def _observe(s: AgentState, e: Booted) -> AgentState:
    # The anti-rollback floor also lives in the boot env: take the higher of the two, so losing
    # the journal (a wiped data partition) never lowers it.
    return replace(
        s, booted=e.slot, security_version=max(s.security_version, e.env.security_version)
    )


def _settle(s: AgentState, e: Booted) -> Outcome:
    s = _observe(s, e)
    cmds: list[Command] = [PersistJournal(s)]
    if e.env.upgrade_available or e.env.boot_part is not s.primary:
        # An earlier cleanup did not land (or someone edited the env): make it say "primary,
        # no trial" again. Safe: primary is GOOD and is what we are running.
        cmds.append(MarkActive(s.primary))
    if e.env.security_version < s.security_version:
        cmds.append(RaiseSecurityVersion(s.security_version))
    cmds.append(_event_doc(s, event="started"))
    return s, cmds


def _adopt_booted(s: AgentState, e: Booted) -> Outcome:
    # At rest the bootloader is the truth: a rollback whose env write landed before its journal
    # write, or an operator's manual switch to the other GOOD slot.
    s = replace(_observe(s, e), primary=e.slot, phase=Phase.IDLE)
    return s, [
        PersistJournal(s),
        MarkActive(e.slot),
        _event_doc(s, event="adopted_booted_slot"),
    ]


def _leave_stray(s: AgentState, e: Booted) -> Outcome:
    # Booted a slot that is neither primary nor a trial we asked for (an env restored from a
    # default, a manual edit): go back to primary at once.
    s = _observe(s, e)
    return s, [
        PersistJournal(s),
        _event_doc(s, event="stray_boot", slot=e.slot.value),
        MarkActive(s.primary),
        Reboot(),
    ]


def _resume_download(s: AgentState, e: Booted) -> Outcome:
    u = _upd(s)
    s = _observe(s, e)
    u = replace(u, pending=0, attempts=u.attempts + 1, fetch_failures=0)
    s = _with_update(s, Phase.DOWNLOADING, u)
    return s, [
        PersistJournal(s),
        _event_doc(s, event="resumed", chunk=u.written),
        FetchChunks(u.plan.bundle_id, u.written, len(u.plan.chunks)),
    ]


def _give_up_download(s: AgentState, e: Booted) -> Outcome:
    u = _upd(s)
    s = _observe(s, e)
    r = _failed_result(u, "failed", "agent.no_progress", "restarted without progress too often")
    s = _finish(_target_unusable(s, u, bad=False), Phase.FAILED, r)
    return s, [PersistJournal(s), _result_doc(s, r)]


def _retry_switch(s: AgentState, e: Booted) -> Outcome:
    u = _upd(s)
    s = _observe(s, e)
    s = _with_update(s, Phase.STAGED, replace(u, attempts=u.attempts + 1))
    return s, [PersistJournal(s), SetBootOnce(u.plan.target_slot), Reboot()]


def _give_up_switch(s: AgentState, e: Booted) -> Outcome:
    u = _upd(s)
    s = _observe(s, e)
    r = _failed_result(u, "failed", "bootenv.write_failed", "the trial boot never took effect")
    s = _finish(_target_unusable(s, u, bad=False), Phase.FAILED, r)
    return s, [PersistJournal(s), MarkBad(u.plan.target_slot), _result_doc(s, r)]


def _begin_trial(s: AgentState, e: Booted) -> Outcome:
    u = _upd(s)
    s = _observe(s, e)
    # Persist "migrations may have run" before running them, so a revert undoes them.
    u = replace(u, attempts=u.attempts + 1, migrated=True)
    s = _with_update(s, Phase.TRIAL_BOOT, u)
    return s, [
        PersistJournal(s),
        _event_doc(s, event="trial_boot", attempt=u.attempts),
        RunMigrations(u.plan.from_version, u.plan.version),
    ]


def _begin_trial_from_staged(s: AgentState, e: Booted) -> Outcome:
    u = _upd(s)
    return _begin_trial(replace(s, update=replace(u, attempts=0)), e)


def _revert_from(s: AgentState, failure: Result, *, booted_target: bool) -> Outcome:
    """Revert: undo migrations, end the trial in the env; reboot if we run on the target."""
    u = replace(_upd(s), failure=failure, attempts=min(_upd(s).attempts, MAX_ATTEMPTS))
    s = _with_update(s, Phase.REVERTING, u)
    cmds: list[Command] = [PersistJournal(s)]
    if u.migrated:
        cmds.append(UndoMigrations(u.plan.from_version, u.plan.version))
        s = _with_update(s, Phase.REVERTING, replace(u, migrated=False))
        cmds.append(PersistJournal(s))
    cmds.append(MarkBad(u.plan.target_slot))
    if booted_target:
        cmds.append(Reboot())
        return s, cmds
    done = _finish(_target_unusable(s, u, bad=True), Phase.REVERTED, failure)
    cmds += [PersistJournal(done), _result_doc(done, failure)]
    return done, cmds


def _loop_revert(s: AgentState, e: Booted) -> Outcome:
    u = _upd(s)
    s = _observe(s, e)
    r = _failed_result(u, "reverted", "boot.loop", "the new slot restarted before committing")
    return _revert_from(s, r, booted_target=True)


def _fallback_revert(s: AgentState, e: Booted) -> Outcome:
    u = _upd(s)
    s = _observe(s, e)
    r = _failed_result(u, "reverted", "boot.fallback", "the bootloader fell back to the old slot")
    return _revert_from(s, r, booted_target=False)


def _continue_revert(s: AgentState, e: Booted) -> Outcome:
    u = _upd(s)
    s = _observe(s, e)
    failure = u.failure or _failed_result(u, "reverted", "boot.loop", "revert interrupted")
    s = _with_update(s, Phase.REVERTING, replace(u, attempts=min(u.attempts + 1, MAX_ATTEMPTS)))
    return _revert_from(s, failure, booted_target=_at_target(s, e))


def _finish_commit(s: AgentState, e: Booted) -> Outcome:
    return _commit(_observe(s, e))


def _commit(s: AgentState) -> Outcome:
    u = _upd(s)
    target = u.plan.target_slot
    committing = _with_update(s, Phase.COMMITTING, u)
    r = Result("committed", None, "", u.plan.bundle_id, u.plan.version)
    info = SlotInfo(BootState.GOOD, u.plan.version, u.plan.target_sha256, u.plan.target_size)
    done = _finish(committing.with_slot(target, info), Phase.COMMITTED, r)
    # design 6: the floor rises only here, after the env says "good", and only upwards.
    done = replace(
        done,
        primary=target,
        security_version=max(s.security_version, u.plan.security_version),
    )
    return done, [
        PersistJournal(committing),
        MarkGood(target),
        PersistJournal(done),
        RaiseSecurityVersion(done.security_version),
        _result_doc(done, r),
    ]


def _install(s: AgentState, e: InstallRequested) -> Outcome:
    plan = e.plan
    if plan.target_slot is not s.primary.other:
        raise RuntimeError("plan targets the primary slot")
    u = Update(plan=plan)
    s = replace(s, last_counter=max(s.last_counter, e.counter))
    s = _with_update(_target_unusable(s, u, bad=False), Phase.DOWNLOADING, u)
    return s, [
        PersistJournal(s),
        _event_doc(s, event="accepted"),
        FetchChunks(plan.bundle_id, 0, len(plan.chunks)),
    ]


def _refuse_busy(s: AgentState, e: InstallRequested) -> Outcome:
    return s, [
        Publish(
            {
                "type": "error",
                "code": AgentBusy.code,
                "message": f"update in phase {s.phase.value}",
                "bundle_id": e.plan.bundle_id,
            }
        )
    ]


def _record_rejection(s: AgentState, e: Rejected) -> Outcome:
    r = Result("rejected", e.code, e.message, e.bundle_id)
    s = replace(s, last_result=r, last_counter=max(s.last_counter, e.counter))
    return s, [PersistJournal(s), _result_doc(s, r)]


def _report_rejection(s: AgentState, e: Rejected) -> Outcome:
    doc = {"type": "error", "code": e.code, "message": e.message, "bundle_id": e.bundle_id}
    return s, [Publish(doc)]


def _cancel(s: AgentState, e: CancelRequested) -> Outcome:
    u = _upd(s)
    r = _failed_result(u, "failed", "agent.cancelled", "cancelled before the switch")
    s = replace(s, last_counter=max(s.last_counter, e.counter))
    s = _finish(_target_unusable(s, u, bad=False), Phase.FAILED, r)
    return s, [PersistJournal(s), _result_doc(s, r)]


def _refuse_cancel(s: AgentState, _e: CancelRequested) -> Outcome:
    code = "agent.too_late" if s.phase.busy else "agent.nothing_to_cancel"
    return s, [Publish({"type": "error", "code": code, "message": f"phase {s.phase.value}"})]


def _rollback(s: AgentState, e: RollbackRequested) -> Outcome:
    other = s.primary.other
    r = Result("rolled_back", None, "", None, s.slot(other).version)
    done = replace(
        s,
        phase=Phase.IDLE,
        primary=other,
        last_result=r,
        last_counter=max(s.last_counter, e.counter),
    )
    # The env is the truth at rest (see _adopt_booted): switch it, then record it, then reboot.
    return done, [MarkActive(other), PersistJournal(done), _result_doc(done, r), Reboot()]


def _refuse_rollback(s: AgentState, _e: RollbackRequested) -> Outcome:
    code = "agent.busy" if s.phase.busy else "agent.no_rollback_slot"
    return s, [Publish({"type": "error", "code": code, "message": f"phase {s.phase.value}"})]


def _write(s: AgentState, e: ChunkFetched) -> Outcome:
    u = _upd(s)
    chunk = u.plan.chunks[e.index]
    s = _with_update(s, Phase.WRITING, u)
    return s, [WriteChunk(u.plan.target_slot, chunk, e.data, u.plan.kind, u.plan.base_slot)]


def _refetch(s: AgentState, e: ChunkFetched | FetchFailed) -> Outcome:
    u = _upd(s)
    u = replace(u, fetch_failures=u.fetch_failures + 1)
    s = _with_update(s, Phase.DOWNLOADING, u)
    code = e.code if isinstance(e, FetchFailed) else "bundle.digest_mismatch"
    doc = {"type": "error", "code": code, "chunk": _next_index(u), "retry": u.fetch_failures}
    return s, [Publish(doc), FetchChunks(u.plan.bundle_id, _next_index(u), len(u.plan.chunks))]


def _fail_download(s: AgentState, e: ChunkFetched | FetchFailed | WriteFailed) -> Outcome:
    u = _upd(s)
    if isinstance(e, ChunkFetched):
        code, msg = "bundle.digest_mismatch", f"chunk {e.index} kept failing its digest"
    else:
        code, msg = e.code, e.message
    r = _failed_result(u, "failed", code, msg)
    s = _finish(_target_unusable(s, u, bad=False), Phase.FAILED, r)
    return s, [PersistJournal(s), _result_doc(s, r)]


def _check_index(s: AgentState, index: int) -> None:
    if index != _next_index(_upd(s)):
        raise RuntimeError(f"chunk {index} out of order (expected {_next_index(_upd(s))})")


def _written(s: AgentState, _e: ChunkWritten) -> Outcome:
    u = _upd(s)
    return _with_update(s, Phase.DOWNLOADING, replace(u, pending=u.pending + 1)), []


def _checkpoint(s: AgentState, _e: ChunkWritten) -> Outcome:
    u = _upd(s)
    u = replace(u, written=_next_index(u) + 1, pending=0, attempts=0, fetch_failures=0)
    s = _with_update(s, Phase.DOWNLOADING, u)
    return s, [SyncSlot(u.plan.target_slot), PersistJournal(s), _event_doc(s, chunk=u.written)]


def _verify(s: AgentState, _e: ChunkWritten) -> Outcome:
    u = _upd(s)
    u = replace(u, written=len(u.plan.chunks), pending=0, attempts=0, fetch_failures=0)
    s = _with_update(s, Phase.VERIFYING, u)
    return s, [
        SyncSlot(u.plan.target_slot),
        PersistJournal(s),
        _event_doc(s),
        VerifySlot(u.plan.target_slot, u.plan.target_size),
    ]


def _stage(s: AgentState, _e: SlotVerified) -> Outcome:
    u = _upd(s)
    # Verified but untested: version and digest known, state still UNKNOWN until commit.
    info = SlotInfo(BootState.UNKNOWN, u.plan.version, u.plan.target_sha256, u.plan.target_size)
    s = _with_update(s.with_slot(u.plan.target_slot, info), Phase.STAGED, replace(u, attempts=0))
    return s, [PersistJournal(s), _event_doc(s), SetBootOnce(u.plan.target_slot), Reboot()]


def _reject_image(s: AgentState, e: SlotVerified) -> Outcome:
    u = _upd(s)
    r = _failed_result(u, "failed", "bundle.digest_mismatch", f"slot reads back as {e.sha256}")
    s = _finish(_target_unusable(s, u, bad=True), Phase.FAILED, r)
    return s, [PersistJournal(s), _result_doc(s, r)]


def _switch_failed(s: AgentState, e: EnvWriteFailed) -> Outcome:
    u = _upd(s)
    r = _failed_result(u, "failed", e.code, e.message)
    s = _finish(_target_unusable(s, u, bad=False), Phase.FAILED, r)
    # Best effort to take back a boot-once that may have landed; reconciliation repairs it too.
    return s, [PersistJournal(s), _result_doc(s, r), MarkActive(s.primary)]


def _self_test(s: AgentState, _e: MigrationsDone) -> Outcome:
    s = _with_update(s, Phase.SELF_TEST, _upd(s))
    return s, [PersistJournal(s), _event_doc(s), RunSelfTest()]


def _self_test_passed(s: AgentState, _e: SelfTestPassed) -> Outcome:
    return _commit(s)


def _trial_failed(s: AgentState, e: SelfTestFailed | MigrationsFailed | EnvWriteFailed) -> Outcome:
    u = _upd(s)
    r = _failed_result(u, "reverted", e.code, e.message)
    return _revert_from(s, r, booted_target=True)


def _undo_failed(s: AgentState, e: MigrationsFailed) -> Outcome:
    # The undo hook failed: report it and still end the trial (the old slot's data may need a
    # human, but the device must not stay on an image that failed).
    u = replace(_upd(s), migrated=False)
    s = _with_update(s, Phase.REVERTING, u)
    cmds: list[Command] = [
        PersistJournal(s),
        Publish({"type": "error", "code": e.code, "message": e.message}),
    ]
    again, more = _revert_from(
        s, u.failure or Result("reverted"), booted_target=_booted_target(s, e)
    )
    return again, cmds + more[1:]


def _revert_env_failed(s: AgentState, e: EnvWriteFailed) -> Outcome:
    # MarkBad did not land on the target: reboot anyway; upgrade_available is still 1, so the
    # bootloader's bootcount falls back by itself after bootlimit boots.
    return s, [Publish({"type": "error", "code": e.code, "message": e.message}), Reboot()]


def _revert_env_failed_on_primary(s: AgentState, e: EnvWriteFailed) -> Outcome:
    u = _upd(s)
    failure = u.failure or Result("reverted", e.code, e.message)
    done = _finish(_target_unusable(s, u, bad=True), Phase.REVERTED, failure)
    # We run on primary, so the env already boots it; _settle repairs the env at next start.
    return done, [PersistJournal(done), _result_doc(done, failure)]


def _warn(s: AgentState, e: EnvWriteFailed) -> Outcome:
    return s, [Publish({"type": "error", "code": e.code, "message": e.message})]


def _commit_env_failed(s: AgentState, e: EnvWriteFailed) -> Outcome:
    return _trial_failed(s, e)


# --------------------------------------------------------------------------------------------
# The table: one line per edge. (source phases, event, guard, target phase, action)

P = Phase
RESTING = frozenset({P.IDLE, P.COMMITTED, P.REVERTED, P.FAILED})
PRE_SWITCH = frozenset({P.DOWNLOADING, P.WRITING, P.VERIFYING})
TRIAL = frozenset({P.TRIAL_BOOT, P.SELF_TEST})
ANY = frozenset(Phase)
SAME = None  # target: the source phase


@dataclass(frozen=True)
class Edge:
    """One transition: ``source --event [guard]--> target / action``."""

    source: frozenset[Phase]
    event: type
    guard: Guard
    target: Phase | None
    action: Action


def _one(p: Phase) -> frozenset[Phase]:
    return frozenset({p})


EDGES: tuple[Edge, ...] = (
    # --- boots: reconcile the journal with the slot that booted and the boot env ---
    Edge(RESTING, Booted, _at_primary, SAME, _settle),
    Edge(RESTING, Booted, _stray_good, P.IDLE, _adopt_booted),
    Edge(ANY, Booted, _stray, SAME, _leave_stray),
    Edge(PRE_SWITCH, Booted, _both(_at_primary, _attempts_left), P.DOWNLOADING, _resume_download),
    Edge(PRE_SWITCH, Booted, _at_primary, P.FAILED, _give_up_download),
    Edge(PRE_SWITCH, Booted, _at_target, SAME, _leave_stray),
    Edge(_one(P.STAGED), Booted, _at_target, P.TRIAL_BOOT, _begin_trial_from_staged),
    Edge(_one(P.STAGED), Booted, _switch_seen, P.REVERTED, _fallback_revert),
    Edge(_one(P.STAGED), Booted, _both(_switch_not_seen, _attempts_left), P.STAGED, _retry_switch),
    Edge(_one(P.STAGED), Booted, _switch_not_seen, P.FAILED, _give_up_switch),
    Edge(TRIAL, Booted, _both(_at_target, _attempts_left), P.TRIAL_BOOT, _begin_trial),
    Edge(TRIAL, Booted, _at_target, P.REVERTING, _loop_revert),
    Edge(TRIAL, Booted, _at_primary, P.REVERTED, _fallback_revert),
    Edge(_one(P.COMMITTING), Booted, _at_target, P.COMMITTED, _finish_commit),
    Edge(_one(P.COMMITTING), Booted, _at_primary, P.REVERTED, _fallback_revert),
    Edge(_one(P.REVERTING), Booted, _at_target, P.REVERTING, _continue_revert),
    Edge(_one(P.REVERTING), Booted, _at_primary, P.REVERTED, _continue_revert),
    # --- commands from the controller or the offline installer ---
    Edge(RESTING, InstallRequested, _always, P.DOWNLOADING, _install),
    Edge(ANY, InstallRequested, _always, SAME, _refuse_busy),
    Edge(RESTING, Rejected, _always, SAME, _record_rejection),
    Edge(ANY, Rejected, _always, SAME, _report_rejection),
    Edge(PRE_SWITCH, CancelRequested, _always, P.FAILED, _cancel),
    Edge(ANY, CancelRequested, _always, SAME, _refuse_cancel),
    Edge(RESTING, RollbackRequested, _rollback_possible, P.IDLE, _rollback),
    Edge(ANY, RollbackRequested, _always, SAME, _refuse_rollback),
    # --- download, write, verify ---
    Edge(_one(P.DOWNLOADING), ChunkFetched, _chunk_ok, P.WRITING, _write),
    Edge(_one(P.DOWNLOADING), ChunkFetched, _both(_chunk_bad, _fetch_retries_left), SAME, _refetch),
    Edge(_one(P.DOWNLOADING), ChunkFetched, _chunk_bad, P.FAILED, _fail_download),
    Edge(_one(P.DOWNLOADING), FetchFailed, _fetch_retries_left, SAME, _refetch),
    Edge(_one(P.DOWNLOADING), FetchFailed, _fetch_exhausted, P.FAILED, _fail_download),
    Edge(_one(P.WRITING), ChunkWritten, _plain_chunk, P.DOWNLOADING, _written),
    Edge(_one(P.WRITING), ChunkWritten, _checkpoint_due, P.DOWNLOADING, _checkpoint),
    Edge(_one(P.WRITING), ChunkWritten, _last_chunk, P.VERIFYING, _verify),
    Edge(PRE_SWITCH, WriteFailed, _always, P.FAILED, _fail_download),
    Edge(_one(P.VERIFYING), SlotVerified, _digest_ok, P.STAGED, _stage),
    Edge(_one(P.VERIFYING), SlotVerified, _digest_bad, P.FAILED, _reject_image),
    Edge(_one(P.STAGED), EnvWriteFailed, _always, P.FAILED, _switch_failed),
    # --- trial boot, self-test, commit, revert ---
    Edge(_one(P.TRIAL_BOOT), MigrationsDone, _always, P.SELF_TEST, _self_test),
    Edge(_one(P.TRIAL_BOOT), MigrationsFailed, _always, P.REVERTING, _trial_failed),
    Edge(_one(P.SELF_TEST), SelfTestPassed, _always, P.COMMITTED, _self_test_passed),
    Edge(_one(P.SELF_TEST), SelfTestFailed, _always, P.REVERTING, _trial_failed),
    Edge(_one(P.COMMITTING), EnvWriteFailed, _always, P.REVERTING, _commit_env_failed),
    Edge(_one(P.REVERTING), MigrationsFailed, _booted_target, P.REVERTING, _undo_failed),
    Edge(_one(P.REVERTING), MigrationsFailed, _booted_primary, P.REVERTED, _undo_failed),
    Edge(_one(P.REVERTING), EnvWriteFailed, _booted_target, P.REVERTING, _revert_env_failed),
    Edge(
        _one(P.REVERTING),
        EnvWriteFailed,
        _booted_primary,
        P.REVERTED,
        _revert_env_failed_on_primary,
    ),
    Edge(RESTING, EnvWriteFailed, _always, SAME, _warn),
)


def step(state: AgentState, event: Event) -> Outcome:
    """Apply one event: the new state and the commands to execute, in order.

    Raises:
        RuntimeError: the event has no edge in this phase (steps out of order), or a chunk
            arrived out of order.
    """
    if isinstance(event, ChunkFetched | ChunkWritten) and state.update is not None:
        _check_index(state, event.index)
    for edge in EDGES:
        if (
            state.phase in edge.source
            and isinstance(event, edge.event)
            and edge.guard(state, event)
        ):
            new, commands = edge.action(state, event)
            expected = state.phase if edge.target is None else edge.target
            if new.phase is not expected:
                raise AssertionError(  # the table and the action disagree: a bug here
                    f"{edge.action.__name__} went to {new.phase} instead of {expected}"
                )
            return new, commands
    raise RuntimeError(f"{type(event).__name__} is not expected in phase {state.phase.value}")


def edges_as_rows() -> list[Mapping[str, str]]:
    """The table in words (for docs and ``status --json`` debugging)."""
    return [
        {
            "from": ",".join(sorted(p.value for p in e.source)) if e.source != ANY else "*",
            "event": e.event.__name__,
            "guard": e.guard.__name__.lstrip("_"),
            "to": "(same)" if e.target is None else e.target.value,
            "action": e.action.__name__.lstrip("_"),
        }
        for e in EDGES
    ]
