"""The daemon's command verifier runs in a child process: same verdicts, and a failing child
never lets a command through. The daemon's own process loads neither crypto nor numpy."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import os
import subprocess
import sys

import pytest
from agent_device import (
    SLOT_B,
    Device,
    derived,
    image,
    install_command,
    role_keys,
    signed_release,
    signed_root,
)

from agent.core.states import AgentState, BootSlot, BootState, Phase, SlotInfo
from agent.errors import AgentError, VerifierFailed
from agent.verify import BundleVerifier
from agent.verify_child import ChildVerifier, release_doc, release_from_doc
from firmware_bundles.errors import BundleError
from firmware_bundles.trust import TrustStore

KEYS = role_keys(41)
NOW = 1_800_000_000
OLD = image(1)
NEW = derived(OLD, 7)


def _root() -> bytes:
    return signed_root(KEYS, NOW)


@pytest.fixture(scope="module")
def signed(tmp_path_factory):
    return signed_release(tmp_path_factory.mktemp("slb"), NEW, KEYS, NOW)


def _install(signed, *, device="dev-1", counter=1, key=KEYS[2], expires=None, issued=NOW):
    return install_command(signed[0], key, device=device, counter=counter, issued=issued,
                           expires=expires)


def _state(last_counter: int = 0) -> AgentState:
    st = AgentState.initial(BootSlot.A, SlotInfo(BootState.GOOD, "1.0"))
    return dataclasses.replace(st, last_counter=last_counter)


def _child(**kw) -> ChildVerifier:
    return ChildVerifier(_root(), device_id="dev-1", hardware="board-x", **kw)


def test_child_and_in_process_verifier_accept_the_same_install(signed) -> None:
    raw = _install(signed, counter=5)
    inproc = BundleVerifier(
        TrustStore.from_root_bytes(_root()), device_id="dev-1", hardware="board-x"
    ).verify(raw, _state(), NOW)
    child = asyncio.run(_child().verify(raw, _state(), NOW))
    assert child == inproc
    assert child.action == "install"
    assert child.counter == 5
    assert child.release is not None
    assert release_from_doc(release_doc(child.release)) == child.release


@pytest.mark.parametrize(
    ("kw", "last_counter", "code"),
    [
        ({"device": "dev-2"}, 0, "command.wrong_device"),
        ({"counter": 3}, 3, "command.replayed"),
        ({"issued": NOW - 7200, "expires": NOW - 3600}, 0, "command.expired"),
        ({"key": KEYS[1]}, 0, "command.signature_invalid"),
    ],
)
def test_child_refusal_carries_the_in_process_code(signed, kw, last_counter, code) -> None:
    raw = _install(signed, **kw)
    state = _state(last_counter)
    with pytest.raises(BundleError) as inproc:
        BundleVerifier(
            TrustStore.from_root_bytes(_root()), device_id="dev-1", hardware="board-x"
        ).verify(raw, state, NOW)
    assert inproc.value.code == code
    with pytest.raises(AgentError) as child:
        asyncio.run(_child().verify(raw, state, NOW))
    assert child.value.code == code
    assert not isinstance(child.value, VerifierFailed)


def test_untrusted_root_is_refused_by_the_child(signed) -> None:
    bad = ChildVerifier(b"{}", device_id="dev-1", hardware="board-x")
    with pytest.raises(AgentError) as e:
        asyncio.run(bad.verify(_install(signed), _state(), NOW))
    assert e.value.code.startswith("bundle.")


def test_verifier_that_cannot_start_refuses_the_command(signed, tmp_path) -> None:
    missing = _child(argv=[str(tmp_path / "no-such-python"), "-m", "agent.verify_child"])
    with pytest.raises(VerifierFailed):
        asyncio.run(missing.verify(_install(signed), _state(), NOW))


def test_crashed_verifier_refuses_the_command(signed) -> None:
    crashing = _child(argv=[sys.executable, "-c", "import sys; sys.stdin.read(); sys.exit(3)"])
    with pytest.raises(VerifierFailed) as e:
        asyncio.run(crashing.verify(_install(signed), _state(), NOW))
    assert e.value.code == "agent.verifier_failed"


@pytest.mark.parametrize(
    "answer",
    [
        "not json",
        json.dumps({"action": "format_disk", "counter": 1, "release": None}),
        json.dumps({"action": "install", "counter": "1", "release": None}),
        json.dumps({"action": "install", "counter": 1, "release": {"bundle_id": 1}}),
        json.dumps(["install"]),
    ],
)
def test_garbage_answer_refuses_the_command(signed, answer) -> None:
    script = f"import sys; sys.stdin.read(); sys.stdout.write({answer!r})"
    liar = _child(argv=[sys.executable, "-c", script])
    with pytest.raises(VerifierFailed):
        asyncio.run(liar.verify(_install(signed), _state(), NOW))


def test_hung_verifier_is_killed_and_refuses_the_command(signed, tmp_path) -> None:
    pidfile = tmp_path / "pid"
    script = "import os, sys, time; open(sys.argv[1], 'w').write(str(os.getpid())); time.sleep(600)"
    hung = _child(argv=[sys.executable, "-c", script, str(pidfile)], timeout=5.0)
    with pytest.raises(VerifierFailed):
        asyncio.run(hung.verify(_install(signed), _state(), NOW))
    pid = int(pidfile.read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # killed and reaped, not left behind


def test_signed_install_through_the_child_reaches_the_trial(signed) -> None:
    manifest, chunks = signed
    bid = manifest["signed"]["bundle_id"]
    dev = Device(OLD)
    dev.learn(OLD, "good")
    dev.learn(NEW, "good")

    async def go():
        await dev.boot({bid: chunks}, None)
        agent = dev.last_agent
        agent.verifier = _child()
        agent.clock.t = NOW
        await agent.handle_command(_install(signed, counter=9))
        await agent.wait_download()
        return agent

    agent = asyncio.run(go())
    assert agent.rebooting
    assert agent.state.last_counter == 9
    assert agent.state.phase is Phase.STAGED
    assert dev.fs.content(SLOT_B)[: len(NEW)] == NEW


_DAEMON_PATH = """
import asyncio, sys
from pathlib import Path
import agent.cli, agent.adapters.mqtt  # what `slotline agent run` imports
from agent.runtime import _default_decoder
from agent.verify_child import ChildVerifier
from agent.core.states import AgentState, BootSlot, BootState, SlotInfo

