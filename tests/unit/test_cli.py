import subprocess
import sys

import pytest

pytestmark = pytest.mark.unit


def run_kpx(*args):
    return subprocess.run([sys.executable, "-m", "kpx", *args], capture_output=True, text=True, timeout=60)


def test_help_lists_commands():
    r = run_kpx("--help")
    assert r.returncode == 0
    assert "COMMAND" in r.stdout


def test_unknown_command_is_one_line_error():
    r = run_kpx("no-such-command")
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "error" in r.stderr
    assert "Traceback" not in r.stderr
