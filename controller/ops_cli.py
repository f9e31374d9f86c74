"""Ops CLI over the controller's HTTP API: devices, releases, rollouts, tokens, sites.

Every command takes ``--url`` / ``--token`` (or ``SLOTLINE_URL`` / ``SLOTLINE_TOKEN``) and
``--json`` (machine-readable output, exit status 1 with ``{"code", "message"}`` on an error).

    export SLOTLINE_URL=http://127.0.0.1:8080 SLOTLINE_TOKEN=$(cat data/admin.token)
    slotline release upload rootfs-2.0.slb
    slotline rollout create --name tue --release rootfs-2.0-abc --trial-tag trial
    slotline rollout start 1 && slotline rollout status 1 --watch
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click

DEFAULT_URL = "http://127.0.0.1:8080"
API = "/api/v1"


class Api:
    """A thin httpx client that turns error answers into one clear line."""

    def __init__(self, url: str, token: str | None, as_json: bool) -> None:
        import httpx  # noqa: PLC0415

        self.as_json = as_json
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.client = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=60)

    def call(self, method: str, path: str, **kw: Any) -> Any:
        """Send a request; print the error and exit 1 on a non-2xx answer."""
        import httpx  # noqa: PLC0415

        try:
            r = self.client.request(method, API + path, **kw)
        except httpx.HTTPError as e:
            self.fail("http.error", f"cannot reach the controller: {e}")
        if r.status_code >= 400:
            try:
                body = r.json()
                code, msg = body.get("code", "http.error"), body.get("message", r.text)
            except ValueError:
                code, msg = "http.error", r.text[:200]
            self.fail(code, f"{msg} (HTTP {r.status_code})")
        return r.json()

    def fail(self, code: str, message: str) -> None:
        """Report an error and exit with status 1."""
        if self.as_json:
            click.echo(json.dumps({"code": code, "message": message}))
        else:
            click.echo(f"error: {code}: {message}", err=True)
        sys.exit(1)


def _api_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    fn = click.option("--json", "as_json", is_flag=True, help="Print JSON.")(fn)
    fn = click.option(
        "--token", envvar="SLOTLINE_TOKEN", default=None, help="API token (env SLOTLINE_TOKEN)."
    )(fn)
    return click.option(
        "--url",
        envvar="SLOTLINE_URL",
        default=DEFAULT_URL,
        show_default=True,
        help="Controller URL (env SLOTLINE_URL).",
    )(fn)


def _table(rows: list[dict[str, Any]], columns: list[str], title: str | None = None) -> None:
    from rich.console import Console  # noqa: PLC0415
    from rich.table import Table  # noqa: PLC0415

    table = Table(title=title)
    for i, c in enumerate(columns):
        # The first column is the id people copy: never wrapped.
        table.add_column(c, no_wrap=i == 0, overflow="fold")
    for row in rows:
        table.add_row(*[_cell(row.get(c)) for c in columns])
    Console().print(table)


def _cell(v: Any) -> str:
    if isinstance(v, list):
        return ",".join(str(x) for x in v)
    if isinstance(v, dict):
        return ", ".join(f"{k}={x}" for k, x in v.items())
    return "" if v is None else str(v)


def _out(api: Api, data: Any, show: Callable[[Any], None]) -> None:
    if api.as_json:
        click.echo(json.dumps(data, indent=None, sort_keys=True))
    else:
        show(data)


# ------------------------------------------------------------------ device


@click.group()
def device() -> None:
    """List, show and decommission devices."""


@device.command("list")
@click.option("--site", default=None)
@click.option("--model", "hardware_model", default=None)
@click.option("--tag", default=None)
@_api_options
def device_list(  # noqa: PLR0917 (click passes options positionally)
    site: str | None,
    hardware_model: str | None,
    tag: str | None,
    url: str,
    token: str | None,
    as_json: bool,
) -> None:
    """Devices, filtered by site, hardware model or tag."""
    api = Api(url, token, as_json)
    params = {
        k: v
        for k, v in {"site": site, "hardware_model": hardware_model, "tag": tag}.items()
        if v is not None
    }
    data = api.call("GET", "/devices", params=params)
    _out(
        api,
        data,
        lambda d: _table(
            d,
            ["id", "hardware_model", "site", "tags", "online", "versions", "status"],
            f"{len(d)} devices",
        ),
    )


@device.command("show")
@click.argument("device_id")
@_api_options
def device_show(device_id: str, url: str, token: str | None, as_json: bool) -> None:
    """One device with its last reported state."""
    api = Api(url, token, as_json)
    data = api.call("GET", f"/devices/{_seg(device_id)}")
    _out(
        api,
        data,
        lambda d: _table(
            [{"field": k, "value": v} for k, v in d.items()], ["field", "value"], d["id"]
        ),
    )


@device.command("decommission")
@click.argument("device_id")
@_api_options
def device_decommission(device_id: str, url: str, token: str | None, as_json: bool) -> None:
    """Retire a device and revoke its certificate."""
    api = Api(url, token, as_json)
    _out(
        api,
        api.call("POST", f"/devices/{_seg(device_id)}/decommission"),
        lambda d: click.echo(f"decommissioned {d['decommissioned']}"),
    )


def _seg(value: str) -> str:
    from urllib.parse import quote  # noqa: PLC0415

    return quote(value, safe="")


# ------------------------------------------------------------------ release


@click.group()
def release() -> None:
    """Upload, list and show releases."""


@release.command("upload")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@_api_options
def release_upload(file: Path, url: str, token: str | None, as_json: bool) -> None:
    """Upload a .slb bundle (streamed; the controller verifies it before accepting it)."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn  # noqa: PLC0415

    api = Api(url, token, as_json)
    size = file.stat().st_size
    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        disable=as_json,
        transient=True,
    ) as progress:
        task = progress.add_task(f"upload {file.name}", total=size)

        def body() -> Iterator[bytes]:
            with file.open("rb") as f:
                while piece := f.read(1 << 20):
                    progress.advance(task, len(piece))
                    yield piece

        data = api.call(
            "POST",
            "/releases",
            content=body(),
            headers={"Content-Type": "application/octet-stream", "Content-Length": str(size)},
        )
    _out(
        api,
        data,
        lambda d: click.echo(
            f"release {d['bundle_id']}: {d['component']} {d['version']} for "
            f"{','.join(d['hardware_models'])}, {len(d['payloads'])} payload(s)"
        ),
    )


