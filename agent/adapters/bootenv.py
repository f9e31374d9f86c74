r"""Boot env adapters (the ``BootEnv`` port) and the simulated U-Boot that reads them.

Variables (U-Boot names): ``boot_part`` (a|b), ``upgrade_available`` (0|1), ``bootcount``,
``bootlimit``, and our ``security_version`` (the anti-rollback floor, kept outside the journal).

- :class:`RedundantEnv`: the U-Boot redundant env format in Python (two copies, each
  ``crc32 LE | flags | "k=v\\0...\\0"`` padded with zeros; a write goes to the older copy with
  flags+1, then fsync). Byte-compatible with ``fw_setenv`` (tested), so the simulated bootloader
  can boot from an env that ``fw_setenv`` wrote and the other way round. A torn write corrupts
  only the copy being written; reads fall back to the other, one write behind: a half-written
  env is the previous env, so it never starts a trial nobody finished asking for.
- :class:`FwEnv`: ``fw_printenv``/``fw_setenv`` (libubootenv) with a ``fw_env.config``; each
  write is one ``fw_setenv -s`` script (``name=value`` lines), i.e. one copy written.
- :class:`GrubEnv`: ``grub-editenv`` on a grubenv file. grub-editenv rewrites in place without a
  checksum, so we never run it on the live file: copy, edit the copy, fsync, rename over, fsync
  the directory. GRUB then reads either the old or the new block, never half of one.
- :class:`SimBootloader`: U-Boot's boot counting as packaging/agent/uboot/slotline.env scripts
  it (checked boot by boot on a real U-Boot: tests/agent/test_uboot_qemu.py): each boot with
  ``upgrade_available=1`` stores ``bootcount+1`` (at most 99); with ``upgrade_available=0``
  bootcount reads as 0 (``bootcount_load``); if ``bootcount > bootlimit`` (and bootlimit != 0)
  ``altbootcmd`` runs, which switches ``boot_part`` to the other slot and clears
  ``upgrade_available`` (and keeps bootcount, so the agent sees that a trial happened). A
  corrupt env (both copies) yields the built-in default env, whose ``boot_part`` is the factory
  slot.

The agent's env writes (all one write each, so each is atomic):
``SetBootOnce(s)``: boot_part=s, upgrade_available=1, bootcount=0;
``MarkGood(s)``/``MarkActive(s)``: boot_part=s, upgrade_available=0, bootcount=0;
``MarkBad(s)``: boot_part=other(s), upgrade_available=0, bootcount=0.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import tempfile
import zlib
from collections.abc import Mapping
from pathlib import Path

from agent.adapters.fs import FileSystem, OsFileSystem
from agent.core.commands import MarkActive, MarkBad, MarkGood, SetBootOnce
from agent.core.events import EnvView
from agent.core.states import BootSlot
from agent.errors import BootEnvCorrupt, BootEnvError

BOOTCOUNT_MAX = 99  # U-Boot's shell adds only in hex; the script counts 1..99 by lookup

DEFAULT_ENV: Mapping[str, str] = {
    "boot_part": "a",
    "upgrade_available": "0",
    "bootcount": "0",
    "bootlimit": "3",
}


def env_changes(command: SetBootOnce | MarkGood | MarkBad | MarkActive) -> dict[str, str]:
    """The variables one env command sets (one write, all or nothing)."""
    if isinstance(command, SetBootOnce):
        return {"boot_part": command.slot.value, "upgrade_available": "1", "bootcount": "0"}
    slot = command.slot.other if isinstance(command, MarkBad) else command.slot
    return {"boot_part": slot.value, "upgrade_available": "0", "bootcount": "0"}


def env_view(env: Mapping[str, str]) -> EnvView:
    """Parse the variables the core needs; anything malformed reads as "no trial"."""
    part = env.get("boot_part", "")
    slot = BootSlot(part) if part in ("a", "b") else None
    return EnvView(
        boot_part=slot,
        upgrade_available=env.get("upgrade_available") == "1",
        bootcount=_int(env.get("bootcount")),
        security_version=_int(env.get("security_version")),
    )


def _int(value: str | None) -> int:
    try:
        return max(0, int(value or "0"))
    except ValueError:
        return 0


# --- the U-Boot redundant env format ------------------------------------------------------


def encode_copy(env: Mapping[str, str], size: int, flags: int) -> bytes:
    r"""One env copy: crc32 (LE) of the data area, a flags byte, ``k=v\\0`` pairs, zero padding."""
    body = b"".join(f"{k}={env[k]}".encode() + b"\0" for k in sorted(env)) + b"\0"
    if len(body) > size - 5:
        raise BootEnvError(f"env of {len(body)} B does not fit a {size} B copy")
    data = body + b"\0" * (size - 5 - len(body))
    return struct.pack("<IB", zlib.crc32(data), flags & 0xFF) + data


def decode_copy(raw: bytes) -> tuple[int, dict[str, str]] | None:
    """``(flags, env)`` of a copy, or None if its CRC does not match."""
    if len(raw) < 6:
        return None
    crc, flags = struct.unpack("<IB", raw[:5])
    data = raw[5:]
    if zlib.crc32(data) != crc:
        return None
    env: dict[str, str] = {}
    for item in data.split(b"\0"):
        if not item:
            break
        name, sep, value = item.partition(b"=")
        if sep:
            env[name.decode(errors="replace")] = value.decode(errors="replace")
    return flags, env


def _newer(f0: int, f1: int) -> int:
    """Index of the current copy by flags, U-Boot's rule (env_import_redund, libubootenv too).

    The higher flags byte wins, except that 0 beats 255 (the counter wrapped); equal: copy 0.
    Not serial-number arithmetic: for flags 5 and 200 U-Boot takes 200, so must we (checked on
    a real U-Boot in tests/agent/test_uboot_qemu.py).
    """
    if (f0, f1) == (255, 0):
        return 1
    if (f0, f1) == (0, 255):
        return 0
    return 1 if f1 > f0 else 0


class RedundantEnv:
    """The U-Boot redundant env in one file (copy 0 at offset 0, copy 1 at ``copy_size``).

    ``read`` raises :class:`BootEnvCorrupt` when neither copy is valid; the bootloader then
    uses its default env (see :class:`SimBootloader`).
    """

    def __init__(self, path: str, *, copy_size: int = 0x1000, fs: FileSystem | None = None) -> None:
        self.path = path
        self.copy_size = copy_size
        self._fs = fs or OsFileSystem()

    def _copies(self) -> list[tuple[int, dict[str, str]] | None]:
        if not self._fs.exists(self.path):
            return [None, None]
        h = self._fs.open(self.path, write=False)
        try:
            raw = self._fs.pread(h, 0, 2 * self.copy_size)
        finally:
            self._fs.close(h)
        return [decode_copy(raw[: self.copy_size]), decode_copy(raw[self.copy_size :])]

    def _current(self) -> tuple[int | None, int, dict[str, str]]:
        c = self._copies()
        c0, c1 = c
        if c0 is not None and c1 is not None:
            i = _newer(c0[0], c1[0])
            flags, env = c0 if i == 0 else c1
            return i, flags, env
        for i in (0, 1):
            ci = c[i]
            if ci is not None:
                return i, ci[0], ci[1]
        return None, 0, {}

    def read(self) -> Mapping[str, str]:
        """The current env."""
        index, _, env = self._current()
        if index is None:
            raise BootEnvCorrupt(f"no valid env copy in {self.path}")
        return env

    def write(self, changes: Mapping[str, str]) -> None:
        """Write current+changes into the older copy, then fsync (one atomic switch)."""
        index, flags, env = self._current()
        if index is None:
            env = dict(DEFAULT_ENV)
            target = 0
        else:
            target = 1 - index
        new = {**env, **changes}
        data = encode_copy(new, self.copy_size, flags + 1)
        try:
            h = self._fs.open(self.path, write=True, create=True)
            try:
                self._fs.pwrite(h, target * self.copy_size, data)
                self._fs.fsync(h)
            finally:
                self._fs.close(h)
        except OSError as e:
            raise BootEnvError(f"writing {self.path}: {e}") from e


class FwEnv:
    """``fw_printenv``/``fw_setenv`` with an explicit config (``-c``) and default env (``-f``)."""

    def __init__(
        self, config: str, *, default_env: str | None = None, timeout: float = 10.0
    ) -> None:
        self.config = config
        self.default_env = default_env
        self.timeout = timeout

    def _run(self, argv: list[str], what: str) -> str:
        try:
            done = subprocess.run(
                argv, capture_output=True, text=True, timeout=self.timeout, check=False
            )
        except (OSError, subprocess.TimeoutExpired) as e:
            raise BootEnvError(f"{what}: {e}") from e
        if done.returncode != 0:
            if "Cannot read environment" in done.stderr:
                # libubootenv: neither copy has a valid CRC (rc 243)
                raise BootEnvCorrupt(f"{what}: no valid env copy: {done.stderr.strip()}")
            raise BootEnvError(f"{what}: rc {done.returncode}: {done.stderr.strip()}")
        return done.stdout

    def read(self) -> Mapping[str, str]:
        """All variables (``fw_printenv``); :class:`BootEnvCorrupt` when no copy is valid."""
        argv = ["fw_printenv", "-c", self.config]
        out = self._run(argv, "fw_printenv")
        env: dict[str, str] = {}
        for line in out.splitlines():
            name, sep, value = line.partition("=")
            if sep:
                env[name] = value
        return env

    def write(self, changes: Mapping[str, str]) -> None:
        """One ``fw_setenv -s`` script: every change in one env write."""
        for k, v in changes.items():
            if "=" in k or "\n" in k or "\n" in v or not k:
                raise BootEnvError(f"invalid env variable {k!r}")
        with tempfile.NamedTemporaryFile("w", suffix=".env", delete=False) as f:
            f.write("".join(f"{k}={v}\n" for k, v in changes.items()))
            script = f.name
        try:
            argv = ["fw_setenv", "-c", self.config]
            if self.default_env:
                # blank storage: libubootenv needs a default env to start from (rc 243 without)
                argv += ["-f", self.default_env]
            self._run([*argv, "-s", script], "fw_setenv")
        finally:
            Path(script).unlink(missing_ok=True)


class GrubEnv:
    """A grubenv file edited with ``grub-editenv`` on a copy, then renamed over the original."""

    def __init__(self, path: str, *, timeout: float = 10.0) -> None:
        self.path = path
        self.timeout = timeout

    def _run(self, argv: list[str]) -> str:
        try:
            done = subprocess.run(
                argv, capture_output=True, text=True, timeout=self.timeout, check=False
            )
        except (OSError, subprocess.TimeoutExpired) as e:
            raise BootEnvError(f"grub-editenv: {e}") from e
        if done.returncode != 0:
            raise BootEnvError(f"grub-editenv: rc {done.returncode}: {done.stderr.strip()}")
        return done.stdout

    def read(self) -> Mapping[str, str]:
        """``grub-editenv FILE list``."""
        if not Path(self.path).exists():
            return {}
        env: dict[str, str] = {}
        for line in self._run(["grub-editenv", self.path, "list"]).splitlines():
            name, sep, value = line.partition("=")
            if sep:
                env[name] = value
        return env

    def write(self, changes: Mapping[str, str]) -> None:
        """Edit a copy, fsync, rename over, fsync the directory (never a torn grubenv)."""
        directory = Path(self.path).parent
        tmp = directory / f".{Path(self.path).name}.new"
        try:
            if Path(self.path).exists():
                shutil.copyfile(self.path, tmp)
            else:
                tmp.unlink(missing_ok=True)
                self._run(["grub-editenv", str(tmp), "create"])
            self._run(["grub-editenv", str(tmp), "set", *(f"{k}={v}" for k, v in changes.items())])
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            tmp.replace(self.path)
            OsFileSystem().fsync_dir(str(directory))
        except OSError as e:
            raise BootEnvError(f"writing {self.path}: {e}") from e


class SimBootloader:
    """U-Boot's boot decision over an env (see the module docstring)."""

    def __init__(self, env: RedundantEnv, *, default_env: Mapping[str, str] = DEFAULT_ENV) -> None:
        self.env = env
        self.default_env = dict(default_env)

    def boot(self) -> BootSlot:
        """Run one boot: count it, maybe run altbootcmd, return the slot it boots."""
        try:
            env = dict(self.env.read())
        except BootEnvCorrupt:
            # U-Boot: "bad CRC, using default environment" (nothing is saved)
            env = dict(self.default_env)
        upgrade = _int(env.get("upgrade_available")) != 0
        bootcount = _int(env.get("bootcount")) if upgrade else 0  # bootcount_load
        if upgrade:
            # bootcount_inc -> bootcount_store (saveenv only when upgrading); our U-Boot script
            # (packaging/agent/uboot/slotline.env) counts in decimal up to BOOTCOUNT_MAX
            bootcount = min(bootcount + 1, BOOTCOUNT_MAX)
            env["bootcount"] = str(bootcount)
            self.env.write({"bootcount": str(bootcount)})
        bootlimit = _int(env.get("bootlimit"))
        part = env.get("boot_part", self.default_env["boot_part"])
        if part not in ("a", "b"):
            part = self.default_env["boot_part"]
        if bootlimit and bootcount > bootlimit:
            # altbootcmd: switch to the other slot, stop the trial, keep bootcount as evidence
            part = BootSlot(part).other.value
            self.env.write({"boot_part": part, "upgrade_available": "0"})
        return BootSlot(part)
