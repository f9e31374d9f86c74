"""The .deb builds, carries everything it promises, and its `slotline` runs from the unpacked tree."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="dpkg-deb is not installed"),
]


def test_deb_builds_and_its_command_runs(tmp_path: Path) -> None:
    out = subprocess.run(
        ["sh", "packaging/deb/build-deb.sh", str(tmp_path / "out")],
        cwd=ROOT, capture_output=True, text=True, check=False, timeout=600,
        env={"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin:/usr/sbin:/sbin",
             "PYTHON": sys.executable, "HOME": str(tmp_path)},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    deb = Path(out.stdout.strip().splitlines()[-1])
    info = subprocess.run(["dpkg-deb", "--info", str(deb)], capture_output=True, text=True, check=True)
    assert "Package: slotline" in info.stdout
    assert "Depends: python3" in info.stdout
    contents = subprocess.run(["dpkg-deb", "--contents", str(deb)], capture_output=True, text=True, check=True).stdout
    for path in ("./usr/bin/slotline", "./lib/systemd/system/slotline-agent.service",
                 "./opt/slotline/lib/slotline_cli.py", "./opt/slotline/lib/firmware_bundles/"):
        assert path in contents, path

    tree = tmp_path / "tree"
    subprocess.run(["dpkg-deb", "-x", str(deb), str(tree)], check=True)
    # The wrapper points at /opt/slotline; run the same entry from the unpacked tree instead.
    run = subprocess.run(
        [sys.executable, "-c", "import slotline_cli; slotline_cli.main()", "bundle", "--help"],
        env={"PYTHONPATH": str(tree / "opt/slotline/lib"), "PATH": "/usr/bin:/bin"},
        capture_output=True, text=True, check=False, cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert "keygen" in run.stdout
