"""CI's skip policy, a pytest plugin that tests/conftest.py loads: with ``BPS_REQUIRE_ALL_TESTS``
set (``.ci/run`` sets it), a session that skipped any test fails.

In CI every test must run, so a test that silently stops running (ComfyUI, Chromium or the
official key list missing) cannot land green. On a developer's machine skips stay visible skips.
"""

from __future__ import annotations

import os

ENV = "BPS_REQUIRE_ALL_TESTS"


def required() -> bool:
    """True when every collected test must run (``BPS_REQUIRE_ALL_TESTS`` set and not 0)."""
    return os.environ.get(ENV, "") not in ("", "0")


def pytest_sessionfinish(session, exitstatus):
    if not required():
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter else []
    if skipped and session.exitstatus == 0:
        if reporter:
            reporter.write_line(f"{ENV} is set and {len(skipped)} test(s) were skipped (reasons above): "
                                f"failing the run", red=True)
        session.exitstatus = 1
