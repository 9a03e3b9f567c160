"""The helper nodes against the real ComfyUI: BPS Hint Preprocessor and BPS Omega Preview."""

from __future__ import annotations

from importlib import import_module

import numpy as np
import pytest
import torch


def _node(node_id):
    import nodes as comfy_nodes
    return comfy_nodes.NODE_CLASS_MAPPINGS[node_id]


def _adapter(bps, **config):
    """A tiny adapter: the preprocessor reads only its config."""
    cfg = bps.BPSConfig(model_channels=32, time_embed_dim=64, **config)
    net = bps.BPSNetwork(cfg)
    return bps.Adapter(net, list(bps.PAPER_OMEGA), cfg, {}, None, "sketch")


def _image(batch=1, h=32, w=48, seed=0):
    return torch.rand(batch, h, w, 3, generator=torch.Generator().manual_seed(seed))


def test_hint_preprocessor_makes_luminance_for_one_channel_adapters(pack):
    run = _node("BPSHintPreprocessor").execute
    image = _image()
    grey = run(image, _adapter(pack.bps, hint_channels=1), False, 0.0).args[0]
    luma = image[..., 0] * 0.299 + image[..., 1] * 0.587 + image[..., 2] * 0.114
    assert grey.shape == (1, 32, 48, 3)  # grey shown as RGB so every image node can display it
    for c in range(3):
        torch.testing.assert_close(grey[..., c], luma)
    inverted = run(image, _adapter(pack.bps, hint_channels=1), True, 0.0).args[0]
    torch.testing.assert_close(inverted, 1.0 - grey)
    binary = run(image, _adapter(pack.bps, hint_channels=1), False, 0.5).args[0]
    assert set(binary.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(binary[..., 0], (luma >= 0.5).float())


def test_hint_preprocessor_keeps_rgb_and_expands_grey_for_three_channel_adapters(pack):
    run = _node("BPSHintPreprocessor").execute
    adapter = _adapter(pack.bps, hint_channels=3)
    image = _image()
    assert torch.equal(run(image, adapter, False, 0.0).args[0], image)
    rgba = torch.cat([image, torch.ones_like(image[..., :1])], dim=-1)
    assert torch.equal(run(rgba, adapter, False, 0.0).args[0], image)  # alpha dropped
    grey = image[..., :1]
    assert torch.equal(run(grey, adapter, False, 0.0).args[0], grey.expand(-1, -1, -1, 3))


def test_hint_preprocessor_packs_the_style_extra_map_and_refuses_mismatches(pack):
    bps = pack.bps
    run = _node("BPSHintPreprocessor").execute
    style = _adapter(bps, hint_channels=3, extra_channels=1)
    image, extra = _image(batch=2), _image(batch=1, h=64, w=96, seed=1)
    packed = run(image, style, False, 0.0, extra_map=extra).args[0]
    assert packed.shape == (2, 32, 48, 4)
    assert torch.equal(packed[..., :3], image)
    assert torch.equal(packed[0, ..., 3], packed[1, ..., 3])  # one extra map broadcast to the batch
    assert 0.0 <= float(packed[..., 3].min()) and float(packed[..., 3].max()) <= 1.0
    with pytest.raises(bps.HintError, match="needs an extra map.*extra_map"):
        run(image, style, False, 0.0)
    with pytest.raises(bps.HintError, match="takes no extra map"):
        run(image, _adapter(bps, hint_channels=1), False, 0.0, extra_map=extra)
    with pytest.raises(bps.HintError, match="batch of 3"):
        run(image, style, False, 0.0, extra_map=_image(batch=3))


def test_apply_bps_and_the_preprocessor_refuse_adapters_no_image_can_feed(pack):
    """The official style2 configuration takes a 24-channel map at latent resolution: no IMAGE carries it,
    so both nodes refuse, saying what the adapter expects (before touching the MODEL)."""
    bps = pack.bps
    style2 = _adapter(bps, hint_channels=24, downscale=1)
    style2.path = "/models/bps/bps_style2.safetensors"
    image = _image()
    with pytest.raises(bps.HintError) as err:
        _node("BPSApply").execute(object(), style2, image, 1.0, 0.0, 1.0)
    message = str(err.value)
    assert message.startswith("Apply BPS cannot use the BPS adapter 'bps_style2.safetensors': this adapter "
                              "expects a 24-channel map at latent resolution"), message
    assert "(batch, 24, latent height, latent width)" in message and "IMAGE" in message
    assert "bps.load_adapter" in message
    with pytest.raises(bps.HintError, match="BPS Hint Preprocessor cannot use .* 24-channel map"):
        _node("BPSHintPreprocessor").execute(image, style2, False, 0.0)


def test_omega_preview_plots_what_apply_bps_would_use(pack):
    preview = _node("BPSOmegaPreview")
    spec = _node("BPSOmegaSchedule").execute("paper", 1.0, 1.0, 1.0, "", "linear_down", "").args[0]
    out = preview.execute(1.0, 0.2, 0.8, 512, 384, omega=spec)
    plot = out.args[0]
    assert plot.shape == (1, 384, 512, 3) and plot.dtype == torch.float32
    assert 0.0 <= float(plot.min()) and float(plot.max()) <= 1.0
    assert out.ui is not None  # shown on the node

    pixels = (plot[0].numpy() * 255).round().astype(np.int16)
    colours = import_module(f"{pack.__name__}.nodes.schedule_plot").GROUP_COLOURS
    for group, rgb in colours.items():
        near = np.abs(pixels - np.array(rgb)).sum(axis=-1) < 30
        assert near.sum() > 50, f"no {group} curve or bar drawn"

    # Another schedule gives another picture; the same one the same picture.
    again = preview.execute(1.0, 0.2, 0.8, 512, 384, omega=spec).args[0]
    assert torch.equal(again, plot)
    other = preview.execute(1.0, 0.0, 1.0, 512, 384, omega=spec).args[0]
    assert not torch.equal(other, plot)
    # The bar panel (bottom part) shows each port's peak weight: none at strength 0.
    flat = preview.execute(0.0, 0.0, 1.0, 512, 384, omega=spec).args[0]

    def encoder_bars(img):
        bottom = (img[0, int(384 * 0.62):].numpy() * 255).round().astype(np.int16)
        return int((np.abs(bottom - np.array(colours["encoder"])).sum(axis=-1) < 30).sum())
    assert encoder_bars(plot) > 2000 and encoder_bars(flat) < 200  # a zero bar is one pixel row


def test_schedule_plot_refuses_tiny_images(pack):
    plot = import_module(f"{pack.__name__}.nodes.schedule_plot")
    schedule = pack.bps.make_schedule(list(pack.bps.PAPER_OMEGA))
    with pytest.raises(ValueError, match="at least 256x256"):
        plot.render_schedule(schedule, 100, 300)


def _tiny_adapter_file(bps, path):
    bps.save_adapter(path, bps.BPSNetwork(bps.BPSConfig(model_channels=32, time_embed_dim=64)))
    return path


def test_adapter_cache_reads_a_file_once_and_again_when_it_changes(pack, tmp_path):
    import os
    cache_mod = import_module(f"{pack.__name__}.nodes.adapter_cache")
    bps = pack.bps
    cache = cache_mod.AdapterCache(capacity=2)
    a = _tiny_adapter_file(bps, tmp_path / "a.safetensors")
    first = cache.load(a, torch.float32)
    assert cache.load(a, torch.float32) is first and cache.loads == 1           # re-executed: nothing read
    # The patcher the cache keeps rebuilds B_phi from the file (ComfyUI 0.33's cached_patcher_init).
    patcher = import_module(f"{pack.__name__}.nodes.model_management").adapter_model_patcher(first.network)
    if import_module(f"{pack.__name__}.nodes.comfy_compat").PATCHERS_HAVE_FACTORIES:
        assert patcher.cached_patcher_init[1] == (str(a), torch.float32)
    else:
        assert getattr(patcher, "cached_patcher_init", None) is None
    assert cache.load(a, torch.float16) is not first and cache.loads == 2       # another dtype: a miss
    st = os.stat(a)
    os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns + 10 ** 9))                  # rewritten in place
    fresh = cache.load(a, torch.float32)
    assert fresh is not first and cache.loads == 3 and len(cache) == 1          # older versions dropped
    _tiny_adapter_file(bps, a)                                          # retrained: renamed over
    assert cache.load(a, torch.float32) is not fresh and cache.loads == 4
    b = _tiny_adapter_file(bps, tmp_path / "b.safetensors")
    c = _tiny_adapter_file(bps, tmp_path / "c.safetensors")
    cache.load(b, torch.float32), cache.load(c, torch.float32)
    assert len(cache) == 2 and cache.loads == 6                                 # a (least recent) evicted
    cache.load(a, torch.float32)
    assert cache.loads == 7
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not an adapter")
    for _ in range(2):                                                          # errors are never cached
        with pytest.raises(bps.AdapterError, match="not a safetensors file"):
            cache.load(broken, torch.float32)


