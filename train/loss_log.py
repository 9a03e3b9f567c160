"""Per-step loss log (CSV) and the loss-curve picture drawn at the end (opencv, no matplotlib).

Besides the training loss, a validation step (``--validate-every``) records the held-fixed
own-/swapped-condition eps-MSE of :mod:`train.condition_gap` in the ``eps_own``, ``eps_swapped``
and ``eps_base`` columns (empty on other steps), and the curve shows them: a run that learns its
condition drives ``eps_own`` below ``eps_swapped``.
"""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path

import cv2
import numpy as np

COLUMNS = ("step", "loss", "lr", "seconds", "samples_per_second")
#: Validation columns: eps-MSE with each pair's own condition, a swapped one, and the base alone.
GAP_COLUMNS = ("eps_own", "eps_swapped", "eps_base")


def _format_row(step: int, loss: float, lr: float, seconds: float, speed: float,
                gap: dict[str, float] | None = None) -> list:
    gap = gap or {}
    return [int(step), f"{loss:.6f}", f"{lr:.3e}", f"{seconds:.3f}", f"{speed:.3f}",
            *(f"{gap[c]:.6f}" if gap.get(c) is not None else "" for c in GAP_COLUMNS)]


class LossLog:
    """Appends one CSV row per optimizer step; on resume drops rows past the checkpoint's step."""

    def __init__(self, path: str | Path, resume_step: int | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        rows = read_loss_log(self.path) if resume_step is not None and self.path.is_file() else []
        rows = [r for r in rows if r["step"] <= (resume_step or 0)]
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(COLUMNS + GAP_COLUMNS)
            for r in rows:
                writer.writerow(_format_row(r["step"], r["loss"], r["lr"], r["seconds"], r["samples_per_second"], r))
        os.replace(tmp, self.path)
        self._file = open(self.path, "a", newline="")
        self._writer = csv.writer(self._file)

    def append(self, step: int, loss: float, lr: float, seconds: float, samples_per_second: float,
               gap: dict[str, float] | None = None) -> None:
        """Record one optimizer step; ``gap`` holds the validation columns (``GAP_COLUMNS``) on a
        validation step."""
        self._writer.writerow(_format_row(step, loss, lr, seconds, samples_per_second, gap))
        self._file.flush()

    def close(self) -> None:
        """Close the file."""
        self._file.close()


def _optional(text: str | None) -> float | None:
    try:
        return float(text) if text not in (None, "") else None
    except ValueError:
        return None


def read_loss_log(path: str | Path) -> list[dict[str, float | None]]:
    """Rows of a loss CSV as dicts (step as int, the rest as float; the validation columns None
    on steps without validation and in logs written before they existed)."""
    rows = []
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            try:
                row = {"step": int(r["step"]), **{c: float(r[c]) for c in COLUMNS[1:]}}
            except (KeyError, TypeError, ValueError):
                continue
            rows.append({**row, **{c: _optional(r.get(c)) for c in GAP_COLUMNS}})
    return rows


def gap_series(rows: list[dict[str, float | None]]) -> dict[str, tuple[list[int], list[float]]]:
    """The validation columns of a log as ``{label: (steps, values)}`` for :func:`draw_loss_curve`."""
    labels = {"eps_own": "eps-MSE, own condition", "eps_swapped": "eps-MSE, swapped condition",
              "eps_base": "eps-MSE, base alone"}
    series = {}
    for column, label in labels.items():
        points = [(r["step"], r[column]) for r in rows if r.get(column) is not None]
        if points:
            series[label] = ([s for s, _ in points], [v for _, v in points])
    return series


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average (window 1 = unchanged)."""
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


#: BGR colours of the extra series, in order (own: green, swapped: red, base: grey).
SERIES_COLOURS = ((40, 160, 40), (40, 40, 220), (120, 120, 120))


def draw_loss_curve(steps: list[int], losses: list[float], path: str | Path, *,
                    size: tuple[int, int] = (900, 500), title: str = "BPS training loss",
                    series: dict[str, tuple[list[int], list[float]]] | None = None) -> Path:
    """Plot loss over steps (raw in light grey, moving average in blue) and save a PNG.

    ``series`` adds labelled lines with dots (e.g. :func:`gap_series`: the validation eps-MSE with
    own and swapped conditions), drawn on the same axes with a legend.
    """
    series = {k: v for k, v in (series or {}).items() if v[0]}
    w, h = size
    left, right, top, bottom = 80, 20, 40, 50
    img = np.full((h, w, 3), 255, np.uint8)
    path = Path(path)
    font = cv2.FONT_HERSHEY_SIMPLEX
    cv2.putText(img, title, (left, 26), font, 0.6, (0, 0, 0), 1, cv2.LINE_AA)
    if not losses:
        cv2.putText(img, "no steps logged", (left, h // 2), font, 0.6, (0, 0, 0), 1, cv2.LINE_AA)
        cv2.imwrite(str(path), img)
        return path
    finite = [v for v in [*losses, *(x for _, vs in series.values() for x in vs)] if math.isfinite(v)] or [0.0]
    lo, hi = min(finite), max(finite)
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5 * abs(lo or 1), hi + 0.5 * abs(hi or 1)
    s0, s1 = steps[0], max(steps[-1], steps[0] + 1)

    def xy(s: float, v: float) -> tuple[int, int]:
        v = min(max(v, lo), hi) if math.isfinite(v) else hi
        x = left + (s - s0) / (s1 - s0) * (w - left - right)
        y = top + (hi - v) / (hi - lo) * (h - top - bottom)
        return int(round(x)), int(round(y))

    # axes, grid and labels
    cv2.rectangle(img, (left, top), (w - right, h - bottom), (0, 0, 0), 1)
    for i in range(5):
        v = lo + (hi - lo) * i / 4
        y = xy(s0, v)[1]
        cv2.line(img, (left, y), (w - right, y), (225, 225, 225), 1)
        cv2.putText(img, f"{v:.4g}", (4, y + 4), font, 0.4, (60, 60, 60), 1, cv2.LINE_AA)
    for i in range(5):
        s = s0 + (s1 - s0) * i / 4
        x = xy(s, lo)[0]
        cv2.putText(img, f"{int(round(s))}", (x - 10, h - bottom + 18), font, 0.4, (60, 60, 60), 1, cv2.LINE_AA)
    cv2.putText(img, "step", (w // 2, h - 10), font, 0.45, (0, 0, 0), 1, cv2.LINE_AA)

    raw = np.array([xy(s, v) for s, v in zip(steps, losses)], np.int32).reshape(-1, 1, 2)
    cv2.polylines(img, [raw], False, (190, 190, 190), 1, cv2.LINE_AA)
    avg = smooth(losses, max(1, len(losses) // 20))
    line = np.array([xy(s, v) for s, v in zip(steps, avg)], np.int32).reshape(-1, 1, 2)
    cv2.polylines(img, [line], False, (200, 90, 30), 2, cv2.LINE_AA)  # BGR blue
    legend_y = top + 18
    if series:
        cv2.line(img, (w - right - 256, legend_y - 4), (w - right - 244, legend_y - 4), (200, 90, 30), 2)
        cv2.putText(img, "training loss (moving average)", (w - right - 240, legend_y), font, 0.42,
                    (200, 90, 30), 1, cv2.LINE_AA)
        legend_y += 18
    for (label, (xs, vs)), colour in zip(series.items(), SERIES_COLOURS * (1 + len(series) // 3)):
        points = np.array([xy(s, v) for s, v in zip(xs, vs)], np.int32).reshape(-1, 1, 2)
        cv2.polylines(img, [points], False, colour, 2, cv2.LINE_AA)
        for p in points.reshape(-1, 2):
            cv2.circle(img, (int(p[0]), int(p[1])), 4, colour, -1, cv2.LINE_AA)
        cv2.circle(img, (w - right - 250, legend_y - 4), 4, colour, -1, cv2.LINE_AA)
        cv2.putText(img, label, (w - right - 240, legend_y), font, 0.42, colour, 1, cv2.LINE_AA)
        legend_y += 18
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), img)
    return path
