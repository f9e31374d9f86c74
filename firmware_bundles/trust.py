"""The trust root (TUF-like root metadata), role checks and root rotation.

Root metadata (the ``signed`` part of ``trust.json``, schema 1)::

    {"type": "root", "schema": 1, "version": N, "expires": unix,
     "keys": {keyid: {"keytype": "ed25519", "public": hex}},
     "roles": {"root": {"keyids": [...], "threshold": m},
               "release": {...}, "command": {...}}}

Rules (after python-tuf ``trusted_metadata_set.py``):

* a role's threshold counts **distinct** keys of that role with a valid signature; a key that
  signs twice counts once, unknown keys and bad signatures are ignored (they do not poison a
  valid quorum);
* the first root a device is given is trusted as shipped but must still be signed by its own
  root threshold;
* root N+1 is accepted only if its version is exactly N+1 and it is signed by the root threshold
  of root N **and** by its own root threshold; expiry of intermediate roots is not checked (a
  device offline for years can still walk the chain), the current root's expiry is checked on
  every use;
* revocation is a new root version whose role no longer lists the key.

    store = TrustStore.from_root_bytes(Path("trust.json").read_bytes())
    store.update_root(Path("root.2.json").read_bytes())   # rotation
    env = store.verify(manifest_bytes, Role.RELEASE, now=now)
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from firmware_bundles import canonical
from firmware_bundles.errors import (
    FormatInvalid,
    MetadataExpired,
    SchemaUnsupported,
    SignatureInvalid,
    TrustInvalid,
)
from firmware_bundles.keys import Envelope, PublicKey, SigningKey, is_hex_digest, parse_envelope

ROOT_SCHEMA = 1
MAX_KEYS = 64
MAX_ROOT_SIZE = 256 * 1024


class Role(enum.Enum):
    """The three roles of the trust root."""

    ROOT = "root"
    RELEASE = "release"
    COMMAND = "command"


@dataclass(frozen=True)
class RoleKeys:
    """The key ids allowed to sign for a role and how many distinct ones must."""

    keyids: frozenset[str]
    threshold: int

    def __post_init__(self) -> None:
        if not self.keyids or not all(is_hex_digest(k) for k in self.keyids):
            raise TrustInvalid("a role needs at least one hex key id")
        if not 1 <= self.threshold <= len(self.keyids):
            raise TrustInvalid("a role's threshold must be between 1 and its number of keys")


@dataclass(frozen=True)
class Root:
    """Parsed, self-consistent root metadata (not a statement that it is trusted)."""

    version: int
    expires: int
    keys: Mapping[str, PublicKey]
    roles: Mapping[Role, RoleKeys]

    def __post_init__(self) -> None:
        if not 1 <= self.version < 2**31:
            raise TrustInvalid("root version must be a positive integer")
        if len(self.keys) > MAX_KEYS:
            raise TrustInvalid(f"more than {MAX_KEYS} keys in root")
        for keyid, key in self.keys.items():
            if key.keyid != keyid:
                raise TrustInvalid("a root key id is not the SHA-256 of its public key")
        if set(self.roles) != set(Role):
            raise TrustInvalid("root must define exactly the roles root, release, command")
        for role in self.roles.values():
            if not role.keyids <= set(self.keys):
                raise TrustInvalid("a role names a key that root does not list")

    def to_signed(self) -> dict[str, Any]:
        """The ``signed`` document of this root."""
        return {
            "type": "root",
            "schema": ROOT_SCHEMA,
            "version": self.version,
            "expires": self.expires,
            "keys": {kid: key.to_json() for kid, key in self.keys.items()},
            "roles": {
                role.value: {"keyids": sorted(rk.keyids), "threshold": rk.threshold}
                for role, rk in self.roles.items()
            },
        }

    @classmethod
    def from_signed(cls, doc: Mapping[str, Any]) -> Root:
        """Parse and validate a root ``signed`` document.

        Raises:
            SchemaUnsupported: another schema.
            TrustInvalid: anything else wrong with it.
        """
        expected = {"type", "schema", "version", "expires", "keys", "roles"}
        if set(doc) != expected or doc["type"] != "root":
            raise TrustInvalid("not root metadata (fields or type)")
        if doc["schema"] != ROOT_SCHEMA:
            raise SchemaUnsupported(f"root schema {doc['schema']!r} is not supported")
        version, expires = doc["version"], doc["expires"]
        if type(version) is not int or type(expires) is not int:
            raise TrustInvalid("root version and expires must be integers")
        raw_keys, raw_roles = doc["keys"], doc["roles"]
        if not isinstance(raw_keys, Mapping) or not isinstance(raw_roles, Mapping):
            raise TrustInvalid("root keys and roles must be objects")
        try:
            keys = {kid: PublicKey.from_json(k) for kid, k in raw_keys.items()}
        except FormatInvalid as e:
            raise TrustInvalid(f"root key: {e}") from None
        roles: dict[Role, RoleKeys] = {}
        for name, entry in raw_roles.items():
            try:
                role = Role(name)
            except ValueError:
                raise TrustInvalid(f"unknown role {str(name)[:32]!r}") from None
            if not isinstance(entry, Mapping) or set(entry) != {"keyids", "threshold"}:
                raise TrustInvalid("a role is exactly {keyids, threshold}")
            keyids, threshold = entry["keyids"], entry["threshold"]
            if not isinstance(keyids, list) or type(threshold) is not int:
                raise TrustInvalid("role keyids must be a list and threshold an integer")
            if len(set(keyids)) != len(keyids) or not all(isinstance(k, str) for k in keyids):
                raise TrustInvalid("role keyids must be distinct strings")
            roles[role] = RoleKeys(frozenset(keyids), threshold)
        return cls(version=version, expires=expires, keys=keys, roles=roles)

    def count_valid(self, envelope: Envelope, role: Role) -> int:
        """How many distinct keys of ``role`` validly signed ``envelope``."""
        allowed = self.roles[role].keyids
        good: set[str] = set()
        for sig in envelope.signatures:
            if sig.keyid in good or sig.keyid not in allowed:
                continue  # duplicates count once; unknown keys are ignored
            if self.keys[sig.keyid].verify(sig.sig, envelope.signed_bytes):
                good.add(sig.keyid)
        return len(good)

    def check_role(self, envelope: Envelope, role: Role) -> None:
        """Raise ``SignatureInvalid`` unless ``role``'s threshold of distinct keys signed."""
        need = self.roles[role].threshold
        have = self.count_valid(envelope, role)
        if have < need:
            raise SignatureInvalid(
                f"{role.value} signatures: {have} valid of {need} required"
            )


