"""Omega schedules: the weight of every port at every point of sampling.

The weight of port i at sampling progress p (0 = first, noisiest step; 1 = last) is

    omega_i(p) = base_i * strength * curve(p)   for start <= p <= end, and 0 outside.

``base`` comes from a preset (the adapter's own defaults, uniform weights, or one of the paper's
integration modes restricted to our port groups), per-group multipliers and per-port overrides.
Everything here is a pure function of its inputs; specs are frozen and hashable so ComfyUI can
cache node outputs.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Sequence

from .errors import ScheduleError
from .ports import SD15_PORTS, PortMap

#: Base-weight presets. E/M/D name the port groups the paper's integration modes switch on.
PRESETS: tuple[str, ...] = ("paper", "uniform", "E", "M", "D", "EM", "MD", "EMD")
#: Curve shapes over sampling progress p in [0, 1].
CURVES: tuple[str, ...] = ("constant", "linear_down", "linear_up", "cosine", "keyframes")

_GROUP_LETTER = {"encoder": "E", "middle": "M", "decoder": "D"}
_KEYFRAME_EXAMPLE = '"0.0:1.0, 0.6:0.4, 1.0:0.0"'
_OVERRIDE_EXAMPLE = '"input_1=0.5, middle=0, 13=2"'


def _finite(value: float, what: str) -> float:
    value = float(value)
    if not math.isfinite(value):
        raise ScheduleError(f"{what} must be a finite number, got {value}")
    return value


def _number(text: str, what: str, context: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ScheduleError(f"{what} {text.strip()!r} in {context!r} is not a number") from None
    if not math.isfinite(value):
        raise ScheduleError(f"{what} {text.strip()!r} in {context!r} must be finite")
    return value


def parse_keyframes(text: str) -> tuple[tuple[float, float], ...]:
    """Parse ``"progress:value, ..."`` keyframes, sorted by progress.

    Raises:
        ScheduleError: quoting the bad keyframe, for bad syntax, progress outside [0, 1],
            non-finite numbers or a progress given twice.
    """
    parts = [part.strip() for part in re.split(r"[,;\n]", text or "") if part.strip()]
    if not parts:
        raise ScheduleError(f"keyframes are empty; write progress:value pairs, e.g. {_KEYFRAME_EXAMPLE}")
    points: dict[float, float] = {}
    for part in parts:
        if part.count(":") != 1:
            raise ScheduleError(f'keyframe "{part}" is not "progress:value"; write e.g. {_KEYFRAME_EXAMPLE}')
        p_text, v_text = part.split(":")
        p = _number(p_text, "keyframe progress", part)
        v = _number(v_text, "keyframe value", part)
        if not 0.0 <= p <= 1.0:
            raise ScheduleError(f'keyframe "{part}": progress must lie in [0, 1] (0 = first step, 1 = last)')
        if p in points:
            raise ScheduleError(f'keyframe "{part}": progress {p:g} is given twice; keep one value per progress')
        points[p] = v
    return tuple(sorted(points.items()))


@dataclass(frozen=True)
class Curve:
    """A multiplier over sampling progress p in [0, 1]."""

    kind: str = "constant"
    points: tuple[tuple[float, float], ...] = ()

    @classmethod
    def parse(cls, kind: str, keyframes_text: str = "") -> "Curve":
        """Build a curve; ``keyframes_text`` is read only for ``kind == "keyframes"``."""
        if kind not in CURVES:
            raise ScheduleError(f"unknown curve {kind!r}; use one of {', '.join(CURVES)}")
        return cls(kind, parse_keyframes(keyframes_text) if kind == "keyframes" else ())

    def __call__(self, p: float) -> float:
        p = min(max(float(p), 0.0), 1.0)
        if self.kind == "constant":
            return 1.0
        if self.kind == "linear_down":
            return 1.0 - p
        if self.kind == "linear_up":
            return p
        if self.kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * p))
        if self.kind == "keyframes":
            pts = self.points
            if p <= pts[0][0]:
                return pts[0][1]
            for (p0, v0), (p1, v1) in zip(pts, pts[1:]):
                if p <= p1:
                    return v0 + (v1 - v0) * (p - p0) / (p1 - p0)
            return pts[-1][1]
        raise ScheduleError(f"unknown curve {self.kind!r}; use one of {', '.join(CURVES)}")


_PORT_NAME = re.compile(r"input_\d+|middle|output_\d+")


def _override_key(name: str, context: str) -> str | int:
    """Syntax check of one override's port: a port name as the port rule forms them, or an index."""
    name = name.strip()
    if re.fullmatch(r"\d+", name):
        return int(name)
    if _PORT_NAME.fullmatch(name):
        return name
    raise ScheduleError(f"override {context!r}: unknown port {name!r}; ports are named input_N, middle and "
                        f"output_N after their UNet block ({', '.join(SD15_PORTS.names)} for SD1.5), or given by "
                        f"index")


