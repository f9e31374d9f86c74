"""A simulated device for agent tests: FaultFS medium, simulated U-Boot, the real agent.

Everything above the medium is production code: FileSlots, FileJournal, RedundantEnv,
SimBootloader, the runtime and the core. Only the medium (FaultFS) and the "what does this image
do when booted" table are simulated.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.adapters.bootenv import DEFAULT_ENV, RedundantEnv, SimBootloader
from agent.adapters.faultfs import FaultFS, PowerCut
from agent.adapters.slots import FileSlots
from agent.adapters.state_file import FileJournal
from agent.core.states import BootSlot, ChunkSpec, PayloadKind, Release
from agent.runtime import Agent, AgentConfig, MemorySource
from agent.selftest import Check, SelfTestRunner
from firmware_bundles.bundle import build_bundle
from firmware_bundles.commands import Action, sign_command
from firmware_bundles.delta import encode_delta, encode_full
from firmware_bundles.keys import SigningKey
from firmware_bundles.manifest import Manifest
from firmware_bundles.slb import SlbReader
from firmware_bundles.trust import Role, make_root, sign_root

SLOT_A, SLOT_B, ENV, JOURNAL = (
    "/dev/slot-a",
    "/dev/slot-b",
    "/boot/uboot.env",
    "/data/agent/journal.json",
)
CAPACITY = 64 * 1024
CHUNK = 8 * 1024


def image(seed: int, size: int = 40 * 1024 + 123) -> bytes:
    """A deterministic pseudo-random image."""
    out = bytearray()
    block = hashlib.sha256(str(seed).encode()).digest()
    while len(out) < size:
        block = hashlib.sha256(block).digest()
        out += block
    return bytes(out[:size])


def derived(base: bytes, seed: int) -> bytes:
    """A new version of ``base``: some bytes changed, a bit appended (delta-friendly)."""
    out = bytearray(base)
    for i in range(0, len(out), 997):
        out[i] = (out[i] + seed) % 256
    return bytes(out) + image(seed, 2000)


@dataclass(frozen=True)
class Bundle:
    """A release plus its chunks (as the bundles library would hand them over after verify)."""

    release: Release
    chunks: tuple[bytes, ...]
    image: bytes


def make_bundle(new: bytes, *, version: str, base: bytes | None = None, secver: int = 1) -> Bundle:
    with tempfile.TemporaryDirectory() as d:
        new_p = Path(d, "new.img")
        new_p.write_bytes(new)
        if base is None:
            encoded = list(encode_full(new_p, chunk_out_size=CHUNK))
        else:
            old_p = Path(d, "old.img")
            old_p.write_bytes(base)
            encoded = list(encode_delta(old_p, new_p, chunk_out_size=CHUNK))
    specs = tuple(
        ChunkSpec(len(c.data), hashlib.sha256(c.data).hexdigest(), c.out_size) for c in encoded
    )
    release = Release(
        bundle_id=f"b-{version}-{'delta' if base else 'full'}",
        version=version,
        security_version=secver,
        target_size=len(new),
        target_sha256=hashlib.sha256(new).hexdigest(),
        kind=PayloadKind.DELTA if base is not None else PayloadKind.FULL,
        chunks=specs,
        base_sha256=hashlib.sha256(base).hexdigest() if base is not None else None,
        base_size=len(base) if base is not None else None,
    )
    return Bundle(release, tuple(c.data for c in encoded), new)


class Clock:
    def __init__(self) -> None:
        self.t = 1_800_000_000.0

    def now(self) -> float:
        return self.t

    def monotonic(self) -> float:
        return self.t


class Power:
    def __init__(self) -> None:
        self.reboots = 0

    async def reboot(self) -> None:
        self.reboots += 1


@dataclass
class Device:
    """One simulated device. ``behaviour`` maps an image digest to good|fails|never_boots."""

    factory: bytes
    fs: FaultFS = field(default_factory=FaultFS)
    behaviour: dict[str, str] = field(default_factory=dict)
    ok_path: str = ""
    boots: list[BootSlot] = field(default_factory=list)
    bricked: list[str] = field(default_factory=list)
    last_agent: Agent | None = None
    cuts: int = 0
    migrations: object = None

    def __post_init__(self) -> None:
        self.fs.put(SLOT_A, self.factory + b"\0" * (CAPACITY - len(self.factory)))
        self.fs.put(SLOT_B, b"\xa5" * CAPACITY)  # garbage: never a bootable image
        env = RedundantEnv(ENV, fs=self.fs)
        env.write(dict(DEFAULT_ENV))
        self.fs.settle()
        self.behaviour.setdefault(hashlib.sha256(self.factory).hexdigest(), "good")
        if not self.ok_path:
            d = tempfile.mkdtemp(prefix="slotline-ok-")
            self.ok_path = str(Path(d, "ok"))
            Path(self.ok_path).write_text("ok")

    def identify(self, slot: BootSlot) -> tuple[str | None, str]:
        content = self.fs.content(SLOT_A if slot is BootSlot.A else SLOT_B)
        for sha, what in self.behaviour.items():
            for size in self.sizes:
                if hashlib.sha256(content[:size]).hexdigest() == sha:
                    return sha, what
        return None, "unknown"

    sizes: set[int] = field(default_factory=set)

    def learn(self, img: bytes, what: str) -> None:
        self.behaviour[hashlib.sha256(img).hexdigest()] = what
        self.sizes.add(len(img))

    def agent(self, slot: BootSlot, sources: dict[str, tuple[bytes, ...]], behaviour: str) -> Agent:
        checks = {
            "good": [Check("file", path=self.ok_path)],
            "fails": [Check("file", path=self.ok_path + ".missing")],
            "hangs": [Check("command", argv=("sleep", "30"), timeout=0.3)],
            "crashes": [Check("command", argv=("/nonexistent/selftest",))],
            "slow": [Check("command", argv=("sleep", "30"), timeout=20)],
        }[behaviour]
        return Agent(
            AgentConfig(
                device_id="dev-1",
                factory_version="1.0",
                factory_size=len(self.factory),
                checkpoint_bytes=2 * CHUNK,
                retry_base=0.0,
            ),
            slots=FileSlots(SLOT_A, SLOT_B, booted=slot, capacity=CAPACITY, fs=self.fs),
            bootenv=RedundantEnv(ENV, fs=self.fs),
            journal=FileJournal(JOURNAL, fs=self.fs),
            clock=Clock(),
            power=Power(),
            booted=slot,
            selftest=SelfTestRunner(checks, deadline=1.0 if behaviour == "slow" else 5),
            migrations=self.migrations,
            sources=lambda bid: MemorySource(sources[bid]) if bid in sources else None,
        )

    async def boot(
        self, sources: dict[str, tuple[bytes, ...]], install: Bundle | None = None
    ) -> str:
        """One power-on: bootloader, then (if the image runs) the agent. Returns what happened."""
        self.sizes.add(len(self.factory))
        slot = SimBootloader(RedundantEnv(ENV, fs=self.fs)).boot()
        self.boots.append(slot)
        sha, what = self.identify(slot)
        if sha is None:
            self.bricked.append(
                f"boot {len(self.boots)}: slot {slot.value} holds no verified image"
            )
            return "bricked"
        if what == "never_boots":
            return "watchdog"
        agent = self.agent(slot, sources, what)
        self.last_agent = agent
        await agent.start()
        await agent.wait_download()
        if install is not None and not agent.rebooting and not agent.state.phase.busy:
            await agent.install(install.release, MemorySource(install.chunks))
        return "reboot" if agent.rebooting else "settled"

    def run(self, bundle: Bundle | None, *, max_boots: int = 16) -> str:
        """Boot until the agent settles; ``bundle`` is requested once, at the first settled boot."""
        return asyncio.run(self.arun(bundle, max_boots=max_boots))

    async def arun(
        self,
        bundle: Bundle | None,
        *,
        max_boots: int = 16,
        cut_after: int | None = None,
        mode: str = "drop",
    ) -> str:
        sources = {bundle.release.bundle_id: bundle.chunks} if bundle else {}
        pending = bundle
        self.fs.cut_after = None if cut_after is None else self.fs.ops + cut_after
        for _ in range(max_boots):
            try:
                what = await self.boot(sources, pending)
            except PowerCut:
                self.fs = self.fs.crash(mode)
                self.cuts += 1
                pending = None  # the command arrived once; the journal has it or not
                continue
            if what == "bricked":
                return what
            if what == "settled" and pending is None:
                return what
            if what in ("settled", "reboot"):
                pending = None  # the command arrives once
        return "boot_loop"


# --- signed releases and commands (the verifier's inputs) ----------------------------------

def role_keys(first_seed: int) -> list[SigningKey]:
    """Three keys: root, release, command (in that order)."""
    return [SigningKey.from_seed(bytes([i]) * 32) for i in range(first_seed, first_seed + 3)]


def signed_root(keys: list[SigningKey], now: int) -> bytes:
    """A root signed by ``keys[0]`` naming ``keys`` as root, release and command keys."""
    root = make_root(
        version=1,
        expires=now + 10**6,
        role_keys={Role.ROOT: [keys[0].public], Role.RELEASE: [keys[1].public],
                   Role.COMMAND: [keys[2].public]},
    )
    return sign_root(root, [keys[0]])


def signed_release(work: Path, new: bytes, keys: list[SigningKey], now: int
                   ) -> tuple[dict[str, Any], tuple[bytes, ...]]:
    """A full bundle of ``new`` (version 2.0, board-x) signed by ``keys[1]``: manifest, chunks."""
    (work / "new.img").write_bytes(new)
    build_bundle(work / "new.img", work / "u.slb", release_keys=[keys[1]], version="2.0",
                 hardware=["board-x"], now=now, security_version=1, chunk_out_size=8192)
    with (work / "u.slb").open("rb") as f:
        reader = SlbReader(f)
        manifest = json.loads(reader.read_header().manifest)
        entries = Manifest.from_signed(manifest["signed"]).payload.chunks
        return manifest, tuple(reader.iter_chunks(entries))


def install_command(manifest: dict[str, Any], key: SigningKey, *, issued: int,
                    device: str = "dev-1", counter: int = 1, expires: int | None = None
                    ) -> bytes:
    """A signed INSTALL command carrying ``manifest``."""
    return sign_command([key], device=device, counter=counter, action=Action.INSTALL,
                        args={"bundle_id": manifest["signed"]["bundle_id"],
                              "manifest": manifest},
                        issued=issued, expires=expires)
