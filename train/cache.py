"""Disk cache of VAE latents, prepared hints and CLIP text embeddings, keyed by content.

Encoding is the only part of a step that does not depend on the adapter, so it is done once:
each pair's latent + hint lives in ``samples/<key>.safetensors`` and each prompt's embedding in
``text/<key>.safetensors`` (for SDXL with the pooled CLIP-G output next to it). A key hashes the image bytes (or the prompt), the training size, the
hint channels and the base checkpoint's identity (and, for conditions made from the target with
``--condition``, the preprocessor, its parameters and its algorithm version), so changed data,
another checkpoint or another preprocessor setting never reuses a stale entry, and unchanged
pairs are not re-encoded when others are added.
The encoders are passed in (ComfyUI's VAE and CLIP in the trainer), which keeps this testable.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, NamedTuple, Sequence

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .dataset import Pair
from .hint_layout import LATENT_FACTOR, HintLayout
from .images import fit_image, read_image
from .latent_maps import fit_map, read_map

if TYPE_CHECKING:  # the trainer passes the spec in; this module stays importable on its own
    from ..bps.condition_maps import ConditionSpec

CACHE_VERSION = "bps-train-cache-1"

#: images (B, H, W, 3) float [0, 1] -> model-space latents (B, 4, H/8, W/8)
EncodeImages = Callable[[torch.Tensor], torch.Tensor]
#: prompt -> conditioning (1, tokens, width), or (conditioning, pooled output (1, 1280) or None)
EncodeText = Callable[[str], "torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]"]


class PromptEmbedding(NamedTuple):
    """A cached prompt: its conditioning and, for models conditioned on it (SDXL), the pooled output."""

    cond: torch.Tensor                # (1, tokens, width)
    pooled: torch.Tensor | None       # (1, 1280) or None


def file_digest(path: str | Path) -> str:
    """sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def checkpoint_identity(path: str | Path) -> str:
    """Cheap fingerprint of a big model file: size plus sha256 of its first and last MiB."""
    path = Path(path)
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        if size > 2 << 20:
            f.seek(-(1 << 20), os.SEEK_END)
            h.update(f.read(1 << 20))
    return h.hexdigest()[:16]


def _key(*parts: object) -> str:
    return hashlib.sha256("\x1f".join(str(p) for p in (CACHE_VERSION, *parts)).encode()).hexdigest()[:32]


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)


@dataclass(frozen=True)
class CacheConfig:
    """Everything besides the data that decides what a cache entry holds."""

    size: tuple[int, int]            # training (height, width) in pixels
    hint_channels: int
    base_identity: str               # checkpoint_identity() of the base checkpoint
    encoder_tag: str = ""            # e.g. VAE dtype: entries from another precision are not reused
    extra_map: bool = False          # style adapters: an extra map packed after the RGB channels
    condition: "ConditionSpec | None" = None  # --condition: hints made from the targets by this preprocessor

    @property
    def hint(self) -> HintLayout:
        """The condition layout these entries hold."""
        return HintLayout(self.hint_channels, self.extra_map)


def sample_keys(pairs: Sequence[Pair], config: CacheConfig, workers: int = 4) -> list[str]:
    """Cache key of each pair (hashes the image files)."""
    def one(pair: Pair) -> str:
        # the extra map enters the key only when there is one, so other adapters' keys stay as they were
        extra = ("extra", file_digest(pair.extra)) if pair.extra else ()
        if pair.source is None:  # made from the target: the preprocessor and its parameters decide the hint
            if config.condition is None:
                raise ValueError(f"{pair.name} has no condition file and the cache has no --condition "
                                 f"preprocessor to make one")
            source = ("condition", config.condition.to_json())
        else:
            source = (file_digest(pair.source),)
        return _key("sample", *source, file_digest(pair.target), config.size,
                    config.hint_channels, config.base_identity, config.encoder_tag, *extra)
    with ThreadPoolExecutor(max(1, workers)) as pool:
        return list(pool.map(one, pairs))


def text_key(prompt: str, config: CacheConfig) -> str:
    """Cache key of a prompt's embedding."""
    return _key("text", prompt, config.base_identity, config.encoder_tag)


def data_fingerprint(keys: Sequence[str], pairs: Sequence[Pair]) -> str:
    """One hash of the whole training set (pair contents and captions), for resume checks."""
    return _key("data", *keys, *("\x1e".join(p.prompts) for p in pairs))


