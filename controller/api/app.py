"""The HTTP API: FastAPI routes over ``ControllerService``.

Rules: routes are thin (parse, call the service, shape the answer); permissions are declared
with ``@needs`` and enforced by ``Guard`` before the body is read; every error leaves through
the one handler below, which maps ``code``s to HTTP status. ``/healthz`` is public and answers
once the database is migrated (the service exists only then).

    app = create_app(service)       # uvicorn.run(app) or TestClient(app)
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Any

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from controller.api.guard import UPLOAD_ROUTES, Guard, needs
from controller.api.schemas import (
    EnrollmentTokenCreate,
    EnrollRequest,
    RolloutCreate,
    SitePut,
    TokenCreate,
)
from controller.auth import Perm, Role
from controller.dashboard.web import dashboard_app
from controller.errors import ControllerError, InvalidInput, TooLarge
from controller.rollout.scheduler import PhaseSpec, gate_from_json
from controller.service import ControllerService, Principal
from firmware_bundles.errors import BundleError

API = "/api/v1"


def _principal(request: Request) -> Principal:
    principal: Principal = request.scope["state"]["principal"]
    return principal


def _error(status: int, code: str, message: str) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse({"code": code, "message": message}, status_code=status, headers=headers)


def create_app(service: ControllerService) -> Any:
    """The ASGI app: FastAPI routes wrapped in ``Guard``."""
    app = FastAPI(
        title="slotline controller",
        version="1",
        description="Device registry, enrollment, releases and staged rollouts.",
    )
    svc = service

    @app.exception_handler(ControllerError)
    async def _controller_error(_r: Request, e: ControllerError) -> JSONResponse:
        return _error(e.status, e.code, str(e))

    @app.exception_handler(RequestValidationError)
    async def _validation(_r: Request, e: RequestValidationError) -> JSONResponse:
        errors = e.errors()[:5]
        msg = "; ".join(
            f"{'.'.join(str(x) for x in err.get('loc', ()))}: {err.get('msg')}" for err in errors
        )
        return _error(422, "controller.invalid_input", msg[:1000])

    @app.exception_handler(RecursionError)
    async def _deep(_r: Request, _e: RecursionError) -> JSONResponse:
        return _error(400, "controller.invalid_input", "JSON nested too deeply")

    @app.exception_handler(BundleError)
    async def _bundle(_r: Request, e: BundleError) -> JSONResponse:
        # An uploaded bundle that does not verify: the bundle library's code, verbatim.
        return _error(422, e.code, str(e))

    # ------------------------------------------------------------------ health, enrollment

    @app.get("/healthz", tags=["health"])
    def healthz() -> dict[str, str]:
        """Ready: the database is migrated and the service runs."""
        return {"status": "ok"}

    @app.post(f"{API}/enroll", tags=["enrollment"])
    def enroll(body: EnrollRequest) -> dict[str, Any]:
        """A device enrolls with a single-use token (no API token)."""
        r = svc.enroll(body.token, body.device_id, body.serial, body.hardware_model, body.csr_pem)
        return {
            "device_id": r.device_id,
            "certificate_pem": r.certificate_pem,
            "ca_pem": r.ca_pem,
            "trust_root": r.trust_root,
            "broker_url": r.broker_url,
        }

    @app.post(f"{API}/enrollment-tokens", tags=["enrollment"], status_code=201)
    @needs(Perm.ENROLL_TOKEN)
    def create_enrollment_token(request: Request, body: EnrollmentTokenCreate) -> dict[str, Any]:
        """Issue a single-use enrollment token for a site and hardware model."""
        return svc.issue_enrollment_token(
            _principal(request), body.site, body.hardware_model, body.ttl_seconds, body.tags
        )

    # ------------------------------------------------------------------ tokens, audit

    @app.post(f"{API}/tokens", tags=["tokens"], status_code=201)
    @needs(Perm.API_TOKEN)
    def create_token(request: Request, body: TokenCreate) -> dict[str, Any]:
        """Issue an API token (shown once)."""
        token = svc.issue_api_token(_principal(request), body.name, Role(body.role), body.sites)
        return {"token": token, "name": body.name, "role": body.role, "sites": body.sites}

    @app.get(f"{API}/tokens", tags=["tokens"])
    @needs(Perm.API_TOKEN)
    def list_tokens(request: Request) -> list[dict[str, Any]]:
        """Every API token, without secrets."""
        del request
        return svc.list_api_tokens()

    @app.delete(f"{API}/tokens/{{token_id}}", tags=["tokens"])
    @needs(Perm.API_TOKEN)
    def revoke_token(request: Request, token_id: int) -> dict[str, Any]:
        """Revoke an API token."""
        if not 0 < token_id < 2**31:
            raise InvalidInput("token id out of range")
        svc.revoke_api_token(_principal(request), token_id)
        return {"revoked": token_id}

    @app.get(f"{API}/audit", tags=["audit"])
    @needs(Perm.AUDIT_READ)
    def audit(
        request: Request, limit: Annotated[int, Query(ge=1, le=1000)] = 200
    ) -> list[dict[str, Any]]:
        """Newest audit entries first."""
        del request
        return svc.audit_log(limit)

    # ------------------------------------------------------------------ sites, devices

    @app.get(f"{API}/sites", tags=["sites"])
    @needs(Perm.READ)
    def list_sites(request: Request) -> list[dict[str, Any]]:
        """Every site."""
        del request
        return svc.list_sites()

    @app.put(f"{API}/sites/{{name}}", tags=["sites"])
    @needs(Perm.SITE_WRITE)
    def put_site(request: Request, name: str, body: SitePut) -> dict[str, Any]:
        """Create or update a site (time zone, maintenance windows, bandwidth)."""
        return svc.put_site(
            _principal(request),
            name,
            body.tz,
            [w.model_dump() for w in body.windows],
            body.bandwidth_bps,
        )

    @app.get(f"{API}/devices", tags=["devices"])
    @needs(Perm.READ_SITE)
    def list_devices(
        request: Request,
        *,
        site: Annotated[str | None, Query(max_length=64)] = None,
        hardware_model: Annotated[str | None, Query(max_length=64)] = None,
        tag: Annotated[str | None, Query(max_length=64)] = None,
        limit: Annotated[int, Query(ge=1, le=10000)] = 1000,
        offset: Annotated[int, Query(ge=0, le=10**9)] = 0,
    ) -> list[dict[str, Any]]:
        """Devices (field engineers: their sites only)."""
        return svc.list_devices(
            _principal(request),
            site=site,
            hardware_model=hardware_model,
            tag=tag,
            limit=limit,
            offset=offset,
        )

    @app.get(f"{API}/devices/{{device_id}}", tags=["devices"])
    @needs(Perm.READ_SITE)
    def show_device(request: Request, device_id: str) -> dict[str, Any]:
        """One device with its last reported state."""
        return svc.get_device(_principal(request), device_id)

    @app.post(f"{API}/devices/{{device_id}}/decommission", tags=["devices"])
    @needs(Perm.DECOMMISSION)
    def decommission(request: Request, device_id: str) -> dict[str, Any]:
        """Retire a device and revoke its certificate."""
        svc.decommission(_principal(request), device_id)
        return {"decommissioned": device_id}

    # ------------------------------------------------------------------ releases

    @app.post(
        f"{API}/releases",
        tags=["releases"],
        status_code=201,
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}
                },
            }
        },
    )
    @needs(Perm.RELEASE_WRITE)
    async def upload_release(request: Request) -> dict[str, Any]:
        """Upload a ``.slb`` bundle (raw body); verified against the trust root before use."""
        path = await _spool(request, svc.config.data_dir / "tmp", svc.config.max_upload_bytes)
        try:
            return await run_in_threadpool(svc.releases.add, _principal(request), path)
        finally:
            path.unlink(missing_ok=True)

    UPLOAD_ROUTES.add("upload_release")

    @app.get(f"{API}/releases", tags=["releases"])
    @needs(Perm.READ)
    def list_releases(request: Request) -> list[dict[str, Any]]:
        """Every release."""
        del request
        return svc.releases.list_releases()

    @app.get(f"{API}/releases/{{bundle_id}}", tags=["releases"])
    @needs(Perm.READ)
    def show_release(request: Request, bundle_id: str) -> dict[str, Any]:
        """One release with its payloads."""
        del request
        return svc.releases.show(bundle_id)

    # ------------------------------------------------------------------ rollouts

    @app.post(f"{API}/rollouts", tags=["rollouts"], status_code=201)
    @needs(Perm.ROLLOUT_WRITE)
    def create_rollout(request: Request, body: RolloutCreate) -> dict[str, Any]:
        """Create a rollout (CREATING; READY once its deltas are made); then ``/start`` it."""
        try:
            phases = [
                PhaseSpec(ph.name, ph.percent, gate_from_json(ph.gate.model_dump()))
                for ph in body.phases
            ]
            trial_gate = gate_from_json(body.trial_gate.model_dump()) if body.trial_gate else None
        except ValueError as e:
            raise InvalidInput(str(e)) from e
        return svc.scheduler.create(
            _principal(request),
            name=body.name,
            release_id=body.release,
            hardware_models=body.hardware_models,
            tags=body.tags,
            sites=body.sites,
            trial_devices=body.trial_devices,
            trial_tag=body.trial_tag,
            trial_gate=trial_gate,
            phases=phases,
            max_in_flight=body.max_in_flight,
            max_in_flight_per_site=body.max_in_flight_per_site,
            after_rollout=body.after_rollout,
            prepare_now=False,
            health_metric=body.health_metric,
        )

    @app.get(f"{API}/rollouts", tags=["rollouts"])
    @needs(Perm.READ)
    def list_rollouts(request: Request) -> list[dict[str, Any]]:
        """Every rollout, newest first."""
        del request
        return svc.scheduler.list_rollouts()

    @app.get(f"{API}/rollouts/{{rollout_id}}", tags=["rollouts"])
    @needs(Perm.READ)
    def rollout_status(request: Request, rollout_id: int) -> dict[str, Any]:
        """A rollout with its groups, counts, gates and last decisions."""
        del request
        return svc.scheduler.status(_rid(rollout_id))

    def _steer(verb: str) -> None:
        def steer(request: Request, rollout_id: int) -> dict[str, Any]:
            fn = getattr(svc.scheduler, verb)
            result: dict[str, Any] = fn(_principal(request), _rid(rollout_id))
            return result

        steer.__name__ = f"rollout_{verb}"
        steer.__doc__ = f"{verb.capitalize()} a rollout."
        needs(Perm.ROLLOUT_WRITE)(steer)
        app.post(
            f"{API}/rollouts/{{rollout_id}}/{verb}", tags=["rollouts"], name=f"rollout_{verb}"
        )(steer)

    for verb in ("start", "pause", "resume", "abort", "rollback"):
        _steer(verb)

    # Read-only HTML pages; their own login (cookie or bearer), not in the OpenAPI document.
    app.mount("/dashboard", dashboard_app(svc), name="dashboard")
    _document_security(app)
    return Guard(app, svc, svc.config.max_upload_bytes)


def _document_security(app: FastAPI) -> None:
    """Publish the bearer scheme and each route's permission in the OpenAPI document."""
    from fastapi.openapi.utils import get_openapi  # noqa: PLC0415
    from fastapi.routing import APIRoute  # noqa: PLC0415

    from controller.api.guard import ROUTE_PERMS  # noqa: PLC0415
    from controller.auth import ALLOWED  # noqa: PLC0415

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(
            title=app.title, version=app.version, description=app.description, routes=app.routes
        )
        schema.setdefault("components", {})["securitySchemes"] = {
            "bearer": {
                "type": "http",
                "scheme": "bearer",
                "description": "An API token from `slotline token api` or admin.token.",
            }
        }
        error = {
            "content": {
                "application/json": {
                    "schema": {
                        "type": "object",
                        "properties": {"code": {"type": "string"}, "message": {"type": "string"}},
                    }
                }
            }
        }
        for route in app.routes:
            perm = ROUTE_PERMS.get(getattr(route, "name", ""))
            if not isinstance(route, APIRoute) or perm is None:
                continue
            roles = ", ".join(sorted(r.value for r in ALLOWED[perm]))
            for method in route.methods or ():
                op = schema["paths"][route.path_format][method.lower()]
                op["security"] = [{"bearer": []}]
                op["description"] = (
                    f"{op.get('description', '')}\n\nNeeds `{perm.value}` ({roles})."
                ).strip()
                op.setdefault("responses", {})["401"] = {
                    "description": "missing, malformed, unknown or revoked token",
                    **error,
                }
                op["responses"]["403"] = {"description": "role not allowed", **error}
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def _rid(rollout_id: int) -> int:
    if not 0 < rollout_id < 2**31:
        raise InvalidInput("rollout id out of range")
    return rollout_id


def _check_cap(size: int, cap: int) -> None:
    if size > cap:
        raise TooLarge(f"upload larger than {cap} bytes")


async def _spool(request: Request, tmp_dir: Path, cap: int) -> Path:
    """Stream the body to a temp file, refusing past ``cap`` bytes (bounded memory).

    Writes are small appends to a local file (page cache), so they stay on the event loop.
    """
    tmp_dir.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240
    fd, name = tempfile.mkstemp(dir=tmp_dir, prefix="upload-", suffix=".slb")
    path = Path(name)
    size = 0
    try:
        with os.fdopen(fd, "wb") as f:
            stream: AsyncIterator[bytes] = request.stream()
            async for piece in stream:
                size += len(piece)
                _check_cap(size, cap)
                f.write(piece)
    except BaseException:
        path.unlink(missing_ok=True)  # noqa: ASYNC240
        raise
    if size == 0:
        path.unlink(missing_ok=True)  # noqa: ASYNC240
        raise InvalidInput("empty upload")
    return path
