"""Run one Python-based codec in-process and time only the work (interpreter start and imports
excluded): ``python -m bench.peers.pyrun {encode|apply} TOOL A B OUT``.

encode: A=old, B=new, OUT=patch.  apply: A=old, B=patch, OUT=new.
Prints one JSON line ``{"seconds": ..., "rss_kib": ...}`` (work time, VmHWM).
"""

# ruff: noqa: PLC0415  (each tool imports only its own library, so one run measures one codec)
from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def _ours_encode(old: Path, new: Path, out: Path) -> None:
    from bench.peers.container import write_chunks
    from firmware_bundles.delta import encode_delta

    with out.open("wb") as f:
        write_chunks(f, encode_delta(old, new))


def _ours_apply(old: Path, patch: Path, out: Path) -> None:
    # The device path: chunks decoded ahead on two threads within the codec's in-flight
    # memory budget (delta.decode_chunks), base read with pread, output streamed in order.
    from bench.peers.container import read_chunks
    from firmware_bundles.delta import FileBaseReader, decode_chunks

    with FileBaseReader(old) as base, patch.open("rb") as src, out.open("wb") as dst:
        for piece in decode_chunks(read_chunks(src), base):
            dst.write(piece)


def _hdp_config(kind: str):
    import hdiffpatch

    if kind == "lzma":
        return hdiffpatch.LzmaConfig(level=9)
    return hdiffpatch.ZStdConfig(level=19)


def _hdp_encode(kind: str, old: Path, new: Path, out: Path) -> None:
    import hdiffpatch

    out.write_bytes(hdiffpatch.diff(old.read_bytes(), new.read_bytes(), _hdp_config(kind),
                                    validate=False))


def _hdp_apply(old: Path, patch: Path, out: Path) -> None:
    import hdiffpatch

    out.write_bytes(hdiffpatch.apply(old.read_bytes(), patch.read_bytes()))


def _detools_encode(patch_type: str, old: Path, new: Path, out: Path) -> None:
    import detools

    algorithm = "hdiffpatch" if patch_type == "hdiffpatch" else "bsdiff"
    with old.open("rb") as a, new.open("rb") as b, out.open("wb") as p:
        detools.create_patch(a, b, p, compression="lzma", patch_type=patch_type,
                             algorithm=algorithm)


def _detools_apply(old: Path, patch: Path, out: Path) -> None:
    import detools

    with old.open("rb") as a, patch.open("rb") as p, out.open("wb") as b:
        detools.apply_patch(a, p, b)


def main(argv: list[str]) -> None:
    op, tool, a, b, out = argv
    pa, pb, po = Path(a), Path(b), Path(out)
    # Import first so the timed region is the work only.
    if tool == "ours":
        import firmware_bundles.delta
        if op == "encode":  # the encoder imports its matchers lazily (kept off the apply path)
            import hdiffpatch
            import pydivsufsort  # noqa: F401

            import firmware_bundles.codec.encoder
            import firmware_bundles.codec.matcher
            import firmware_bundles.codec.sa_matcher  # noqa: F401
        fn = _ours_encode if op == "encode" else _ours_apply
        run = lambda: fn(pa, pb, po)  # noqa: E731
    elif tool.startswith("hdiffpatch-"):
        import hdiffpatch  # noqa: F401
        kind = tool.split("-", 1)[1]
        run = (lambda: _hdp_encode(kind, pa, pb, po)) if op == "encode" else (
            lambda: _hdp_apply(pa, pb, po))
    elif tool.startswith("detools-"):
        import detools  # noqa: F401
        patch_type = tool.split("-", 1)[1]
        run = (lambda: _detools_encode(patch_type, pa, pb, po)) if op == "encode" else (
            lambda: _detools_apply(pa, pb, po))
    else:
        raise SystemExit(f"unknown tool {tool}")
    t0 = time.perf_counter()
    run()
    seconds = time.perf_counter() - t0
    print(json.dumps({"seconds": seconds, "rss_kib": _vm_hwm()}))


def _vm_hwm() -> int:
    """Peak RSS of this process (VmHWM: per address space, so exact after exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


if __name__ == "__main__":
    main(sys.argv[1:])
