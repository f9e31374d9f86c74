"""Signed per-device commands: short-lived, counter-numbered, signed by the command role.

Schema 1 (the ``signed`` part of the envelope)::

    {"type": "command", "schema": 1, "device": id, "counter": N, "issued": unix,
     "expires": unix, "action": "install"|"rollback"|"cancel"|"config", "args": {...}}

``install`` args: ``{"bundle_id": str, "manifest": <release envelope>, "payload": <command-signed
payload doc envelope> (optional), "rollout": str}``. The manifest inside is verified separately
(``bundle.verify_install``), with the release role.

``verify_command`` checks, in this order, each with its own stable code:

==============================  ===========================================================
``command.malformed``           not a canonical envelope / wrong fields or types / too large
``command.schema_unsupported``  another schema version
``command.signature_invalid``   command role threshold not met (or trust root expired)
``command.wrong_device``        ``device`` is not this device
``command.replayed``            ``counter`` not above the last one this device accepted
``command.expired``             ``now >= expires``
``command.not_yet_valid``       ``issued`` more than ``max_skew`` seconds in the future
==============================  ===========================================================

A command's lifetime (``expires - issued``) is capped at ``MAX_LIFETIME``: the command key is
online, so what it signs must go stale fast.

    data = sign_command(keys, device="d1", counter=7, action=Action.CANCEL, args={}, issued=now)
    cmd = verify_command(data, trust, device_id="d1", last_counter=6, now=now)
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from firmware_bundles import canonical
from firmware_bundles.errors import (
    BundleRejected,
    CommandRejected,
    FormatInvalid,
    MetadataExpired,
    SchemaUnsupported,
    SignatureInvalid,
)
from firmware_bundles.keys import SigningKey, sign_envelope
from firmware_bundles.manifest import check_token
from firmware_bundles.trust import Role, TrustStore

COMMAND_SCHEMA = 1
MAX_COMMAND_SIZE = 1024 * 1024  # the MQTT cmd channel's cap (protocol.MAX_BYTES[CMD])
MAX_LIFETIME = 7 * 24 * 3600
DEFAULT_LIFETIME = 3600
DEFAULT_MAX_SKEW = 300
MAX_COUNTER = 2**63 - 1


class CommandCode(enum.Enum):
    """Stable codes of command refusals (``CommandRejected.code``)."""

    MALFORMED = "command.malformed"
    SCHEMA_UNSUPPORTED = "command.schema_unsupported"
    SIGNATURE_INVALID = "command.signature_invalid"
    WRONG_DEVICE = "command.wrong_device"
    REPLAYED = "command.replayed"
    EXPIRED = "command.expired"
    NOT_YET_VALID = "command.not_yet_valid"


def _reject(code: CommandCode, message: str) -> CommandRejected:
    return CommandRejected(message, code=code.value)


class Action(enum.Enum):
    """What a command asks the device to do."""

    INSTALL = "install"
    ROLLBACK = "rollback"
    CANCEL = "cancel"
    CONFIG = "config"


@dataclass(frozen=True)
class Command:
    """A verified command."""

    device: str
    counter: int
    issued: int
    expires: int
    action: Action
    args: Mapping[str, Any] = field(default_factory=dict)
    schema: int = COMMAND_SCHEMA

    def __post_init__(self) -> None:
        if self.schema != COMMAND_SCHEMA:
            raise SchemaUnsupported(f"command schema {self.schema!r} is not supported")
        check_token("device id", self.device)
        for what, value, high in (
            ("counter", self.counter, MAX_COUNTER),
            ("issued", self.issued, 2**40),
            ("expires", self.expires, 2**40),
        ):
            if type(value) is not int or not 0 <= value <= high:
                raise FormatInvalid(f"command {what} must be a non-negative integer")
        if not 0 < self.expires - self.issued <= MAX_LIFETIME:
            raise FormatInvalid(f"command lifetime must be 1..{MAX_LIFETIME} seconds")
        if not isinstance(self.action, Action) or not isinstance(self.args, Mapping):
            raise FormatInvalid("command action must be an Action and args an object")
        if self.action is Action.INSTALL:
            _check_install_args(self.args)

    def to_signed(self) -> dict[str, Any]:
        """The ``signed`` document."""
        return {
            "type": "command",
            "schema": self.schema,
            "device": self.device,
            "counter": self.counter,
            "issued": self.issued,
            "expires": self.expires,
            "action": self.action.value,
            "args": dict(self.args),
        }

    @classmethod
    def from_signed(cls, doc: Mapping[str, Any]) -> Command:
        """Parse the ``signed`` document (raises ``FormatInvalid`` / ``SchemaUnsupported``)."""
        if not isinstance(doc, Mapping) or doc.get("type") != "command":
            raise FormatInvalid("not a command (type)")
        if doc.get("schema") != COMMAND_SCHEMA:
            raise SchemaUnsupported(f"command schema {doc.get('schema')!r} is not supported")
        fields = {"type", "schema", "device", "counter", "issued", "expires", "action", "args"}
        if set(doc) != fields:
            raise FormatInvalid(f"a command has exactly the fields {sorted(fields)}")
        try:
            action = Action(doc["action"])
        except ValueError:
            raise FormatInvalid(f"unknown command action {str(doc['action'])[:32]!r}") from None
        if not isinstance(doc["args"], Mapping):
            raise FormatInvalid("command args must be an object")
        return cls(
            device=doc["device"],
            counter=doc["counter"],
            issued=doc["issued"],
            expires=doc["expires"],
            action=action,
            args=doc["args"],
            schema=doc["schema"],
        )


def _check_install_args(args: Mapping[str, Any]) -> None:
    allowed = {"bundle_id", "manifest", "payload", "rollout"}
    if not {"bundle_id", "manifest"} <= set(args) <= allowed:
        raise FormatInvalid("install args are bundle_id, manifest, optional payload and rollout")
    check_token("bundle id", args["bundle_id"])
    if not isinstance(args["manifest"], Mapping):
        raise FormatInvalid("install manifest must be an envelope object")
    if "payload" in args and not isinstance(args["payload"], Mapping):
        raise FormatInvalid("install payload must be an envelope object")
    if "rollout" in args and not isinstance(args["rollout"], str | int):
        raise FormatInvalid("install rollout must be a string or integer id")


def sign_command(
    keys: Iterable[SigningKey],
    *,
    device: str,
    counter: int,
    action: Action,
    args: Mapping[str, Any],
    issued: int,
    expires: int | None = None,
) -> bytes:
    """Build, validate and sign a command; returns canonical envelope bytes.

    Args:
        keys: command-role signing keys (at least the role's threshold).
        device: the target device id.
        counter: strictly greater than any counter sent to this device before.
        action: what to do.
        args: action arguments (for install: bundle_id, manifest envelope, payload, rollout).
        issued: unix time of signing.
        expires: unix expiry; defaults to ``issued + DEFAULT_LIFETIME``.

    Raises:
        FormatInvalid: the command would not pass ``verify_command``'s schema checks.
    """
    command = Command(
        device=device,
        counter=counter,
        issued=issued,
        expires=issued + DEFAULT_LIFETIME if expires is None else expires,
        action=action,
        args=args,
    )
    data = sign_envelope(command.to_signed(), keys)
    if len(data) > MAX_COMMAND_SIZE:
        raise FormatInvalid(f"signed command of {len(data)} bytes exceeds {MAX_COMMAND_SIZE}")
    return data


def verify_command(
    data: bytes,
    trust: TrustStore,
    *,
    device_id: str,
    last_counter: int,
    now: int,
    max_skew: int = DEFAULT_MAX_SKEW,
) -> Command:
    """Verify a signed command for this device.

    Args:
        data: the envelope bytes as received.
        trust: the device's trust store.
        device_id: this device's id.
        last_counter: the highest counter this device has accepted (-1 for none).
        now: unix time.
        max_skew: how far in the future ``issued`` may lie (clock skew allowance).

    Returns:
        The verified command. The caller persists ``counter`` as the new last counter.

    Raises:
        CommandRejected: with one of the ``CommandCode`` codes.
    """
    if not isinstance(data, bytes | bytearray) or len(data) > MAX_COMMAND_SIZE:
        raise _reject(CommandCode.MALFORMED, f"command is not bytes of at most {MAX_COMMAND_SIZE}")
    try:
        envelope = trust.verify(bytes(data), Role.COMMAND, now=now, max_size=MAX_COMMAND_SIZE)
    except (SignatureInvalid, MetadataExpired) as e:
        raise _reject(CommandCode.SIGNATURE_INVALID, str(e)) from None
    except BundleRejected as e:
        raise _reject(CommandCode.MALFORMED, str(e)) from None
    try:
        command = Command.from_signed(envelope.signed)
    except SchemaUnsupported as e:
        raise _reject(CommandCode.SCHEMA_UNSUPPORTED, str(e)) from None
    except BundleRejected as e:
        raise _reject(CommandCode.MALFORMED, str(e)) from None
    if command.device != device_id:
        raise _reject(CommandCode.WRONG_DEVICE, f"command is for device {command.device!r}")
    if command.counter <= last_counter:
        raise _reject(
            CommandCode.REPLAYED, f"counter {command.counter} not above {last_counter}"
        )
    if now >= command.expires:
        raise _reject(CommandCode.EXPIRED, f"command expired {now - command.expires} s ago")
    if command.issued > now + max_skew:
        raise _reject(
            CommandCode.NOT_YET_VALID, f"command issued {command.issued - now} s in the future"
        )
    return command


def command_digest(data: bytes) -> str:
    """SHA-256 of a command's canonical signed part (for journals and acks)."""
    import hashlib  # noqa: PLC0415

    doc = canonical.decode(data, max_size=MAX_COMMAND_SIZE)
    return hashlib.sha256(canonical.encode(doc["signed"])).hexdigest()
