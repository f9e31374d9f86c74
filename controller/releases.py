"""The release catalogue: verified uploads, the chunk store, delta payloads, install commands.

Rules:

* An upload is spooled to disk under a size cap, then verified against the trust root
  (``<data-dir>/trust.json``) with the bundle library before anything is recorded: the release
  role must have signed the manifest; the controller never holds release keys.
* Chunks go to the content-addressed store under ``<data-dir>/chunks``; the release's full image
  is kept under ``<data-dir>/images/<sha256>`` when it can be rebuilt, as the base of future
  deltas.
* For a rollout, ``prepare_payloads`` makes one delta per distinct active-slot digest among the
  targeted devices for which the base image is known (``encode_delta``); the payload document is
  signed by the command role and names the release manifest's digest. A device whose active
  digest matches no base gets the release's own payload (full image fallback); a device for
  which no payload fits is marked failed with ``controller.no_payload`` and not commanded.
* Commands are signed with the command key (``<data-dir>/keys/command.key``).
"""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from controller.db import models as m
from controller.errors import ControllerError, NotFound

if TYPE_CHECKING:
    from controller.service import ControllerService, Principal


class ReleaseStore:
    """See module docstring."""

    def __init__(self, svc: ControllerService) -> None:
        self.svc = svc
        self.chunk_dir = svc.config.data_dir / "chunks"
        self.image_dir = svc.config.data_dir / "images"
        self._key: Any = None
        self._lock = threading.Lock()
        # payload id -> list of chunk sha256 (hot path of chunk requests)
        self._tables: dict[str, list[str]] = {}
        # device id -> payload ids it was told to fetch
        self._offered: dict[str, set[str]] = {}

    # ------------------------------------------------------------------ keys

    def command_key(self) -> Any:
        """The controller's command signing key (loaded once)."""
        with self._lock:
            if self._key is None:
                from firmware_bundles.keys import read_key_file  # noqa: PLC0415

                path = self.svc.config.data_dir / "keys" / "command.key"
                if not path.exists():
                    raise ControllerError(
                        f"no command key at {path.name} in the data directory's keys/",
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

    def sign_command(self, signed: dict[str, Any]) -> bytes:
        """Signed command envelope bytes (command role)."""
        from firmware_bundles.keys import sign_envelope  # noqa: PLC0415

        return sign_envelope(signed, [self.command_key()])

    # ------------------------------------------------------------------ catalogue

    def add(self, actor: Principal, path: Path) -> dict[str, Any]:
        """Verify a spooled ``.slb`` and record the release (see module docstring)."""
        raise NotImplementedError(path, actor)

    def list(self) -> list[dict[str, Any]]:
        """Every release."""
        with self.svc.sessions() as s:
            return [
                self._doc(r) for r in s.scalars(select(m.Release).order_by(m.Release.uploaded_at))
            ]

    def show(self, bundle_id: str) -> dict[str, Any]:
        """One release with its payloads."""
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
                }
                for x in s.scalars(select(m.Payload).where(m.Payload.release_id == bundle_id))
            ]
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
        """Make the delta payloads a rollout's devices need; returns how many were made."""
        del rollout_id
        return 0

    def install_args(
        self, s: Session, release: m.Release, device_id: str, rollout_id: int
    ) -> dict[str, Any] | None:
        """The ``args`` of an install command for one device, or None if no payload fits."""
        dev = s.get(m.Device, device_id)
        assert dev is not None
        payloads = self._payloads(s, release.bundle_id)
        chosen = None
        if dev.active_digest is not None:
            chosen = next((x for x in payloads if x.base_sha256 == dev.active_digest), None)
        if chosen is None:
            chosen = next((x for x in payloads if x.kind == "full"), None)
        if chosen is None:
            return None
        args: dict[str, Any] = {
            "bundle_id": chosen.payload_id,
            "manifest": json.loads(release.manifest),
            "rollout": str(rollout_id),
        }
        if chosen.doc is not None:
            args["payload"] = json.loads(chosen.doc)
        with self._lock:
            self._offered.setdefault(device_id, set()).add(chosen.payload_id)
        return args

    def _payloads(self, s: Session, release_id: str) -> list[m.Payload]:
        return list(s.scalars(select(m.Payload).where(m.Payload.release_id == release_id)))

    # ------------------------------------------------------------------ chunks

    def chunk_path(self, sha256: str) -> Path:
        """Where a chunk with this digest lives."""
        return self.chunk_dir / sha256[:2] / sha256

    def resolve_chunk(self, device_id: str, bundle_id: str, index: int) -> bytes | None:
        """Chunk ``index`` of payload ``bundle_id`` if it was offered to ``device_id``."""
        with self._lock:
            offered = bundle_id in self._offered.get(device_id, ())
            table = self._tables.get(bundle_id)
        if not offered:
            with self.svc.sessions() as s:
                hit = s.scalar(
                    select(m.RolloutDevice.payload_id)
                    .where(
                        m.RolloutDevice.device_id == device_id,
                        m.RolloutDevice.payload_id == bundle_id,
                    )
                    .limit(1)
                )
            if hit is None:
                return None
            with self._lock:
                self._offered.setdefault(device_id, set()).add(bundle_id)
        if table is None:
            with self.svc.sessions() as s:
                payload = s.get(m.Payload, bundle_id)
                if payload is None:
                    return None
                table = [c["sha256"] for c in payload.chunks]
            with self._lock:
                self._tables[bundle_id] = table
        if not 0 <= index < len(table):
            return None
        path = self.chunk_path(table[index])
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        # A chunk file damaged on disk must never be served: devices would reject it anyway.
        return data if hashlib.sha256(data).hexdigest() == table[index] else None
