"""Journal (versioned, atomic) and slot adapters (file, block device)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.adapters.faultfs import FaultFS, PowerCut
from agent.adapters.slots import BlockSlots, FileSlots
from agent.adapters.state_file import FileJournal
from agent.core.events import Booted, EnvView
from agent.core.machine import step
from agent.core.states import AgentState, BootSlot, BootState, Phase, Result, SlotInfo
from agent.errors import (
    ActiveSlotWrite,
    JournalCorrupt,
    JournalError,
    JournalSchemaUnsupported,
    SlotError,
)
from agent.journal import SCHEMA, decode, encode, persisted

DATA = Path(__file__).parent / "data"


def _state() -> AgentState:
    s = AgentState.initial(BootSlot.A, SlotInfo(BootState.GOOD, "1.0", "0" * 64, 200))
    return replace(
        s, security_version=2, last_result=Result("failed", "slot.io_error", "x", "b", "2")
    )


def test_journal_roundtrip() -> None:
    s = _state()
    assert decode(encode(s)) == persisted(s)
    assert b'"schema":%d' % SCHEMA in encode(s)


def test_journal_from_schema_1_loads_and_resumes() -> None:
    s = decode((DATA / "journal_v1.json").read_bytes())
    assert s.phase is Phase.DOWNLOADING
    assert s.update is not None
    assert s.update.written == 1
    assert s.update.migrated is False
    assert s.update.fetch_failures == 0
    assert s.update.plan.chunks[1].offset == 100
    assert s.update.plan.rollout == "r1"
    assert s.slot(BootSlot.A).version == "1.0"
    assert s.security_version == 2
    assert decode(encode(s)) == persisted(s)  # and it saves as the current schema


def test_journal_from_a_newer_agent_is_refused() -> None:
    with pytest.raises(JournalSchemaUnsupported):
        decode(b'{"schema": 99}')


@pytest.mark.parametrize("raw", [b"", b"{", b"[]", b'{"schema":2}', b'{"schema":"x"}'])
def test_corrupt_journal(raw) -> None:
    with pytest.raises(JournalCorrupt):
        decode(raw)


def test_journal_save_is_atomic_under_every_cut() -> None:
    old, new = encode(_state()), encode(replace(_state(), security_version=9))
    total = None
    for k in range(1, 20):
        for mode in ("drop", "tear", "keep"):
            fs = FaultFS()
            j = FileJournal("/data/j.json", fs=fs)
            j.save(old)
            fs.settle()
            start = fs.ops
            fs.cut_after = start + k
            try:
                j.save(new)
                total = fs.ops - start
            except PowerCut:
                pass
            got = FileJournal("/data/j.json", fs=fs.crash(mode)).load()
            assert got in (old, new), (k, mode, got)
    assert total is not None
    assert total <= 6


def test_file_slots_are_sparse_and_the_booted_one_is_never_writable(tmp_path) -> None:
    a, b = tmp_path / "a.img", tmp_path / "b.img"
    a.write_bytes(b"old" * 100)
    slots = FileSlots(str(a), str(b), booted=BootSlot.A, capacity=64 << 20)
    slots.write(BootSlot.B, 1 << 20, b"new")
    slots.sync(BootSlot.B)
    assert b.stat().st_size == 64 << 20
    assert b.stat().st_blocks * 512 < 1 << 20
    with pytest.raises(ActiveSlotWrite):
        slots.write(BootSlot.A, 0, b"x")
    with pytest.raises(ActiveSlotWrite):
        slots.sync(BootSlot.A)
    with pytest.raises(SlotError):
        slots.write(BootSlot.B, (64 << 20) - 1, b"xx")
    assert a.read_bytes() == b"old" * 100
    assert slots.digest(BootSlot.B, 3) == hashlib.sha256(b"\0\0\0").hexdigest()
    # the booted slot's handle is read-only: even below the guard the OS refuses a write
    with pytest.raises(OSError):
        os.pwrite(slots._handle(BootSlot.A), b"x", 0)
    slots.close()


def _loop(path: Path) -> str | None:
    if os.geteuid() != 0 or shutil.which("losetup") is None:
        return None
    done = subprocess.run(
        ["losetup", "-f", "--show", str(path)], capture_output=True, text=True, check=False
    )
    return done.stdout.strip() if done.returncode == 0 else None


def test_block_slots_on_loop_devices_read_back_from_the_device(tmp_path) -> None:
    a, b = tmp_path / "a.img", tmp_path / "b.img"
    a.write_bytes(os.urandom(1 << 20))
    b.write_bytes(b"\0" * (1 << 20))
    dev_a, dev_b = _loop(a), _loop(b)
    try:
        if dev_a is None or dev_b is None:
            pytest.skip("no loop devices here (needs root and losetup)")
        slots = BlockSlots(dev_a, dev_b, booted=BootSlot.A)
        assert slots.size(BootSlot.B) == 1 << 20
        img = os.urandom(300_000)
        slots.write(BootSlot.B, 0, img)
        slots.sync(BootSlot.B)
        assert slots.digest(BootSlot.B, len(img)) == hashlib.sha256(img).hexdigest()
        with pytest.raises(ActiveSlotWrite):
            slots.write(BootSlot.A, 0, b"x")
        slots.close()
        assert b.read_bytes()[: len(img)] == img  # it reached the backing medium
    finally:
        for d in (dev_a, dev_b):
            if d:
                subprocess.run(["losetup", "-d", d], check=False)


def test_block_slots_missing_device_is_a_stable_error(tmp_path) -> None:
    slots = BlockSlots(str(tmp_path / "nope-a"), str(tmp_path / "nope-b"), booted=BootSlot.A)
    with pytest.raises(SlotError) as e:
        slots.write(BootSlot.B, 0, b"x")
    assert e.value.code == "slot.io_error"


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_hostile_journal_documents_never_crash_the_loader(data) -> None:
    """Any mutation of a valid journal either loads or raises a JournalError (with its code)."""
    doc = json.loads(encode(_state()))
    doc["update"] = json.loads((DATA / "journal_v1.json").read_text())["update"]
    doc["update"].update(fetch_failures=0, migrated=False, failure=None)
    doc["phase"] = data.draw(st.sampled_from(["downloading", "staged", "self_test", "reverting"]))
    decode(json.dumps(doc).encode())  # the unmutated base is a valid journal
    path = data.draw(st.lists(st.sampled_from(sorted(_paths(doc))), min_size=1, max_size=1))[0]
    value = data.draw(
        st.one_of(
            st.none(),
            st.integers(),
            st.text(max_size=5),
            st.lists(st.integers(), max_size=3),
            st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
        )
    )
    _set(doc, path, value)
    try:
        state = decode(json.dumps(doc).encode())
    except JournalError as e:
        code = e.code
        assert code.startswith("journal.")
        return
    # whatever loads, the core can reconcile it with any boot, without raising
    for slot in BootSlot:
        for env in (EnvView(slot, False, 0), EnvView(slot, True, 2), EnvView(None, False, 0)):
            step(state, Booted(slot, env))


def _paths(doc, prefix=()):
    out = {prefix} if prefix else set()
    if isinstance(doc, dict):
        for k, v in doc.items():
            out |= _paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc[:2]):
            out |= _paths(v, (*prefix, i))
    return out


def _set(doc, path, value):
    for p in path[:-1]:
        doc = doc[p]
    doc[path[-1]] = value
