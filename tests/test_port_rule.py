"""The port rule: ports, widths and default weights derived from a UNet's shape (pure PyTorch).

SD1.5 is one instance of the rule and must come out exactly as the paper's 21-port table; SDXL
another. The hidden-state checks against ComfyUI's real UNets are in test_nodes_steering.py.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from bps import BPSConfig, BPSNetwork, load_adapter, save_adapter
from bps.errors import AdapterError
from bps.ports import PAPER_OMEGA, PORTS, bps_problem, port_map
from bps.unet_shape import SD15_SHAPE, SDXL_SHAPE, UNetShape

# The paper's SD1.5 table (BPS_SPEC.md), written out by hand: (block, channels, downsample, omega, sub-layers).
SD15_TABLE = (
    [(("input", n), c, d, w, s) for n, c, d, w, s in [(1, 320, 1, 16, 2), (2, 320, 1, 16, 2), (4, 640, 2, 8, 2),
                                                       (5, 640, 2, 8, 2), (7, 1280, 4, 4, 2), (8, 1280, 4, 4, 2),
                                                       (10, 1280, 8, 2, 1), (11, 1280, 8, 2, 1)]]
    + [(("middle", 0), 1280, 8, 16, 3)]
    + [(("output", n), c, d, 1, s) for n, (c, d, s) in enumerate(
        [(1280, 8, 1)] * 3 + [(1280, 4, 2)] * 3 + [(640, 2, 2)] * 3 + [(320, 1, 2)] * 3)]
)
# The SDXL facts of issue 17 / BPS_SPEC.md.
SDXL_TABLE = (
    [(("input", n), c, d, w, s) for n, c, d, w, s in [(1, 320, 1, 32, 1), (2, 320, 1, 32, 1), (4, 640, 2, 16, 2),
                                                       (5, 640, 2, 16, 2), (7, 1280, 4, 8, 2), (8, 1280, 4, 8, 2)]]
    + [(("middle", 0), 1280, 4, 32, 3)]
    + [(("output", n), c, d, 1, s) for n, (c, d, s) in enumerate([(1280, 4, 2)] * 3 + [(640, 2, 2)] * 3
                                                                + [(320, 1, 1)] * 3)]
)


def _table(ports):
    return [(p.block, p.channels, p.downsample, p.default_omega, p.sublayers) for p in ports]


def test_sd15_is_the_papers_table():
    assert _table(PORTS) == SD15_TABLE
    assert [p.name for p in PORTS][:3] == ["input_1", "input_2", "input_4"] and PORTS[8].name == "middle"
    assert [p.index for p in PORTS] == list(range(21)) and port_map(SD15_SHAPE).additions == 38
    assert PAPER_OMEGA == (16, 16, 8, 8, 4, 4, 2, 2, 16) + (1,) * 12


def test_sdxl_follows_the_same_rule():
    ports = port_map(SDXL_SHAPE)
    assert _table(ports) == SDXL_TABLE and len(ports) == 16 and ports.additions == 28
    assert [p.name for p in ports][-1] == "output_8"
    # B_phi for SDXL: the same design, three levels; its residuals match the ports.
    cfg = BPSConfig.for_unet(SDXL_SHAPE)
    assert cfg.channel_mult == (1, 2, 4) and cfg.num_ports == 16 and cfg.fits(SDXL_SHAPE)
    assert not cfg.fits(SD15_SHAPE) and not BPSConfig().fits(SDXL_SHAPE)


def test_sd15_network_is_unchanged_by_the_rule():
    cfg = BPSConfig.for_unet(SD15_SHAPE)
    assert cfg == BPSConfig() and cfg.is_sd15_layout
    with torch.device("meta"):
        names = {k: tuple(v.shape) for k, v in BPSNetwork(cfg).state_dict().items()}
        default = {k: tuple(v.shape) for k, v in BPSNetwork(BPSConfig()).state_dict().items()}
    assert names == default


def test_mini_width_sd15_layout_gets_21_ports_at_its_widths():
    mini = UNetShape.like_sd15(32)
    ports = port_map(mini)
    assert [(p.block, p.downsample, p.sublayers) for p in ports] == [(b, d, s) for b, _, d, _, s in SD15_TABLE]
    assert [p.channels for p in ports] == [c // 10 for _, c, _, _, _ in SD15_TABLE]
    assert mini.family == "SD1.5-layout UNet at model_channels 32" and mini.family_key == "sd15"
    assert not mini.same_family(SD15_SHAPE) and BPSConfig.for_unet(mini).time_embed_dim == 128


def test_sd15_layout_with_other_level_widths_is_still_sd15_family():
    """The mini base keeps SD1.5's blocks at other widths per level (64, 64, 128, 128): the same 21
    ports at its own widths, the family named with the channel_mult that differs."""
    mini = UNetShape.like_sd15(64, (1, 1, 2, 2), context_dim=64)
    ports = port_map(mini)
    assert [(p.block, p.downsample, p.sublayers) for p in ports] == [(b, d, s) for b, _, d, _, s in SD15_TABLE]
    widths = {320: 64, 640: 64, 1280: 128}
    assert [p.channels for p in ports] == [widths[c] for _, c, _, _, _ in SD15_TABLE]
    assert mini.family == "SD1.5-layout UNet at model_channels 64, channel_mult [1, 1, 2, 2]"
    assert mini.family_key == "sd15" and not mini.same_family(UNetShape.like_sd15(64, context_dim=64))
    assert BPSConfig.for_unet(mini).fits(mini) and not BPSConfig.for_unet(mini).fits(UNetShape.like_sd15(64))


def test_shape_from_unet_config_round_trips_and_ignores_inpainting_channels():
    assert UNetShape.from_dict(json.loads(json.dumps(SDXL_SHAPE.to_dict()))) == SDXL_SHAPE
    inpaint = dataclasses.replace(SD15_SHAPE, in_channels=9)
    assert inpaint.same_family(SD15_SHAPE) and inpaint.family == "SD1.5"
    sd2 = dataclasses.replace(SD15_SHAPE, context_dim=1024)
    assert sd2.family == "SD2.x" and not sd2.same_family(SD15_SHAPE)


@pytest.mark.parametrize("change, problem", [
    ({"middle_block": ()}, "no middle block"),
    ({"num_res_blocks": (2, 2, 1)}, "different ResBlock counts"),
])
def test_unsupported_variants_are_refused_by_name(change, problem):
    shape = dataclasses.replace(SDXL_SHAPE, **change)
    assert problem in bps_problem(shape)
    with pytest.raises(ValueError, match=problem):
        port_map(shape)
    with pytest.raises(ValueError, match=problem):
        BPSConfig.for_unet(shape)


def test_ssd1b_middle_of_one_resblock_is_one_addition():
    ssd = dataclasses.replace(SDXL_SHAPE, middle_block=("res",))
    assert port_map(ssd).by_name("middle").sublayers == 1


def test_adapter_records_its_unet_and_old_files_mean_sd15(tmp_path):
    small = UNetShape.like_sd15(32)
    net = BPSNetwork(BPSConfig.for_unet(small))
    path = tmp_path / "mini.safetensors"
    save_adapter(path, net, unet=small)
    adapter = load_adapter(path)
    assert adapter.unet_shape == small and len(adapter.ports) == 21
    assert adapter.metadata["unet"] == small.to_dict() and adapter.metadata["base_model"] == "sd15"
    with pytest.raises(ValueError, match="does not fit"):
        save_adapter(tmp_path / "x.safetensors", net, unet=SDXL_SHAPE)
    # A file without a shape record (written before shapes were recorded) is SD1.5's layout.
    from safetensors import safe_open
    from safetensors.torch import save_file
    with safe_open(str(path), "pt") as f:
        meta = {k: v for k, v in f.metadata().items() if k != "unet"}
        state = {k: f.get_tensor(k) for k in f.keys()}
    save_file(state, str(tmp_path / "old.safetensors"), metadata=meta)
    assert load_adapter(tmp_path / "old.safetensors").unet_shape == small


def test_adapter_whose_network_does_not_fit_its_recorded_unet_is_refused(tmp_path):
    small = UNetShape.like_sd15(32)
    path = tmp_path / "mini.safetensors"
    save_adapter(path, BPSNetwork(BPSConfig.for_unet(small)), unet=small)
    from safetensors import safe_open
    from safetensors.torch import save_file
    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata())
        state = {k: f.get_tensor(k) for k in f.keys()}
    meta["unet"] = json.dumps(UNetShape.like_sd15(64).to_dict())
    save_file(state, str(tmp_path / "bad.safetensors"), metadata=meta)
    with pytest.raises(AdapterError, match="does not fit the UNet it records"):
        load_adapter(tmp_path / "bad.safetensors")


def test_readme_port_tables_are_the_generated_ones():
    """The README's port tables are what tools/port_tables.py prints from the rule."""
    import importlib.util
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("port_tables", root / "tools" / "port_tables.py")
    tables = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tables)
    readme = (root / "README.md").read_text()
    start = readme.index("<!-- port tables: generated by tools/port_tables.py -->\n")
    end = readme.index("<!-- end of port tables -->")
    assert readme[start:end].split("\n", 1)[1] == tables.readme_section(), \
        "README port tables are stale: paste the output of python tools/port_tables.py"