def test_bps_loader_reexecutes_for_free_and_fingerprints_the_file(pack, tmp_path):
    import os
    import folder_paths
    cache_mod = import_module(f"{pack.__name__}.nodes.adapter_cache")
    folder = tmp_path / "bps"
    folder.mkdir()
    path = _tiny_adapter_file(pack.bps, folder / "tiny_fp.safetensors")
    folder_paths.add_model_folder_path("bps", str(folder))
    loader = _node("BPSLoader")
    cache_mod.ADAPTERS.clear()
    loads = cache_mod.ADAPTERS.loads
    first = loader.execute("tiny_fp.safetensors").args[0]
    assert loader.execute("tiny_fp.safetensors").args[0] is first
    assert cache_mod.ADAPTERS.loads == loads + 1
    print_before = loader.fingerprint_inputs(adapter_name="tiny_fp.safetensors")
    assert loader.fingerprint_inputs(adapter_name="tiny_fp.safetensors") == print_before
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10 ** 9))
    assert loader.fingerprint_inputs(adapter_name="tiny_fp.safetensors") != print_before  # ComfyUI re-executes
    assert loader.execute("tiny_fp.safetensors").args[0] is not first
    assert loader.fingerprint_inputs(adapter_name="gone.safetensors") == "gone.safetensors"
    cache_mod.ADAPTERS.clear()


def test_search_finds_the_adapter_nodes_by_their_aliases_where_the_api_has_them(pack):
    """ComfyUI 0.33's V3 Schema takes search_aliases (the node search matches them); 0.8.0's
    refuses the keyword, so there the nodes register without them."""
    import dataclasses

    from comfy_api.latest import io
    has_aliases = "search_aliases" in {f.name for f in dataclasses.fields(io.Schema)}
    assert import_module(f"{pack.__name__}.nodes.comfy_compat").SCHEMA_HAS_SEARCH_ALIASES == has_aliases
    for node_id in ("BPSApply", "BPSLoader"):
        info = _node(node_id).GET_NODE_INFO_V1()  # what /object_info serves the frontend
        if has_aliases:
            assert info["search_aliases"] == ["sketch control", "t2i adapter", "controlnet alternative",
                                              "power steering"], info
        else:
            assert "search_aliases" not in info
    for node_id in ("BPSOmegaSchedule", "BPSOmegaPreview", "BPSHintPreprocessor"):
        assert not _node(node_id).GET_NODE_INFO_V1().get("search_aliases")
