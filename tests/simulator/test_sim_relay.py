"""A relay site runs the real site relay: its WAN carries one copy of the bundle, not one per device.

Each run has a relay site and a site without relay behind the same kind of link, side by side:
the relay site's WAN chunk bytes are what the real ``SiteRelay`` fetched upstream (counted by the
site's link model), and every device there still ends on the new version (its own journal and
slots say so). Against the machine's Mosquitto (shared, run-tagged ids) and against the broker a
run starts itself, as ``slotline demo`` does.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from simulator import scenario
from simulator.report import RunResult, SiteResult
from simulator.run import RunOptions, run
from simulator.scenario import Outcome
from simulator.siterelay import relay_sites_possible
from simulator.worker import shard_by_site

pytestmark = [pytest.mark.broker, pytest.mark.slow]

RELAY_DEVICES = 8
PLAIN_DEVICES = 4

FLEET = """
[scenario]
name = "relay-{site}"
seed = 5
timeout = "60s"

[firmware]
image_size = "256KiB"
chunk_size = "16KiB"
payload = "full"

[[site]]
name = "{site}"
bandwidth = "{bandwidth}"
latency = "40ms"
relay = true
metered = true
{outage}

[[site]]
name = "plain"
bandwidth = "4Mbit"
latency = "40ms"

[[fleet]]
count = {relay_devices}
hardware = "gw-100"
site = "{site}"

[[fleet]]
count = {plain_devices}
hardware = "gw-100"
site = "plain"

[rollout]
phases = [100]
max_failure_rate = 0

[expect]
rollout = "finished"
bricked_max = 0

[[expect.sites]]
name = "{site}"
wan_ratio_max = 1.05
"""


def _scenario(outage: str = "", bandwidth: str = "4Mbit") -> tuple[scenario.Scenario, str]:
    # A site name of its own: the relay's identity relay-<site> is unique on a shared broker.
    site = f"rig{uuid.uuid4().hex[:6]}"
    text = FLEET.format(site=site, outage=outage, bandwidth=bandwidth,
                        relay_devices=RELAY_DEVICES,
                        plain_devices=PLAIN_DEVICES)
    return scenario.parse(text, "relay.toml"), site


def _run(tmp_path: Path, s: scenario.Scenario, broker: str | None) -> RunResult:
    if broker is None and not relay_sites_possible():
        pytest.skip("a relay site's broker is Mosquitto with a bridge; mosquitto is not installed")
    opts = RunOptions(broker_url=broker, work_dir=tmp_path / "run",
                      report_path=tmp_path / "report.json", connect_timeout=5, progress=False)
    result, checks, _ = run(s, opts)
    assert all(c.ok for c in checks), [c for c in checks if not c.ok]
    return result


def _site(result: RunResult, name: str) -> SiteResult:
    return next(x for x in result.sites if x.name == name)


def _assert_one_wan_copy(result: RunResult, site_name: str) -> None:
    bundle = result.bundle_bytes  # the bundle file: chunk payload plus a little framing
    chunks = result.scenario.firmware.image_size // result.scenario.firmware.chunk_size
    site = _site(result, site_name)
    at_site = [d for d in result.devices if d.site == site_name]
    assert len(at_site) == RELAY_DEVICES
    assert all(d.outcome is Outcome.COMMITTED and d.version == "1.1.0" for d in at_site), at_site
    # What crossed the relay site's WAN: each chunk once, fetched by the relay itself.
    assert site.relay_wan_chunks == chunks
    copy = site.wan_chunk_bytes
    assert 0.95 * bundle <= copy <= 1.05 * bundle, (site, bundle)
    assert site.relay_hits >= (RELAY_DEVICES - 1) * chunks
    # Every device got the whole bundle from the relay over the site LAN.
    assert site.lan_bytes >= RELAY_DEVICES * copy
    assert site.relay_saved() >= (RELAY_DEVICES - 1) * copy
    # The same link without a relay carries one copy per device.
    plain = _site(result, "plain")
    assert plain.wan_chunk_bytes >= PLAIN_DEVICES * copy
    assert plain.relay_wan_chunks == plain.lan_bytes == 0


def test_relay_site_wan_carries_one_bundle_on_a_shared_broker(
    tmp_path: Path, mosquitto_addr: tuple[str, int]
) -> None:
    host, port = mosquitto_addr
    s, site = _scenario()
    result = _run(tmp_path, s, f"mqtt://{host}:{port}")
    _assert_one_wan_copy(result, site)


def test_relay_site_wan_carries_one_bundle_on_the_runs_own_broker(tmp_path: Path) -> None:
    s, site = _scenario()
    result = _run(tmp_path, s, None)
    _assert_one_wan_copy(result, site)


def test_relay_wan_outage_costs_a_retry_not_a_device(
    tmp_path: Path, mosquitto_addr: tuple[str, int]
) -> None:
    # The relay's WAN goes down while the site downloads (one copy takes about 3 s at
    # 512 kbit/s): the relay's fetches fail, devices hear REFUSED and ask again later.
    host, port = mosquitto_addr
    s, site = _scenario('[[site.outage]]\nat = "1.5s"\nduration = "2s"', bandwidth="512kbit")
    result = _run(tmp_path, s, f"mqtt://{host}:{port}")
    at_site = [d for d in result.devices if d.site == site]
    assert all(d.outcome is Outcome.COMMITTED for d in at_site), at_site
    relay = _site(result, site)
    assert relay.relay_wan_errors + relay.dropped_messages > 0, "the outage hit nothing"
    assert relay.wan_chunk_bytes <= 1.05 * result.bundle_bytes


def test_relay_site_stays_in_one_worker() -> None:
    s, site = _scenario()
    from simulator.plan import fleet_specs  # noqa: PLC0415

    shards = shard_by_site(s, fleet_specs(s), 3)
    holding = [i for i, shard in enumerate(shards) if any(d.site == site for d in shard)]
    assert len(holding) == 1
