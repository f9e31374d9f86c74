"""Controller-made payload documents: an extra delta for a base the release did not ship.

The controller never holds release keys, yet devices sit on many bases. It may compute a delta
from any base to a release's target and sign the chunk table with the **command** role (schema 1)::

    {"type": "payload", "schema": 1, "bundle_id": str, "manifest": hex,
     "payload": {...same shape as the manifest's payload...}, "created": unix, "expires": unix}

Rules:

* ``manifest`` is the SHA-256 of the release manifest's canonical signed bytes
  (``Envelope.digest``): a payload doc applies to exactly one release manifest (no
  mix-and-match);
* its chunks must produce exactly the release's ``target.size``; the final image must still hash
  to the **release-signed** target digest, so a stolen command key can waste a download but never
  make a device boot an image the release keys did not sign;
* it expires like a command (freeze defence).

    doc = sign_payload_doc(payload, manifest_env, command_keys, created=now, expires=now + 86400)
    verified = verify_payload_doc(doc, trust, manifest_env, manifest, now=now)
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from firmware_bundles.errors import FormatInvalid, MetadataExpired, SchemaUnsupported
from firmware_bundles.keys import Envelope, SigningKey, is_hex_digest, sign_envelope
from firmware_bundles.manifest import MAX_TIME, Manifest, Payload, check_token
from firmware_bundles.trust import Role, TrustStore

PAYLOAD_SCHEMA = 1
MAX_PAYLOAD_DOC = 4 * 1024 * 1024


@dataclass(frozen=True)
class PayloadDoc:
    """A command-signed payload table for one release manifest."""

    bundle_id: str
    manifest: str
    payload: Payload
    created: int
    expires: int
    schema: int = PAYLOAD_SCHEMA

    def __post_init__(self) -> None:
        if self.schema != PAYLOAD_SCHEMA:
            raise SchemaUnsupported(f"payload doc schema {self.schema!r} is not supported")
        check_token("bundle id", self.bundle_id)
        if not is_hex_digest(self.manifest):
            raise FormatInvalid("payload doc manifest digest must be 64 lowercase hex")
        for what, value in (("created", self.created), ("expires", self.expires)):
            if type(value) is not int or not 0 <= value <= MAX_TIME:
                raise FormatInvalid(f"payload doc {what} must be a unix time")
        if self.expires <= self.created:
            raise FormatInvalid("a payload doc expires after it is created")

    def to_signed(self) -> dict[str, Any]:
        """The ``signed`` document."""
        return {
            "type": "payload",
            "schema": self.schema,
            "bundle_id": self.bundle_id,
            "manifest": self.manifest,
            "payload": self.payload.to_json(),
            "created": self.created,
            "expires": self.expires,
        }

    @classmethod
    def from_signed(cls, doc: Mapping[str, Any]) -> PayloadDoc:
        """Parse and validate the ``signed`` document."""
        if not isinstance(doc, Mapping) or doc.get("type") != "payload":
            raise FormatInvalid("not a payload doc (type)")
        if doc.get("schema") != PAYLOAD_SCHEMA:
            raise SchemaUnsupported(f"payload doc schema {doc.get('schema')!r} is not supported")
        fields = {"type", "schema", "bundle_id", "manifest", "payload", "created", "expires"}
        if set(doc) != fields:
            raise FormatInvalid(f"a payload doc has exactly the fields {sorted(fields)}")
        return cls(
            bundle_id=doc["bundle_id"],
            manifest=doc["manifest"],
            payload=Payload.from_json(doc["payload"]),
            created=doc["created"],
            expires=doc["expires"],
            schema=doc["schema"],
        )


def sign_payload_doc(
    payload: Payload,
    manifest_envelope: Envelope,
    keys: Iterable[SigningKey],
    *,
    created: int,
    expires: int,
) -> bytes:
    """Sign ``payload`` as an extra payload of the release manifest in ``manifest_envelope``."""
    manifest = Manifest.from_signed(manifest_envelope.signed)
    payload.check_produces(manifest.target)
    doc = PayloadDoc(
        bundle_id=manifest.bundle_id,
        manifest=manifest_envelope.digest,
        payload=payload,
        created=created,
        expires=expires,
    )
    return sign_envelope(doc.to_signed(), keys)


def verify_payload_doc(
    data: bytes | Mapping[str, Any],
    trust: TrustStore,
    manifest_envelope: Envelope,
    manifest: Manifest,
    *,
    now: int,
) -> PayloadDoc:
    """Verify a payload doc against the (already verified) release manifest it extends.

    Raises:
        SignatureInvalid: not signed by the command role's threshold.
        FormatInvalid: malformed, names another manifest or bundle, or produces another size.
        MetadataExpired: past its expiry.
    """
    envelope = trust.verify(data, Role.COMMAND, now=now, max_size=MAX_PAYLOAD_DOC)
    doc = PayloadDoc.from_signed(envelope.signed)
    if doc.manifest != manifest_envelope.digest or doc.bundle_id != manifest.bundle_id:
        raise FormatInvalid("payload doc is for another release manifest")
    doc.payload.check_produces(manifest.target)
    if now >= doc.expires:
        raise MetadataExpired("payload doc has expired")
    return doc
