"""Named after failures: each ends on the old slot, untouched, with a stable code, ready again.

Checked after every failure: the active slot's bytes are unchanged, the inactive slot is not
bootable (boot env points at the old slot with no trial; journal does not call it GOOD), the
last result carries the expected code, and the same device then takes a good update.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from dataclasses import replace
from pathlib import Path

import pytest
from agent_device import (
    SLOT_A,
    SLOT_B,
    Device,
    derived,
    image,
    install_command,
    make_bundle,
    role_keys,
    signed_release,
    signed_root,
)

from agent.adapters.bootenv import RedundantEnv, env_view
from agent.core.events import CancelRequested, RollbackRequested
from agent.core.states import BootSlot, BootState, ChunkSpec, Phase
from agent.runtime import MemorySource
from agent.selftest import CommandMigrations
from agent.verify import BundleVerifier
from firmware_bundles.trust import TrustStore

ENV = "/boot/uboot.env"
OLD = image(1)
NEW = derived(OLD, 7)
NEWER = derived(NEW, 9)


def device(**behaviour: str) -> Device:
    dev = Device(OLD)
    dev.learn(OLD, "good")
    dev.learn(NEW, behaviour.get("new", "good"))
    dev.learn(NEWER, "good")
    return dev


def assert_safe(dev: Device, code: str | None) -> None:
    agent = dev.last_agent
    assert agent is not None
    st = agent.state
    assert dev.boots[-1] is BootSlot.A
    assert st.primary is BootSlot.A
    assert dev.fs.content(SLOT_A)[: len(OLD)] == OLD  # active slot untouched
    env = env_view(RedundantEnv(ENV, fs=dev.fs).read())
    assert env.boot_part is BootSlot.A
    assert not env.upgrade_available
    assert st.slot(BootSlot.B).state is not BootState.GOOD
    assert not st.phase.busy
    if code is not None:
        assert st.last_result is not None
        assert st.last_result.code == code, st.last_result
    # ready for the next update
    good = make_bundle(NEWER, version="3.0", secver=2)
    assert dev.run(good) == "settled"
    assert dev.last_agent.state.version == "3.0"


def test_failing_self_test_reverts() -> None:
    dev = device(new="fails")
    assert dev.run(make_bundle(NEW, version="2.0")) == "settled"
    assert_safe(dev, "selftest.failed")


def test_hung_self_test_reverts() -> None:
    dev = device(new="hangs")
    t = time.monotonic()
    assert dev.run(make_bundle(NEW, version="2.0")) == "settled"
    assert time.monotonic() - t < 10
    assert_safe(dev, "selftest.timeout")


def test_self_test_past_its_overall_deadline_reverts() -> None:
    dev = device(new="slow")
    assert dev.run(make_bundle(NEW, version="2.0")) == "settled"
    assert_safe(dev, "selftest.timeout")


def test_crashing_self_test_reverts() -> None:
    dev = device(new="crashes")
    assert dev.run(make_bundle(NEW, version="2.0")) == "settled"
    assert_safe(dev, "selftest.crashed")


def test_never_booting_image_falls_back() -> None:
    dev = device(new="never_boots")
    assert dev.run(make_bundle(NEW, version="2.0")) == "settled"
    assert dev.boots.count(BootSlot.B) == 3  # bootlimit tries, then altbootcmd
    assert_safe(dev, "boot.fallback")


def test_full_disk_fails_cleanly() -> None:
    dev = device()
    dev.fs.no_space_after = 0  # slot files are pre-sized; the journal still fits... until growth
    dev.fs.io_error_paths = set()
    # make the slot itself report ENOSPC on its first write
    real = dev.fs.pwrite

    def pwrite(handle, offset, data):
        if dev.fs._handles[handle].path == SLOT_B:
            raise OSError(28, "No space left on device", SLOT_B)
        return real(handle, offset, data)

    dev.fs.no_space_after = None
    dev.fs.pwrite = pwrite
    assert dev.run(make_bundle(NEW, version="2.0")) == "settled"
    dev.fs.pwrite = real
    assert_safe(dev, "slot.no_space")


def test_io_error_on_inactive_slot_fails_cleanly() -> None:
    dev = device()
    dev.fs.io_error_paths = {SLOT_B}
    assert dev.run(make_bundle(NEW, version="2.0")) == "settled"
    dev.fs.io_error_paths = set()
    assert_safe(dev, "slot.io_error")


def test_readonly_medium_midway_fails_cleanly() -> None:
    dev = device()
    dev.fs.readonly_after_n_writes = 3
    with pytest.raises(Exception, match=r"journal|read-only"):
        dev.run(make_bundle(NEW, version="2.0"))
    # the agent halted rather than act without a journal; after the medium recovers it carries on
    dev.fs.readonly_after_n_writes = None
    assert dev.run(None) == "settled"
    st = dev.last_agent.state
    assert st.primary is BootSlot.A or st.version == "2.0"


def test_corrupt_chunks_are_refetched_then_the_update_fails() -> None:
    dev = device()
    b = make_bundle(NEW, version="2.0")
    bad = replace(b, chunks=(b"\x00" * len(b.chunks[0]), *b.chunks[1:]))
    assert dev.run(bad) == "settled"
    assert_safe(dev, "bundle.digest_mismatch")


def test_truncated_source_fails_cleanly() -> None:
    dev = device()
    b = make_bundle(NEW, version="2.0")
    short = replace(b, chunks=b.chunks[:2])

    async def go():
        await dev.boot({}, None)
        agent = dev.last_agent
        await agent.install(short.release, MemorySource(short.chunks))
        return agent

    agent = asyncio.run(go())
    assert agent.state.phase is Phase.FAILED
    assert dev.run(None) == "settled"
    assert_safe(dev, "bundle.truncated")


def test_lying_chunk_table_is_caught_by_the_image_digest() -> None:
    dev = device()
    b = make_bundle(NEW, version="2.0")
    lie = replace(b, release=replace(b.release, target_sha256=hashlib.sha256(b"other").hexdigest()))
    assert dev.run(lie) == "settled"
    assert_safe(dev, "bundle.digest_mismatch")


def test_delta_for_another_base_is_rejected() -> None:
    dev = device()
    b = make_bundle(NEW, version="2.0", base=NEWER)
    assert dev.run(b) == "settled"
    assert_safe(dev, "bundle.base_mismatch")


def test_security_version_rollback_is_rejected() -> None:
    dev = device()
    assert dev.run(make_bundle(NEW, version="2.0", secver=5)) == "settled"
    assert dev.last_agent.state.security_version == 5
    old = make_bundle(NEWER, version="3.0", secver=4)
    assert dev.run(old) == "settled"
    r = dev.last_agent.state.last_result
    assert r.outcome == "rejected"
    assert r.code == "bundle.version_rollback"
    assert dev.last_agent.state.version == "2.0"


def test_oversized_chunk_table_is_rejected() -> None:
    dev = device()
    b = make_bundle(NEW, version="2.0")
    huge = replace(
        b,
        release=replace(
            b.release,
            target_size=10**9,
            chunks=(*b.release.chunks, ChunkSpec(1, "0" * 64, 10**9 - len(NEW))),
        ),
    )
    assert dev.run(huge) == "settled"
    r = dev.last_agent.state.last_result
    assert r.outcome == "rejected"
    assert r.code == "slot.too_small"


def test_migration_failure_reverts_and_is_undone() -> None:
    dev = device()
    log = []
    marker = dev.ok_path + ".migrated"

    class Hooks(CommandMigrations):
        pass

    dev.migrations = CommandMigrations(
        migrate=("sh", "-c", f"echo migrated > {marker}; exit 3"),
        undo_argv=("sh", "-c", f"rm -f {marker}"),
    )
    assert dev.run(make_bundle(NEW, version="2.0")) == "settled"
    assert not Path(marker).exists()
    del log, Hooks
    dev.migrations = None
    assert_safe(dev, "migration.failed")


def test_killed_during_install_resumes() -> None:
    dev = device()
    b = make_bundle(NEW, version="2.0")
    # cut power in the middle of the download (after a checkpoint)
    end = asyncio.run(dev.arun(b, cut_after=25))
    assert end == "settled"
    assert dev.cuts == 1
    assert dev.last_agent.state.version == "2.0"


def test_cancel_during_download_abandons_cleanly() -> None:
    dev = device()
    b = make_bundle(NEW, version="2.0")

    class SlowSource:
        async def fetch(self, start, count):
            for i in range(start, count):
                yield i, b.chunks[i]
                await asyncio.sleep(0.05)

    async def go():
        await dev.boot({}, None)
        agent = dev.last_agent
        task = asyncio.create_task(agent.install(b.release, SlowSource()))
        await asyncio.sleep(0.08)
        await agent._feed(CancelRequested())
        await task
        return agent

    agent = asyncio.run(go())
    assert agent.state.phase is Phase.FAILED
    assert dev.run(None) == "settled"
    assert_safe(dev, "agent.cancelled")


# --- signed commands through the real verifier ------------------------------------------

KEYS = role_keys(1)
NOW = 1_800_000_000


def _trust() -> TrustStore:
    return TrustStore.from_root_bytes(signed_root(KEYS, NOW))


@pytest.fixture(scope="module")
def signed_manifest(tmp_path_factory):
    return signed_release(tmp_path_factory.mktemp("slb"), NEW, KEYS, NOW)


def _cmd(signed, *, device="dev-1", counter=1, issued=NOW, expires=None, key=KEYS[2]) -> bytes:
    return install_command(signed[0], key, device=device, counter=counter, issued=issued,
                           expires=expires)


@pytest.mark.parametrize(
    ("kw", "code"),
    [
        ({"device": "dev-2"}, "command.wrong_device"),
        ({"counter": 0}, "command.replayed"),
        ({"issued": NOW - 7200, "expires": NOW - 3600}, "command.expired"),
        ({"key": KEYS[1]}, "command.signature_invalid"),
    ],
)
def test_bad_command_is_rejected_and_touches_nothing(signed_manifest, kw, code) -> None:
    dev = device()
    verifier = BundleVerifier(_trust(), device_id="dev-1", hardware="board-x")

    async def go():
        await dev.boot({}, None)
        agent = dev.last_agent
        agent.verifier = verifier
        agent.clock.t = NOW
        await agent.handle_command(_cmd(signed_manifest, **kw))
        return agent

    agent = asyncio.run(go())
    assert agent.state.last_result.code == code
    assert dev.run(None) == "settled"
    assert_safe(dev, code)


def test_good_signed_command_installs(signed_manifest) -> None:
    dev = device()
    verifier = BundleVerifier(_trust(), device_id="dev-1", hardware="board-x")

    async def go():
        await dev.boot({}, None)
        agent = dev.last_agent
        agent.verifier = verifier
        agent.clock.t = NOW
        await agent.handle_command(_cmd(signed_manifest, counter=7))
        return agent

    manifest, chunks = signed_manifest
    bid = manifest["signed"]["bundle_id"]

    async def go2():
        await dev.boot({bid: chunks}, None)
        agent = dev.last_agent
        agent.verifier = verifier
        agent.clock.t = NOW
        await agent.handle_command(_cmd(signed_manifest, counter=7))
        await agent.wait_download()
        return agent

    agent = asyncio.run(go())
    assert agent.state.last_result.code == "transfer.error"  # no source without a transport
    agent = asyncio.run(go2())
    assert agent.rebooting
    assert agent.state.last_counter == 7
    asyncio.run(dev.boot({bid: chunks}, None))
    assert dev.boots[-1] is BootSlot.B
    assert dev.last_agent.state.version == "2.0"
    assert dev.last_agent.state.phase is Phase.COMMITTED


def test_wrong_hardware_manifest_is_rejected(signed_manifest) -> None:
    dev = device()
    verifier = BundleVerifier(_trust(), device_id="dev-1", hardware="board-y")

    async def go():
        await dev.boot({}, None)
        agent = dev.last_agent
        agent.verifier = verifier
        agent.clock.t = NOW
        await agent.handle_command(_cmd(signed_manifest))
        return agent

    agent = asyncio.run(go())
    assert agent.state.last_result.code == "bundle.hardware_mismatch"
    assert dev.run(None) == "settled"
    assert_safe(dev, "bundle.hardware_mismatch")


def test_fleet_rollback_returns_to_the_good_old_slot() -> None:
    dev = device()
    assert dev.run(make_bundle(NEW, version="2.0")) == "settled"
    assert dev.last_agent.state.version == "2.0"

    async def go():
        await dev.boot({}, None)
        await dev.last_agent._feed(RollbackRequested(counter=3))
        return dev.last_agent

    agent = asyncio.run(go())
    assert agent.rebooting
    assert dev.run(None) == "settled"
    assert dev.boots[-1] is BootSlot.A
    assert dev.last_agent.state.version == "1.0"
    assert dev.last_agent.state.last_result.outcome == "rolled_back"


@pytest.mark.parametrize("damage", ["garbage", "wiped", "inconsistent"])
def test_lost_journal_during_a_trial_goes_back_to_the_old_slot(damage) -> None:
    dev = device()
    b = make_bundle(NEW, version="2.0")

    async def stage():
        await dev.boot({}, None)
        await dev.last_agent.install(b.release, MemorySource(b.chunks))

    asyncio.run(stage())
    assert dev.last_agent.rebooting  # staged: the next boot is the trial of slot B
    journal = "/data/agent/journal.json"
    if damage == "garbage":
        dev.fs.put(journal, b"\x00garbage")
    elif damage == "wiped":
        dev.fs.unlink(journal)
    else:
        doc = json.loads(dev.fs.content(journal))
        doc["update"] = None  # staged without an update
        dev.fs.put(journal, json.dumps(doc).encode())
    assert dev.run(None) == "settled"
    assert dev.boots[-2] is BootSlot.B  # the trial boot happened...
    assert_safe(dev, None)  # ...and the device went back to A, untouched, and updates again
