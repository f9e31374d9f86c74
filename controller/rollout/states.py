"""A device's part in one rollout, and how reported outcomes move it (pure)."""

from __future__ import annotations

import enum


class DeviceRolloutState(enum.Enum):
    """A device's part in one rollout."""

    SCHEDULED = "scheduled"
    COMMANDED = "commanded"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCEL_SENT = "cancel_sent"
    CANCELLED = "cancelled"
    ROLLBACK_SENT = "rollback_sent"
    ROLLED_BACK = "rolled_back"


DS = DeviceRolloutState

# The agent's result outcomes (agent/core/states.py Result.outcome).
SUCCESS = frozenset({"committed"})
FAILURE = frozenset({"reverted", "failed", "rejected"})

# (current, outcome) -> next; anything else leaves the row as it is.
_EDGES: dict[tuple[DS, str], DS] = {
    **{(DS.COMMANDED, o): DS.SUCCEEDED for o in SUCCESS},
    **{(DS.COMMANDED, o): DS.FAILED for o in FAILURE},
    **{(DS.CANCEL_SENT, o): DS.CANCELLED for o in (*FAILURE, "cancelled")},
    # Too late to cancel: the device committed; count it as updated.
    (DS.CANCEL_SENT, "committed"): DS.SUCCEEDED,
    (DS.ROLLBACK_SENT, "rolled_back"): DS.ROLLED_BACK,
}


def next_state(current: DS, outcome: str) -> DS | None:
    """Where a device's rollout row goes on a reported outcome (None: it stays)."""
    return _EDGES.get((current, outcome))
