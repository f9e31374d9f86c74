"""Ports: what the agent's runtime needs from the world, as Protocols.

The pure core (``agent/core``) never sees these; ``agent/runtime.py`` wires the core's commands
to them. Real adapters live in ``agent/adapters``; the simulator implements the same Protocols
with its own fault knobs, so fleet tests run the real runtime.

Disk-side ports are synchronous (a slot write is a local syscall); the network side is async,
because thousands of simulated devices share one event loop.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from agent.core.states import AgentState, BootSlot, Release


class Clock(Protocol):
    """Wall-clock seconds since the epoch (expiry checks, time windows) and a monotonic clock."""

    def now(self) -> float:
        """Wall-clock time, UNIX seconds."""
        ...

    def monotonic(self) -> float:
        """A clock that never goes back, for timeouts and throttling."""
        ...


class SlotStore(Protocol):
    """The two A/B slots. The active (booted) slot is never opened for writing."""

    def size(self, slot: BootSlot) -> int:
        """Capacity of the slot in bytes."""
        ...

    def read(self, slot: BootSlot, offset: int, length: int) -> bytes:
        """Read bytes of a slot (delta bases and digest read-back)."""
        ...

    def write(self, slot: BootSlot, offset: int, data: bytes) -> None:
        """Write at an offset of the inactive slot; durable only after ``sync``."""
        ...

    def sync(self, slot: BootSlot) -> None:
        """Make every write so far durable (fsync / fdatasync)."""
        ...

    def digest(self, slot: BootSlot, length: int) -> str:
        """SHA-256 hex of the first ``length`` bytes, read back from the medium."""
        ...


class BootEnv(Protocol):
    """The bootloader's environment: which slot boots, and the one-shot trial."""

    def read(self) -> Mapping[str, str]:
        """The current variables (U-Boot: boot_part, upgrade_available, bootcount, bootlimit)."""
        ...

    def write(self, changes: Mapping[str, str]) -> None:
        """Apply all changes at once (one env write: both or neither)."""
        ...


class StateStore(Protocol):
    """The agent's journal: one small document, replaced atomically."""

    def load(self) -> bytes | None:
        """The last saved journal, or None on first start."""
        ...

    def save(self, data: bytes) -> None:
        """Replace the journal atomically (temp, fsync, rename, fsync dir)."""
        ...


class Transport(Protocol):
    """The link to the controller (MQTT in production, a modelled link in the simulator)."""

    async def start(self) -> None:
        """Connect (and keep reconnecting in the background)."""
        ...

    async def stop(self) -> None:
        """Disconnect cleanly (the broker publishes our offline will otherwise)."""
        ...

    def commands(self) -> AsyncIterator[bytes]:
        """Raw signed command documents addressed to this device, as they arrive."""
        ...

    async def publish_state(self, state: Mapping[str, Any]) -> None:
        """Publish the retained state document."""
        ...

    async def publish_event(self, event: Mapping[str, Any]) -> None:
        """Publish one event (phase transition, error with its stable code, health metrics)."""
        ...

    def fetch_chunks(self, bundle_id: str, indices: list[int]) -> AsyncIterator[tuple[int, bytes]]:
        """Request chunks and yield ``(index, bytes)`` as they arrive, paced by the throttle.

        Order of arrival is not guaranteed; the caller verifies each chunk against the signed
        table before use. Raises ``TransferError`` when the link is lost for longer than the
        transport's patience; the caller resumes from its first missing chunk.
        """
        ...

    async def reachable(self, timeout: float) -> bool:
        """Whether the controller answers within ``timeout`` seconds (a self-test check)."""
        ...


class ChunkSource(Protocol):
    """Where chunk bytes come from: the transport, a local .slb file, memory."""

    def fetch(self, start: int, count: int) -> AsyncIterator[tuple[int, bytes]]:
        """Yield ``(index, data)`` for ``start..count-1`` (any order; the runtime reorders)."""
        ...


class CommandVerifier(Protocol):
    """Turns a raw signed command into an agent-level request (``agent/verify.py``).

    In-process verifiers return the command; the daemon's (``agent/verify_child.py``) returns
    an awaitable, because it waits for a child process without blocking the loop.
    """

    def verify(
        self, raw: bytes, state: AgentState, now: float
    ) -> VerifiedCommand | Awaitable[VerifiedCommand]:
        """Check signature, device, counter, expiry and the manifest; raise ``BundleError``."""
        ...


@dataclass(frozen=True)
class VerifiedCommand:
    """A command that passed every check."""

    action: str  # install | cancel | rollback | config
    counter: int
    release: Release | None = None
    source: ChunkSource | None = None
