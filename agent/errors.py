"""Errors of the device agent, with stable codes.

Bundle and command faults reuse ``firmware_bundles.errors`` (``bundle.*``, ``command.rejected``,
``transfer.error``); this module adds what only the device can get wrong or report. Every code
here can appear in the ``last_result`` of ``slotline agent status`` and in published events:

    agent.busy              an update is in flight; the command was refused
    agent.already_installed the release is already the primary slot's image
    agent.cancelled         the update was cancelled before the switch
    agent.no_progress       the update crashed the agent MAX_ATTEMPTS times without progress
    agent.no_rollback_slot  fleet rollback asked, but the other slot holds no GOOD image
    agent.too_late          cancel after the switch (use rollback)
    agent.verifier_failed   the command-verifier child crashed, hung or answered garbage
    slot.io_error           reading/writing/syncing the inactive slot failed
    slot.no_space           the medium under the inactive slot is full
    slot.too_small          the image does not fit the slot
    slot.active_write       refused: a write to the booted/primary slot (never happens by design)
    bootenv.corrupt         the boot env could not be read
    bootenv.write_failed    the boot env could not be written
    boot.fallback           the bootloader gave up on the new slot and booted the old one
    boot.loop               the new slot kept restarting before committing
    selftest.failed         a self-test check failed
    selftest.timeout        a self-test check or the overall deadline ran out (a hang)
    selftest.crashed        a self-test check could not run
    migration.failed        a data-migration hook failed (the update is reverted)
    journal.corrupt         the journal could not be decoded
    journal.schema_unsupported  the journal was written by a newer agent
    journal.write_failed    the journal could not be saved (nothing was acted on)
    config.invalid          agent.toml is invalid
"""

from __future__ import annotations


class AgentError(Exception):
    """Root of every error this package raises on purpose."""

    code = "agent.error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class AgentBusy(AgentError):
    """An update is in flight."""

    code = "agent.busy"


class AlreadyInstalled(AgentError):
    """The release is already installed in the primary slot."""

    code = "agent.already_installed"


class NoRollbackSlot(AgentError):
    """The other slot holds no GOOD image."""

    code = "agent.no_rollback_slot"


class SlotError(AgentError):
    """Reading or writing a slot failed."""

    code = "slot.io_error"


class SlotNoSpace(SlotError):
    """The medium is full."""

    code = "slot.no_space"


class SlotTooSmall(SlotError):
    """The image is larger than the slot."""

    code = "slot.too_small"


class ActiveSlotWrite(SlotError):
    """A write to the slot that must not be written (booted or primary)."""

    code = "slot.active_write"


class BootEnvError(AgentError):
    """The boot env could not be read or written."""

    code = "bootenv.write_failed"


class BootEnvCorrupt(BootEnvError):
    """No valid copy of the boot env."""

    code = "bootenv.corrupt"


class JournalError(AgentError):
    """The journal could not be saved or loaded."""

    code = "journal.write_failed"


class JournalCorrupt(JournalError):
    """The journal does not decode."""

    code = "journal.corrupt"


class JournalSchemaUnsupported(JournalError):
    """The journal was written by a newer agent."""

    code = "journal.schema_unsupported"


class SelfTestError(AgentError):
    """A self-test check failed."""

    code = "selftest.failed"


class MigrationError(AgentError):
    """A data-migration hook failed."""

    code = "migration.failed"


class ConfigInvalid(AgentError):
    """agent.toml is invalid."""

    code = "config.invalid"


class VerifierFailed(AgentError):
    """The child process that verifies a command did not answer (the command is refused)."""

    code = "agent.verifier_failed"
