"""Adapter files: round trips, metadata, atomic writes, and every refusal with a hand-made bad file."""

import json
import os
import pickle
import struct

import pytest
import torch
from safetensors.torch import save_file

import bps.adapter_file as adapter_file
from bps import AdapterError, BPSConfig, BPSNetwork, load_adapter, read_adapter_metadata, save_adapter
from bps.ports import PAPER_OMEGA

TINY = BPSConfig(model_channels=32, time_embed_dim=64)


@pytest.fixture
def net():
    n = BPSNetwork(TINY)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in n.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return n


@pytest.fixture
def good(tmp_path, net):
    path = tmp_path / "good.safetensors"
    save_adapter(path, net, dtype=torch.float32, hint_meaning="sketch", provenance={"steps": 3})
    return path


def test_fp32_round_trip_is_bit_exact_with_metadata(good, net):
    a = load_adapter(good)
    assert a.config == TINY and a.omega == list(PAPER_OMEGA) and a.hint_meaning == "sketch"
    assert a.metadata["provenance"] == {"steps": 3} and a.metadata["base_model"] == "sd15"
    assert "SpatialTransformer" in a.metadata["injection"]
    for k, v in net.state_dict().items():
        assert torch.equal(a.network.state_dict()[k], v), k
    assert not a.network.training and not any(p.requires_grad for p in a.network.parameters())
    assert read_adapter_metadata(good)["config"] == TINY.to_dict()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_dtypes_and_load_dtype(tmp_path, net, dtype):
    path = tmp_path / "half.safetensors"
    save_adapter(path, net, dtype=dtype, omega=[1.0] * 21)
    a = load_adapter(path)
    assert a.network.dtype == dtype and a.omega == [1.0] * 21
    for k, v in net.state_dict().items():
        assert torch.equal(a.network.state_dict()[k], v.to(dtype))
    assert load_adapter(path, dtype=torch.float32).network.dtype == torch.float32


def test_save_is_atomic(tmp_path, good, net, monkeypatch):
    before = good.read_bytes()

    def broken(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(adapter_file, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(good, net)
    assert good.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["good.safetensors"]


def _rewrite(tmp_path, good, tensors=None, metadata=None, name="bad.safetensors"):
    a = load_adapter(good)
    tensors = dict(a.network.state_dict()) if tensors is None else tensors
    raw_meta = {k: (v if isinstance(v, str) and k == "format" else json.dumps(v)) for k, v in a.metadata.items()}
    raw_meta.update(metadata or {})
    path = tmp_path / name
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=raw_meta)
    return path


def _bad_file(tmp_path, good, case):
    """Write the hand-made bad file for ``case``; return (path, expected problem text)."""
    state = dict(load_adapter(good).network.state_dict())
    first = next(iter(state))

    def raw(name, data):
        path = tmp_path / name
        path.write_bytes(data)
        return path

    def corrupt_header():
        data = good.read_bytes()
        (n,) = struct.unpack("<Q", data[:8])
        return raw("corrupt.safetensors", data[:8] + b"{" * n + data[8 + n:])

    def with_tensor(value):
        return _rewrite(tmp_path, good, {**state, first: value})

    nan = state[first].clone()
    nan.view(-1)[0] = float("nan")
    cases = {
        "text": (lambda: raw("notes.safetensors", b"hello, I am not an adapter"), "not a safetensors file"),
        "pickle": (lambda: raw("official.ckpt", pickle.dumps({"state_dict": {}}, protocol=2)),
                   "pickle/zip checkpoint"),
        "truncated": (lambda: raw("truncated.safetensors", good.read_bytes()[:-1000]), "truncated"),
        "corrupt header": (corrupt_header, "header is corrupt"),
        "missing": (lambda: _rewrite(tmp_path, good, {k: v for k, v in state.items() if k != first}),
                    "1 missing tensors"),
        "unexpected": (lambda: _rewrite(tmp_path, good, {**state, "extra.weight": torch.zeros(2)}),
                       "1 unexpected tensors (e.g. extra.weight)"),
        "shape": (lambda: with_tensor(torch.zeros(3, 3)), "has shape (3, 3)"),
        "nan": (lambda: with_tensor(nan), "NaN or infinite"),
        "version": (lambda: _rewrite(tmp_path, good, metadata={"format_version": "99"}), "Update ComfyUI-BPS"),
        "base model": (lambda: _rewrite(tmp_path, good, metadata={"base_model": '"sdxl"'}),
                       "made for base model 'sdxl'"),
        "no metadata": (lambda: _rewrite(tmp_path, good, metadata={"format": "other"}), "no BPS adapter metadata"),
        "omega": (lambda: _rewrite(tmp_path, good, metadata={"omega": "[1, 2]"}), "omega must be 21 finite numbers"),
    }
    make, problem = cases[case]
    return make(), problem


@pytest.mark.parametrize("case", ["text", "pickle", "truncated", "corrupt header", "missing", "unexpected",
                                  "shape", "nan", "version", "base model", "no metadata", "omega"])
def test_refusals_name_the_file_problem_and_fix(tmp_path, good, case):
    path, problem = _bad_file(tmp_path, good, case)
    with pytest.raises(AdapterError) as err:
        load_adapter(path)
    message = str(err.value)
    assert str(path) in message and problem in message
    assert message.endswith(".") and message.count(". ") >= 1, message  # a fix sentence follows the problem
    assert isinstance(err.value, ValueError)


def test_pickle_is_never_unpickled(tmp_path, monkeypatch):
    path = tmp_path / "evil.safetensors"
    path.write_bytes(pickle.dumps({"x": 1}, protocol=2))
    monkeypatch.setattr(pickle, "load", lambda *a, **k: pytest.fail("unpickled"))
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load called"))
    with pytest.raises(AdapterError, match="convert_official"):
        load_adapter(path)


def test_sd15_adapter_loads_without_full_extra_copy(tmp_path):
    with torch.device("meta"):
        full = BPSNetwork(BPSConfig())
    assert sum(p.numel() for p in full.parameters()) == 672_093_120
