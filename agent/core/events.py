"""Events: what happened, as the runtime tells the core.

Events are values; the core decides what they mean in the current phase. An event that has no
edge in the current phase is programmer misuse (``RuntimeError``), except the ones that come from
the outside world (commands, boots), which always have an edge, if only "refuse and report".
"""

from __future__ import annotations

from dataclasses import dataclass

from agent.core.states import BootSlot, InstallPlan


@dataclass(frozen=True)
class EnvView:
    """What the boot env said at start (the core needs only these facts)."""

    boot_part: BootSlot | None
    upgrade_available: bool
    bootcount: int
    security_version: int = 0


@dataclass(frozen=True)
class Booted:
    """The agent started; ``slot`` is the slot the bootloader booted."""

    slot: BootSlot
    env: EnvView


@dataclass(frozen=True)
class InstallRequested:
    """A verified install (signed command or offline bundle) turned into a plan."""

    plan: InstallPlan
    counter: int = 0


@dataclass(frozen=True)
class Rejected:
    """A command or bundle failed a check; nothing was touched."""

    code: str
    message: str
    bundle_id: str | None = None
    counter: int = 0


@dataclass(frozen=True)
class CancelRequested:
    """Abandon the update in flight (only possible before the switch)."""

    counter: int = 0


@dataclass(frozen=True)
class RollbackRequested:
    """Fleet rollback: boot the other slot again if it holds a GOOD image (no download)."""

    counter: int = 0


@dataclass(frozen=True)
class ChunkFetched:
    """Chunk ``index`` arrived with these bytes (not yet checked)."""

    index: int
    data: bytes


@dataclass(frozen=True)
class FetchFailed:
    """The chunk source failed (link lost, file unreadable): retry later or give up."""

    code: str
    message: str


@dataclass(frozen=True)
class ChunkWritten:
    """The decoded output of chunk ``index`` is in the target slot (not yet synced)."""

    index: int


@dataclass(frozen=True)
class WriteFailed:
    """Writing, syncing or decoding into the target slot failed."""

    code: str
    message: str


@dataclass(frozen=True)
class SlotVerified:
    """The target slot was read back; ``sha256`` is what it hashes to."""

    sha256: str


@dataclass(frozen=True)
class MigrationsDone:
    """Data-migration hooks finished (or there were none)."""


@dataclass(frozen=True)
class MigrationsFailed:
    """A data-migration hook failed."""

    code: str
    message: str


@dataclass(frozen=True)
class SelfTestPassed:
    """Every self-test check passed within the deadline."""


@dataclass(frozen=True)
class SelfTestFailed:
    """A check failed, crashed or hung past the deadline."""

    code: str
    message: str


@dataclass(frozen=True)
class EnvWriteFailed:
    """The boot env could not be written (the bootloader keeps its previous choice)."""

    code: str
    message: str


Event = (
    Booted
    | InstallRequested
    | Rejected
    | CancelRequested
    | RollbackRequested
    | ChunkFetched
    | FetchFailed
    | ChunkWritten
    | WriteFailed
    | SlotVerified
    | MigrationsDone
    | MigrationsFailed
    | SelfTestPassed
    | SelfTestFailed
    | EnvWriteFailed
)
