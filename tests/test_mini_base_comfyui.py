"""The mini base as ComfyUI objects (issue 16): its file, the trainer's loader, the shape checks."""

from __future__ import annotations

import importlib
import json

import pytest
import torch

import comfy_host


@pytest.fixture(scope="module")
def mini(comfyui_host):
    pack = comfy_host.trainer_entry().import_pack()
    return lambda name: importlib.import_module(f"{pack.__name__}.{name}")


def test_mini_base_file_loads_through_the_trainer_with_its_stand_ins(mini, tmp_path):
    model_file, base_model = mini("train.mini_base.model_file"), mini("train.base_model")
    torch.manual_seed(0)
    model = model_file.build_model(initialise=True)
    unet = model.model.diffusion_model
    # SD1.5's layout at a small width: 12 input / 12 output blocks, SD1.5's noise schedule
    assert len(unet.input_blocks) == 12 and len(unet.output_blocks) == 12 and unet.model_channels == 64
    ms = model.get_model_object("model_sampling")
    assert ms.sigmas.shape == (1000,) and abs(float(ms.sigmas[-1]) - 14.6146) < 1e-3
    path = model_file.save_mini_base(tmp_path / "mini.safetensors", model,
                                     {"unet_config": model_file.MINI_UNET_CONFIG, "recipe_hash": "test",
                                      "image_size": 128})
    base = base_model.load_base_models(path, unet_dtype=torch.float32)
    loaded = base.model.model.diffusion_model
    assert all(torch.equal(a, b) for a, b in zip(unet.state_dict().values(), loaded.state_dict().values()))
    assert not any(p.requires_grad for p in loaded.parameters())
    assert base.encode_images(torch.rand(2, 128, 128, 3)).shape == (2, 4, 16, 16)
    assert torch.equal(base.encode_text("a red star"), base.encode_text(""))
    assert base.unet_shape.context_dim == 64 and base.unet_shape.model_channels == 64
    # trained at 128 px: the trainer's "below the native size" advice must not ask for SD1.5's 512
    assert base.family == "SD1.5" and base.native_resolution == 128
    # every layer's attention is PyTorch's, whatever ComfyUI chose (model_file.pytorch_attention)
    assert base.model.model_options["transformer_options"]["optimized_attention_override"] is \
        model_file.pytorch_attention


def test_a_broken_mini_base_file_is_refused_with_the_fix(mini, tmp_path):
    from safetensors.torch import save_file
    base_model, model_file = mini("train.base_model"), mini("train.mini_base.model_file")
    path = tmp_path / "broken.safetensors"
    save_file({"model.diffusion_model.x": torch.zeros(1)}, str(path),
              metadata={model_file.METADATA_KEY: json.dumps({"unet_config": model_file.MINI_UNET_CONFIG})})
    with pytest.raises(base_model.BaseModelError, match="do not fit its unet_config.*rebuild it"):
        base_model.load_base_models(path, unet_dtype=torch.float32)
    save_file({"x": torch.zeros(1)}, str(path), metadata={model_file.METADATA_KEY: "{not json"})
    with pytest.raises(base_model.BaseModelError, match="not JSON"):
        base_model.load_base_models(path, unet_dtype=torch.float32)


def test_an_sd15_adapter_is_refused_on_the_mini_base_naming_both(mini):
    model_file, base_check = mini("train.mini_base.model_file"), mini("nodes.base_check")
    sd15 = mini("bps.unet_shape").SD15_SHAPE
    model = model_file.build_model()
    with pytest.raises(ValueError) as e:
        base_check.check_model_fits(model, sd15, "sketch.safetensors")
    text = str(e.value)
    assert "model_channels 64" in text and "sketch.safetensors" in text and "320" in text


def test_checkpoint_state_dict_holds_the_unet_on_this_comfyui(mini):
    """nodes.comfy_compat.checkpoint_state_dict (what the random checkpoints are written with) gives
    the checkpoint savers' layout on 0.8.0, whose state_dict_for_saving reads the UNet itself, and on
    0.33.0, where it takes the UNet's weights as an argument."""
    compat, model_file = mini("nodes.comfy_compat"), mini("train.mini_base.model_file")
    torch.manual_seed(0)
    base = model_file.build_model(initialise=True).model
    sd = compat.checkpoint_state_dict(base, {}, {"encoder.conv_in.weight": torch.ones(3)})
    unet = base.diffusion_model.state_dict()
    assert {k for k in sd if k.startswith("model.diffusion_model.")} == {f"model.diffusion_model.{k}" for k in unet}
    assert all(torch.equal(sd[f"model.diffusion_model.{k}"], v) for k, v in unet.items())
    assert torch.equal(sd["first_stage_model.encoder.conv_in.weight"], torch.ones(3))
