"""Offline (local-file) installs decode chunk k+1 while chunk k is written (agent/decode_ahead.py).

A signed but undecodable chunk in the middle is refused with its stable code at its own write:
the slot holds exactly the chunks before it, nothing after it, and no decoding thread is left.
Power cuts during a read-ahead install never brick the device.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import threading

import pytest
from agent_device import ENV, SLOT_B, Bundle, Device, derived, image, make_bundle

from agent.adapters.bootenv import RedundantEnv, SimBootloader
from agent.adapters.faultfs import PowerCut
from agent.core.states import ChunkSpec, Phase
from agent.decode_ahead import AHEAD_BUDGET, DecodeAhead
from agent.runtime import Agent, MemorySource
from firmware_bundles.codec.chunk import Tag
from firmware_bundles.codec.streams import StreamOptions, decode_stream, encode_stream, get_uvarint

OLD = image(41, 60 * 1024)
NEW = derived(OLD, 5)[: 62 * 1024]


class LocalSource(MemorySource):
    """Chunks from a local file: the same bytes on a retry, so not retryable (like SlbSource)."""

    retryable = False


def _threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("decode-ahead")]


def _corrupt(data: bytes) -> bytes:
    """A delta chunk with one literal too many: well framed, refused by the apply loop."""
    view = memoryview(data)
    pos = 1
    for _ in range(3):
        _n, pos = get_uvarint(view, pos)
    head = bytes(view[:pos])
    raws = []
    for _ in range(6):
        raw, pos = decode_stream(view, pos, 1 << 24)
        raws.append(raw)
    raws[5] += b"!"
    return head + b"".join(encode_stream(r, StreamOptions(lzma_lclppb=())) for r in raws)


def _resigned(bundle: Bundle, chunks: list[bytes]) -> Bundle:
    """The same release over other chunk bytes (the signer is at fault: digests match)."""
    specs = tuple(ChunkSpec(len(c), hashlib.sha256(c).hexdigest(), s.out_size)
                  for c, s in zip(chunks, bundle.release.chunks, strict=True))
    return Bundle(dataclasses.replace(bundle.release, chunks=specs), tuple(chunks), bundle.image)


def _agent(dev: Device) -> Agent:
    slot = SimBootloader(RedundantEnv(ENV, fs=dev.fs)).boot()
    agent = dev.agent(slot, {}, "good")
    agent.config = dataclasses.replace(agent.config, decode_ahead=AHEAD_BUDGET)
    agent._ahead = DecodeAhead(budget=AHEAD_BUDGET)
    return agent


async def _install(dev: Device, bundle: Bundle) -> Agent:
    agent = _agent(dev)
    await agent.start()
    await agent.wait_download()
    await agent.install(bundle.release, LocalSource(bundle.chunks))
    return agent


def _device() -> Device:
    dev = Device(OLD)
    dev.learn(OLD, "good")
    dev.learn(NEW, "good")
    return dev


def test_decode_ahead_is_off_by_default() -> None:
    bundle = make_bundle(NEW, version="2.0", base=OLD)
    dev = _device()

    async def run() -> tuple[Agent, list[str]]:
        slot = SimBootloader(RedundantEnv(ENV, fs=dev.fs)).boot()
        agent = dev.agent(slot, {}, "good")
        seen: list[str] = []
        offer = agent._ahead.offer

        def spy(*args: object) -> bool:
            seen.append("offer")
            return offer(*args)  # type: ignore[arg-type]

        agent._ahead.offer = spy  # type: ignore[method-assign]
        await agent.start()
        await agent.install(bundle.release, LocalSource(bundle.chunks))
        return agent, seen

    agent, seen = asyncio.run(run())
    assert agent.state.phase is Phase.STAGED
    assert seen == []


def test_local_delta_install_decodes_ahead_and_stages() -> None:
    bundle = make_bundle(NEW, version="2.0", base=OLD)
    assert len(bundle.chunks) >= 4
    dev = _device()
    taken: list[int] = []

    async def run() -> Agent:
        agent = _agent(dev)
        take = agent._ahead.take

        def spy(index: int, data: bytes) -> bytes | None:
            out = take(index, data)
            if out is not None:
                taken.append(index)
            return out

        agent._ahead.take = spy  # type: ignore[method-assign]
        await agent.start()
        await agent.install(bundle.release, LocalSource(bundle.chunks))
        return agent

    agent = asyncio.run(run())
    assert agent.state.phase is Phase.STAGED
    assert dev.fs.content(SLOT_B)[: len(NEW)] == NEW
    assert taken  # later chunks came from the read-ahead
    assert 0 not in taken  # the first one is decoded at its write (nothing to overlap with)
    assert _threads() == []


def test_signed_corrupt_chunk_mid_local_install_is_refused_and_nothing_after_it_is_written() -> None:
    bundle = make_bundle(NEW, version="2.0", base=OLD)
    bad = next(i for i, c in enumerate(bundle.chunks) if i >= 2 and c[0] == Tag.PATCH)
    assert bad < len(bundle.chunks) - 1
    chunks = list(bundle.chunks)
    chunks[bad] = _corrupt(chunks[bad])
    dev = _device()
    before = dev.fs.content(SLOT_B)
    agent = asyncio.run(_install(dev, _resigned(bundle, chunks)))
    result = agent.state.last_result
    assert result is not None
    assert (result.outcome, result.code) == ("failed", "bundle.delta_corrupt")
    offset = sum(s.out_size for s in bundle.release.chunks[:bad])
    after = dev.fs.content(SLOT_B)
    assert after[:offset] == NEW[:offset]
    assert after[offset:] == before[offset:]  # not a byte of the bad chunk or any after it
    assert _threads() == []


@pytest.mark.slow
def test_power_cut_during_a_read_ahead_install_never_bricks() -> None:
    bundle = make_bundle(NEW, version="2.0", base=OLD)
    ref = _device()
    start = ref.fs.ops
    asyncio.run(_install(ref, bundle))
    total = ref.fs.ops - start
    assert total > 20
    bricked: list[str] = []
    cuts = 0
    for mode in ("drop", "tear", "keep"):
        for k in range(1, total + 1):
            dev = _device()
            dev.fs.cut_after = dev.fs.ops + k
            try:
                asyncio.run(_install(dev, bundle))
            except PowerCut:
                dev.fs = dev.fs.crash(mode)
                cuts += 1
            dev.fs.cut_after = None
            # Power back: the device boots something verified and settles.
            if asyncio.run(dev.arun(None)) != "settled" or dev.bricked:
                bricked.append(f"{mode}/k={k}: {dev.bricked}")
    assert cuts > total  # the cuts did land, in the middle of read-ahead installs
    assert bricked == []
    assert _threads() == []
