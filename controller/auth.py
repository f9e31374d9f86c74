"""API tokens and roles.

Tokens are 32 random bytes (``slt_`` + urlsafe base64); only their SHA-256 is stored, so a
database leak yields no usable token. Roles, from most to least powerful:

* ``admin``: everything, including issuing API tokens.
* ``operator``: releases, rollouts, enrollment tokens, decommissioning; reads everything.
* ``field-engineer``: issues enrollment tokens for its own sites only; reads devices of its sites.
* ``viewer``: reads everything, changes nothing.

Every route names the permission it needs (``Perm``); ``ALLOWED`` is the one table of who may do
what, and the routes-by-roles test enumerates it.
"""

from __future__ import annotations

import enum
import hashlib
import secrets


class Role(enum.Enum):
    """API token roles."""

    ADMIN = "admin"
    OPERATOR = "operator"
    FIELD_ENGINEER = "field-engineer"
    VIEWER = "viewer"


class Perm(enum.Enum):
    """What a route needs."""

    READ = "read"
    READ_SITE = "read-site"
    ENROLL_TOKEN = "enroll-token"  # noqa: S105 (a permission name)
    DECOMMISSION = "decommission"
    RELEASE_WRITE = "release-write"
    ROLLOUT_WRITE = "rollout-write"
    SITE_WRITE = "site-write"
    API_TOKEN = "api-token"  # noqa: S105
    AUDIT_READ = "audit-read"


_ALL = frozenset(Role)
ALLOWED: dict[Perm, frozenset[Role]] = {
    Perm.READ: frozenset({Role.ADMIN, Role.OPERATOR, Role.VIEWER}),
    # Devices of its own sites only: the service filters by the token's sites.
    Perm.READ_SITE: _ALL,
    Perm.ENROLL_TOKEN: frozenset({Role.ADMIN, Role.OPERATOR, Role.FIELD_ENGINEER}),
    Perm.DECOMMISSION: frozenset({Role.ADMIN, Role.OPERATOR}),
    Perm.RELEASE_WRITE: frozenset({Role.ADMIN, Role.OPERATOR}),
    Perm.ROLLOUT_WRITE: frozenset({Role.ADMIN, Role.OPERATOR}),
    Perm.SITE_WRITE: frozenset({Role.ADMIN, Role.OPERATOR}),
    Perm.API_TOKEN: frozenset({Role.ADMIN}),
    Perm.AUDIT_READ: frozenset({Role.ADMIN, Role.OPERATOR}),
}

TOKEN_PREFIX = "slt_"  # noqa: S105 (a prefix, not a secret)
ENROLL_PREFIX = "sle_"


def new_token(prefix: str = TOKEN_PREFIX) -> str:
    """A fresh random token (shown once, never stored)."""
    return prefix + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    """What the database stores for a token."""
    return hashlib.sha256(token.encode("utf-8", "replace")).hexdigest()


def well_formed(token: str, prefix: str = TOKEN_PREFIX) -> bool:
    """Cheap shape check before any database look-up."""
    return token.startswith(prefix) and 20 <= len(token) <= 100 and token.isascii()
