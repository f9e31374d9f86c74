"""Identifiers that reach MQTT topics, certificate names, file names and URLs.

A device id becomes ``slotline/v1/dev/{id}/...`` and a certificate CN, so MQTT wildcards
(``+ #``), topic and path separators (``/``), ``$`` (broker-reserved topics), NUL and every other
character outside a small set are refused, as are ids starting with ``.`` or ``-``.

    check_id("gw-0042", "device id")      # ok
    check_id("a/+/b", "device id")        # InvalidInput

A device's certificate CN is its id, and the broker's ACL user is the CN, so a device may not be
enrolled under a broker identity that has more rights than its own subtree or that the controller
treats specially: ``relay-<site>`` (served as the site's relay, ``controller/releases.py``),
``bridge-<site>`` and ``controller``/``controller-*`` (the generated ACLs, see
``agent/transport/broker.py``). ``check_enrollable_device_id`` refuses them, case-insensitively.
"""

from __future__ import annotations

import re

from controller.errors import InvalidInput
from firmware_bundles.protocol import RELAY_PREFIX

_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
_SHA256 = re.compile(r"[0-9a-f]{64}")

RESERVED_ID_PREFIXES = (RELAY_PREFIX, "bridge-", "controller-")
RESERVED_IDS = frozenset({"controller"})
RESERVED_CODE = "enroll.device_id_reserved"


def check_id(value: str, what: str) -> str:
    """Return ``value`` if it is a safe identifier.

    Raises:
        InvalidInput: with a message naming ``what``.
    """
    if not isinstance(value, str) or _ID.fullmatch(value) is None:
        raise InvalidInput(
            f"{what} must be 1-128 characters of A-Z a-z 0-9 . _ : - and start with a letter "
            f"or digit; got {value!r:.80}"
        )
    return value


def check_device_id(value: str) -> str:
    """Return ``value`` if it is a device id the wire protocol accepts (topics, ACL ``%u``).

    Raises:
        InvalidInput: otherwise.
    """
    from firmware_bundles.protocol import valid_device_id  # noqa: PLC0415 (one rule, one place)

    if not valid_device_id(value):
        raise InvalidInput(
            "device id must be 1-64 characters of A-Z a-z 0-9 . _ - starting with a letter or "
            f"digit; got {value!r:.80}"
        )
    return value


def is_reserved_identity(value: str) -> bool:
    """Whether ``value`` names a relay, bridge or controller identity rather than a device."""
    folded = value.lower()
    return folded in RESERVED_IDS or folded.startswith(RESERVED_ID_PREFIXES)


def check_enrollable_device_id(value: str) -> str:
    """Return ``value`` if a device may be enrolled (and get a certificate) under it.

    Raises:
        InvalidInput: not a device id (``controller.invalid_input``), or a reserved identity
            (code ``enroll.device_id_reserved``): its certificate would carry that identity.
    """
    check_device_id(value)
    if is_reserved_identity(value):
        raise InvalidInput(
            f"device id {value!r} is reserved: ids starting with relay-, bridge- or controller- "
            "(and 'controller') name broker identities, not devices",
            code=RESERVED_CODE,
        )
    return value


def check_bundle_id(value: str) -> str:
    """Return ``value`` if it is a bundle id the wire protocol accepts.

    Raises:
        InvalidInput: otherwise.
    """
    from firmware_bundles.errors import BundleError  # noqa: PLC0415
    from firmware_bundles.protocol import check_bundle_id as wire_check  # noqa: PLC0415

    try:
        return wire_check(value)
    except BundleError:
        raise InvalidInput(f"bundle id {value!r:.80} is not a valid bundle id") from None


def is_id(value: str) -> bool:
    """Whether ``value`` passes ``check_id``."""
    return isinstance(value, str) and _ID.fullmatch(value) is not None


def check_sha256(value: str, what: str) -> str:
    """Return ``value`` if it is a lowercase hex SHA-256."""
    if not isinstance(value, str) or _SHA256.fullmatch(value) is None:
        raise InvalidInput(f"{what} must be a lowercase hex SHA-256")
    return value
