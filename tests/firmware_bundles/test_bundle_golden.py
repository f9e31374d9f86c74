"""Persisted format: bundles written by format version 1 keep verifying and applying.

The files in ``data/v1`` were made by ``_make`` below with fixed keys and time. If a change makes
this test fail, the change broke devices in the field that hold such bundles or trust roots:
add a new format version instead of changing this one. Regenerate only for a deliberate new
version: ``.venv/bin/python tests/firmware_bundles/test_bundle_golden.py``.
"""

from __future__ import annotations

import random
import tempfile
from pathlib import Path

import pytest

from firmware_bundles.bundle import apply_bundle, build_bundle, verify_bundle
from firmware_bundles.errors import MetadataExpired
from firmware_bundles.keys import SigningKey
from firmware_bundles.trust import Role, TrustStore, make_root, sign_root

DATA = Path(__file__).parent / "data" / "v1"
NOW = 1_800_000_000
KEYS = {role: SigningKey.from_seed(bytes([i + 1]) * 32) for i, role in enumerate(Role)}


def _images() -> tuple[bytes, bytes]:
    rng = random.Random(2026)
    old = bytes(rng.choice(b"slotline\0\1\2") for _ in range(20_000))
    new = old[:5000] + rng.randbytes(100) + old[5000:15000] + b"v2" * 500
    return old, new


def _make(directory: Path) -> None:
    old, new = _images()
    (directory / "old.img").write_bytes(old)
    (directory / "new.img").write_bytes(new)
    root = make_root(version=1, expires=NOW + 10 * 365 * 86400,
                     role_keys={r: [k.public] for r, k in KEYS.items()})
    (DATA / "trust.json").write_bytes(sign_root(root, [KEYS[Role.ROOT]]))
    for name, base in (("full.slb", None), ("delta.slb", directory / "old.img")):
        build_bundle(directory / "new.img", DATA / name, release_keys=[KEYS[Role.RELEASE]],
                     version="1.0.0", hardware=["golden-board"], now=NOW, base=base,
                     expires=NOW + 10 * 365 * 86400, notes="format v1 golden",
                     chunk_out_size=8192)


@pytest.mark.parametrize("name", ["full.slb", "delta.slb"])
def test_version_1_bundles_still_verify_and_apply(tmp_path, name):
    old, new = _images()
    (tmp_path / "old.img").write_bytes(old)
    trust = TrustStore.from_root_bytes((DATA / "trust.json").read_bytes())
    release = verify_bundle(DATA / name, trust, now=NOW + 1, hardware="golden-board")
    assert release.manifest.notes == "format v1 golden"
    apply_bundle(DATA / name, tmp_path / "old.img", tmp_path / "out.img", trust, now=NOW + 1)
    assert (tmp_path / "out.img").read_bytes() == new


def test_version_1_bundle_still_expires(tmp_path):
    trust = TrustStore.from_root_bytes((DATA / "trust.json").read_bytes())
    with pytest.raises(MetadataExpired):
        verify_bundle(DATA / "full.slb", trust, now=NOW + 10 * 365 * 86400)


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        _make(Path(tmp))
