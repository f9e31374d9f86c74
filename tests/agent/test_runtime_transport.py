"""The daemon path without MQTT: commands and chunks through a Transport, run() end to end.

``LinkTransport`` implements the Transport port in memory, as the simulator does; the rest is
production code (runtime, verifier with real signatures, file slots on FaultFS, U-Boot model).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Mapping
from typing import Any

from agent_device import SLOT_A, Device, derived, image
from test_bad_input import KEYS, NOW, _trust

from agent.adapters.bootenv import RedundantEnv, SimBootloader
from agent.adapters.slots import FileSlots
from agent.adapters.state_file import FileJournal
from agent.core.states import BootSlot, Phase
from agent.runtime import Agent, AgentConfig
from agent.selftest import Check, SelfTestRunner
from agent.verify import BundleVerifier
from firmware_bundles.bundle import build_bundle
from firmware_bundles.commands import Action, sign_command
from firmware_bundles.errors import TransferError
from firmware_bundles.manifest import Manifest
from firmware_bundles.slb import SlbReader

OLD = image(1)
NEW = derived(OLD, 7)


class LinkTransport:
    def __init__(self, chunks: dict[str, list[bytes]], *, drop_first: int = 0) -> None:
        self.chunks = chunks
        self.connected = False
        self.inbox: asyncio.Queue[bytes] = asyncio.Queue()
        self.events: list[Mapping[str, Any]] = []
        self.states: list[Mapping[str, Any]] = []
        self.drop_first = drop_first
        self.requests: list[list[int]] = []

    async def start(self) -> None:
        self.connected = True

    async def stop(self) -> None:
        self.connected = False

    async def _cmds(self) -> AsyncIterator[bytes]:
        while True:
            yield await self.inbox.get()

    def commands(self) -> AsyncIterator[bytes]:
        return self._cmds()

    async def publish_state(self, state: Mapping[str, Any]) -> None:
        self.states.append(json.loads(json.dumps(state)))

    async def publish_event(self, event: Mapping[str, Any]) -> None:
        self.events.append(event)

    async def _fetch(self, bundle_id: str, indices: list[int]) -> AsyncIterator[tuple[int, bytes]]:
        self.requests.append(indices)
        # deliver pairs swapped (out of order), and lose the link once if asked
        order = []
        for k in range(0, len(indices), 2):
            order += list(reversed(indices[k : k + 2]))
        for n, i in enumerate(order):
            if self.drop_first and n == 3:
                self.drop_first -= 1
                raise TransferError("link lost")
            yield i, self.chunks[bundle_id][i]
            await asyncio.sleep(0)

    def fetch_chunks(self, bundle_id: str, indices: list[int]) -> AsyncIterator[tuple[int, bytes]]:
        return self._fetch(bundle_id, indices)

    async def reachable(self, timeout: float) -> bool:
        return self.connected


def _agent(dev: Device, slot: BootSlot, transport: LinkTransport) -> Agent:
    return Agent(
        AgentConfig(
            device_id="dev-1",
            hardware="board-x",
            factory_version="1.0",
            factory_size=len(OLD),
            checkpoint_bytes=16 * 1024,
            retry_base=0.0,
        ),
        slots=FileSlots(SLOT_A, "/dev/slot-b", booted=slot, capacity=64 * 1024, fs=dev.fs),
        bootenv=RedundantEnv("/boot/uboot.env", fs=dev.fs),
        journal=FileJournal("/data/agent/journal.json", fs=dev.fs),
        clock=_Clock(),
        power=_Power(),
        booted=slot,
        transport=transport,
        verifier=BundleVerifier(_trust(), device_id="dev-1", hardware="board-x"),
        selftest=SelfTestRunner(
            [Check("controller", timeout=1.0), Check("file", path=dev.ok_path)],
            deadline=5,
            transport=transport,
        ),
    )


class _Clock:
    def now(self) -> float:
        return NOW

    def monotonic(self) -> float:
        return 0.0


class _Power:
    async def reboot(self) -> None:
        pass


def test_network_update_through_run_commits_with_controller_check(tmp_path) -> None:
    (tmp_path / "old.img").write_bytes(OLD)
    (tmp_path / "new.img").write_bytes(NEW)
    build_bundle(
        tmp_path / "new.img",
        tmp_path / "u.slb",
        release_keys=[KEYS[1]],
        version="2.0",
        hardware=["board-x"],
        now=NOW,
        base=tmp_path / "old.img",
        security_version=1,
        chunk_out_size=4096,
    )
    with (tmp_path / "u.slb").open("rb") as f:
        reader = SlbReader(f)
        manifest = json.loads(reader.read_header().manifest)
        chunks = list(reader.iter_chunks(Manifest.from_signed(manifest["signed"]).payload.chunks))
    bid = manifest["signed"]["bundle_id"]
    dev = Device(OLD)
    dev.learn(OLD, "good")
    dev.learn(NEW, "good")
    link = LinkTransport({bid: chunks}, drop_first=1)
    cmd = sign_command(
        [KEYS[2]],
        device="dev-1",
        counter=3,
        action=Action.INSTALL,
        args={"bundle_id": bid, "manifest": manifest, "rollout": "r-9"},
        issued=NOW,
    )

    async def first_boot() -> str:
        slot = SimBootloader(RedundantEnv("/boot/uboot.env", fs=dev.fs)).boot()
        agent = _agent(dev, slot, link)
        link.inbox.put_nowait(cmd)
        return await asyncio.wait_for(agent.run(), 20)

    assert asyncio.run(first_boot()) == "reboot"
    assert len(link.requests) >= 2  # the lost link was resumed from the first missing chunk
    assert any(e.get("code") == "transfer.error" for e in link.events)
    assert link.states[-1]["phase"] == "staged"
    assert link.states[-1]["update"]["rollout"] == "r-9"

    async def second_boot() -> Agent:
        slot = SimBootloader(RedundantEnv("/boot/uboot.env", fs=dev.fs)).boot()
        assert slot is BootSlot.B
        link.connected = False  # a new boot: the transport connects when run() starts it
        link.inbox = asyncio.Queue()
        agent = _agent(dev, slot, link)
        task = asyncio.create_task(agent.run())
        for _ in range(200):
            await asyncio.sleep(0.01)
            if agent.started and not agent.state.phase.busy:
                break
        agent.stop()
        assert await task == "stopped"
        return agent

    agent = asyncio.run(second_boot())
    assert agent.state.phase is Phase.COMMITTED
    assert agent.state.version == "2.0"
    assert agent.state.security_version == 1
    assert link.states[-1]["phase"] == "committed"
    assert any(e.get("outcome") == "committed" for e in link.events)
