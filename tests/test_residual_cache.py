"""bps/residual_cache.py on its own (no ComfyUI): keys that miss on every change, LRU within a budget."""

from __future__ import annotations

import torch

from bps.network import BPSConfig, BPSNetwork
from bps.residual_cache import ResidualCache, budget_from_env, network_identity, residual_key, tensor_digest

TINY = BPSConfig(model_channels=32, time_embed_dim=64)


def _outs(n_bytes_each: int, count: int = 2) -> list[torch.Tensor]:
    return [torch.zeros(n_bytes_each // 4) for _ in range(count)]


def test_least_recently_used_entries_go_first_within_the_budget():
    cache = ResidualCache(budget_bytes=3000)
    assert cache.put("a", _outs(400)) and cache.put("b", _outs(400)) and cache.put("c", _outs(400))
    assert cache.nbytes == 2400 and len(cache) == 3
    assert cache.get("a", "cpu") is not None      # a is now the most recent
    assert cache.put("d", _outs(400))             # 3200 > 3000: b (least recent) goes
    assert cache.get("b", "cpu") is None and cache.get("a", "cpu") is not None
    assert cache.evictions == 1 and cache.nbytes == 2400
    assert not cache.put("huge", _outs(4000))     # alone over the budget: not kept, nothing evicted
    assert len(cache) == 3 and cache.hits == 2 and cache.misses == 1


def test_a_zero_budget_stores_nothing(monkeypatch):
    cache = ResidualCache(budget_bytes=0)
    assert not cache.enabled and not cache.put("a", _outs(8)) and cache.get("a", "cpu") is None
    monkeypatch.setenv("BPS_RESIDUAL_CACHE_MB", "0")
    assert budget_from_env() == 0
    monkeypatch.setenv("BPS_RESIDUAL_CACHE_MB", "2")
    assert budget_from_env() == 2 * 2 ** 20
    monkeypatch.delenv("BPS_RESIDUAL_CACHE_MB")
    assert budget_from_env() == 1024 * 2 ** 20


def test_hits_return_the_stored_bits_on_the_storage_device():
    cache = ResidualCache(budget_bytes=10 ** 6, storage_device="cpu")
    outs = [torch.randn(1, 4, 3, 3), torch.randn(1, 8, 2, 2)]
    cache.put("k", outs)
    got = cache.get("k", "cpu")
    assert all(torch.equal(a, b) for a, b in zip(got, outs))


def test_the_key_changes_with_everything_the_residuals_depend_on():
    net, other = BPSNetwork(TINY), BPSNetwork(TINY)
    hint = torch.rand(1, 1, 16, 16)
    emb = torch.randn(1, 64)
    digest = [tensor_digest(hint[0])]
    base = residual_key(net, digest, emb, (2, 2), torch.device("cpu"), torch.float32)
    assert base == residual_key(net, [tensor_digest(hint[0].clone())], emb.clone(), (2, 2), torch.device("cpu"),
                                torch.float32)
    changed_hint = hint.clone()
    changed_hint[0, 0, 3, 5] += 1e-3
    variants = [
        residual_key(other, digest, emb, (2, 2), torch.device("cpu"), torch.float32),          # another adapter
        residual_key(net, [tensor_digest(changed_hint[0])], emb, (2, 2), torch.device("cpu"), torch.float32),
        residual_key(net, digest, emb + 1e-6, (2, 2), torch.device("cpu"), torch.float32),     # timestep / UNet
        residual_key(net, digest, emb, (2, 3), torch.device("cpu"), torch.float32),            # latent size
        residual_key(net, digest, emb, (2, 2), torch.device("cpu"), torch.float16),            # dtype
        residual_key(net, digest, emb, (2, 2), torch.device("meta"), torch.float32),           # device
    ]
    assert all(v != base for v in variants)
    assert tensor_digest(torch.zeros(2, 2)) != tensor_digest(torch.zeros(4))                   # shape counts
    assert tensor_digest(torch.zeros(2, dtype=torch.bfloat16)) != tensor_digest(torch.zeros(1))


def test_an_in_place_weight_change_changes_the_network_identity():
    net = BPSNetwork(TINY)
    token, version = network_identity(net)
    assert network_identity(net) == (token, version)
    with torch.no_grad():
        next(net.parameters()).add_(1.0)     # what an optimiser step does
    assert network_identity(net) == (token, version + 1)
    with torch.inference_mode():             # ComfyUI loads adapters under inference mode
        loaded = BPSNetwork(TINY)
    assert network_identity(loaded)[0] not in (token, network_identity(BPSNetwork(TINY))[0])
