"""Build, verify and apply .slb bundles; one test per refusal code; bit flips anywhere refused."""

from __future__ import annotations

import io
import os
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from firmware_bundles import delta
from firmware_bundles.bundle import (
    apply_bundle,
    hash_file,
    inspect_bundle,
    open_bundle,
    verify_bundle,
    verify_image,
)
from firmware_bundles.errors import (
    BaseMismatch,
    BundleRejected,
    DeltaCorrupt,
    DigestMismatch,
    FormatInvalid,
    HardwareMismatch,
    MetadataExpired,
    SchemaUnsupported,
    SignatureInvalid,
    SizeExceeded,
    TransferError,
    Truncated,
    VersionRollback,
)
from firmware_bundles.keys import SigningKey, sign_envelope
from firmware_bundles.manifest import MAX_CHUNK_SIZE, ImageRef
from firmware_bundles.protocol import MAX_CHUNK_DATA
from firmware_bundles.slb import MAGIC, MAX_MANIFEST
from firmware_bundles.trust import Role

NOW = 1_800_000_000


def _apply(kit, slb: Path, out: Path | None = None, base: Path | None = None, **kw):
    out = out or kit.tmp / "out.img"
    return apply_bundle(slb, base or kit.old, out, kit.trust, now=kw.pop("now", NOW), **kw)


def _leftovers(kit) -> list[str]:
    return sorted(p.name for p in kit.tmp.iterdir() if p.name.startswith(".") or p.name == "out.img")


def _refused(kit, slb: Path, code: str, *, base: Path | None = None, **kw) -> None:
    """Both verify (where it applies) and apply refuse with ``code`` and leave nothing behind."""
    with pytest.raises(BundleRejected) as exc:
        _apply(kit, slb, base=base, **kw)
    assert exc.value.code == code, exc.value
    assert _leftovers(kit) == []


# ------------------------------------------------------------------------------ happy paths


def test_delta_round_trip_is_exact(kit):
    slb = kit.build()
    release = verify_bundle(slb, kit.trust, now=NOW, hardware="board-a")
    assert release.payload.kind.value == "delta"
    assert release.payload.base == hash_file(kit.old)
    _apply(kit, slb)
    assert (kit.tmp / "out.img").read_bytes() == kit.new.read_bytes()
    verify_image(kit.tmp / "out.img", release.target)
    assert slb.stat().st_size < kit.new.stat().st_size // 4
    assert _leftovers(kit) == ["out.img"]


def test_full_round_trip_needs_no_base(kit):
    slb = kit.build("f.slb", full=True)
    release = apply_bundle(slb, None, kit.tmp / "out.img", kit.trust, now=NOW)
    assert release.payload.kind.value == "full"
    assert (kit.tmp / "out.img").read_bytes() == kit.new.read_bytes()


def test_empty_image_round_trip(kit):
    kit.new.write_bytes(b"")
    slb = kit.build("e.slb", full=True)
    apply_bundle(slb, None, kit.tmp / "out.img", kit.trust, now=NOW)
    assert (kit.tmp / "out.img").read_bytes() == b""


def test_bundle_reads_from_a_stream(kit):
    data = kit.build().read_bytes()
    release = verify_bundle(io.BytesIO(data), kit.trust, now=NOW)
    apply_bundle(io.BytesIO(data), kit.old, kit.tmp / "out.img", kit.trust, now=NOW)
    assert release.manifest.target.size == kit.new.stat().st_size


def test_apply_replaces_an_existing_output_only_when_verified(kit):
    out = kit.tmp / "out.img"
    out.write_bytes(b"previous")
    with pytest.raises(BaseMismatch):
        _apply(kit, kit.build(), base=kit.new)
    assert out.read_bytes() == b"previous"


def test_inspect_is_marked_unverified(kit):
    info = inspect_bundle(kit.build())
    assert info["verified"] is False
    assert info["payload"]["kind"] == "delta"


