"""Relay sites in a run: the real site broker, bridge and ``SiteRelay``, as a site deploys them.

A site with ``relay = true`` gets what ``docs/protocol.md`` prescribes for a relay site:

- a site Mosquitto whose bridge carries the control channels (``cmd`` in; ``state``, ``events``,
  ``online`` out) to the run's broker; ``fetch``/``chunk`` stay on the site broker. The driver
  starts it (``start_site_brokers``) before the workers and stops it after them;
- the site's devices connect to the site broker, as real devices configured with a relay do;
- the real ``agent.transport.relay.SiteRelay`` (what ``slotline relay`` runs), in-process on the
  worker's event loop that runs the site's devices, answers their ``fetch`` from its cache and
  fetches each missing chunk once from the controller as ``relay-<site>``. Its upstream transport
  is wrapped with the site's ``Link`` (``simulator/linked.py``): bandwidth, latency, loss,
  outages and the WAN byte count apply to what the relay actually fetched.

Device control traffic still crosses the modelled WAN (the bridge is a WAN hop); device to relay
chunk traffic is the site LAN. The bridge needs Mosquitto: a run with a relay site and no
Mosquitto on this machine fails with ``SimError`` (``relay_sites_possible`` says beforehand).

    brokers = start_site_brokers(scenario, broker.host, broker.port, work, tag)   # driver
    relay = await start_relay(site, site_url=..., central_url=..., link=link,  # worker
                              elapsed=elapsed, cache_dir=cache)
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from firmware_bundles.protocol import relay_id
from simulator.errors import SimError

if TYPE_CHECKING:
    from agent.transport.broker import EmbeddedBroker
    from agent.transport.relay import SiteRelay
    from simulator.link import Link
    from simulator.scenario import Scenario

def relay_sites(scenario: Scenario) -> list[str]:
    """Names of the scenario's sites with a relay."""
    return [s.name for s in scenario.sites if s.relay]


def relay_sites_possible() -> bool:
    """Whether this machine can run a relay site (its site broker is Mosquitto with a bridge)."""
    from agent.transport.broker import EmbeddedBroker  # noqa: PLC0415

    return "mosquitto" in EmbeddedBroker.available()


def start_site_brokers(scenario: Scenario, central_host: str, central_port: int, work: Path,
                       tag: str) -> dict[str, EmbeddedBroker]:
    """Start one bridged site Mosquitto per relay site; site name -> broker.

    ``tag`` makes the bridge's client id on the central broker unique per run (a broker others
    use may hold another run's bridge of a site of the same name).

    Raises:
        SimError: a relay site and no Mosquitto here, or a site broker did not start.
    """
    from agent.transport.broker import (  # noqa: PLC0415
        BridgeConfig,
        EmbeddedBroker,
        MosquittoConfig,
        free_port,
    )

    names = relay_sites(scenario)
    if not names:
        return {}
    if not relay_sites_possible():
        raise SimError(f"site {names[0]} has a relay: its site broker is Mosquitto with a bridge, "
                       "and mosquitto is not installed here")
    out: dict[str, EmbeddedBroker] = {}
    try:
        for name in names:
            bridge = BridgeConfig(name=_bridge_name(tag, name),
                                  address=f"{central_host}:{central_port}")
            config = MosquittoConfig(port=free_port(), run_as_root=True, bridge_to=bridge)
            out[name] = EmbeddedBroker.start_mosquitto(config, work / f"site-{name}")
    except (RuntimeError, OSError) as e:
        for b in out.values():
            b.stop()
        raise SimError(f"the site broker of a relay site did not start: {e}") from e
    return out


def _bridge_name(tag: str, site: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "-", f"slotline-sim-{tag}-{site}")[:100]


async def start_relay(site: str, *, site_url: str, central_url: str, link: Link,
                      elapsed: Callable[[], float], cache_dir: Path) -> SiteRelay:
    """Start the site's ``SiteRelay`` on the running loop, its WAN side through ``link``.

    Raises:
        SimError: the relay did not connect to the site broker within 10 s.
    """
    from agent.adapters.mqtt import MqttTransport  # noqa: PLC0415
    from agent.transport.aioclient import MqttSettings  # noqa: PLC0415
    from agent.transport.relay import SiteRelay  # noqa: PLC0415
    from simulator.linked import LinkedTransport  # noqa: PLC0415

    rid = relay_id(site)

    def shaped(upstream: MqttTransport) -> LinkedTransport:
        return LinkedTransport(upstream, link, elapsed)

    relay = SiteRelay(
        site,
        local=MqttSettings.from_url(site_url, rid, backoff_initial=0.2, backoff_max=2.0),
        upstream=MqttSettings.from_url(central_url, rid, backoff_initial=0.2, backoff_max=2.0,
                                       session_expiry=600),
        cache_dir=cache_dir,
        relay_id=rid,
        wan=shaped,
    )
    await relay.start()
    if not await relay.local.wait_connected(10.0):
        await relay.stop()
        raise SimError(f"the relay of site {site} could not connect to its site broker")
    return relay


async def stop_relays(relays: dict[str, SiteRelay]) -> None:
    """Stop every relay (bounded: a relay that hangs must not hold the run's results)."""
    for relay in relays.values():
        with contextlib.suppress(Exception):
            await asyncio.wait_for(relay.stop(), 5.0)


def relay_stats(relays: dict[str, SiteRelay]) -> dict[str, dict[str, int]]:
    """Per site: what the real relay did (merged into the site's link counters)."""
    out: dict[str, dict[str, int]] = {}
    for site, relay in relays.items():
        s = relay.stats
        out[site] = {"relay_hits": s.hits + s.coalesced, "relay_misses": s.misses,
                     "relay_wan_chunks": s.wan_chunks, "relay_wan_bytes": s.wan_bytes,
                     "relay_wan_errors": s.wan_errors,
                     "relay_served_bytes": relay.server.stats.served_bytes}
    return out