@release.command("list")
@_api_options
def release_list(url: str, token: str | None, as_json: bool) -> None:
    """Every release."""
    api = Api(url, token, as_json)
    _out(
        api,
        api.call("GET", "/releases"),
        lambda d: _table(
            d,
            [
                "bundle_id",
                "component",
                "version",
                "security_version",
                "hardware_models",
                "requires",
            ],
            "releases",
        ),
    )


@release.command("show")
@click.argument("bundle_id")
@_api_options
def release_show(bundle_id: str, url: str, token: str | None, as_json: bool) -> None:
    """One release and its payloads (release-signed and controller-made deltas)."""
    api = Api(url, token, as_json)

    def show(d: dict[str, Any]) -> None:
        _table(
            [{"field": k, "value": v} for k, v in d.items() if k != "payloads"],
            ["field", "value"],
            d["bundle_id"],
        )
        _table(d["payloads"], ["payload_id", "kind", "base_sha256", "size", "chunks"], "payloads")

    _out(api, api.call("GET", f"/releases/{_seg(bundle_id)}"), show)


# ------------------------------------------------------------------ rollout


@click.group()
def rollout() -> None:
    """Create and steer rollouts."""


@rollout.command("create")
@click.option("--name", required=True)
@click.option("--release", "release_id", required=True)
@click.option("--model", "models", multiple=True, help="Hardware model (repeatable).")
@click.option("--tag", "tags", multiple=True, help="Devices must carry every tag.")
@click.option("--site", "sites", multiple=True, help="Devices at any of these sites.")
@click.option("--trial-device", "trial_devices", multiple=True)
@click.option("--trial-tag", default=None)
@click.option(
    "--phases",
    default="1,10,50,100",
    show_default=True,
    help="Cumulative percentages of the non-trial target.",
)
@click.option("--min-successes", default=1, show_default=True, type=click.IntRange(0))
@click.option("--max-failure-pct", default=0, show_default=True, type=click.IntRange(0, 100))
@click.option("--threshold-pct", default=100, show_default=True, type=click.IntRange(0, 100))
@click.option("--soak", "soak_seconds", default=0, show_default=True, type=click.IntRange(0))
@click.option("--health-tolerance-pct", default=None, type=click.IntRange(0, 1000))
@click.option(
    "--health-metric",
    default=None,
    help="Health metric the gate compares (lower is better; default: errors).",
)
@click.option(
    "--on-failure",
    "error_action",
    type=click.Choice(["pause", "abort"]),
    default="pause",
    show_default=True,
)
@click.option("--max-in-flight", default=100, show_default=True, type=click.IntRange(1))
@click.option("--max-in-flight-per-site", default=None, type=click.IntRange(1))
@click.option(
    "--after",
    "after_rollout",
    default=None,
    type=click.IntRange(1),
    help="Start only after this rollout finished.",
)
@click.option(
    "--spec",
    type=click.File("r"),
    default=None,
    help="A JSON rollout body (overrides the options above).",
)
@_api_options
def rollout_create(  # noqa: PLR0917 (click passes options positionally)
    name: str,
    release_id: str,
    models: tuple[str, ...],
    tags: tuple[str, ...],
    sites: tuple[str, ...],
    trial_devices: tuple[str, ...],
    trial_tag: str | None,
    phases: str,
    min_successes: int,
    max_failure_pct: int,
    threshold_pct: int,
    soak_seconds: int,
    health_tolerance_pct: int | None,
    health_metric: str | None,
    error_action: str,
    max_in_flight: int,
    max_in_flight_per_site: int | None,
    after_rollout: int | None,
    spec: Any,
    url: str,
    token: str | None,
    as_json: bool,
) -> None:
    """Create a rollout (READY); start it with ``slotline rollout start ID``."""
    api = Api(url, token, as_json)
    gate = {
        "min_successes": min_successes,
        "max_failure_pct": max_failure_pct,
        "threshold_pct": threshold_pct,
        "soak_seconds": soak_seconds,
        "health_tolerance_pct": health_tolerance_pct,
        "error_action": error_action,
    }
    try:
        pcts = [int(x) for x in phases.split(",")]
    except ValueError:
        api.fail("controller.invalid_input", "--phases must be comma-separated integers")
    body: dict[str, Any] = {
        "name": name,
        "release": release_id,
        "hardware_models": list(models),
        "tags": list(tags),
        "sites": list(sites),
        "trial_devices": list(trial_devices),
        "trial_tag": trial_tag,
        "trial_gate": gate if (trial_devices or trial_tag) else None,
        "phases": [{"name": f"{p}pct", "percent": p, "gate": gate} for p in pcts],
        "max_in_flight": max_in_flight,
        "max_in_flight_per_site": max_in_flight_per_site,
        "after_rollout": after_rollout,
        "health_metric": health_metric,
    }
    if spec is not None:
        body = json.load(spec)
    data = api.call("POST", "/rollouts", json=body)
    # The controller makes the deltas the fleet needs in the background: wait for READY.
    for _ in range(100_000):
        if data["state"] != "creating":
            break
        time.sleep(0.5)
        data = api.call("GET", f"/rollouts/{data['id']}")
    _out(api, data, _show_rollout)


