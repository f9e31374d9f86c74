"""The command verifier a virtual device uses: the agent's own, built from the trust root.

Kept in one place so the worker does not care how the agent names its verifier.
"""

from __future__ import annotations

from typing import Any


def make_verifier(trust_root: bytes, device_id: str, hardware: str) -> Any:
    """The agent's ``CommandVerifier`` for one device."""
    from agent.verify import make_verifier as agent_make_verifier  # noqa: PLC0415

    return agent_make_verifier(trust_root, device_id=device_id, hardware=hardware)
