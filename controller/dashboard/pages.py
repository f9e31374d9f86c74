"""The dashboard's pages: read-model values in, escaped HTML out. Pure: no I/O, no database.

Rules: every value reaches the page through ``html.el``/``html.text`` (escaped); CSS classes are
chosen from fixed sets, never built from data; links are built with ``html.url``. Pages carry no
script at all (auto-refresh is a ``<meta http-equiv="refresh">``), so the content security
policy can forbid scripts outright.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from controller.dashboard.html import Markup, el, join, raw_const, text, url
from controller.dashboard.queries import (
    DeviceDetail,
    DeviceFilter,
    DevicePage,
    Overview,
    ReleaseRow,
    RolloutDetail,
    RolloutRow,
)

BASE = "/dashboard"
CSS = f"{BASE}/static/dashboard.css"
REFRESH_SECONDS = 5

# Known state words get a colour; anything else (e.g. device-reported phases) gets none.
_GOOD = {"finished", "succeeded", "online", "committed", "active", "idle", "met"}
_BUSY = {"running", "commanded", "creating", "ready", "updating", "cancel_sent", "rollback_sent"}
_BAD = {
    "error",
    "failed",
    "stopped",
    "offline",
    "reverted",
    "rejected",
    "decommissioned",
    "not met",
}
_WARN = {"paused", "scheduled", "cancelled", "rolled_back", "pending"}


@dataclass(frozen=True)
class Ctx:
    """Who is looking, when, and how the page refreshes."""

    user: str
    role: str
    now: float
    path: str  # path and query of this page (for the refresh toggle)
    refresh: bool = True


def badge(state: str) -> Markup:
    """A state word in a coloured pill (colour from fixed sets only)."""
    cls = (
        "good"
        if state in _GOOD
        else "busy"
        if state in _BUSY
        else "bad"
        if state in _BAD
        else "warn"
        if state in _WARN
        else "plain"
    )
    return el("span", {"class": f"badge {cls}"}, state or "-")


def ts(value: float | dt.datetime | None, now: float | None = None) -> Markup:
    """UTC time, with "N s/min/h ago" when ``now`` is given."""
    if value is None:
        return text("-")
    t = value.timestamp() if isinstance(value, dt.datetime) else float(value)
    stamp = dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")
    if now is None:
        return el("time", {}, stamp)
    return el("time", {"title": stamp}, _ago(now - t))


def _ago(seconds: float) -> str:
    s = int(seconds)
    if s < 0:
        return "in the future"
    if s < 120:
        return f"{s} s ago"
    if s < 7200:
        return f"{s // 60} min ago"
    if s < 172800:
        return f"{s // 3600} h ago"
    return f"{s // 86400} d ago"


def table(head: Sequence[str], rows: Iterable[Sequence[object]], empty: str = "none") -> Markup:
    """A table; cells are escaped unless they are ``Markup``."""
    body = [el("tr", {}, [el("td", {}, c) for c in r]) for r in rows]
    if not body:
        body = [el("tr", {}, el("td", {"colspan": len(head), "class": "empty"}, empty))]
    return el(
        "table",
        {},
        el("thead", {}, el("tr", {}, [el("th", {}, h) for h in head])),
        el("tbody", {}, body),
    )


def _bar(counts: Mapping[str, int], total: int) -> Markup:
    """A stacked bar of succeeded / failed / in flight / waiting."""
    parts = [
        ("succeeded", counts.get("succeeded", 0)),
        ("failed", counts.get("failed", 0)),
        (
            "in-flight",
            sum(counts.get(x, 0) for x in ("commanded", "cancel_sent", "rollback_sent")),
        ),
    ]
    segs = [
        # Width classes .w0-.w100 (web.stylesheet): the CSP forbids inline styles.
        el("span", {"class": f"seg {cls} w{max(1, round(100 * n / total))}"})
        for cls, n in parts
        if total and n
    ]
    return el("span", {"class": "bar", "title": _count_line(counts)}, segs)


def _count_line(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "no devices"


def layout(ctx: Ctx, title: str, active: str, *body: object) -> Markup:
    """The page frame: head, navigation, user, refresh control."""
    nav = [
        el("a", {"href": href, "class": "on" if key == active else None}, label)
        for key, href, label in (
            ("overview", f"{BASE}/", "Overview"),
            ("rollouts", f"{BASE}/rollouts", "Rollouts"),
            ("devices", f"{BASE}/devices", "Devices"),
            ("releases", f"{BASE}/releases", "Releases"),
        )
    ]
    toggle_path = _with_refresh(ctx.path, on=not ctx.refresh)
    head = [
        el("meta", {"charset": "utf-8"}),
        el("meta", {"name": "viewport", "content": "width=device-width, initial-scale=1"}),
        el("title", {}, f"{title} · slotline"),
        el("link", {"rel": "stylesheet", "href": CSS}),
    ]
    if ctx.refresh:
        head.append(el("meta", {"http-equiv": "refresh", "content": str(REFRESH_SECONDS)}))
    header = el(
        "header",
        {},
        el("span", {"class": "brand"}, "slotline"),
        el("nav", {}, nav),
        el(
            "span",
            {"class": "who"},
            el("span", {}, ctx.user, " ", el("small", {}, f"({ctx.role})")),
            el(
                "form",
                {"method": "post", "action": f"{BASE}/logout"},
                el("button", {"type": "submit"}, "Log out"),
            ),
        ),
    )
    footer = el(
        "footer",
        {},
        ts(ctx.now),
        " · ",
        (
            join(
                [
                    f"refreshes every {REFRESH_SECONDS} s · ",
                    el("a", {"href": toggle_path}, "pause"),
                ]
            )
            if ctx.refresh
            else join(["auto-refresh paused · ", el("a", {"href": toggle_path}, "resume")])
        ),
    )
    return document(head, [header, el("main", {}, el("h1", {}, title), body), footer])


def document(head: object, body: object) -> Markup:
    """A whole HTML document."""
    return join(
        [
            raw_const("<!doctype html>\n"),
            el("html", {"lang": "en"}, el("head", {}, head), el("body", {}, body)),
        ]
    )


def _with_refresh(path: str, *, on: bool) -> str:
    base, _, query = path.partition("?")
    from urllib.parse import parse_qsl, urlencode  # noqa: PLC0415

    q = [(k, v) for k, v in parse_qsl(query) if k != "refresh"]
    if not on:
        q.append(("refresh", "0"))
    return f"{base}?{urlencode(q)}" if q else base


# ---------------------------------------------------------------------- login, errors


def login_page(message: str = "", next_path: str = f"{BASE}/") -> Markup:
    """The login form: an API token (viewer, operator or admin)."""
    head = [
        el("meta", {"charset": "utf-8"}),
        el("meta", {"name": "viewport", "content": "width=device-width, initial-scale=1"}),
        el("title", {}, "Log in · slotline"),
        el("link", {"rel": "stylesheet", "href": CSS}),
    ]
    form = el(
        "form",
        {"method": "post", "action": f"{BASE}/login", "class": "login"},
        el("h1", {}, "slotline dashboard"),
        el("p", {"class": "error"}, message) if message else "",
        el("label", {"for": "token"}, "API token (viewer, operator or admin)"),
        el(
            "input",
            {
                "id": "token",
                "name": "token",
                "type": "password",
                "autocomplete": "off",
                "required": True,
                "autofocus": True,
                "placeholder": "slt_...",
            },
        ),
        el("input", {"type": "hidden", "name": "next", "value": next_path}),
        el("button", {"type": "submit"}, "Log in"),
        el(
            "p",
            {"class": "hint"},
            "Make one with ",
            el("code", {}, "slotline token api --name NAME --role viewer"),
            "; the first admin token is in ",
            el("code", {}, "<data-dir>/admin.token"),
            ".",
        ),
    )
    return document(head, el("main", {"class": "narrow"}, form))


def error_page(ctx: Ctx | None, status: int, message: str) -> Markup:
    """An error inside the frame (or bare, when nobody is logged in)."""
    body = [
        el("p", {"class": "error"}, message),
        el("p", {}, el("a", {"href": f"{BASE}/"}, "Overview")),
    ]
    if ctx is None:
        return document(el("title", {}, f"{status} · slotline"), el("main", {}, body))
    return layout(ctx, f"{status}", "", body)


# ---------------------------------------------------------------------- overview


def overview_page(ctx: Ctx, ov: Overview) -> Markup:
    """Fleet counts and open rollouts."""
    dev = f"{BASE}/devices"
    cards = el(
        "section",
        {"class": "cards"},
        el(
            "a",
            {"class": "card", "href": dev},
            el("b", {}, ov.devices),
            el("span", {}, "active devices"),
        ),
        [
            el(
                "a",
                {"class": f"card {state.value}", "href": url(dev, state=state.value)},
                el("b", {}, n),
                el("span", {}, state.value),
            )
            for state, n in ov.by_state
        ],
    )

    def counted(title: str, rows: Iterable[tuple[str, int]], key: str | None) -> Markup:
        body = [(el("a", {"href": url(dev, **{key: k})}, k) if key else k, n) for k, n in rows]
        return el(
            "section",
            {"class": "panel"},
            el("h2", {}, title),
            table([title.rsplit(maxsplit=1)[-1], "devices"], body),
        )

    images = el(
        "section",
        {"class": "panel"},
        el("h2", {}, "By version"),
        table(
            ["version (running image)", "devices"],
            [
                (el("a", {"href": url(dev, image=img.filter_value)}, img.label), n)
                for img, n in ov.by_image
            ],
        ),
    )
    grid = el(
        "div",
        {"class": "grid"},
        counted("By site", ov.by_site, "site"),
        counted("By hardware model", ov.by_model, "model"),
        images,
        counted("By agent phase", ov.by_phase, None),
    )
    rollouts = el(
        "section",
        {"class": "panel wide"},
        el("h2", {}, "Open rollouts"),
        rollout_table(ov.open_rollouts, ctx.now, empty="no rollout is open"),
    )
    return layout(ctx, "Fleet overview", "overview", cards, rollouts, grid)


# ---------------------------------------------------------------------- rollouts


def rollout_table(rows: Iterable[RolloutRow], now: float, empty: str = "no rollouts") -> Markup:
    """Rollouts with state, progress and reason."""
    return table(
        [
            "id",
            "name",
            "release",
            "state",
            "progress",
            "succeeded",
            "failed",
            "in flight",
            "reason",
            "created",
        ],
        [
            (
                el("a", {"href": f"{BASE}/rollouts/{r.id}"}, f"#{r.id}"),
                el("a", {"href": f"{BASE}/rollouts/{r.id}"}, r.name),
                r.release_label,
                badge(r.state),
                _bar(r.counts, r.total),
                r.counts.get("succeeded", 0),
                r.counts.get("failed", 0),
                sum(r.counts.get(x, 0) for x in ("commanded", "cancel_sent", "rollback_sent")),
                el("span", {"class": "reason"}, r.reason),
                ts(r.created_at, now),
            )
            for r in rows
        ],
        empty,
    )


def rollouts_page(ctx: Ctx, rows: Sequence[RolloutRow]) -> Markup:
    """Every rollout, newest first."""
    return layout(ctx, "Rollouts", "rollouts", rollout_table(rows, ctx.now))


def _detail_value(v: Any, items: int = 5) -> str:
    if isinstance(v, list) and len(v) > items:
        shown = ", ".join(_detail_value(x) for x in v[:items])
        return f"[{shown}, ... {len(v)} in all]"
    return v if isinstance(v, str) else json.dumps(v, sort_keys=True, default=str)


def rollout_page(ctx: Ctx, r: RolloutDetail) -> Markup:
    """One rollout: summary, groups with gates, devices to watch, decision log."""
    st = r.status
    target = st.get("target") or {}
    facts = el(
        "dl",
        {"class": "facts"},
        [
            (el("dt", {}, k), el("dd", {}, v))
            for k, v in (
                ("state", badge(st["state"])),
                ("reason", el("span", {"class": "reason"}, st.get("reason") or "-")),
                ("release", join([r.release_label, " ", el("code", {}, st["release"])])),
                ("max in flight", st.get("max_in_flight")),
                ("per site", st.get("max_in_flight_per_site") or "-"),
                ("after rollout", st.get("after_rollout") or "-"),
                (
                    "target",
                    ", ".join(
                        f"{k}: {_detail_value(v)}"
                        for k, v in sorted(target.items())
                        if v not in (None, [], "")
                    )
                    or "all compatible devices",
                ),
            )
        ],
    )
    groups = [group_section(ctx, g) for g in r.groups]
    watch_head = ["device", "site", "state", "phase", "progress", "error", "updated"]

    def watch(rows: Iterable[Any]) -> list[tuple[object, ...]]:
        return [
            (
                el("a", {"href": f"{BASE}/devices/{x.device_id}"}, x.device_id),
                x.site,
                badge(x.state),
                x.phase or "-",
                f"{x.progress}%",
                el("code", {}, x.error) if x.error else "-",
                ts(x.updated_at, ctx.now),
            )
            for x in rows
        ]

    log = table(
        ["at", "actor", "decision", "detail"],
        [
            (
                ts(d.at),
                d.actor,
                el("b", {}, d.action),
                el(
                    "span",
                    {"class": "detail"},
                    "; ".join(f"{k}: {_detail_value(v)}" for k, v in sorted(d.detail.items())),
                ),
            )
            for d in r.decisions
        ],
        "no decisions yet",
    )
    return layout(
        ctx,
        f"Rollout #{st['id']} {st['name']}",
        "rollouts",
        el("section", {"class": "panel wide"}, facts),
        el("h2", {}, "Groups"),
        groups,
        el(
            "div",
            {"class": "grid two"},
            el(
                "section",
                {"class": "panel"},
                el("h2", {}, f"Failed devices (newest {len(r.failed)})"),
                table(watch_head, watch(r.failed), "no failures"),
            ),
            el(
                "section",
                {"class": "panel"},
                el("h2", {}, f"In flight (newest {len(r.in_flight)})"),
                table(watch_head, watch(r.in_flight), "nothing in flight"),
            ),
        ),
        el("section", {"class": "panel wide"}, el("h2", {}, "Decision log (newest first)"), log),
    )


def group_section(ctx: Ctx, g: Any) -> Markup:
    """One rollout group: counts, gate conditions, error codes, reason."""
    doc = g.doc
    counts: Mapping[str, int] = doc.get("counts") or {}
    in_flight = sum(counts.get(x, 0) for x in ("commanded", "cancel_sent", "rollback_sent"))
    checks = table(
        ["gate condition", "now", "needs", ""],
        [
            (
                c.name,
                c.value,
                c.limit,
                badge("met" if c.ok else "pending" if c.ok is None else "not met"),
            )
            for c in g.checks
        ],
    )
    gate = doc.get("gate") or {}
    errors = doc.get("errors") or {}
    times = join(
        [
            "started ",
            ts(g.started_at, ctx.now) if g.started_at else "-",
            " · finished ",
            ts(g.finished_at, ctx.now) if g.finished_at else "-",
            f" · on failure: {gate.get('error_action', 'pause')}",
        ]
    )
    return el(
        "section",
        {"class": "panel group"},
        el(
            "h3",
            {},
            f"{doc['index']}. {doc['name']} ",
            badge(doc["state"]),
            el("small", {}, f" {doc['total']} devices"),
        ),
        el("p", {"class": "reason"}, doc["reason"]) if doc.get("reason") else "",
        el(
            "div",
            {"class": "counts"},
            _bar(counts, int(doc["total"])),
            el(
                "span",
                {},
                f"succeeded {counts.get('succeeded', 0)} · failed {counts.get('failed', 0)} · "
                f"in flight {in_flight} · waiting {counts.get('scheduled', 0)}"
                + (f" · cancelled {counts.get('cancelled', 0)}" if counts.get("cancelled") else "")
                + (
                    f" · rolled back {counts.get('rolled_back', 0)}"
                    if counts.get("rolled_back")
                    else ""
                ),
            ),
        ),
        el("p", {"class": "muted"}, times),
        checks,
        (
            table(["error code", "devices"], sorted(errors.items(), key=lambda x: -x[1]))
            if errors
            else ""
        ),
    )


# ---------------------------------------------------------------------- devices


def _select(
    name: str, label: str, options: Sequence[tuple[str, str]], current: str | None
) -> Markup:
    return el(
        "label",
        {},
        label,
        el(
            "select",
            {"name": name},
            el("option", {"value": ""}, "any"),
            [el("option", {"value": v, "selected": v == current}, shown) for v, shown in options],
        ),
    )


def devices_page(
    ctx: Ctx,
    f: DeviceFilter,
    page: DevicePage,
    choices: Mapping[str, Sequence[tuple[str, str]]],
) -> Markup:
    """The filtered, paged device list."""
    current = {
        "site": f.site,
        "model": f.model,
        "state": f.state.value if f.state else None,
        "image": f.image,
    }
    form = el(
        "form",
        {"method": "get", "action": f"{BASE}/devices", "class": "filters"},
        _select("site", "site", choices["site"], f.site),
        _select("model", "model", choices["model"], f.model),
        _select("state", "state", choices["state"], current["state"]),
        _select("image", "version", choices["image"], f.image),
        el("button", {"type": "submit"}, "Filter"),
        el("a", {"href": f"{BASE}/devices"}, "clear"),
    )
    rows = [
        (
            el("a", {"href": f"{BASE}/devices/{d.id}"}, d.id),
            d.site,
            d.model,
            badge(
                "decommissioned" if d.status != "active" else "online" if d.online else "offline"
            ),
            d.image.label,
            d.phase or "-",
            (
                join(
                    [
                        el(
                            "a",
                            {"href": f"{BASE}/rollouts/{d.last.rollout_id}"},
                            f"#{d.last.rollout_id}",
                        ),
                        " ",
                        badge(d.last.state),
                        " ",
                        el("code", {}, d.last.error) if d.last.error else "",
                    ]
                )
                if d.last
                else "-"
            ),
            ts(d.last_seen, ctx.now),
        )
        for d in page.rows
    ]

    def link(n: int, label: str) -> Markup:
        return el("a", {"href": url(f"{BASE}/devices", page=n, **current)}, label)

    pager = el(
        "p",
        {"class": "pager"},
        link(page.page - 1, "« previous") if page.page > 1 else "",
        f" page {page.page} of {page.pages} · {page.total} devices ",
        link(page.page + 1, "next »") if page.page < page.pages else "",
    )
    return layout(
        ctx,
        "Devices",
        "devices",
        form,
        pager,
        table(
            [
                "device",
                "site",
                "model",
                "connectivity",
                "version",
                "phase",
                "last rollout",
                "last seen",
            ],
            rows,
            "no device matches",
        ),
        pager,
    )


def device_page(ctx: Ctx, d: DeviceDetail) -> Markup:
    """One device: identity, slots and versions, last result, rollouts, history."""
    doc = d.doc
    state: Mapping[str, Any] = doc.get("state") or {}
    facts = el(
        "dl",
        {"class": "facts"},
        [
            (el("dt", {}, k), el("dd", {}, v))
            for k, v in (
                ("site", el("a", {"href": url(f"{BASE}/devices", site=doc["site"])}, doc["site"])),
                ("hardware model", doc["hardware_model"]),
                ("serial", doc["serial"]),
                ("tags", ", ".join(str(t) for t in doc.get("tags") or []) or "-"),
                ("status", badge(doc["status"])),
                ("connectivity", badge("online" if doc.get("online") else "offline")),
                ("last seen", ts(_parse(doc.get("last_seen")), ctx.now)),
                ("enrolled", ts(_parse(doc.get("enrolled_at")))),
                ("command counter", doc.get("command_counter", 0)),
            )
        ],
    )
    last = d.last_result
    result = (
        el(
            "p",
            {},
            badge(last.state),
            " in ",
            el(
                "a",
                {"href": f"{BASE}/rollouts/{last.rollout_id}"},
                f"rollout #{last.rollout_id} {last.rollout_name}",
            ),
            " · ",
            ts(last.updated_at, ctx.now),
            join([" · error code ", el("code", {"class": "bad"}, last.error)])
            if last.error
            else "",
        )
        if last
        else el("p", {"class": "muted"}, "no finished update yet")
    )
    slots = el(
        "dl",
        {"class": "facts"},
        [
            (el("dt", {}, k), el("dd", {}, v))
            for k, v in (
                ("running version", d.image.label),
                ("active image", el("code", {}, doc.get("active_digest") or "-")),
                ("primary slot", state.get("primary", "-")),
                ("booted slot", state.get("active", "-")),
                ("agent phase", state.get("phase", "-")),
                ("security version", state.get("security_version", "-")),
            )
        ],
    )
    versions = table(
        ["component", "version"],
        sorted((str(k), str(v)) for k, v in (doc.get("versions") or {}).items()),
        "no component versions reported",
    )
    health = table(
        ["metric", "value"],
        sorted((str(k), v) for k, v in (doc.get("health") or {}).items()),
        "no health reported",
    )
    rollouts = table(
        ["rollout", "state", "phase", "progress", "error", "updated"],
        [
            (
                el(
                    "a",
                    {"href": f"{BASE}/rollouts/{r.rollout_id}"},
                    f"#{r.rollout_id} {r.rollout_name}",
                ),
                badge(r.state),
                r.phase or "-",
                f"{r.progress}%",
                el("code", {}, r.error) if r.error else "-",
                ts(r.updated_at, ctx.now),
            )
            for r in d.rollouts
        ],
        "in no rollout",
    )
    timeline = table(
        ["at", "what", "", "rollout"],
        [
            (
                ts(e.at),
                e.kind,
                e.text,
                el("a", {"href": f"{BASE}/rollouts/{e.rollout_id}"}, f"#{e.rollout_id}")
                if e.rollout_id
                else "-",
            )
            for e in d.timeline
        ],
        "nothing recorded",
    )
    return layout(
        ctx,
        f"Device {doc['id']}",
        "devices",
        el(
            "div",
            {"class": "grid two"},
            el("section", {"class": "panel"}, el("h2", {}, "Identity"), facts),
            el(
                "section",
                {"class": "panel"},
                el("h2", {}, "Last result"),
                result,
                el("h2", {}, "Slots and versions"),
                slots,
                versions,
                el("h2", {}, "Health"),
                health,
            ),
        ),
        el("section", {"class": "panel wide"}, el("h2", {}, "Rollouts"), rollouts),
        el(
            "section",
            {"class": "panel wide"},
            el("h2", {}, "Recent events"),
            el(
                "p",
                {"class": "muted"},
                "Commands sent, the device's rollout rows as its reports moved them, and audit "
                "entries; newest first.",
            ),
            timeline,
        ),
    )


def _parse(value: Any) -> dt.datetime | None:
    return dt.datetime.fromisoformat(value) if isinstance(value, str) else None


# ---------------------------------------------------------------------- releases


def releases_page(ctx: Ctx, rows: Sequence[ReleaseRow]) -> Markup:
    """Every release, newest first."""
    body = [
        (
            el("code", {}, r.doc["bundle_id"]),
            r.doc["component"],
            r.doc["version"],
            r.doc["security_version"],
            ", ".join(r.doc.get("hardware_models") or []),
            el("a", {"href": url(f"{BASE}/devices", image=r.doc["target_sha256"])}, r.running),
            r.rollouts,
            el("code", {"title": r.doc["target_sha256"]}, r.doc["target_sha256"][:12]),
            _size(int(r.doc["target_size"])),
            ", ".join(f"{k} {v}" for k, v in sorted((r.doc.get("requires") or {}).items())) or "-",
            el("span", {"class": "notes"}, r.doc.get("notes") or ""),
        )
        for r in rows
    ]
    return layout(
        ctx,
        "Releases",
        "releases",
        table(
            [
                "bundle",
                "component",
                "version",
                "security",
                "models",
                "devices running",
                "rollouts",
                "target",
                "size",
                "requires",
                "notes",
            ],
            body,
            "no releases uploaded",
        ),
    )


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)
