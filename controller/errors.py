"""Errors of the controller, each with a stable ``code``.

Split by who is at fault: the caller (``Unauthorized``, ``Forbidden``, ``InvalidInput``,
``NotFound``, ``Conflict``, ``TooLarge``) or the controller's own state (``RolloutError``).
``controller/api/app.py`` maps codes to HTTP status in one exception handler; nothing below
``controller/api`` raises ``HTTPException``.

    raise NotFound(f"device {device_id!r} is not enrolled")  # 404 controller.not_found
"""

from __future__ import annotations


class ControllerError(Exception):
    """Root of every error the controller raises on purpose."""

    code = "controller.error"
    status = 500

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class InvalidInput(ControllerError):
    """The request is malformed or names things that cannot exist (bad ids, bad ranges)."""

    code = "controller.invalid_input"
    status = 422


class Unauthorized(ControllerError):
    """No token, a malformed token, or a token the controller does not know."""

    code = "auth.unauthorized"
    status = 401


class Forbidden(ControllerError):
    """A known token whose role or site scope does not allow the action."""

    code = "auth.forbidden"
    status = 403


class NotFound(ControllerError):
    """The named device, release, rollout or token does not exist."""

    code = "controller.not_found"
    status = 404


class Conflict(ControllerError):
    """The action does not fit the current state (e.g. pausing a finished rollout)."""

    code = "controller.conflict"
    status = 409


class TooLarge(ControllerError):
    """A body or upload past the configured cap; nothing was stored."""

    code = "controller.too_large"
    status = 413


class EnrollmentRefused(ControllerError):
    """An enrollment token that is unknown, used, expired or out of scope."""

    code = "enroll.refused"
    status = 403


class ReleaseRejected(ControllerError):
    """An uploaded bundle that does not verify against the trust root (code from the bundle lib)."""

    code = "release.rejected"
    status = 422


class RolloutError(ControllerError):
    """A rollout that cannot be created or steered as asked."""

    code = "rollout.error"
    status = 409


class RequirementsUnmet(RolloutError):
    """No targeted device meets the release's ``requires`` on other components."""

    code = "rollout.requirements_unmet"
    status = 422
