"""ASGI middleware in front of every route: body caps, then authentication and role.

Rules:

* Routes declare the permission they need in ``ROUTE_PERMS`` (by route name); a route not listed
  there is public (``/healthz``, ``/api/v1/enroll``, the OpenAPI document). The check happens
  here, before the body is read or validated, so a missing, malformed, unknown or wrong-role
  token gets 401/403 whatever it sends, and nothing is parsed for it.
* Bodies: ``Content-Length`` above the cap of the route (uploads: the release cap, others 1 MiB)
  is refused with 413 before reading; chunked bodies are counted as they stream and cut off.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from starlette.routing import Match

from controller.auth import ALLOWED, Perm
from controller.errors import ControllerError, Forbidden, TooLarge, Unauthorized

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

MAX_JSON_BODY = 1024 * 1024
ROUTE_PERMS: dict[str, Perm] = {}
UPLOAD_ROUTES: set[str] = set()


def needs(perm: Perm) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: the route (by endpoint name) needs ``perm``."""

    def mark(fn: Callable[..., Any]) -> Callable[..., Any]:
        ROUTE_PERMS[fn.__name__] = perm
        return fn

    return mark


def error_body(e: ControllerError) -> bytes:
    """The JSON body every error response carries."""
    return json.dumps({"code": e.code, "message": str(e)}).encode()


async def send_error(send: Send, e: ControllerError) -> None:
    """Answer with ``e``'s status and body."""
    body = error_body(e)
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if e.status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": e.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class Guard:
    """See module docstring. ``app`` is the FastAPI app; ``service`` authenticates."""

    def __init__(self, app: Any, service: Any, upload_cap: int) -> None:
        self.app = app
        self.service = service
        self.upload_cap = upload_cap

    def _route(self, scope: Scope) -> str | None:
        for route in self.app.router.routes:
            match, _ = route.matches(scope)
            if match is Match.FULL:
                return str(getattr(route, "name", ""))
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """ASGI entry: check caps and credentials, then hand over to the app."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        name = self._route(scope)
        cap = self.upload_cap if name in UPLOAD_ROUTES else MAX_JSON_BODY
        headers = dict(scope.get("headers") or [])
        try:
            length = headers.get(b"content-length")
            if length is not None and (not length.isdigit() or int(length) > cap):
                raise TooLarge(f"request body larger than {cap} bytes")
            perm = ROUTE_PERMS.get(name or "")
            if perm is not None:
                principal = await self._authenticate(headers.get(b"authorization"))
                if principal.role not in ALLOWED[perm]:
                    raise Forbidden(f"role {principal.role.value} may not {perm.value}")
                scope.setdefault("state", {})["principal"] = principal
            if name not in UPLOAD_ROUTES:
                # JSON bodies are small: read them here, bounded, so an oversized chunked body
                # gets its 413 instead of a parse error further in.
                receive = await _buffered(receive, cap)
        except ControllerError as e:
            await send_error(send, e)
            return
        await self.app(scope, _capped(receive, cap), send)

    async def _authenticate(self, header: bytes | None) -> Any:
        if header is None:
            raise Unauthorized("missing bearer token")
        try:
            text = header.decode("ascii")
        except UnicodeDecodeError:
            raise Unauthorized("malformed Authorization header") from None
        scheme, _, token = text.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthorized("Authorization must be 'Bearer <token>'")
        from starlette.concurrency import run_in_threadpool  # noqa: PLC0415

        return await run_in_threadpool(self.service.authenticate, token.strip())


async def _buffered(receive: Receive, cap: int) -> Receive:
    """Read the whole request body (at most ``cap`` bytes) and replay it to the app."""
    parts: list[bytes] = []
    size = 0
    more = True
    while more:
        message = await receive()
        if message["type"] != "http.request":
            break
        piece = message.get("body", b"")
        size += len(piece)
        if size > cap:
            raise TooLarge(f"request body larger than {cap} bytes")
        parts.append(piece)
        more = bool(message.get("more_body"))
    body = b"".join(parts)
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def _capped(receive: Receive, cap: int) -> Receive:
    seen = 0

    async def wrapped() -> Message:
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > cap:
                raise TooLarge(f"request body larger than {cap} bytes")
        return message

    return wrapped