def _show_rollout(d: dict[str, Any]) -> None:
    rows = []
    for g in d["groups"]:
        c = g["counts"]
        rows.append(
            {
                "group": g["name"],
                "state": g["state"],
                "total": g["total"],
                "scheduled": c.get("scheduled", 0),
                "in flight": c.get("commanded", 0),
                "succeeded": c.get("succeeded", 0),
                "failed": c.get("failed", 0),
                "reason": g["reason"]
                + (
                    "  " + ", ".join(f"{k} x{v}" for k, v in g.get("errors", {}).items())
                    if g.get("errors")
                    else ""
                ),
            }
        )
    title = f"rollout {d['id']} {d['name']} ({d['release']}): {d['state']}"
    if d.get("reason"):
        title += f" - {d['reason']}"
    _table(
        rows,
        ["group", "state", "total", "scheduled", "in flight", "succeeded", "failed", "reason"],
        title,
    )


@rollout.command("list")
@_api_options
def rollout_list(url: str, token: str | None, as_json: bool) -> None:
    """Every rollout, newest first."""
    api = Api(url, token, as_json)
    _out(
        api,
        api.call("GET", "/rollouts"),
        lambda d: _table(d, ["id", "name", "release", "state", "reason"], "rollouts"),
    )


@rollout.command("status")
@click.argument("rollout_id", type=click.IntRange(1))
@click.option("--watch", is_flag=True, help="Live progress until the rollout ends.")
@click.option("--interval", default=2.0, show_default=True, type=click.FloatRange(0.2, 600))
@_api_options
def rollout_status(  # noqa: PLR0917 (click passes options positionally)
    rollout_id: int, watch: bool, interval: float, url: str, token: str | None, as_json: bool
) -> None:
    """Groups, counts, gates and the reason of the last automatic decision."""
    api = Api(url, token, as_json)
    if not watch or as_json:
        _out(api, api.call("GET", f"/rollouts/{rollout_id}"), _show_rollout)
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn  # noqa: PLC0415

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
    ) as progress:
        tasks: dict[int, Any] = {}
        for _ in range(10**6):
            d = api.call("GET", f"/rollouts/{rollout_id}")
            for g in d["groups"]:
                c = g["counts"]
                done = c.get("succeeded", 0) + c.get("failed", 0)
                info = f"{g['state']} failed={c.get('failed', 0)} {g['reason']}"
                if g["id"] not in tasks:
                    tasks[g["id"]] = progress.add_task(g["name"], total=g["total"] or 1, info=info)
                progress.update(tasks[g["id"]], completed=done if g["total"] else 1, info=info)
            if d["state"] in {"finished", "stopped", "paused"}:
                break
            time.sleep(interval)
    _show_rollout(d)


