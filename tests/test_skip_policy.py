"""The skip policy that .ci/run relies on: with BPS_REQUIRE_ALL_TESTS set a skip fails the run;
without it a skip is a visible skip and the run passes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent


def _pytest(tmp_path: Path, body: str, require: str | None) -> subprocess.CompletedProcess:
    (tmp_path / "test_sample.py").write_text(body)
    env = {k: v for k, v in os.environ.items() if k != "BPS_REQUIRE_ALL_TESTS"}
    if require is not None:
        env["BPS_REQUIRE_ALL_TESTS"] = require
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "skip_policy", "-q", "-rs", "-p", "no:cacheprovider",
                           str(tmp_path)], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)


SKIPPING = "import pytest\n\ndef test_runs():\n    pass\n\ndef test_skips():\n    pytest.skip('no ComfyUI here')\n"


@pytest.mark.parametrize("require, code", [("1", 1), (None, 0), ("0", 0)])
def test_a_skip_fails_the_run_only_when_every_test_is_required(tmp_path, require, code):
    run = _pytest(tmp_path, SKIPPING, require)
    assert run.returncode == code, run.stdout + run.stderr
    assert "no ComfyUI here" in run.stdout  # the reason is shown either way
    if code:
        assert "BPS_REQUIRE_ALL_TESTS is set and 1 test(s) were skipped" in run.stdout


def test_a_run_without_skips_passes_when_every_test_is_required(tmp_path):
    run = _pytest(tmp_path, "def test_runs():\n    pass\n", "1")
    assert run.returncode == 0, run.stdout + run.stderr


def test_failures_keep_their_own_exit_code(tmp_path):
    run = _pytest(tmp_path, SKIPPING + "\ndef test_fails():\n    assert False\n", "1")
    assert run.returncode == 1 and "1 failed" in run.stdout
