"""What compatibility checkers outside this project report about the pack, on the host under test.

comfy-import-guard predicts custom-node breakage from ``comfy.*`` names that a ComfyUI version no
longer has, and feeds the compatibility board people read before updating ComfyUI. It reads every
Python file of a pack, tests included, so a test helper named like a ComfyUI module (once a fixture
called ``comfy``) reads as a broken import. It runs here offline against a git snapshot of the
ComfyUI tree the suite runs on (COMFYUI_PATH), so both CI hosts check it. ``comfy node validate``
(comfy-cli, what the Comfy Registry runs before publishing) is a step of .ci/run: comfy-cli pins
versions of common packages that ComfyUI's own requirements also pin, so it has a venv of its own.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import comfy_host

GIT = ["git", "-c", "user.name=bps-tests", "-c", "user.email=bps-tests@localhost", "-c", "core.autocrlf=false"]


def _snapshot(comfyui, cache_dir):
    """A git repository holding ``comfyui`` as one commit at ``cache_dir/ComfyUI`` (where the guard
    looks for its clone); the files stay where they are (``--work-tree``)."""
    repo = cache_dir / "ComfyUI"
    repo.mkdir(parents=True)
    git = [*GIT, f"--git-dir={repo / '.git'}", f"--work-tree={comfyui}"]
    subprocess.run([*GIT, "init", "-q", str(repo)], check=True)
    subprocess.run([*git, "add", "-A", "."], check=True, cwd=comfyui)
    subprocess.run([*git, "commit", "-q", "-m", "host under test"], check=True, cwd=comfyui)


def test_comfy_import_guard_reports_the_pack_safe_on_this_comfyui(tmp_path):
    comfyui = comfy_host.comfyui_path()
    if comfyui is None:
        pytest.skip(comfy_host.SKIP_REASON)
    _snapshot(comfyui, tmp_path / "cache")
    install = tmp_path / "install"
    (install / "custom_nodes").mkdir(parents=True)
    (install / "custom_nodes" / "ComfyUI-BPS").symlink_to(comfy_host.ROOT, target_is_directory=True)

    run = subprocess.run(
        [sys.executable, "-c", "import sys; from comfy_import_guard.cli import main; sys.exit(main())",
         "--offline", "--json", "--quiet", "--cache-dir", str(tmp_path / "cache"),
         "check", "--comfy-dir", str(install), "--target", "HEAD", "--no-update"],
        capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, f"comfy-import-guard failed ({run.returncode}):\n{run.stdout}\n{run.stderr}"
    report = json.loads(run.stdout)
    (pack,) = report["packs"]
    assert pack["python_files"] > 50, pack  # it read the pack (nodes, bps, train, tests), not an empty folder
    problems = {k: pack[k] for k in ("breaking", "unresolvable", "signature_drift", "unparseable")}
    # A guarded reference (try/except AttributeError) to a name this ComfyUI lacks is a "soft"
    # warning: the one place allowed to feature-test ComfyUI is nodes/comfy_compat.py (on 0.8.0 it
    # looks for names 0.33 added; on 0.33 there are none).
    problems["soft outside nodes/comfy_compat.py"] = [r for r in pack["soft"] if r["file"] != "nodes/comfy_compat.py"]
    assert pack["verdict"] in ("SAFE", "WARN") and not any(problems.values()), \
        f"comfy-import-guard says {pack['verdict']}: {json.dumps(problems, indent=1)}"
