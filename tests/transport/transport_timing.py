"""Waiting in transport tests: a clock that moves only when told, and a bounded poll."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


class StepClock:
    """Time moves only when the test says so (``clock.t += 1``)."""

    def __init__(self) -> None:
        self.t = 1000.0

    def now(self) -> float:
        return self.t

    def monotonic(self) -> float:
        return self.t


async def until(pred: Callable[[], object], timeout: float = 5.0) -> None:
    """Poll ``pred`` until true; fail the test after ``timeout`` seconds (a hang bound only)."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)
