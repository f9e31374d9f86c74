"""Development key sets on disk: generate, load, rotate and revoke.

A key directory holds one private key file per key, ``<role>-<keyid prefix>.key`` (mode 0600),
``trust.json`` (the current root envelope, what a device is given) and ``root.<N>.json`` for
every root version (the chain a device holding an older root walks to rotate).

Rules:

* only keys that the **current** root lists for a role are used to sign for it; retired key
  files stay on disk but sign nothing;
* a rotation makes root N+1 signed by the root threshold of root N and of root N+1 (so the old
  root keys must be present), and writes ``trust.json`` atomically;
* revoking a key is a rotation whose new root leaves the key out.

This is a tool for development and for small fleets. Production root keys belong offline.

    keyset = generate_keyset(Path("keys"), now=now)
    keyset = load_keyset(Path("keys"))
    keyset.signers(Role.RELEASE)
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from firmware_bundles.errors import SignatureInvalid, TrustInvalid
from firmware_bundles.keys import SigningKey, read_key_file, write_key_file
from firmware_bundles.trust import Role, Root, TrustStore, make_root, sign_root

DAY = 86400
DEFAULT_ROOT_DAYS = 3650
TRUST_FILE = "trust.json"


@dataclass(frozen=True)
class Keyset:
    """The trust store of a key directory and the private keys it holds per role."""

    directory: Path
    trust: TrustStore
    keys: dict[Role, list[SigningKey]]

    def signers(self, role: Role) -> list[SigningKey]:
        """The role's keys held here; raises ``SignatureInvalid`` if below its threshold."""
        have = self.keys.get(role, [])
        need = self.trust.root.roles[role].threshold
        if len(have) < need:
            raise SignatureInvalid(
                f"{self.directory.name}: {len(have)} {role.value} keys held, {need} needed"
            )
        return have


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        Path(tmp).replace(path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _new_key(directory: Path, role: Role) -> SigningKey:
    key = SigningKey.generate()
    write_key_file(directory / f"{role.value}-{key.keyid[:16]}.key", key, role.value)
    return key


def generate_keyset(
    directory: Path,
    *,
    now: int,
    root_keys: int = 1,
    root_threshold: int = 1,
    release_keys: int = 1,
    release_threshold: int = 1,
    expires_days: int = DEFAULT_ROOT_DAYS,
) -> Keyset:
    """Create a fresh key set and root version 1 in ``directory`` (must not hold a trust root).

    Raises:
        FileExistsError: ``directory`` already has a ``trust.json``.
    """
    directory.mkdir(parents=True, exist_ok=True)
    if (directory / TRUST_FILE).exists():
        raise FileExistsError(f"{directory / TRUST_FILE} exists; refusing to overwrite a root")
    counts = {Role.ROOT: root_keys, Role.RELEASE: release_keys, Role.COMMAND: 1}
    keys = {role: [_new_key(directory, role) for _ in range(n)] for role, n in counts.items()}
    root = make_root(
        version=1,
        expires=now + expires_days * DAY,
        role_keys={role: [k.public for k in ks] for role, ks in keys.items()},
        thresholds={Role.ROOT: root_threshold, Role.RELEASE: release_threshold},
    )
    data = sign_root(root, keys[Role.ROOT])
    store = TrustStore.from_root_bytes(data)
    _atomic_write(directory / "root.1.json", data)
    _atomic_write(directory / TRUST_FILE, data)
    return Keyset(directory, store, keys)


def load_keyset(directory: Path) -> Keyset:
    """Load ``trust.json`` and the private keys the current root lists, by role."""
    store = TrustStore.from_root_bytes((directory / TRUST_FILE).read_bytes())
    keys: dict[Role, list[SigningKey]] = {role: [] for role in Role}
    for path in sorted(directory.glob("*.key")):
        key, role_name = read_key_file(path)
        try:
            role = Role(role_name)
        except ValueError:
            continue
        if key.keyid in store.root.roles[role].keyids:
            keys[role].append(key)
    return Keyset(directory, store, keys)


def rotate_root(
    directory: Path,
    *,
    now: int,
    replace: Iterable[Role] = (),
    revoke: Iterable[str] = (),
    expires_days: int = DEFAULT_ROOT_DAYS,
) -> Keyset:
    """Write root N+1: new keys for the ``replace`` roles, ``revoke`` key ids dropped.

    Args:
        directory: a key directory with the current root keys.
        now: unix time.
        replace: roles whose keys are all replaced by one fresh key each.
        revoke: key ids to remove from every role (a role left without keys gets a fresh key).
        expires_days: lifetime of the new root.

    Raises:
        TrustInvalid: a revocation leaves a role below its threshold.
    """
    old = load_keyset(directory)
    old_root = old.trust.root
    replace, revoke = set(replace), set(revoke)
    unknown = revoke - set(old_root.keys)
    if unknown:
        raise TrustInvalid(f"cannot revoke unknown key ids {sorted(k[:16] for k in unknown)}")
    new_keys: dict[Role, list[SigningKey]] = {}
    role_pubs = {}
    thresholds = {}
    for role in Role:
        rk = old_root.roles[role]
        kept = [] if role in replace else sorted(rk.keyids - revoke)
        fresh = [_new_key(directory, role)] if not kept else []
        new_keys[role] = fresh
        role_pubs[role] = [old_root.keys[k] for k in kept] + [k.public for k in fresh]
        if kept and len(kept) < rk.threshold:
            raise TrustInvalid(f"revoking leaves {role.value} below its threshold {rk.threshold}")
        # A replaced role starts again with one fresh key and threshold 1.
        thresholds[role] = rk.threshold if kept else 1
    root: Root = make_root(
        version=old_root.version + 1,
        expires=now + expires_days * DAY,
        role_keys=role_pubs,
        thresholds=thresholds,
    )
    held_new_root = [k for k in old.keys[Role.ROOT] if k.keyid in root.roles[Role.ROOT].keyids]
    signers = old.signers(Role.ROOT) + new_keys[Role.ROOT] + held_new_root
    data = sign_root(root, signers)
    old.trust.update_root(data)  # the same check a device runs, before anything is written
    _atomic_write(directory / f"root.{root.version}.json", data)
    _atomic_write(directory / TRUST_FILE, data)
    return load_keyset(directory)


def root_chain(directory: Path, after_version: int) -> list[bytes]:
    """The ``root.N.json`` envelopes newer than ``after_version``, in order."""
    out: list[bytes] = []
    version = after_version + 1
    while (directory / f"root.{version}.json").is_file():
        out.append((directory / f"root.{version}.json").read_bytes())
        version += 1
    return out
