"""The one `slotline` command.

Each subcommand group lives in the package that owns it and is imported only when that group
runs, so `slotline agent run` on a small device never pays for FastAPI or SQLAlchemy.

    slotline bundle keygen --out keys/
    slotline agent status --json
"""

from __future__ import annotations

import importlib
import sys

import click

# group name -> "module:attribute" of a click.Group; loaded on first use.
_GROUPS: dict[str, tuple[str, str]] = {
    "bundle": ("firmware_bundles.cli:bundle", "Build, sign, verify, inspect and apply bundles."),
    "agent": ("agent.cli:agent", "The device agent: run, offline install, status."),
    "enroll": ("agent.enroll_cli:enroll", "Enroll this device with a controller."),
    "controller": ("controller.cli:controller", "Run the controller service."),
    "device": ("controller.ops_cli:device", "List and show devices."),
    "release": ("controller.ops_cli:release", "Upload, list and show releases."),
    "rollout": ("controller.ops_cli:rollout", "Create and steer rollouts."),
    "token": ("controller.ops_cli:token", "Issue API and enrollment tokens."),
    "site": ("controller.ops_cli:site", "Site time zones, maintenance windows, bandwidth."),
    "relay": ("agent.transport.relay_cli:relay", "Run a site relay (chunk cache for one site)."),
    "broker": ("agent.transport.broker_cli:broker", "Run the embedded MQTT broker."),
    "sim": ("simulator.cli:sim", "Run fleet scenarios on virtual devices."),
    "demo": ("simulator.demo:demo", "A simulated staged rollout on embedded defaults."),
}


class _LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        del ctx
        return sorted(_GROUPS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        del ctx
        target = _GROUPS.get(cmd_name)
        if target is None:
            return None
        module_name, _, attr = target[0].partition(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name and module_name.startswith(e.name):
                # The group is not built yet in this checkout: say so instead of a traceback.
                return _missing(cmd_name, target[1])
            raise
        command: click.Command = getattr(module, attr)
        return command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # Listing help must not import every group: show the static one-line summaries.
        del ctx
        with formatter.section("Commands"):
            formatter.write_dl([(name, _GROUPS[name][1]) for name in sorted(_GROUPS)])


def _missing(name: str, summary: str) -> click.Command:
    @click.command(name=name, help=summary)
    def _cmd() -> None:
        click.echo(f"slotline {name}: not available in this build", err=True)
        sys.exit(2)

    return _cmd


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="slotline")
def cli() -> None:
    """Slotline: fleet rollouts for edge devices."""


def main() -> None:
    """Console-script entry point."""
    cli()


if __name__ == "__main__":
    main()
