"""The README's first command, at a small size: embedded broker, SQLite, the staged rollout."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_demo_small_pauses_on_the_failing_model(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-c", "import slotline_cli; slotline_cli.main()", "demo",
         "--devices", "40", "--dir", str(tmp_path / "demo"), "--no-progress"],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "What happened" in out.stdout
    assert "paused" in out.stdout
    assert "No device bricked: True" in out.stdout
    assert (tmp_path / "demo" / "report.json").exists()
