"""Shared test plumbing: which real services are here, and free ports.

Tests that need Mosquitto or PostgreSQL use the fixtures below. Outside CI a missing service
skips those tests with a reason; in CI (``SLOTLINE_REQUIRE_SERVICES=1``) it fails them, so a
broken machine can never pass by skipping.
"""

from __future__ import annotations

import os
import socket

import pytest
from hypothesis import settings

from agent.transport.broker import free_port

# No per-example deadline: speed lives in bench/, and on shared cores a slow example is load, not
# a bug (a 200 ms deadline made the canonical-JSON property fail once, then pass, under load).
# print_blob: a failure prints the @reproduce_failure line that replays it exactly.
settings.register_profile("slotline", deadline=None, print_blob=True)
settings.load_profile("slotline")

__all__ = ["free_port"]

REQUIRE_SERVICES = os.environ.get("SLOTLINE_REQUIRE_SERVICES") == "1"
PG_URL = os.environ.get("SLOTLINE_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
MQTT_HOST, MQTT_PORT = "127.0.0.1", int(os.environ.get("SLOTLINE_TEST_MQTT_PORT", "1883"))


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def _need(service: str, host: str, port: int) -> None:
    if _port_open(host, port):
        return
    msg = f"{service} is not listening on {host}:{port}"
    if REQUIRE_SERVICES:
        pytest.fail(msg)
    pytest.skip(msg)


@pytest.fixture
def mosquitto_addr() -> tuple[str, int]:
    """The machine's Mosquitto (plain listener): (host, port)."""
    _need("Mosquitto", MQTT_HOST, MQTT_PORT)
    return MQTT_HOST, MQTT_PORT


@pytest.fixture
def pg_url() -> str:
    """SQLAlchemy URL of the machine's PostgreSQL test database."""
    _need("PostgreSQL", "127.0.0.1", 5432)
    return PG_URL

