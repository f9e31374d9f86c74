"""Commands: what the core asks the runtime to do, as data.

The runtime executes a command list in order and stops at the first failure (reporting it as an
event). ``PersistJournal`` always comes before the side effects it describes, so a power cut
between the two leaves a journal that says "this may have happened" and reconciliation at the
next start finds out whether it did.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from agent.core.states import AgentState, BootSlot, PayloadKind, PlannedChunk


@dataclass(frozen=True)
class PersistJournal:
    """Save this state atomically before going on."""

    state: AgentState


@dataclass(frozen=True)
class FetchChunks:
    """Start (or resume) fetching chunks ``start..count-1`` of the bundle, in order."""

    bundle_id: str
    start: int
    count: int


@dataclass(frozen=True)
class WriteChunk:
    """Decode a verified chunk and write its output at ``chunk.offset`` of ``slot``."""

    slot: BootSlot
    chunk: PlannedChunk
    data: bytes = field(repr=False)
    kind: PayloadKind
    base: BootSlot | None


@dataclass(frozen=True)
class SyncSlot:
    """Make the slot's writes durable."""

    slot: BootSlot


@dataclass(frozen=True)
class VerifySlot:
    """Read the slot back from the medium and report its digest (``SlotVerified``)."""

    slot: BootSlot
    length: int


@dataclass(frozen=True)
class SetBootOnce:
    """Boot ``slot`` next, as a trial: the bootloader falls back after ``bootlimit`` boots."""

    slot: BootSlot


@dataclass(frozen=True)
class MarkGood:
    """Make ``slot`` the primary slot for good (end the trial)."""

    slot: BootSlot


@dataclass(frozen=True)
class MarkBad:
    """End the trial of ``slot``: the bootloader boots ``slot.other`` from now on."""

    slot: BootSlot


@dataclass(frozen=True)
class MarkActive:
    """Make ``slot`` primary without a trial (fleet rollback to a GOOD slot)."""

    slot: BootSlot


@dataclass(frozen=True)
class Reboot:
    """Reboot the device (the process ends here)."""


@dataclass(frozen=True)
class RunMigrations:
    """Run data-migration hooks from ``from_version`` to ``to_version``."""

    from_version: str | None
    to_version: str


@dataclass(frozen=True)
class UndoMigrations:
    """Undo data-migration hooks (idempotent; best effort, failures are reported)."""

    from_version: str | None
    to_version: str


@dataclass(frozen=True)
class RunSelfTest:
    """Run the configured self-test checks under their overall deadline."""


@dataclass(frozen=True)
class RaiseSecurityVersion:
    """Record the anti-rollback floor outside the journal too (boot env), idempotently."""

    value: int


@dataclass(frozen=True)
class Publish:
    """Publish an event document (phase transition, error with its code) and the state."""

    event: Mapping[str, Any]


Command = (
    PersistJournal
    | FetchChunks
    | WriteChunk
    | SyncSlot
    | VerifySlot
    | SetBootOnce
    | MarkGood
    | MarkBad
    | MarkActive
    | Reboot
    | RunMigrations
    | UndoMigrations
    | RunSelfTest
    | RaiseSecurityVersion
    | Publish
)
