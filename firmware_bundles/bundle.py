"""High-level bundle API: build, verify and apply; what the agent, controller and CLI call.

Rules (design "Bundles and trust"):

* bytes in, verified objects out: ``verify_release`` is the only way to a ``VerifiedRelease``,
  and it checks, in order, the release-role signature, the schema, expiry, hardware,
  ``security_version`` and (if present) the command-signed payload doc;
* a ``.slb`` is verified **before** a chunk byte is read, and each chunk by its signed size and
  SHA-256 before it is decoded;
* ``apply_bundle`` checks the base image digest before it writes a byte, writes to a temporary
  file in the output's directory, checks every chunk's output size and the final image digest
  against the **release-signed** target, fsyncs, then renames; on any failure the temporary file
  is removed and nothing appears at the output path;
* no name inside a bundle is ever used as a path.

    release = verify_bundle(Path("u.slb"), trust, now=now, hardware="board-x")
    apply_bundle(Path("u.slb"), Path("old.img"), Path("new.img"), trust, now=now)
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO, Self

from firmware_bundles import canonical
from firmware_bundles.commands import Action, Command
from firmware_bundles.durable import fsync_dir
from firmware_bundles.errors import (
    BaseMismatch,
    BundleRejected,
    DigestMismatch,
    FormatInvalid,
    HardwareMismatch,
    MetadataExpired,
    SizeExceeded,
    TransferError,
    Truncated,
    VersionRollback,
)
from firmware_bundles.keys import Envelope, SigningKey, sign_envelope
from firmware_bundles.manifest import (
    CODEC_ID,
    MAX_CHUNK_SIZE,
    ChunkEntry,
    ImageRef,
    Manifest,
    Payload,
    PayloadKind,
)
from firmware_bundles.payload import PayloadDoc, verify_payload_doc
from firmware_bundles.slb import MAX_MANIFEST, SlbReader, check_chunk, encode_header
from firmware_bundles.trust import Role, TrustStore

HASH_BUFFER = 1 << 20
# Output bytes per chunk when building. An incompressible chunk is stored with a few bytes of
# framing, so 64 KiB below the 4 MiB transfer cap (manifest.MAX_CHUNK_SIZE) always fits.
DEFAULT_CHUNK_OUT = (4 << 20) - (64 << 10)
DEFAULT_EXPIRES_DAYS = 365


# ------------------------------------------------------------------------------------ digests


def hash_stream(stream: BinaryIO, *, buffer_size: int = HASH_BUFFER) -> ImageRef:
    """Size and SHA-256 of everything left in ``stream`` (one pass, one reused buffer)."""
    h = hashlib.sha256()
    buf = bytearray(buffer_size)
    view = memoryview(buf)
    size = 0
    while True:
        n = stream.readinto(view)  # type: ignore[attr-defined]
        if not n:
            break
        h.update(view[:n])
        size += n
    return ImageRef(size=size, sha256=h.hexdigest())


def hash_file(path: Path, *, buffer_size: int = HASH_BUFFER) -> ImageRef:
    """Size and SHA-256 of a file (or block device)."""
    with Path(path).open("rb", buffering=0) as f:
        return hash_stream(f, buffer_size=buffer_size)


def verify_image(path: Path, target: ImageRef) -> None:
    """Raise ``DigestMismatch`` unless the file at ``path`` is exactly ``target``.

    This is the check before a slot is marked bootable.
    """
    actual = hash_file(path)
    if actual != target:
        raise DigestMismatch(
            f"image is {actual.size} bytes sha256 {actual.sha256[:16]}..., "
            f"signed target is {target.size} bytes sha256 {target.sha256[:16]}..."
        )


# ------------------------------------------------------------------------------------ verify


@dataclass(frozen=True)
class VerifiedRelease:
    """A release manifest (and optional payload doc) whose every check passed."""

    manifest: Manifest
    manifest_envelope: Envelope
    payload_doc: PayloadDoc | None = None

    @property
    def payload(self) -> Payload:
        """The payload to apply: the payload doc's if there is one, else the manifest's."""
        return self.payload_doc.payload if self.payload_doc else self.manifest.payload

    @property
    def manifest_digest(self) -> str:
        """SHA-256 of the release manifest's canonical signed bytes."""
        return self.manifest_envelope.digest

    @property
    def target(self) -> ImageRef:
        """The release-signed target image: the only digest that makes a slot bootable."""
        return self.manifest.target


