"""The training run: data -> cache -> steered UNet -> optimizer steps -> checkpoints -> adapter.

``run(args)`` is what ``train/train_bps.py`` calls once ComfyUI and the pack are imported.
Order matters for the user: output/resume checks and the full data report come before any
model is loaded, so mistakes cost seconds, not a model load.
"""

from __future__ import annotations

import datetime as _dt
import gc
import hashlib
import logging
import math
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from ..bps.adapter_file import FORMAT_VERSION, save_adapter
from ..bps.condition_maps import ConditionSpec, parse_overrides
from ..bps.errors import ConditionError
from ..bps.network import BPSConfig, BPSNetwork
from ..bps.ports import port_map
from . import checkpointing as ckpt
from .base_model import BaseModels, checkpoint_unet_dtype, load_base_models, unet_weight_dtype
from .cache import (CacheConfig, CachedPairs, TrainingCache, checkpoint_identity, collate,
                    data_fingerprint, hint_values, sample_keys)
from .cli import checkpoint_dir, default_cache_dir
from .data_order import BatchStream, steps_for_epochs
from .dataset import load_pairs
from .demo_data import write_demo_set
from .distributed import (DistInfo, any_process, barrier, broadcast_object, gather_objects, init_distributed,
                          mean_over_processes, shutdown)
from .grad_checkpoint import checkpoint_unet
from .hint_layout import hint_layout_of
from .images import image_size, training_size
from .loss_log import LossLog, draw_loss_curve, gap_series, read_loss_log
from .optimizers import (OptimizerChoice, OptimizerError, check_resume_choice, make_optimizer,
                         optimizer_state_bytes, parameter_bytes, require_backend)
from .recipe import GENERIC_PROMPT, batch_context, batch_pooled, choose_captions, lr_at, noise_latents
from .steered_unet import SteeredUNet, training_omega
from .trainable import freeze_unreachable

log = logging.getLogger("bps.train")

DEFAULT_EPOCHS = 16  # official recipe
#: Options whose change would make a resumed run diverge from the interrupted one.
RESUME_MUST_MATCH = ("data", "size", "hint_channels", "hint", "batch_size", "grad_accum", "world_size", "seed",
                     "omega", "generic_prompt_prob", "base", "mixed_precision", "condition")


class TrainError(RuntimeError):
    """The run cannot start or continue; the message says why and what to do."""


@dataclass
class TrainResult:
    """What a finished (or interrupted) run did."""

    step: int
    total_steps: int
    out: Path | None
    interrupted: bool
    losses: list[float] = field(default_factory=list)
    checkpoint: Path | None = None


@dataclass
class Hooks:
    """Test and tooling hooks; called on every process."""

    on_step_end: Callable[[int, float], None] | None = None
    on_train_end: Callable[[BPSNetwork], None] | None = None


def _device() -> torch.device:
    import comfy.model_management
    return comfy.model_management.get_torch_device()


# ----------------------------------------------------------------------------- preflight

def _check_outputs(args, info: DistInfo) -> Path:
    """Refuse to clobber; make sure --resume has something to resume. Returns the checkpoint dir."""
    out = Path(args.out)
    run_dir = checkpoint_dir(out)
    existing = ckpt.list_checkpoints(run_dir)
    if args.resume:
        if not existing:
            raise TrainError(f"--resume: no checkpoint of a run writing {out} in {run_dir}; start the run "
                             f"without --resume (and with --save-every N to get checkpoints)")
        return run_dir
    if out.exists() and not args.overwrite:
        raise TrainError(f"{out} already exists; pass --overwrite to replace it, --resume to continue the run "
                         f"that wrote it, or choose another --out")
    if existing and not args.overwrite:
        raise TrainError(f"{run_dir} holds checkpoints of an unfinished run for {out} (latest: step "
                         f"{existing[-1][0]}); pass --resume to continue it or --overwrite to start afresh")
    if args.overwrite and info.is_main:
        for _, path in existing:
            shutil.rmtree(path, ignore_errors=True)
        for name in ("loss.csv", "loss.png"):
            (run_dir / name).unlink(missing_ok=True)
    return run_dir


