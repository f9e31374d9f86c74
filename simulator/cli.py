"""``slotline sim``: run fleet scenarios on virtual devices.

    slotline sim list                              # the shipped scenarios, one line each
    slotline sim check my.toml                     # validate only (errors name line and field)
    slotline sim run power_cut                     # a shipped scenario by name, or a path
    slotline sim run my.toml --broker mqtt://127.0.0.1:1883 --database postgresql+psycopg://...

Exit status: 0 every expectation held, 1 one did not, 2 the scenario is invalid, 3 the broker or
controller could not be reached (within ``--connect-timeout`` seconds).
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

EXIT_FAILED, EXIT_INVALID, EXIT_UNREACHABLE = 1, 2, 3
SCENARIOS = Path(__file__).parent / "scenarios"


def resolve_scenario(name: str) -> Path:
    """A path as given, or the shipped scenario of that name (``power_cut``, ``power_cut.toml``)."""
    p = Path(name)
    if p.exists() or (p.suffix == ".toml" and p.parent != Path()):
        return p
    shipped = SCENARIOS / (name if name.endswith(".toml") else f"{name}.toml")
    return shipped if shipped.exists() else p


@click.group()
def sim() -> None:
    """Run fleet scenarios on virtual devices (the real agent code, simulated links and faults)."""


@sim.command("list")
def list_cmd() -> None:
    """List the shipped scenarios."""
    from simulator import scenario  # noqa: PLC0415 - keep `slotline --help` light

    for f in sorted(SCENARIOS.glob("*.toml")):
        s = scenario.load(f)
        print(f"{f.stem:<20} {s.device_count:>5} devices  {s.meta.description}")


@sim.command("check")
@click.argument("scenarios", nargs=-1, required=True)
def check_cmd(scenarios: tuple[str, ...]) -> None:
    """Validate scenario files without running them."""
    from simulator import scenario  # noqa: PLC0415
    from simulator.errors import ScenarioInvalid  # noqa: PLC0415

    bad = 0
    for name in scenarios:
        try:
            s = scenario.load(resolve_scenario(name))
        except ScenarioInvalid as e:
            print(f"error: {e}", file=sys.stderr)
            bad += 1
        else:
            print(f"ok: {s.source}: {s.meta.name}, {s.device_count} devices, "
                  f"{len(s.sites)} sites, {len(s.faults)} faults")
    sys.exit(EXIT_INVALID if bad else 0)


def _site_counts(_ctx: object, _param: object, values: tuple[str, ...]) -> list[tuple[str, int]]:
    out = []
    for v in values:
        site, _, n = v.partition("=")
        if not site or not n.isdigit():
            raise click.BadParameter(f"expected SITE=N (e.g. field=4), got {v!r}")
        out.append((site, int(n)))
    return out


@sim.command("run")
@click.argument("scenario_file", metavar="SCENARIO")
@click.option("--report", "report_path", type=click.Path(path_type=Path),
              help="Where to write the JSON report (default: <work-dir>/report.json).")
@click.option("--broker",
              help="mqtt://HOST:PORT of a running broker (default: start the embedded one).")
@click.option("--database", help="Controller database URL (default: SQLite in the work dir).")
@click.option("--processes", type=click.IntRange(1, 64), default=1, show_default=True,
              help="Worker processes for the virtual devices.")
@click.option("--devices", type=click.IntRange(1, 100_000),
              help="Resize the fleet to about this many devices (proportionally).")
@click.option("--work-dir", type=click.Path(path_type=Path),
              help="Slots, journals and the controller's data (default: a temp dir, removed).")
@click.option("--connect-timeout", type=float, default=5.0, show_default=True,
              help="Seconds to wait for the broker and the controller before giving up.")
@click.option("--no-progress", is_flag=True, help="No live view (for logs and CI).")
@click.option("--netns", "netns", multiple=True, metavar="SITE=N", callback=_site_counts,
              help="Run N of SITE's devices behind a real shaped link (network namespace and "
              "tc; root). Repeatable; overrides the site's netns field.")
def run_cmd(  # noqa: PLR0917 - click passes options positionally
    scenario_file: str, report_path: Path | None, broker: str | None, database: str | None,
    processes: int, devices: int | None, work_dir: Path | None, connect_timeout: float,
    no_progress: bool, netns: tuple[tuple[str, int], ...],
) -> None:
    """Run SCENARIO (a .toml path or a shipped scenario's name) and check its expectations."""
    from simulator import scenario  # noqa: PLC0415
    from simulator.errors import ScenarioInvalid, SimError, Unreachable  # noqa: PLC0415
    from simulator.run import RunOptions, run_and_report  # noqa: PLC0415

    try:
        s = scenario.load(resolve_scenario(scenario_file))
    except ScenarioInvalid as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_INVALID)
    if devices is not None:
        s = s.scaled(devices)
    for site, count in netns:
        try:
            s = scenario.with_netns(s, site, count)
        except ScenarioInvalid as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(EXIT_INVALID)
    options = RunOptions(
        broker_url=broker, database_url=database, processes=processes, work_dir=work_dir,
        report_path=report_path, connect_timeout=connect_timeout, progress=not no_progress,
    )
    try:
        ok = run_and_report(s, options)
    except Unreachable as e:
        print(f"error: {e.code}: {e}", file=sys.stderr)
        sys.exit(EXIT_UNREACHABLE)
    except SimError as e:
        print(f"error: {e.code}: {e}", file=sys.stderr)
        sys.exit(EXIT_FAILED)
    sys.exit(0 if ok else EXIT_FAILED)
