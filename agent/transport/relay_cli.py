r"""``slotline relay --site NAME``: run a site relay (chunk cache for one site).

slotline relay --site plant-7 --local mqtt://127.0.0.1:1883 \\
        --upstream mqtts://central.example:8883 --ca ca.pem --cert relay.pem --key relay.key \\
        --cache /var/lib/slotline/relay --wan-kbit 2000 --night 01:00-05:00
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import click


@click.command()
@click.option("--site", required=True, help="Site name; the relay's identity is relay-<site>.")
@click.option("--local", "local_url", default="mqtt://127.0.0.1:1883", show_default=True)
@click.option("--upstream", "upstream_url", required=True, help="Central broker URL.")
@click.option("--ca", type=click.Path(exists=True, path_type=Path), default=None)
@click.option("--cert", type=click.Path(exists=True, path_type=Path), default=None)
@click.option("--key", type=click.Path(exists=True, path_type=Path), default=None)
@click.option("--cache", "cache_dir", type=click.Path(path_type=Path), required=True)
@click.option("--wan-kbit", type=int, default=0, help="WAN cap in kbit/s (0: none).")
@click.option("--night", default=None, help="Full-rate window, local time, e.g. 01:00-05:00.")
@click.option("--tz", default="UTC", show_default=True)
@click.option("--stats-every", type=float, default=30.0, show_default=True)
def relay(  # noqa: PLR0917 - click passes options positionally
    site: str,
    local_url: str,
    upstream_url: str,
    ca: Path | None,
    cert: Path | None,
    key: Path | None,
    cache_dir: Path,
    wan_kbit: int,
    night: str | None,
    tz: str,
    stats_every: float,
) -> None:
    """Run a site relay: serve the site's devices, fetch each missing chunk once upstream."""
    from agent.transport.aioclient import MqttSettings, TlsFiles  # noqa: PLC0415
    from agent.transport.relay import SiteRelay  # noqa: PLC0415
    from firmware_bundles.protocol import relay_id as relay_identity  # noqa: PLC0415
    from firmware_bundles.throttle import LinkProfile, Window  # noqa: PLC0415

    relay_id = relay_identity(site)
    tls = TlsFiles(ca, cert, key) if ca else None
    windows = (Window.parse(night, 0.0),) if night else ()
    rate = wan_kbit * 1000 / 8
    profile = LinkProfile(f"site-{site}", rate, max(rate / 4, 16 * 1024), windows, tz)
    try:
        upstream = MqttSettings.from_url(upstream_url, relay_id, tls=tls)
        local = MqttSettings.from_url(local_url, relay_id)
    except ValueError as e:
        raise click.ClickException(str(e)) from e
    server = SiteRelay(
        site, local=local, upstream=upstream, cache_dir=cache_dir, wan_profile=profile
    )

    async def main() -> None:
        await server.start()
        click.echo(f"relay {relay_id}: local {local_url}, upstream {upstream_url}")
        try:
            while True:
                await asyncio.sleep(stats_every)
                s = server.stats
                click.echo(
                    f"hits {s.hits} misses {s.misses} coalesced {s.coalesced} "
                    f"wan {s.wan_chunks} chunks / {s.wan_bytes} B, errors {s.wan_errors}"
                )
        finally:
            await server.stop()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())
