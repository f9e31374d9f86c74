"""``slotline agent``: run the daemon, install a .slb offline, show status.

    slotline agent run --config /etc/slotline/agent.toml
    slotline agent install /media/usb/update.slb --config /etc/slotline/agent.toml [--reboot]
    slotline agent status [--json]

``run`` and ``install`` hold an exclusive lock next to the journal, so an offline install never
races the daemon. Exit codes: 0 done, 1 refused/failed (the error code is printed), 2 usage.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

DEFAULT_CONFIG = "/etc/slotline/agent.toml"
REBOOT_GRACE = 300.0  # seconds `agent run` waits for the requested reboot to take it down


class _SystemClock:
    def now(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()


class _SystemPower:
    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.requested = False

    async def reboot(self) -> None:
        self.requested = True
        if self.enabled:
            proc = await asyncio.create_subprocess_exec("systemctl", "reboot")
            await proc.wait()


def _tune_malloc() -> None:
    """Keep RSS flat while streaming multi-MiB chunks (glibc only; a no-op elsewhere).

    glibc raises its mmap threshold each time a large block is freed, after which 4 MiB chunk
    buffers come from the heap and fragment it (measured: +50 MiB RSS applying an image). A fixed
    threshold and two arenas keep the peak near the working set.
    """
    try:
        import ctypes  # noqa: PLC0415

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD (fixing it disables the dynamic raise)
        libc.mallopt(-8, 2)  # M_ARENA_MAX
    except (OSError, AttributeError):
        pass


def _trim() -> None:
    """Return memory freed by start-up (imports, verification) to the OS before streaming."""
    import gc  # noqa: PLC0415

    gc.collect()
    try:
        import ctypes  # noqa: PLC0415

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


@contextlib.contextmanager
def _locked(journal: str) -> Iterator[None]:
    path = Path(journal).with_name(Path(journal).name + ".lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise click.ClickException(
                f"another agent holds {path} (is `slotline agent run` running? stop it first)"
            ) from None
        yield
    finally:
        os.close(fd)


def _load(config: str) -> Any:
    from agent.config import load_config  # noqa: PLC0415
    from agent.errors import ConfigInvalid  # noqa: PLC0415

    try:
        return load_config(Path(config))
    except ConfigInvalid as e:
        raise click.ClickException(f"{e.code}: {e}") from e


def _bootenv(cfg: Any) -> Any:
    from agent.adapters.bootenv import FwEnv, GrubEnv, RedundantEnv  # noqa: PLC0415

    if cfg.bootenv_kind == "uboot":
        return FwEnv(cfg.bootenv_config, default_env=cfg.bootenv_default)
    if cfg.bootenv_kind == "grub":
        return GrubEnv(cfg.bootenv_path)
    return RedundantEnv(cfg.bootenv_path)


def _booted(cfg: Any, env: Any) -> Any:
    from agent.adapters.bootenv import env_view  # noqa: PLC0415
    from agent.core.states import BootSlot  # noqa: PLC0415
    from agent.errors import BootEnvError  # noqa: PLC0415

    if cfg.booted in ("a", "b"):
        return BootSlot(cfg.booted)
    if cfg.booted == "cmdline":
        with contextlib.suppress(OSError):
            for word in Path("/proc/cmdline").read_text().split():
                key, _, value = word.partition("=")
                if key in ("slotline.slot", "rauc.slot") and value.lower() in ("a", "b"):
                    return BootSlot(value.lower())
        raise click.ClickException("slotline.slot=a|b is not on the kernel command line")
    try:
        part = env_view(env.read()).boot_part
    except BootEnvError as e:
        raise click.ClickException(f"{e.code}: {e}") from e
    if part is None:
        raise click.ClickException("boot env has no boot_part")
    return part


def _build(cfg: Any, *, transport: Any = None, power: Any = None, sources: Any = None) -> Any:
    from agent.adapters.slots import BlockSlots, FileSlots  # noqa: PLC0415
    from agent.adapters.state_file import FileJournal  # noqa: PLC0415
    from agent.runtime import Agent, AgentConfig  # noqa: PLC0415
    from agent.selftest import CommandMigrations, SelfTestRunner  # noqa: PLC0415
    from agent.verify_child import ChildVerifier  # noqa: PLC0415

    env = _bootenv(cfg)
    booted = _booted(cfg, env)
    slots: FileSlots | BlockSlots
    if cfg.slots_kind == "file":
        slots = FileSlots(cfg.slot_a, cfg.slot_b, booted=booted, capacity=cfg.slot_size)
    else:
        slots = BlockSlots(cfg.slot_a, cfg.slot_b, booted=booted)
    Path(cfg.journal).parent.mkdir(parents=True, exist_ok=True)
    try:
        trust_root = Path(cfg.trust_root).read_bytes()
    except OSError as e:
        raise click.ClickException(f"cannot read trust root {cfg.trust_root}: {e}") from e
    return Agent(
        AgentConfig(
            device_id=cfg.device_id,
            hardware=cfg.hardware,
            factory_version=cfg.factory_version,
            factory_size=cfg.factory_size,
            checkpoint_bytes=cfg.checkpoint_bytes,
            fetch_window=cfg.fetch_window,
            retry_cap=cfg.retry_cap,
            component=cfg.component,
            decode_ahead=cfg.decode_ahead_bytes,
        ),
        slots=slots,
        bootenv=env,
        journal=FileJournal(cfg.journal),
        clock=_SystemClock(),
        power=power or _SystemPower(),
        booted=booted,
        transport=transport,
        # design: commands are verified in a child process (agent/verify_child.py), so the
        # daemon never loads cryptography and stays at its idle size after a command
        verifier=ChildVerifier(trust_root, device_id=cfg.device_id, hardware=cfg.hardware),
        selftest=SelfTestRunner(cfg.checks, deadline=cfg.selftest_deadline, transport=transport),
        migrations=CommandMigrations(cfg.migrate, cfg.undo, cfg.migration_timeout),
        sources=sources,
        health=None if cfg.health is None else _health(cfg, transport),
    )


def _health(cfg: Any, transport: Any) -> Any:
    from agent.health import sampler_from_config  # noqa: PLC0415 - only with [health]

    return sampler_from_config(cfg.health, cfg.checks, transport)


@click.group()
def agent() -> None:
    """The device agent: run, offline install, status."""


@agent.command()
@click.option(
    "--config", "config", default=DEFAULT_CONFIG, show_default=True, type=click.Path(dir_okay=False)
)
def run(config: str) -> None:
    """Run the agent daemon (MQTT transport to the controller)."""
    cfg = _load(config)
    if not cfg.mqtt.get("url"):
        raise click.ClickException("[mqtt] url is required to run the daemon")
    from agent.adapters.mqtt import MqttTransport  # noqa: PLC0415
    from agent.transport.aioclient import MqttSettings, TlsFiles  # noqa: PLC0415

    tls = None
    if cfg.mqtt.get("ca"):
        tls = TlsFiles(
            Path(cfg.mqtt["ca"]),
            Path(cfg.mqtt["cert"]) if cfg.mqtt.get("cert") else None,
            Path(cfg.mqtt["key"]) if cfg.mqtt.get("key") else None,
        )
    settings = MqttSettings.from_url(
        cfg.mqtt["url"], cfg.device_id, tls=tls, keepalive=int(cfg.mqtt.get("keepalive", 30))
    )

    async def main() -> str:
        transport = MqttTransport(
            cfg.device_id, settings, clock=_SystemClock(), window=cfg.fetch_window
        )
        the_agent = _build(cfg, transport=transport)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, the_agent.stop)
        return str(await the_agent.run())

    _tune_malloc()
    with _locked(cfg.journal):
        outcome = asyncio.run(main())
        click.echo(f"agent {outcome}")
        if outcome == "reboot":
            # Keep the lock and do not exit until the shutdown kills us: an exit would let
            # systemd restart the agent before the reboot, which would count as a switch that
            # never landed.
            time.sleep(REBOOT_GRACE)


@agent.command()
@click.argument("bundle", type=click.Path(exists=True, dir_okay=False))
@click.option(
    "--config", "config", default=DEFAULT_CONFIG, show_default=True, type=click.Path(dir_okay=False)
)
@click.option(
    "--reboot/--no-reboot",
    default=False,
    show_default=True,
    help="Reboot into the trial at once when the slot is staged.",
)
def install(bundle: str, config: str, reboot: bool) -> None:
    """Install a .slb offline (same checks as a network install), with a progress bar."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn  # noqa: PLC0415

    from agent.errors import AgentError  # noqa: PLC0415
    from agent.verify import SlbSource, release_of  # noqa: PLC0415
    from firmware_bundles.bundle import open_bundle  # noqa: PLC0415
    from firmware_bundles.errors import BundleError  # noqa: PLC0415
    from firmware_bundles.trust import TrustStore  # noqa: PLC0415

    cfg = _load(config)
    power = _SystemPower(enabled=reboot)
    path = Path(bundle)
    now = int(time.time())
    trust = TrustStore.from_root_bytes(Path(cfg.trust_root).read_bytes())

    async def main() -> Any:
        src: dict[str, Any] = {}
        the_agent = _build(cfg, power=power, sources=src.get)
        await the_agent.start()  # reconcile first: a trial or a resume may be pending
        await the_agent.wait_download()
        if the_agent.rebooting:
            return the_agent, None
        try:
            opened = open_bundle(
                path,
                trust,
                now=now,
                hardware=cfg.hardware,
                min_security_version=the_agent.state.security_version,
            )
        except BundleError as e:
            from agent.core.events import Rejected  # noqa: PLC0415

            await the_agent._feed(Rejected(e.code, str(e)))  # noqa: SLF001 - record the refusal
            return the_agent, e
        release = release_of(opened.release)
        from firmware_bundles import delta  # noqa: F401, PLC0415 - load the codec before the peak

        _trim()
        source = SlbSource(path, opened, trust=trust, now=now, hardware=cfg.hardware)
        src[release.bundle_id] = source
        total = release.target_size
        with Progress(
            "[progress.description]{task.description}",
            BarColumn(),
            DownloadColumn(),
            TimeRemainingColumn(),
            transient=False,
        ) as bar:
            task = bar.add_task(
                f"{release.version} -> slot {the_agent.state.primary.other.value}", total=total
            )

            async def watch() -> None:
                while True:
                    u = the_agent.state.update
                    if u is not None:
                        done = sum(c.out_size for c in u.plan.chunks[: u.written + u.pending])
                        bar.update(task, completed=done)
                    await asyncio.sleep(0.1)

            watcher = asyncio.create_task(watch())
            try:
                await the_agent.install(release, source)
            finally:
                watcher.cancel()
            if the_agent.state.update is not None or the_agent.rebooting:
                bar.update(task, completed=total)
        return the_agent, None

    _tune_malloc()
    with _locked(cfg.journal):
        try:
            the_agent, error = asyncio.run(main())
        except (AgentError, BundleError) as e:
            click.echo(f"error {e.code}: {e}", err=True)
            sys.exit(1)
    if error is not None:
        click.echo(f"rejected {error.code}: {error}", err=True)
        sys.exit(1)
    st = the_agent.state
    if the_agent.rebooting:
        if reboot:
            click.echo("staged: rebooting into the trial")
        else:
            click.echo(
                f"staged in slot {st.update.plan.target_slot.value if st.update else '?'}: "
                "reboot to start the trial boot"
            )
        return
    r = st.last_result
    if r is not None and r.outcome in ("failed", "rejected"):
        click.echo(f"{r.outcome} {r.code}: {r.message}", err=True)
        sys.exit(1)
    click.echo(f"{st.phase.value}")


