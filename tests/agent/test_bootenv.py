"""Boot env adapters: byte-compatible with fw_setenv, torn writes fall back, GRUB never torn.

Uses the real tools (libubootenv-tool's fw_printenv/fw_setenv, grub-common's grub-editenv) on
file-backed envs.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from agent.adapters.bootenv import (
    DEFAULT_ENV,
    FwEnv,
    GrubEnv,
    RedundantEnv,
    SimBootloader,
    decode_copy,
    env_changes,
    env_view,
)
from agent.adapters.faultfs import FaultFS, PowerCut
from agent.core.commands import MarkBad, MarkGood, SetBootOnce
from agent.core.states import BootSlot
from agent.errors import BootEnvCorrupt, BootEnvError

SIZE = 0x1000
needs_fw = pytest.mark.skipif(shutil.which("fw_setenv") is None, reason="libubootenv-tool missing")
needs_grub = pytest.mark.skipif(shutil.which("grub-editenv") is None, reason="grub-common missing")


def _fw(tmp_path: Path) -> tuple[FwEnv, Path]:
    env_file = tmp_path / "uboot.env"
    env_file.write_bytes(b"\0" * (2 * SIZE))
    cfg = tmp_path / "fw_env.config"
    cfg.write_text(f"{env_file} 0x0000 {SIZE:#x}\n{env_file} {SIZE:#x} {SIZE:#x}\n")
    default = tmp_path / "default.env"
    default.write_text("".join(f"{k}={v}\n" for k, v in DEFAULT_ENV.items()))
    return FwEnv(str(cfg), default_env=str(default)), env_file


@needs_fw
def test_python_env_and_fw_setenv_read_each_others_writes(tmp_path) -> None:
    fw, env_file = _fw(tmp_path)
    fw.write(env_changes(SetBootOnce(BootSlot.B)))
    py = RedundantEnv(str(env_file), copy_size=SIZE)
    assert env_view(py.read()).boot_part is BootSlot.B
    assert env_view(py.read()).upgrade_available
    py.write({"bootcount": "1"})
    assert fw.read()["bootcount"] == "1"
    assert fw.read()["boot_part"] == "b"
    fw.write(env_changes(MarkGood(BootSlot.B)))
    assert py.read()["upgrade_available"] == "0"
    # the simulated bootloader boots from what fw_setenv wrote
    fw.write(env_changes(SetBootOnce(BootSlot.A)))
    assert SimBootloader(py).boot() is BootSlot.A
    assert fw.read()["bootcount"] == "1"


@needs_fw
def test_fw_env_corrupt_newest_copy_falls_back_one_write(tmp_path) -> None:
    fw, env_file = _fw(tmp_path)
    fw.write({"boot_part": "a", "upgrade_available": "0"})
    fw.write(env_changes(SetBootOnce(BootSlot.B)))  # the newest copy holds the trial
    raw = bytearray(env_file.read_bytes())
    copies = [decode_copy(bytes(raw[:SIZE])), decode_copy(bytes(raw[SIZE:]))]
    newest = 0 if copies[0][0] > copies[1][0] else 1
    raw[newest * SIZE + 40] ^= 0xFF  # tear it
    env_file.write_bytes(bytes(raw))
    # half-written trial never starts: both readers see the previous env
    assert fw.read()["upgrade_available"] == "0"
    assert fw.read()["boot_part"] == "a"
    py = RedundantEnv(str(env_file), copy_size=SIZE)
    assert SimBootloader(py).boot() is BootSlot.A


@needs_fw
def test_fw_env_both_copies_corrupt(tmp_path) -> None:
    fw, env_file = _fw(tmp_path)
    fw.write({"boot_part": "b"})
    env_file.write_bytes(b"\xff" * (2 * SIZE))
    with pytest.raises(BootEnvCorrupt):
        fw.read()
    with pytest.raises(BootEnvCorrupt):
        RedundantEnv(str(env_file), copy_size=SIZE).read()
    # U-Boot then uses its built-in default env: the factory slot, no trial
    assert SimBootloader(RedundantEnv(str(env_file), copy_size=SIZE)).boot() is BootSlot.A


def test_fw_env_missing_tool_or_config_is_a_stable_error(tmp_path) -> None:
    with pytest.raises(BootEnvError):
        FwEnv(str(tmp_path / "missing.config")).read()
    with pytest.raises(BootEnvError):
        FwEnv(str(tmp_path / "x")).write({"bad\nname": "1"})


def test_torn_env_write_is_never_a_half_trial() -> None:
    for cut in range(1, 3):
        for mode in ("drop", "tear", "keep"):
            fs = FaultFS()
            env = RedundantEnv("/boot/env", fs=fs)
            env.write(dict(DEFAULT_ENV))
            fs.settle()
            fs.cut_after = fs.ops + cut
            with pytest.raises(PowerCut):
                env.write(env_changes(SetBootOnce(BootSlot.B)))
                env.write({"x": "1"})
                env.write({"y": "1"})
            after = RedundantEnv("/boot/env", fs=fs.crash(mode)).read()
            view = env_view(after)
            # either the whole trial (boot_part=b AND upgrade_available=1 AND bootcount=0) or none
            assert (view.boot_part, view.upgrade_available) in (
                (BootSlot.A, False),
                (BootSlot.B, True),
            )


def test_uboot_bootcount_and_altbootcmd_semantics() -> None:
    fs = FaultFS()
    env = RedundantEnv("/boot/env", fs=fs)
    env.write({**DEFAULT_ENV, "bootlimit": "2"})
    loader = SimBootloader(env)
    assert loader.boot() is BootSlot.A
    assert env.read()["bootcount"] == "0"  # not counted without upgrade_available
    env.write(env_changes(SetBootOnce(BootSlot.B)))
    assert [loader.boot() for _ in range(2)] == [BootSlot.B, BootSlot.B]
    assert env.read()["bootcount"] == "2"
    assert loader.boot() is BootSlot.A  # 3 > bootlimit 2: altbootcmd
    e = env_view(env.read())
    assert e.boot_part is BootSlot.A
    assert not e.upgrade_available
    assert e.bootcount == 3
    assert loader.boot() is BootSlot.A  # bootcount reads as 0 now: no alt loop
    env.write(env_changes(MarkBad(BootSlot.B)))
    assert env_view(env.read()).bootcount == 0


def test_bootlimit_zero_means_no_limit() -> None:
    env = RedundantEnv("/boot/env", fs=FaultFS())
    env.write({**DEFAULT_ENV, "bootlimit": "0"})
    env.write(env_changes(SetBootOnce(BootSlot.B)))
    assert all(SimBootloader(env).boot() is BootSlot.B for _ in range(10))


@needs_grub
def test_grub_env_roundtrip_and_atomic_replace(tmp_path) -> None:
    path = tmp_path / "grubenv"
    g = GrubEnv(str(path))
    assert g.read() == {}
    g.write(env_changes(SetBootOnce(BootSlot.B)))
    assert g.read() == {"boot_part": "b", "upgrade_available": "1", "bootcount": "0"}
    assert path.stat().st_size == 1024  # a real grubenv block
    g.write(env_changes(MarkGood(BootSlot.B)))
    assert g.read()["upgrade_available"] == "0"
    # a half-written temp file from a power cut never replaces the live block
    (tmp_path / ".grubenv.new").write_bytes(b"# GRUB Environment Block\nboot_part=a")
    assert g.read()["boot_part"] == "b"
    g.write({"bootcount": "1"})
    assert g.read()["bootcount"] == "1"
    assert g.read()["boot_part"] == "b"


@needs_grub
def test_grub_env_write_error_is_stable(tmp_path) -> None:
    g = GrubEnv(str(tmp_path / "missing-dir" / "grubenv"))
    with pytest.raises(BootEnvError):
        g.write({"boot_part": "a"})