def _steer(verb: str) -> None:
    @rollout.command(verb)
    @click.argument("rollout_id", type=click.IntRange(1))
    @_api_options
    def cmd(rollout_id: int, url: str, token: str | None, as_json: bool) -> None:
        api = Api(url, token, as_json)
        _out(api, api.call("POST", f"/rollouts/{rollout_id}/{verb}"), _show_rollout)

    cmd.help = {
        "start": "Start a READY rollout.",
        "pause": "Pause: no new group, no new command.",
        "resume": "Resume a paused rollout, accepting the failures seen so far.",
        "abort": "Stop for good; devices in flight get a cancel.",
        "rollback": "Flip updated devices back to their previous slot (no download).",
    }[verb]


for _verb in ("start", "pause", "resume", "abort", "rollback"):
    _steer(_verb)


# ------------------------------------------------------------------ token


@click.group()
def token() -> None:
    """Issue API and enrollment tokens."""


@token.command("api")
@click.option("--name", required=True)
@click.option(
    "--role", type=click.Choice(["admin", "operator", "field-engineer", "viewer"]), required=True
)
@click.option("--site", "sites", multiple=True, help="Sites of a field engineer (repeatable).")
@_api_options
def token_api(  # noqa: PLR0917 (click passes options positionally)
    name: str, role: str, sites: tuple[str, ...], url: str, token: str | None, as_json: bool
) -> None:
    """Issue an API token (printed once)."""
    api = Api(url, token, as_json)
    data = api.call("POST", "/tokens", json={"name": name, "role": role, "sites": list(sites)})
    _out(api, data, lambda d: click.echo(d["token"]))


