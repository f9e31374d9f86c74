"""Delta codec benchmark: ours against every peer, side by side, in one run.

    python -m bench.delta_bench [--corpus DIR] [--pairs numpy-multiarray duckdb ...]
                                [--tools ours zstd-patch-from ...] [--synthetic-gib 1]
                                [--timeout 300] [--out docs/benchmarks/delta.md]

For every pair of the corpus (``../shared/corpus/fetch.sh .corpus-cache`` makes it) and every
tool: encode (size, time), apply in a child process (time, peak RSS as VmHWM),
and check the output against the new image's sha256. Python tools time themselves after their
imports (bench/peers/pyrun.py); command-line tools are timed as processes. A tool that runs past
``--timeout`` is killed and reported as a timeout. ``--synthetic-gib`` adds generated pairs of
64 MiB, 256 MiB, ... up to that size, applied by our codec only, to show apply RSS staying flat.
Raw results go to .bench-out/delta-results.json; the report to ``--out``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from bench.peers.tools import Tool, fill, tools

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / ".bench-out"


@dataclass
class Run:
    ok: bool
    seconds: float
    rss_kib: int
    note: str = ""


@dataclass
class Result:
    pair: str
    tool: str
    old_size: int
    new_size: int
    patch_size: int | None
    encode: Run | None
    apply: Run | None


GNU_TIME = "/usr/bin/time"


def run_child(argv: list[str], timeout: float) -> tuple[Run, str]:
    """Run argv, return its wall time, peak RSS and stdout.

    Peak RSS: wait4's ru_maxrss carries this process's RSS into the child across fork and exec,
    so command-line tools run under GNU time (a tiny process whose own child's ru_maxrss is
    then exact) and Python tools report their VmHWM themselves (see ``_timed``).
    """
    use_time = Path(GNU_TIME).exists() and "bench.peers.pyrun" not in argv
    if use_time:
        argv = [GNU_TIME, "-f", "MAXRSS_KIB %M", *argv]
    t0 = time.perf_counter()
    with subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          start_new_session=True) as proc:
        deadline = t0 + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() > deadline:
                os.killpg(proc.pid, signal.SIGKILL)
                _, status, usage = os.wait4(proc.pid, 0)
                proc.returncode = -9
                return Run(ok=False, seconds=time.perf_counter() - t0, rss_kib=usage.ru_maxrss,
                           note=f"timeout after {timeout:.0f} s"), ""
            time.sleep(0.02)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out = proc.stdout.read().decode() if proc.stdout else ""
        err = proc.stderr.read().decode() if proc.stderr else ""
    if proc.returncode != 0:
        return Run(ok=False, seconds=wall, rss_kib=usage.ru_maxrss,
                   note=f"exit {proc.returncode}: {err.strip()[-200:]}"), out
    rss = usage.ru_maxrss
    if use_time:
        for line in err.splitlines():
            if line.startswith("MAXRSS_KIB "):
                rss = int(line.split()[1])
    return Run(ok=True, seconds=wall, rss_kib=rss), out


def _timed(run: Run, out: str, inside: bool) -> Run:
    if run.ok and inside:
        for line in out.splitlines():
            if line.startswith("{"):
                report = json.loads(line)
                run.seconds = report["seconds"]
                run.rss_kib = report["rss_kib"] or run.rss_kib
    return run


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def bench_pair(name: str, old: Path, new: Path, chosen: list[Tool], timeout: float) -> list[Result]:
    results = []
    want = sha256_file(new)
    for tool in chosen:
        patch = WORK / f"{name}.{tool.name}.patch"
        out = WORK / f"{name}.{tool.name}.out"
        for p in (patch, out):
            p.unlink(missing_ok=True)
        print(f"[{name}] {tool.name}: encode", flush=True)
        enc, stdout = run_child(fill(tool.encode, old=str(old), new=str(new), patch=str(patch),
                                     out_or_patch=str(patch)), timeout)
        enc = _timed(enc, stdout, tool.timed_inside)
        res = Result(name, tool.name, old.stat().st_size, new.stat().st_size, None, enc, None)
        if enc.ok:
            res.patch_size = patch.stat().st_size
            print(f"[{name}] {tool.name}: {res.patch_size} bytes in {enc.seconds:.1f} s; apply",
                  flush=True)
            app, stdout = run_child(fill(tool.apply, old=str(old), patch=str(patch),
                                         out_or_patch=str(out)), timeout)
            app = _timed(app, stdout, tool.timed_inside)
            if app.ok and sha256_file(out) != want:
                app.ok, app.note = False, "output differs from the new image"
            res.apply = app
        else:
            print(f"[{name}] {tool.name}: {enc.note}", flush=True)
        results.append(res)
        for p in (patch, out):
            p.unlink(missing_ok=True)
    return results


def corpus_pairs(corpus: Path) -> list[tuple[str, Path, Path]]:
    manifest = corpus / "MANIFEST.tsv"
    if not manifest.exists():
        raise SystemExit(f"{manifest} missing: run ../shared/corpus/fetch.sh .corpus-cache")
    pairs = []
    for line in manifest.read_text().splitlines()[1:]:
        name, old, new = line.split("\t")[:3]
        pairs.append((name, corpus / old, corpus / new))
    return pairs


def machine_note() -> str:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    versions = []
    for argv in (["zstd", "--version"], ["xdelta3", "-V"]):
        try:
            r = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
            versions.append((r.stdout + r.stderr).strip().splitlines()[0])
        except (OSError, IndexError):
            pass
    try:
        from importlib.metadata import version  # noqa: PLC0415
        versions += [f"hdiffpatch {version('hdiffpatch')}", f"detools {version('detools')}"]
    except Exception:
        pass
    return (f"{os.cpu_count()} cores ({cpu}), {mem:.0f} GiB RAM, shared with other work; "
            f"Python {platform.python_version()}; " + "; ".join(versions))


def _fmt_size(n: int | None) -> str:
    return f"{n:,}" if n is not None else "-"


def _ratio(a: float | None, b: float | None, digits: int = 2) -> str:
    if a is None or b is None or b == 0:
        return "-"
    return f"{a / b:.{digits}f}"


def _ok(r: Result | None) -> bool:
    return bool(r and r.encode and r.encode.ok and r.apply and r.apply.ok)


def targets(by_pair: dict[str, list[Result]]) -> list[str]:
    """The issue's goals per pair: met or not, with the figures."""
    header = ("| pair | size <= best peer | encode <= detools-hdiffpatch | apply RSS <= 64 MiB "
              "| apply speed >= 1/2 zstd patch-from (pairs >= 10 MB) |")
    lines = ["## Targets (issue 3)", "", header, "|---|---|---|---|---|"]
    for pair, rs in by_pair.items():
        ours = next((r for r in rs if r.tool == "ours"), None)
        if not _ok(ours):
            lines.append(f"| {pair} | ours failed | | | |")
            continue
        assert ours is not None
        assert ours.encode is not None
        assert ours.apply is not None
        assert ours.patch_size is not None
        peers = [r for r in rs if r.tool != "ours" and _ok(r) and r.patch_size]
        best = min(peers, key=lambda r: r.patch_size or 0, default=None)
        size = (f"{'yes' if ours.patch_size <= (best.patch_size or 0) else 'NO'}: "
                f"{ours.patch_size:,} vs {best.tool} {best.patch_size:,}" if best else "-")
        det = next((r for r in peers if r.tool == "detools-hdiffpatch"), None)
        enc = (f"{'yes' if ours.encode.seconds <= det.encode.seconds else 'NO'}: "
               f"{ours.encode.seconds:.1f} s vs {det.encode.seconds:.1f} s"
               if det and det.encode else "-")
        rss = ours.apply.rss_kib / 1024
        mem = f"{'yes' if rss <= 64 else 'NO'}: {rss:.0f} MiB"
        zstd = next((r for r in peers if r.tool == "zstd-patch-from"), None)
        if zstd and zstd.apply and ours.new_size >= 10_000_000:
            ratio = zstd.apply.seconds / ours.apply.seconds
            speed = (f"{'yes' if ratio >= 0.5 else 'NO'}: ours {ours.apply.seconds:.2f} s, "
                     f"zstd {zstd.apply.seconds:.2f} s (ours at {ratio:.2f}x zstd's speed)")
        else:
            speed = "n/a (under 10 MB)" if ours.new_size < 10_000_000 else "-"
        lines.append(f"| {pair} | {size} | {enc} | {mem} | {speed} |")
    lines.append("")
    return lines


