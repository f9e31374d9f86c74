"""Value types shared by the agent core and its ports.

Everything here is a frozen value: the core's ``step`` takes one :class:`AgentState` and returns
a new one, and the runtime persists exactly that value (``agent/journal.py``) before acting on the
commands that came with it.

Rules:
- ``primary`` is the slot the bootloader boots when no trial is pending; it always holds a GOOD
  image (its digest was read back and matched a release-signed target, or it is the factory one).
- An :class:`Update` exists from the moment an install was accepted until it ends in
  ``COMMITTED``, ``REVERTED`` or ``FAILED``; ``attempts`` counts starts that made no progress and
  is bounded by :data:`MAX_ATTEMPTS`, so every crash or boot loop ends.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, replace

# design 1: a crash/boot loop ends after this many starts without progress (mender's
# kMaxStateDataStoreCount plays the same role).
MAX_ATTEMPTS = 3


class BootSlot(enum.Enum):
    """The two A/B slots, by their bootloader names."""

    A = "a"
    B = "b"

    @property
    def other(self) -> BootSlot:
        """The slot that is not this one."""
        return BootSlot.B if self is BootSlot.A else BootSlot.A


class Phase(enum.Enum):
    """Where the agent is in an update (the ``phase`` published in the state document)."""

    IDLE = "idle"
    DOWNLOADING = "downloading"
    WRITING = "writing"
    VERIFYING = "verifying"
    STAGED = "staged"
    TRIAL_BOOT = "trial_boot"
    SELF_TEST = "self_test"
    COMMITTING = "committing"
    REVERTING = "reverting"
    COMMITTED = "committed"
    REVERTED = "reverted"
    FAILED = "failed"

    @property
    def busy(self) -> bool:
        """Whether an update is in flight (a new install is refused with ``agent.busy``)."""
        return self not in _RESTING

    @property
    def before_switch(self) -> bool:
        """Phases where the bootloader still boots ``primary`` whatever happens."""
        return self in {Phase.DOWNLOADING, Phase.WRITING, Phase.VERIFYING}


_RESTING = frozenset({Phase.IDLE, Phase.COMMITTED, Phase.REVERTED, Phase.FAILED})


class BootState(enum.Enum):
    """What the agent knows about a slot's image (RAUC naming)."""

    GOOD = "good"
    BAD = "bad"
    UNKNOWN = "unknown"


class PayloadKind(enum.Enum):
    """How chunks turn into image bytes."""

    FULL = "full"
    DELTA = "delta"


@dataclass(frozen=True)
class ChunkSpec:
    """One entry of the signed chunk table."""

    size: int
    sha256: str
    out_size: int

    def __post_init__(self) -> None:
        if self.size < 0 or self.out_size < 0 or len(self.sha256) != 64:
            raise ValueError(f"invalid chunk spec {self}")


@dataclass(frozen=True)
class Release:
    """What the core needs of a verified release manifest (plus its payload table).

    The runtime builds it from ``firmware_bundles`` objects after every signature check passed;
    the core re-checks the parts that depend on device state (slot size, base digest, floor).
    """

    bundle_id: str
    version: str
    security_version: int
    target_size: int
    target_sha256: str
    kind: PayloadKind
    chunks: tuple[ChunkSpec, ...]
    base_sha256: str | None = None
    base_size: int | None = None
    rollout: str | None = None


@dataclass(frozen=True)
class PlannedChunk:
    """A chunk with its place in the output image."""

    index: int
    offset: int
    size: int
    sha256: str
    out_size: int


@dataclass(frozen=True)
class InstallPlan:
    """Made by ``make_install_plan``: where every chunk goes and what the result must hash to."""

    bundle_id: str
    version: str
    security_version: int
    target_slot: BootSlot
    kind: PayloadKind
    base_slot: BootSlot | None
    target_size: int
    target_sha256: str
    chunks: tuple[PlannedChunk, ...]
    checkpoint_bytes: int
    rollout: str | None = None
    from_version: str | None = None

    def __post_init__(self) -> None:
        if self.base_slot is not None and self.base_slot is self.target_slot:
            raise ValueError("a delta cannot read its base from the slot it writes")
        if sum(c.out_size for c in self.chunks) != self.target_size:
            raise ValueError("chunk outputs do not add up to the target size")


@dataclass(frozen=True)
class SlotInfo:
    """What the agent knows about one slot."""

    state: BootState = BootState.UNKNOWN
    version: str | None = None
    sha256: str | None = None
    size: int | None = None


@dataclass(frozen=True)
class Result:
    """The outcome of the last update or command, as reported in ``status``."""

    outcome: str  # "committed" | "reverted" | "failed" | "rejected" | "rolled_back"
    code: str | None = None
    message: str = ""
    bundle_id: str | None = None
    version: str | None = None


@dataclass(frozen=True)
class Update:
    """An update in flight."""

    plan: InstallPlan
    written: int = 0  # chunks durably in the target slot (synced and journaled)
    pending: int = 0  # chunks written since the last checkpoint (not yet synced)
    attempts: int = 0  # starts without progress; bounded by MAX_ATTEMPTS
    fetch_failures: int = 0
    migrated: bool = False  # migrations may have run (set before running them)
    failure: Result | None = None  # why we are reverting (REVERTING phase)


@dataclass(frozen=True)
class AgentState:
    """The agent's whole persisted state (the journal document)."""

    phase: Phase
    primary: BootSlot
    slot_a: SlotInfo = field(default_factory=SlotInfo)
    slot_b: SlotInfo = field(default_factory=SlotInfo)
    security_version: int = 0
    last_counter: int = 0
    update: Update | None = None
    last_result: Result | None = None
    booted: BootSlot | None = None  # not persisted meaningfully: set by each Boot event

    def slot(self, slot: BootSlot) -> SlotInfo:
        """Info of one slot."""
        return self.slot_a if slot is BootSlot.A else self.slot_b

    def with_slot(self, slot: BootSlot, info: SlotInfo) -> AgentState:
        """A copy with one slot's info replaced."""
        if slot is BootSlot.A:
            return replace(self, slot_a=info)
        return replace(self, slot_b=info)

    @property
    def version(self) -> str | None:
        """Version of the primary slot."""
        return self.slot(self.primary).version

    @staticmethod
    def initial(booted: BootSlot, info: SlotInfo) -> AgentState:
        """First start: the booted slot holds the factory image, the other is unknown."""
        state = AgentState(phase=Phase.IDLE, primary=booted, booted=booted)
        return state.with_slot(booted, info)
