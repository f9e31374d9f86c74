"""Fleet scale: one staged rollout at 1,000 / 3,000 / 10,000 virtual devices on this machine.

    .venv/bin/python -m bench.sim_scale                 # 1000 3000 10000
    .venv/bin/python -m bench.sim_scale 1000 3000       # a subset

For each size: the run's own Mosquitto, the controller on SQLite, images of 64 KiB (delta
bundle, 16 KiB chunks), one LAN site, trial group of 10 then 1 %, 10 %, 50 %, 100 %. Reports
wall time (total and rollout), peak RSS of the worker processes per device (slot files are on
disk, not in memory), MQTT messages per second carried by the devices' transports, and, in the
same run against the same broker, the raw Mosquitto rate for QoS1 messages of the same order of
size (``mosquitto_pub``/``mosquitto_sub``, C clients). Writes bench results as JSON next to
the report and a PNG plot when matplotlib is installed.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from simulator import scenario
from simulator.report import counts
from simulator.run import RunOptions, run
from simulator.scenario import Outcome

OUT = Path(".bench-out")

SCENARIO = """
[scenario]
name = "scale-{n}"
seed = 5
timeout = "{timeout}s"

[firmware]
image_size = "64KiB"
chunk_size = "16KiB"
payload = "delta"

[[site]]
name = "lan"

[[fleet]]
count = {n}
hardware = "gw-100"
site = "lan"
tags = ["canary"]

[rollout]
trial = {{ tags = ["canary"], count = 10 }}
phases = [1, 10, 50, 100]
min_successes = 1
max_failure_rate = 2

[expect]
rollout = "finished"
"""


def raw_mosquitto_rate(broker_url: str, messages: int = 20000, size: int = 300) -> float:
    """QoS1 messages/s through the broker, C clients (the physical limit of this machine)."""
    host, port = broker_url.removeprefix("mqtt://").split(":")
    sub = subprocess.Popen(
        ["mosquitto_sub", "-h", host, "-p", port, "-t", "bench/raw", "-q", "1", "-C",
         str(messages), "-V", "mqttv5"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    time.sleep(0.5)
    payload = "x" * size
    start = time.monotonic()
    pub = subprocess.run(
        ["mosquitto_pub", "-h", host, "-p", port, "-t", "bench/raw", "-q", "1", "-V", "mqttv5",
         "-l"], input=(payload + "\n") * messages, text=True, capture_output=True, check=False,
        timeout=300,
    )
    sub.wait(300)
    took = time.monotonic() - start
    if pub.returncode != 0:
        raise RuntimeError(pub.stderr)
    return messages / took


def one(n: int, work: Path) -> dict[str, object]:
    processes = max(1, math.ceil(n / 3500))
    s = scenario.parse(SCENARIO.format(n=n, timeout=max(300, n // 10)), f"scale-{n}")
    opts = RunOptions(work_dir=work / f"n{n}", report_path=OUT / f"sim_scale_{n}.json",
                      processes=processes, connect_timeout=10, progress=False,
                      narrate=lambda step, detail: print(f"  [{n}] {step}: {detail}", flush=True),
                      measure_broker=raw_mosquitto_rate)
    t = time.monotonic()
    result, checks, _ = run(s, opts)
    wall = time.monotonic() - t
    c = counts(result.devices)
    doc = {
        "devices": n,
        "processes": result.processes,
        "wall_seconds": round(wall, 1),
        "rollout_seconds": round(result.rollout_seconds, 1),
        "committed": c[Outcome.COMMITTED],
        "bricked": c[Outcome.BRICKED],
        "rollout_state": result.rollout_state,
        "worker_peak_rss_bytes": result.worker_rss_bytes,
        "rss_per_device_kib": round(result.worker_rss_bytes / n / 1024, 1),
        "messages": result.messages,
        "messages_per_second": round(result.messages / max(result.rollout_seconds, 1e-9)),
        "raw_mosquitto_msgs_per_second": round(result.raw_broker_rate or 0),
        "checks_ok": all(x.ok for x in checks),
    }
    if doc["raw_mosquitto_msgs_per_second"]:
        doc["ratio_to_raw"] = round(doc["messages_per_second"] / doc["raw_mosquitto_msgs_per_second"], 3)
    return doc


def main() -> None:
    if sys.argv[1:] == ["--plot-only"]:  # redraw from the last run's JSON
        plot(json.loads((OUT / "sim_scale.json").read_text()))
        return
    sizes = [int(x) for x in sys.argv[1:]] or [1000, 3000, 10000]
    OUT.mkdir(exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="slotline-bench-"))
    rows = []
    try:
        for n in sizes:
            print(f"== {n} devices", flush=True)
            try:
                row = one(n, work)
            except Exception as e:  # report the largest that worked, and why the next did not
                row = {"devices": n, "error": f"{type(e).__name__}: {e}"}
            print(json.dumps(row), flush=True)
            rows.append(row)
            shutil.rmtree(work / f"n{n}", ignore_errors=True)
            (OUT / "sim_scale.json").write_text(json.dumps(rows, indent=2) + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    plot(rows)


def plot(rows: list[dict[str, object]]) -> None:
    ok = [r for r in rows if "error" not in r]
    try:
        import matplotlib as mpl  # noqa: PLC0415

        mpl.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        print("matplotlib not installed: table only")
        return
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.5))
    xs = [r["devices"] for r in ok]
    ys = [r["rollout_seconds"] for r in ok]
    # Least-squares line through the origin: "linear" means the points sit on it.
    slope = sum(x * y for x, y in zip(xs, ys, strict=True)) / sum(x * x for x in xs)
    top = max(xs)
    ax[0].plot(xs, ys, "o", label="measured")
    ax[0].plot([0, top], [0, slope * top], "--", label=f"linear: {slope * 1000:.1f} ms/device")
    ax[0].set_xlabel("devices")
    ax[0].set_ylabel("rollout wall time (s)")
    ax[0].legend()
    ax[1].plot(xs, [r["worker_peak_rss_bytes"] / 2**20 for r in ok], "o-", label="all workers")
    ax[1].set_xlabel("devices")
    ax[1].set_ylabel("worker peak RSS (MiB)")
    ax[1].legend()
    fig.suptitle("Slotline simulator: one staged rollout, real agents, one 2-core machine")
    fig.tight_layout()
    fig.savefig(Path("docs/benchmarks/simulator-scale.png"), dpi=100)


if __name__ == "__main__":
    main()
