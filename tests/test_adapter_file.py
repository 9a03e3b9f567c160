"""Adapter files: round trips, metadata, atomic writes, loading cost, and every refusal with a hand-made bad file."""

import json
import os
import pickle
import stat
import struct

import pytest
import torch
from safetensors.torch import save_file

import bps.adapter_file as adapter_file
from bps import AdapterError, BPSConfig, BPSNetwork, load_adapter, read_adapter_metadata, save_adapter
from bps.ports import PAPER_OMEGA, PORTS

TINY = BPSConfig(model_channels=32, time_embed_dim=64)
OMEGA = [0.5 + i for i in range(21)]


# Tiny tensors: one thread (conftest.py's one_thread) runs them faster than a thread pool.
pytestmark = pytest.mark.usefixtures("one_thread")


def random_network(config=TINY, seed=0):
    net = BPSNetwork(config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return net


@pytest.fixture(scope="module")
def net():
    return random_network()


@pytest.fixture(scope="module")
def good(tmp_path_factory, net):
    """A valid fp32 adapter (module-wide; tests must not modify it)."""
    path = tmp_path_factory.mktemp("good") / "good.safetensors"
    save_adapter(path, net, omega=OMEGA, dtype=torch.float32, hint_meaning="sketch",
                 provenance={"steps": 3, "data": "40 pairs"})
    return path


def test_fp32_round_trip_is_bit_exact_with_all_metadata(good, net):
    a = load_adapter(good)
    assert a.config == TINY and a.omega == OMEGA and a.hint_meaning == "sketch" and a.path == str(good)
    assert len(a.omega) == a.config.num_ports == 21
    ours = a.network.state_dict()
    assert ours.keys() == net.state_dict().keys()
    for k, v in net.state_dict().items():
        assert ours[k].dtype == torch.float32 and torch.equal(ours[k], v), k
    assert not a.network.training and not any(p.requires_grad for p in a.network.parameters())
    assert all(p.device.type == "cpu" for p in a.network.parameters())

    meta = a.metadata
    assert meta["format"] == "bps-adapter" and meta["format_version"] == 2 and meta["base_model"] == "sd15"
    assert meta["config"] == TINY.to_dict() and meta["omega"] == OMEGA
    assert meta["hint_channels"] == 1 and meta["extra_channels"] == 0 and meta["hint_meaning"] == "sketch"
    assert meta["omega_ports"] == [p.name for p in PORTS]
    assert "ResBlock" in meta["injection"] and "SpatialTransformer" in meta["injection"]
    assert "omega_i" in meta["injection"]
    assert meta["provenance"] == {"steps": 3, "data": "40 pairs"}
    assert read_adapter_metadata(good) == meta


def test_metadata_is_json_strings_on_disk(good):
    from safetensors import safe_open
    with safe_open(str(good), "pt") as f:
        raw = f.metadata()
    assert raw["format"] == "bps-adapter"
    assert json.loads(raw["config"]) == TINY.to_dict() and json.loads(raw["omega"]) == OMEGA
    assert json.loads(raw["hint_meaning"]) == "sketch" and json.loads(raw["format_version"]) == 2


def test_default_omega_and_dtype_is_paper_fp16(tmp_path, net):
    path = tmp_path / "d.safetensors"
    save_adapter(path, net)
    a = load_adapter(path)
    assert a.omega == list(PAPER_OMEGA) and a.network.dtype == torch.float16 and "provenance" not in a.metadata


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_dtypes_round_trip_and_load_dtype(tmp_path, net, dtype):
    path = tmp_path / "half.safetensors"
    save_adapter(path, net, dtype=dtype, hint_meaning="segmentation")
    a = load_adapter(path)
    assert a.network.dtype == dtype and a.hint_meaning == "segmentation"
    loaded = a.network.state_dict()
    for k, v in net.state_dict().items():
        assert loaded[k].dtype == dtype and torch.equal(loaded[k], v.to(dtype)), k
    up = load_adapter(path, dtype=torch.float32).network
    assert all(p.dtype == torch.float32 for p in up.parameters())
    assert torch.equal(up.input_blocks[0].weight, net.input_blocks[0].weight.to(dtype).float())


def test_style_adapter_round_trip_keeps_hint_layout(tmp_path):
    cfg = BPSConfig(hint_channels=3, extra_channels=1, model_channels=32, time_embed_dim=64)
    path = tmp_path / "style.safetensors"
    save_adapter(path, BPSNetwork(cfg), dtype=torch.float32, hint_meaning="style")
    meta = read_adapter_metadata(path)
    assert (meta["hint_channels"], meta["extra_channels"], meta["hint_meaning"]) == (3, 1, "style")
    assert load_adapter(path).config == cfg


def _as_format_1(tmp_path, good, name="v1.safetensors"):
    """``good`` as format version 1 wrote it: the middle port's zero conv named middle_block.2."""
    def rename(state):
        return {k.replace("zero_blocks.12.", "middle_block.2."): v for k, v in state.items()}
    return _rewrite(tmp_path, good, rename, metadata={"format_version": "1"}, name=name)


def test_format_1_files_load_quietly_with_the_middle_zero_conv_renamed(tmp_path, good, net, caplog, recwarn):
    """Files written before the middle zero conv took its official name (zero_blocks.12) keep loading."""
    old = _as_format_1(tmp_path, good)
    from safetensors import safe_open
    with safe_open(str(old), "pt") as f:
        assert "middle_block.2.weight" in f.keys() and "zero_blocks.12.weight" not in f.keys()
    with caplog.at_level("DEBUG"):
        a = load_adapter(old)
    assert not caplog.records and not recwarn.list  # nothing alarming: no warning, no log line
    assert a.metadata["format_version"] == 1 and a.omega == OMEGA and a.config == TINY
    ours = a.network.state_dict()
    assert ours.keys() == net.state_dict().keys()
    assert all(torch.equal(ours[k], v) for k, v in net.state_dict().items())
    # re-saving writes the current format with the official name
    save_adapter(tmp_path / "v2.safetensors", a.network, omega=a.omega, dtype=torch.float32)
    assert read_adapter_metadata(tmp_path / "v2.safetensors")["format_version"] == 2


@pytest.mark.parametrize("case, problem", [
    ("truncated", "the file is truncated"),
    ("new names in an old file", "2 missing tensor(s) (e.g. middle_block.2.weight"),
    ("nan", "'middle_block.2.bias' contains NaN or infinite"),
])
def test_damaged_format_1_files_are_refused_naming_the_file(tmp_path, good, case, problem):
    if case == "truncated":
        full = _as_format_1(tmp_path, good, "full.safetensors")
        path = _write(tmp_path, "cut.safetensors", full.read_bytes()[:-1000])
    elif case == "new names in an old file":
        path = _rewrite(tmp_path, good, metadata={"format_version": "1"})
    else:
        full = _as_format_1(tmp_path, good, "full.safetensors")
        path = _rewrite(tmp_path, full, lambda s: {**s, "middle_block.2.bias": torch.full_like(
            s["middle_block.2.bias"], float("nan"))})
    with pytest.raises(AdapterError) as err:
        load_adapter(path)
    assert repr(str(path)) in str(err.value) and problem in str(err.value), str(err.value)


def test_save_refuses_bad_arguments(tmp_path, net):
    with pytest.raises(ValueError, match="safetensors"):
        save_adapter(tmp_path / "a.ckpt", net)
    with pytest.raises(ValueError, match="dtype"):
        save_adapter(tmp_path / "a.safetensors", net, dtype=torch.float64)
    with pytest.raises(ValueError, match="21 finite weights"):
        save_adapter(tmp_path / "a.safetensors", net, omega=[1.0] * 20)
    with pytest.raises(ValueError, match="21 finite weights"):
        save_adapter(tmp_path / "a.safetensors", net, omega=[float("nan")] * 21)
    with pytest.raises(ValueError, match="hint_meaning"):
        save_adapter(tmp_path / "a.safetensors", net, hint_meaning=" ")
    assert os.listdir(tmp_path) == []


def test_save_refuses_non_finite_weights(tmp_path):
    broken = random_network(seed=3)
    with torch.no_grad():
        broken.zero_blocks["12"].bias[0] = float("inf")
    with pytest.raises(AdapterError, match=r"'zero_blocks\.12\.bias' contains NaN or infinite"):
        save_adapter(tmp_path / "x.safetensors", broken)
    big = random_network(seed=3)
    with torch.no_grad():
        big.zero_blocks["12"].bias[0] = 1e6  # finite in fp32, overflows fp16
    with pytest.raises(AdapterError, match="torch.float32"):
        save_adapter(tmp_path / "x.safetensors", big, dtype=torch.float16)
    save_adapter(tmp_path / "x.safetensors", big, dtype=torch.float32)
    assert load_adapter(tmp_path / "x.safetensors").network.zero_blocks["12"].bias[0] == 1e6
    assert sorted(os.listdir(tmp_path)) == ["x.safetensors"]


def _broken_save_file(tensors, filename, metadata=None):
    with open(filename, "wb") as f:
        f.write(b"partial")
    raise OSError("disk full")


def test_save_is_atomic_when_replacing(tmp_path, good, net, monkeypatch):
    target = tmp_path / "adapter.safetensors"
    target.write_bytes(good.read_bytes())
    os.chmod(target, 0o640)
    before = target.read_bytes()
    monkeypatch.setattr(adapter_file, "save_file", _broken_save_file)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(target, net)
    assert target.read_bytes() == before and load_adapter(target).omega == OMEGA
    assert os.listdir(tmp_path) == ["adapter.safetensors"]  # no temp file left
    monkeypatch.undo()
    save_adapter(target, net, omega=[2.0] * 21)  # a successful replace keeps the file's mode
    assert load_adapter(target).omega == [2.0] * 21 and stat.S_IMODE(os.stat(target).st_mode) == 0o640
    assert os.listdir(tmp_path) == ["adapter.safetensors"]


def test_save_is_atomic_for_a_new_file(tmp_path, net, monkeypatch):
    monkeypatch.setattr(adapter_file, "save_file", _broken_save_file)
    with pytest.raises(OSError):
        save_adapter(tmp_path / "new.safetensors", net)
    assert os.listdir(tmp_path) == []
    monkeypatch.undo()
    save_adapter(tmp_path / "new.safetensors", net)
    mode = stat.S_IMODE(os.stat(tmp_path / "new.safetensors").st_mode)
    assert mode == 0o666 & ~adapter_file._umask()  # not mkstemp's owner-only 0600


def test_loading_assigns_the_read_tensors_without_extra_copies(good, monkeypatch):
    built_on, read_ptrs = [], set()
    real_network, real_open = adapter_file.BPSNetwork, adapter_file.safe_open

    def spy_network(config):
        n = real_network(config)
        built_on.append({p.device.type for p in n.parameters()})
        return n

    class SpyOpen:
        def __init__(self, *a, **k):
            self.f = real_open(*a, **k)

        def __enter__(self):
            self.inner = self.f.__enter__()
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

        def get_tensor(self, name):
            t = self.inner.get_tensor(name)
            read_ptrs.add(t.data_ptr())
            return t

    monkeypatch.setattr(adapter_file, "BPSNetwork", spy_network)
    monkeypatch.setattr(adapter_file, "safe_open", SpyOpen)
    a = load_adapter(good)
    assert built_on == [{"meta"}]  # constructed without memory
    params = list(a.network.parameters())
    assert {p.data_ptr() for p in params} <= read_ptrs  # the tensors read are the parameters: no copy
    assert len(params) == len(read_ptrs)


def test_read_adapter_metadata_reads_only_the_header(good, monkeypatch):
    monkeypatch.setattr(adapter_file, "safe_open", lambda *a, **k: pytest.fail("tensor data was read"))
    assert read_adapter_metadata(good)["omega"] == OMEGA


def test_loading_never_unpickles(tmp_path, monkeypatch):
    for name, data in [("evil.safetensors", pickle.dumps({"x": 1}, protocol=4)), ("evil2.ckpt", b"")]:
        path = tmp_path / name
        if data:
            path.write_bytes(data)
        else:
            torch.save({"state_dict": {}}, path)
        for mod, attr in [(pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load")]:
            monkeypatch.setattr(mod, attr, lambda *a, **k: pytest.fail(f"{attr} called"))
        with pytest.raises(AdapterError, match="python -m bps.convert_official"):
            load_adapter(path)
        monkeypatch.undo()


# ---- refusals: one hand-made bad file per problem ------------------------------------------------

def _rewrite(tmp_path, good, tensors=None, metadata=None, drop=(), name="bad.safetensors"):
    """Re-save ``good`` with other tensors and/or raw metadata entries changed or dropped."""
    from safetensors import safe_open
    with safe_open(str(good), "pt") as f:
        raw = dict(f.metadata())
        state = {k: f.get_tensor(k) for k in f.keys()}
    raw.update(metadata or {})
    for key in drop:
        raw.pop(key)
    path = tmp_path / name
    save_file({k: v.contiguous() for k, v in (state if tensors is None else tensors(state)).items()}, str(path),
              metadata=raw or None)
    return path


def _first(state):
    return next(iter(state))


def _poison(value):
    def edit(state):
        t = state[_first(state)].clone()
        t.view(-1)[5] = value
        return {**state, _first(state): t}
    return edit


def _header_edit(good, tmp_path, edit):
    data = good.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = edit(data[8:8 + n])
    path = tmp_path / "edited.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + data[8 + n:])
    return path


def _write(tmp_path, name, data):
    path = tmp_path / name
    path.write_bytes(data)
    return path


def _zip_ckpt(tmp_path):
    path = tmp_path / "official.ckpt"
    torch.save({"state_dict": {"a": torch.zeros(2)}}, path)
    return path


CONVERT = "python -m bps.convert_official"
AGAIN = "Download or copy the file again"
RESAVE = "Re-save the adapter"

# case -> (make bad file, problem text, fix text)
CASES = {
    "text file": (lambda t, g: _write(t, "notes.safetensors", b"hello, I am a text file, not an adapter\n"),
                  "not a safetensors file", CONVERT),
    "empty file": (lambda t, g: _write(t, "empty.safetensors", b""), "too short", AGAIN),
    "pickle": (lambda t, g: _write(t, "official.pth", pickle.dumps({"state_dict": {}}, protocol=2)),
               "pickle checkpoint", CONVERT),
    "torch zip ckpt": (lambda t, g: _zip_ckpt(t), "zip checkpoint written by torch.save", CONVERT),
    "truncated header": (lambda t, g: _write(t, "cut.safetensors", g.read_bytes()[:50]), "truncated", AGAIN),
    "truncated data": (lambda t, g: _write(t, "cut.safetensors", g.read_bytes()[:-1000]), "truncated", AGAIN),
    "corrupt header": (lambda t, g: _header_edit(g, t, lambda h: h.replace(b'"', b"'", 7)),
                       "header is corrupt", AGAIN),
    "corrupt entry": (lambda t, g: _header_edit(g, t, lambda h: h.replace(b'"data_offsets":[0,',
                                                                         b'"data_offsets":[1,', 1)),
                      "header entry of tensor", AGAIN),
    "garbled metadata": (lambda t, g: _header_edit(g, t, lambda h: h.replace(b'"format":"bps-adapter"',
                                                                            b'"format":["bps-adapter"]')),
                         "metadata is garbled", RESAVE),
    "missing tensor": (lambda t, g: _rewrite(t, g, lambda s: {k: v for k, v in s.items()
                                                             if k != "zero_blocks.12.bias"}),
                       "1 missing tensor(s) (e.g. zero_blocks.12.bias)", "re-save or re-convert"),
    "unexpected tensor": (lambda t, g: _rewrite(t, g, lambda s: {**s, "zero_blocks.3.weight":
                                                                 torch.zeros(32, 32, 3, 3)}),
                          "1 unexpected tensor(s) (e.g. zero_blocks.3.weight)", "re-save or re-convert"),
    "wrong shape": (lambda t, g: _rewrite(t, g, lambda s: {**s, "zero_blocks.12.bias": torch.zeros(3)}),
                    "'zero_blocks.12.bias' has shape (3,), expected (128,)", "re-save or re-convert"),
    "nan": (lambda t, g: _rewrite(t, g, _poison(float("nan"))), "NaN or infinite", "use an earlier checkpoint"),
    "inf": (lambda t, g: _rewrite(t, g, _poison(float("-inf"))), "NaN or infinite", "use an earlier checkpoint"),
    "newer version": (lambda t, g: _rewrite(t, g, metadata={"format_version": "3"}),
                      "format version 3 is newer", "Update ComfyUI-BPS"),
    "garbled version": (lambda t, g: _rewrite(t, g, metadata={"format_version": '"one"'}),
                        "not a version number", RESAVE),
    "sdxl without shape": (lambda t, g: _rewrite(t, g, metadata={"base_model": '"sdxl"'}, drop=["unet"]),
                           "made for base model 'sdxl' but records no UNet shape", "Use an adapter trained for SD1.5"),
    "base contradicts shape": (lambda t, g: _rewrite(t, g, metadata={"base_model": '"sdxl"'}),
                               "base model 'sdxl' but the UNet of SD1.5-layout UNet at model_channels 32", RESAVE),
    "garbled shape": (lambda t, g: _rewrite(t, g, metadata={"unet": '{"model_channels": 32}'}),
                      "its UNet shape is invalid", RESAVE),
    "no metadata": (lambda t, g: _write_plain(t, g), "has no metadata", RESAVE),
    "other format": (lambda t, g: _rewrite(t, g, metadata={"format": "pt"}), "not a BPS adapter", RESAVE),
    "missing omega": (lambda t, g: _rewrite(t, g, drop=["omega"]), "metadata 'omega' is missing", RESAVE),
    "missing version": (lambda t, g: _rewrite(t, g, drop=["format_version"]), "'format_version' is missing", RESAVE),
    "garbled config": (lambda t, g: _rewrite(t, g, metadata={"config": "{model_channels: 32"}),
                       "metadata 'config' is garbled", RESAVE),
    "bad config": (lambda t, g: _rewrite(t, g, metadata={"config": '{"model_channels": 33}'}),
                   "architecture config is invalid", RESAVE),
    "short omega": (lambda t, g: _rewrite(t, g, metadata={"omega": "[1, 2]"}),
                    "omega must be 21 finite numbers", RESAVE),
    "wrong dtype": (lambda t, g: _rewrite(t, g, lambda s: {**s, _first(s): s[_first(s)].double()}),
                    "has dtype F64", RESAVE),
}


def _write_plain(tmp_path, good):
    path = tmp_path / "plain.safetensors"
    save_file({k: v.contiguous() for k, v in load_adapter(good).network.state_dict().items()}, str(path))
    return path


@pytest.mark.parametrize("case", list(CASES))
def test_refusals_name_the_file_problem_and_fix(tmp_path, good, case):
    make, problem, fix = CASES[case]
    path = make(tmp_path, good)
    with pytest.raises(AdapterError) as err:
        load_adapter(path)
    message = str(err.value)
    assert repr(str(path)) in message, message
    assert problem in message, message
    assert fix in message, message
    assert isinstance(err.value, ValueError)
    if case not in ("missing tensor", "unexpected tensor", "wrong shape", "nan", "inf", "wrong dtype"):
        # header-level problems are found by read_adapter_metadata too, without reading tensors
        with pytest.raises(AdapterError, match="BPS adapter"):
            read_adapter_metadata(path)


def test_missing_file_is_an_adapter_error(tmp_path):
    with pytest.raises(AdapterError, match="cannot read the file"):
        load_adapter(tmp_path / "nope.safetensors")


def test_full_sd15_network_size_on_meta():
    """The SD1.5 1-channel network holds 672,093,120 numbers (1.34 GB in fp16); see test_convert_official."""
    with torch.device("meta"):
        full = BPSNetwork(BPSConfig())
    assert sum(p.numel() for p in full.parameters()) == 672_093_120
