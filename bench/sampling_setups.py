"""The three sampling setups bench_sampling.py compares: plain SD1.5, + BPS, + ControlNet.

Requires ComfyUI to be booted (bench.comfy_unet.boot_comfyui) before import.
"""

from __future__ import annotations

from typing import Callable

import torch


def build_setups(size: int, dtype: torch.dtype | None) -> tuple[dict[str, Callable[[int], None]], str]:
    """Return {"plain", "bps", "bps_cached", "controlnet"} -> run(steps), and a one-line description.

    "bps" computes B_phi at every step; "bps_cached" keeps its residuals in a residual cache of
    its own, so after one run with the same steps it computes none."""
    from bench.comfy_unet import boot_comfyui, random_sd15_model

    pack = boot_comfyui()
    import comfy.model_management
    import comfy.sample
    import nodes as comfy_nodes
    bps, steering = pack.bps, pack.nodes.steering
    model = random_sd15_model(dtype, seed=0)
    unet_dtype = model.model.get_dtype()
    latent = torch.zeros(1, 4, size // 8, size // 8)
    gen = torch.Generator().manual_seed(0)
    positive = [[torch.randn(1, 77, 768, generator=gen), {}]]
    negative = [[torch.randn(1, 77, 768, generator=gen), {}]]
    hint = torch.rand(1, size, size, 3, generator=gen)  # ComfyUI IMAGE layout: B, H, W, C

    network = bps.BPSNetwork(bps.BPSConfig()).eval()
    with torch.no_grad():
        for p in network.parameters():
            p.normal_(0, 0.01, generator=gen)
    adapter = bps.Adapter(network=network, omega=list(bps.PAPER_OMEGA), config=network.config,
                          metadata={}, path=None, hint_meaning="sketch")
    condition, schedule = hint.movedim(-1, 1), bps.make_schedule(adapter.omega, strength=1.0)
    # No residual cache: every timed run recomputes B_phi, which is what this benchmark profiles
    # (bench_server.py measures the cache through the server).
    steered = steering.attach_bps(model, adapter, condition, schedule, cache=None)
    # The same adapter and hint through a residual cache of its own, warmed by the caller: what a
    # re-run of a workflow with a new seed costs.
    cached = steering.attach_bps(model, adapter, condition, schedule,
                                 cache=pack.bps.residual_cache.ResidualCache(2 ** 30))

    control = pack.train.random_checkpoint.random_sd15_controlnet(seed=2)
    cn_pos, cn_neg = comfy_nodes.ControlNetApplyAdvanced().apply_controlnet(
        positive, negative, control, hint, 1.0, 0.0, 1.0)

    def sampler(m, pos, neg) -> Callable[[int], None]:
        def run(steps: int) -> None:
            noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(1))
            comfy.sample.sample(m, noise, steps, 7.0, "euler", "normal", pos, neg, latent,
                                denoise=1.0, disable_pbar=True, seed=1)
        return run

    setups = {
        "plain": sampler(model, positive, negative),
        "bps": sampler(steered, positive, negative),
        "bps_cached": sampler(cached, positive, negative),
        "controlnet": sampler(model, cn_pos, cn_neg),
    }
    device = comfy.model_management.get_torch_device()
    return setups, f"device={device} unet_dtype={unet_dtype}"