def _is_bare_list(text: str) -> bool:
    parts = [part for part in re.split(r"[,;\n]", text or "") if part.strip()]
    return bool(parts) and all("=" not in part for part in parts)


def _parse_override_keys(text: str) -> tuple[tuple[str | int, float], ...]:
    """Overrides as written: ``(port name or index, weight)`` pairs, a later entry for a port winning.
    A bare list of numbers gives indices 0..n-1; its length is checked against an adapter's ports
    when the overrides are resolved (:func:`resolve_overrides`)."""
    parts = [part.strip() for part in re.split(r"[,;\n]", text or "") if part.strip()]
    if _is_bare_list(text):
        return tuple((i, _number(part, "weight", text.strip())) for i, part in enumerate(parts))
    result: dict[str | int, float] = {}
    for part in parts:
        if part.count("=") != 1:
            raise ScheduleError(f'override "{part}" is not "port=weight"; write e.g. {_OVERRIDE_EXAMPLE}')
        name, value = part.split("=")
        result[_override_key(name, part)] = _number(value, "weight", part)
    return tuple(result.items())


def resolve_overrides(keys: tuple[tuple[str | int, float], ...], ports: PortMap = SD15_PORTS, *,
                      bare_list: bool = False, context: str = "") -> tuple[tuple[int, float], ...]:
    """Turn written overrides into sorted ``(port index, weight)`` pairs for one adapter's ports.

    Raises:
        ScheduleError: a bare list (``bare_list``) of the wrong length, an index out of range or a
            name that is not one of these ports; the message lists the ports.
    """
    n = len(ports)
    if bare_list and len(keys) != n:
        raise ScheduleError(f"overrides {context!r}: a bare list needs exactly {n} weights (got {len(keys)}) for "
                            f"{ports.shape.family}'s ports; or name ports, e.g. {_OVERRIDE_EXAMPLE}")
    result: dict[int, float] = {}
    for key, value in keys:
        if isinstance(key, int):
            if key >= n:
                raise ScheduleError(f"override {context!r}: port index {key} is out of range 0..{n - 1}")
            result[key] = value
        else:
            try:
                result[ports.by_name(key).index] = value
            except KeyError:
                raise ScheduleError(f"override {context!r}: unknown port {key!r} for {ports.shape.family}; ports are "
                                    f"{', '.join(ports.names)} (or indices 0..{n - 1})") from None
    return tuple(sorted(result.items()))


def parse_overrides(text: str, ports: PortMap = SD15_PORTS) -> tuple[tuple[int, float], ...]:
    """Parse per-port overrides against ``ports`` (default SD1.5): ``"input_1=0.5, middle=0, 13=2"``
    or one bare number per port.

    Returns ``(port index, weight)`` pairs; a later entry for the same port wins.
    """
    return resolve_overrides(_parse_override_keys(text), ports, bare_list=_is_bare_list(text),
                             context=(text or "").strip())


def _check_adapter_omega(adapter_omega: Sequence[float], ports: PortMap) -> tuple[float, ...]:
    if len(adapter_omega) != len(ports):
        raise ScheduleError(f"adapter omega has {len(adapter_omega)} weights; expected one per port ({len(ports)})")
    return tuple(_finite(w, "adapter omega") for w in adapter_omega)


@dataclass(frozen=True)
class OmegaSpec:
    """Adapter-independent description of port weights: what the BPS Omega Schedule node outputs."""

    preset: str = "paper"
    encoder: float = 1.0
    middle: float = 1.0
    decoder: float = 1.0
    #: ``(port name or index, weight)`` as written; resolved against each adapter's ports.
    overrides: tuple[tuple[str | int, float], ...] = ()
    curve: Curve = field(default_factory=Curve)
    #: The overrides were one bare weight per port (their count must match the adapter's ports).
    overrides_are_list: bool = False

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ScheduleError(f"unknown omega preset {self.preset!r}; use one of {', '.join(PRESETS)}")
        for group in ("encoder", "middle", "decoder"):
            _finite(getattr(self, group), f"{group} multiplier")

    def base_weights(self, adapter_omega: Sequence[float], ports: PortMap = SD15_PORTS) -> tuple[float, ...]:
        """The base weights for an adapter with ``ports`` (default SD1.5's 21) whose own defaults
        are ``adapter_omega``.

        ``paper`` keeps the adapter's defaults; ``uniform`` sets every port to 1; the integration
        modes keep the adapter's defaults for the named groups and zero the others (so ``EMD``
        equals ``paper``). Group multipliers apply next; overrides set final values.
        """
        defaults = _check_adapter_omega(adapter_omega, ports)
        multiplier = {"encoder": self.encoder, "middle": self.middle, "decoder": self.decoder}
        weights = []
        for port, default in zip(ports, defaults):
            if self.preset == "uniform":
                w = 1.0
            elif self.preset == "paper" or _GROUP_LETTER[port.group] in self.preset:
                w = default
            else:
                w = 0.0
            weights.append(w * multiplier[port.group])
        for index, value in resolve_overrides(self.overrides, ports, bare_list=self.overrides_are_list,
                                              context=", ".join(f"{k}={w:g}" for k, w in self.overrides)):
            weights[index] = value
        return tuple(weights)


