"""Dashboard sessions: a short-lived, HMAC-signed cookie naming an API token by its hash.

Rules:

* A browser cannot send a bearer header from a typed URL, so the login form trades an API token
  for a session cookie. The cookie holds ``base64url({"h": sha256(token), "exp": unix})`` and
  an HMAC-SHA256 over it with a key only the controller knows; never the token itself, so a
  leaked cookie stops working at ``exp`` (8 h) and can never be used against the JSON API.
* Every request re-reads the token row by hash: revoking the API token ends its sessions at
  once, and the role is always the token's current one.
* The cookie is ``HttpOnly`` (no script reads it), ``SameSite=Strict`` (no cross-site request
  carries it), ``Path=/dashboard`` and ``Secure`` when served over HTTPS.
* The key is ``<data-dir>/dashboard.key`` (32 random bytes, 0600), made on first use; replicas
  sharing a data dir share sessions, and deleting the file logs everybody out.

    signer = SessionSigner(key)
    cookie = signer.issue(token_hash, now)          # after a successful login
    signer.verify(cookie, now)                      # -> token hash, or None
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import os
import secrets
import tempfile
from pathlib import Path

SESSION_SECONDS = 8 * 3600
COOKIE = "slotline_session"
KEY_FILE = "dashboard.key"
_MAX_COOKIE = 512


class SessionSigner:
    """Issues and verifies session values with one HMAC key."""

    def __init__(self, key: bytes, ttl: int = SESSION_SECONDS) -> None:
        if len(key) < 32:
            raise ValueError("session key must be at least 32 bytes")
        self._key = key
        self.ttl = ttl

    def _mac(self, payload: bytes) -> str:
        return hmac.new(self._key, payload, hashlib.sha256).hexdigest()

    def issue(self, token_hash: str, now: float) -> str:
        """A cookie value for the token with hash ``token_hash``, valid ``ttl`` from ``now``."""
        doc = json.dumps({"h": token_hash, "exp": int(now) + self.ttl}, separators=(",", ":"))
        payload = base64.urlsafe_b64encode(doc.encode()).rstrip(b"=")
        return f"{payload.decode()}.{self._mac(payload)}"

    def verify(self, value: str | None, now: float) -> str | None:
        """The token hash a cookie names, or None if it is forged, malformed or expired."""
        if not value or len(value) > _MAX_COOKIE or not value.isascii():
            return None
        payload, _, mac = value.partition(".")
        if not hmac.compare_digest(mac, self._mac(payload.encode())):
            return None
        try:
            raw = base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
            doc = json.loads(raw)
            token_hash, exp = doc["h"], doc["exp"]
        except (ValueError, KeyError, TypeError):
            return None
        if not isinstance(token_hash, str) or type(exp) is not int or exp <= now:
            return None
        return token_hash


def load_key(data_dir: Path) -> bytes:
    """The session key of this data dir, created (0600) on first use.

    Written to a temp file and hard-linked into place, so the key file appears whole or not at
    all, and of two replicas starting together exactly one key wins.
    """
    path = data_dir / KEY_FILE
    if not path.exists():
        data_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=data_dir, prefix=".dashboard-key-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(secrets.token_bytes(32))
                f.flush()
                os.fsync(f.fileno())
            with contextlib.suppress(FileExistsError):
                os.link(tmp, path)
        finally:
            Path(tmp).unlink(missing_ok=True)
    key = path.read_bytes()
    if len(key) < 32:
        raise ValueError(f"{path} holds fewer than 32 bytes; delete it to make a new key")
    return key
