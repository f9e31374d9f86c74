"""``slotline controller serve``: the controller service on uvicorn.

On first start it creates the data directory (fleet CA, SQLite database, chunk store), runs the
migrations, and writes a bootstrap admin token to ``<data-dir>/admin.token`` (mode 0600) if no
admin token exists yet. A scheduler thread ticks every ``--tick`` seconds.

    slotline controller serve --data-dir ./ctl --port 8080
    slotline controller serve --database postgresql+psycopg://postgres@127.0.0.1/test
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click


def default_data_dir() -> Path:
    """``$XDG_DATA_HOME/slotline/controller`` (or ``~/.local/share/...``)."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "slotline" / "controller"


@click.group()
def controller() -> None:
    """Run the controller service."""


@controller.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8080, show_default=True, type=click.IntRange(0, 65535))
@click.option(
    "--database",
    "database_url",
    envvar="SLOTLINE_DATABASE",
    default=None,
    help="SQLAlchemy URL; default SQLite in the data directory.",
)
@click.option(
    "--data-dir",
    type=click.Path(path_type=Path),
    default=None,
    envvar="SLOTLINE_DATA_DIR",
    help="CA, chunk store, keys, trust root.",
)
@click.option(
    "--broker",
    "broker_url",
    default=None,
    envvar="SLOTLINE_BROKER",
    help="MQTT broker URL the controller uses and tells enrolling devices.",
)
@click.option(
    "--broker-tls",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="Directory with ca.pem, controller.pem, controller.key (from `controller certs`).",
)
@click.option(
    "--advertise-broker",
    default=None,
    envvar="SLOTLINE_ADVERTISE_BROKER",
    help="Broker URL given to enrolling devices (default: --broker), e.g. mqtts://broker:8883.",
)
@click.option(
    "--tick",
    default=2.0,
    show_default=True,
    type=click.FloatRange(0.05, 3600),
    help="Seconds between scheduler rounds.",
)
@click.option(
    "--trust",
    "trust_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="Install this trust root (trust.json) before serving (with --command-key).",
)
@click.option(
    "--command-key",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="Install this command-role key file before serving.",
)
@click.option(
    "--client-id",
    default="slotline-controller",
    show_default=True,
    help="MQTT client id (stable, so the broker keeps the session across restarts).",
)
@click.option(
    "--max-upload",
    default=4 * 1024**3,
    show_default=True,
    type=click.IntRange(1024, 2**40),
    help="Release upload cap in bytes.",
)
def serve(  # noqa: PLR0917 (click passes options positionally)
    host: str,
    port: int,
    database_url: str | None,
    data_dir: Path | None,
    broker_url: str | None,
    broker_tls: Path | None,
    advertise_broker: str | None,
    tick: float,
    trust_file: Path | None,
    command_key: Path | None,
    client_id: str,
    max_upload: int,
) -> None:
    """Serve the API, run the scheduler, and (with --broker) the MQTT gateway."""
    from controller.runner import run  # noqa: PLC0415 (heavy imports only when serving)

    data_dir = data_dir or default_data_dir()
    database_url = database_url or f"sqlite:///{data_dir / 'controller.db'}"
    sys.exit(
        run(
            host=host,
            port=port,
            database_url=database_url,
            data_dir=data_dir,
            broker_url=broker_url,
            advertise_broker=advertise_broker,
            broker_tls=broker_tls,
            tick=tick,
            max_upload=max_upload,
            trust_file=trust_file,
            command_key=command_key,
            client_id=client_id,
        )
    )


@controller.command()
@click.option(
    "--data-dir",
    type=click.Path(path_type=Path),
    default=None,
    envvar="SLOTLINE_DATA_DIR",
    help="The controller's data directory (its fleet CA).",
)
@click.option(
    "--broker-host",
    "hosts",
    multiple=True,
    required=True,
    help="DNS name or IP address devices use for the broker (repeatable).",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Directory for ca.pem, broker.pem/.key, controller.pem/.key.",
)
@click.option(
    "--controller-name",
    default="controller",
    show_default=True,
    help="CN of the controller's client certificate (its broker username).",
)
@click.option(
    "--relay",
    "relay_sites",
    multiple=True,
    metavar="SITE",
    help="Also issue relay-SITE.pem/.key, the site relay's client certificate (repeatable).",
)
def certs(
    data_dir: Path | None,
    hosts: tuple[str, ...],
    out: Path,
    controller_name: str,
    relay_sites: tuple[str, ...],
) -> None:
    """Issue the broker's server certificate, the controller's and relays' client certificates.

    All are signed by the fleet CA that signs device certificates, so the broker trusts
    devices and the controller with one ``cafile``; its ``crlfile`` is the data directory's
    ``ca/crl.pem``. A site relay's certificate (CN ``relay-SITE``, which the controller serves
    as that site's relay) comes only from here: enrollment refuses ``relay-`` device ids.
    """
    from controller.ids import check_device_id  # noqa: PLC0415
    from controller.pki import FleetCA  # noqa: PLC0415
    from firmware_bundles.protocol import relay_id  # noqa: PLC0415

    relays = [check_device_id(relay_id(site)) for site in relay_sites]
    data_dir = data_dir or default_data_dir()
    ca = FleetCA.load_or_create(data_dir / "ca")
    out.mkdir(parents=True, exist_ok=True)
    (out / "ca.pem").write_text(ca.cert_pem)
    issued: list[tuple[str, str, tuple[str, ...]]] = [
        ("broker", hosts[0], hosts),
        ("controller", controller_name, ()),
        *((relay, relay, ()) for relay in relays),
    ]
    for name, cn, server in issued:
        cert, key = ca.issue(cn, server_names=server)
        (out / f"{name}.pem").write_text(cert)
        key_path = out / f"{name}.key"
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(key)
    extra = "".join(f", {relay}.pem/.key" for relay in relays)
    click.echo(
        f"wrote ca.pem, broker.pem/.key, controller.pem/.key{extra} to {out}; "
        f"CRL: {data_dir / 'ca' / 'crl.pem'}"
    )
