"""bench/ablation_mini.py's bookkeeping: diversity measure and the report (no training needed)."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ablation = pytest.importorskip("bench.ablation_mini", reason="bench/ablation_mini.py needs torch")


def test_pairwise_distance_is_zero_for_copies_and_the_rms_otherwise():
    a = np.zeros((4, 4, 3))
    assert ablation._pairwise_distance(np.stack([a, a, a])) == 0.0
    b = np.full((4, 4, 3), 0.5)
    # three pictures, three pairs: (a, a) 0, (a, b) 0.5, (a, b) 0.5
    assert ablation._pairwise_distance(np.stack([a, a, b])) == pytest.approx(1 / 3)


def test_report_of_the_recorded_run_lists_every_mode_next_to_the_paper():
    recorded = json.loads((ROOT / "bench" / "results" / "ablation_mini.json").read_text())
    text = ablation.report(recorded)
    assert text == (ROOT / "bench" / "results" / "ablation_mini.md").read_text()
    for label, _, _ in ablation.MODES:
        assert f"| {label} |" in text
    for label, miou in ablation.PAPER_MIOU.items():
        assert f"| {label} |" in text and f"{miou:.3f}" in text
