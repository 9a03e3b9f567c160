"""What differs between the ComfyUI versions this pack supports (0.8.0 up to 0.33.0 and later).

The one place of the pack that asks ComfyUI what it has: every other module calls these helpers
and stays the same on every version. Each helper feature-tests ComfyUI's public API (a field, an
attribute, a module) instead of comparing version numbers, so a ComfyUI between or after the tested
ones gets whatever it supports.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Sequence

import comfy.model_patcher
import comfy.patcher_extension
from comfy_api.latest import io

#: ``io.Schema(search_aliases=...)``: extra words the node search matches (in 0.33.0, not in 0.8.0).
SCHEMA_HAS_SEARCH_ALIASES = any(f.name == "search_aliases" for f in dataclasses.fields(io.Schema))


def search_aliases(aliases: Sequence[str]) -> dict:
    """Keyword arguments for ``io.Schema`` that give the node these search aliases where the V3
    API has them (``io.Schema(..., **search_aliases([...]))``), and nothing on older ComfyUI, whose
    Schema refuses the keyword."""
    return {"search_aliases": list(aliases)} if SCHEMA_HAS_SEARCH_ALIASES else {}


def checkpoint_state_dict(base: Any, clip_state_dict: dict, vae_state_dict: dict) -> dict:
    """A checkpoint's state dict (UNet, text encoders, VAE) from a ComfyUI ``BaseModel``, as the
    checkpoint savers write it: ``BaseModel.state_dict_for_saving`` reads the UNet's weights itself
    in 0.8.0 and takes them as its first argument in 0.33.0."""
    if "unet_state_dict" in inspect.signature(base.state_dict_for_saving).parameters:
        return base.state_dict_for_saving(base.diffusion_model.state_dict(), clip_state_dict=clip_state_dict,
                                          vae_state_dict=vae_state_dict)
    return base.state_dict_for_saving(clip_state_dict=clip_state_dict, vae_state_dict=vae_state_dict)


def window_frames(transformer_options: dict, rows_per_chunk: int) -> tuple[list[int], int] | None:
    """The latent frames a UNet call runs on under context windows, and how many frames there are.

    Core's context windows (``comfy/context_windows.py``, 0.8.0 and later) hand the window in
    ``transformer_options["context_window"]``: its ``index_list``, on the batch dimension for image
    models (``dim`` 0), preceded on 0.33 by the frame before the window when it adds a causal anchor
    (``causal_anchor_index``, sliced in front exactly as ``get_tensor`` does). AnimateDiff-Evolved
    sets ``transformer_options["ad_params"]`` with ``sub_idxs`` and ``full_length``. None when the
    call is not windowed on the batch dimension, or the listed frames do not match the rows.
    """
    window = transformer_options.get("context_window")
    if window is not None and getattr(window, "dim", 0) == 0 and getattr(window, "index_list", None) is not None:
        frames = [int(i) for i in window.index_list]
        anchor = getattr(window, "causal_anchor_index", None)
        if anchor is not None and anchor >= 0:
            frames = [int(anchor)] + frames
        total = int(getattr(window, "total_frames", 0) or 0) or max(frames) + 1
        if len(frames) == rows_per_chunk:
            return frames, total
    ad_params = transformer_options.get("ad_params")
    if isinstance(ad_params, dict) and ad_params.get("sub_idxs") is not None:
        frames = [int(i) for i in ad_params["sub_idxs"]]
        total = int(ad_params.get("full_length") or 0) or max(frames) + 1
        if len(frames) == rows_per_chunk:
            return frames, total
    return None


def core_patcher_class() -> type:
    """The ModelPatcher class core loaders build models with now: ``comfy.model_patcher.CoreModelPatcher``
    where it exists (0.33: ``main.py`` points it at ``ModelPatcherDynamic`` when dynamic VRAM is on,
    so it is read at call time, not import time), else ``ModelPatcher`` (0.8.0)."""
    try:
        return comfy.model_patcher.CoreModelPatcher
    except AttributeError:  # 0.8.0: every loader builds a plain ModelPatcher
        return comfy.model_patcher.ModelPatcher


#: ``ModelPatcher.cached_patcher_init``: the loader factory core calls to rebuild a model for a
#: MultiGPU deep clone or a non-dynamic delegate (0.33; 0.8.0 has neither).
PATCHERS_HAVE_FACTORIES = hasattr(comfy.model_patcher.ModelPatcher, "deepclone_multigpu")


def set_patcher_factory(patcher, factory, args: tuple) -> None:
    """Record how to rebuild ``patcher`` (``factory(*args, disable_dynamic=...)``) where core asks
    for it; a no-op on ComfyUI without MultiGPU deep clones."""
    if PATCHERS_HAVE_FACTORIES:
        patcher.cached_patcher_init = (factory, args)


def on_multigpu_clone(model, key: str, callback) -> None:
    """Call ``callback(original, clone)`` whenever core makes a clone of ``model`` for another
    device: its deep clone (``CallbacksMP.ON_DEEPCLONE_MULTIGPU``, after the clone's additional
    models were deep-cloned), and every re-clone of the main model that takes over the deep clone's
    additional models (``ON_MATCH_MULTIGPU_CLONES``, from ``match_multigpu_clones``, which the
    MultiGPU node and every sampling run call: its clone is the one the sampler runs on the other
    device). A no-op on ComfyUI without MultiGPU."""
    for name in ("ON_DEEPCLONE_MULTIGPU", "ON_MATCH_MULTIGPU_CLONES"):
        call_type = getattr(comfy.patcher_extension.CallbacksMP, name, None)
        if call_type is not None:
            model.add_callback_with_key(call_type, key, callback)
