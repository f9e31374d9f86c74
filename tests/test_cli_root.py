import subprocess
import sys


def test_help_lists_every_group_without_importing_them() -> None:
    out = subprocess.run(
        [sys.executable, "-c", "import slotline_cli, sys; slotline_cli.cli(['--help'])"],
        capture_output=True, text=True, check=False,
    )
    assert out.returncode == 0, out.stderr
    for group in ("bundle", "agent", "controller", "rollout", "sim", "demo"):
        assert group in out.stdout


def test_help_does_not_import_fastapi() -> None:
    code = (
        "import sys, slotline_cli\n"
        "try:\n    slotline_cli.cli(['--help'])\nexcept SystemExit:\n    pass\n"
        "print('fastapi' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().endswith("False")
