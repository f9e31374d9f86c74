"""`slotline bundle ...`: the exact command forms, exit codes and one-line refusals."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from firmware_bundles.cli import bundle


@pytest.fixture
def run():
    runner = CliRunner()

    def _run(*args: str):
        return runner.invoke(bundle, [str(a) for a in args], catch_exceptions=False)

    return _run


@pytest.fixture
def work(tmp_path, run, image_pair):
    old, new = image_pair
    (tmp_path / "old.img").write_bytes(old)
    (tmp_path / "new.img").write_bytes(new)
    result = run("keygen", "--out", tmp_path / "keys")
    assert result.exit_code == 0, result.output
    return tmp_path


def _build(run, w: Path, *extra: str, out: str = "d.slb"):
    return run("build", "--image", w / "new.img", "--base", w / "old.img", "--version", "2.0.0",
               "--hardware", "board-a", "--keys", w / "keys", "--out", w / out,
               "--chunk-size", "16384", *extra)


def _one_error_line(result, code: str) -> None:
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"error: {code}: ")


def test_keygen_build_verify_inspect_apply(run, work):
    assert (work / "keys" / "trust.json").is_file()
    result = _build(run, work, "--component", "rootfs", "--security-version", "2",
                    "--notes", "fixes", "--requires", "bootloader=>=2.1", "--expires-days", "30")
    assert result.exit_code == 0, result.output
    trust = work / "keys" / "trust.json"
    result = run("verify", work / "d.slb", "--trust", trust)
    assert result.exit_code == 0
    assert result.output.startswith("verified: ")
    result = run("verify", work / "d.slb", "--trust", trust, "--decode", "--base", work / "old.img")
    assert result.exit_code == 0, result.output
    _one_error_line(run("verify", work / "d.slb", "--trust", trust, "--decode"),
                    "bundle.base_mismatch")
    result = run("verify", work / "d.slb", "--trust", trust, "--json")
    assert json.loads(result.output)["security_version"] == 2
    result = run("inspect", work / "d.slb", "--json")
    info = json.loads(result.output)
    assert info["requires"] == {"bootloader": ">=2.1"}
    assert info["verified"] is False
    result = run("inspect", work / "d.slb")
    assert result.exit_code == 0
    assert "unverified" in result.output
    result = run("apply", work / "d.slb", "--base", work / "old.img", "--out", work / "out.img",
                 "--trust", trust)
    assert result.exit_code == 0, result.output
    assert (work / "out.img").read_bytes() == (work / "new.img").read_bytes()


def test_full_bundle_apply_without_base(run, work):
    result = run("build", "--image", work / "new.img", "--version", "1.0", "--hardware", "b",
                 "--keys", work / "keys", "--out", work / "f.slb")
    assert result.exit_code == 0, result.output
    result = run("apply", work / "f.slb", "--out", work / "out.img",
                 "--trust", work / "keys" / "trust.json")
    assert result.exit_code == 0, result.output


def test_refusals_print_one_error_line_and_leave_no_output(run, work):
    _build(run, work)
    trust = work / "keys" / "trust.json"
    result = run("apply", work / "d.slb", "--base", work / "new.img", "--out", work / "out.img",
                 "--trust", trust)
    _one_error_line(result, "bundle.base_mismatch")
    assert not (work / "out.img").exists()
    _one_error_line(run("verify", work / "d.slb", "--trust", trust, "--hardware", "other"),
                    "bundle.hardware_mismatch")
    _one_error_line(run("verify", work / "d.slb", "--trust", trust, "--min-security-version", "1"),
                    "bundle.version_rollback")
    data = bytearray((work / "d.slb").read_bytes())
    data[-1] ^= 0x41
    (work / "m.slb").write_bytes(data)
    _one_error_line(run("verify", work / "m.slb", "--trust", trust), "bundle.digest_mismatch")
    _one_error_line(run("inspect", work / "old.img"), "bundle.format_invalid")


def test_bundle_from_another_key_set_is_refused(run, work):
    _build(run, work)
    assert run("keygen", "--out", work / "keys2").exit_code == 0
    _one_error_line(run("verify", work / "d.slb", "--trust", work / "keys2" / "trust.json"),
                    "bundle.signature_invalid")


def test_rotate_root_then_verify_with_the_chain(run, work):
    _build(run, work)
    old_trust = work / "device-trust.json"
    shutil.copy(work / "keys" / "trust.json", old_trust)
    result = run("rotate-root", "--keys", work / "keys", "--replace", "release")
    assert result.exit_code == 0, result.output
    # Bundles signed by the replaced release key are refused once the device rotates.
    _one_error_line(run("verify", work / "d.slb", "--trust", old_trust, "--root-update",
                        work / "keys" / "root.2.json"), "bundle.signature_invalid")
    assert _build(run, work, out="d2.slb").exit_code == 0
    result = run("verify", work / "d2.slb", "--trust", old_trust, "--root-update",
                 work / "keys" / "root.2.json")
    assert result.exit_code == 0, result.output
    # Without the rotation the old root does not know the new release key.
    _one_error_line(run("verify", work / "d2.slb", "--trust", old_trust),
                    "bundle.signature_invalid")


def test_keygen_refuses_to_overwrite(run, work):
    result = run("keygen", "--out", work / "keys")
    assert result.exit_code != 0
    assert result.stderr.startswith("error: ")


def test_the_slotline_entry_point_runs_the_group(work):
    exe = Path(sys.executable).parent / "slotline"
    if not exe.exists():
        pytest.skip("slotline console script not installed in this environment")
    proc = subprocess.run([exe, "bundle", "verify", work / "old.img", "--trust",
                           work / "keys" / "trust.json"], capture_output=True, text=True,
                          check=False, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: bundle.format_invalid: ")


def test_io_failure_exits_3(run, work):
    _build(run, work)
    result = run("apply", work / "d.slb", "--base", work / "old.img", "--out",
                 work / "missing-dir" / "out.img", "--trust", work / "keys" / "trust.json")
    assert result.exit_code == 3
    assert result.stderr.startswith("error: transfer.error: ")
