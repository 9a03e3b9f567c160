"""Draw an omega schedule as a picture (numpy + OpenCV only; no ComfyUI, no matplotlib).

Top panel: the weight of every port over sampling progress, coloured by port group, with the
part outside [start, end] shaded. Bottom panel: each port's peak weight as a bar.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from ..bps.ports import GROUPS, SD15_PORTS, PortMap
from ..bps.schedule import OmegaSchedule, describe

#: RGB colours per port group (encoder blue, middle red, decoder green).
GROUP_COLOURS = {"encoder": (40, 90, 200), "middle": (200, 40, 40), "decoder": (30, 150, 60)}
_FONT = cv2.FONT_HERSHEY_SIMPLEX
_GRID = (225, 225, 225)
_INK = (30, 30, 30)


def _nice_max(value: float) -> float:
    """A round axis maximum >= value (1, 2, 2.5, 5 x 10^k)."""
    if value <= 0:
        return 1.0
    power = 10 ** math.floor(math.log10(value))
    for step in (1, 2, 2.5, 5, 10):
        if step * power >= value:
            return step * power
    return 10 * power


def _sample_points(schedule: OmegaSchedule, n: int) -> np.ndarray:
    """Progress values to evaluate: a regular grid plus both sides of the start/end jumps."""
    eps = 1e-6
    extra = [schedule.start, schedule.end, schedule.start - eps, schedule.end + eps]
    if schedule.curve.kind == "keyframes":
        extra += [p for p, _ in schedule.curve.points]
    ps = np.concatenate([np.linspace(0.0, 1.0, n), np.clip(extra, 0.0, 1.0)])
    return np.unique(ps)


def _text(img: np.ndarray, text: str, org: tuple[int, int], scale: float, colour=_INK, thickness: int = 1) -> None:
    cv2.putText(img, text, org, _FONT, scale, colour, thickness, cv2.LINE_AA)


def render_schedule(schedule: OmegaSchedule, width: int = 768, height: int = 512,
                    ports: PortMap = SD15_PORTS) -> np.ndarray:
    """Plot ``schedule`` of an adapter with ``ports`` (default SD1.5's); returns an RGB
    ``(height, width, 3)`` float32 image in [0, 1]."""
    if width < 256 or height < 256:
        raise ValueError(f"the schedule plot needs at least 256x256 pixels, got {width}x{height}")
    img = np.full((height, width, 3), 255, np.uint8)
    scale = max(0.35, min(width, height) / 1400)
    left, right, top = int(60 * scale / 0.35), 20, 46
    split = int(height * 0.62)
    plot = (left, top, width - right, split - 30)       # x0, y0, x1, y1 of the curve panel
    bars = (left, split + 10, width - right, height - 34)

    ps = _sample_points(schedule, max(64, plot[2] - plot[0]))
    weights = np.array([schedule.weights_at(float(p)) for p in ps])   # (points, ports)
    peak = np.abs(weights).max(axis=0) if len(weights) else np.zeros(len(ports))
    lo = min(0.0, float(weights.min()))
    hi = _nice_max(float(weights.max()))
    if lo < 0:
        lo = -_nice_max(-lo)

    def to_xy(p: np.ndarray, w: np.ndarray) -> np.ndarray:
        x = plot[0] + p * (plot[2] - plot[0])
        y = plot[3] - (w - lo) / (hi - lo) * (plot[3] - plot[1])
        return np.stack([x, y], axis=-1).round().astype(np.int32)

    # Shade progress outside [start, end]: steering is off there.
    for a, b in ((0.0, schedule.start), (schedule.end, 1.0)):
        if b > a:
            x0, x1 = (int(round(plot[0] + v * (plot[2] - plot[0]))) for v in (a, b))
            cv2.rectangle(img, (x0, plot[1]), (x1, plot[3]), (238, 238, 238), -1)
    for i in range(5):
        p = i / 4
        x = int(round(plot[0] + p * (plot[2] - plot[0])))
        cv2.line(img, (x, plot[1]), (x, plot[3]), _GRID, 1)
        _text(img, f"{p:g}", (x - 8, plot[3] + 16), scale)
        w = lo + (hi - lo) * i / 4
        y = int(round(plot[3] - (w - lo) / (hi - lo) * (plot[3] - plot[1])))
        cv2.line(img, (plot[0], y), (plot[2], y), _GRID, 1)
        _text(img, f"{w:g}", (4, y + 4), scale)
    cv2.rectangle(img, plot[:2], plot[2:], _INK, 1)
    _text(img, "sampling progress (0 = first step)", (plot[0] + 4, plot[3] + 28), scale * 0.9)

    # Decoder first so the (usually larger) encoder weights stay visible over it; the single middle
    # port last, since with the paper's weights it coincides with input_1 and would vanish under it.
    for group in ("decoder", "encoder", "middle"):
        for port in ports.in_group(group):
            pts = to_xy(ps, weights[:, port.index])
            cv2.polylines(img, [pts.reshape(-1, 1, 2)], False, GROUP_COLOURS[group], 2, cv2.LINE_AA)

    _text(img, "BPS omega schedule: " + describe(schedule), (8, 16), scale * 0.95)
    x = plot[0]
    for group in GROUPS:
        count = len(ports.in_group(group))
        label = f"{group} ({count})"
        cv2.line(img, (x, 32), (x + 18, 32), GROUP_COLOURS[group], 3)
        _text(img, label, (x + 22, 37), scale)
        x += 30 + cv2.getTextSize(label, _FONT, scale, 1)[0][0]

    # Peak weight of every port, in port order.
    slot = (bars[2] - bars[0]) / len(ports)
    top_w = _nice_max(float(peak.max())) if peak.max() > 0 else 1.0
    cv2.line(img, (bars[0], bars[3]), (bars[2], bars[3]), _INK, 1)
    _text(img, f"peak |weight| per port (max {top_w:g})", (bars[0], bars[1] - 2), scale * 0.9)
    for port in ports:
        x0 = int(bars[0] + port.index * slot + slot * 0.15)
        x1 = int(bars[0] + (port.index + 1) * slot - slot * 0.15)
        y0 = int(round(bars[3] - peak[port.index] / top_w * (bars[3] - bars[1] - 8)))
        cv2.rectangle(img, (x0, y0), (x1, bars[3]), GROUP_COLOURS[port.group], -1)
        label = "M" if port.group == "middle" else port.name.split("_")[1]
        _text(img, label, (x0, bars[3] + 14), scale * 0.8)
    _text(img, "encoder input_N | middle | decoder output_N", (bars[0], height - 6), scale * 0.8)
    return img.astype(np.float32) / 255.0
