"""``agent.toml``: parsed into frozen values, every key checked (unknown keys are errors).

The commented sample is ``packaging/agent/agent.toml``. Sections: ``[device]``, ``[trust]``,
``[slots]``, ``[bootenv]``, ``[journal]``, ``[update]``, ``[selftest]`` (+ ``[[selftest.check]]``),
``[migrations]``, ``[mqtt]``, ``[health]`` (+ ``[[health.metric]]``; no section: no health
sampling at all).

    cfg = load_config(Path("/etc/slotline/agent.toml"))
    agent = build_agent(cfg, transport=None)   # agent/cli.py does this
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.errors import ConfigInvalid
from agent.selftest import Check

_SECTIONS = {
    "device": {"id", "hardware", "factory_version", "factory_size", "component"},
    "trust": {"root"},
    "slots": {"kind", "a", "b", "size", "booted"},
    "bootenv": {"kind", "config", "default_env", "path"},
    "journal": {"path"},
    "update": {"checkpoint_mib", "fetch_window", "retry_cap", "decode_ahead_mib"},
    "selftest": {"deadline", "check"},
    "migrations": {"migrate", "undo", "timeout"},
    "mqtt": {"url", "ca", "cert", "key", "keepalive"},
    "health": {"interval", "errors", "metric"},
}
_METRIC_KEYS = {"name", "kind", "checks", "argv", "timeout"}
METRIC_KINDS = ("checks", "latency", "command")


@dataclass(frozen=True)
class MetricConfig:
    """One ``[[health.metric]]``: ``checks`` (failed count), ``latency`` (ms) or ``command``."""

    name: str
    kind: str
    checks: tuple[str, ...] = ()  # names (or labels) of [[selftest.check]] entries
    argv: tuple[str, ...] = ()
    timeout: float = 10.0


@dataclass(frozen=True)
class HealthConfig:
    """``[health]``: sampling interval (s; 0 = only at commit), the ``errors`` metric, metrics."""

    interval: float = 60.0
    errors: bool = True
    metrics: tuple[MetricConfig, ...] = ()


@dataclass(frozen=True)
class Config:
    """The whole agent configuration."""

    device_id: str
    hardware: str
    factory_version: str
    factory_size: int | None
    trust_root: str
    slots_kind: str
    slot_a: str
    slot_b: str
    slot_size: int | None
    booted: str  # "cmdline" | "env" | "a" | "b"
    bootenv_kind: str  # "uboot" | "grub" | "file"
    bootenv_config: str | None
    bootenv_default: str | None
    bootenv_path: str | None
    journal: str
    checkpoint_bytes: int
    fetch_window: int
    retry_cap: float
    selftest_deadline: float
    checks: tuple[Check, ...]
    migrate: tuple[str, ...]
    undo: tuple[str, ...]
    migration_timeout: float
    mqtt: Mapping[str, Any] = field(default_factory=dict)
    source: str = ""
    component: str = "rootfs"
    health: HealthConfig | None = None
    decode_ahead_bytes: int = 0  # offline installs: chunks decoded ahead (0 = one at a time)


def _get(
    section: Mapping[str, Any],
    key: str,
    kind: type | tuple[type, ...],
    default: Any = None,
    *,
    required: bool = False,
    where: str = "",
) -> Any:
    if key not in section:
        if required:
            raise ConfigInvalid(f"[{where}] {key} is required")
        return default
    value = section[key]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise ConfigInvalid(f"[{where}] {key} has the wrong type")
    return value


def _argv(value: Any, what: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(a, str) for a in value):
        raise ConfigInvalid(f"{what} must be a list of strings")
    return tuple(value)


def _metric(d: Any, checks: tuple[Check, ...]) -> MetricConfig:
    from agent.health import check_name  # noqa: PLC0415

    if not isinstance(d, Mapping):
        raise ConfigInvalid("[[health.metric]] entries must be tables")
    extra = set(d) - _METRIC_KEYS
    if extra:
        raise ConfigInvalid(f"unknown keys in [[health.metric]]: {sorted(extra)}")
    name = _get(d, "name", str, required=True, where="health.metric")
    try:
        check_name(name)
    except ValueError as e:
        raise ConfigInvalid(f"[[health.metric]] {e}") from e
    kind = _get(d, "kind", str, required=True, where="health.metric")
    if kind not in METRIC_KINDS:
        raise ConfigInvalid(f"[[health.metric]] {name}: kind is one of {', '.join(METRIC_KINDS)}")
    timeout = float(_get(d, "timeout", (int, float), 10, where="health.metric"))
    if timeout <= 0:
        raise ConfigInvalid(f"[[health.metric]] {name}: timeout must be positive")
    m = MetricConfig(
        name=name,
        kind=kind,
        checks=_argv(d.get("checks"), f"[[health.metric]] {name}: checks"),
        argv=_argv(d.get("argv"), f"[[health.metric]] {name}: argv"),
        timeout=timeout,
    )
    if kind == "command" and not m.argv:
        raise ConfigInvalid(f"[[health.metric]] {name}: a command metric needs argv")
    if kind in ("checks", "latency"):
        if not m.checks:
            raise ConfigInvalid(f"[[health.metric]] {name}: name the self-test checks to re-run")
        known = {c.name for c in checks} | {c.label for c in checks}
        unknown = [c for c in m.checks if c not in known]
        if unknown:
            raise ConfigInvalid(f"[[health.metric]] {name}: no self-test check named {unknown}")
    return m


def _health(section: Mapping[str, Any] | None, checks: tuple[Check, ...]) -> HealthConfig | None:
    if section is None:
        return None
    interval = float(_get(section, "interval", (int, float), 60, where="health"))
    if interval != 0 and not 1 <= interval <= 86400:
        raise ConfigInvalid("[health] interval is 0 (sample only at commit) or 1..86400 s")
    metrics = section.get("metric", [])
    if not isinstance(metrics, list):
        raise ConfigInvalid("[[health.metric]] must be an array of tables")
    parsed = tuple(_metric(m, checks) for m in metrics)
    names = [m.name for m in parsed]
    if len(set(names)) != len(names):
        raise ConfigInvalid("[[health.metric]] names must be unique")
    return HealthConfig(
        interval=interval,
        errors=_get(section, "errors", bool, default=True, where="health"),
        metrics=parsed,
    )


def parse_config(doc: Mapping[str, Any], *, source: str = "") -> Config:
    """Check and convert a parsed TOML document.

    Raises:
        ConfigInvalid: unknown sections/keys, wrong types, missing required keys.
    """
    for name, section in doc.items():
        if name not in _SECTIONS:
            raise ConfigInvalid(f"unknown section [{name}]")
        if not isinstance(section, Mapping):
            raise ConfigInvalid(f"[{name}] must be a table")
        extra = set(section) - _SECTIONS[name]
        if extra:
            raise ConfigInvalid(f"unknown keys in [{name}]: {sorted(extra)}")
    dev = doc.get("device", {})
    slots = doc.get("slots", {})
    env = doc.get("bootenv", {})
    upd = doc.get("update", {})
    st = doc.get("selftest", {})
    mig = doc.get("migrations", {})
    slots_kind = _get(slots, "kind", str, "block", where="slots")
    if slots_kind not in ("block", "file"):
        raise ConfigInvalid("[slots] kind is block or file")
    size = _get(slots, "size", int, None, where="slots")
    if slots_kind == "file" and not size:
        raise ConfigInvalid("[slots] size is required for file slots")
    booted = _get(slots, "booted", str, "cmdline", where="slots")
    if booted not in ("cmdline", "env", "a", "b"):
        raise ConfigInvalid("[slots] booted is cmdline, env, a or b")
    env_kind = _get(env, "kind", str, "uboot", where="bootenv")
    if env_kind not in ("uboot", "grub", "file"):
        raise ConfigInvalid("[bootenv] kind is uboot, grub or file")
    if env_kind == "uboot" and "config" not in env:
        raise ConfigInvalid("[bootenv] config (fw_env.config) is required for uboot")
    if env_kind in ("grub", "file") and "path" not in env:
        raise ConfigInvalid(f"[bootenv] path is required for {env_kind}")
    checks = st.get("check", [])
    if not isinstance(checks, list):
        raise ConfigInvalid("[[selftest.check]] must be an array of tables")
    parsed_checks = tuple(Check.from_mapping(c) for c in checks)
    return Config(
        device_id=_get(dev, "id", str, required=True, where="device"),
        hardware=_get(dev, "hardware", str, "generic", where="device"),
        factory_version=_get(dev, "factory_version", str, "0", where="device"),
        factory_size=_get(dev, "factory_size", int, None, where="device"),
        trust_root=_get(doc.get("trust", {}), "root", str, required=True, where="trust"),
        slots_kind=slots_kind,
        slot_a=_get(slots, "a", str, required=True, where="slots"),
        slot_b=_get(slots, "b", str, required=True, where="slots"),
        slot_size=size,
        booted=booted,
        bootenv_kind=env_kind,
        bootenv_config=_get(env, "config", str, None, where="bootenv"),
        bootenv_default=_get(env, "default_env", str, None, where="bootenv"),
        bootenv_path=_get(env, "path", str, None, where="bootenv"),
        journal=_get(
            doc.get("journal", {}), "path", str, "/var/lib/slotline/journal.json", where="journal"
        ),
        checkpoint_bytes=int(_get(upd, "checkpoint_mib", int, 8, where="update")) << 20,
        fetch_window=_get(upd, "fetch_window", int, 4, where="update"),
        retry_cap=float(_get(upd, "retry_cap", (int, float), 60, where="update")),
        selftest_deadline=float(_get(st, "deadline", (int, float), 120, where="selftest")),
        checks=parsed_checks,
        migrate=_argv(mig.get("migrate"), "[migrations] migrate"),
        undo=_argv(mig.get("undo"), "[migrations] undo"),
        migration_timeout=float(_get(mig, "timeout", (int, float), 300, where="migrations")),
        mqtt=dict(doc.get("mqtt", {})),
        source=source,
        component=_get(dev, "component", str, "rootfs", where="device"),
        health=_health(doc.get("health"), parsed_checks),
        decode_ahead_bytes=_decode_ahead(upd),
    )


def _decode_ahead(upd: Mapping[str, Any]) -> int:
    mib = _get(upd, "decode_ahead_mib", int, 0, where="update")
    if not 0 <= mib <= 256:  # a sanity bound, far above any device's spare RAM
        raise ConfigInvalid("[update] decode_ahead_mib must be between 0 and 256")
    return int(mib) << 20


def load_config(path: Path) -> Config:
    """Read and check ``agent.toml``."""
    try:
        doc = tomllib.loads(Path(path).read_text())
    except OSError as e:
        raise ConfigInvalid(f"cannot read {path}: {e.strerror or e}") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigInvalid(f"{path}: {e}") from e
    return parse_config(doc, source=str(path))