@token.command("enroll")
@click.option("--site", required=True)
@click.option("--model", "hardware_model", required=True)
@click.option(
    "--ttl", "ttl_seconds", default=3600, show_default=True, type=click.IntRange(60, 7 * 86400)
)
@click.option("--tag", "tags", multiple=True)
@_api_options
def token_enroll(  # noqa: PLR0917 (click passes options positionally)
    site: str,
    hardware_model: str,
    ttl_seconds: int,
    tags: tuple[str, ...],
    url: str,
    token: str | None,
    as_json: bool,
) -> None:
    """Issue a single-use enrollment token for one device."""
    api = Api(url, token, as_json)
    data = api.call(
        "POST",
        "/enrollment-tokens",
        json={
            "site": site,
            "hardware_model": hardware_model,
            "ttl_seconds": ttl_seconds,
            "tags": list(tags),
        },
    )
    _out(api, data, lambda d: click.echo(d["token"]))


@token.command("list")
@_api_options
def token_list(url: str, token: str | None, as_json: bool) -> None:
    """API tokens (no secrets)."""
    api = Api(url, token, as_json)
    _out(
        api,
        api.call("GET", "/tokens"),
        lambda d: _table(d, ["id", "name", "role", "sites", "revoked", "created_by"], "tokens"),
    )


@token.command("revoke")
@click.argument("token_id", type=click.IntRange(1))
@_api_options
def token_revoke(token_id: int, url: str, token: str | None, as_json: bool) -> None:
    """Revoke an API token."""
    api = Api(url, token, as_json)
    _out(
        api,
        api.call("DELETE", f"/tokens/{token_id}"),
        lambda d: click.echo(f"revoked {d['revoked']}"),
    )


# ------------------------------------------------------------------ site


@click.group()
def site() -> None:
    """Site time zones, maintenance windows and bandwidth."""


@site.command("put")
@click.argument("name")
@click.option("--tz", default="UTC", show_default=True)
@click.option(
    "--window",
    "windows",
    multiple=True,
    help="HH:MM-HH:MM[@days], days as 0-6 (Monday=0), e.g. 01:00-05:00@0,1,2,3,4.",
)
@click.option("--bandwidth-bps", default=None, type=click.IntRange(1))
@_api_options
def site_put(  # noqa: PLR0917 (click passes options positionally)
    name: str,
    tz: str,
    windows: tuple[str, ...],
    bandwidth_bps: int | None,
    url: str,
    token: str | None,
    as_json: bool,
) -> None:
    """Create or update a site."""
    api = Api(url, token, as_json)
    parsed = []
    for w in windows:
        span, _, days = w.partition("@")
        start, _, end = span.partition("-")
        item: dict[str, Any] = {"start": start, "end": end}
        if days:
            try:
                item["days"] = [int(x) for x in days.split(",")]
            except ValueError:
                api.fail("controller.invalid_input", f"bad days in window {w!r}")
        parsed.append(item)
    data = api.call(
        "PUT",
        f"/sites/{_seg(name)}",
        json={"tz": tz, "windows": parsed, "bandwidth_bps": bandwidth_bps},
    )
    _out(api, data, lambda d: _table([d], ["name", "tz", "windows", "bandwidth_bps"], "site"))


@site.command("list")
@_api_options
def site_list(url: str, token: str | None, as_json: bool) -> None:
    """Every site."""
    api = Api(url, token, as_json)
    _out(
        api,
        api.call("GET", "/sites"),
        lambda d: _table(d, ["name", "tz", "windows", "bandwidth_bps"], "sites"),
    )