def render(results: list[Result], synth: list[Result], command: str, note: str) -> str:
    legend = ("Sizes in bytes (ours: the chunk container, 16 bytes per chunk included). Encode: "
              "seconds. Apply: seconds of work (Python tools time themselves after imports; "
              "command-line tools are timed as processes) and peak RSS of the apply process in "
              "MiB (interpreter included; Python tools report their VmHWM at exit, command-line "
              "tools run under GNU time; plain wait4 ru_maxrss is not used because Linux "
              "carries the benchmark process's RSS into it across fork and exec). Ratios are ours / peer "
              "(below 1 is better for us). Every apply output was checked against the new "
              "image's sha256.")
    lines = ["# Delta codec benchmark", "",
             f"Command: `{command}`", "", f"Machine: {note}", "", legend, ""]
    by_pair: dict[str, list[Result]] = {}
    for r in results:
        by_pair.setdefault(r.pair, []).append(r)
    for pair, rs in by_pair.items():
        ours = next((r for r in rs if r.tool == "ours"), None)
        header = ("| tool | size | % of new | encode s | apply s | apply MiB/s | apply RSS MiB "
                  "| size ours/peer | encode ours/peer | apply s ours/peer | note |")
        lines += [f"## {pair} (old {rs[0].old_size:,} B, new {rs[0].new_size:,} B)", "", header,
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for r in rs:
            enc_s = r.encode.seconds if r.encode and r.encode.ok else None
            app_s = r.apply.seconds if r.apply and r.apply.ok else None
            rss = r.apply.rss_kib / 1024 if r.apply else None
            speed = r.new_size / app_s / 2**20 if app_s else None
            note = (r.encode.note if r.encode and not r.encode.ok else
                    (r.apply.note if r.apply and not r.apply.ok else ""))
            o_enc = ours.encode.seconds if ours and ours.encode and ours.encode.ok else None
            o_app = ours.apply.seconds if ours and ours.apply and ours.apply.ok else None
            pct = f"{100 * r.patch_size / r.new_size:.2f}" if r.patch_size else "-"
            lines.append(
                f"| {r.tool} | {_fmt_size(r.patch_size)} | {pct} | "
                f"{enc_s:.2f} | " if enc_s is not None else
                f"| {r.tool} | {_fmt_size(r.patch_size)} | {pct} | - | ")
            lines[-1] += (f"{app_s:.2f} | " if app_s is not None else "- | ")
            lines[-1] += (f"{speed:.0f} | " if speed else "- | ")
            lines[-1] += (f"{rss:.0f} | " if rss is not None and app_s is not None else "- | ")
            lines[-1] += (f"{_ratio(ours.patch_size if ours else None, r.patch_size, 3)} | "
                          f"{_ratio(o_enc, enc_s)} | {_ratio(o_app, app_s)} | {note} |")
        lines.append("")
    lines += targets(by_pair)
    if synth:
        lines += ["## Apply memory as the image grows (synthetic pairs, ours only)", "",
                  "| new image | delta size | encode s | apply s | apply MiB/s | apply RSS MiB |",
                  "|---:|---:|---:|---:|---:|---:|"]
        for r in synth:
            app_s = r.apply.seconds if r.apply and r.apply.ok else None
            lines.append(
                f"| {r.new_size / 2**20:.0f} MiB | {_fmt_size(r.patch_size)} | "
                f"{r.encode.seconds:.1f} | " + (f"{app_s:.2f} | {r.new_size / app_s / 2**20:.0f} | "
                                                f"{r.apply.rss_kib / 1024:.0f} |"
                                                if app_s else f"- | - | - | {r.apply.note if r.apply else r.encode.note}"))
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--corpus", type=Path, default=ROOT / ".corpus-cache" / "pairs")
    ap.add_argument("--pairs", nargs="*", help="pair names (default: all)")
    ap.add_argument("--tools", nargs="*", help="tool names (default: all available)")
    ap.add_argument("--timeout", type=float, default=300.0)
    ap.add_argument("--synthetic-gib", type=float, default=0.0)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks" / "delta.md")
    args = ap.parse_args(argv)
    WORK.mkdir(exist_ok=True)
    results: list[Result] = []
    for name, old, new in corpus_pairs(args.corpus):
        if args.pairs and name not in args.pairs:
            continue
        chosen = [t for t in tools(old.stat().st_size, new.stat().st_size)
                  if t.available() and (not args.tools or t.name in args.tools)]
        results += bench_pair(name, old, new, chosen, args.timeout)
        (WORK / "delta-results.json").write_text(json.dumps([asdict(r) for r in results], indent=1))
    synth: list[Result] = []
    if args.synthetic_gib:
        size = 64 << 20
        while size <= args.synthetic_gib * (1 << 30):
            # Made in a child process: this one stays small, so its RSS never leaks into the
            # figures of the processes it starts.
            made = subprocess.run([sys.executable, "-m", "bench.delta_synth", str(WORK), str(size)],
                                  cwd=ROOT, check=True, capture_output=True, text=True)
            old, new = (Path(p) for p in made.stdout.split())
            ours = [t for t in tools(size, size) if t.name == "ours"]
            synth += bench_pair(f"synthetic-{size >> 20}MiB", old, new, ours, args.timeout * 4)
            for p in (old, new):
                p.unlink(missing_ok=True)
            size *= 4
        (WORK / "delta-synthetic.json").write_text(json.dumps([asdict(r) for r in synth], indent=1))
    command = "python -m bench.delta_bench " + shlex.join(
        a if not a.startswith(str(ROOT)) else os.path.relpath(a, ROOT) for a in (argv or sys.argv[1:]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(render(results, synth, command.strip(), machine_note()) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
