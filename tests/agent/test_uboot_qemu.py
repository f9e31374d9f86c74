"""Our U-Boot boot counting on a real U-Boot (QEMU), checked against SimBootloader.

Debian's ``u-boot-qemu`` (qemu_arm) boots under ``qemu-system-arm -M virt``. Its board env (NOR
flash, built by packaging/agent/uboot/mkenv.py from slotline.env + qemu-virt.env) loads our
redundant env from a raw virtio disk before bootcmd runs and saves into it (see qemu-virt.env).
The agent writes that disk with its own adapters (RedundantEnv, FwEnv over fw_setenv); the
bootcmd is slotline.env's, with boot_a/boot_b printing ``SLOTLINE-BOOT slot=..`` and powering
off instead of loading a kernel. Before every real boot SimBootloader boots a copy of the same
disk: the slot, the contract variables and the copies' flags must come out the same.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest

from agent.adapters.bootenv import (
    FwEnv,
    RedundantEnv,
    SimBootloader,
    decode_copy,
    encode_copy,
    env_changes,
    env_view,
)
from agent.core.commands import MarkGood, SetBootOnce
from agent.core.states import BootSlot

UBOOT_DIR = Path(__file__).resolve().parents[2] / "packaging" / "agent" / "uboot"
UBOOT_BIN = Path(os.environ.get("SLOTLINE_UBOOT_BIN", "/usr/lib/u-boot/qemu_arm/u-boot.bin"))
QEMU = shutil.which("qemu-system-arm")
COPY = 0x2000  # qemu-virt.env reads and writes copies of this size
CONTRACT = ("boot_part", "upgrade_available", "bootcount", "bootlimit")
MARKER = re.compile(r"^SLOTLINE-BOOT slot=(\w+) bootcount=(\S*) upgrade_available=(\S*)\s*$")

pytestmark = pytest.mark.slow
REQUIRE = os.environ.get("SLOTLINE_REQUIRE_SERVICES") == "1"


@pytest.fixture(autouse=True)
def _needs_qemu_and_uboot() -> None:
    # like tests/conftest.py's services: skip on a workstation, fail in CI (system-deps.sh
    # installs both), so CI can never pass without having booted the real U-Boot
    missing = []
    if QEMU is None:
        missing.append("qemu-system-arm (apt-get install qemu-system-arm)")
    if not UBOOT_BIN.is_file():
        missing.append(f"{UBOOT_BIN} (apt-get install u-boot-qemu, or set SLOTLINE_UBOOT_BIN)")
    if missing:
        msg = "missing: " + ", ".join(missing)
        if REQUIRE:
            pytest.fail(msg)
        pytest.skip(msg)


def _mkenv() -> ModuleType:
    spec = importlib.util.spec_from_file_location("slotline_mkenv", UBOOT_DIR / "mkenv.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


MKENV = _mkenv()


@dataclass(frozen=True)
class Boot:
    slot: BootSlot
    bootcount: str
    upgrade_available: str
    wrote: bool  # U-Boot changed the env disk
    seconds: float


def _copies(raw: bytes) -> list[tuple[int, dict[str, str]] | None]:
    return [decode_copy(raw[:COPY]), decode_copy(raw[COPY : 2 * COPY])]


def _flags(raw: bytes) -> list[int | None]:
    return [c[0] if c else None for c in _copies(raw)]


class Rig:
    """One QEMU board: flash with the board env, a virtio disk with our redundant env."""

    def __init__(self, tmp: Path, adapter: str) -> None:
        self.tmp = tmp
        sources = [str(UBOOT_DIR / "slotline.env"), str(UBOOT_DIR / "qemu-virt.env")]
        self.default_env = MKENV.load(sources)
        flash = tmp / "flash1.img"
        flash.write_bytes(MKENV.single_image(self.default_env, 0x40000))
        os.truncate(flash, 64 << 20)  # QEMU virt wants the whole 64 MiB pflash bank
        self.flash = flash
        self.disk = tmp / "env.img"
        self.disk.write_bytes(b"\0" * (2 * COPY))
        # the device's first env: written by the agent's adapter (copy 0, flags 1)
        self.py = RedundantEnv(str(self.disk), copy_size=COPY)
        self.py.write(self.default_env)
        self.fw: FwEnv | None = None
        if shutil.which("fw_printenv"):
            cfg = tmp / "fw_env.config"
            cfg.write_text(f"{self.disk} 0x0 {COPY:#x}\n{self.disk} {COPY:#x} {COPY:#x}\n")
            self.fw = FwEnv(str(cfg))
        self.agent = self.fw if adapter == "fw_setenv" else self.py
        self.boots: list[Boot] = []

    def agent_write(self, command: SetBootOnce | MarkGood) -> None:
        assert self.agent is not None
        self.agent.write(env_changes(command))

    def read(self) -> dict[str, str]:
        env = dict(self.py.read())
        if self.fw is not None:  # libubootenv reads the disk U-Boot wrote the same way
            assert {k: self.fw.read().get(k) for k in CONTRACT} == {k: env.get(k) for k in CONTRACT}
        return env

    def run_qemu(self, timeout: float) -> tuple[str, bool]:
        """U-Boot's console output, and whether QEMU exited (powered off) within timeout."""
        argv = [
            str(QEMU), "-M", "virt", "-nic", "none", "-display", "none", "-monitor", "none",
            "-serial", "stdio", "-bios", str(UBOOT_BIN),
            "-drive", f"if=pflash,unit=1,format=raw,file={self.flash}",
            "-drive", f"if=none,id=env,format=raw,file={self.disk}",
            "-device", "virtio-blk-device,drive=env",
        ]  # fmt: skip
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        try:
            raw, _ = proc.communicate(timeout=timeout)
            exited = True
        except subprocess.TimeoutExpired:
            proc.kill()
            raw, _ = proc.communicate()
            exited = False
        return raw.decode(errors="replace").replace("\r", ""), exited

    def boot(self) -> Boot:
        before = self.disk.read_bytes()
        sim_disk = self.tmp / "sim.img"
        sim_disk.write_bytes(before)
        sim_env = RedundantEnv(str(sim_disk), copy_size=COPY)
        predicted = SimBootloader(sim_env, default_env=self.default_env).boot()

        t0 = time.monotonic()
        out, exited = self.run_qemu(30.0)
        seconds = time.monotonic() - t0
        assert exited, f"U-Boot did not power off, it said:\n{out[-3000:]}"
        markers = [m for line in out.splitlines() if (m := MARKER.match(line))]
        assert len(markers) == 1, f"expected one boot marker, U-Boot said:\n{out[-3000:]}"
        assert "slotline: env does not fit" not in out
        slot, bootcount, upgrade = markers[0].groups()
        after = self.disk.read_bytes()
        boot = Boot(BootSlot(slot), bootcount, upgrade, after != before, seconds)
        self.boots.append(boot)

        # the simulator's model against the real thing, step by step
        assert boot.slot is predicted, f"U-Boot booted {slot}, SimBootloader predicted {predicted}"
        sim_after = sim_disk.read_bytes()
        assert boot.wrote == (sim_after != before), "U-Boot and SimBootloader disagree on saving"
        assert _flags(after) == _flags(sim_after)  # same number of saves, same copies
        if boot.wrote:
            real, sim = self.read(), dict(sim_env.read())
            assert {k: real.get(k) for k in CONTRACT} == {k: sim.get(k) for k in CONTRACT}
            assert bootcount == real["bootcount"]
            assert upgrade == real["upgrade_available"]
        return boot