def condition_spec(args) -> ConditionSpec | None:
    """The --condition preprocessor with its --condition-param values, or None (conditions from source/).

    Raises:
        TrainError: an unknown parameter or a bad value (before any data or model is read).
    """
    if not getattr(args, "condition", None):
        return None
    try:
        return ConditionSpec.make(args.condition, parse_overrides(list(getattr(args, "condition_param", []) or [])))
    except ConditionError as e:
        raise TrainError(f"--condition-param: {e}") from None


def _data_folder(args, cache_dir: Path, info: DistInfo) -> tuple[Path, str]:
    if args.data:
        return Path(args.data), str(Path(args.data).resolve())
    folder = cache_dir / "demo_data"
    if info.is_main:
        write_demo_set(folder)
    barrier(info)
    return folder, "built-in demo set (40 shape sketches)"


# ------------------------------------------------------------------------------ the run

def run(args, *, base: BaseModels | None = None, hooks: Hooks | None = None) -> TrainResult:
    """Train an adapter as the command line says.

    Args:
        args: parsed command line (:func:`train.cli.parse_args`).
        base: already loaded base models (tests reuse one load); loaded from ``args.ckpt`` if None.
        hooks: optional callbacks.

    Raises:
        TrainError, DataError, BaseModelError: with the problem and the fix in the message.
    """
    hooks = hooks or Hooks()
    device = _device()
    info = init_distributed(device)
    try:
        return _Run(args, info, device, base, hooks).execute()
    finally:
        shutdown(info)


