"""Errors of the bundle library, split by who is at fault.

Every error that can cross a process boundary carries a stable ``code`` (``bundle.*``); the CLI,
the agent's events and the controller's API all report that code verbatim, so tooling can match
on it. Messages are one human line.

    try:
        manifest = verify_bundle(data, trust, now=now)
    except BundleRejected as e:
        print(e.code, e)          # bundle.signature_invalid  manifest signature does not verify
"""

from __future__ import annotations


class BundleError(Exception):
    """Root of every error this package raises on purpose."""

    code = "bundle.error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class BundleRejected(BundleError):
    """The data is bad: forged, mutated, truncated, stale or not meant for this device."""

    code = "bundle.rejected"


class FormatInvalid(BundleRejected):
    """Bytes do not parse as the format they claim to be (bad magic, bad JSON, bad lengths)."""

    code = "bundle.format_invalid"


class SchemaUnsupported(BundleRejected):
    """A schema version this build does not understand."""

    code = "bundle.schema_unsupported"


class SignatureInvalid(BundleRejected):
    """Not enough valid signatures from the keys of the role that must sign."""

    code = "bundle.signature_invalid"


class MetadataExpired(BundleRejected):
    """Signed metadata or a command is past its expiry (freeze attack defence)."""

    code = "bundle.expired"


class VersionRollback(BundleRejected):
    """``security_version`` below what the device has committed (downgrade defence)."""

    code = "bundle.version_rollback"


class HardwareMismatch(BundleRejected):
    """The bundle is not built for this hardware model."""

    code = "bundle.hardware_mismatch"


class BaseMismatch(BundleRejected):
    """A delta's base image is not the image it is applied to."""

    code = "bundle.base_mismatch"


class DigestMismatch(BundleRejected):
    """A chunk or the final image does not hash to the signed digest."""

    code = "bundle.digest_mismatch"


class SizeExceeded(BundleRejected):
    """More bytes than the signed sizes allow (endless data, decompression bombs)."""

    code = "bundle.size_exceeded"


class Truncated(BundleRejected):
    """Fewer bytes than the signed sizes promise."""

    code = "bundle.truncated"


class DeltaCorrupt(BundleRejected):
    """A delta stream does not decode (its digest matched, so the encoder or key is at fault)."""

    code = "bundle.delta_corrupt"


class TrustInvalid(BundleRejected):
    """Trust metadata (root, rotation, delegation) does not verify."""

    code = "bundle.trust_invalid"


class CommandRejected(BundleRejected):
    """A deployment command failed a check (signature, device, counter, expiry)."""

    code = "command.rejected"


class TransferError(BundleError):
    """Moving bytes failed (I/O, network): the data may be fine, try again."""

    code = "transfer.error"


class ProtocolViolation(BundleRejected):
    """A wire message breaks the MQTT protocol contract (topic, size, schema, frame)."""

    code = "protocol.malformed"


class MessageTooLarge(ProtocolViolation):
    """A wire message is larger than its channel's cap; it is dropped unread."""

    code = "protocol.too_large"


class TopicInvalid(ProtocolViolation):
    """A topic outside ``slotline/v1/dev/<id>/<channel>`` or with an invalid device id."""

    code = "protocol.topic_invalid"


class DeviceIdInvalid(ProtocolViolation):
    """A device id with characters MQTT treats specially (``+ # / $``, NUL) or of bad length."""

    code = "protocol.device_id_invalid"
