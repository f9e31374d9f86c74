# ruff: noqa: INP001
r"""Build U-Boot env images from Slotline's env sources (``slotline.env`` and a board env).

Source format: ``name=value`` lines; a line starting with whitespace continues the previous
value (joined with one space, so scripts can be written one command a line); lines starting
with ``#`` and blank lines are skipped. Later files override earlier ones, name by name.

Outputs:
- ``flat``: ``name=value`` lines, the input of ``fw_setenv -s``/``-f`` and ``mkenvimage``;
- ``redundant``: two copies of ``--copy-size`` bytes as our agent writes them
  (:func:`agent.adapters.bootenv.encode_copy`: crc32 LE, flags byte, ``k=v\\0`` pairs); copy 0
  holds the env with flags 1, copy 1 is blank (invalid), like a first ``RedundantEnv.write``;
- ``single``: one non-redundant copy (crc32 LE + data, no flags byte) of ``--size`` bytes,
  padded to ``--pad`` bytes: U-Boot's env in NOR flash (the QEMU harness's board env).

Usage: ``python mkenv.py redundant -o env.img slotline.env board.env``.
"""

from __future__ import annotations

import argparse
import struct
import sys
import zlib
from pathlib import Path

from agent.adapters.bootenv import encode_copy


def parse(text: str, *, origin: str = "<env>") -> dict[str, str]:
    """Parse one env source (see the module docstring)."""
    env: dict[str, str] = {}
    name: str | None = None
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if line[0] in " \t":
            if name is None:
                raise ValueError(f"{origin}:{number}: continuation line before any variable")
            env[name] = f"{env[name]} {line.strip()}".strip()
            continue
        name, sep, value = line.partition("=")
        if not sep or not name or any(c in name for c in " \t"):
            raise ValueError(f"{origin}:{number}: expected name=value")
        env[name] = value.strip()
    return env


def load(paths: list[str]) -> dict[str, str]:
    """Merge env sources, later ones overriding earlier ones."""
    env: dict[str, str] = {}
    for path in paths:
        env.update(parse(Path(path).read_text(encoding="utf-8"), origin=path))
    return env


def flat(env: dict[str, str]) -> str:
    """``name=value`` lines (``fw_setenv -s`` input)."""
    return "".join(f"{k}={v}\n" for k, v in env.items())


def redundant_image(env: dict[str, str], copy_size: int) -> bytes:
    """Copy 0 valid with flags 1, copy 1 blank: what the agent's first write leaves."""
    return encode_copy(env, copy_size, 1) + b"\0" * copy_size


def single_image(env: dict[str, str], size: int, pad: int = 0) -> bytes:
    """A non-redundant env (crc32 LE over the data area, then the data), zero padded."""
    body = b"".join(f"{k}={env[k]}".encode() + b"\0" for k in sorted(env)) + b"\0"
    if len(body) > size - 4:
        raise ValueError(f"env of {len(body)} B does not fit {size} B")
    data = body + b"\0" * (size - 4 - len(body))
    image = struct.pack("<I", zlib.crc32(data)) + data
    return image + b"\0" * max(0, pad - len(image))


def main(argv: list[str] | None = None) -> int:
    """Command line: ``flat|redundant|single [-o OUT] SOURCES...``."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("kind", choices=["flat", "redundant", "single"])
    p.add_argument("sources", nargs="+")
    p.add_argument("-o", "--output", default="-")
    p.add_argument("--copy-size", type=lambda s: int(s, 0), default=0x1000)
    p.add_argument("--size", type=lambda s: int(s, 0), default=0x40000)
    p.add_argument("--pad", type=lambda s: int(s, 0), default=0)
    args = p.parse_args(argv)
    env = load(args.sources)
    if args.kind == "flat":
        out = flat(env).encode()
    elif args.kind == "redundant":
        out = redundant_image(env, args.copy_size)
    else:
        out = single_image(env, args.size, args.pad)
    if args.output == "-":
        sys.stdout.buffer.write(out)
    else:
        Path(args.output).write_bytes(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