def make_omega_spec(preset: str = "paper", encoder: float = 1.0, middle: float = 1.0, decoder: float = 1.0,
                    overrides: str = "", curve: str = "constant", keyframes: str = "") -> OmegaSpec:
    """Validate raw settings (e.g. node widget values) into an :class:`OmegaSpec`."""
    return OmegaSpec(preset, float(encoder), float(middle), float(decoder), _parse_override_keys(overrides),
                     Curve.parse(curve, keyframes), _is_bare_list(overrides))


@dataclass(frozen=True)
class OmegaSchedule:
    """Port weights resolved for one adapter and one application of it."""

    base: tuple[float, ...]
    strength: float = 1.0
    start: float = 0.0
    end: float = 1.0
    curve: Curve = field(default_factory=Curve)

    def in_range(self, progress: float) -> bool:
        """True when ``progress`` lies in [start, end] (both ends included)."""
        return self.start <= progress <= self.end

    def weights_at(self, progress: float) -> tuple[float, ...]:
        """The 21 port weights at sampling progress ``progress``."""
        if not self.in_range(progress):
            return (0.0,) * len(self.base)
        scale = self.strength * self.curve(progress)
        return tuple(b * scale for b in self.base)

    def is_active_at(self, progress: float) -> bool:
        """False when every weight is 0 at ``progress``, so the adapter need not run at all."""
        return any(w != 0.0 for w in self.weights_at(progress))


def make_schedule(adapter_omega: Sequence[float], spec: OmegaSpec | None = None, *, strength: float = 1.0,
                  start: float = 0.0, end: float = 1.0, ports: PortMap = SD15_PORTS) -> OmegaSchedule:
    """Resolve ``spec`` (default: the adapter's own weights, constant) against an adapter whose
    ports are ``ports`` (``adapter.ports``; default SD1.5's).

    Raises:
        ScheduleError: non-finite strength, a range outside [0, 1], start after end, or overrides
            that name no port of ``ports``.
    """
    spec = spec or OmegaSpec()
    strength, start, end = (_finite(strength, "strength"), _finite(start, "start_percent"),
                            _finite(end, "end_percent"))
    if not (0.0 <= start <= 1.0 and 0.0 <= end <= 1.0):
        raise ScheduleError(f"start_percent {start:g} and end_percent {end:g} must lie in [0, 1]")
    if start > end:
        raise ScheduleError(f"start_percent {start:g} is after end_percent {end:g}; swap them")
    return OmegaSchedule(spec.base_weights(adapter_omega, ports), strength, start, end, spec.curve)


def progress_from_timestep(t: float, num_train_timesteps: int = 1000) -> float:
    """Sampling progress of UNet timestep ``t``: 0 at t = 999 (pure noise), 1 at t = 0.

    This is the inverse of the mapping ComfyUI uses for ControlNet's start/end percent, so
    ``start_percent``/``end_percent`` mean the same here as on ComfyUI's own nodes.
    """
    return min(max(1.0 - float(t) / (num_train_timesteps - 1), 0.0), 1.0)


def describe(schedule: OmegaSchedule | OmegaSpec) -> str:
    """One-line human summary of a spec or schedule."""
    if isinstance(schedule, OmegaSpec):
        parts = [f"preset {schedule.preset}",
                 f"x(E {schedule.encoder:g}, M {schedule.middle:g}, D {schedule.decoder:g})"]
        if schedule.overrides:
            parts.append(", ".join(f"{k}={w:g}" for k, w in schedule.overrides))
        curve = schedule.curve
    else:
        parts = [f"strength {schedule.strength:g}", f"p in [{schedule.start:g}, {schedule.end:g}]"]
        curve = schedule.curve
    parts.append(f"curve {curve.kind}" + (f" {curve.points}" if curve.points else ""))
    return "; ".join(parts)