def verify_release(
    manifest: bytes | Mapping[str, Any],
    trust: TrustStore,
    *,
    now: int,
    payload_doc: bytes | Mapping[str, Any] | None = None,
    hardware: str | None = None,
    min_security_version: int = 0,
) -> VerifiedRelease:
    """Verify a release manifest envelope (and an optional payload doc) for this device.

    Args:
        manifest: the release-signed envelope, as bytes or as a parsed JSON object.
        trust: the trust store.
        now: unix time.
        payload_doc: a command-signed payload doc for this manifest, if any.
        hardware: this device's hardware model (``None``: any, e.g. on the controller).
        min_security_version: the device's committed security version.

    Raises:
        SignatureInvalid, FormatInvalid, SchemaUnsupported, MetadataExpired, HardwareMismatch,
        VersionRollback: see ``errors.py``.
    """
    envelope = trust.verify(manifest, Role.RELEASE, now=now, max_size=MAX_MANIFEST)
    parsed = Manifest.from_signed(envelope.signed)
    if now >= parsed.expires:
        raise MetadataExpired(f"manifest {parsed.bundle_id} expired")
    if hardware is not None and hardware not in parsed.hardware:
        raise HardwareMismatch(f"bundle is for {', '.join(parsed.hardware)}, not {hardware}")
    if parsed.security_version < min_security_version:
        raise VersionRollback(
            f"security version {parsed.security_version} is below {min_security_version}"
        )
    doc = None
    if payload_doc is not None:
        doc = verify_payload_doc(payload_doc, trust, envelope, parsed, now=now)
    return VerifiedRelease(parsed, envelope, doc)


def verify_install(
    command: Command,
    trust: TrustStore,
    *,
    now: int,
    hardware: str,
    min_security_version: int,
) -> VerifiedRelease:
    """Verify the release carried by a (verified) install command.

    Raises:
        FormatInvalid: not an install command, or its bundle id differs from the manifest's.
        BundleRejected subclasses: see ``verify_release``.
    """
    if command.action is not Action.INSTALL:
        raise FormatInvalid(f"command is {command.action.value}, not install")
    release = verify_release(
        command.args["manifest"],
        trust,
        now=now,
        payload_doc=command.args.get("payload"),
        hardware=hardware,
        min_security_version=min_security_version,
    )
    if release.manifest.bundle_id != command.args["bundle_id"]:
        raise FormatInvalid("command bundle id differs from its manifest's")
    return release


def check_base(payload: Payload, base: ImageRef | None) -> None:
    """Raise ``BaseMismatch`` unless a delta payload's base is exactly ``base``."""
    if payload.kind is PayloadKind.FULL:
        return
    if base is None or base != payload.base:
        have = "no base" if base is None else f"base sha256 {base.sha256[:16]}..."
        assert payload.base is not None
        raise BaseMismatch(f"delta needs base sha256 {payload.base.sha256[:16]}..., have {have}")


def decode_verified_chunk(entry: ChunkEntry, data: bytes, base: Any) -> Iterator[bytes]:
    """Check a chunk against its table row, then decode it into exactly ``entry.out_size`` bytes.

    Args:
        entry: the chunk's row of a verified payload table.
        data: the chunk bytes, from any source (file, MQTT, relay).
        base: a ``delta.BaseReader`` for delta payloads, ``None`` for full ones.

    Raises:
        DigestMismatch / SizeExceeded / Truncated / DeltaCorrupt.
    """
    from firmware_bundles import delta  # noqa: PLC0415 - the codec loads numpy

    check_chunk(entry, data)
    produced = 0
    for piece in delta.decode_chunk(data, entry.out_size, base):
        produced += len(piece)
        # The codec bounds itself; this is the bundle layer's own guard against a bomb.
        if produced > entry.out_size:
            raise SizeExceeded(f"chunk decodes past its signed out_size {entry.out_size}")
        yield piece
    if produced != entry.out_size:
        raise Truncated(f"chunk decodes to {produced} bytes, signed out_size {entry.out_size}")


# ------------------------------------------------------------------------------------ .slb


class OpenBundle:
    """A ``.slb`` whose envelopes are verified; its chunks are read (and checked) on demand."""

    def __init__(self, stream: BinaryIO, release: VerifiedRelease, *, owned: bool) -> None:
        self._stream = stream
        self._owned = owned
        self.release = release
        self._reader: SlbReader | None = None

    def chunks(self) -> Iterator[bytes]:
        """Each chunk's verified bytes, in order; ends with the trailing-bytes check."""
        assert self._reader is not None
        return self._reader.iter_chunks(self.release.payload.chunks)

    def close(self) -> None:
        """Close the stream if this object opened it."""
        if self._owned:
            self._stream.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _open_source(source: Path | BinaryIO) -> tuple[BinaryIO, bool]:
    """The stream to read and whether we opened it (and so must close it)."""
    if not isinstance(source, str | Path):
        return source, False
    try:
        return Path(source).open("rb"), True
    except OSError as e:
        raise TransferError(f"cannot open bundle: {e}") from e


