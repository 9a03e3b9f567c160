"""Bayesian Power Steering (BPS) core library: the network B_phi, its 21 ports, adapter files,
official-checkpoint conversion and omega schedules. Pure PyTorch; knows nothing of ComfyUI."""

from .adapter_file import Adapter, load_adapter, read_adapter_metadata, save_adapter
from .errors import AdapterError, BPSError, HintError, ScheduleError
from .network import BPSConfig, BPSNetwork
from .ports import NUM_PORTS, PAPER_OMEGA, PORTS, Port
from .schedule import OmegaSchedule, OmegaSpec, make_omega_spec, make_schedule

__all__ = [
    "Adapter", "AdapterError", "BPSConfig", "BPSError", "BPSNetwork", "HintError", "NUM_PORTS",
    "OmegaSchedule", "OmegaSpec", "PAPER_OMEGA", "PORTS", "Port", "ScheduleError", "load_adapter",
    "make_omega_spec", "make_schedule", "read_adapter_metadata", "save_adapter",
]