def prepare_pair(pair: Pair, size: tuple[int, int], hint: HintLayout | int,
                 condition: "ConditionSpec | None" = None) -> tuple[np.ndarray, np.ndarray]:
    """(target RGB uint8 HxWx3, hint) at the training size ``size`` (pixels).

    The hint is uint8 ``HxWxC`` for images (a style adapter's extra map, as luminance, packed after
    the RGB channels), or float32 ``(H/8)x(W/8)xC`` for a latent-resolution map. A pair without a
    source gets ``condition`` run on the target as fitted to ``size``: the very pixels the VAE
    encodes, and what the "BPS Condition from Image" node makes of that image.
    """
    hint = HintLayout(hint) if isinstance(hint, int) else hint
    target = fit_image(read_image(pair.target, 3), size)
    if pair.source is None:
        if condition is None:
            raise ValueError(f"{pair.name} has no condition file; pass the --condition preprocessor to make one")
        return target, condition.apply(target)
    if hint.latent_map:
        latent_size = (size[0] // LATENT_FACTOR, size[1] // LATENT_FACTOR)
        return target, fit_map(read_map(pair.source, hint.channels), latent_size)
    condition = fit_image(read_image(pair.source, hint.channels), size)
    if hint.extra_map:
        condition = np.concatenate([condition, fit_image(read_image(pair.extra, 1), size)], axis=2)
    return target, condition


def hint_values(hint: torch.Tensor) -> torch.Tensor:
    """A cached hint as float32 in the network's range: uint8 images / 255, maps as stored."""
    return hint.float() / 255.0 if hint.dtype == torch.uint8 else hint.float()


class TrainingCache:
    """Builds and reads the cache folder."""

    def __init__(self, folder: str | Path, config: CacheConfig):
        self.folder = Path(folder)
        self.config = config
        (self.folder / "samples").mkdir(parents=True, exist_ok=True)
        (self.folder / "text").mkdir(parents=True, exist_ok=True)

    def sample_path(self, key: str) -> Path:
        """File of one pair's latent and hint."""
        return self.folder / "samples" / f"{key}.safetensors"

    def text_path(self, prompt: str) -> Path:
        """File of one prompt's embedding."""
        return self.folder / "text" / f"{text_key(prompt, self.config)}.safetensors"

    def missing_samples(self, keys: Sequence[str]) -> list[int]:
        """Indices of the pairs not cached yet."""
        return [i for i, k in enumerate(keys) if not self.sample_path(k).is_file()]

    def encode_samples(self, pairs: Sequence[Pair], keys: Sequence[str], encode: EncodeImages,
                       batch_size: int = 4, progress: Callable[[int], None] | None = None,
                       workers: int = 4) -> int:
        """Encode and store every pair that is not cached; returns how many were encoded."""
        todo = self.missing_samples(keys)
        size, channels, condition = self.config.size, self.config.hint, self.config.condition
        with ThreadPoolExecutor(max(1, workers)) as pool:
            for start in range(0, len(todo), batch_size):
                chunk = todo[start:start + batch_size]
                prepared = list(pool.map(lambda i: prepare_pair(pairs[i], size, channels, condition), chunk))
                pixels = torch.from_numpy(np.stack([t for t, _ in prepared])).float() / 255.0
                with torch.no_grad():
                    latents = encode(pixels).float().cpu()
                for j, i in enumerate(chunk):
                    hint = torch.from_numpy(prepared[j][1]).permute(2, 0, 1).contiguous()
                    _atomic_save({"latent": latents[j], "hint": hint}, self.sample_path(keys[i]))
                if progress:
                    progress(len(chunk))
        return len(todo)

    def encode_prompts(self, prompts: Sequence[str], encode: EncodeText) -> int:
        """Encode and store every prompt not cached yet; returns how many were encoded."""
        todo = [p for p in dict.fromkeys(prompts) if not self.text_path(p).is_file()]
        for prompt in todo:
            with torch.no_grad():
                out = encode(prompt)
            cond, pooled = out if isinstance(out, tuple) else (out, None)
            tensors = {"cond": cond.float().cpu()}
            if pooled is not None:
                tensors["pooled"] = pooled.float().cpu()
            _atomic_save(tensors, self.text_path(prompt))
        return len(todo)

    def load_sample(self, key: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(latent (4, h, w) float32, hint (C, H, W): uint8 image or float32 map) of a cached pair."""
        d = load_file(str(self.sample_path(key)))
        return d["latent"], d["hint"]

    def load_text(self, prompt: str) -> torch.Tensor:
        """Cached conditioning (1, tokens, width) of a prompt."""
        return load_file(str(self.text_path(prompt)))["cond"]

    def load_prompt(self, prompt: str) -> PromptEmbedding:
        """Cached conditioning and pooled output (None when the model takes none) of a prompt."""
        d = load_file(str(self.text_path(prompt)))
        return PromptEmbedding(d["cond"], d.get("pooled"))


class CachedPairs(torch.utils.data.Dataset):
    """Training items from the cache: latent, hint in [0, 1], and the pair's caption embeddings
    (:class:`PromptEmbedding` each)."""

    def __init__(self, cache: TrainingCache, keys: Sequence[str], pairs: Sequence[Pair]):
        self.cache = cache
        self.keys = list(keys)
        self.prompts = [p.prompts for p in pairs]

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, index: int) -> dict:
        latent, hint = self.cache.load_sample(self.keys[index])
        conds = [self.cache.load_prompt(p) for p in self.prompts[index]]
        return {"index": index, "latent": latent, "hint": hint_values(hint), "conds": conds}


def collate(items: list[dict]) -> dict:
    """Stack latents and hints; keep each item's caption embeddings as a list."""
    return {"index": torch.tensor([it["index"] for it in items]),
            "latent": torch.stack([it["latent"] for it in items]),
            "hint": torch.stack([it["hint"] for it in items]),
            "conds": [it["conds"] for it in items]}
