"""``slotline demo``: a staged rollout to ~200 simulated devices, with nothing to configure.

What it does (the README's first command; ``make demo``):

1. starts the embedded MQTT broker (Mosquitto if on PATH, else iotcore);
2. starts the controller on SQLite in ``./.slotline-demo/`` with its HTTP API;
3. builds two firmware versions (2 MiB images) and a signed delta bundle, uploads the release;
4. enrolls 200 virtual devices at four sites; one site is a metered 512 kbit/s link behind a
   site relay: its own Mosquitto bridged to the central one and the real ``SiteRelay``, whose
   WAN fetches are what the link carries and counts;
5. runs the rollout ``gateway-1.1.0``: a trial group of canaries, then waves of 10 %, 50 %,
   100 %. Hardware model gw-200 fails its self-test on 1.1.0: those devices revert to 1.0.0 on
   their own, and the wave's gate pauses the rollout before the rest of the fleet gets it;
6. prints what happened, where the report is and how to look around.

The devices are the real agent (state machine, journal, self-test, MQTT transport) on file
slots with the simulated U-Boot; see ``docs/simulator.md``.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

import click

DEMO_DIR = Path(".slotline-demo")


@click.command()
@click.option("--devices", type=click.IntRange(10, 5000), default=200, show_default=True,
              help="Fleet size (sites and models keep their proportions).")
@click.option("--dir", "work_dir", type=click.Path(path_type=Path), default=DEMO_DIR,
              show_default=True, help="Where the demo keeps its database, slots and report.")
@click.option("--api-port", type=int, default=0,
              help="Port of the controller API during the demo (default: a free one).")
@click.option("--broker", help="Use this mqtt://HOST:PORT broker instead of starting one.")
@click.option("--processes", type=click.IntRange(1, 8), default=1, show_default=True,
              help="Device worker processes.")
@click.option("--no-progress", is_flag=True, help="No live view (logs, CI).")
@click.option("--serve", is_flag=True,
              help="Keep the controller API running after the summary, until Ctrl-C.")
def demo(  # noqa: PLR0917 - click passes options positionally
    devices: int, work_dir: Path, api_port: int, broker: str | None, processes: int,
         no_progress: bool, serve: bool) -> None:
    """A simulated staged rollout on embedded defaults (about a minute)."""
    from rich.console import Console  # noqa: PLC0415

    from simulator import scenario as sc  # noqa: PLC0415
    from simulator.cli import SCENARIOS  # noqa: PLC0415
    from simulator.env import free_port  # noqa: PLC0415
    from simulator.errors import SimError, Unreachable  # noqa: PLC0415
    from simulator.run import RunOptions, run  # noqa: PLC0415
    from simulator.siterelay import relay_sites, relay_sites_possible  # noqa: PLC0415

    console = Console()
    s = sc.load(SCENARIOS / "demo.toml")
    if devices != s.device_count:
        s = s.scaled(devices)
    if relay_sites(s) and not relay_sites_possible():
        # A relay site's broker is Mosquitto with a bridge; iotcore alone cannot be one.
        s = dataclasses.replace(s, sites=tuple(dataclasses.replace(x, relay=False)
                                               for x in s.sites))
        console.print("[yellow]note[/]: mosquitto is not installed, so the relay site runs "
                      "without its relay (every device's copy crosses the WAN)\n")
    report_path = work_dir / "report.json"
    port = api_port or free_port()
    console.print(f"[bold]Slotline demo[/]: a staged rollout of firmware "
                  f"{s.firmware.from_version} -> {s.firmware.to_version} to "
                  f"{s.device_count} simulated devices at {len(s.sites)} sites\n")

    def narrate(step: str, detail: str) -> None:
        label = {"broker": "MQTT broker", "controller": "controller", "firmware": "firmware",
                 "fleet": "fleet", "relay": "site relay", "devices": "devices"}.get(step, step)
        console.print(f"  [green]✓[/] {label:<12} {detail}")

    options = RunOptions(broker_url=broker, processes=processes, work_dir=work_dir,
                         report_path=report_path, connect_timeout=10.0,
                         progress=not no_progress, api_port=port, narrate=narrate)
    started = time.monotonic()
    kept: dict[str, Any] = {}

    def on_ready(controller: Any) -> None:
        kept["controller"] = controller
        console.print(f"  [green]✓[/] {'rollout':<12} {s.rollout.name}: trial group, then "
                      + ", ".join(f"{p} %" for p in s.rollout.phases)
                      + f"; gate: at most {s.rollout.max_failure_rate} % failures\n")

    try:
        result, checks, path = run(s, options, console=console, on_ready=on_ready,
                                   keep_running=serve)
    except Unreachable as e:
        console.print(f"[red]error[/]: {e}")
        sys.exit(3)
    except SimError as e:
        console.print(f"[red]error[/]: {e.code}: {e}")
        sys.exit(1)
    _summary(console, s, result, checks, path, time.monotonic() - started, work_dir)
    if serve and "controller" in kept:
        _serve_until_interrupted(console, kept["controller"], result)
    sys.exit(0 if all(c.ok for c in checks) else 1)


def _summary(  # noqa: PLR0917 - one caller
    console: Any, s: Any, result: Any, checks: list[Any], path: Path, took: float,
             work_dir: Path) -> None:
    from collections import Counter  # noqa: PLC0415

    from simulator import report  # noqa: PLC0415
    from simulator.scenario import Outcome  # noqa: PLC0415
    from simulator.units import format_bytes  # noqa: PLC0415

    c = report.counts(result.devices)
    by_hw: dict[str, Counter[str]] = {}
    codes: Counter[str] = Counter()
    for d in result.devices:
        by_hw.setdefault(d.hardware, Counter())[d.outcome.value] += 1
        if d.outcome is Outcome.REVERTED and d.error:
            codes[d.error] += 1
    console.print()
    for table in report.summary(result, checks):
        console.print(table)
    console.rule("[bold]What happened")
    lines = [
        f"Rollout [bold]{s.rollout.name}[/] is [bold]{result.rollout_state}[/]"
        + (f": {result.rollout_reason}" if result.rollout_reason else "") + ".",
        f"{c[Outcome.COMMITTED]} devices run {s.firmware.to_version} and committed it; "
        f"{c[Outcome.REVERTED]} tried it and went back to {s.firmware.from_version} on their own"
        + (f" ({', '.join(f'{k} x{v}' for k, v in codes.most_common())})" if codes else "")
        + f"; {c[Outcome.UNTOUCHED]} were never asked (the gate stopped the rollout first)"
        + (f"; {c[Outcome.FAILED]} refused or abandoned it" if c[Outcome.FAILED] else "")
        + (f"; {c[Outcome.PENDING]} were still busy" if c[Outcome.PENDING] else "") + ".",
    ]
    for hw, row in sorted(by_hw.items()):
        lines.append(f"  {hw}: " + ", ".join(f"{v} {k}" for k, v in sorted(row.items())))
    for x in result.sites:
        if not (x.metered or x.relay):
            continue
        ratio = x.wan_chunk_bytes / result.bundle_bytes if result.bundle_bytes else 0.0
        line = (f"{'Metered site' if x.metered else 'Site'} {x.name}: "
                f"{format_bytes(x.wan_chunk_bytes)} of bundle data crossed its WAN link "
                f"(WAN {ratio:.1f}x bundle)")
        if x.relay:
            served = x.lan_bytes / result.bundle_bytes if result.bundle_bytes else 0.0
            line += (f": its site relay fetched {x.relay_wan_chunks} chunks once and served "
                     f"{format_bytes(x.lan_bytes)} ({served:.1f}x bundle) to the site's devices "
                     f"over the LAN, saving {format_bytes(x.relay_saved())} of WAN")
        lines.append(line + f"; all WAN traffic incl. status: {format_bytes(x.wan_bytes)}.")
    lines.append(f"No device bricked: {c[Outcome.BRICKED] == 0}. "
                 f"Run took {took:.0f} s on this machine.")
    for line in lines:
        console.print(line)
    console.rule("[bold]Where to look")
    db = work_dir / "controller.db"
    console.print(f"Report (JSON, every device):   {path}")
    console.print(f"Controller database (SQLite):  {db}")
    console.print("Look around with the real controller:")
    console.print(f"  slotline controller serve --database sqlite:///{db} "
                  f"--data-dir {work_dir / 'controller'}")
    console.print("  then open http://127.0.0.1:8080/docs (token in "
                  f"{work_dir / 'controller' / 'admin.token'}), or run `slotline demo --serve`.")
    console.print("Try a scenario: slotline sim list; slotline sim run power_cut")


def _serve_until_interrupted(console: Any, controller: Any, result: Any) -> None:
    url = result.endpoints.get("api", "")
    token = controller.service.bootstrap_admin_token("demo-admin")
    console.print(f"\nController API: {url}  (Authorization: Bearer {token})")
    console.print("Ctrl-C to stop.")
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        controller.stop()
