"""Signed commands: one test per refusal code, and the install path into a verified release."""

from __future__ import annotations

import pytest

from firmware_bundles import canonical
from firmware_bundles.bundle import verify_install
from firmware_bundles.commands import Action, Command, sign_command, verify_command
from firmware_bundles.errors import CommandRejected, FormatInvalid, HardwareMismatch
from firmware_bundles.keys import SigningKey, sign_envelope
from firmware_bundles.slb import SlbReader
from firmware_bundles.trust import Role

NOW = 1_800_000_000


def _cmd(kit, **kw) -> bytes:
    values = {"device": "dev-1", "counter": 5, "action": Action.CANCEL, "args": {}, "issued": NOW}
    values.update(kw)
    signers = values.pop("signers", kit.signers(Role.COMMAND))
    return sign_command(signers, **values)


def _code(kit, data, **kw) -> str:
    args = {"device_id": "dev-1", "last_counter": 4, "now": NOW}
    args.update(kw)
    with pytest.raises(CommandRejected) as exc:
        verify_command(data, kit.trust, **args)
    return exc.value.code


def test_valid_command_verifies(kit):
    cmd = verify_command(_cmd(kit), kit.trust, device_id="dev-1", last_counter=4, now=NOW)
    assert cmd == Command("dev-1", 5, NOW, NOW + 3600, Action.CANCEL, {})


def test_signed_by_release_key_is_signature_invalid(kit):
    assert _code(kit, _cmd(kit, signers=kit.signers(Role.RELEASE))) == "command.signature_invalid"


def test_signed_by_stranger_is_signature_invalid(kit):
    assert _code(kit, _cmd(kit, signers=[SigningKey.generate()])) == "command.signature_invalid"


def test_for_another_device_is_wrong_device(kit):
    assert _code(kit, _cmd(kit, device="dev-2")) == "command.wrong_device"


@pytest.mark.parametrize("last", [5, 6, 1000])
def test_replayed_counter_is_refused(kit, last):
    assert _code(kit, _cmd(kit), last_counter=last) == "command.replayed"


def test_expired_command_is_refused(kit):
    assert _code(kit, _cmd(kit, issued=NOW - 100, expires=NOW)) == "command.expired"


def test_command_from_the_future_is_refused(kit):
    assert _code(kit, _cmd(kit, issued=NOW + 301, expires=NOW + 400)) == "command.not_yet_valid"


def test_small_clock_skew_is_allowed(kit):
    verify_command(_cmd(kit, issued=NOW + 299), kit.trust, device_id="dev-1", last_counter=4,
                   now=NOW)


def test_other_schema_is_unsupported(kit):
    doc = Command("dev-1", 5, NOW, NOW + 60, Action.CANCEL, {}).to_signed()
    doc["schema"] = 2
    data = sign_envelope(doc, kit.signers(Role.COMMAND))
    assert _code(kit, data) == "command.schema_unsupported"


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d.update(action="format-disk"),
        lambda d: d.update(counter=-1),
        lambda d: d.update(counter="7"),
        lambda d: d.update(extra=1),
        lambda d: d.update(expires=d["issued"] + 30 * 86400),
        lambda d: d.update(action="install", args={"bundle_id": "b"}),
        lambda d: d.update(type="manifest"),
    ],
    ids=["action", "negative-counter", "string-counter", "extra-field", "lifetime", "install-args",
         "type"],
)
def test_malformed_command_is_refused(kit, mutate):
    doc = Command("dev-1", 5, NOW, NOW + 60, Action.CANCEL, {}).to_signed()
    mutate(doc)
    data = sign_envelope(doc, kit.signers(Role.COMMAND))
    assert _code(kit, data) == "command.malformed"


def test_garbage_and_oversized_input_is_malformed(kit):
    assert _code(kit, b"not json") == "command.malformed"
    assert _code(kit, b" " * (1024 * 1024 + 1)) == "command.malformed"


def test_counter_must_strictly_increase_across_a_sequence(kit):
    last = -1
    for counter in (1, 2, 7):
        last = verify_command(_cmd(kit, counter=counter), kit.trust, device_id="dev-1",
                              last_counter=last, now=NOW).counter
    assert _code(kit, _cmd(kit, counter=7), last_counter=last) == "command.replayed"


def test_signing_refuses_what_verify_would_refuse(kit):
    with pytest.raises(FormatInvalid):
        _cmd(kit, issued=NOW, expires=NOW)


def _install(kit, **hw):
    slb = kit.build("i.slb")
    with slb.open("rb") as f:
        header = SlbReader(f).read_header()
    manifest = canonical.decode(header.manifest)
    data = _cmd(kit, action=Action.INSTALL, args={
        "bundle_id": manifest["signed"]["bundle_id"], "manifest": manifest, "rollout": "r1"})
    cmd = verify_command(data, kit.trust, device_id="dev-1", last_counter=0, now=NOW)
    return verify_install(cmd, kit.trust, now=NOW, min_security_version=0, **hw)


def test_install_command_carries_a_release_verified_manifest(kit):
    release = _install(kit, hardware="board-a")
    assert release.target.sha256
    assert release.manifest.version == "2.0.0"


def test_install_command_for_other_hardware_is_refused(kit):
    with pytest.raises(HardwareMismatch):
        _install(kit, hardware="board-z")


def test_command_key_cannot_forge_a_manifest(kit):
    slb = kit.build("i.slb")
    with slb.open("rb") as f:
        manifest = canonical.decode(SlbReader(f).read_header().manifest)
    forged = canonical.decode(sign_envelope(manifest["signed"], kit.signers(Role.COMMAND)))
    data = _cmd(kit, action=Action.INSTALL, args={
        "bundle_id": manifest["signed"]["bundle_id"], "manifest": forged})
    cmd = verify_command(data, kit.trust, device_id="dev-1", last_counter=0, now=NOW)
    with pytest.raises(Exception, match="release signatures") as exc:
        verify_install(cmd, kit.trust, now=NOW, hardware="board-a", min_security_version=0)
    assert exc.value.code == "bundle.signature_invalid"