def make_root(
    *,
    version: int,
    expires: int,
    role_keys: Mapping[Role, Iterable[PublicKey]],
    thresholds: Mapping[Role, int] | None = None,
) -> Root:
    """Build root metadata from public keys per role (threshold 1 unless given)."""
    thresholds = thresholds or {}
    keys: dict[str, PublicKey] = {}
    roles: dict[Role, RoleKeys] = {}
    for role in Role:
        pubs = list(role_keys[role])
        keys.update({p.keyid: p for p in pubs})
        roles[role] = RoleKeys(frozenset(p.keyid for p in pubs), thresholds.get(role, 1))
    return Root(version=version, expires=expires, keys=keys, roles=roles)


def sign_root(root: Root, keys: Iterable[SigningKey]) -> bytes:
    """The envelope bytes of ``root`` signed by ``keys`` (old and new root keys for a rotation)."""
    from firmware_bundles.keys import sign_envelope  # noqa: PLC0415

    return sign_envelope(root.to_signed(), keys)


def _parse_root(data: bytes | Mapping[str, Any]) -> tuple[Envelope, Root]:
    try:
        envelope = parse_envelope(data, max_size=MAX_ROOT_SIZE)
    except FormatInvalid as e:
        raise TrustInvalid(f"root metadata: {e}") from None
    return envelope, Root.from_signed(envelope.signed)