def open_bundle(
    source: Path | BinaryIO,
    trust: TrustStore,
    *,
    now: int,
    hardware: str | None = None,
    min_security_version: int = 0,
) -> OpenBundle:
    """Read and verify a ``.slb``'s header; no chunk byte is read yet.

    Raises:
        BundleRejected subclasses: bad container or any ``verify_release`` refusal.
        TransferError: the source could not be read.
    """
    stream, owned = _open_source(source)
    try:
        reader = SlbReader(stream)
        header = reader.read_header()
        release = verify_release(
            header.manifest,
            trust,
            now=now,
            payload_doc=header.payload_doc,
            hardware=hardware,
            min_security_version=min_security_version,
        )
    except BaseException:
        if owned:
            stream.close()
        raise
    bundle = OpenBundle(stream, release, owned=owned)
    bundle._reader = reader  # noqa: SLF001 - set once, here
    return bundle


def verify_bundle(
    source: Path | BinaryIO,
    trust: TrustStore,
    *,
    now: int,
    hardware: str | None = None,
    min_security_version: int = 0,
    decode: bool = False,
    base_path: Path | None = None,
) -> VerifiedRelease:
    """Verify a whole ``.slb``: envelopes, every chunk's size and digest, no trailing bytes.

    With ``decode``, also decode every chunk (against ``base_path`` for a delta) and check the
    image that would result against the signed target, writing nothing.

    Raises:
        BaseMismatch: ``decode`` on a delta without the exact base.
        BundleRejected subclasses: see ``open_bundle`` and ``apply_chunks``.
    """
    with open_bundle(
        source, trust, now=now, hardware=hardware, min_security_version=min_security_version
    ) as bundle:
        if not decode:
            for _ in bundle.chunks():
                pass
            return bundle.release
        with _checked_base(bundle.release.payload, base_path) as base:
            apply_chunks(bundle.release, bundle.chunks(), base, lambda _piece: None)
        return bundle.release


@contextlib.contextmanager
def _checked_base(payload: Payload, base_path: Path | None) -> Iterator[Any]:
    """A base reader for a delta payload, after checking the base digest; ``None`` for full."""
    from firmware_bundles.delta import FileBaseReader  # noqa: PLC0415 - the codec loads numpy

    if payload.kind is PayloadKind.FULL:
        yield None
        return
    if base_path is None:
        check_base(payload, None)
    assert base_path is not None
    try:
        base_file = Path(base_path).open("rb")  # noqa: SIM115 - closed by the with below
    except OSError as e:
        raise BaseMismatch(f"cannot read base image: {e.strerror}") from e
    with base_file:
        # design: the base digest is checked before a single output byte is written
        check_base(payload, hash_stream(base_file))
        yield FileBaseReader(base_file)


def apply_chunks(
    release: VerifiedRelease,
    chunks: Iterator[bytes],
    base: Any,
    write: Callable[[bytes], object],
) -> ImageRef:
    """Decode verified chunks in order through ``write``; check and return the final digest.

    The building block of ``apply_bundle`` (and of the agent writing a slot). Each chunk's
    digest is checked against its table row before it is handed to the decoder; later chunks
    decode on threads while earlier ones are written (``delta.decode_chunks``), within the
    codec's in-flight memory budget. A refused chunk raises before any of its bytes, or any
    byte after it, reaches ``write``.

    Raises:
        DigestMismatch: the output is not the release-signed target.
        Truncated: fewer chunks than the table.
        BundleRejected subclasses from ``check_chunk`` and the codec.
    """
    from firmware_bundles import delta  # noqa: PLC0415 - the codec loads lazily

    h = hashlib.sha256()
    size = 0
    entries = release.payload.chunks
    source = iter(chunks)

    def checked() -> Iterator[tuple[bytes, int]]:
        # Pulled on this thread by the pipeline: the .slb reader is never shared.
        for index, entry in enumerate(entries):
            data = next(source, None)
            if data is None:
                raise Truncated(f"{index} chunks of {len(entries)}")
            check_chunk(entry, data)
            yield data, entry.out_size

    decoded = delta.decode_chunks(checked(), base)
    try:
        for entry, out in zip(entries, decoded, strict=False):
            # The codec bounds itself; this is the bundle layer's own guard against a bomb.
            if len(out) != entry.out_size:
                raise SizeExceeded(f"chunk decodes to {len(out)} bytes, "
                                   f"signed out_size {entry.out_size}")
            h.update(out)
            size += len(out)
            write(out)
    finally:
        decoded.close()  # type: ignore[attr-defined]
    # Pull once more: a .slb reader checks for trailing bytes only when asked past the end.
    for _extra in source:
        raise SizeExceeded("more chunks than the signed table")
    result = ImageRef(size=size, sha256=h.hexdigest())
    if result != release.target:
        raise DigestMismatch("applied image does not match the release-signed target digest")
    return result


