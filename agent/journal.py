"""The journal: the agent's state as one versioned JSON document.

Rules:
- ``encode``/``decode`` are pure; the store (``agent/adapters/state_file.py``) replaces the file
  atomically (temp, fsync, rename, fsync dir), so a power cut leaves the old or the new document.
- Every document carries ``schema``. Older schemas are upgraded on load (``_UPGRADES``); a newer
  one raises :class:`JournalSchemaUnsupported` instead of guessing.
- Schema history: 1 = first release (``slots`` as a mapping, no ``fetch_failures``/``migrated``/
  ``failure`` in the update); 2 = current.

    data = encode(state)
    assert decode(data) == replace(state, booted=None)
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, replace
from typing import Any

from agent.core.states import (
    MAX_ATTEMPTS,
    AgentState,
    BootSlot,
    BootState,
    InstallPlan,
    PayloadKind,
    Phase,
    PlannedChunk,
    Result,
    SlotInfo,
    Update,
)
from agent.errors import JournalCorrupt, JournalSchemaUnsupported

SCHEMA = 2


def _slot(d: dict[str, Any]) -> SlotInfo:
    return SlotInfo(BootState(d["state"]), d.get("version"), d.get("sha256"), d.get("size"))


def _result(d: dict[str, Any] | None) -> Result | None:
    if d is None:
        return None
    return Result(
        d["outcome"], d.get("code"), d.get("message", ""), d.get("bundle_id"), d.get("version")
    )


def _plan(d: dict[str, Any]) -> InstallPlan:
    return InstallPlan(
        bundle_id=d["bundle_id"],
        version=d["version"],
        security_version=int(d["security_version"]),
        target_slot=BootSlot(d["target_slot"]),
        kind=PayloadKind(d["kind"]),
        base_slot=BootSlot(d["base_slot"]) if d.get("base_slot") else None,
        target_size=int(d["target_size"]),
        target_sha256=d["target_sha256"],
        chunks=tuple(PlannedChunk(*c) for c in d["chunks"]),
        checkpoint_bytes=int(d["checkpoint_bytes"]),
        rollout=d.get("rollout"),
        from_version=d.get("from_version"),
    )


def _plan_doc(p: InstallPlan) -> dict[str, Any]:
    return {
        "bundle_id": p.bundle_id,
        "version": p.version,
        "security_version": p.security_version,
        "target_slot": p.target_slot.value,
        "kind": p.kind.value,
        "base_slot": p.base_slot.value if p.base_slot else None,
        "target_size": p.target_size,
        "target_sha256": p.target_sha256,
        # compact rows: [index, offset, size, sha256, out_size]
        "chunks": [[c.index, c.offset, c.size, c.sha256, c.out_size] for c in p.chunks],
        "checkpoint_bytes": p.checkpoint_bytes,
        "rollout": p.rollout,
        "from_version": p.from_version,
    }


def _slot_doc(s: SlotInfo) -> dict[str, Any]:
    return {"state": s.state.value, "version": s.version, "sha256": s.sha256, "size": s.size}


def encode(state: AgentState) -> bytes:
    """The journal document for ``state`` (``booted`` is not persisted: each boot sets it)."""
    u = state.update
    doc: dict[str, Any] = {
        "schema": SCHEMA,
        "phase": state.phase.value,
        "primary": state.primary.value,
        "slot_a": _slot_doc(state.slot_a),
        "slot_b": _slot_doc(state.slot_b),
        "security_version": state.security_version,
        "last_counter": state.last_counter,
        "last_result": asdict(state.last_result) if state.last_result else None,
        "update": None
        if u is None
        else {
            "plan": _plan_doc(u.plan),
            "written": u.written,
            "attempts": u.attempts,
            "fetch_failures": u.fetch_failures,
            "migrated": u.migrated,
            "failure": asdict(u.failure) if u.failure else None,
        },
    }
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def _from_v1(doc: dict[str, Any]) -> dict[str, Any]:
    slots = doc.pop("slots")
    doc["slot_a"], doc["slot_b"] = slots["a"], slots["b"]
    if doc.get("update"):
        doc["update"].setdefault("fetch_failures", 0)
        doc["update"].setdefault("migrated", False)
        doc["update"].setdefault("failure", None)
    doc["schema"] = 2
    return doc


_UPGRADES: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {1: _from_v1}


def decode(data: bytes) -> AgentState:
    """Parse (and upgrade) a journal document.

    Raises:
        JournalCorrupt: not a journal document.
        JournalSchemaUnsupported: written by a newer agent.
    """
    try:
        doc = json.loads(data)
        schema = int(doc["schema"])
    except (ValueError, KeyError, TypeError, AttributeError, IndexError) as e:
        raise JournalCorrupt(f"journal does not decode: {e}") from e
    if schema > SCHEMA:
        raise JournalSchemaUnsupported(f"journal schema {schema} > {SCHEMA}")
    if schema not in _UPGRADES and schema != SCHEMA:
        raise JournalCorrupt(f"journal schema {schema} never existed")
    try:
        while schema < SCHEMA:
            doc = _UPGRADES[schema](doc)
            schema = int(doc["schema"])
        u = doc["update"]
        update = None
        if u is not None:
            update = Update(
                plan=_plan(u["plan"]),
                written=int(u["written"]),
                attempts=int(u["attempts"]),
                fetch_failures=int(u["fetch_failures"]),
                migrated=bool(u["migrated"]),
                failure=_result(u["failure"]),
            )
        state = AgentState(
            phase=Phase(doc["phase"]),
            primary=BootSlot(doc["primary"]),
            slot_a=_slot(doc["slot_a"]),
            slot_b=_slot(doc["slot_b"]),
            security_version=int(doc["security_version"]),
            last_counter=int(doc["last_counter"]),
            update=update,
            last_result=_result(doc["last_result"]),
        )
    except (ValueError, KeyError, TypeError, AttributeError, IndexError) as e:
        raise JournalCorrupt(f"journal does not decode: {e}") from e
    _check_consistent(state)
    return state


def _check_consistent(s: AgentState) -> None:
    """Refuse a document the core could not act on (the runtime then starts from the env)."""
    problems = []
    if s.phase.busy != (s.update is not None):
        problems.append(f"phase {s.phase.value} with{'out' if s.update is None else ''} an update")
    if s.slot(s.primary).state is not BootState.GOOD:
        problems.append("primary slot is not GOOD")
    if s.security_version < 0 or s.last_counter < 0:
        problems.append("negative counters")
    u = s.update
    if u is not None:
        if u.plan.target_slot is s.primary:
            problems.append("update targets the primary slot")
        if not 0 <= u.written <= len(u.plan.chunks) or not 0 <= u.attempts <= MAX_ATTEMPTS:
            problems.append("progress out of range")
        if u.fetch_failures < 0 or [c.index for c in u.plan.chunks] != list(
            range(len(u.plan.chunks))
        ):
            problems.append("chunk table out of order")
        if u.plan.kind is PayloadKind.DELTA and u.plan.base_slot is not s.primary:
            problems.append("delta base is not the primary slot")
    if problems:
        raise JournalCorrupt("inconsistent journal: " + "; ".join(problems))


def persisted(state: AgentState) -> AgentState:
    """What ``decode(encode(state))`` gives back (for comparisons)."""
    u = state.update
    if u is not None:
        u = replace(u, pending=0)
    return replace(state, booted=None, update=u)
