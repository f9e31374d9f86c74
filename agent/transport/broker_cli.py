"""``slotline broker``: run the embedded MQTT broker, or write the production Mosquitto configs.

slotline broker run --port 1883            # Mosquitto if on PATH, else iotcore
slotline broker render --out packaging/mosquitto
"""

from __future__ import annotations

import signal
import tempfile
import threading
from pathlib import Path

import click


@click.group()
def broker() -> None:
    """Run the embedded MQTT broker (first-run default) or render production configs."""


@broker.command("run")
@click.option("--port", type=int, default=1883, show_default=True)
@click.option(
    "--backend",
    type=click.Choice(["auto", "mosquitto", "iotcore"]),
    default="auto",
    show_default=True,
)
@click.option("--dir", "workdir", type=click.Path(path_type=Path), default=None)
def run(port: int, backend: str, workdir: Path | None) -> None:
    """Run a plain loopback MQTT v5 broker until interrupted."""
    from agent.transport.broker import EmbeddedBroker  # noqa: PLC0415 - keep the CLI light

    workdir = workdir or Path(tempfile.mkdtemp(prefix="slotline-broker-"))
    kind = None if backend == "auto" else backend
    try:
        server = EmbeddedBroker.start_default(workdir, port=port, kind=kind)
    except RuntimeError as e:
        raise click.ClickException(str(e)) from e
    click.echo(f"{server.kind} broker on {server.url} (config in {workdir}); Ctrl+C stops it")
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    try:
        while not done.wait(1.0):
            if server.proc is not None and server.proc.poll() is not None:
                raise click.ClickException(f"broker exited with {server.proc.returncode}")
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


@broker.command("render")
@click.option("--out", type=click.Path(path_type=Path), required=True)
def render(out: Path) -> None:
    """Write the production Mosquitto configs (central and site broker, ACLs)."""
    from agent.transport.broker import render_packaging  # noqa: PLC0415

    out.mkdir(parents=True, exist_ok=True)
    for name, text in render_packaging().items():
        (out / name).write_text(text)
        click.echo(f"wrote {out / name}")
