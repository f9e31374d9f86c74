"""Ports between the controller's service layer and its MQTT gateway.

The service (registry, releases, rollout scheduler) never imports an MQTT client: it hands signed
command bytes to a ``DeviceGateway`` and receives device traffic through a ``ControllerInbox`` it
implements. ``controller/gateway`` holds the MQTT implementation; tests and the simulator run the
real service against a real broker through it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol


class DeviceGateway(Protocol):
    """Outbound: what the service asks of the device link."""

    def publish_command(self, device_id: str, command: bytes) -> None:
        """Queue one signed command document for a device (QoS1, delivered at least once)."""
        ...


class ChunkSource(Protocol):
    """Where the gateway finds chunk bytes to serve (the controller's content-addressed store)."""

    def resolve_chunk(self, device_id: str, bundle_id: str, index: int) -> bytes | None:
        """Bytes of chunk ``index`` of ``bundle_id`` for this device, or None if not offered.

        ``bundle_id`` names what the device was told to fetch (a release's own payload, or a
        controller-made delta payload for the device's base image).
        """
        ...

    def site_of(self, device_id: str) -> str | None:
        """The site a device sits at (for the per-site bandwidth budget)."""
        ...


class ControllerInbox(Protocol):
    """Inbound: device traffic the gateway has validated (schema, size, topic owner)."""

    def on_state(self, device_id: str, state: Mapping[str, Any]) -> None:
        """A device's retained state document changed."""
        ...

    def on_event(self, device_id: str, event: Mapping[str, Any]) -> None:
        """A device reported an event (phase transition, result with error code, health)."""
        ...

    def on_online(self, device_id: str, online: bool) -> None:
        """A device connected or its will was published."""
        ...
