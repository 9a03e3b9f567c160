"""Does the trainer learn? Loss on a fixed evaluation set before and after training, on CPU.

    COMFYUI_PATH=/path/to/ComfyUI python bench/train_learning.py [--ckpt SD15.safetensors]
        [--steps 60] [--lr 1e-4] [--batch-size 8] [--resolution 64] [--work DIR]

Trains on the trainer's built-in demo set (40 shape sketches -> filled shapes) with the real
command-line path (train_bps.main, in-process), then evaluates on a fixed set: every training
pair at fixed timesteps with fixed noise (one CPU generator), the sample's own caption.

Without --ckpt a random-weight SD1.5 checkpoint is written (no downloads). With random weights
the "frozen model" is random too, so two numbers matter:

* step 0 vs trained: the adapter starts exactly at the frozen model's loss (zero-initialised
  outputs; checked), so any drop is the adapter's doing;
* matching vs shuffled hints (each pair evaluated with another pair's sketch): if the trained
  adapter only learned a condition-independent correction, both are equal; a gap means it uses
  the sketch to predict the noise of *that* image.

Prints a table and writes bench/results/train_learning.json (and the run's loss curve).
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
sys.path.insert(0, str(ROOT))

from bench.comfy_unet import comfy_host  # noqa: E402  the tests' loader of train/train_bps.py


def evaluate(steered_cls, network, base, omega, items, timesteps, *, shuffle: bool, batch: int = 8) -> dict:
    """Mean eps-MSE over every (pair, timestep) with fixed noise; per-timestep means too."""
    recipe = importlib.import_module(steered_cls.__module__.rsplit(".", 1)[0] + ".recipe")
    module = steered_cls(network, base.model, omega)
    ms = base.model_sampling
    n = len(items)
    rows = [(i, t) for t in timesteps for i in range(n)]
    per_t: dict[int, list[float]] = {t: [] for t in timesteps}
    gen = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for start in range(0, len(rows), batch):
            chunk = rows[start:start + batch]
            x0 = torch.stack([items[i]["latent"] for i, _ in chunk])
            hint_idx = [(i + 1 + (i % 3)) % n if shuffle else i for i, _ in chunk]
            hint = torch.stack([items[j]["hint"] for j in hint_idx])
            context = recipe.batch_context([items[i]["conds"][0].cond for i, _ in chunk])
            noised = recipe.noise_latents(x0, ms, gen, timesteps=torch.tensor([t for _, t in chunk]))
            eps = module(noised.unet_input, noised.timestep, context, hint)
            err = ((eps.float() - noised.noise) ** 2).mean(dim=(1, 2, 3))
            for (i, t), e in zip(chunk, err.tolist()):
                per_t[t].append(e)
    flat = [e for v in per_t.values() for e in v]
    return {"loss": sum(flat) / len(flat), "per_timestep": {str(t): sum(v) / len(v) for t, v in per_t.items()}}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default=None, help="SD1.5 checkpoint (default: write a random-weight one)")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--timesteps", default="100,300,600,900")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", default=None, help="working folder (default: a temporary one)")
    args = p.parse_args()

    entry = comfy_host.trainer_entry()
    entry.boot_comfyui(entry.find_comfyui())
    pack = entry.import_pack()
    mod = {m: importlib.import_module(f"{pack.__name__}.train.{m}") for m in
           ("loop", "base_model", "cache", "steered_unet", "demo_data")}
    work = Path(args.work or tempfile.mkdtemp(prefix="bps_learning_"))
    work.mkdir(parents=True, exist_ok=True)
    ckpt = Path(args.ckpt) if args.ckpt else work / "sd15_random.safetensors"
    if not ckpt.is_file():
        rc = importlib.import_module(f"{pack.__name__}.train.random_checkpoint")
        print(f"writing a random-weight SD1.5 checkpoint to {ckpt} ...", flush=True)
        rc.write_random_sd15_checkpoint(ckpt, seed=0)
    # The UNet dtype the trainer itself picks for this checkpoint with --mixed-precision no.
    import comfy.model_management
    bm = mod["base_model"]
    base = bm.load_base_models(ckpt, unet_dtype=bm.unet_weight_dtype(
        "no", comfy.model_management.get_torch_device(), bm.checkpoint_unet_dtype(ckpt)))
    timesteps = [int(t) for t in args.timesteps.split(",")]
    omega = mod["steered_unet"].training_omega("paper")
    steered_cls = mod["steered_unet"].SteeredUNet
    data = mod["demo_data"].write_demo_set(work / "data")
    out = work / "learned.safetensors"
    argv = ["--ckpt", str(ckpt), "--data", str(data), "--out", str(out), "--overwrite", "--steps", str(args.steps),
            "--lr", str(args.lr), "--batch-size", str(args.batch_size), "--grad-accum", "1",
            "--resolution", str(args.resolution), "--seed", str(args.seed), "--save-every", "0",
            "--num-workers", "0", "--cache-dir", str(work / "cache")]
    results: dict = {}
    items: list = []

    def evaluate_all(network, label, *, shuffled=True):
        t0 = time.time()
        matching = evaluate(steered_cls, network, base, omega, items, timesteps, shuffle=False)
        results[label] = {"matching_hints": matching,
                          "shuffled_hints": evaluate(steered_cls, network, base, omega, items, timesteps,
                                                     shuffle=True) if shuffled else matching}
        print(f"evaluated {label} in {time.time() - t0:.0f}s: {results[label]['matching_hints']['loss']:.4f} "
              f"(shuffled {results[label]['shuffled_hints']['loss']:.4f})", flush=True)

    t_start = time.time()

    def on_step_end(step, loss):
        if step % 10 == 0:
            print(f"step {step}/{args.steps} loss {loss:.4f} ({time.time() - t_start:.0f}s)", flush=True)

    def on_train_end(network):
        evaluate_all(network, "trained")

    # The evaluation set is the trainer's own cache (same latents, hints and embeddings), built
    # here exactly as the trainer builds it, so the run below reuses it.
    cache_mod, images = mod["cache"], importlib.import_module(f"{pack.__name__}.train.images")
    pairs, _ = importlib.import_module(f"{pack.__name__}.train.dataset").load_pairs(data)
    size = images.training_size(*images.image_size(pairs[0].target), args.resolution)
    cache = cache_mod.TrainingCache(work / "cache", cache_mod.CacheConfig(
        size=size, hint_channels=1, base_identity=cache_mod.checkpoint_identity(ckpt),
        encoder_tag=str(getattr(base.vae, "vae_dtype", ""))))
    keys = cache_mod.sample_keys(pairs, cache.config)
    cache.encode_samples(pairs, keys, base.encode_images)
    cache.encode_prompts([p for pair in pairs for p in pair.prompts], base.encode_text)
    dataset = cache_mod.CachedPairs(cache, keys, pairs)
    items.extend(dataset[i] for i in range(len(dataset)))

    # Step 0 = the frozen model: the trainer's initial network (same seed) outputs exact zeros for
    # any hint, so its loss does not depend on the hint and is evaluated once.
    torch.manual_seed(args.seed)
    fresh = pack.bps.BPSNetwork(pack.bps.BPSConfig()).train()
    with torch.no_grad():
        probe = fresh(items[0]["hint"][None], torch.randn(1, fresh.config.time_embed_dim))
    assert all(not r.any() for r in probe), "a fresh adapter must output exact zeros"
    evaluate_all(fresh, "step0_frozen_model", shuffled=False)
    del fresh, probe

    rc = entry.main(argv, base=base, hooks=mod["loop"].Hooks(on_step_end=on_step_end, on_train_end=on_train_end))
    if rc != 0:
        print(f"training failed with exit code {rc}")
        return rc
    elapsed = time.time() - t_start
    s0, tr = results["step0_frozen_model"], results["trained"]
    summary = {
        "command": " ".join(["python", "bench/train_learning.py"] + sys.argv[1:]),
        "checkpoint": "random-weight SD1.5 (train/random_checkpoint.py, seed 0)" if not args.ckpt else str(ckpt),
        "steps": args.steps, "lr": args.lr, "batch_size": args.batch_size, "resolution": args.resolution,
        "eval_set": f"{len(items)} demo pairs x timesteps {timesteps}, fixed noise, own caption",
        "wall_seconds": round(elapsed), "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "torch": torch.__version__, "results": results,
        "relative_drop": 1 - tr["matching_hints"]["loss"] / s0["matching_hints"]["loss"],
        "hint_gap": tr["shuffled_hints"]["loss"] - tr["matching_hints"]["loss"],
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "train_learning.json").write_text(json.dumps(summary, indent=2))
    curve = out.with_name(out.stem + "_checkpoints") / "loss.png"
    if curve.is_file():
        (RESULTS / "train_learning_loss.png").write_bytes(curve.read_bytes())
    print("\n| evaluation (eps MSE)       | matching sketch | shuffled sketch |")
    print("| -------------------------- | --------------- | --------------- |")
    for label in ("step0_frozen_model", "trained"):
        r = results[label]
        print(f"| {label:<26} | {r['matching_hints']['loss']:15.4f} | {r['shuffled_hints']['loss']:15.4f} |")
    print(f"\nrelative drop {summary['relative_drop']:.1%}, hint gap {summary['hint_gap']:.4f}; "
          f"{args.steps} steps in {elapsed / 60:.1f} min -> {RESULTS / 'train_learning.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
