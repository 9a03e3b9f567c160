"""Bayesian Power Steering (BPS) core library: the network B_phi, the port rule (21 ports for
SD1.5, 16 for SDXL), adapter files, official-checkpoint conversion and omega schedules. Pure
PyTorch; knows nothing of ComfyUI."""

from .adapter_file import Adapter, load_adapter, read_adapter_metadata, save_adapter
from .errors import AdapterError, BPSError, HintError, ScheduleError
from .network import BPSConfig, BPSNetwork
from . import ports, unet_shape
from .ports import NUM_PORTS, PAPER_OMEGA, PORTS, Port, PortMap, port_map
from .schedule import OmegaSchedule, OmegaSpec, make_omega_spec, make_schedule
from .unet_shape import SD15_SHAPE, SDXL_SHAPE, UNetShape

__all__ = [
    "Adapter", "AdapterError", "BPSConfig", "BPSError", "BPSNetwork", "HintError", "NUM_PORTS",
    "OmegaSchedule", "OmegaSpec", "PAPER_OMEGA", "PORTS", "Port", "PortMap", "SD15_SHAPE", "SDXL_SHAPE",
    "ScheduleError", "UNetShape", "load_adapter", "make_omega_spec", "make_schedule", "port_map", "ports",
    "read_adapter_metadata", "save_adapter", "unet_shape",
]
