"""Hypothesis RuleBasedStateMachine over the pure core, with a pure model of the device.

Rules are physical events and commands: install (good / failing / never-booting image), good and
corrupt chunks, lost links, power cuts (unsynced slot writes are lost), reboots through a model
of U-Boot's boot counting, cancels, fleet rollbacks, installs while busy.

Invariants:
- a bootable good slot always exists: whatever the bootloader would boot next (and its
  fall-back when a trial is pending) holds a complete, verified image;
- the durable journal's primary slot holds a complete verified image;
- the attempt counter is bounded; the security floor never goes down.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from agent.core import commands as C
from agent.core.events import (
    Booted,
    CancelRequested,
    ChunkFetched,
    ChunkWritten,
    EnvView,
    EnvWriteFailed,
    FetchFailed,
    InstallRequested,
    MigrationsDone,
    Rejected,
    RollbackRequested,
    SelfTestFailed,
    SelfTestPassed,
    SlotVerified,
    WriteFailed,
)
from agent.core.machine import make_install_plan, step
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
from agent.errors import AgentError
from firmware_bundles.errors import BundleError

A, B = BootSlot.A, BootSlot.B
FACTORY = "f" * 64


@dataclass
class _Img:
    sha: str
    behaviour: str  # good | fails | never_boots


@dataclass
class World:
    durable: dict[BootSlot, object] = field(default_factory=dict)
    volatile: dict[BootSlot, object] = field(default_factory=dict)
    env: dict[str, object] = field(default_factory=dict)
    journal: AgentState | None = None
    images: dict[str, _Img] = field(default_factory=dict)
    releases: dict[str, tuple[Release, list[bytes]]] = field(default_factory=dict)


def _data(version: int, i: int) -> bytes:
    return f"v{version}-chunk{i}".encode()


class CoreMachine(RuleBasedStateMachine):
    """See the module docstring."""

    @initialize(bootlimit=st.sampled_from([1, 2, 3, 10]))
    def factory(self, bootlimit: int) -> None:
        self.bootlimit = bootlimit
        self.w = World()
        self.w.durable = {A: ("image", FACTORY), B: ("garbage",)}
        self.w.volatile = dict(self.w.durable)
        self.w.env = {"boot_part": A, "upgrade_available": False, "bootcount": 0, "secver": 0}
        self.w.images[FACTORY] = _Img(FACTORY, "good")
        self.agent: AgentState | None = None
        self.booted: BootSlot | None = None
        self.n = 0
        self.floor = 0
        self.fail_writes = False
        self.fail_env = False
        self.selftest_running = False
        self._boot()

    # -- the model's runtime -----------------------------------------------------------

    def _content_sha(self, slot: BootSlot, which: dict[BootSlot, object]) -> str | None:
        c = which[slot]
        return c[1] if isinstance(c, tuple) and c[0] == "image" else None  # type: ignore[index,return-value]

    def _feed(self, event: object) -> None:
        queue = [event]
        while queue and self.agent is not None:
            ev = queue.pop(0)
            self.agent, cmds = step(self.agent, ev)  # type: ignore[arg-type]
            for cmd in cmds:
                follow = self._exec(cmd)
                if follow == "reboot":
                    self.agent = None
                    queue.clear()
                    break
                if isinstance(follow, tuple):  # failure: back to the durable state
                    self.agent = self.w.journal
                    queue = [follow[1]]
                    break
                if follow is not None:
                    queue.append(follow)

    def _exec(self, cmd: object) -> object:
        w = self.w
        if isinstance(cmd, C.PersistJournal):
            w.journal = cmd.state
            return None
        if isinstance(cmd, C.WriteChunk):
            assert cmd.slot is not self.booted, "wrote the booted slot"
            assert w.journal is not None
            assert cmd.slot is not w.journal.primary, "wrote primary"
            if self.fail_writes:
                return ("fail", WriteFailed("slot.io_error", "model"))
            c = w.volatile[cmd.slot]
            got: dict[int, bytes] = dict(c[2]) if isinstance(c, tuple) and c[0] == "partial" else {}  # type: ignore[misc]
            got[cmd.chunk.index] = cmd.data
            w.volatile[cmd.slot] = ("partial", None, tuple(sorted(got.items())))
            return ChunkWritten(cmd.chunk.index)
        if isinstance(cmd, C.SyncSlot):
            w.durable[cmd.slot] = w.volatile[cmd.slot]
            return None
        if isinstance(cmd, C.VerifySlot):
            c = w.durable[cmd.slot]
            sha = "mismatch"
            if isinstance(c, tuple) and c[0] == "partial":
                got = dict(c[2])  # type: ignore[misc]
                for rel, chunks in w.releases.values():
                    if got == dict(enumerate(chunks)):
                        sha = rel.target_sha256
                        # a complete, verified image now sits in the slot
                        w.durable[cmd.slot] = w.volatile[cmd.slot] = ("image", sha)
            return SlotVerified(sha)
        if isinstance(cmd, C.SetBootOnce | C.MarkGood | C.MarkBad | C.MarkActive):
            if self.fail_env:
                return ("fail", EnvWriteFailed("bootenv.write_failed", "model"))
            if isinstance(cmd, C.SetBootOnce):
                w.env.update(boot_part=cmd.slot, upgrade_available=True, bootcount=0)
            else:
                slot = cmd.slot.other if isinstance(cmd, C.MarkBad) else cmd.slot
                w.env.update(boot_part=slot, upgrade_available=False, bootcount=0)
            return None
        if isinstance(cmd, C.RaiseSecurityVersion):
            w.env["secver"] = max(int(w.env["secver"]), cmd.value)  # type: ignore[call-overload]
            return None
        if isinstance(cmd, C.Reboot):
            return "reboot"
        if isinstance(cmd, C.RunMigrations):
            return MigrationsDone()
        if isinstance(cmd, C.RunSelfTest):
            self.selftest_running = True  # finishes in its own rule (or the device dies first)
            return None
        return None  # FetchChunks, Publish, UndoMigrations

    def _boot(self) -> None:
        """Power on: U-Boot's counting, then the agent if the image runs."""
        for _ in range(self.bootlimit + 3):
            e = self.w.env
            if e["upgrade_available"]:
                e["bootcount"] = int(e["bootcount"]) + 1  # type: ignore[call-overload]
                if int(e["bootcount"]) > self.bootlimit:  # type: ignore[call-overload]
                    e["boot_part"] = e["boot_part"].other  # type: ignore[union-attr]
                    e["upgrade_available"] = False
            slot: BootSlot = e["boot_part"]  # type: ignore[assignment]
            sha = self._content_sha(slot, self.w.durable)
            assert sha is not None, f"booted slot {slot} holds no image"
            assert sha in self.w.images, f"booted slot {slot} holds an unknown image"
            if self.w.images[sha].behaviour == "never_boots":
                continue  # watchdog reset
            self.booted = slot
            state = self.w.journal or AgentState.initial(
                slot, SlotInfo(BootState.GOOD, "0", FACTORY, 1)
            )
            self.agent = state
            view = EnvView(
                slot,
                bool(e["upgrade_available"]),
                int(e["bootcount"]),  # type: ignore[call-overload]
                int(e["secver"]),
            )  # type: ignore[call-overload]
            self._feed(Booted(slot, view))
            return
        raise AssertionError("boot loop never reached a running image")

    # -- rules ----------------------------------------------------------------------------

    @precondition(lambda self: self.agent is not None and not self.agent.phase.busy)
    @rule(
        behaviour=st.sampled_from(["good", "good", "fails", "never_boots"]),
        secver=st.integers(0, 3),
    )
    def install(self, behaviour: str, secver: int) -> None:
        assert self.agent is not None
        self.n += 1
        chunks = [_data(self.n, i) for i in range(3)]
        sha = hashlib.sha256(b"image-%d" % self.n).hexdigest()
        rel = Release(
            f"b{self.n}",
            str(self.n),
            secver,
            30,
            sha,
            PayloadKind.FULL,
            tuple(ChunkSpec(len(c), hashlib.sha256(c).hexdigest(), 10) for c in chunks),
        )
        self.w.releases[rel.bundle_id] = (rel, chunks)
        self.w.images[sha] = _Img(sha, behaviour)
        try:
            plan = make_install_plan(rel, self.agent, target_capacity=100, checkpoint_bytes=20)
        except (AgentError, BundleError) as e:
            self._feed(Rejected(e.code, str(e)))
            return
        self._feed(InstallRequested(plan, counter=self.n))

    def _next_chunk(self) -> tuple[Release, list[bytes], int] | None:
        a = self.agent
        if a is None or a.phase is not Phase.DOWNLOADING or a.update is None:
            return None
        rel, chunks = self.w.releases[a.update.plan.bundle_id]
        return rel, chunks, a.update.written + a.update.pending

    @precondition(lambda self: self._next_chunk() is not None)
    @rule()
    def chunk_arrives(self) -> None:
        _, chunks, i = self._next_chunk()  # type: ignore[misc]
        self._feed(ChunkFetched(i, chunks[i]))

    @precondition(lambda self: self._next_chunk() is not None)
    @rule()
    def corrupt_chunk_arrives(self) -> None:
        _, chunks, i = self._next_chunk()  # type: ignore[misc]
        self._feed(ChunkFetched(i, chunks[i] + b"!"))

    @precondition(lambda self: self._next_chunk() is not None)
    @rule()
    def link_lost(self) -> None:
        self._feed(FetchFailed("transfer.error", "link lost"))

    @rule()
    def power_cut(self) -> None:
        self.agent = None
        self.selftest_running = False
        self.w.volatile = dict(self.w.durable)  # unsynced writes are gone
        self._boot()

    @precondition(lambda self: self.agent is None)
    @rule()
    def reboot(self) -> None:
        self.selftest_running = False
        self._boot()

    @precondition(lambda self: self.agent is not None)
    @rule()
    def cancel(self) -> None:
        self._feed(CancelRequested(counter=0))

    @precondition(lambda self: self.agent is not None)
    @rule()
    def fleet_rollback(self) -> None:
        self._feed(RollbackRequested(counter=0))
        if self.agent is None:
            self._boot()

    @precondition(lambda self: self.agent is not None and self.agent.update is not None)
    @rule(index=st.integers(0, 2))
    def bit_rot_in_the_target_slot(self, index: int) -> None:
        """A chunk already written goes bad on the medium (caught only by the read-back)."""
        assert self.agent is not None
        assert self.agent.update is not None
        target = self.agent.update.plan.target_slot
        for which in (self.w.volatile, self.w.durable):
            c = which[target]
            if isinstance(c, tuple) and c[0] == "partial":
                got = dict(c[2])  # type: ignore[misc]
                if index in got:
                    got[index] = got[index] + b"rot"
                    which[target] = ("partial", None, tuple(sorted(got.items())))

    @precondition(lambda self: self.agent is not None and self.selftest_running)
    @rule()
    def self_test_finishes(self) -> None:
        self.selftest_running = False
        sha = self._content_sha(self.booted, self.w.durable)  # type: ignore[arg-type]
        if sha is not None and self.w.images[sha].behaviour == "fails":
            self._feed(SelfTestFailed("selftest.failed", "model"))
        else:
            self._feed(SelfTestPassed())

    @precondition(lambda self: self.agent is not None and self.selftest_running)
    @rule()
    def agent_crashes_during_self_test(self) -> None:
        """The new image dies (kernel panic, OOM, watchdog) before committing: a reboot."""
        self.selftest_running = False
        self.agent = None
        self._boot()

    @precondition(lambda self: self.agent is not None and self.selftest_running)
    @rule(times=st.integers(2, 12))
    def new_image_panics_on_every_boot(self, times: int) -> None:
        """A crash loop on the new slot: every boot dies during the self-test."""
        for _ in range(times):
            if not self.selftest_running:
                break
            self.agent_crashes_during_self_test()

    @rule(on=st.booleans())
    def disk_io_errors(self, on: bool) -> None:
        self.fail_writes = on

    @rule(on=st.booleans())
    def env_write_errors(self, on: bool) -> None:
        self.fail_env = on

    # -- invariants -------------------------------------------------------------------------

    @invariant()
    def a_bootable_good_slot_always_exists(self) -> None:
        e = self.w.env
        nxt: BootSlot = e["boot_part"]  # type: ignore[assignment]
        assert self._content_sha(nxt, self.w.durable) in self.w.images
        if e["upgrade_available"]:
            fallback = nxt.other
            sha = self._content_sha(fallback, self.w.durable)
            assert sha in self.w.images
            assert self.w.images[sha].behaviour != "never_boots"

    @invariant()
    def journal_primary_holds_a_verified_image(self) -> None:
        j = self.w.journal
        if j is not None:
            assert self._content_sha(j.primary, self.w.durable) in self.w.images
            assert j.slot(j.primary).state is BootState.GOOD

    @invariant()
    def attempt_counter_is_bounded(self) -> None:
        for s in (self.agent, self.w.journal):
            if s is not None and s.update is not None:
                assert 0 <= s.update.attempts <= MAX_ATTEMPTS

    @invariant()
    def security_floor_never_goes_down(self) -> None:
        j = self.w.journal
        if j is not None:
            assert j.security_version >= self.floor
            self.floor = j.security_version


CoreMachine.TestCase.settings = settings(max_examples=300, stateful_step_count=60, deadline=None)
TestCoreMachine = CoreMachine.TestCase
