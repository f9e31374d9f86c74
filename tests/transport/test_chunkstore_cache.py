"""The chunk store's read path and its verified-chunk LRU (bounded in bytes, keyed by digest)."""

from __future__ import annotations

import hashlib

import pytest

from firmware_bundles.chunkstore import ChunkStore
from firmware_bundles.errors import DigestMismatch


def _chunk(i: int, size: int = 1000) -> bytes:
    return bytes([i % 251]) * size


def test_lru_stays_within_its_byte_bound_and_evicts_least_recent(tmp_path) -> None:
    store = ChunkStore(tmp_path / "s", cache_bytes=3000)
    digests = [store.put(_chunk(i)) for i in range(5)]
    for d in digests[:3]:
        store.get(d)
    assert store.cached_bytes == 3000
    store.get(digests[0])  # now the most recent
    store.get(digests[3])  # evicts digests[1], the least recently used
    assert store.cached_bytes <= 3000
    assert set(store._cache) == {digests[0], digests[2], digests[3]}
    hits = store.cache_hits
    assert store.get(digests[0]) == _chunk(0)
    assert store.cache_hits == hits + 1


def test_chunk_larger_than_the_cache_is_served_but_not_kept(tmp_path) -> None:
    store = ChunkStore(tmp_path / "s", cache_bytes=500)
    d = store.put(_chunk(1))
    assert store.get(d) == _chunk(1)
    assert store.cached_bytes == 0


def test_without_a_cache_every_get_reads_the_file(tmp_path) -> None:
    store = ChunkStore(tmp_path / "s")
    d = store.put(_chunk(2))
    assert store.get(d) == _chunk(2)
    assert store.cached_bytes == 0
    assert store.cache_hits == 0


def test_corrupted_file_is_refused_on_load_and_never_cached(tmp_path) -> None:
    store = ChunkStore(tmp_path / "s", cache_bytes=1 << 20)
    d = store.put(_chunk(3))
    store.path(d).write_bytes(_chunk(4))  # same size, other bytes
    with pytest.raises(DigestMismatch):
        store.get(d)
    assert d not in store._cache
    with pytest.raises(KeyError):
        store.get(d)  # removed, so the caller fetches it again


def test_oversized_file_is_refused_without_reading_it_whole(tmp_path) -> None:
    store = ChunkStore(tmp_path / "s", max_chunk_size=100, cache_bytes=1 << 20)
    big = b"x" * 200
    d = hashlib.sha256(big).hexdigest()
    store.path(d).parent.mkdir(parents=True, exist_ok=True)
    store.path(d).write_bytes(big)
    with pytest.raises(DigestMismatch):
        store.get(d)
    assert not store.path(d).exists()


def test_remove_evicts_from_the_cache(tmp_path) -> None:
    store = ChunkStore(tmp_path / "s", cache_bytes=1 << 20)
    d = store.put(_chunk(5))
    store.get(d)
    assert store.remove(d)
    assert store.cached_bytes == 0
    with pytest.raises(KeyError):
        store.get(d)
