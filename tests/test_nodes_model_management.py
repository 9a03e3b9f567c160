"""The adapter's ModelPatcher as current ComfyUI builds models: the core patcher class, a
``cached_patcher_init`` factory, and core's MultiGPU deep clone of a steered model (ComfyUI 0.33;
on 0.8.0, which has neither, the factory is not recorded and the plain patcher steers as before)."""

from __future__ import annotations

from importlib import import_module

import torch

import comfy_host

LATENT = 8


def _inputs(rows=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, 4, LATENT, LATENT, generator=g), torch.randn(rows, 77, 768, generator=g),
            torch.full((rows,), 650.0))


def _forward(steering, model, x, context, t):
    import comfy.model_management
    comfy.model_management.load_models_gpu([model])
    options = steering.transformer_options_for(model)
    options["cond_or_uncond"] = [0, 1]
    with torch.no_grad():
        return model.model.diffusion_model(x, t, context=context, transformer_options=options)


def _hint(seed=3):
    return torch.rand(1, 1, LATENT * 8, LATENT * 8, generator=torch.Generator().manual_seed(seed))


def _file_adapter(pack, full_adapter, path):
    """``full_adapter`` saved to ``path`` in fp32 and named by it, as Load BPS Adapter hands it on
    (its network object reused: a full-width B_phi is 2.6 GB, and these tests hold a few)."""
    import gc
    pack.bps.save_adapter(path, full_adapter.network, dtype=torch.float32)
    gc.collect()
    return pack.bps.Adapter(full_adapter.network, list(full_adapter.omega), full_adapter.config, {}, str(path),
                            "sketch")


def _bps_key(model):
    (key,) = [k for k in model.additional_models if k.startswith("bps_steering")]
    return key


def test_adapter_patcher_is_built_as_core_loaders_build_theirs(pack, steering, sd15, full_adapter, tmp_path):
    import comfy.model_patcher
    compat = import_module(f"{pack.__name__}.nodes.comfy_compat")
    management = import_module(f"{pack.__name__}.nodes.model_management")
    import gc
    path = tmp_path / "sketch.safetensors"
    adapter = _file_adapter(pack, full_adapter, path)
    sched = pack.bps.make_schedule(adapter.omega)
    steered = steering.attach_bps(sd15, adapter, _hint(), sched, cache=None)
    patcher = steered.additional_models[_bps_key(steered)][0]
    core = compat.core_patcher_class()
    assert core is vars(comfy.model_patcher).get("CoreModelPatcher", comfy.model_patcher.ModelPatcher)
    # What core itself builds for this device (on a CPU, ModelPatcherDynamic hands back a ModelPatcher).
    assert type(patcher) is type(core(torch.nn.Linear(1, 1), load_device=patcher.load_device,
                                      offload_device=patcher.offload_device))
    assert compat.PATCHERS_HAVE_FACTORIES == hasattr(comfy.model_patcher.ModelPatcher, "deepclone_multigpu")
    if not compat.PATCHERS_HAVE_FACTORIES:  # 0.8.0: nothing to rebuild for
        assert getattr(patcher, "cached_patcher_init", None) is None
        return
    factory, args = patcher.cached_patcher_init
    # The file, in the dtype the UNet computes in, as the steered model uses it.
    assert factory is management.rebuild_adapter_patcher and args == (str(path), torch.float32)
    assert patcher.model is adapter.network
    # The factory re-reads the file into a network of its own, also as a non-dynamic delegate.
    for dynamic in (True, False):
        rebuilt = factory(*args) if dynamic else factory(*args, disable_dynamic=True)
        assert rebuilt.model is not patcher.model
        assert type(rebuilt) is type(patcher) or type(rebuilt) is comfy.model_patcher.ModelPatcher
        for (name, mine), theirs in zip(patcher.model.state_dict().items(), rebuilt.model.state_dict().values()):
            assert torch.equal(mine, theirs), name
        del rebuilt
        gc.collect()
    # Steering through it is today's, bit for bit: the same network object computes the residuals.
    x, context, t = _inputs()
    plain_patcher = steering.attach_bps(sd15, adapter, _hint(), sched, cache=None)
    assert torch.equal(_forward(steering, steered, x, context, t), _forward(steering, plain_patcher, x, context, t))
    # A network built in memory (no file: its patcher's factory gets the network) is rebuilt from
    # its weights.
    copy = factory(full_adapter.network, torch.float32).model
    assert copy is not full_adapter.network
    assert all(torch.equal(a, b) for a, b in zip(full_adapter.network.state_dict().values(),
                                                 copy.state_dict().values()))
    del copy
    gc.collect()


