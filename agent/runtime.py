"""The agent runtime: the only place where the pure core meets the ports.

Rules:
- One loop: an event goes into ``step``; the commands that come out are executed in order; a
  command's result (``ChunkWritten``, ``SlotVerified``, ``SelfTestPassed``...) is the next event.
  A failing command stops the list; the core then sees the failure event *from the last state
  that was persisted*, because that is what the world looks like.
- ``PersistJournal`` failing means we cannot promise anything: the runtime stops
  (:class:`AgentHalted`) without acting, and the next start reconciles from the old journal.
- Writes go through :class:`_GuardedSlots`: the booted slot and the primary slot are refused
  before the adapter is reached, whatever adapter the caller passed.
- Async: idle means awaiting the transport's command iterator (no polling). ``Reboot`` ends
  :meth:`Agent.run` with ``"reboot"``; the caller (systemd, the simulator) does the rest.
- Health (``agent/health.py``, optional): every published event is shown to the sampler (it
  counts errors); a committed result is sampled fresh and carries ``health``, so the controller's
  gate sees the new version's numbers with the result itself; :meth:`Agent.run` samples every
  ``interval`` seconds (asyncio sleep) and republishes the retained state when the numbers
  changed. The state document carries the last sample as ``health``.

Building one (the simulator passes its own ports)::

    agent = Agent(
        AgentConfig(device_id="dev-1", hardware="board-x", factory_version="1.0",
                    factory_size=img_size),
        slots=slots, bootenv=env, journal=journal, clock=clock, power=power,
        booted=bootloader.boot(), transport=transport, verifier=verifier,
    )
    await agent.start()                       # reconcile journal + boot env, maybe resume/trial
    outcome = await agent.run()               # until stop() or a reboot: "stopped" | "reboot"
    result = await agent.install(release, MemorySource(chunks))   # offline/local install
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import inspect
import logging
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from agent.adapters.bootenv import env_changes, env_view
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
    EnvView,
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
from agent.core.machine import DEFAULT_CHECKPOINT_BYTES, make_install_plan, step
from agent.core.states import (
    AgentState,
    BootSlot,
    BootState,
    PayloadKind,
    Phase,
    Release,
    Result,
    SlotInfo,
)
from agent.decode_ahead import DecodeAhead
from agent.errors import ActiveSlotWrite, AgentError, BootEnvError, JournalError
from agent.journal import decode, encode
from agent.ports import (
    BootEnv,
    ChunkSource,
    Clock,
    CommandVerifier,
    SlotStore,
    StateStore,
    Transport,
)
from firmware_bundles.errors import BundleError, TransferError

if TYPE_CHECKING:
    from agent.health import HealthSampler  # only agents with [health] load it

log = logging.getLogger("slotline.agent")

Decoder = Callable[[bytes, int, Any], Iterator[bytes]]
_T = TypeVar("_T")


class Power(Protocol):
    """Reboot the device (real: ``systemctl reboot``; simulator: restart through the bootloader)."""

    async def reboot(self) -> None:
        """Ask for a reboot; may return before it happens."""
        ...


class SelfTest(Protocol):
    """Runs the configured checks (``agent/selftest.py``)."""

    async def run(self) -> tuple[bool, str | None, str]:
        """``(passed, code, message)``."""
        ...


class Migrations(Protocol):
    """Data-migration hooks (``agent/selftest.py``: ``CommandMigrations``)."""

    async def run(self, from_version: str | None, to_version: str) -> None:
        """Migrate; raise ``AgentError`` on failure."""
        ...

    async def undo(self, from_version: str | None, to_version: str) -> None:
        """Undo (idempotent); raise ``AgentError`` on failure."""
        ...


class AgentHalted(AgentError):
    """The journal cannot be saved: the agent stops without acting."""

    code = "journal.write_failed"


class _Rebooted(BaseException):
    """Unwinds the dispatch loop after a Reboot command (not an error)."""


@dataclass(frozen=True)
class AgentConfig:
    """What the runtime needs to know about its device (the TOML config maps onto this)."""

    device_id: str
    hardware: str = "generic"
    factory_version: str = "0"
    factory_size: int | None = None  # bytes of the factory image in the booted slot, if known
    checkpoint_bytes: int = DEFAULT_CHECKPOINT_BYTES
    fetch_window: int = 4  # chunks requested at a time from the transport
    retry_base: float = 1.0  # seconds before the first fetch retry (doubles, capped)
    retry_cap: float = 60.0
    component: str = "rootfs"  # what releases for this device are called (state ``versions``)
    # Bytes charged to chunks decoded ahead on local-file installs (agent/decode_ahead.py);
    # 0 = off. Off by default: with 4 MiB chunks it adds ~12 MiB to the offline installer's
    # 54 MiB peak on a 1 GiB image, past the 64 MiB target (docs/delta-codec.md).
    decode_ahead: int = 0


class MemorySource:
    """Chunks held in memory (tests, simulator)."""

    retryable = True

    def __init__(self, chunks: Sequence[bytes]) -> None:
        self._chunks = list(chunks)

    async def fetch(self, start: int, count: int) -> AsyncIterator[tuple[int, bytes]]:
        """Yield them in order."""
        for i in range(start, min(count, len(self._chunks))):
            yield i, self._chunks[i]
            await asyncio.sleep(0)


class TransportSource:
    """Chunks from the controller through the Transport, reordered into index order.

    The transport keeps ``window`` requests in flight and paces them (its throttle), so the
    reorder buffer holds at most about that many chunks; more means a misbehaving link.
    """

    retryable = True

    def __init__(self, transport: Transport, bundle_id: str, *, window: int = 4) -> None:
        self._t = transport
        self._bundle = bundle_id
        self._limit = max(16, 4 * window)

    async def fetch(self, start: int, count: int) -> AsyncIterator[tuple[int, bytes]]:
        """Ask for ``start..count-1`` at once; yield in index order as they arrive."""
        index = start
        got: dict[int, bytes] = {}
        async for i, data in self._t.fetch_chunks(self._bundle, list(range(start, count))):
            if index <= i < count:
                got[i] = data
            if len(got) > self._limit:
                raise TransferError(f"chunk {index} of {self._bundle} is overtaken by {len(got)}")
            while index in got:
                yield index, got.pop(index)
                index += 1
        if index < count:
            raise TransferError(f"chunk {index} of {self._bundle} did not arrive")


class _SlotBase:
    """A slot as a delta ``BaseReader``."""

    def __init__(self, slots: SlotStore, slot: BootSlot, size: int) -> None:
        self._slots = slots
        self._slot = slot
        self.size = size

    def pread(self, offset: int, length: int) -> bytes:
        end = min(self.size, offset + length)
        if offset >= end:
            return b""
        return self._slots.read(self._slot, offset, end - offset)


class _GuardedSlots:
    """Refuses writes to the booted and the primary slot before any adapter sees them."""

    def __init__(self, inner: SlotStore, agent: Agent) -> None:
        self._inner = inner
        self._agent = agent

    def _check(self, slot: BootSlot) -> None:
        st = self._agent.state
        if slot is self._agent.booted or slot is st.primary:
            raise ActiveSlotWrite(f"refusing to write slot {slot.value} (booted or primary)")

    def write(self, slot: BootSlot, offset: int, data: bytes) -> None:
        self._check(slot)
        self._inner.write(slot, offset, data)

    def sync(self, slot: BootSlot) -> None:
        self._check(slot)
        self._inner.sync(slot)


def _default_decoder() -> Decoder:
    from firmware_bundles.delta import decode_chunk  # noqa: PLC0415 - heavy import, first use

    return decode_chunk


class Agent:
    """One device's agent. See the module docstring for how to build and drive it."""

    def __init__(
        self,
        config: AgentConfig,
        *,
        slots: SlotStore,
        bootenv: BootEnv,
        journal: StateStore,
        clock: Clock,
        power: Power,
        booted: BootSlot,
        transport: Transport | None = None,
        verifier: CommandVerifier | None = None,
        selftest: SelfTest | None = None,
        migrations: Migrations | None = None,
        decoder: Decoder | None = None,
        sources: Callable[[str], ChunkSource | None] | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        health: HealthSampler | None = None,
    ) -> None:
        self.config = config
        self.slots = slots
        self._guard = _GuardedSlots(slots, self)
        self.bootenv = bootenv
        self.journal = journal
        self.clock = clock
        self.power = power
        self.booted = booted
        self.transport = transport
        self.verifier = verifier
        self.selftest = selftest
        self.migrations = migrations
        self._decoder = decoder
        self._sources = sources
        self._sleep = sleep
        self.health = health
        self._health_published: Mapping[str, Any] | None = None
        self.state = AgentState.initial(booted, SlotInfo())
        self._persisted = self.state
        self._source: ChunkSource | None = None
        self._fetch: FetchChunks | None = None
        self._lock = asyncio.Lock()
        self._stop = asyncio.Event()
        self._reboot_requested = False
        self._download_task: asyncio.Task[None] | None = None
        self.events: deque[Mapping[str, Any]] = deque(maxlen=200)
        self._disk: ThreadPoolExecutor | None = None
        self._ahead = DecodeAhead(budget=config.decode_ahead)
        self._failure: BaseException | None = None
        self.started = False

    # -- public API -----------------------------------------------------------------------

    @property
    def rebooting(self) -> bool:
        """A Reboot command ran: the caller should restart the device."""
        return self._reboot_requested

    async def start(self) -> None:
        """Load the journal, reconcile it with the boot env, carry on (resume/trial/revert)."""
        env = self._env_view()
        try:
            raw = self.journal.load()
            loaded = None if raw is None else dataclasses.replace(decode(raw), booted=self.booted)
            failure = None
        except JournalError as e:
            # A journal we cannot read: start over from what the bootloader says, report.
            log.warning("journal unreadable (%s): starting from the boot env", e.code)
            loaded, failure = None, Result("failed", e.code, str(e))
        if loaded is None:
            loaded = await self._io(self._fresh_state, env)
            if failure is not None:
                loaded = dataclasses.replace(loaded, last_result=failure)
        self.state = self._persisted = loaded
        self.started = True
        await self._feed(Booted(self.booted, env))
        self._maybe_download()

    async def run(self) -> str:
        """Serve commands until :meth:`stop` or a reboot. Returns ``"stopped"`` or ``"reboot"``.

        The transport starts first: a pending trial's self-test may need the controller, and
        the events of reconciliation should reach it.
        """
        tasks: list[asyncio.Task[Any]] = []
        try:
            if self.transport is not None:
                await self.transport.start()
            if not self.started:
                await self.start()
            if self._reboot_requested:
                return "reboot"
            tasks.append(asyncio.create_task(self._stop.wait()))
            if self.transport is not None:
                if self.health is not None and self.health.last is None:
                    await self._sample_health()  # the first state already carries health
                await self._publish_state()
                tasks.append(asyncio.create_task(self._serve_commands()))
                if self.health is not None:
                    tasks.append(asyncio.create_task(self._health_loop()))
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                if not t.cancelled() and t.exception() is not None:
                    raise t.exception()  # type: ignore[misc]
            if self._failure is not None:
                raise self._failure
        finally:
            for t in tasks:
                t.cancel()
            await self._cancel_download()
            if self.transport is not None:
                with contextlib.suppress(Exception):
                    await self.transport.stop()
            self.close()
        return "reboot" if self._reboot_requested else "stopped"

    def stop(self) -> None:
        """Ask :meth:`run` to return."""
        self._stop.set()

    def close(self) -> None:
        """Release the disk thread (``run`` does this; call it after ``start``/``install``)."""
        self._ahead.clear()
        if self._disk is not None:
            self._disk.shutdown(wait=False)
            self._disk = None

    async def install(
        self, release: Release, source: ChunkSource, *, counter: int = 0
    ) -> AgentState:
        """Install a verified release from ``source`` and drive it to the reboot (or failure).

        Returns the state afterwards: ``STAGED`` with :attr:`rebooting` set when the new slot is
        ready for its trial boot, a resting phase with ``last_result`` otherwise.
        """
        u = self.state.update
        if (
            u is not None
            and self.state.phase is Phase.DOWNLOADING
            and u.plan.bundle_id == release.bundle_id
            and u.plan.target_sha256 == release.target_sha256
        ):
            # The same bundle again after an interrupted install: resume from the journal.
            self._source = source
            self._fetch = FetchChunks(release.bundle_id, u.written, len(u.plan.chunks))
            self._maybe_download()
        else:
            await self._request_install(release, source, counter)
        await self.wait_download()
        return self.state

    async def handle_command(self, raw: bytes) -> None:
        """Verify and act on one raw signed command (what the transport delivers)."""
        if self.verifier is None:
            raise RuntimeError("no verifier configured: cannot accept signed commands")
        try:
            checked = self.verifier.verify(raw, self.state, self.clock.now())
            cmd = await checked if inspect.isawaitable(checked) else checked
        except (BundleError, AgentError) as e:
            await self._feed(Rejected(e.code, str(e)))
            return
        if cmd.action == "install" and cmd.release is not None:
            source = cmd.source or (self._sources(cmd.release.bundle_id) if self._sources else None)
            if source is None and self.transport is None:
                await self._feed(
                    Rejected("transfer.error", "no chunk source", cmd.release.bundle_id)
                )
                return
            source = source or self._transport_source(cmd.release.bundle_id)
            await self._request_install(cmd.release, source, cmd.counter)
        elif cmd.action == "cancel":
            await self._feed(CancelRequested(cmd.counter))
        elif cmd.action == "rollback":
            await self._feed(RollbackRequested(cmd.counter))
        else:
            await self._feed(Rejected("command.rejected", f"unsupported action {cmd.action}"))

    async def wait_download(self) -> None:
        """Wait until the current download (if any) ended."""
        task = self._download_task
        if task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await task
            if not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]

    def status(self) -> dict[str, Any]:
        """The state document (published retained; printed by ``slotline agent status``)."""
        return state_document(
            self.state,
            self.config.device_id,
            self.booted,
            component=self.config.component,
            health=None if self.health is None else self.health.last,
        )

    # -- internals ------------------------------------------------------------------------

    async def _io(self, fn: Callable[..., _T], *args: Any) -> _T:
        """Run blocking disk work on the agent's one disk thread (in order, one malloc arena)."""
        if self._disk is None:
            self._disk = ThreadPoolExecutor(max_workers=1, thread_name_prefix="slotline-disk")
        return await asyncio.get_running_loop().run_in_executor(self._disk, fn, *args)

    def _fresh_state(self, env: EnvView) -> AgentState:
        """No usable journal: the booted slot holds the factory image, unless it is on trial.

        A pending trial of the booted slot that no journal accounts for is never adopted: the
        slot the trial was started from becomes primary, and reconciliation goes back to it.
        """
        if env.upgrade_available and env.boot_part is self.booted:
            return AgentState.initial(self.booted.other, SlotInfo(BootState.GOOD))
        size = self.config.factory_size
        sha = self.slots.digest(self.booted, size) if size else None
        info = SlotInfo(BootState.GOOD, self.config.factory_version, sha, size)
        return AgentState.initial(self.booted, info)

    def _env_view(self) -> EnvView:
        try:
            return env_view(self.bootenv.read())
        except BootEnvError as e:
            log.warning("boot env unreadable (%s)", e.code)
            return EnvView(boot_part=None, upgrade_available=False, bootcount=0)

    def _transport_source(self, bundle_id: str) -> ChunkSource:
        if self.transport is None:
            raise RuntimeError("no transport and no chunk source")
        return TransportSource(self.transport, bundle_id, window=self.config.fetch_window)

    async def _request_install(self, release: Release, source: ChunkSource, counter: int) -> None:
        try:
            capacity = self.slots.size(self.state.primary.other)
            plan = make_install_plan(
                release,
                self.state,
                target_capacity=capacity,
                checkpoint_bytes=self.config.checkpoint_bytes,
            )
        except (BundleError, AgentError) as e:
            await self._feed(Rejected(e.code, str(e), release.bundle_id))
            return
        self._source = source
        await self._feed(InstallRequested(plan, counter))
        self._maybe_download()

    async def _serve_commands(self) -> None:
        assert self.transport is not None
        async for raw in self.transport.commands():
            await self.handle_command(raw)
            if self._reboot_requested:
                self._stop.set()
                return

    def _maybe_download(self) -> None:
        if (
            self._fetch is not None
            and self.state.phase is Phase.DOWNLOADING
            and (self._download_task is None or self._download_task.done())
        ):
            self._download_task = asyncio.create_task(self._download_guarded())

    async def _cancel_download(self) -> None:
        task = self._download_task
        if task is None:
            return
        if not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        elif not task.cancelled():
            task.exception()  # retrieved here; run() re-raises it as self._failure

    async def _download_guarded(self) -> None:
        try:
            await self._download()
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # AgentHalted, or PowerCut in the simulator: end run()
            self._failure = e
            self._stop.set()
            raise

    async def _download(self) -> None:
        delay = self.config.retry_base
        while self.state.phase is Phase.DOWNLOADING and self._fetch is not None:
            fetch = self._fetch
            self._fetch = None
            if self._source is None:
                self._source = self._sources(fetch.bundle_id) if self._sources else None
            if self._source is None:
                if self.transport is None:
                    # Resumed after a restart with nothing that can deliver the chunks (an
                    # offline install whose file is gone): end it cleanly, ready for the next.
                    await self._feed(WriteFailed("transfer.error", "no chunk source to resume"))
                    return
                self._source = self._transport_source(fetch.bundle_id)
            failed: Event | None = None
            chunks = aiter(self._source.fetch(fetch.start, fetch.count))
            # A local file (offline install): chunk k+1 is read and decoded ahead while chunk k
            # is written (agent/decode_ahead.py). The network path keeps one chunk at a time.
            local = (self.config.decode_ahead > 0 and self._decoder is None
                     and not getattr(self._source, "retryable", True))
            base = await self._io(self._ahead_base) if local else None
            pull: asyncio.Future[tuple[int, bytes]] | None = None
            try:
                while True:
                    try:
                        index, data = await (pull or anext(chunks))
                    except StopAsyncIteration:
                        break
                    except BundleError as e:
                        failed = FetchFailed(e.code, str(e))
                        break
                    except Exception as e:  # any source failure is a transfer failure, by design
                        failed = FetchFailed("transfer.error", f"{type(e).__name__}: {e}")
                        break
                    if local:
                        pull = asyncio.ensure_future(self._pull_ahead(chunks, base))
                    await self._feed(ChunkFetched(index, data))
                    if self._fetch is not None or self.state.phase is not Phase.DOWNLOADING:
                        break  # restarted (bad chunk) or finished/failed
            finally:
                if pull is not None:  # a local read: let it end rather than cut it mid-read
                    with contextlib.suppress(BaseException):
                        await pull
                if local:
                    await asyncio.to_thread(self._ahead.clear)
            with contextlib.suppress(Exception):
                await chunks.aclose()  # type: ignore[attr-defined]
            if self._reboot_requested:
                return
            if (
                isinstance(failed, FetchFailed)
                and not getattr(self._source, "retryable", True)
                and self.state.phase is Phase.DOWNLOADING
            ):
                # A local file gives the same bytes again: no point retrying.
                await self._feed(WriteFailed(failed.code, failed.message))
                return
            if failed is not None and self.state.phase is Phase.DOWNLOADING:
                await self._sleep(delay)
                delay = min(self.config.retry_cap, delay * 2)
                await self._feed(failed)
            elif self._fetch is None and self.state.phase is Phase.DOWNLOADING:
                await self._feed(FetchFailed("bundle.truncated", "the source ended early"))

    def _ahead_base(self) -> _SlotBase | None:
        """The base reader for decoding ahead; on the disk thread, so the slot opens here once."""
        u = self.state.update
        if u is None or u.plan.kind is not PayloadKind.DELTA or u.plan.base_slot is None:
            return None
        slot = u.plan.base_slot
        base = _SlotBase(self.slots, slot, self.state.slot(slot).size or self.slots.size(slot))
        self.slots.read(slot, 0, 0)  # opens the handle before another thread reads it
        return base

    async def _pull_ahead(self, chunks: AsyncIterator[tuple[int, bytes]],
                          base: _SlotBase | None) -> tuple[int, bytes]:
        """The next chunk from the source, offered for decoding ahead if its digest matches."""
        index, data = await anext(chunks)
        u = self.state.update
        if u is not None and 0 <= index < len(u.plan.chunks):
            entry = u.plan.chunks[index]
            kind_ok = u.plan.kind is not PayloadKind.DELTA or base is not None

            def offer() -> None:
                # design: only bytes the core will accept are decoded (same digest check)
                if kind_ok and hashlib.sha256(data).hexdigest() == entry.sha256:
                    self._ahead.offer(index, data, entry.out_size, base)

            await asyncio.to_thread(offer)
        return index, data

    async def _feed(self, event: Event) -> None:
        if self._reboot_requested:
            return
        async with self._lock:
            if (
                isinstance(event, ChunkFetched | FetchFailed)
                and self.state.phase is not Phase.DOWNLOADING
            ):
                return  # a late chunk from a fetch that a cancel or failure already ended
            queue: deque[Event] = deque([event])
            try:
                while queue:
                    ev = queue.popleft()
                    self.state, commands = step(self.state, ev)
                    for cmd in commands:
                        follow = await self._execute(cmd)
                        if isinstance(follow, _Failure):
                            self.state = self._persisted
                            queue.clear()
                            queue.append(follow.event)
                            break
                        if follow is not None:
                            queue.append(follow)
            except _Rebooted:
                self._reboot_requested = True
                self._stop.set()

    async def _execute(self, cmd: Command) -> Event | _Failure | None:
        if isinstance(cmd, PersistJournal):
            try:
                self.journal.save(encode(cmd.state))
            except JournalError as e:
                self.state = self._persisted
                raise AgentHalted(str(e)) from e
            self._persisted = cmd.state
            return None
        if isinstance(cmd, FetchChunks):
            self._fetch = cmd
            return None
        if isinstance(cmd, WriteChunk):
            return await self._io(self._write_chunk, cmd)
        if isinstance(cmd, SyncSlot):
            try:
                await self._io(self._guard.sync, cmd.slot)
            except AgentError as e:
                return _Failure(WriteFailed(e.code, str(e)))
            return None
        if isinstance(cmd, VerifySlot):
            try:
                digest = await self._io(self.slots.digest, cmd.slot, cmd.length)
            except AgentError as e:
                return _Failure(WriteFailed(e.code, str(e)))
            return SlotVerified(digest)
        if isinstance(cmd, SetBootOnce | MarkGood | MarkBad | MarkActive):
            try:
                self.bootenv.write(env_changes(cmd))
            except BootEnvError as e:
                return _Failure(EnvWriteFailed(e.code, str(e)))
            return None
        if isinstance(cmd, RaiseSecurityVersion):
            return self._raise_security_version(cmd.value)
        if isinstance(cmd, Reboot):
            await self._publish_state()
            with contextlib.suppress(Exception):
                await self.power.reboot()
            raise _Rebooted
        if isinstance(cmd, RunMigrations):
            try:
                if self.migrations is not None:
                    await self.migrations.run(cmd.from_version, cmd.to_version)
            except AgentError as e:
                return _Failure(MigrationsFailed(e.code, str(e)))
            return MigrationsDone()
        if isinstance(cmd, UndoMigrations):
            try:
                if self.migrations is not None:
                    await self.migrations.undo(cmd.from_version, cmd.to_version)
            except AgentError as e:
                return _Failure(MigrationsFailed(e.code, str(e)))
            return None
        if isinstance(cmd, RunSelfTest):
            if self.selftest is None:
                return SelfTestPassed()
            passed, code, message = await self.selftest.run()
            if passed:
                return SelfTestPassed()
            return _Failure(SelfTestFailed(code or "selftest.failed", message))
        if isinstance(cmd, Publish):
            await self._publish(cmd.event)
            return None
        raise RuntimeError(f"unknown command {cmd!r}")

    def _write_chunk(self, cmd: WriteChunk) -> Event | _Failure:
        decoder = self._decoder or _default_decoder()
        base = None
        if cmd.kind is PayloadKind.DELTA and cmd.base is not None:
            info = self.state.slot(cmd.base)
            base = _SlotBase(self.slots, cmd.base, info.size or self.slots.size(cmd.base))
        offset = cmd.chunk.offset
        end = offset + cmd.chunk.out_size
        try:
            ahead = self._ahead.take(cmd.chunk.index, cmd.data) if self._decoder is None else None
            pieces = [ahead] if ahead is not None else decoder(cmd.data, cmd.chunk.out_size, base)
            for piece in pieces:
                if offset + len(piece) > end:
                    return _Failure(WriteFailed("bundle.size_exceeded", "chunk decodes too long"))
                self._guard.write(cmd.slot, offset, piece)
                offset += len(piece)
        except (BundleError, AgentError) as e:
            return _Failure(WriteFailed(e.code, str(e)))
        if offset != end:
            return _Failure(WriteFailed("bundle.truncated", "chunk decodes too short"))
        return ChunkWritten(cmd.chunk.index)

    def _raise_security_version(self, value: int) -> Event | _Failure | None:
        try:
            current = env_view(self.bootenv.read()).security_version
            if current < value:
                self.bootenv.write({"security_version": str(value)})
        except BootEnvError as e:
            return _Failure(EnvWriteFailed(e.code, str(e)))
        return None

    async def _sample_health(self) -> Mapping[str, Any] | None:
        """One sample (never raises: health must never break an update or the agent)."""
        assert self.health is not None
        try:
            values = await self.health.sample()
        except Exception as e:
            log.warning("health sample failed: %s", e)
            return None
        self._health_published = values
        return values

    async def _health_loop(self) -> None:
        """Every ``interval`` s: sample, republish the retained state if the numbers changed.

        The first sample was taken before the first state publish (or at commit). Ends only
        when cancelled (an interval of 0 returns at once and then waits with the rest).
        """
        assert self.health is not None

        async def publish(values: Mapping[str, Any]) -> None:
            if values != self._health_published:
                self._health_published = dict(values)
                await self._publish_state()

        # asyncio.sleep, not the injected retry sleep: a test's instant sleep would spin here
        await self.health.run(publish, sample_first=False)
        await self._stop.wait()

    async def _publish(self, event: Mapping[str, Any]) -> None:
        doc = {**event, "device": self.config.device_id, "at": int(self.clock.now())}
        if self.health is not None:
            self.health.note_event(doc)
            if doc.get("type") == "result" and doc.get("outcome") == "committed":
                # design: the gate compares health after the update; sample the new version
                # now, so the result and its health reach the controller together.
                values = await self._sample_health()
                if values is not None:
                    doc["health"] = dict(values)
        self.events.append(doc)
        if self.transport is None:
            return
        try:
            await self.transport.publish_event(doc)
            await self._publish_state()
        except Exception as e:  # publishing must never break an update
            log.warning("publish failed: %s", e)

    async def _publish_state(self) -> None:
        if self.transport is None:
            return
        try:
            await self.transport.publish_state(self.status())
        except Exception as e:
            log.warning("publish state failed: %s", e)