ADAPTERS = [
    "python",
    pytest.param(
        "fw_setenv",
        marks=pytest.mark.skipif(
            shutil.which("fw_setenv") is None, reason="libubootenv-tool missing"
        ),
    ),
]


@pytest.fixture(params=ADAPTERS)
def rig(request: pytest.FixtureRequest, tmp_path: Path) -> Rig:
    return Rig(tmp_path, request.param)


def test_trial_counts_then_altbootcmd_boots_the_old_slot(rig: Rig) -> None:
    boot = rig.boot()
    assert (boot.slot, boot.wrote) == (BootSlot.A, False)  # no trial: no counting, no save
    rig.agent_write(SetBootOnce(BootSlot.B))
    for n in (1, 2, 3):  # bootlimit 3: three boots of the new slot, each counted and saved
        boot = rig.boot()
        assert (boot.slot, boot.bootcount, boot.wrote) == (BootSlot.B, str(n), True)
        assert env_view(rig.read()).bootcount == n
    boot = rig.boot()  # 4 > bootlimit: altbootcmd
    assert (boot.slot, boot.bootcount, boot.upgrade_available) == (BootSlot.A, "4", "0")
    view = env_view(rig.read())
    assert (view.boot_part, view.upgrade_available, view.bootcount) == (BootSlot.A, False, 4)
    boot = rig.boot()  # the trial is over: the old slot, nothing counted or saved
    assert (boot.slot, boot.wrote) == (BootSlot.A, False)


