"""The codecs compared by bench/delta_bench.py: how each one encodes and applies.

Each tool gives argv lists; ``{old} {new} {patch} {out}`` are filled in. Python-based tools run
through ``bench.peers.pyrun`` so their times exclude interpreter start and imports; command-line
tools are timed as whole processes (a C binary starts in milliseconds).
"""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class Tool:
    name: str
    encode: list[str]
    apply: list[str]
    timed_inside: bool  # prints {"seconds": ...} itself
    needs: str | None = None  # an executable that must be on PATH

    def available(self) -> bool:
        return self.needs is None or shutil.which(self.needs) is not None


def _py(op: str, tool: str, a: str, b: str) -> list[str]:
    return [sys.executable, "-m", "bench.peers.pyrun", op, tool, a, b, "{out_or_patch}"]


def _zstd_long(old_size: int, new_size: int) -> int:
    # --patch-from needs a window covering the old image plus the new one.
    return max(10, min(31, (old_size + new_size - 1).bit_length()))


def tools(old_size: int, new_size: int) -> list[Tool]:
    long_ = _zstd_long(old_size, new_size)
    xd_source = max(1 << 24, 1 << (max(old_size, 1) - 1).bit_length())
    return [
        Tool("ours", _py("encode", "ours", "{old}", "{new}"),
             _py("apply", "ours", "{old}", "{patch}"), timed_inside=True),
        Tool("hdiffpatch-lzma", _py("encode", "hdiffpatch-lzma", "{old}", "{new}"),
             _py("apply", "hdiffpatch-lzma", "{old}", "{patch}"), timed_inside=True),
        Tool("hdiffpatch-zstd", _py("encode", "hdiffpatch-zstd", "{old}", "{new}"),
             _py("apply", "hdiffpatch-zstd", "{old}", "{patch}"), timed_inside=True),
        Tool("detools-hdiffpatch", _py("encode", "detools-hdiffpatch", "{old}", "{new}"),
             _py("apply", "detools-hdiffpatch", "{old}", "{patch}"), timed_inside=True),
        Tool("detools-sequential", _py("encode", "detools-sequential", "{old}", "{new}"),
             _py("apply", "detools-sequential", "{old}", "{patch}"), timed_inside=True),
        Tool("zstd-patch-from",
             ["zstd", "-q", "-f", "-19", f"--long={long_}", "--patch-from={old}", "{new}",
              "-o", "{out_or_patch}"],
             ["zstd", "-q", "-f", "-d", f"--long={long_}", f"--memory={1 << long_}",
              "--patch-from={old}", "{patch}", "-o", "{out_or_patch}"],
             timed_inside=False, needs="zstd"),
        Tool("xdelta3",
             ["xdelta3", "-f", "-9", "-B", str(xd_source), "-e", "-s", "{old}", "{new}",
              "{out_or_patch}"],
             ["xdelta3", "-f", "-B", str(xd_source), "-d", "-s", "{old}", "{patch}",
              "{out_or_patch}"],
             timed_inside=False, needs="xdelta3"),
        Tool("bsdiff", ["bsdiff", "{old}", "{new}", "{out_or_patch}"],
             ["bspatch", "{old}", "{out_or_patch}", "{patch}"],
             timed_inside=False, needs="bsdiff"),
    ]


def fill(argv: list[str], **paths: str) -> list[str]:
    return [a.format(**paths) for a in argv]
