"""Fixtures for the bundle tests: a real key set on disk, small image pairs, bundle builders."""

from __future__ import annotations

import dataclasses
import hashlib
import random
from pathlib import Path
from typing import Any

import pytest

from firmware_bundles.bundle import build_bundle, sign_manifest
from firmware_bundles.keyring import Keyset, generate_keyset
from firmware_bundles.manifest import CODEC_ID, ChunkEntry, ImageRef, Manifest, Payload, PayloadKind
from firmware_bundles.slb import encode_header
from firmware_bundles.trust import Role

NOW = 1_800_000_000
CHUNK = 16 * 1024


def make_images(seed: int, size: int = 60_000) -> tuple[bytes, bytes]:
    """An old image and a new one that shares most of it (edits, an insertion, a new tail)."""
    rng = random.Random(seed)
    words = [rng.randbytes(8) for _ in range(64)]
    old = bytearray(b"".join(rng.choice(words) for _ in range(size // 8)))
    new = bytearray(old)
    for _ in range(20):
        pos = rng.randrange(len(new))
        new[pos] = rng.randrange(256)
    ins = rng.randrange(len(new))
    new[ins:ins] = rng.randbytes(300)
    new += rng.randbytes(2000)
    return bytes(old), bytes(new)


@dataclasses.dataclass
class Kit:
    """A key set, an image pair and helpers to build honest and crafted bundles."""

    tmp: Path
    keyset: Keyset
    old: Path
    new: Path

    @property
    def trust(self) -> Any:
        return self.keyset.trust

    def signers(self, role: Role = Role.RELEASE) -> list[Any]:
        return self.keyset.signers(role)

    def build(self, name: str = "d.slb", *, full: bool = False, **kw: Any) -> Path:
        out = self.tmp / name
        kw.setdefault("version", "2.0.0")
        kw.setdefault("hardware", ["board-a"])
        kw.setdefault("chunk_out_size", CHUNK)
        build_bundle(
            self.new,
            out,
            release_keys=kw.pop("release_keys", self.signers()),
            now=kw.pop("now", NOW),
            base=None if full else self.old,
            **kw,
        )
        return out

    def manifest(self, chunks: list[bytes], out_sizes: list[int], **fields: Any) -> Manifest:
        """A manifest over arbitrary chunk bytes (full payload unless ``base`` is given)."""
        base = fields.pop("base", None)
        target = fields.pop(
            "target",
            ImageRef(size=sum(out_sizes), sha256=hashlib.sha256(self.new.read_bytes()).hexdigest()),
        )
        payload = Payload(
            kind=PayloadKind.DELTA if base else PayloadKind.FULL,
            base=base,
            codec=CODEC_ID,
            chunks=tuple(
                ChunkEntry(size=len(c), sha256=hashlib.sha256(c).hexdigest(), out_size=o)
                for c, o in zip(chunks, out_sizes, strict=True)
            ),
        )
        values: dict[str, Any] = {
            "bundle_id": "crafted-1",
            "component": "rootfs",
            "version": "9.9.9",
            "security_version": 0,
            "hardware": ("board-a",),
            "target": target,
            "payload": payload,
            "requires": (),
            "notes": "",
            "created": NOW - 10,
            "expires": NOW + 86400,
        }
        values.update(fields)
        return Manifest(**values)

    def write(
        self,
        name: str,
        manifest_envelope: bytes,
        chunks: list[bytes],
        payload_doc: bytes | None = None,
        tail: bytes = b"",
    ) -> Path:
        out = self.tmp / name
        out.write_bytes(encode_header(manifest_envelope, payload_doc) + b"".join(chunks) + tail)
        return out

    def craft(self, name: str, chunks: list[bytes], out_sizes: list[int], **fields: Any) -> Path:
        signers = fields.pop("signers", self.signers())
        manifest = self.manifest(chunks, out_sizes, **fields)
        return self.write(name, sign_manifest(manifest, signers), chunks)


@pytest.fixture
def kit(tmp_path: Path) -> Kit:
    keyset = generate_keyset(tmp_path / "keys", now=NOW)
    old, new = make_images(1)
    (tmp_path / "old.img").write_bytes(old)
    (tmp_path / "new.img").write_bytes(new)
    return Kit(tmp_path, keyset, tmp_path / "old.img", tmp_path / "new.img")


@pytest.fixture
def image_pair() -> tuple[bytes, bytes]:
    """A small (old, new) image pair."""
    return make_images(7)
