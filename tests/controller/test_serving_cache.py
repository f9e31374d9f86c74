"""The controller's verified-chunk cache: served only after the offer check, never rotten."""

from __future__ import annotations

from controller.rollout import planner as p
from controller.rollout.scheduler import PhaseSpec


def _offer_delta_and_full(svc, fleet, release) -> None:
    fleet.enroll(1, digest=release["v1"], prefix="a")  # gets the delta
    fleet.enroll(1, digest="ab" * 32, prefix="b")  # unknown base: gets the full payload
    ro = svc.scheduler.create(
        fleet.ops, name="r", release_id=release["id"], phases=[PhaseSpec("all", 100, p.Gate())]
    )
    svc.scheduler.start(fleet.ops, ro["id"])
    svc.tick()
    svc.tick()


def test_cached_chunks_still_follow_each_devices_offer(svc, fleet, release) -> None:
    _offer_delta_and_full(svc, fleet, release)
    store = svc.releases.store
    assert store.cache_bytes == svc.config.chunk_cache_bytes > 0
    delta = svc.resolve_chunk("a0000", release["id"], 0)
    full = svc.resolve_chunk("b0000", release["id"], 0)
    assert delta is not None
    assert full is not None
    assert delta != full
    # Both are cached now; asking again (a hit) still gives each device its own payload's chunk:
    # the same (bundle, index) is a different chunk for a device on another base.
    hits = store.cache_hits
    assert svc.resolve_chunk("a0000", release["id"], 0) == delta
    assert svc.resolve_chunk("b0000", release["id"], 0) == full
    assert store.cache_hits == hits + 2
    # A device that was offered nothing gets nothing, however warm the cache.
    assert svc.resolve_chunk("zzz", release["id"], 0) is None
    assert svc.resolve_chunk("a0000", "other-bundle", 0) is None


def test_a_corrupted_chunk_file_is_refused_not_cached(svc, fleet, release) -> None:
    _offer_delta_and_full(svc, fleet, release)
    store = svc.releases.store
    good = svc.resolve_chunk("b0000", release["id"], 0)
    assert good is not None
    digest = svc.releases._tables[svc.releases._offered["b0000", release["id"]]][0]
    assert digest in store._cache
    store.remove(digest)  # evicts it from the cache too
    assert svc.resolve_chunk("b0000", release["id"], 0) is None  # and the file is gone
    # Put it back rotten: read from disk on the next request, re-verified, refused, removed.
    path = store.path(digest)
    path.write_bytes(bytes([good[0] ^ 1]) + good[1:])
    assert svc.resolve_chunk("b0000", release["id"], 0) is None
    assert digest not in store._cache
    assert not path.exists(), "the rotten file is removed so it is fetched again"