@dataclass(frozen=True)
class _Failure:
    event: Event


def state_document(
    state: AgentState,
    device_id: str,
    booted: BootSlot | None,
    *,
    component: str = "rootfs",
    health: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The retained state document / ``status --json`` output.

    What the controller reads from it (controller/reports.py): ``slots`` + ``primary`` with a
    ``sha256`` (the active image), ``versions`` ({component: version of the primary slot}, left
    out while that version is unknown), ``phase``, ``last_result`` (settles a rollout row whose
    result event was lost) and, with a health sampler, ``health`` ({metric: number}, lower is
    better).
    """

    def slot(s: BootSlot) -> dict[str, Any]:
        info = state.slot(s)
        return {
            "state": info.state.value,
            "version": info.version,
            "sha256": info.sha256,
            "size": info.size,
            "primary": s is state.primary,
            "booted": s is booted,
        }

    u = state.update
    r = state.last_result
    doc: dict[str, Any] = {
        "device": device_id,
        "phase": state.phase.value,
        "version": state.version,
        "primary": state.primary.value,
        "booted": booted.value if booted else None,
        "security_version": state.security_version,
        "slots": {"a": slot(BootSlot.A), "b": slot(BootSlot.B)},
        "update": None
        if u is None
        else {
            "bundle_id": u.plan.bundle_id,
            "version": u.plan.version,
            "target_slot": u.plan.target_slot.value,
            "chunks_done": u.written + u.pending,
            "chunks_total": len(u.plan.chunks),
            "attempts": u.attempts,
            "rollout": u.plan.rollout,
        },
        "last_result": None if r is None else dataclasses.asdict(r),
    }
    if state.version is not None:  # unknown (lost journal): say nothing, the controller keeps it
        doc["versions"] = {component: state.version}
    if health is not None:
        doc["health"] = dict(health)
    return doc