def test_mark_good_stops_counting(rig: Rig) -> None:
    rig.agent_write(SetBootOnce(BootSlot.B))
    assert rig.boot().slot is BootSlot.B
    rig.agent_write(MarkGood(BootSlot.B))  # the agent's commit
    for _ in range(2):
        boot = rig.boot()
        assert (boot.slot, boot.bootcount, boot.upgrade_available) == (BootSlot.B, "0", "0")
        assert not boot.wrote


def _corrupt_newest(rig: Rig) -> None:
    raw = bytearray(rig.disk.read_bytes())
    flags = _flags(bytes(raw))
    assert None not in flags
    newest = 0 if flags[0] == (flags[1] + 1) % 256 else 1
    raw[newest * COPY + 100] ^= 0x5A  # inside the variables, as a torn write would leave it
    rig.disk.write_bytes(bytes(raw))


def test_corrupt_newest_copy_falls_back_and_never_boots_the_untested_slot(rig: Rig) -> None:
    rig.agent_write(SetBootOnce(BootSlot.B))  # the newest copy holds the trial...
    _corrupt_newest(rig)  # ...and is torn: U-Boot must use the older copy (slot a, no trial)
    boot = rig.boot()
    assert (boot.slot, boot.upgrade_available, boot.wrote) == (BootSlot.A, "0", False)
    assert env_view(rig.read()).boot_part is BootSlot.A

    # a torn commit during a trial: the older copy still holds the trial, counting goes on
    rig.agent_write(SetBootOnce(BootSlot.B))
    assert rig.boot().slot is BootSlot.B
    rig.agent_write(MarkGood(BootSlot.B))
    _corrupt_newest(rig)
    boot = rig.boot()
    assert (boot.slot, boot.bootcount, boot.wrote) == (BootSlot.B, "2", True)

    # both copies torn: U-Boot's default env (the factory slot), nothing saved
    rig.disk.write_bytes(b"\xff" * (2 * COPY))
    boot = rig.boot()
    assert (boot.slot, boot.wrote) == (BootSlot.A, False)


def test_flags_wrap_and_bootlimit_zero(tmp_path: Path) -> None:
    rig = Rig(tmp_path, "python")
    env = dict(rig.default_env)
    trial = {**env, **env_changes(SetBootOnce(BootSlot.B)), "bootlimit": "0"}
    # copy 0 has flags 255, copy 1 flags 0: 0 is the newer one (the counter wrapped)
    rig.disk.write_bytes(encode_copy(env, COPY, 255) + encode_copy(trial, COPY, 0))
    for n in range(1, 6):  # bootlimit 0: no limit, the trial never falls back by itself
        boot = rig.boot()
        assert (boot.slot, boot.bootcount) == (BootSlot.B, str(n))
    assert _flags(rig.disk.read_bytes()) == [5, 4]