def test_core_multigpu_deepclone_gives_every_clone_its_own_bphi(pack, steering, sd15, full_adapter, tmp_path):
    """Core's MultiGPU preparation (``comfy.multigpu.create_multigpu_deepclones``, what the MultiGPU
    CFG Split node runs) on a steered model: no error, and the clone it hands the sampler for the
    second device steers exactly as the original, with its own B_phi copy.

    Core deep-clones the model for each extra device and then re-clones the main model for it
    (``match_multigpu_clones``, again at every sampling run) keeping only the deep clone's
    additional models, so the wrapper must follow B_phi's copy through both steps.

    A CPU machine lists one device, so core would clone nothing: ``get_all_torch_devices`` is
    widened for this test to add ``torch.device("cpu", 0)`` (unequal to ``cpu``, same memory).
    Only that hardware list is replaced; everything else is core's code."""
    from unittest import mock

    import comfy.model_management
    import comfy.model_patcher
    import comfy.patcher_extension
    if not hasattr(comfy.model_patcher.ModelPatcher, "deepclone_multigpu"):
        # 0.8.0 has no MultiGPU: attaching registers no deep-clone callback (there is no such event).
        assert not hasattr(comfy.patcher_extension.CallbacksMP, "ON_DEEPCLONE_MULTIGPU")
        return
    # Named at run time: this branch runs on 0.33 only, and comfy-import-guard reads the pack against
    # 0.8.0 too, where a static reference to MultiGPU's module and device list reads as a break.
    multigpu = import_module("comfy.multigpu")
    # A core loader records how to rebuild its model; the random SD1.5 "loader" is its seed (the
    # sd15 fixture is seed 0). A clone shares the fixture's weights, so only the deep clone adds a UNet.
    base = sd15.clone()
    base.cached_patcher_init = (comfy_host.random_sd15_model, (0,))
    adapter = _file_adapter(pack, full_adapter, tmp_path / "sketch.safetensors")
    steered = steering.attach_bps(base, adapter, _hint(), pack.bps.make_schedule(adapter.omega), cache=None)
    x, context, t = _inputs()
    before = _forward(steering, steered, x, context, t)

    second = torch.device("cpu", 0)

    def two_devices(exclude_current=False):  # what a CPU machine lists, and the second device
        return [comfy.model_management.get_torch_device(), second]

    with mock.patch.object(comfy.model_management, "get_all_torch_devices", two_devices):
        split = multigpu.create_multigpu_deepclones(steered, max_gpus=2)
        (clone,) = split.get_additional_models_with_key("multigpu")
        assert clone.load_device == second and clone.model is not steered.model
        key = _bps_key(steered)
        original_net = steered.additional_models[key][0].model
        clone_net = clone.additional_models[key][0].model
        assert clone_net is not original_net
        (wrapper,) = clone.wrappers["diffusion_model"][key]
        assert wrapper.attachment.network is clone_net, "the second device's wrapper steers with another B_phi"
        for model in (steered, split):
            (original_wrapper,) = model.wrappers["diffusion_model"][key]
            assert original_wrapper.attachment.network is original_net
        # Sampling runs every device with the main model's wrappers, each cast to its device by
        # core (comfy.samplers.cast_transformer_options): the second device's is the clone's.
        assert original_wrapper.to(second) is wrapper
        for other in (torch.device("cpu"), torch.float32):
            assert original_wrapper.to(other) is original_wrapper
        assert torch.equal(_forward(steering, clone, x, context, t), before)
        assert torch.equal(_forward(steering, split, x, context, t), before)
        # Each steers with its own copy: changing the clone's B_phi changes the clone only.
        with torch.no_grad():
            for p in clone_net.parameters():
                p.mul_(0.5)
        assert not torch.equal(_forward(steering, clone, x, context, t), before)
        assert torch.equal(_forward(steering, split, x, context, t), before)
        # Sampling re-matches the clones (comfy.sampler_helpers.prepare_sampling): still its own copy.
        split.match_multigpu_clones()
        (clone,) = split.get_additional_models_with_key("multigpu")
        (wrapper,) = clone.wrappers["diffusion_model"][key]
        assert wrapper.attachment.network is clone_net and original_wrapper.to(second) is wrapper
        del clone, split, wrapper, original_wrapper
        comfy_host.release_memory()


def test_the_adapter_keeps_its_patcher_for_as_long_as_a_node_output_holds_it(pack, steering, sd15, full_adapter,
                                                                              tmp_path):
    """ComfyUI's executor keeps Load BPS Adapter's output (the adapter) across prompts while every
    new Apply BPS output replaces the steered model that held the adapter's patcher. Core's model
    management calls a patcher that died while its network lives a memory leak (a warning, the dead
    entry still counted as loaded, a second patcher of the same weights at the next prompt), so the
    patcher must live exactly as long as the adapter."""
    import gc
    import weakref
    import comfy.model_management
    adapter = _file_adapter(pack, full_adapter, tmp_path / "sketch.safetensors")
    schedule = pack.bps.make_schedule(adapter.omega)
    steered = steering.attach_bps(sd15, adapter, _hint(), schedule, cache=None)
    comfy.model_management.load_models_gpu([steered])
    patcher = weakref.ref(steered.additional_models[_bps_key(steered)][0])
    del steered
    gc.collect()
    assert patcher() is not None
    assert not any(m.is_dead() for m in comfy.model_management.current_loaded_models)
    again = steering.attach_bps(sd15, adapter, _hint(), schedule, cache=None)
    assert again.additional_models[_bps_key(again)][0] is patcher()  # one patcher per network, not a second
    del again, adapter
    gc.collect()
    assert patcher() is None, "the patcher outlived the adapter that held it"
    comfy_host.release_memory()