def apply_bundle(
    source: Path | BinaryIO,
    base_path: Path | None,
    out_path: Path,
    trust: TrustStore,
    *,
    now: int,
    hardware: str | None = None,
    min_security_version: int = 0,
) -> VerifiedRelease:
    """Verify and apply a ``.slb`` to ``out_path``, atomically.

    Args:
        source: the ``.slb`` path or a binary stream positioned at its start.
        base_path: the exact base image for a delta (ignored for full bundles).
        out_path: where the new image appears, only once fully verified.
        trust: the trust store.
        now: unix time.
        hardware: this device's hardware model, or ``None`` to skip the check.
        min_security_version: refuse bundles below this security version.

    Raises:
        BaseMismatch: the base is missing or not the signed base (checked before any write).
        BundleRejected subclasses: any other refusal. Nothing is left at ``out_path``.
        TransferError: I/O failure.
    """
    out_path = Path(out_path)
    with open_bundle(
        source, trust, now=now, hardware=hardware, min_security_version=min_security_version
    ) as bundle:
        release = bundle.release
        with _checked_base(release.payload, base_path) as base:
            _write_atomically(out_path, release, bundle.chunks(), base)
    return release


def _write_atomically(
    out_path: Path, release: VerifiedRelease, chunks: Iterator[bytes], base: Any
) -> None:
    try:
        fd, tmp_name = tempfile.mkstemp(
            dir=out_path.parent, prefix=f".{out_path.name}.", suffix=".part"
        )
    except OSError as e:
        raise TransferError(f"cannot create a temporary file next to the output: {e}") from e
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            os.fchmod(out.fileno(), 0o644)  # mkstemp makes 0600; an image is not secret
            apply_chunks(release, chunks, base, out.write)
            out.flush()
            os.fsync(out.fileno())
        tmp.replace(out_path)
        fsync_dir(out_path.parent)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise TransferError(f"writing the output: {e}") from e
        raise


# ------------------------------------------------------------------------------------ build


def encode_payload(
    new: Path,
    base: Path | None,
    sink: Callable[[bytes], object],
    *,
    chunk_out_size: int | None = None,
) -> Payload:
    """Encode ``new`` (against ``base`` if given) and hand each chunk to ``sink`` in order.

    The controller passes ``ChunkStore.put`` as the sink; ``build_bundle`` a spool file.
    """
    from firmware_bundles import delta  # noqa: PLC0415 - the codec loads numpy

    out_size = chunk_out_size or DEFAULT_CHUNK_OUT
    base_ref = None
    if base is None:
        encoded = delta.encode_full(Path(new), chunk_out_size=out_size)
    else:
        base_ref = hash_file(base)
        encoded = delta.encode_delta(Path(base), Path(new), chunk_out_size=out_size)
    entries: list[ChunkEntry] = []
    for chunk in encoded:
        if len(chunk.data) > MAX_CHUNK_SIZE:
            raise FormatInvalid(
                f"chunk {len(entries)} is {len(chunk.data)} bytes, over the {MAX_CHUNK_SIZE}-byte "
                "transfer cap: use a smaller chunk_out_size"
            )
        entries.append(
            ChunkEntry(
                size=len(chunk.data),
                sha256=hashlib.sha256(chunk.data).hexdigest(),
                out_size=chunk.out_size,
            )
        )
        sink(chunk.data)
    kind = PayloadKind.FULL if base is None else PayloadKind.DELTA
    return Payload(kind=kind, base=base_ref, codec=CODEC_ID, chunks=tuple(entries))


def default_bundle_id(component: str, version: str, target: ImageRef, base: ImageRef | None) -> str:
    """``<component>-<version>-<target prefix>[-from-<base prefix>]``."""
    bid = f"{component}-{version}-{target.sha256[:12]}"
    return bid if base is None else f"{bid}-from-{base.sha256[:8]}"


def sign_manifest(manifest: Manifest, keys: Sequence[SigningKey]) -> bytes:
    """The release-signed envelope bytes of ``manifest``."""
    return sign_envelope(manifest.to_signed(), keys)


