"""The controller's MQTT gateway (``controller.ports.DeviceGateway`` over MQTT v5)."""

from controller.gateway.mqtt import GatewayLimits, GatewayStats, MqttGateway

__all__ = ["GatewayLimits", "GatewayStats", "MqttGateway"]