def test_signatures_are_checked_before_any_chunk_is_read(kit):
    data = kit.build().read_bytes()

    class Counting(io.BytesIO):
        def read(self, n=-1):
            out = super().read(n)
            self.seen = self.tell()
            return out

    stream = Counting(data)
    stranger = SigningKey.generate()
    kit.keyset.keys[Role.RELEASE][:] = [stranger]
    with open_bundle(stream, kit.trust, now=NOW) as bundle:
        header_end = stream.seen
        assert header_end < len(data)
        assert bundle.release.manifest.version == "2.0.0"


# ------------------------------------------------------------------------------ one per code


def test_signature_invalid_when_signed_by_another_role(kit):
    slb = kit.build(release_keys=kit.signers(Role.COMMAND))
    with pytest.raises(SignatureInvalid):
        verify_bundle(slb, kit.trust, now=NOW)
    _refused(kit, slb, "bundle.signature_invalid")


def test_expired_manifest(kit):
    slb = kit.build(expires=NOW + 10)
    with pytest.raises(MetadataExpired):
        verify_bundle(slb, kit.trust, now=NOW + 10)
    _refused(kit, slb, "bundle.expired", now=NOW + 10)


def test_downgrade_below_committed_security_version(kit):
    slb = kit.build(security_version=3)
    verify_bundle(slb, kit.trust, now=NOW, min_security_version=3)
    with pytest.raises(VersionRollback):
        verify_bundle(slb, kit.trust, now=NOW, min_security_version=4)
    _refused(kit, slb, "bundle.version_rollback", min_security_version=4)


def test_wrong_hardware(kit):
    slb = kit.build(hardware=["board-a", "board-b"])
    verify_bundle(slb, kit.trust, now=NOW, hardware="board-b")
    with pytest.raises(HardwareMismatch):
        verify_bundle(slb, kit.trust, now=NOW, hardware="board-c")
    _refused(kit, slb, "bundle.hardware_mismatch", hardware="board-c")


def test_wrong_base_is_refused_before_any_write(kit):
    slb = kit.build()
    wrong = kit.tmp / "wrong.img"
    data = bytearray(kit.old.read_bytes())
    data[100] ^= 1  # same size, one bit off
    wrong.write_bytes(data)
    _refused(kit, slb, "bundle.base_mismatch", base=wrong)


def test_missing_base_is_base_mismatch(kit):
    slb = kit.build()
    with pytest.raises(BaseMismatch):
        apply_bundle(slb, None, kit.tmp / "out.img", kit.trust, now=NOW)
    _refused(kit, slb, "bundle.base_mismatch", base=kit.tmp / "no-such.img")
    assert not (kit.tmp / "out.img").exists()


def test_chunk_digest_mismatch(kit):
    slb = kit.build()
    data = bytearray(slb.read_bytes())
    data[-1] ^= 0x80
    slb.write_bytes(data)
    with pytest.raises(DigestMismatch):
        verify_bundle(slb, kit.trust, now=NOW)
    _refused(kit, slb, "bundle.digest_mismatch")


def test_final_image_digest_mismatch(kit):
    # Honest chunks, but the release signed a different target digest: the image never appears.
    chunks = [c.data for c in delta.encode_full(kit.new, chunk_out_size=16384)]
    outs = [c.out_size for c in delta.encode_full(kit.new, chunk_out_size=16384)]
    slb = kit.craft("t.slb", chunks, outs, target=ImageRef(sum(outs), "cd" * 32))
    verify_bundle(slb, kit.trust, now=NOW)  # chunk-level checks pass
    _refused(kit, slb, "bundle.digest_mismatch")


