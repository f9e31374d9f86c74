"""The run plan: which virtual devices exist and which faults hit which of them.

Pure and seeded: the same scenario always yields the same device ids, the same trial group and
the same faulty devices, in any number of worker processes (each takes its shard of the list).

    specs = fleet_specs(scenario)
    faults = assign_faults(scenario, specs)        # device id -> faults
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from simulator.scenario import DEVICE_FAULTS, Fault, Scenario, Selector


@dataclass(frozen=True)
class DeviceSpec:
    """One virtual device: identity and where it sits."""

    device_id: str
    hardware: str
    site: str
    tags: frozenset[str]
    index: int  # position in the fleet (shards and seeds derive from it)


def fleet_specs(scenario: Scenario, run_tag: str = "") -> list[DeviceSpec]:
    """Every device of the scenario, with stable ids ``[<run tag>-]<prefix>-<n>``.

    A run on a shared broker passes a ``run_tag``: retained state of an earlier run's devices
    must never be mistaken for this run's.
    """
    out: list[DeviceSpec] = []
    counters: dict[str, int] = {}
    for group in scenario.fleet:
        prefix = group.id_prefix or f"{group.site}-{group.hardware}"
        if run_tag:
            prefix = f"{run_tag}-{prefix}"
        for _ in range(group.count):
            n = counters.get(prefix, 0) + 1
            counters[prefix] = n
            out.append(DeviceSpec(f"{prefix}-{n:05d}", group.hardware, group.site,
                                  frozenset(group.tags), len(out)))
    return out


def select(selector: Selector, specs: Sequence[DeviceSpec], rng: random.Random) -> list[DeviceSpec]:
    """Devices matching ``selector``; a ``count`` or ``percent`` picks that many at random."""
    matching = [d for d in specs if selector.matches(d.hardware, d.site, d.tags)]
    if selector.count is not None:
        return sorted(rng.sample(matching, min(selector.count, len(matching))),
                      key=lambda d: d.index)
    if selector.percent is not None:
        n = round(len(matching) * selector.percent / 100)
        return sorted(rng.sample(matching, n), key=lambda d: d.index)
    return matching


def assign_faults(scenario: Scenario, specs: Sequence[DeviceSpec]) -> dict[str, list[Fault]]:
    """Device id -> the device faults that apply to it (site and system faults excluded)."""
    rng = random.Random(scenario.meta.seed * 7919 + 1)  # noqa: S311 - seeded model
    out: dict[str, list[Fault]] = {}
    for fault in scenario.faults:
        if fault.kind not in DEVICE_FAULTS:
            continue
        for d in select(fault.select, specs, rng):
            out.setdefault(d.device_id, []).append(fault)
    return out


def trial_group(scenario: Scenario, specs: Sequence[DeviceSpec]) -> list[DeviceSpec]:
    """The rollout's trial group (empty when the scenario names none)."""
    if scenario.rollout.trial is None:
        return []
    rng = random.Random(scenario.meta.seed * 104729 + 2)  # noqa: S311 - seeded model
    targeted = targets(scenario, specs)
    return select(scenario.rollout.trial, targeted, rng)


def targets(scenario: Scenario, specs: Sequence[DeviceSpec]) -> list[DeviceSpec]:
    """Devices the rollout targets."""
    t = scenario.rollout.target
    return [d for d in specs if t.matches(d.hardware, d.site, d.tags)]


def shard(specs: Sequence[DeviceSpec], index: int, count: int) -> list[DeviceSpec]:
    """The devices worker ``index`` of ``count`` runs (round robin, so sites spread out)."""
    return [d for d in specs if d.index % count == index]