@pytest.mark.parametrize(("f0", "f1"), [(5, 200), (200, 5), (1, 255), (7, 7)])
def test_copy_choice_follows_uboots_flags_rule(tmp_path: Path, f0: int, f1: int) -> None:
    # U-Boot (env_import_redund) and libubootenv take the higher flags byte, except that 0 beats
    # 255; equal flags: copy 0. Sequential writes only ever leave adjacent flags, but an image
    # provisioned elsewhere need not.
    rig = Rig(tmp_path, "python")
    env = dict(rig.default_env)
    rig.disk.write_bytes(
        encode_copy({**env, "boot_part": "a"}, COPY, f0)
        + encode_copy({**env, "boot_part": "b"}, COPY, f1)
    )
    expected = BootSlot.A if (f0 > f1 and (f0, f1) != (255, 0)) or f0 == f1 else BootSlot.B
    assert rig.boot().slot is expected


def test_counts_in_decimal_past_nine(tmp_path: Path) -> None:
    # U-Boot's setexpr adds in hex (9 + 1 = "a"); slotline.env counts in decimal
    rig = Rig(tmp_path, "python")
    rig.py.write({**env_changes(SetBootOnce(BootSlot.B)), "bootcount": "9", "bootlimit": "11"})
    assert [(b.slot, b.bootcount) for b in (rig.boot(), rig.boot())] == [
        (BootSlot.B, "10"),
        (BootSlot.B, "11"),
    ]
    boot = rig.boot()  # 12 > 11
    assert (boot.slot, boot.bootcount, boot.upgrade_available) == (BootSlot.A, "12", "0")
    assert env_view(rig.read()).bootcount == 12


@pytest.mark.parametrize(
    "changes",
    [
        {"boot_part": "x", "upgrade_available": "1", "bootcount": "3"},  # alt from "a": b
        {"boot_part": "b", "upgrade_available": "2", "bootcount": "0"},  # any n > 0 is a trial
        {"boot_part": "b", "upgrade_available": "-1", "bootcount": "0"},  # not a trial
        {"boot_part": "b", "upgrade_available": "junk", "bootcount": "0"},
        {"boot_part": "b", "upgrade_available": "1", "bootcount": ""},  # counts from 0
        {"boot_part": "b", "upgrade_available": "1", "bootcount": "junk"},
        {"boot_part": "b", "upgrade_available": "1", "bootcount": "5", "bootlimit": "junk"},
        {"boot_part": "b", "upgrade_available": "1", "bootcount": "98", "bootlimit": "0"},
        {"boot_part": "b", "upgrade_available": "1", "bootcount": "99", "bootlimit": "0"},  # stays
    ],
)
def test_odd_values_boot_as_the_simulator_says(tmp_path: Path, changes: dict[str, str]) -> None:
    rig = Rig(tmp_path, "python")
    rig.py.write(changes)
    rig.boot()  # asserts slot, saves and contract variables against SimBootloader


@pytest.mark.skipif(shutil.which("fw_setenv") is None, reason="libubootenv-tool missing")
def test_agent_first_write_on_blank_storage_needs_the_whole_default_env(tmp_path: Path) -> None:
    # U-Boot replaces its env with a saved copy (the QEMU board imports with -d, like
    # env_import). On blank storage fw_setenv starts from the agent's default_env file: with
    # only the contract variables there is no bootcmd afterwards and U-Boot stays at its prompt.
    rig = Rig(tmp_path, "fw_setenv")
    assert rig.fw is not None
    short = tmp_path / "uboot-default.env"
    short.write_text((UBOOT_DIR.parent / "uboot-default.env").read_text())
    full = tmp_path / "full-default.env"
    full.write_text(MKENV.flat(rig.default_env))
    for default, boots in ((short, False), (full, True)):
        rig.disk.write_bytes(b"\0" * (2 * COPY))  # never saved: U-Boot uses its default env
        FwEnv(rig.fw.config, default_env=str(default)).write(env_changes(SetBootOnce(BootSlot.B)))
        if boots:
            assert rig.boot().slot is BootSlot.B
        else:
            out, exited = rig.run_qemu(3.0)
            assert not exited
            assert "SLOTLINE-BOOT" not in out
            assert out.rstrip().endswith("=>"), out[-2000:]  # the prompt, no autoboot
            assert rig.read()["boot_part"] == "b"
            assert "bootcmd" not in rig.read()
