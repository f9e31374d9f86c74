"""The dashboard as an ASGI app, mounted by the controller's API app at ``/dashboard``.

Rules:

* Read-only: every page is a GET over ``DashboardQueries``; the only POSTs are log in and log out.
* Who may look: an API token whose role may ``read`` (viewer, operator, admin; not field
  engineers, who see only their sites through the API). The token comes as
  ``Authorization: Bearer`` (scripts, tests) or as the signed session cookie the login form sets
  (browsers; see ``session.py``). No or bad credentials answer 401 with the login form, a
  refused role 403; never a 500.
* Every response carries a strict content security policy (no script at all, styles from this
  app only, forms post only here, no framing) and ``Cache-Control: no-store``.
* Blocking work (database, token look-ups) runs in the thread pool, as in the API.

    app.mount("/dashboard", dashboard_app(svc))      # controller/api/app.py
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

from sqlalchemy import select
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Route

from controller import auth
from controller.auth import ALLOWED, Perm, Role
from controller.dashboard import pages
from controller.dashboard.html import Markup
from controller.dashboard.queries import DashboardQueries, DeviceFilter
from controller.dashboard.session import COOKIE, SessionSigner, load_key
from controller.db import models as m
from controller.errors import ControllerError, Forbidden, InvalidInput, Unauthorized
from controller.ids import check_device_id

if TYPE_CHECKING:
    from controller.service import ControllerService, Principal

BASE = pages.BASE
SECURITY_HEADERS = {
    "content-security-policy": (
        "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'"
    ),
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "same-origin",
    "cache-control": "no-store",
}
_MAX_LOGIN_BODY = 4096


@functools.cache
def stylesheet() -> bytes:
    """The CSS file, plus width classes for the progress bars (inline styles are forbidden)."""
    css = resources.files("controller.dashboard").joinpath("static/dashboard.css").read_text()
    widths = "".join(f".w{i}{{width:{i}%}}" for i in range(101))
    return (css + "\n" + widths + "\n").encode()


def _html(body: Markup, status: int = 200, headers: dict[str, str] | None = None) -> HTMLResponse:
    return HTMLResponse(
        str(body), status_code=status, headers={**SECURITY_HEADERS, **(headers or {})}
    )


def safe_next(value: str | None) -> str:
    """Where to go after log in: a path of this dashboard only (no open redirect)."""
    if not value or len(value) > 2000 or not value.isascii() or not value.isprintable():
        return BASE + "/"
    parts = urlsplit(value)
    if parts.scheme or parts.netloc or "\\" in value or "//" in value:
        return BASE + "/"
    if parts.path != BASE and not parts.path.startswith(BASE + "/"):
        return BASE + "/"
    return value


def _path(request: Request) -> str:
    q = request.url.query
    return request.url.path + (f"?{q}" if q else "")


class Dashboard:
    """The pages and their authentication (see module docstring)."""

    def __init__(self, svc: ControllerService) -> None:
        self.svc = svc
        self.q = DashboardQueries(svc)
        self.signer = SessionSigner(load_key(svc.config.data_dir))

    # ------------------------------------------------------------------ who is asking

    def principal(self, request: Request) -> Principal:
        """The caller, from the bearer header or the session cookie.

        Raises:
            Unauthorized: no, malformed, unknown, revoked or expired credentials.
            Forbidden: a role that may not read.
        """
        header = request.headers.get("authorization")
        if header is not None:
            scheme, _, token = header.partition(" ")
            if scheme.lower() != "bearer":
                raise Unauthorized("Authorization must be 'Bearer <token>'")
            who = self.svc.authenticate(token.strip())
        else:
            token_hash = self.signer.verify(request.cookies.get(COOKIE), self.svc.clock())
            if token_hash is None:
                raise Unauthorized("log in with an API token")
            who = self._by_hash(token_hash)
        if who.role not in ALLOWED[Perm.READ]:
            raise Forbidden(f"role {who.role.value} may not use the dashboard")
        return who

    def _by_hash(self, token_hash: str) -> Principal:
        from controller.service import Principal  # noqa: PLC0415

        with self.svc.sessions() as s:
            row = s.scalar(select(m.ApiToken).where(m.ApiToken.token_hash == token_hash))
            if row is None or row.revoked:
                raise Unauthorized("the session's API token was revoked; log in again")
            return Principal(row.name, Role(row.role), tuple(row.sites))

    # ------------------------------------------------------------------ plumbing

    def page(
        self, render: Callable[[Request, pages.Ctx, Principal], Markup]
    ) -> Callable[[Request], Awaitable[Response]]:
        """A GET endpoint: authenticate, render in the thread pool, map errors to pages."""

        def run(request: Request) -> Response:
            try:
                who = self.principal(request)
            except Unauthorized as e:
                resp = _html(pages.login_page(str(e), _path(request)), 401)
                if request.cookies.get(COOKIE):
                    resp.delete_cookie(COOKIE, path=BASE)
                return resp
            except Forbidden as e:
                return _html(pages.login_page(str(e), _path(request)), 403)
            ctx = pages.Ctx(
                user=who.name,
                role=who.role.value,
                now=self.svc.clock(),
                path=_path(request),
                refresh=request.query_params.get("refresh") != "0",
            )
            try:
                return _html(render(request, ctx, who))
            except ControllerError as e:
                shown = pages.Ctx(ctx.user, ctx.role, ctx.now, ctx.path, refresh=False)
                return _html(pages.error_page(shown, e.status, f"{e.code}: {e}"), e.status)

        async def endpoint(request: Request) -> Response:
            return await run_in_threadpool(run, request)

        return endpoint

    # ------------------------------------------------------------------ pages

    def overview(self, _r: Request, ctx: pages.Ctx, _w: Principal) -> Markup:
        """Fleet counts and open rollouts."""
        return pages.overview_page(ctx, self.q.overview())

    def rollouts(self, _r: Request, ctx: pages.Ctx, _w: Principal) -> Markup:
        """Every rollout."""
        return pages.rollouts_page(ctx, self.q.rollouts())

    def rollout(self, request: Request, ctx: pages.Ctx, _w: Principal) -> Markup:
        """One rollout."""
        rid = request.path_params["rollout_id"]
        if not 0 < rid < 2**31:
            raise InvalidInput("rollout id out of range")
        return pages.rollout_page(ctx, self.q.rollout(rid))

    def devices(self, request: Request, ctx: pages.Ctx, _w: Principal) -> Markup:
        """The device list."""
        params = request.query_params
        f = DeviceFilter.parse(params)
        raw = params.get("page") or "1"
        if not raw.isdigit() or len(raw) > 6:
            raise InvalidInput("page must be a positive number")
        return pages.devices_page(ctx, f, self.q.devices(f, int(raw)), self.q.filter_choices())

    def device(self, request: Request, ctx: pages.Ctx, who: Principal) -> Markup:
        """One device."""
        device_id = check_device_id(request.path_params["device_id"])
        return pages.device_page(ctx, self.q.device(who, device_id))

    def releases(self, _r: Request, ctx: pages.Ctx, _w: Principal) -> Markup:
        """The release catalogue."""
        return pages.releases_page(ctx, self.q.releases())

    # ------------------------------------------------------------------ log in / out

    async def login_form(self, request: Request) -> Response:
        """GET: the form."""
        return _html(pages.login_page("", safe_next(request.query_params.get("next"))))

    async def login(self, request: Request) -> Response:
        """POST token=...&next=...: check the token, set the session cookie, go on."""
        origin = request.headers.get("origin")
        if origin is not None and origin != f"{request.url.scheme}://{request.url.netloc}":
            return _html(pages.login_page("cross-site log in refused"), 403)
        body = await request.body()
        if len(body) > _MAX_LOGIN_BODY:
            return _html(pages.login_page("request too large"), 413)
        form = parse_qs(body.decode("utf-8", "replace"), max_num_fields=10)
        token = (form.get("token") or [""])[0].strip()
        target = safe_next((form.get("next") or [""])[0])
        try:
            who = await run_in_threadpool(self.svc.authenticate, token)
        except Unauthorized as e:
            return _html(pages.login_page(f"{e}", target), 401)
        if who.role not in ALLOWED[Perm.READ]:
            msg = f"role {who.role.value} may not use the dashboard"
            return _html(pages.login_page(msg, target), 403)
        resp = RedirectResponse(target, status_code=303, headers=SECURITY_HEADERS)
        resp.set_cookie(
            COOKIE,
            self.signer.issue(auth.hash_token(token), self.svc.clock()),
            max_age=self.signer.ttl,
            path=BASE,
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
        )
        return resp

    async def logout(self, _request: Request) -> Response:
        """POST: forget the session cookie."""
        resp = RedirectResponse(f"{BASE}/login", status_code=303, headers=SECURITY_HEADERS)
        resp.delete_cookie(COOKIE, path=BASE, httponly=True, samesite="strict")
        return resp

    async def css(self, _request: Request) -> Response:
        """The stylesheet (public: it holds no data)."""
        return Response(
            stylesheet(),
            media_type="text/css",
            headers={"cache-control": "max-age=300", "x-content-type-options": "nosniff"},
        )


def dashboard_app(svc: ControllerService) -> Any:
    """The dashboard ASGI app, to be mounted at ``/dashboard``."""
    d = Dashboard(svc)
    routes = [
        Route("/", d.page(d.overview), name="dashboard_overview"),
        Route("/rollouts", d.page(d.rollouts), name="dashboard_rollouts"),
        Route("/rollouts/{rollout_id:int}", d.page(d.rollout), name="dashboard_rollout"),
        Route("/devices", d.page(d.devices), name="dashboard_devices"),
        Route("/devices/{device_id}", d.page(d.device), name="dashboard_device"),
        Route("/releases", d.page(d.releases), name="dashboard_releases"),
        Route("/login", d.login_form, methods=["GET"], name="dashboard_login_form"),
        Route("/login", d.login, methods=["POST"], name="dashboard_login"),
        Route("/logout", d.logout, methods=["POST"], name="dashboard_logout"),
        Route("/static/dashboard.css", d.css, name="dashboard_css"),
    ]
    return Starlette(routes=routes)