@agent.command()
@click.option(
    "--config", "config", default=DEFAULT_CONFIG, show_default=True, type=click.Path(dir_okay=False)
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def status(config: str, as_json: bool) -> None:
    """Slots, versions, boot state and the last result with its error code."""
    from agent.adapters.bootenv import env_view  # noqa: PLC0415
    from agent.adapters.state_file import FileJournal  # noqa: PLC0415
    from agent.errors import AgentError  # noqa: PLC0415
    from agent.journal import decode  # noqa: PLC0415
    from agent.runtime import state_document  # noqa: PLC0415

    cfg = _load(config)
    env = _bootenv(cfg)
    try:
        raw_env = dict(env.read())
    except AgentError as e:
        raw_env = {"error": e.code}
    view = env_view(raw_env)
    booted = None
    with contextlib.suppress(click.ClickException):
        booted = _booted(cfg, env)
    raw = FileJournal(cfg.journal).load()
    if raw is None:
        doc: dict[str, Any] = {"device": cfg.device_id, "phase": "never_started"}
    else:
        try:
            doc = state_document(decode(raw), cfg.device_id, booted, component=cfg.component)
        except AgentError as e:
            doc = {"device": cfg.device_id, "phase": "unknown", "error": e.code}
    doc["bootenv"] = {
        "boot_part": view.boot_part.value if view.boot_part else None,
        "upgrade_available": view.upgrade_available,
        "bootcount": view.bootcount,
        "security_version": view.security_version,
        **({"error": raw_env["error"]} if "error" in raw_env else {}),
    }
    if as_json:
        click.echo(json.dumps(doc, indent=2, sort_keys=True))
        return
    from rich.console import Console  # noqa: PLC0415
    from rich.table import Table  # noqa: PLC0415

    console = Console()
    console.print(
        f"device [bold]{doc['device']}[/]  phase [bold]{doc['phase']}[/]  "
        f"version {doc.get('version')}  security_version {doc.get('security_version')}"
    )
    table = Table("slot", "state", "version", "sha256", "primary", "booted")
    for name, s in (doc.get("slots") or {}).items():
        table.add_row(
            name,
            s["state"],
            str(s["version"]),
            (s["sha256"] or "")[:16],
            "yes" if s["primary"] else "",
            "yes" if s["booted"] else "",
        )
    console.print(table)
    be = doc["bootenv"]
    console.print(
        f"boot env: boot_part={be['boot_part']} upgrade_available={int(be['upgrade_available'])} "
        f"bootcount={be['bootcount']}" + (f" [red]{be['error']}[/]" if "error" in be else "")
    )
    if doc.get("update"):
        u = doc["update"]
        console.print(
            f"update: {u['bundle_id']} {u['version']} -> slot {u['target_slot']}, "
            f"{u['chunks_done']}/{u['chunks_total']} chunks, attempt {u['attempts']}"
        )
    r = doc.get("last_result")
    if r:
        console.print(f"last result: [bold]{r['outcome']}[/] {r['code'] or ''} {r['message']}")
