"""Self-test after a trial boot, and data-migration hooks.

Rules:
- Checks come from the config: ``command`` (argv, timeout, expected exit code), ``tcp``
  (host:port connects), ``http`` (GET returns the expected status), ``systemd`` (unit is
  active), ``file`` (path exists), and ``controller`` (``Transport.reachable`` within N s).
- Each check has its own timeout and the whole run has an overall ``deadline``; a check that
  hangs is killed at its timeout and counts as a failure (``selftest.timeout``); a check that
  cannot run at all (missing binary, crash) is ``selftest.crashed``; a wrong result is
  ``selftest.failed``. The first failure ends the run.
- Migration hooks are commands run after the switch with ``SLOTLINE_FROM``/``SLOTLINE_TO`` in the
  environment; the undo hook gets the same and must be idempotent (it may run twice when a
  revert is interrupted).

    runner = SelfTestRunner([Check("file", path="/etc/ok")], deadline=60)
    passed, code, message = await runner.run()
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.errors import ConfigInvalid, MigrationError
from agent.ports import Transport

KINDS = ("command", "tcp", "http", "systemd", "file", "controller")


@dataclass(frozen=True)
class Check:
    """One configured check."""

    kind: str
    name: str = ""
    argv: tuple[str, ...] = ()
    expect_exit: int = 0
    host: str = ""
    port: int = 0
    url: str = ""
    expect_status: int = 200
    unit: str = ""
    path: str = ""
    timeout: float = 10.0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigInvalid(f"unknown self-test kind {self.kind!r}")
        needs = {
            "command": bool(self.argv),
            "tcp": bool(self.host) and 0 < self.port < 65536,
            "http": self.url.startswith(("http://", "https://")),
            "systemd": bool(self.unit),
            "file": bool(self.path),
            "controller": True,
        }
        if not needs[self.kind]:
            raise ConfigInvalid(f"self-test {self.kind} check is missing its target")
        if self.timeout <= 0:
            raise ConfigInvalid("self-test timeout must be positive")

    @property
    def label(self) -> str:
        """Name for reports."""
        return (
            self.name
            or f"{self.kind}:{self.argv or self.host or self.url or self.unit or self.path}"
        )

    @staticmethod
    def from_mapping(d: Mapping[str, Any]) -> Check:
        """From a TOML table."""
        known = {
            "kind",
            "name",
            "argv",
            "expect_exit",
            "host",
            "port",
            "url",
            "expect_status",
            "unit",
            "path",
            "timeout",
        }
        extra = set(d) - known
        if extra:
            raise ConfigInvalid(f"unknown self-test keys {sorted(extra)}")
        args = dict(d)
        if "argv" in args:
            argv = args["argv"]
            if not isinstance(argv, list) or not all(isinstance(a, str) for a in argv):
                raise ConfigInvalid("self-test argv must be a list of strings")
            args["argv"] = tuple(argv)
        try:
            return Check(**args)
        except TypeError as e:
            raise ConfigInvalid(f"self-test check: {e}") from e


class _Fail(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


async def _run_argv(
    argv: Sequence[str], timeout: float, env: Mapping[str, str] | None = None
) -> int:
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
            start_new_session=True,  # so a hang kills the whole process group
        )
    except OSError as e:
        raise _Fail("selftest.crashed", f"{argv[0]}: {e.strerror or e}") from e
    try:
        return await asyncio.wait_for(proc.wait(), timeout)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()
        raise _Fail("selftest.timeout", f"{argv[0]} did not finish within {timeout:g} s") from None
    finally:
        await _reap(proc)


async def _reap(proc: asyncio.subprocess.Process) -> None:
    # Still running here means cancelled (the overall deadline) or timed out: kill the whole
    # process group and reap it before going on, so no probe outlives its check.
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(BaseException):
            await asyncio.shield(proc.wait())


async def capture(argv: Sequence[str], timeout: float, limit: int = 4096) -> tuple[int, bytes]:
    """Run ``argv`` (no shell) and return ``(exit code, first `limit` bytes of stdout)``.

    Used by health metrics (``agent/health.py``). Killed with its process group at ``timeout``.

    Raises:
        RuntimeError: it could not start, or did not finish within ``timeout``.
    """
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
            start_new_session=True,
        )
    except OSError as e:
        raise RuntimeError(f"{argv[0]}: {e.strerror or e}") from e
    stdout = proc.stdout
    assert stdout is not None

    async def collect() -> tuple[int, bytes]:
        out = await stdout.read(limit)
        while await stdout.read(65536):  # drain the rest, so a chatty probe never blocks
            pass
        return await proc.wait(), out

    try:
        rc, out = await asyncio.wait_for(collect(), timeout)
    except TimeoutError:
        raise RuntimeError(f"{argv[0]} did not finish within {timeout:g} s") from None
    finally:
        await _reap(proc)
    return rc, out


async def probe(check: Check, transport: Transport | None = None) -> str | None:
    """Run one check now (health metrics re-run selected checks): its failure code, or None."""
    passed, code, _ = await SelfTestRunner(
        [check], deadline=check.timeout + 1, transport=transport
    ).run()
    return None if passed else code or "selftest.failed"


async def _http_status(url: str, timeout: float) -> int:
    import httpx  # noqa: PLC0415 - only devices with HTTP checks pay for it

    try:
        async with httpx.AsyncClient(timeout=timeout) as client:
            return (await client.get(url)).status_code
    except httpx.HTTPError as e:
        raise _Fail("selftest.failed", f"GET {url}: {e}") from e


class SelfTestRunner:
    """Runs the checks in order under an overall deadline."""

    def __init__(
        self,
        checks: Sequence[Check],
        *,
        deadline: float = 120.0,
        transport: Transport | None = None,
    ) -> None:
        self.checks = list(checks)
        self.deadline = deadline
        self.transport = transport

    async def run(self) -> tuple[bool, str | None, str]:
        """``(passed, code, message)``; never raises for a failing check."""
        try:
            await asyncio.wait_for(self._all(), self.deadline)
        except _Fail as f:
            return False, f.code, str(f)
        except TimeoutError:
            return False, "selftest.timeout", f"self-test exceeded its {self.deadline:g} s deadline"
        return True, None, f"{len(self.checks)} checks passed"

    async def _all(self) -> None:
        for check in self.checks:
            await self._one(check)

    async def _one(self, c: Check) -> None:
        if c.kind == "command":
            rc = await _run_argv(c.argv, c.timeout)
            if rc != c.expect_exit:
                raise _Fail("selftest.failed", f"{c.label} exited {rc}, expected {c.expect_exit}")
        elif c.kind == "tcp":
            try:
                _, writer = await asyncio.wait_for(
                    asyncio.open_connection(c.host, c.port), c.timeout
                )
            except TimeoutError:
                raise _Fail(
                    "selftest.timeout", f"{c.label}: no answer in {c.timeout:g} s"
                ) from None
            except OSError as e:
                raise _Fail("selftest.failed", f"{c.label}: {e.strerror or e}") from e
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        elif c.kind == "http":
            try:
                status = await asyncio.wait_for(_http_status(c.url, c.timeout), c.timeout + 1)
            except TimeoutError:
                raise _Fail(
                    "selftest.timeout", f"{c.label}: no answer in {c.timeout:g} s"
                ) from None
            if status != c.expect_status:
                raise _Fail(
                    "selftest.failed", f"{c.label}: status {status}, expected {c.expect_status}"
                )
        elif c.kind == "systemd":
            rc = await _run_argv(["systemctl", "is-active", "--quiet", c.unit], c.timeout)
            if rc != 0:
                raise _Fail("selftest.failed", f"unit {c.unit} is not active")
        elif c.kind == "file":
            if not await asyncio.to_thread(Path(c.path).exists):
                raise _Fail("selftest.failed", f"{c.path} is missing")
        elif c.kind == "controller":
            if self.transport is None:
                raise _Fail("selftest.crashed", "no transport to reach the controller with")
            try:
                ok = await asyncio.wait_for(self.transport.reachable(c.timeout), c.timeout + 1)
            except TimeoutError:
                ok = False
            except Exception as e:  # a transport crash is a failed check, not an agent crash
                raise _Fail("selftest.crashed", f"controller check: {e}") from e
            if not ok:
                raise _Fail("selftest.failed", f"controller not reachable within {c.timeout:g} s")


@dataclass(frozen=True)
class CommandMigrations:
    """Migration hooks as commands (``migrate``/``undo`` argv); empty means no migrations."""

    migrate: tuple[str, ...] = ()
    undo_argv: tuple[str, ...] = ()
    timeout: float = 300.0
    env: Mapping[str, str] = field(default_factory=dict)

    async def _hook(self, argv: tuple[str, ...], from_version: str | None, to_version: str) -> None:
        if not argv:
            return
        env = {**self.env, "SLOTLINE_FROM": from_version or "", "SLOTLINE_TO": to_version}
        try:
            rc = await _run_argv(argv, self.timeout, env)
        except _Fail as f:
            raise MigrationError(str(f)) from f
        if rc != 0:
            raise MigrationError(f"{argv[0]} exited {rc}")

    async def run(self, from_version: str | None, to_version: str) -> None:
        """Run the migrate hook."""
        await self._hook(self.migrate, from_version, to_version)

    async def undo(self, from_version: str | None, to_version: str) -> None:
        """Run the undo hook."""
        await self._hook(self.undo_argv, from_version, to_version)
