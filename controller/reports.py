"""Device reports: the gateway's callbacks queue them, one writer applies them in batches.

Rules:

* ``on_state``/``on_event``/``on_online`` run on the gateway's event loop: they only validate
  cheaply and enqueue (bounded queue; a full queue drops and counts, never blocks MQTT).
* ``drain()`` applies everything queued in one transaction: the newest state and presence per
  device (older ones are superseded), and every event in arrival order. The scheduler drains
  before each tick, and ``serve`` runs a writer thread that drains continuously.
* What the controller reads (see docs/controller.md "Device reports"):
  - state: ``active_digest`` (or ``slots`` + ``primary``/``active`` with a ``sha256``), component
    ``versions`` ({component: version}), ``health`` ({metric: number}), ``phase``;
  - a state whose active digest is the target of the device's rollout (or whose ``last_result``
    names the rollout's bundle) settles the rollout row like the result event would;
  - events: ``{"type": "result", "outcome": committed|reverted|failed|rejected|rolled_back,
    "bundle_id", "code"}`` moves the device's active rollout row; ``{"type": "phase", "phase",
    "progress"}`` updates its phase; ``health`` in any event updates the device's health.
* A report from an unknown or decommissioned device is ignored.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from sqlalchemy import select, update

from controller.db import models as m
from controller.rollout.states import DS, next_state

if TYPE_CHECKING:
    from controller.service import ControllerService

log = logging.getLogger(__name__)

MAX_QUEUE = 500_000
_ACTIVE = (DS.COMMANDED.value, DS.CANCEL_SENT.value, DS.ROLLBACK_SENT.value)


def _finite(value: Any) -> float | None:
    # Device reports are hostile input: a bool is not a number, and an int past float range
    # must be dropped here rather than raise and lose the rest of the batch.
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def _numbers(doc: Any) -> dict[str, float] | None:
    if not isinstance(doc, Mapping) or len(doc) > 32:
        return None
    numbers = {str(k)[:64]: _finite(v) for k, v in doc.items()}
    return {k: v for k, v in numbers.items() if v is not None}


def _active_digest(state: Mapping[str, Any]) -> str | None:
    digest = state.get("active_digest")
    if isinstance(digest, str) and len(digest) == 64:
        return digest
    slots = state.get("slots")
    active = state.get("primary", state.get("active"))
    if isinstance(slots, Mapping) and isinstance(active, str):
        slot = slots.get(active)
        if isinstance(slot, Mapping):
            d = slot.get("sha256", slot.get("digest"))
            if isinstance(d, str) and len(d) == 64:
                return d
    return None


def _state_values(state: Mapping[str, Any]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    digest = _active_digest(state)
    if digest is not None:
        values["active_digest"] = digest
    versions = state.get("versions")
    if isinstance(versions, Mapping) and len(versions) <= 32:
        values["versions"] = {
            str(k)[:64]: v[:64] for k, v in versions.items() if isinstance(v, str)
        }
    health = _numbers(state.get("health"))
    if health is not None:
        values["health"] = health
    values["state"] = {
        k: state[k]
        for k in ("phase", "primary", "active", "security_version")
        if k in state and isinstance(state[k], str | int)
    }
    return values


class Reports:
    """See module docstring."""

    def __init__(self, svc: ControllerService) -> None:
        self.svc = svc
        self.queue: queue.Queue[tuple[str, str, Any]] = queue.Queue(MAX_QUEUE)
        self.dropped = 0
        self.applied = 0
        self._lock = threading.Lock()

    def put(self, kind: str, device_id: str, doc: Any) -> None:
        """Queue one report (never blocks)."""
        try:
            self.queue.put_nowait((kind, device_id, doc))
        except queue.Full:
            self.dropped += 1

    def drain(self, limit: int = 100_000) -> int:
        """Apply up to ``limit`` queued reports in one transaction; returns how many."""
        # Taking and applying under one lock: two drains (writer thread, tick) never apply an
        # older state after a newer one.
        with self._lock:
            items: list[tuple[str, str, Any]] = []
            while len(items) < limit:
                try:
                    items.append(self.queue.get_nowait())
                except queue.Empty:
                    break
            if not items:
                return 0
            self._apply(items)
        self.applied += len(items)
        return len(items)

    def _apply(self, items: list[tuple[str, str, Any]]) -> None:
        now = self.svc.clock()
        known = self.svc.known_devices({d for _, d, _ in items if isinstance(d, str)})
        states: dict[str, dict[str, Any]] = {}
        online: dict[str, bool] = {}
        events: list[tuple[str, Mapping[str, Any]]] = []
        for kind, device_id, doc in items:
            if device_id not in known:
                continue
            if kind == "state":
                states[device_id] = doc
            elif kind == "online":
                online[device_id] = bool(doc)
            else:
                events.append((device_id, doc))
        seen = _utc(now)
        with self.svc.sessions.begin() as s:
            # executemany by primary key, grouped by the columns each update sets
            by_keys: dict[tuple[str, ...], list[dict[str, Any]]] = {}
            for device_id, state in states.items():
                values = _state_values(state)
                values["last_seen"] = seen
                if device_id in online:
                    values["online"] = online.pop(device_id)
                values["id"] = device_id
                by_keys.setdefault(tuple(sorted(values)), []).append(values)
            for batch in by_keys.values():
                s.execute(update(m.Device), batch)
            for device_id, flag in online.items():
                s.execute(
                    update(m.Device)
                    .where(m.Device.id == device_id)
                    .values(online=flag, last_seen=seen)
                )
            if states:
                self._reconcile(s, states, now)
            if not events:
                return
            ids = sorted({d for d, _ in events})
            active: dict[str, list[m.RolloutDevice]] = {}
            for i in range(0, len(ids), 500):
                q = select(m.RolloutDevice).where(
                    m.RolloutDevice.device_id.in_(ids[i : i + 500]),
                    m.RolloutDevice.state.in_(_ACTIVE),
                )
                for rd in s.scalars(q):
                    active.setdefault(rd.device_id, []).append(rd)
            for device_id, event in events:
                self._event(s, active.get(device_id, []), device_id, event, now)

    @staticmethod
    def _reconcile(s: Any, states: dict[str, dict[str, Any]], now: float) -> None:
        """Results a lost event would have carried, read from the retained state.

        A device whose active slot now holds its rollout's target image has succeeded; a
        ``last_result`` in the state counts like the result event. So a controller killed
        after the broker delivered an event, before it was written, still learns the result
        when it re-reads the retained states on start.
        """
        ids = sorted(states)
        for i in range(0, len(ids), 500):
            q = (
                select(m.RolloutDevice, m.Release.target_sha256, m.Release.bundle_id)
                .join(m.Rollout, m.Rollout.id == m.RolloutDevice.rollout_id)
                .join(m.Release, m.Release.bundle_id == m.Rollout.release_id)
                .where(
                    m.RolloutDevice.device_id.in_(ids[i : i + 500]),
                    m.RolloutDevice.state.in_(_ACTIVE),
                )
            )
            for rd, target, bundle_id in s.execute(q).all():
                state = states[rd.device_id]
                outcome = None
                last = state.get("last_result")
                if isinstance(last, Mapping) and last.get("bundle_id") == bundle_id:
                    outcome = last.get("outcome")
                elif rd.state == DS.COMMANDED.value and _active_digest(state) == target:
                    outcome = "committed"
                if isinstance(outcome, str):
                    new = next_state(DS(rd.state), outcome)
                    if new is not None:
                        rd.state, rd.updated_at = new.value, now
                        if new is DS.FAILED:
                            code = last.get("code") if isinstance(last, Mapping) else None
                            rd.error = code[:200] if isinstance(code, str) else outcome[:200]

    @staticmethod
    def _event(
        s: Any, rows: list[m.RolloutDevice], device_id: str, event: Mapping[str, Any], now: float
    ) -> None:
        health = _numbers(event.get("health"))
        if health is not None:
            s.execute(update(m.Device).where(m.Device.id == device_id).values(health=health))
        kind = event.get("type")
        if not rows or kind not in {"result", "phase"}:
            return
        bundle = event.get("bundle_id")
        rd = next((r for r in rows if r.payload_id == bundle), None) if bundle else None
        rd = rd or max(rows, key=lambda r: r.counter or 0)
        phase = event.get("phase")
        if isinstance(phase, str):
            rd.phase = phase[:30]
        progress = event.get("progress")
        if type(progress) is int and 0 <= progress <= 100:
            rd.progress = progress
        if kind == "result":
            outcome = event.get("outcome")
            new = next_state(DS(rd.state), outcome if isinstance(outcome, str) else "")
            if new is not None:
                rd.state = new.value
                if new is DS.FAILED:
                    code = event.get("code")
                    rd.error = code[:200] if isinstance(code, str) else str(outcome)[:200]
        rd.updated_at = now


def _utc(ts: float) -> Any:
    import datetime as dt  # noqa: PLC0415

    return dt.datetime.fromtimestamp(ts, dt.UTC)
