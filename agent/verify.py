"""From signed bytes to what the core accepts: commands, releases, offline .slb bundles.

Rules:
- All signature, device, counter, expiry, hardware and anti-rollback checks are
  ``firmware_bundles``' (``verify_command``, ``verify_install``, ``open_bundle``); this module only
  feeds them the device's facts (``last_counter``, committed ``security_version``) from the
  agent state and converts the verified objects into the core's :class:`Release`.
- The release-signed target digest is the only digest that ever makes a slot bootable: a
  controller-signed payload doc changes the chunk table, never ``target_sha256``.

    verifier = make_verifier(trust_root_bytes, device_id="dev-1", hardware="board-x")
    cmd = verifier.verify(raw, agent.state, now)        # raises BundleError subclasses
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

from agent.core.states import AgentState, ChunkSpec, PayloadKind, Release
from agent.ports import VerifiedCommand
from firmware_bundles.bundle import OpenBundle, VerifiedRelease, open_bundle, verify_install
from firmware_bundles.commands import Action, verify_command
from firmware_bundles.trust import TrustStore


def release_of(v: VerifiedRelease, *, rollout: str | None = None) -> Release:
    """The core's view of a verified release (target from the release-signed manifest)."""
    payload = v.payload
    base = payload.base
    return Release(
        bundle_id=v.manifest.bundle_id,
        version=v.manifest.version,
        security_version=v.manifest.security_version,
        target_size=v.target.size,
        target_sha256=v.target.sha256,
        kind=PayloadKind(payload.kind.value),
        chunks=tuple(ChunkSpec(c.size, c.sha256, c.out_size) for c in payload.chunks),
        base_sha256=base.sha256 if base is not None else None,
        base_size=base.size if base is not None else None,
        rollout=rollout,
    )


class BundleVerifier:
    """The agent's ``CommandVerifier``: signed command bytes -> :class:`VerifiedCommand`."""

    def __init__(self, trust: TrustStore, *, device_id: str, hardware: str) -> None:
        self.trust = trust
        self.device_id = device_id
        self.hardware = hardware

    def verify(self, raw: bytes, state: AgentState, now: float) -> VerifiedCommand:
        """Check everything; raise a ``BundleError`` subclass with a stable code otherwise."""
        return self.verify_facts(
            raw, last_counter=state.last_counter, security_version=state.security_version, now=now
        )

    def verify_facts(
        self, raw: bytes, *, last_counter: int, security_version: int, now: float
    ) -> VerifiedCommand:
        """:meth:`verify` given only the two facts of the state it reads (the child's entry)."""
        cmd = verify_command(
            raw, self.trust, device_id=self.device_id, last_counter=last_counter, now=int(now)
        )
        if cmd.action is Action.INSTALL:
            verified = verify_install(
                cmd,
                self.trust,
                now=int(now),
                hardware=self.hardware,
                min_security_version=security_version,
            )
            rollout = cmd.args.get("rollout")
            release = release_of(verified, rollout=None if rollout is None else str(rollout))
            return VerifiedCommand("install", cmd.counter, release)
        return VerifiedCommand(cmd.action.value, cmd.counter)


def make_verifier(trust_root: bytes, *, device_id: str, hardware: str) -> BundleVerifier:
    """A verifier from the trust root's bytes (``trust.json``)."""
    return BundleVerifier(
        TrustStore.from_root_bytes(trust_root), device_id=device_id, hardware=hardware
    )


class SlbSource:
    """Chunks of an opened (header-verified) ``.slb``, read in a worker thread one at a time.

    The file is a stream: resuming at chunk k reads (and checks) the chunks before it again.
    A local file gives the same bytes on a retry, so its failures end the update at once.
    """

    retryable = False

    def __init__(
        self,
        path: Path,
        bundle: OpenBundle | None = None,
        *,
        trust: TrustStore | None = None,
        now: int = 0,
        hardware: str | None = None,
    ) -> None:
        self.path = Path(path)
        self._bundle = bundle
        self._trust = trust
        self._now = now
        self._hardware = hardware

    def _open(self) -> OpenBundle:
        if self._bundle is not None:
            b, self._bundle = self._bundle, None
            return b
        if self._trust is None:
            raise RuntimeError("SlbSource needs a trust store to reopen the bundle")
        return open_bundle(self.path, self._trust, now=self._now, hardware=self._hardware)

    async def fetch(self, start: int, count: int) -> AsyncIterator[tuple[int, bytes]]:
        """Yield ``(index, bytes)`` from ``start``."""
        import asyncio  # noqa: PLC0415 - keeps asyncio out of the command-verifier child

        bundle = await asyncio.to_thread(self._open)
        try:
            it = bundle.chunks()
            sentinel = object()
            for index in range(count):
                data = await asyncio.to_thread(next, it, sentinel)
                if data is sentinel:
                    return
                if index >= start:
                    assert isinstance(data, bytes)
                    yield index, data
        finally:
            bundle.close()
