"""Device health metrics: the numbers the controller's rollout gate compares (lower is better).

The controller pauses a rollout phase when the devices it updated report a health metric worse
than the devices not yet updated (docs/rollouts.md). This module computes those numbers.

Rules:
- A metric source is any object with ``async sample() -> Mapping[str, float]``
  (:class:`MetricSource`). The agent's own sources: :class:`ErrorCount` (``errors``: error
  events and failed/reverted/rejected results the agent published since it started, i.e. since
  boot), :class:`CheckFailures` (self-test checks re-run, how many failed), :class:`CheckLatency`
  (milliseconds those checks took) and :class:`CommandMetric` (a command's stdout as a number,
  e.g. a service's restart count). Others plug in through :meth:`HealthSampler.add` — this is
  the simulator's hook for "degraded health on version X / hardware Y".
- The computation is pure and separate from the loop: :func:`parse_number`, :func:`merge`,
  :func:`is_error_event`. Several sources reporting the same metric add up (the agent's
  ``errors`` plus an application's ``errors`` are the device's errors).
- A source that raises or exceeds its timeout is left out of that sample and counted in
  ``health_source_failures``, so a broken probe is visible to the operator and never crashes
  the agent.
- Sampling never polls: :meth:`HealthSampler.run` sleeps ``interval`` seconds (asyncio) between
  samples. With no ``[health]`` section the agent has no sampler at all (nothing runs, no state
  field). Whole values are sent as ints (``3``, not ``3.0``); integers beyond 2**63 and
  non-finite numbers are refused (the controller reads every value as a float).

    sampler = HealthSampler([CheckFailures("app_failures", [Check("file", path="/etc/ok")])],
                            interval=60)
    values = await sampler.sample()   # {"errors": 0, "app_failures": 0}
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from agent.config import HealthConfig
    from agent.ports import Transport
    from agent.selftest import Check

Number = int | float

DEFAULT_INTERVAL = 60.0
MIN_INTERVAL = 1.0
MAX_METRICS = 32  # the controller keeps at most 32 metrics per device (controller/reports.py)
MAX_INT = 2**63  # larger integers are refused: the controller converts values to floats
SOURCE_TIMEOUT = 30.0  # seconds one source may take before it counts as failed
NAME = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
ERROR_OUTCOMES = frozenset({"failed", "reverted", "rejected"})
FAILURES = "health_source_failures"


class MetricSource(Protocol):
    """Something that measures health: returns ``{metric: number}`` (lower is better)."""

    async def sample(self) -> Mapping[str, Number]:
        """Measure now; may raise (the sampler counts the failure and goes on)."""
        ...


# -- pure computation -------------------------------------------------------------------------


def check_name(name: str) -> str:
    """A metric name: lower-case token, 1-64 characters (``errors``, ``app_restarts``).

    Raises:
        ValueError: anything else.
    """
    if not isinstance(name, str) or not NAME.match(name):
        raise ValueError(f"metric name {name!r} is not a lower-case token of 1-64 characters")
    return name


def normalise(value: Any) -> Number:
    """A finite number as int when whole (else float); bools and non-numbers are refused.

    Raises:
        TypeError: not a number.
        ValueError: not finite, or an integer beyond 2**63.
    """
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{value!r} is not a number")
    if isinstance(value, int):
        if abs(value) > MAX_INT:  # the controller reads numbers as floats
            raise ValueError("integer out of range")
        return value
    if not math.isfinite(value):
        raise ValueError(f"{value!r} is not finite")
    if value.is_integer() and abs(value) < 2**53:
        return int(value)
    return value


def parse_number(text: str) -> Number:
    """The first whitespace-separated word of a command's output, as a number.

    ``"3"`` (plus a newline) -> 3, ``"12.5 ms"`` -> 12.5; empty or non-numeric output is an
    error (a probe that prints nothing has not measured anything).

    Raises:
        ValueError: no number.
    """
    words = text.split()
    if not words:
        raise ValueError("no output")
    try:
        value = int(words[0])
    except ValueError:
        try:
            value = float(words[0])  # type: ignore[assignment]
        except ValueError:
            raise ValueError(f"{words[0][:40]!r} is not a number") from None
    return normalise(value)


def merge(samples: Iterable[Mapping[str, Any]], *, limit: int = MAX_METRICS) -> dict[str, Number]:
    """Combine source samples into one ``{metric: number}``: same names add up.

    Entries with a bad name or a non-finite/non-numeric value are dropped (a source cannot
    poison the document); past ``limit`` distinct names the rest are dropped, in sorted order,
    so the result is deterministic.
    """
    out: dict[str, Number] = {}
    for sample in samples:
        for name, value in sample.items():
            try:
                check_name(name)
                total = normalise(out.get(name, 0) + normalise(value))
            except (TypeError, ValueError, OverflowError):
                continue  # including a sum that overflows: the earlier value stands
            out[name] = total
    return {k: out[k] for k in sorted(out)[:limit]}


def is_error_event(event: Mapping[str, Any]) -> bool:
    """Does a published agent event count towards ``errors``?

    Error events (rejected commands, failed fetches, failed writes...) and results that did not
    succeed. A committed update, a rollback an operator asked for or a phase change do not.
    """
    kind = event.get("type")
    if kind == "error":
        return True
    return kind == "result" and event.get("outcome") in ERROR_OUTCOMES


# -- sources ----------------------------------------------------------------------------------


class ErrorCount:
    """``errors``: agent and update errors since this agent process started (i.e. since boot).

    The runtime calls :meth:`note` for every event it publishes.
    """

    def __init__(self, name: str = "errors") -> None:
        self.name = check_name(name)
        self.count = 0

    def note(self, event: Mapping[str, Any]) -> None:
        """Count ``event`` if it is an error (:func:`is_error_event`)."""
        if is_error_event(event):
            self.count += 1

    async def sample(self) -> Mapping[str, Number]:
        """``{"errors": n}``."""
        return {self.name: self.count}


class StaticMetrics:
    """Fixed values (the simulator's "this version on this hardware is degraded" knob)."""

    def __init__(self, values: Mapping[str, Number]) -> None:
        self.values = {check_name(k): normalise(v) for k, v in values.items()}

    async def sample(self) -> Mapping[str, Number]:
        """The values given."""
        return dict(self.values)


class FunctionSource:
    """Values from a callable (sync or async): the general hook for embedders."""

    def __init__(
        self, fn: Callable[[], Mapping[str, Number] | Awaitable[Mapping[str, Number]]]
    ) -> None:
        self.fn = fn

    async def sample(self) -> Mapping[str, Number]:
        """Call ``fn``."""
        out = self.fn()
        if isinstance(out, Awaitable):
            out = await out
        return out


async def _failed(checks: Sequence[Check], transport: Transport | None) -> int:
    from agent.selftest import probe  # noqa: PLC0415 - selftest is loaded with the agent anyway

    failed = 0
    for c in checks:
        if await probe(c, transport) is not None:
            failed += 1
    return failed


class CheckFailures:
    """How many of the given self-test checks fail when re-run now."""

    def __init__(
        self, name: str, checks: Sequence[Check], transport: Transport | None = None
    ) -> None:
        self.name = check_name(name)
        self.checks = tuple(checks)
        self.transport = transport

    async def sample(self) -> Mapping[str, Number]:
        """``{name: failed checks}``."""
        return {self.name: await _failed(self.checks, self.transport)}


class CheckLatency:
    """Milliseconds the given self-test checks take together (a failing check still counts)."""

    def __init__(
        self,
        name: str,
        checks: Sequence[Check],
        transport: Transport | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = check_name(name)
        self.checks = tuple(checks)
        self.transport = transport
        self._monotonic = monotonic

    async def sample(self) -> Mapping[str, Number]:
        """``{name: milliseconds}``."""
        t0 = self._monotonic()
        await _failed(self.checks, self.transport)
        return {self.name: max(0, round((self._monotonic() - t0) * 1000))}


class CommandMetric:
    """A command's standard output as a number (``systemctl show -p NRestarts --value app``)."""

    def __init__(self, name: str, argv: Sequence[str], timeout: float = 10.0) -> None:
        if not argv:
            raise ValueError("a command metric needs argv")
        self.name = check_name(name)
        self.argv = tuple(argv)
        self.timeout = timeout

    async def sample(self) -> Mapping[str, Number]:
        """Run the command (no shell; killed at its timeout); a non-zero exit is a failure.

        Raises:
            RuntimeError: the command failed or timed out.
            ValueError: its output is not a number.
        """
        from agent.selftest import capture  # noqa: PLC0415

        rc, out = await capture(self.argv, self.timeout)
        if rc != 0:
            raise RuntimeError(f"{self.argv[0]} exited {rc}")
        return {self.name: parse_number(out.decode(errors="replace"))}


# -- the sampler ------------------------------------------------------------------------------


class HealthSampler:
    """Samples its sources, one sample at a time; :meth:`run` repeats it every ``interval`` s."""

    def __init__(
        self,
        sources: Iterable[MetricSource] = (),
        *,
        interval: float = DEFAULT_INTERVAL,
        errors: ErrorCount | None = None,
        source_timeout: float = SOURCE_TIMEOUT,
    ) -> None:
        if interval != 0 and interval < MIN_INTERVAL:
            raise ValueError(f"health interval must be 0 (commit only) or >= {MIN_INTERVAL:g} s")
        self.errors = errors if errors is not None else ErrorCount()
        self.sources: list[MetricSource] = [self.errors, *sources]
        self.interval = interval
        self.source_timeout = source_timeout
        self.last: dict[str, Number] | None = None
        self._lock = asyncio.Lock()

    def add(self, source: MetricSource) -> None:
        """Plug in one more source (simulator fault knobs, embedders)."""
        self.sources.append(source)

    def note_event(self, event: Mapping[str, Any]) -> None:
        """The runtime tells the sampler about every event it publishes."""
        self.errors.note(event)

    async def sample(self) -> dict[str, Number]:
        """Sample every source once (in order; one sample at a time) and merge."""
        async with self._lock:
            samples: list[Mapping[str, Any]] = []
            failures = 0
            for source in self.sources:
                try:
                    got = await asyncio.wait_for(source.sample(), self.source_timeout)
                except Exception:  # a broken probe is a number, never an agent crash
                    failures += 1
                    continue
                samples.append(got if isinstance(got, Mapping) else {})
            if failures:
                samples.append({FAILURES: failures})
            self.last = merge(samples)
            return self.last

    async def run(
        self,
        on_sample: Callable[[dict[str, Number]], Awaitable[None]],
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        *,
        sample_first: bool = True,
    ) -> None:
        """Sample every ``interval`` seconds until cancelled (the first one now, by default).

        An interval of ``0`` samples at most once and returns.
        """
        if not sample_first:
            if self.interval <= 0:
                return
            await sleep(self.interval)
        while True:
            values = await self.sample()
            with contextlib.suppress(Exception):  # publishing must never end the loop
                await on_sample(values)
            if self.interval <= 0:
                return
            await sleep(self.interval)


def sampler_from_config(
    config: HealthConfig, checks: Sequence[Check], transport: Transport | None = None
) -> HealthSampler:
    """The sampler ``[health]`` describes (``agent/config.py`` has checked every name)."""
    by_name = {c.label: c for c in checks} | {c.name: c for c in checks if c.name}
    sources: list[MetricSource] = []
    for m in config.metrics:
        selected = [by_name[n] for n in m.checks]
        if m.kind == "checks":
            sources.append(CheckFailures(m.name, selected, transport))
        elif m.kind == "latency":
            sources.append(CheckLatency(m.name, selected, transport))
        else:
            sources.append(CommandMetric(m.name, m.argv, m.timeout))
    sampler = HealthSampler(sources, interval=config.interval)
    if not config.errors:
        sampler.sources.remove(sampler.errors)  # still counted, not reported
    return sampler