class TrustStore:
    """The device's (or controller's) current trusted root and the checks that use it.

    Bytes in, verified objects out: nothing it returns has skipped a signature check.
    """

    def __init__(self, root: Root, root_bytes: bytes) -> None:
        self._root = root
        self._root_bytes = root_bytes

    @classmethod
    def from_root_bytes(cls, data: bytes) -> TrustStore:
        """Trust a shipped root (``trust.json``), which must be signed by its own threshold.

        Raises:
            TrustInvalid: malformed root, or not signed by its own root threshold.
        """
        envelope, root = _parse_root(data)
        try:
            root.check_role(envelope, Role.ROOT)
        except SignatureInvalid as e:
            raise TrustInvalid(f"trust root is not self-signed: {e}") from None
        return cls(root, bytes(data))

    @classmethod
    def load(cls, path: Path, updates: Iterable[Path] = ()) -> TrustStore:
        """Read ``trust.json`` and apply root updates (``root.N.json`` files) in order."""
        store = cls.from_root_bytes(path.read_bytes())
        for update in updates:
            store.update_root(update.read_bytes())
        return store

    @property
    def root(self) -> Root:
        """The current trusted root."""
        return self._root

    @property
    def root_bytes(self) -> bytes:
        """The envelope bytes of the current root (what to persist as the new ``trust.json``)."""
        return self._root_bytes

    def update_root(self, data: bytes) -> Root:
        """Rotate to root N+1.

        Raises:
            TrustInvalid: version is not exactly N+1, or either signature threshold is not met.
        """
        envelope, new = _parse_root(data)
        if new.version != self._root.version + 1:
            raise TrustInvalid(
                f"root version {new.version} does not follow {self._root.version}"
            )
        try:
            self._root.check_role(envelope, Role.ROOT)
        except SignatureInvalid as e:
            raise TrustInvalid(f"new root not signed by the old root: {e}") from None
        try:
            new.check_role(envelope, Role.ROOT)
        except SignatureInvalid as e:
            raise TrustInvalid(f"new root not signed by its own keys: {e}") from None
        self._root, self._root_bytes = new, bytes(data)
        return new

    def update_chain(self, roots: Iterable[bytes]) -> Root:
        """Apply several rotations in order, skipping versions already held."""
        for data in roots:
            _, candidate = _parse_root(data)
            if candidate.version <= self._root.version:
                continue
            self.update_root(data)
        return self._root

    def check_fresh(self, now: int) -> None:
        """Raise ``MetadataExpired`` if the current root has expired (freeze defence)."""
        if now >= self._root.expires:
            raise MetadataExpired(f"trust root version {self._root.version} has expired")

    def verify(
        self, data: bytes | Mapping[str, Any], role: Role, *, now: int, max_size: int
    ) -> Envelope:
        """Parse an envelope and check that ``role``'s threshold signed it.

        Args:
            data: canonical envelope bytes, or the envelope as a parsed JSON object.
            role: the role that must have signed.
            now: unix time; the trust root must not be expired.
            max_size: cap on the envelope size.

        Raises:
            MetadataExpired: the trust root has expired.
            FormatInvalid: not a canonical envelope.
            SignatureInvalid: threshold not met.
        """
        self.check_fresh(now)
        envelope = parse_envelope(data, max_size=max_size)
        self._root.check_role(envelope, role)
        return envelope


def root_from_json_file(path: Path) -> dict[str, Any]:
    """The parsed root ``signed`` document of a trust file (for display only: not verified)."""
    doc = canonical.decode(path.read_bytes(), max_size=MAX_ROOT_SIZE)
    if not isinstance(doc, dict) or not isinstance(doc.get("signed"), dict):
        raise TrustInvalid(f"{path.name} is not an envelope")
    signed: dict[str, Any] = doc["signed"]
    return signed
