"""The content-addressed chunk store: verify on put and get, atomic writes, accounting."""

from __future__ import annotations

import hashlib
import os
import threading

import pytest

from firmware_bundles.chunkstore import ChunkStore
from firmware_bundles.errors import DigestMismatch, FormatInvalid, SizeExceeded


def test_put_get_has_and_layout(tmp_path):
    store = ChunkStore(tmp_path / "s")
    data = os.urandom(1000)
    digest = store.put(data)
    assert digest == hashlib.sha256(data).hexdigest()
    assert store.has(digest)
    assert store.get(digest) == data
    assert (tmp_path / "s" / digest[:2] / digest).is_file()
    assert store.usage == 1000
    assert len(store) == 1
    assert list(store) == [digest]


def test_put_is_idempotent_and_accounting_survives_reopen(tmp_path):
    store = ChunkStore(tmp_path / "s")
    a, b = os.urandom(10), os.urandom(20)
    store.put(a)
    store.put(a)
    store.put(b)
    assert (store.usage, len(store)) == (30, 2)
    reopened = ChunkStore(tmp_path / "s")
    assert (reopened.usage, len(reopened)) == (30, 2)
    assert reopened.remove(hashlib.sha256(a).hexdigest())
    assert not reopened.remove(hashlib.sha256(a).hexdigest())
    assert (reopened.usage, len(reopened)) == (20, 1)


def test_put_with_wrong_expected_digest_is_refused(tmp_path):
    store = ChunkStore(tmp_path / "s")
    with pytest.raises(DigestMismatch):
        store.put(b"abc", hashlib.sha256(b"abd").hexdigest())
    assert len(store) == 0
    assert not list((tmp_path / "s").rglob("*.tmp"))


def test_rotten_chunk_is_refused_and_removed(tmp_path):
    store = ChunkStore(tmp_path / "s")
    digest = store.put(b"hello chunk")
    path = store.path(digest)
    path.write_bytes(b"hellO chunk")
    with pytest.raises(DigestMismatch):
        store.get(digest)
    assert not store.has(digest)
    assert store.usage == 0


def test_missing_chunk_is_key_error(tmp_path):
    with pytest.raises(KeyError):
        ChunkStore(tmp_path / "s").get("ab" * 32)


@pytest.mark.parametrize("name", ["../../etc/passwd", "AB" * 32, "ab" * 31, ""])
def test_names_that_are_not_digests_never_become_paths(tmp_path, name):
    store = ChunkStore(tmp_path / "s")
    with pytest.raises(FormatInvalid):
        store.has(name)
    with pytest.raises(FormatInvalid):
        store.get(name)


def test_oversized_chunk_is_refused(tmp_path):
    store = ChunkStore(tmp_path / "s", max_chunk_size=100)
    with pytest.raises(SizeExceeded):
        store.put(b"x" * 101)


def test_concurrent_puts_of_the_same_chunk_count_once(tmp_path):
    store = ChunkStore(tmp_path / "s")
    data = os.urandom(4096)
    threads = [threading.Thread(target=store.put, args=(data,)) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert (store.usage, len(store)) == (4096, 1)
    assert not list((tmp_path / "s").rglob("*.tmp"))
