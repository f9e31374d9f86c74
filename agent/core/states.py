"""Value types shared by the agent core and its ports."""

from __future__ import annotations

import enum


class BootSlot(enum.Enum):
    """The two A/B slots, by their bootloader names."""

    A = "a"
    B = "b"

    @property
    def other(self) -> BootSlot:
        """The slot that is not this one."""
        return BootSlot.B if self is BootSlot.A else BootSlot.A
