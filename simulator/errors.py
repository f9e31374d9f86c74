"""Errors of the simulator, each with a stable ``code``.

Split by who is at fault: the scenario author (``ScenarioInvalid``: names file, line and field),
the environment (``Unreachable``: broker or controller did not answer in time), or the system
under test (``ExpectationFailed``: the run finished but a promise did not hold).
"""

from __future__ import annotations


class SimError(Exception):
    """Root of every error the simulator raises on purpose."""

    code = "sim.error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class ScenarioInvalid(SimError):
    """A scenario file that does not parse or names impossible things.

    ``str(e)`` reads ``FILE:LINE: FIELD: what is wrong``, like a compiler message, so an editor
    can jump to it.
    """

    code = "sim.scenario_invalid"

    def __init__(self, file: str, line: int | None, field: str, message: str) -> None:
        self.file, self.line, self.field, self.reason = file, line, field, message
        where = f"{file}:{line}" if line is not None else file
        super().__init__(f"{where}: {field}: {message}" if field else f"{where}: {message}")


class Unreachable(SimError):
    """The broker or the controller did not answer within the run's connect deadline."""

    code = "sim.unreachable"


class ExpectationFailed(SimError):
    """The run ended and at least one ``[expect]`` item did not hold."""

    code = "sim.expectation_failed"