def build_bundle(
    new: Path,
    out: Path,
    *,
    release_keys: Sequence[SigningKey],
    version: str,
    hardware: Sequence[str],
    now: int,
    base: Path | None = None,
    component: str = "rootfs",
    security_version: int = 0,
    expires: int | None = None,
    notes: str = "",
    requires: Mapping[str, str] | None = None,
    bundle_id: str | None = None,
    chunk_out_size: int | None = None,
) -> Manifest:
    """Encode, sign and write a ``.slb`` (full without ``base``, delta with it), atomically.

    Raises:
        FormatInvalid: an invalid field (version, hardware, requires...).
        OSError: reading the images or writing ``out`` failed.
    """
    out = Path(out)
    target = hash_file(new)
    fd, spool_name = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".chunks")
    spool = Path(spool_name)
    try:
        with os.fdopen(fd, "w+b") as spool_file:
            payload = encode_payload(new, base, spool_file.write, chunk_out_size=chunk_out_size)
            manifest = Manifest(
                bundle_id=bundle_id or default_bundle_id(component, version, target, payload.base),
                component=component,
                version=version,
                security_version=security_version,
                hardware=tuple(hardware),
                target=target,
                payload=payload,
                requires=tuple(sorted((requires or {}).items())),
                notes=notes,
                created=now,
                expires=expires if expires is not None else now + DEFAULT_EXPIRES_DAYS * 86400,
            )
            header = encode_header(sign_manifest(manifest, release_keys))
            spool_file.seek(0)
            ofd, out_name = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".part")
            try:
                with os.fdopen(ofd, "wb") as f:
                    os.fchmod(f.fileno(), 0o644)  # mkstemp makes 0600; a bundle is not secret
                    f.write(header)
                    shutil.copyfileobj(spool_file, f, 1 << 20)
                    f.flush()
                    os.fsync(f.fileno())
                Path(out_name).replace(out)
            except BaseException:
                Path(out_name).unlink(missing_ok=True)
                raise
    finally:
        spool.unlink(missing_ok=True)
    return manifest


def build_payload_doc(
    release: VerifiedRelease,
    new: Path,
    base: Path,
    command_keys: Sequence[SigningKey],
    sink: Callable[[bytes], object],
    *,
    now: int,
    expires: int,
    chunk_out_size: int | None = None,
) -> bytes:
    """Controller side: a command-signed delta from ``base`` to a verified release's target.

    Each chunk goes to ``sink`` (e.g. ``ChunkStore.put``); returns the payload doc envelope that
    travels with the release manifest (in an install command, or in a ``.slb``).

    Raises:
        DigestMismatch: ``new`` is not the release's target image.
    """
    from firmware_bundles.payload import sign_payload_doc  # noqa: PLC0415

    verify_image(new, release.target)
    payload = encode_payload(new, base, sink, chunk_out_size=chunk_out_size)
    return sign_payload_doc(
        payload, release.manifest_envelope, command_keys, created=now, expires=expires
    )


# ------------------------------------------------------------------------------------ inspect


def inspect_bundle(source: Path | BinaryIO) -> dict[str, Any]:
    """Describe a ``.slb`` **without verifying it** (for humans; never act on this).

    Raises:
        BundleRejected: the header does not parse.
    """
    stream, owned = _open_source(source)
    try:
        header = SlbReader(stream).read_header()
    finally:
        if owned:
            stream.close()
    doc = canonical.decode(header.manifest, max_size=MAX_MANIFEST)
    if not isinstance(doc, dict) or not isinstance(doc.get("signed"), dict):
        raise FormatInvalid("manifest is not an envelope")
    try:
        manifest = Manifest.from_signed(doc["signed"])
    except BundleRejected as e:
        raise FormatInvalid(f"manifest: {e}") from None
    payload = manifest.payload
    return {
        "verified": False,
        "bundle_id": manifest.bundle_id,
        "component": manifest.component,
        "version": manifest.version,
        "security_version": manifest.security_version,
        "hardware": list(manifest.hardware),
        "target": manifest.target.to_json(),
        "payload": {
            "kind": payload.kind.value,
            "base": None if payload.base is None else payload.base.to_json(),
            "codec": payload.codec,
            "chunks": len(payload.chunks),
            "stored_size": payload.stored_size,
        },
        "requires": manifest.requires_map,
        "notes": manifest.notes,
        "created": manifest.created,
        "expires": manifest.expires,
        "signed_by": [s.get("keyid") for s in doc.get("signatures", []) if isinstance(s, dict)],
        "manifest_sha256": hashlib.sha256(canonical.encode(doc["signed"])).hexdigest(),
        "payload_doc": header.payload_doc is not None,
        "header_size": header.chunks_offset,
    }