class _Run:
    def __init__(self, args, info: DistInfo, device: torch.device, base: BaseModels | None, hooks: Hooks):
        self.args, self.info, self.device, self.base, self.hooks = args, info, device, base, hooks
        self.stop_requested = False
        self._old_handlers: dict[int, Any] = {}

    # -- signals -------------------------------------------------------------------------
    def _on_signal(self, signum, frame) -> None:
        # A second Ctrl-C aborts at once. SIGTERM only ever asks to stop: torchrun follows the
        # user's Ctrl-C with a SIGTERM to every worker, which must not cancel the saving.
        if self.stop_requested and signum == signal.SIGINT:
            signal.signal(signum, self._old_handlers.get(signum, signal.SIG_DFL))
            raise KeyboardInterrupt
        if self.stop_requested:
            return
        self.stop_requested = True
        if self.info.is_main:
            log.warning("stop requested: finishing this step and saving a checkpoint (press Ctrl-C again to "
                        "abort without saving)")

    def _install_signals(self) -> None:
        try:
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old_handlers[sig] = signal.signal(sig, self._on_signal)
        except ValueError:  # not the main thread: no signal handling
            self._old_handlers.clear()

    def _restore_signals(self) -> None:
        for sig, handler in self._old_handlers.items():
            signal.signal(sig, handler)
        self._old_handlers.clear()

    # -- main ----------------------------------------------------------------------------
    def execute(self) -> TrainResult:
        args, info = self.args, self.info
        out = Path(args.out)
        cache_dir = Path(args.cache_dir) if args.cache_dir else default_cache_dir(out)
        self.run_dir = _check_outputs(args, info)
        self.choice = _optimizer_choice(args, self.run_dir)
        if info.is_main:
            ckpt.remove_stale_temporaries(self.run_dir)
        barrier(info)

        condition = self.condition = condition_spec(args)
        data_dir, data_label = _data_folder(args, cache_dir, info)
        hint = hint_layout_of(args)
        pairs, skipped = load_pairs(data_dir, prompt=args.prompt, skip_bad=args.skip_bad,
                                    workers=max(1, args.num_workers), hint=hint,
                                    from_targets=condition.kind if condition else None)
        if skipped and info.is_main:
            log.warning("skipping %d bad entr%s (--skip-bad):\n%s", len(skipped),
                        "y" if len(skipped) == 1 else "ies", "\n".join(f"  - {p}" for p in skipped))
        size = training_size(*image_size(pairs[0].target), args.resolution)
        if info.is_main and condition is not None:
            log.info("conditions made from the target images: %s", condition.describe())

        file_dtype = checkpoint_unet_dtype(args.ckpt)
        mp_dtype = {"no": None, "fp16": torch.float16, "bf16": torch.bfloat16}[args.mixed_precision]
        owned = self.base is None
        if owned:  # only rank 0 encodes (and validates): the others skip CLIP and VAE
            self.base = load_base_models(args.ckpt, unet_dtype=unet_weight_dtype(args.mixed_precision, self.device,
                                                                                 file_dtype),
                                         need_clip=info.is_main, need_vae=info.is_main)
        base = self.base
        identity = checkpoint_identity(args.ckpt)
        if info.is_main:
            log.info("%d training pairs from %s at %dx%d px (%s, %s-prediction)", len(pairs), data_label, size[1],
                     size[0], base.family, "epsilon" if base.prediction == "eps" else "v")
            native = base.native_resolution
            if args.resolution < native:
                log.warning("%s was trained at %dx%d; an adapter trained at --resolution %d steers best at that "
                            "size. Pass --resolution %d for the native size", base.family, native, native,
                            args.resolution, native)

        # ---- cache latents, hints and text embeddings (rank 0 encodes, the others wait)
        # Only rank 0 has the VAE; everyone must compute the same cache keys.
        encoder_tag = broadcast_object(info, str(getattr(base.vae, "vae_dtype", "")) if info.is_main else None)
        cache = TrainingCache(cache_dir, CacheConfig(size=size, hint_channels=args.hint_channels,
                                                     base_identity=identity, encoder_tag=encoder_tag,
                                                     extra_map=hint.extra_map, condition=condition))
        keys = sample_keys(pairs, cache.config, workers=max(1, args.num_workers))
        prompts = [GENERIC_PROMPT, ""] + [p for pair in pairs for p in pair.prompts]
        if info.is_main:
            n = cache.encode_samples(pairs, keys, base.encode_images, workers=max(1, args.num_workers))
            m = cache.encode_prompts(prompts, base.encode_prompt)
            log.info("cache %s: encoded %d new pair(s) and %d new prompt(s), reused %d", cache_dir, n, m,
                     len(pairs) - n)
        validation = self._validation_inputs(args, cache, keys, pairs, base)
        gap_inputs = self._gap_inputs(args, cache, keys, pairs, base)
        if owned:
            base.free_encoders()  # everything is cached; validation holds its own VAE reference
            gc.collect()
        barrier(info)
        fingerprint = {
            "data": data_fingerprint(keys, pairs), "size": list(size), "hint_channels": args.hint_channels,
            "hint": hint.name, "adapter_format": FORMAT_VERSION,
            "batch_size": args.batch_size, "grad_accum": args.grad_accum, "world_size": info.world_size,
            "seed": args.seed, "omega": args.omega, "generic_prompt_prob": args.generic_prompt_prob,
            "base": identity, "mixed_precision": args.mixed_precision,
            "condition": condition.to_json() if condition else None,
        }

        dataset = CachedPairs(cache, keys, pairs)
        per_epoch = BatchStream(len(dataset), args.batch_size, world_size=info.world_size,
                                rank=info.rank, seed=args.seed).per_epoch
        total = args.steps or steps_for_epochs(args.epochs or DEFAULT_EPOCHS, per_epoch, args.batch_size,
                                               args.grad_accum)

        # ---- network, optimizer, resume
        unet_shape = base.unet_shape
        omega = training_omega(args.omega, port_map(unet_shape))
        config = BPSConfig.for_unet(unet_shape, **hint.network_fields())
        resume = ckpt.load_latest_checkpoint(self.run_dir) if args.resume else None
        if args.resume and resume is None:
            raise TrainError(f"--resume: no readable checkpoint in {self.run_dir}")
        if resume is None:
            torch.manual_seed(args.seed)  # same initial weights on every process and every run
            network = BPSNetwork(config)
        else:
            with torch.device("meta"):  # weights come from the checkpoint: skip the random init
                network = BPSNetwork(config)
            network = network.to_empty(device=self.device)
        network = network.to(self.device, self.choice.dtype).train()
        trainable, total_params = freeze_unreachable(network, omega)
        if info.is_main:
            log.info("adapter: %.0fM parameters, %.0fM trainable (omega preset %s)", total_params / 1e6,
                     trainable / 1e6, args.omega)
        network.gradient_checkpointing = bool(args.gradient_checkpointing)
        steered = SteeredUNet(network, base.model, omega, unet_shape)
        self.steered_unet = steered  # the gap measurement runs it without DDP (rank 0 only)
        if info.enabled:
            steered = torch.nn.parallel.DistributedDataParallel(
                steered, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                gradient_as_bucket_view=True)
        # The dither seed is the same on every process: DDP replicas must round alike.
        optimizer = make_optimizer(network.parameters(), self.choice, lr=args.lr, weight_decay=args.weight_decay,
                                   seed=args.seed)
        scaler = torch.amp.GradScaler(self.device.type, enabled=args.mixed_precision == "fp16")
        generator = torch.Generator().manual_seed(args.seed * 1000003 + info.rank)

        start_step = 0
        if resume is not None:
            start_step = self._restore(resume, fingerprint, network, optimizer, scaler, generator)
        if start_step >= total:
            raise TrainError(f"the checkpoint is already at step {start_step} and --steps is {total}; raise "
                             f"--steps to train longer")

        stream = BatchStream(len(dataset), args.batch_size, world_size=info.world_size, rank=info.rank,
                             seed=args.seed, start_batch=start_step * args.grad_accum)
        loader = torch.utils.data.DataLoader(
            dataset, batch_sampler=stream, collate_fn=collate, num_workers=args.num_workers,
            generator=torch.Generator().manual_seed(args.seed),  # keeps the global RNG untouched
            persistent_workers=False, pin_memory=self.device.type == "cuda")
        generic = cache.load_prompt(GENERIC_PROMPT)
        loss_log = LossLog(self.run_dir / "loss.csv", resume_step=start_step) if info.is_main else None

        undo_unet_ckpt = checkpoint_unet(base.model.model.diffusion_model) if args.gradient_checkpointing else None
        self._install_signals()

        step, losses, last_ckpt = start_step, [], None
        batches = iter(loader)
        bar = _progress(info, args, start_step, total)
        ms = base.model_sampling
        autocast = torch.autocast(self.device.type, dtype=mp_dtype, enabled=mp_dtype is not None)
        try:
            while step < total:
                t0 = time.perf_counter()
                lr = lr_at(step, args.lr, args.warmup_steps)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                step_loss = 0.0
                for micro in range(args.grad_accum):
                    batch = next(batches)
                    noised = noise_latents(batch["latent"], ms, generator)
                    prompts = choose_captions(batch["conds"], generic, args.generic_prompt_prob, generator)
                    context = batch_context([p.cond for p in prompts])
                    # SDXL: pooled text + size/crop embedding, as the sampler builds it at this size
                    y = base.unet_label(batch_pooled([p.pooled for p in prompts]), size)
                    sync = not info.enabled or micro == args.grad_accum - 1
                    with (_no_sync(steered) if not sync else _nullcontext()), autocast:
                        pred = steered(noised.unet_input.to(self.device), noised.timestep.to(self.device),
                                       context.to(self.device), batch["hint"].to(self.device),
                                       y=y.to(self.device) if y is not None else None)
                        loss = F.mse_loss(pred.float(), noised.target.to(self.device))
                    scaler.scale(loss / args.grad_accum).backward()
                    step_loss += float(loss.detach()) / args.grad_accum
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                if step == start_step and info.is_main:
                    _log_training_state(network, optimizer, self.choice)
                step += 1
                step_loss = mean_over_processes(info, step_loss)
                losses.append(step_loss)
                seconds = time.perf_counter() - t0
                speed = args.batch_size * args.grad_accum * info.world_size / max(seconds, 1e-9)
                gap = None
                if gap_inputs is not None and (step % args.validate_every == 0 or step == total):
                    with autocast:
                        gap = self._measure_gap(step, gap_inputs, network)
                if loss_log:
                    loss_log.append(step, step_loss, lr, seconds, speed, gap)
                if bar is not None:
                    bar.set_postfix(loss=f"{step_loss:.4f}", img_s=f"{speed:.2f}")
                    bar.update(1)
                if not math.isfinite(step_loss) and args.mixed_precision != "fp16":
                    raise TrainError(f"loss became {step_loss} at step {step}; lower --lr or use "
                                     f"--mixed-precision no/bf16")
                if self.hooks.on_step_end:
                    self.hooks.on_step_end(step, step_loss)
                stop = any_process(info, self.stop_requested)
                if stop or (args.save_every and step % args.save_every == 0 and step < total):
                    last_ckpt = self._save(step, fingerprint, network, optimizer, scaler, generator)
                if args.validate_every and step % args.validate_every == 0 and step < total and not stop:
                    self._validate(step, validation, network, omega, base)
                if stop:
                    if info.is_main:
                        log.warning("interrupted at step %d of %d; checkpoint %s. Continue with the same command "
                                    "plus --resume", step, total, last_ckpt)
                    return TrainResult(step, total, None, True, losses, last_ckpt)
        finally:
            if bar is not None:
                bar.close()
            if loss_log:
                loss_log.close()
            if undo_unet_ckpt:
                undo_unet_ckpt()
            self._restore_signals()
            del batches, loader

        # ---- the end: checkpoint, adapter, curve, samples
        if info.enabled:
            self._check_replicas(network)
        if self.hooks.on_train_end:
            self.hooks.on_train_end(network)
        if args.save_every:
            last_ckpt = self._save(step, fingerprint, network, optimizer, scaler, generator)
        if args.validate_every:
            self._validate(step, validation, network, omega, base)
        if info.is_main:
            provenance = self._provenance(args, data_label, len(pairs), size, identity, step, info)
            save_adapter(out, network, omega=omega, hint_meaning=args.hint_meaning, provenance=provenance,
                         condition=self.condition.to_dict() if self.condition else None, unet=base.unet_shape)
            rows = read_loss_log(self.run_dir / "loss.csv")
            draw_loss_curve([r["step"] for r in rows], [r["loss"] for r in rows], self.run_dir / "loss.png",
                            title=f"BPS training loss: {out.name}", series=gap_series(rows))
            log.info("wrote %s (step %d, loss %.4f); loss log and curve in %s", out, step,
                     provenance["final_loss"], self.run_dir)
        barrier(self.info)
        return TrainResult(step, total, out, False, losses, last_ckpt)

    # -- pieces --------------------------------------------------------------------------
    def _restore(self, resume, fingerprint, network, optimizer, scaler, generator) -> int:
        step, path, tensors, state = resume
        try:  # first: another optimizer is the likelier mistake, and its message names both
            check_resume_choice(state.get("optimizer_choice"), self.choice, str(path))
        except OptimizerError as e:
            raise TrainError(str(e)) from e
        old = state.get("fingerprint", {})
        if old.get("adapter_format", 1) != FORMAT_VERSION:
            # format 1 named the middle zero conv middle_block.2, which also changed the parameters' order
            raise TrainError(f"cannot resume from {path}: it was written by an older version of this trainer, "
                             f"whose adapter network (format {old.get('adapter_format', 1)}) stored its weights in "
                             f"another order than this one (format {FORMAT_VERSION}). Start afresh with "
                             f"--overwrite")
        changed = [k for k in RESUME_MUST_MATCH if old.get(k) != fingerprint.get(k)]
        if changed:
            details = "; ".join(f"{k}: checkpoint {old.get(k)!r}, now {fingerprint.get(k)!r}" for k in changed)
            raise TrainError(f"cannot resume from {path}: the run's settings changed ({details}). Use the "
                             f"original options, or start afresh with --overwrite")
        net_sd, opt_sd = ckpt.unflatten_state(tensors, state["optimizer"])
        network.load_state_dict(net_sd)
        optimizer.load_state_dict(opt_sd)
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        rng = state["rng"]
        ckpt.restore_rng(rng[self.info.rank] if isinstance(rng, list) else rng, generator)
        if self.info.is_main:
            log.info("resumed from %s at step %d", path, step)
        return step

    def _save(self, step, fingerprint, network, optimizer, scaler, generator) -> Path:
        rng = gather_objects(self.info, ckpt.capture_rng(generator))
        path = ckpt.checkpoint_path(self.run_dir, step)
        if self.info.is_main:
            tensors, rest = ckpt.flatten_state(network.state_dict(), optimizer.state_dict())
            state = {"step": step, "optimizer": rest, "scaler": scaler.state_dict() if scaler.is_enabled() else None,
                     "rng": rng, "fingerprint": fingerprint, "args": vars(self.args).copy(),
                     "optimizer_choice": self.choice.to_dict()}
            path = ckpt.save_checkpoint(self.run_dir, step, tensors, state, keep=self.args.keep_checkpoints)
            log.info("checkpoint %s", path)
        barrier(self.info)
        return path

    def _check_replicas(self, network: BPSNetwork) -> None:
        """DDP keeps every process's weights identical; verify before rank 0 writes the adapter."""
        digest = hashlib.sha256()
        for name, p in network.named_parameters():
            if p.requires_grad:
                digest.update(name.encode())
                digest.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())  # bf16 too
        digests = gather_objects(self.info, digest.hexdigest())
        if len(set(digests)) != 1:
            raise TrainError(f"the {self.info.world_size} processes ended with different adapter weights "
                             f"({digests}); this is a bug, please report it")
        if self.info.is_main:
            log.info("all %d processes hold identical adapter weights (sha256 %s)", self.info.world_size,
                     digests[0][:16])

    def _validation_inputs(self, args, cache, keys, pairs, base) -> dict | None:
        if not args.validate_every or not self.info.is_main:
            return None
        n = min(args.validation_count, len(keys))
        hints = hint_values(torch.stack([cache.load_sample(k)[1] for k in keys[:n]]))
        positives = [cache.load_prompt(pairs[i].prompts[0]) for i in range(n)]
        return {"hints": hints, "positives": positives, "negative": cache.load_prompt(""), "vae": base.vae}

    def _gap_inputs(self, args, cache, keys, pairs, base) -> dict | None:
        """Fixed pairs, noise and timesteps of the own-vs-swapped eps-MSE logged at validation steps,
        with the base alone's errors (the base is frozen: computed once, here)."""
        count = min(getattr(args, "validation_gap_pairs", 0), len(keys))
        if not args.validate_every or not self.info.is_main or count == 0:
            return None
        if base.takes_pooled:  # the gap's forward passes no pooled-text y, which SDXL's UNet needs
            log.warning("validation: the own-vs-swapped condition gap is measured for SD1.5 only; not measured on %s",
                        base.family)
            return None
        if count < 2:
            log.warning("validation: the own-vs-swapped condition gap needs 2 pairs or more (%d here); not "
                        "measured", count)
            return None
        from .condition_gap import GapPlan, base_errors, comfy_base_forward
        samples = [cache.load_sample(k) for k in keys[:count]]
        inputs = {"latents": torch.stack([latent for latent, _ in samples]).float(),
                  "hints": hint_values(torch.stack([hint for _, hint in samples])),
                  "contexts": [cache.load_text(pairs[i].prompts[0]) for i in range(count)],
                  "plan": GapPlan(per_band=1, seed=args.seed), "model_sampling": base.model_sampling}
        inputs["base"] = base_errors(comfy_base_forward(base.model), inputs["latents"], inputs["contexts"], inputs["model_sampling"],
                                     inputs["plan"], batch_size=args.batch_size)
        log.info("validation: own-vs-swapped condition eps-MSE on the first %d training pairs at timesteps %s "
                 "(base alone: %.5f)", count, list(inputs["plan"].timesteps), float(inputs["base"].mean()))
        return inputs

    def _measure_gap(self, step, inputs, network) -> dict[str, float]:
        """eps-MSE with own and swapped conditions at this step (see :mod:`train.condition_gap`)."""
        from .condition_gap import measure_condition_gap
        steered, device = self.steered_unet, self.device
        was_training = network.training
        network.eval()
        try:
            result = measure_condition_gap(
                lambda hint, x, t, c: steered(x.to(device), t.to(device), c.to(device), hint.to(device)),
                inputs["base"], inputs["latents"], inputs["hints"], inputs["contexts"], inputs["model_sampling"],
                plan=inputs["plan"], batch_size=self.args.batch_size)
        finally:
            network.train(was_training)
        o = result.overall
        log.info("validation step %d: eps-MSE own condition %.5f, swapped %.5f (gap %+.5f ± %.5f), base alone "
                 "%.5f", step, o.own.mean, o.swapped.mean, o.gap.mean, o.gap.ci95, o.base.mean)
        return {"eps_own": o.own.mean, "eps_swapped": o.swapped.mean, "eps_base": o.base.mean}

    def _validate(self, step, validation, network, omega, base) -> None:
        if validation is not None:
            from .validation import render_samples, save_sample_sheet
            images = render_samples(base.model, validation["vae"], network, omega, validation["hints"],
                                    validation["positives"], validation["negative"],
                                    steps=self.args.validation_steps, cfg=self.args.validation_cfg,
                                    seed=self.args.seed)
            path = save_sample_sheet(self.run_dir / "samples" / f"step_{step:08d}.png", validation["hints"], images)
            log.info("validation samples %s", path)
        barrier(self.info)

    def _provenance(self, args, data_label, num_pairs, size, identity, step, info) -> dict:
        rows = read_loss_log(self.run_dir / "loss.csv")
        tail = [r["loss"] for r in rows[-max(1, min(50, len(rows) // 10 or 1)):]]
        return {
            "trainer": "ComfyUI-BPS train/train_bps.py (official BPS recipe)",
            "base_model": Path(args.ckpt).name,
            "base_family": self.base.family,
            "prediction": self.base.prediction,
            "base_model_id": identity,
            "data": data_label,
            "num_pairs": num_pairs,
            "steps": step,
            "lr": args.lr,
            "warmup_steps": args.warmup_steps,
            "batch_size": args.batch_size,
            "grad_accum": args.grad_accum,
            "world_size": info.world_size,
            "effective_batch": args.batch_size * args.grad_accum * info.world_size,
            "resolution": f"{size[1]}x{size[0]}",
            "seed": args.seed,
            "omega_preset": args.omega,
            "mixed_precision": args.mixed_precision,
            "optimizer": self.choice.kind,
            "weights_dtype": self.choice.weights_dtype,
            "generic_prompt_prob": round(args.generic_prompt_prob, 6),
            "condition": self.condition.describe() if self.condition else "source images",
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "final_loss": round(sum(tail) / len(tail), 6) if tail else None,
        }


def _optimizer_choice(args, run_dir: Path) -> OptimizerChoice:
    """The run's optimizer, checked before any model is loaded: the optional package is there,
    and a resumed run continues the optimizer its checkpoint was written with."""
    try:
        choice = OptimizerChoice(getattr(args, "optimizer", "adamw"), getattr(args, "weights_dtype", "fp32"))
        require_backend(choice)
        if args.resume:
            latest = ckpt.read_latest_state(run_dir)
            if latest is not None:
                check_resume_choice(latest[1].get("optimizer_choice"), choice, str(latest[0]))
    except OptimizerError as e:
        raise TrainError(str(e)) from e
    return choice


def _log_training_state(network: BPSNetwork, optimizer, choice: OptimizerChoice) -> None:
    trainable = [p for p in network.parameters() if p.requires_grad]
    weights = parameter_bytes(trainable)
    log.info("B_phi training state (%s): weights %.2f GiB + gradients %.2f GiB + optimizer %.2f GiB = %.2f GiB",
             choice.describe(), weights / 2**30, weights / 2**30, optimizer_state_bytes(optimizer) / 2**30,
             (2 * weights + optimizer_state_bytes(optimizer)) / 2**30)


def _progress(info: DistInfo, args, start: int, total: int):
    if not info.is_main or args.no_progress:
        return None
    from tqdm import tqdm
    return tqdm(total=total, initial=start, desc="BPS training", unit="step", dynamic_ncols=True)


def _no_sync(module):
    return module.no_sync()


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False
