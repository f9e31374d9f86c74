"""The root end of a real link: a TCP relay to the run's broker, with a one-way delay.

Devices in a network namespace reach the broker through the veth's host address; this relay
listens there and connects each client to the broker (own or ``--broker``, wherever it listens),
so no broker has to be reconfigured. When the kernel has no netem (``ShapedLink.latency_by`` is
``"none"``), the relay holds each byte ``delay`` seconds in each direction: the application
sees the site's round trip, while TCP on the shaped veth still meets the real rate and loss.

Rules:
- One thread with its own event loop; ``start`` returns once listening, ``stop`` closes every
  connection and joins the thread within seconds.
- Back-pressure, not buffering: a direction's delay line holds at most ``LINE`` reads.

    proxy = DelayProxy("10.213.0.1", ("127.0.0.1", 1883), delay=0.04)
    port = proxy.start()
    ...
    proxy.stop()
"""

from __future__ import annotations

import asyncio
import contextlib
import threading

LINE = 64  # reads held in one direction's delay line


class DelayProxy:
    """A TCP relay ``listen_host:port`` -> ``upstream``, each direction late by ``delay`` s."""

    def __init__(self, listen_host: str, upstream: tuple[str, int], delay: float = 0.0) -> None:
        self.listen_host, self.upstream, self.delay = listen_host, upstream, delay
        self.port = 0
        self.connections = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping: asyncio.Event | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    def start(self, timeout: float = 5.0) -> int:
        """Listen on a free port of ``listen_host``; returns the port.

        Raises:
            RuntimeError: not listening within ``timeout`` seconds.
        """
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                loop.run_until_complete(self._serve(ready))
            except BaseException as e:
                failure.append(e)
                ready.set()
            finally:
                loop.close()

        self._thread = threading.Thread(target=run, name="sim-wanproxy", daemon=True)
        self._thread.start()
        if not ready.wait(timeout) or failure:
            self.stop()
            raise RuntimeError(f"relay on {self.listen_host} did not start: {failure[:1]}")
        return self.port

    async def _serve(self, ready: threading.Event) -> None:
        self._stopping = asyncio.Event()
        server = await asyncio.start_server(self._client, self.listen_host, 0)
        self.port = server.sockets[0].getsockname()[1]
        ready.set()
        async with server:
            await self._stopping.wait()
            server.close()
            for w in list(self._writers):
                w.close()
            rest = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in rest:
                t.cancel()
            await asyncio.gather(*rest, return_exceptions=True)

    async def _client(self, down_r: asyncio.StreamReader, down_w: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.add(down_w)
        try:
            up_r, up_w = await asyncio.wait_for(asyncio.open_connection(*self.upstream), 5)
        except (OSError, TimeoutError):
            down_w.close()
            self._writers.discard(down_w)
            return
        self._writers.add(up_w)
        try:
            await asyncio.gather(self._pipe(down_r, up_w), self._pipe(up_r, down_w))
        finally:
            for w in (down_w, up_w):
                w.close()
                self._writers.discard(w)

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        line: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(LINE)

        async def feed() -> None:
            with contextlib.suppress(OSError):
                while data := await src.read(65536):
                    await line.put((loop.time() + self.delay, data))
            await line.put((loop.time() + self.delay, b""))

        feeder = asyncio.ensure_future(feed())
        try:
            while True:
                due, data = await line.get()
                await asyncio.sleep(max(0.0, due - loop.time()))
                if not data:
                    break
                dst.write(data)
                await dst.drain()
        except OSError:
            pass
        finally:
            feeder.cancel()
            # The other direction learns of the close from its own socket.
            with contextlib.suppress(OSError):
                if dst.can_write_eof():
                    dst.write_eof()

    def stop(self) -> None:
        """Close the listener and every connection; join the thread (bounded)."""
        loop, stopping = self._loop, self._stopping
        if loop is not None and stopping is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(stopping.set)
        if self._thread is not None:
            self._thread.join(5)