def test_omega_overrides_resolve_against_each_adapters_ports():
    from bps.errors import ScheduleError
    from bps.schedule import make_omega_spec, make_schedule
    sdxl = port_map(SDXL_SHAPE)
    spec = make_omega_spec("paper", decoder=0.5, overrides="input_1=3, output_8=2")
    assert spec.base_weights(sdxl.default_omega, sdxl) == (3.0, 32, 16, 16, 8, 8, 32) + (0.5,) * 8 + (2.0,)
    # The same spec on SD1.5: output_8 is another port there (640 channels, not the last).
    sd15 = spec.base_weights(PAPER_OMEGA)
    assert sd15[0] == 3.0 and sd15[port_map(SD15_SHAPE).by_name("output_8").index] == 2.0 and sd15[-1] == 0.5
    with pytest.raises(ScheduleError, match="unknown port 'output_11' for SDXL; ports are input_1, .*output_8"):
        make_schedule(sdxl.default_omega, make_omega_spec(overrides="output_11=1"), ports=sdxl)
    bare = ", ".join(["1"] * 21)
    with pytest.raises(ScheduleError, match="a bare list needs exactly 16 weights"):
        make_schedule(sdxl.default_omega, make_omega_spec(overrides=bare), ports=sdxl)
    assert make_schedule(PAPER_OMEGA, make_omega_spec(overrides=bare)).base == (1.0,) * 21
    with pytest.raises(ScheduleError, match="unknown port 'input_x'"):
        make_omega_spec(overrides="input_x=1")
