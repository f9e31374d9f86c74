"""The release catalogue: verified uploads, the chunk store, delta payloads, install commands.

Rules:

* An upload is spooled to disk under a size cap, then verified against the trust root
  (``<data-dir>/trust.json``) with the bundle library before anything is recorded: the release
  role must have signed the manifest; the controller never holds release keys.
* Chunks go to the content-addressed store (``firmware_bundles.chunkstore``) under
  ``<data-dir>/chunks``; the release's target image is rebuilt (and its digest checked against
  the release-signed target) into ``<data-dir>/images/<sha256>`` when it can be (full payload,
  or a delta whose base image is there), as the base of future deltas.
* A device names the release's ``bundle_id`` when it fetches chunks; which payload's chunks it
  gets is what the controller offered that device (its ``rollout_devices.payload_id``).
* A site relay fetches as ``relay-<site>`` (docs/protocol.md) and gets what was offered to a
  device of that site; its cache is keyed by ``(bundle_id, index)``, so one payload per site
  and release (a site whose devices need different deltas is served the latest offer).
* For a rollout, ``prepare_payloads`` makes one delta per distinct active-slot digest among the
  targeted devices for which the base image is known (``encode_delta``); the payload document is
  signed by the command role and names the release manifest's digest. A device whose active
  digest matches no base gets the release's own payload (full image fallback); a device for
  which no payload fits is marked failed with ``controller.no_payload`` and not commanded.
* Serving a chunk: the device's offer is checked first (its payload's chunk table gives the
  digest), then the bytes come from the store's verified-chunk LRU (``chunk_cache_bytes``,
  keyed by digest) or are read and re-verified from disk.
* Commands are signed with the command key (``<data-dir>/keys/command.key``).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from controller.db import models as m
from controller.errors import Conflict, ControllerError, NotFound, ReleaseRejected
from controller.ids import check_bundle_id
from firmware_bundles.chunkstore import ChunkStore
from firmware_bundles.errors import BundleError, DigestMismatch
from firmware_bundles.protocol import RELAY_PREFIX
from firmware_bundles.slb import SlbReader

if TYPE_CHECKING:
    from controller.service import ControllerService, Principal


log = logging.getLogger(__name__)

PAYLOAD_DOC_LIFETIME = 30 * 86400
RESIGN_BEFORE = 86400


def relay_site_of(identity: str) -> str | None:
    """The site named by a relay identity ``relay-<site>``, else None (by syntax alone).

    The controller asks ``ControllerService.relay_site``, which also refuses enrolled devices.
    """
    if identity.startswith(RELAY_PREFIX) and len(identity) > len(RELAY_PREFIX):
        return identity[len(RELAY_PREFIX) :]
    return None


@dataclass(frozen=True)
class InstallPlan:
    """Install ``args`` per device: the payload for its active digest, else a full one.

    Choice: a payload whose base is the device's active digest (release delta or controller
    delta), else a full payload (the release's own first), else none.
    """

    store: ReleaseStore
    bundle_id: str
    manifest: dict[str, Any]
    rollout: str
    by_base: dict[str, tuple[str, Any]]
    full: tuple[str, Any] | None

    def args_for(
        self, device_id: str, active_digest: str | None
    ) -> tuple[dict[str, Any], str] | None:
        """(install args, payload id) for one device, or None if no payload fits."""
        chosen = self.by_base.get(active_digest or "") or self.full
        if chosen is None:
            return None
        payload_id, doc = chosen
        args: dict[str, Any] = {
            "bundle_id": self.bundle_id,
            "manifest": self.manifest,
            "rollout": self.rollout,
        }
        if doc is not None:
            args["payload"] = doc
        self.store.offer(device_id, self.bundle_id, payload_id)
        return args, payload_id


def _utc(ts: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(ts, dt.UTC)


class ReleaseStore:
    """See module docstring."""

    def __init__(self, svc: ControllerService) -> None:
        self.svc = svc
        # Cache hits are still served only after ``resolve_chunk``'s offer check picked the
        # digest; keyed by digest, since one bundle id maps to different deltas per base.
        self.store = ChunkStore(
            svc.config.data_dir / "chunks", cache_bytes=svc.config.chunk_cache_bytes
        )
        self.image_dir = svc.config.data_dir / "images"
        self.image_dir.mkdir(parents=True, exist_ok=True)
        self._key: Any = None
        self._trust: Any = None
        self._lock = threading.Lock()
        # payload id -> chunk sha256 list; (device, bundle id) -> payload id (chunk hot path)
        self._tables: dict[str, list[str]] = {}
        self._offered: dict[tuple[str, str], str] = {}

    # ------------------------------------------------------------------ keys and trust

    def command_key(self) -> Any:
        """The controller's command signing key (``<data-dir>/keys/command.key``)."""
        with self._lock:
            if self._key is None:
                from firmware_bundles.keys import read_key_file  # noqa: PLC0415

                path = self.svc.config.data_dir / "keys" / "command.key"
                if not path.exists():
                    raise ControllerError(
                        "the controller has no command key (keys/command.key in its data dir)",
                        code="controller.no_command_key",
                    )
                key, role = read_key_file(path)
                if role != "command":
                    raise ControllerError(
                        "keys/command.key is not a command-role key",
                        code="controller.no_command_key",
                    )
                self._key = key
            return self._key

    def provision(self, trust_root: bytes, command_key: Any) -> None:
        """Install the trust root and the command key (first setup, simulator, demo).

        The trust root must verify and must list ``command_key`` under the command role.

        Raises:
            BundleError subclasses: the root does not verify.
            ControllerError: the key is not the root's command key.
        """
        from firmware_bundles.keys import write_key_file  # noqa: PLC0415
        from firmware_bundles.trust import Role, TrustStore  # noqa: PLC0415

        store = TrustStore.from_root_bytes(trust_root)
        if command_key.keyid not in store.root.roles[Role.COMMAND].keyids:
            raise ControllerError(
                "the command key is not listed in the trust root's command role",
                code="controller.no_command_key",
            )
        keys = self.svc.config.data_dir / "keys"
        keys.mkdir(parents=True, exist_ok=True, mode=0o700)
        (keys / "command.key").unlink(missing_ok=True)
        write_key_file(keys / "command.key", command_key, "command")
        tmp = self.svc.config.data_dir / "trust.json.tmp"
        tmp.write_bytes(trust_root)
        tmp.replace(self.svc.config.data_dir / "trust.json")
        with self._lock:
            self._key = None

    def trust(self) -> Any:
        """The trust store of ``<data-dir>/trust.json``."""
        from firmware_bundles.trust import TrustStore  # noqa: PLC0415

        path = self.svc.config.data_dir / "trust.json"
        if not path.exists():
            raise ReleaseRejected(
                "the controller has no trust root (trust.json in its data dir)",
                code="controller.no_trust_root",
            )
        return TrustStore.load(path)

    def sign_command(self, signed: dict[str, Any]) -> bytes:
        """Signed command envelope bytes (command role) for a schema-1 ``signed`` document."""
        from firmware_bundles.commands import Action, sign_command  # noqa: PLC0415

        return sign_command(
            [self.command_key()],
            device=signed["device"],
            counter=signed["counter"],
            action=Action(signed["action"]),
            args=signed["args"],
            issued=signed["issued"],
            expires=signed["expires"],
        )

    # ------------------------------------------------------------------ upload

    def add(self, actor: Principal, path: Path) -> dict[str, Any]:
        """Verify a spooled ``.slb`` and record the release (see module docstring).

        Raises:
            ReleaseRejected: no trust root.
            BundleError subclasses: the bundle does not verify (mapped to 422 with its code).
            Conflict: a release with this bundle id exists.
        """
        from firmware_bundles.bundle import open_bundle  # noqa: PLC0415

        now = int(self.svc.clock())
        trust = self.trust()
        with open_bundle(path, trust, now=now) as bundle:
            rel = bundle.release
            man = rel.manifest
            with self.svc.sessions() as s:
                if s.get(m.Release, man.bundle_id) is not None:
                    raise Conflict(f"release {man.bundle_id!r} was already uploaded")
            self._store_and_rebuild(rel, bundle.chunks())
        payload = rel.payload
        with path.open("rb") as f:
            header = SlbReader(f).read_header()  # the exact envelope bytes just verified
        with self.svc.sessions.begin() as s:
            if s.get(m.Release, man.bundle_id) is not None:
                raise Conflict(f"release {man.bundle_id!r} was already uploaded")
            s.add(
                m.Release(
                    bundle_id=man.bundle_id,
                    component=man.component,
                    version=man.version,
                    security_version=man.security_version,
                    hardware_models=list(man.hardware),
                    target_sha256=man.target.sha256,
                    target_size=man.target.size,
                    requires=dict(man.requires_map),
                    manifest=header.manifest,
                    notes=man.notes,
                    uploaded_at=_utc(now),
                    uploaded_by=actor.name,
                )
            )
            s.flush()
            s.add(
                m.Payload(
                    payload_id=man.bundle_id,
                    release_id=man.bundle_id,
                    kind=payload.kind.value,
                    base_sha256=payload.base.sha256 if payload.base else None,
                    chunks=[c.to_json() for c in payload.chunks],
                    size=payload.stored_size,
                    doc=header.payload_doc,
                )
            )
            self.svc.audit(
                s,
                actor,
                "release.upload",
                man.bundle_id,
                component=man.component,
                version=man.version,
                target_sha256=man.target.sha256,
            )
        return self.show(man.bundle_id)

    def _store_and_rebuild(self, rel: Any, chunks: Iterator[bytes]) -> None:
        """Put every (verified) chunk in the store; rebuild the target image if possible."""
        from firmware_bundles.bundle import apply_chunks  # noqa: PLC0415
        from firmware_bundles.delta import FileBaseReader  # noqa: PLC0415

        def stored() -> Iterator[bytes]:
            for data in chunks:
                self.store.put(data)
                yield data

        target = self.image_dir / rel.target.sha256
        payload = rel.payload
        base_path = self.image_dir / payload.base.sha256 if payload.base else None
        if target.exists() or (base_path is not None and not base_path.exists()):
            for _ in stored():
                pass
            return
        fd, tmp = tempfile.mkstemp(dir=self.image_dir, prefix=".rebuild-")
        try:
            with os.fdopen(fd, "wb") as out:
                if base_path is None:
                    apply_chunks(rel, stored(), None, out.write)
                else:
                    with FileBaseReader(base_path) as base:
                        apply_chunks(rel, stored(), base, out.write)
                out.flush()
                os.fsync(out.fileno())
            Path(tmp).replace(target)
        finally:
            Path(tmp).unlink(missing_ok=True)

    # ------------------------------------------------------------------ catalogue

    def list_releases(self) -> list[dict[str, Any]]:
        """Every release, oldest first."""
        with self.svc.sessions() as s:
            q = select(m.Release).order_by(m.Release.uploaded_at, m.Release.bundle_id)
            return [self._doc(r) for r in s.scalars(q)]

    def show(self, bundle_id: str) -> dict[str, Any]:
        """One release with its payloads."""
        check_bundle_id(bundle_id)
        with self.svc.sessions() as s:
            r = s.get(m.Release, bundle_id)
            if r is None:
                raise NotFound(f"release {bundle_id!r:.140} does not exist")
            doc = self._doc(r)
            doc["payloads"] = [
                {
                    "payload_id": x.payload_id,
                    "kind": x.kind,
                    "base_sha256": x.base_sha256,
                    "size": x.size,
                    "chunks": len(x.chunks),
                    "controller_made": x.doc is not None and x.payload_id != r.bundle_id,
                }
                for x in s.scalars(select(m.Payload).where(m.Payload.release_id == bundle_id))
            ]
            doc["image_known"] = (self.image_dir / r.target_sha256).exists()
            return doc

    @staticmethod
    def _doc(r: m.Release) -> dict[str, Any]:
        return {
            "bundle_id": r.bundle_id,
            "component": r.component,
            "version": r.version,
            "security_version": r.security_version,
            "hardware_models": r.hardware_models,
            "target_sha256": r.target_sha256,
            "target_size": r.target_size,
            "requires": r.requires,
            "notes": r.notes,
            "uploaded_by": r.uploaded_by,
        }

    # ------------------------------------------------------------------ payloads

    def prepare_payloads(self, rollout_id: int) -> int:
        """Make the payloads a rollout's devices need; returns how many were made.

        One delta per active-slot digest among its devices that has no payload yet, when the
        base image is in ``images/`` (an earlier release rebuilt it) and the release's target
        image is too; a delta not smaller than the full payload is dropped (the device gets the
        full one). If the release ships no full payload and some device's digest has no delta
        (or is unknown), a full payload is made from the target image: the full image fallback.
        """
        with self.svc.sessions() as s:
            ro = s.get(m.Rollout, rollout_id)
            assert ro is not None
            release = s.get(m.Release, ro.release_id)
            assert release is not None
            digests = set(
                s.scalars(
                    select(m.Device.active_digest)
                    .join(m.RolloutDevice, m.RolloutDevice.device_id == m.Device.id)
                    .where(m.RolloutDevice.rollout_id == rollout_id)
                    .distinct()
                )
            )
            payloads = self._payloads(s, release.bundle_id)
        have = {x.base_sha256 for x in payloads if x.base_sha256}
        full_size = min((x.size for x in payloads if x.base_sha256 is None), default=None)
        target = self.image_dir / release.target_sha256
        if not target.exists():
            return 0
        made = 0
        need_full = None in digests
        for digest in sorted(d for d in digests if d and d not in have):
            base = self.image_dir / digest
            if digest == release.target_sha256:
                continue
            if not base.exists():
                need_full = True
                continue
            if self._make_payload(release, target, base, digest, full_size):
                made += 1
            else:
                need_full = True
        if (
            need_full
            and full_size is None
            and self._make_payload(release, target, None, None, None)
        ):
            made += 1
        return made

    def _make_payload(
        self,
        release: m.Release,
        target: Path,
        base: Path | None,
        digest: str | None,
        limit: int | None,
    ) -> bool:
        """Encode, keep if smaller than ``limit``, sign as a payload doc, record. True if kept."""
        from firmware_bundles.bundle import encode_payload  # noqa: PLC0415
        from firmware_bundles.keys import parse_envelope  # noqa: PLC0415
        from firmware_bundles.payload import sign_payload_doc  # noqa: PLC0415

        added: list[str] = []

        def sink(data: bytes) -> None:
            name = hashlib.sha256(data).hexdigest()
            if not self.store.has(name):
                added.append(name)
            self.store.put(data, name)

        try:
            payload = encode_payload(target, base, sink)
        except (BundleError, OSError) as e:
            log.warning("payload from %s for %s failed: %s", digest, release.bundle_id, e)
            payload = None
        if payload is None or (limit is not None and payload.stored_size >= limit):
            # A delta can be larger than the image: the full payload is the better offer.
            for name in added:
                self.store.remove(name)
            return False
        now = int(self.svc.clock())
        env = parse_envelope(json.loads(release.manifest))
        doc = sign_payload_doc(
            payload, env, [self.command_key()], created=now, expires=now + PAYLOAD_DOC_LIFETIME
        )
        suffix = digest[:16] if digest else "full"
        with self.svc.sessions.begin() as s:
            s.add(
                m.Payload(
                    payload_id=f"{release.bundle_id}@{suffix}",
                    release_id=release.bundle_id,
                    kind=payload.kind.value,
                    base_sha256=digest,
                    chunks=[c.to_json() for c in payload.chunks],
                    size=payload.stored_size,
                    doc=doc,
                )
            )
        return True

    def install_plan(self, s: Session, release: m.Release, rollout_id: int) -> InstallPlan:
        """What install commands of ``release`` carry, loaded once per scheduler batch."""
        payloads = self._payloads(s, release.bundle_id)
        manifest = json.loads(release.manifest)
        by_base: dict[str, tuple[str, Any]] = {}
        full = None
        for x in payloads:
            doc = json.loads(self._fresh_doc(release, x)) if x.doc is not None else None
            if x.base_sha256 is not None:
                by_base[x.base_sha256] = (x.payload_id, doc)
            elif full is None or x.payload_id == release.bundle_id:
                full = (x.payload_id, doc)
        return InstallPlan(self, release.bundle_id, manifest, str(rollout_id), by_base, full)

    def install_args(
        self, s: Session, release: m.Release, device_id: str, rollout_id: int
    ) -> dict[str, Any] | None:
        """The ``args`` of an install command for one device, or None if no payload fits."""
        dev = s.get(m.Device, device_id)
        assert dev is not None
        chosen = self.install_plan(s, release, rollout_id).args_for(device_id, dev.active_digest)
        return None if chosen is None else chosen[0]

    def _fresh_doc(self, release: m.Release, payload: m.Payload) -> bytes:
        """The payload doc, re-signed when it is about to expire (controller-made only)."""
        assert payload.doc is not None
        doc = json.loads(payload.doc)
        now = int(self.svc.clock())
        if (
            payload.payload_id == release.bundle_id
            or doc["signed"]["expires"] - now > RESIGN_BEFORE
        ):
            return payload.doc
        from firmware_bundles.keys import parse_envelope  # noqa: PLC0415
        from firmware_bundles.manifest import Payload as PayloadValue  # noqa: PLC0415
        from firmware_bundles.payload import sign_payload_doc  # noqa: PLC0415

        value = PayloadValue.from_json(doc["signed"]["payload"])
        env = parse_envelope(json.loads(release.manifest))
        payload.doc = sign_payload_doc(
            value, env, [self.command_key()], created=now, expires=now + PAYLOAD_DOC_LIFETIME
        )
        return payload.doc

    def offer(self, device_id: str, bundle_id: str, payload_id: str) -> None:
        """Remember which payload a device was told to fetch for ``bundle_id``."""
        with self._lock:
            self._offered[device_id, bundle_id] = payload_id

    def _payloads(self, s: Session, release_id: str) -> list[m.Payload]:
        return list(s.scalars(select(m.Payload).where(m.Payload.release_id == release_id)))

    # ------------------------------------------------------------------ chunks: ChunkSource

    def resolve_chunk(self, device_id: str, bundle_id: str, index: int) -> bytes | None:
        """Chunk ``index`` of what ``device_id`` was offered for ``bundle_id`` (else None)."""
        with self._lock:
            payload_id = self._offered.get((device_id, bundle_id))
        if payload_id is None:
            relay_site = self.svc.relay_site(device_id)
            who = (
                m.RolloutDevice.site == relay_site
                if relay_site is not None
                else m.RolloutDevice.device_id == device_id
            )
            with self.svc.sessions() as s:
                payload_id = s.scalar(
                    select(m.RolloutDevice.payload_id)
                    .join(m.Payload, m.Payload.payload_id == m.RolloutDevice.payload_id)
                    .where(who, m.Payload.release_id == bundle_id)
                    .order_by(m.RolloutDevice.rollout_id.desc())
                    .limit(1)
                )
            if payload_id is None:
                return None
            with self._lock:
                self._offered[device_id, bundle_id] = payload_id
        with self._lock:
            table = self._tables.get(payload_id)
        if table is None:
            with self.svc.sessions() as s:
                payload = s.get(m.Payload, payload_id)
                if payload is None:
                    return None
                table = [c["sha256"] for c in payload.chunks]
            with self._lock:
                self._tables[payload_id] = table
        if not 0 <= index < len(table):
            return None
        try:
            return self.store.get(table[index])
        except (KeyError, DigestMismatch):
            # A rotten chunk file is deleted by the store (a missing one raises KeyError, which
            # used to escape to the chunk server's catch-all); never serve it.
            return None
        except BundleError:
            return None