def test_truncated_bundle(kit):
    slb = kit.build()
    data = slb.read_bytes()
    for cut in (len(data) - 1, len(data) // 2, 20, 5):
        slb.write_bytes(data[:cut])
        with pytest.raises(Truncated):
            verify_bundle(slb, kit.trust, now=NOW)
        _refused(kit, slb, "bundle.truncated")


def test_trailing_bytes_are_size_exceeded(kit):
    slb = kit.build()
    with slb.open("ab") as f:
        f.write(b"\0")
    with pytest.raises(SizeExceeded, match="after the last chunk"):
        verify_bundle(slb, kit.trust, now=NOW)
    _refused(kit, slb, "bundle.size_exceeded")


def test_oversized_manifest_length_is_refused_unread(kit):
    slb = kit.tmp / "big.slb"
    slb.write_bytes(MAGIC + struct.pack(">HHI", 1, 0, MAX_MANIFEST + 1) + b"{")
    _refused(kit, slb, "bundle.size_exceeded")


def test_endless_stream_is_read_only_to_the_signed_size(kit):
    data = kit.build().read_bytes()

    class Endless(io.RawIOBase):
        def __init__(self):
            self.pos = 0

        def readable(self):
            return True

        def readinto(self, b):
            n = len(b)
            src = data[self.pos:self.pos + n]
            src += b"\0" * (n - len(src))
            b[:n] = src
            self.pos += n
            return n

    stream = Endless()
    with pytest.raises(SizeExceeded):
        verify_bundle(io.BufferedReader(stream), kit.trust, now=NOW)
    assert stream.pos < len(data) + 64 * 1024


def test_bad_magic_is_format_invalid(kit):
    slb = kit.build()
    data = bytearray(slb.read_bytes())
    data[1] = ord("X")
    slb.write_bytes(data)
    _refused(kit, slb, "bundle.format_invalid")


def test_unknown_container_version_is_schema_unsupported(kit):
    slb = kit.build()
    data = bytearray(slb.read_bytes())
    data[8:10] = b"\0\2"
    slb.write_bytes(data)
    with pytest.raises(SchemaUnsupported):
        verify_bundle(slb, kit.trust, now=NOW)
    _refused(kit, slb, "bundle.schema_unsupported")


def test_unknown_manifest_schema_is_schema_unsupported(kit):
    chunks = [c.data for c in delta.encode_full(kit.new, chunk_out_size=16384)]
    outs = [c.out_size for c in delta.encode_full(kit.new, chunk_out_size=16384)]
    manifest = kit.manifest(chunks, outs).to_signed()
    manifest["schema"] = 2
    slb = kit.write("s.slb", sign_envelope(manifest, kit.signers()), chunks)
    _refused(kit, slb, "bundle.schema_unsupported")


def test_undecodable_chunk_is_delta_corrupt(kit):
    chunks = [b"\x7f" + os.urandom(100)]
    slb = kit.craft("c.slb", chunks, [1000], target=ImageRef(1000, "ab" * 32))
    verify_bundle(slb, kit.trust, now=NOW)  # digests match: the signer is at fault
    _refused(kit, slb, "bundle.delta_corrupt")


def test_decompression_bomb_is_size_exceeded(kit):
    # A chunk that decodes to 8 MiB of zeros, signed as producing only 4 KiB.
    bomb = kit.tmp / "zeros.img"
    bomb.write_bytes(b"\0" * (8 << 20))
    (chunk,) = list(delta.encode_full(bomb, chunk_out_size=8 << 20))
    assert len(chunk.data) < 64 * 1024
    slb = kit.craft("bomb.slb", [chunk.data], [4096], target=ImageRef(4096, "ab" * 32))
    _refused(kit, slb, "bundle.size_exceeded")


def test_chunk_decoding_short_of_its_out_size_is_refused(kit):
    small = kit.tmp / "small.img"
    small.write_bytes(os.urandom(1000))
    (chunk,) = list(delta.encode_full(small, chunk_out_size=1000))
    slb = kit.craft("short.slb", [chunk.data], [2000], target=ImageRef(2000, "ab" * 32))
    with pytest.raises((Truncated, DeltaCorrupt)):
        _apply(kit, slb)
    assert _leftovers(kit) == []


def test_chunk_table_not_matching_target_size_is_refused_at_signing_time(kit):
    with pytest.raises(FormatInvalid, match="produces"):
        kit.manifest([b"x"], [10], target=ImageRef(11, "ab" * 32))


# ------------------------------------------------------------------------------ bit flips


@pytest.fixture(params=["delta", "full"])
def small_bundle(kit, request):
    slb = kit.build("small.slb", chunk_out_size=32 * 1024, full=request.param == "full")
    return kit, slb, slb.read_bytes()


def test_every_byte_of_a_bundle_is_covered(small_bundle):
    """Flip one bit in every byte position (bit index = position mod 8): verify refuses all."""
    kit, _slb, data = small_bundle
    for pos in range(len(data)):
        mutated = bytearray(data)
        mutated[pos] ^= 1 << (pos % 8)
        with pytest.raises(BundleRejected):
            verify_bundle(io.BytesIO(bytes(mutated)), kit.trust, now=NOW)


@given(bit=st.integers(min_value=0))
@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_any_single_bit_flip_is_refused_by_verify_and_apply(small_bundle, bit):
    kit, _slb, data = small_bundle
    bit %= len(data) * 8
    mutated = bytearray(data)
    mutated[bit // 8] ^= 1 << (bit % 8)
    bad = kit.tmp / "bad.slb"
    bad.write_bytes(mutated)
    with pytest.raises(BundleRejected):
        verify_bundle(bad, kit.trust, now=NOW)
    out = kit.tmp / "flip.img"
    with pytest.raises(BundleRejected):
        apply_bundle(bad, kit.old, out, kit.trust, now=NOW)
    assert not out.exists()
    assert not [p for p in kit.tmp.iterdir() if p.name.startswith(".flip.img")]



def test_incompressible_image_builds_chunks_that_fit_the_transfer_cap(kit):
    # Random data does not compress: each chunk is its output plus framing, and must still fit
    # one MQTT chunk frame (a valid release that cannot be delivered would be a trap).
    kit.new.write_bytes(os.urandom((4 << 20) + 1024))
    slb = kit.build("r.slb", full=True, chunk_out_size=None)
    release = verify_bundle(slb, kit.trust, now=NOW)
    assert len(release.payload.chunks) == 2
    assert max(c.size for c in release.payload.chunks) <= MAX_CHUNK_SIZE == MAX_CHUNK_DATA


def test_unwritable_output_is_transfer_error_not_a_refusal(kit):
    slb = kit.build()
    with pytest.raises(TransferError) as exc:
        _apply(kit, slb, out=kit.tmp / "no-such-dir" / "out.img")
    assert exc.value.code == "transfer.error"
    assert not isinstance(exc.value, BundleRejected)


def test_verify_with_decode_checks_the_image_without_writing(kit):
    slb = kit.build()
    verify_bundle(slb, kit.trust, now=NOW, decode=True, base_path=kit.old)
    with pytest.raises(BaseMismatch):
        verify_bundle(slb, kit.trust, now=NOW, decode=True)
    with pytest.raises(BaseMismatch):
        verify_bundle(slb, kit.trust, now=NOW, decode=True, base_path=kit.new)
    assert _leftovers(kit) == []


def test_verify_with_decode_finds_a_wrong_target_digest(kit):
    encoded = list(delta.encode_full(kit.new, chunk_out_size=16384))
    chunks, outs = [c.data for c in encoded], [c.out_size for c in encoded]
    slb = kit.craft("t.slb", chunks, outs, target=ImageRef(sum(outs), "cd" * 32))
    verify_bundle(slb, kit.trust, now=NOW)
    with pytest.raises(DigestMismatch):
        verify_bundle(slb, kit.trust, now=NOW, decode=True)
