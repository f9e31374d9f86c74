"""Controller-made delta payloads: command-signed, bound to one release manifest."""

from __future__ import annotations

import hashlib
import io

import pytest

from firmware_bundles import canonical
from firmware_bundles.bundle import (
    apply_bundle,
    build_payload_doc,
    encode_payload,
    verify_bundle,
    verify_release,
)
from firmware_bundles.chunkstore import ChunkStore
from firmware_bundles.errors import (
    BundleRejected,
    DigestMismatch,
    FormatInvalid,
    MetadataExpired,
    SignatureInvalid,
)
from firmware_bundles.payload import sign_payload_doc
from firmware_bundles.slb import SlbReader, write_slb
from firmware_bundles.trust import Role

NOW = 1_800_000_000


def _release(kit, name="full.slb"):
    slb = kit.build(name, full=True)
    with slb.open("rb") as f:
        header = SlbReader(f).read_header()
    return verify_release(header.manifest, kit.trust, now=NOW), header.manifest


def _other_base(kit):
    other = kit.tmp / "other-base.img"
    data = bytearray(kit.new.read_bytes())
    data[500:600] = bytes(100)
    other.write_bytes(bytes(data[:-700]))
    return other


def _controller_slb(kit, *, keys=None, expires=NOW + 3600, release=None, manifest=None):
    if release is None:
        release, manifest = _release(kit)
    store = ChunkStore(kit.tmp / "store")
    order: list[str] = []
    doc = build_payload_doc(
        release, kit.new, _other_base(kit), keys or kit.signers(Role.COMMAND),
        lambda data: order.append(store.put(data)), now=NOW, expires=expires,
        chunk_out_size=16384,
    )
    out = kit.tmp / "controller.slb"
    with out.open("wb") as f:
        write_slb(f, manifest, doc, (store.get(d) for d in order))
    return out, doc, manifest


def test_controller_delta_for_another_base_applies_to_the_release_target(kit):
    slb, _, _ = _controller_slb(kit)
    release = verify_bundle(slb, kit.trust, now=NOW)
    assert release.payload_doc is not None
    assert release.payload.kind.value == "delta"
    apply_bundle(slb, _other_base(kit), kit.tmp / "out.img", kit.trust, now=NOW)
    assert (kit.tmp / "out.img").read_bytes() == kit.new.read_bytes()


def test_payload_doc_signed_by_release_key_is_refused(kit):
    slb, _, _ = _controller_slb(kit, keys=kit.signers(Role.RELEASE))
    with pytest.raises(SignatureInvalid):
        verify_bundle(slb, kit.trust, now=NOW)


def test_expired_payload_doc_is_refused(kit):
    slb, _, _ = _controller_slb(kit, expires=NOW + 5)
    with pytest.raises(MetadataExpired):
        verify_bundle(slb, kit.trust, now=NOW + 5)


def test_payload_doc_for_another_manifest_is_refused(kit):
    _, doc, _ = _controller_slb(kit)
    kit.build("other.slb", full=True, notes="another release")
    with (kit.tmp / "other.slb").open("rb") as f:
        other_manifest = SlbReader(f).read_header().manifest
    with pytest.raises(FormatInvalid, match="another release manifest"):
        verify_release(other_manifest, kit.trust, now=NOW, payload_doc=doc)


def test_command_key_cannot_make_a_device_write_another_image(kit):
    # A stolen command key signs a payload that decodes to other bytes of the right size:
    # the release-signed target digest still refuses it, and nothing is written.
    release, manifest = _release(kit)
    evil = kit.tmp / "evil.img"
    evil.write_bytes(bytes(reversed(kit.new.read_bytes())))
    chunks: list[bytes] = []
    payload = encode_payload(evil, _other_base(kit), chunks.append, chunk_out_size=16384)
    doc = sign_payload_doc(payload, release.manifest_envelope, kit.signers(Role.COMMAND),
                           created=NOW, expires=NOW + 60)
    out = kit.tmp / "evil.slb"
    with out.open("wb") as f:
        write_slb(f, manifest, doc, chunks)
    verify_bundle(out, kit.trust, now=NOW)  # the doc itself is validly signed
    with pytest.raises(DigestMismatch):
        apply_bundle(out, _other_base(kit), kit.tmp / "out.img", kit.trust, now=NOW)
    assert not (kit.tmp / "out.img").exists()


def test_payload_doc_that_changes_the_output_size_is_refused_at_signing(kit):
    release, _ = _release(kit)
    payload = encode_payload(kit.old, None, lambda _: None, chunk_out_size=16384)
    with pytest.raises(FormatInvalid, match="produces"):
        sign_payload_doc(payload, release.manifest_envelope, kit.signers(Role.COMMAND),
                         created=NOW, expires=NOW + 60)


def test_payload_doc_names_the_manifest_digest(kit):
    _, doc, manifest = _controller_slb(kit)
    signed = canonical.decode(manifest)["signed"]
    digest = hashlib.sha256(canonical.encode(signed)).hexdigest()
    assert canonical.decode(doc)["signed"]["manifest"] == digest


def test_bit_flips_in_the_payload_doc_are_refused(kit):
    slb, doc, _manifest = _controller_slb(kit)
    data = slb.read_bytes()
    start = data.index(doc)
    for pos in range(start, start + len(doc), 7):
        mutated = bytearray(data)
        mutated[pos] ^= 0x04
        with pytest.raises(BundleRejected):
            verify_bundle(io.BytesIO(bytes(mutated)), kit.trust, now=NOW)