class Base:
    def __init__(self, data): self.data, self.size = data, len(data)
    def pread(self, off, n): return self.data[off:off + n]

d = Path(sys.argv[1])
st = AgentState.initial(BootSlot.A, SlotInfo(BootState.GOOD, "1.0"))
v = ChildVerifier((d / "root").read_bytes(), device_id="dev-1", hardware="board-x")
cmd = asyncio.run(v.verify((d / "cmd").read_bytes(), st, float(sys.argv[2])))
assert cmd.action == "install", cmd
decode = _default_decoder()
base = Base((d / "old").read_bytes())
out = b"".join(b"".join(decode((d / f"c{i}").read_bytes(), int(n), base))
               for i, n in enumerate(sys.argv[3:]))
sys.stdout.write(out.hex() + "\\n")
print(",".join(sorted(m for m in ("cryptography", "numpy") if m in sys.modules)))
"""


def test_daemon_process_loads_neither_crypto_nor_numpy(signed, tmp_path) -> None:
    """A verified command and a delta decode leave the daemon without the heavy modules."""
    from firmware_bundles.delta import encode_delta  # noqa: PLC0415

    (tmp_path / "old").write_bytes(OLD)
    (tmp_path / "new").write_bytes(NEW)
    sizes = []
    for i, c in enumerate(encode_delta(tmp_path / "old", tmp_path / "new", chunk_out_size=8192)):
        (tmp_path / f"c{i}").write_bytes(c.data)
        sizes.append(str(c.out_size))
    (tmp_path / "root").write_bytes(_root())
    (tmp_path / "cmd").write_bytes(_install(signed))
    out = subprocess.run(
        [sys.executable, "-c", _DAEMON_PATH, str(tmp_path), str(NOW), *sizes],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    decoded, loaded = out.stdout.splitlines()
    assert hashlib.sha256(bytes.fromhex(decoded)).digest() == hashlib.sha256(NEW).digest()
    assert loaded == ""
