"""Training loop for every NeuroPictor stage, on one device or many (``accelerate``).

One step of a diffusion stage (spec ``neuropictor.md`` §12.3)::

    F = encoder(surface);  C, C_main = hlgn(F)            # aux branch only in single-subject stages
    C[drop] = E_text("")                                    # stage "cfg": 5 % of samples
    z0 = 0.18215 * vae.encode(image).sample();  t ~ U{0..999};  z_t = add_noise(z0, eps, t)
    down, mid = controlnet(z_t, t, C, F)                    # 13 residuals
    loss = |unet(z_t, t, C, down, mid) - eps|^2 + lambda * |C_main - E_text(caption)|^2

Engineering choices (what the official Lightning code does differently, and why):

- the frozen UNet, VAE and text encoder are cast to the mixed-precision dtype (bf16 on GPU),
  have ``requires_grad=False`` and are not in the optimiser; the original keeps them in fp32
  with ``requires_grad=True`` and computes and discards ~3.5 GB of UNet gradients;
- gradient checkpointing on the fMRI encoder, the ControlNet and the frozen UNet (whose
  activations are still needed for the gradient into the context);
- in multi-subject pre-training from SD (``detach_unet_encoder``), the frozen UNet's
  encoder and middle block see a detached context, which reproduces the original's
  ``torch.no_grad()`` around them exactly and keeps no activations for them;
- every random draw of step ``k`` comes from generators seeded by ``(seed, k, slot)``, where the
  slot is the micro-batch's place in the global batch, and the sample order from per-epoch
  permutations seeded by ``(seed, epoch)``: a run resumed from a checkpoint takes the same steps
  as an uninterrupted one (bit-identical on CPU), and the same global batch split between
  processes or accumulated in one process sees the same samples and noise;
- checkpoints are safetensors (weights and AdamW moments) plus JSON, written atomically every
  ``checkpoint_every`` steps; the two newest are kept, and a resume whose newest one is
  damaged (a bad copy, a full disk) falls back to the other, saying so
  (:mod:`~brainrecon.decoders.neuropictor.checkpoint`).

Several GPUs: ``accelerate launch -m brainrecon.cli fit --decoder neuropictor ...``; each
process takes ``batch_size`` samples per micro-step, and ``grad_accum`` micro-steps make one
optimiser step, so the global batch is ``batch_size * num_processes * grad_accum`` (the
official code's 96 in pre-training and 32 in fine-tuning can be had on any number of GPUs).
Gradients are averaged over the micro-steps, then optionally clipped (``grad_clip``, global
norm); the learning rate follows ``lr_schedule`` (constant, as the official code, or linear /
cosine decay after ``lr_warmup_steps`` of linear warm-up), set from the step index, so a
resumed run continues the same schedule.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

# The loop calls save_checkpoint and the resume functions through this module (tests patch them
# here); the other names are re-exported for callers of the checkpoint format.
from brainrecon.decoders.neuropictor.checkpoint import (  # noqa: F401 - the checkpoint format re-exported
    CHECKPOINT_FIX,
    CHECKPOINT_PREFIX,
    IDENTITY_DEFAULTS,
    IDENTITY_OPTIONAL,
    KEEP_CHECKPOINTS,
    checkpoint_check,
    list_checkpoints,
    load_checkpoint,
    newest_intact_checkpoint,
    optimizer_from_safetensors,
    optimizer_to_safetensors,
    read_checkpoint,
    save_checkpoint,
)
from brainrecon.decoders.neuropictor.model import place
from brainrecon.errors import BrainreconError, DataError

LR_SCHEDULES = ("constant", "linear", "cosine")
IMAGE_RESIZE = ("bicubic", "pil-bilinear")


@dataclass
class TrainConfig:
    """Resolved settings of one training run (see :class:`NeuroPictorDecoder` for their meaning)."""

    stage: str
    lr: float
    weight_decay: float
    batch_size: int
    total_steps: int
    semantic_weight: float = 0.0
    grad_accum: int = 1
    grad_clip: float | None = None
    lr_schedule: str = "constant"
    lr_warmup_steps: int = 0
    use_aux: bool = False
    cfg_drop: float = 0.0
    detach_unet_encoder: bool = False
    gradient_checkpointing: bool = True
    mixed_precision: str = "no"
    seed: int = 0
    device: str = "cpu"
    checkpoint_dir: str | None = None
    resume: bool = False
    checkpoint_every: int | None = None
    validate_every: int | None = None
    progress: bool = True
    # what a checkpoint must agree on to be resumed
    identity: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------- data
class TrainingData:
    """(subject, row) pairs of a split with lazy image reading.

    Parameters
    ----------
    split : brainrecon.data.Split
    subjects : list of int
    surface_size : int
        Required side of the surface maps.
    image_size : int or None
        Side the images are resized to (None: images are not needed).
    captions : bool
        Whether captions are needed.
    image_resize : {"bicubic", "pil-bilinear"}
        How images are resized (see :func:`resize_images`).
    """

    def __init__(self, split, subjects: list[int], surface_size: int, image_size: int | None,
                 captions: bool, image_resize: str = "bicubic"):
        self.split = split
        self.subjects = list(subjects)
        self.image_size = image_size
        self.image_resize = image_resize
        self.surfaces: dict[int, np.ndarray] = {}
        self.captions: dict[int, list[list[str]]] = {}
        pairs = []
        for s in self.subjects:
            surf = split.surfaces(s)
            self.surfaces[s] = check_surfaces(surf, s, surface_size, split)
            if captions:
                self.captions[s] = caption_lists(split.captions(s), len(surf))
            pairs.append(np.stack([np.full(len(surf), s), np.arange(len(surf))], axis=1))
        self.pairs = np.concatenate(pairs).astype(np.int64)

    def __len__(self) -> int:
        return len(self.pairs)

    def batch(self, positions: np.ndarray, rng: np.random.Generator) -> dict[str, Any]:
        """Surfaces ``(B, S, S)``, images ``(B, 3, H, W)`` in [-1, 1] and one random caption each."""
        pairs = self.pairs[positions]
        surfaces = np.stack([self.surfaces[s][r] for s, r in pairs]).astype(np.float32)
        out: dict[str, Any] = {"surfaces": torch.from_numpy(surfaces)}
        if self.image_size is not None:
            images = np.empty((len(pairs), self.image_size, self.image_size, 3), dtype=np.uint8)
            for s in np.unique(pairs[:, 0]):
                where = np.flatnonzero(pairs[:, 0] == s)
                images[where] = resize_images(self.split.images(int(s), pairs[where, 1]), self.image_size,
                                              self.image_resize)
            out["images"] = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        if self.captions:
            caps = []
            for s, r in pairs:
                options = self.captions[int(s)][int(r)]
                caps.append(options[int(rng.integers(len(options)))] if options else "")
            out["captions"] = caps
        return out


def check_surfaces(surfaces, subject: int, surface_size: int, split) -> np.ndarray:
    """Validate ``(n, S, S)`` surface maps; raise :class:`DataError` with the fix."""
    if surfaces is None:
        raise DataError(
            f"Subject {subject} ({split.name} split) has no surface maps; NeuroPictor needs 2-D "
            f"cortical surface maps (prepare them with the NSD-preparation step, or use the "
            f"synthetic dataset, which has them)."
        )
    surfaces = np.asarray(surfaces, dtype=np.float32)
    if surfaces.ndim != 3 or surfaces.shape[1:] != (surface_size, surface_size):
        raise DataError(
            f"Subject {subject}: surface maps have shape {surfaces.shape[1:]} but this decoder "
            f"expects ({surface_size}, {surface_size}); set surface_size={surfaces.shape[-1]} "
            f"(and a patch_size dividing it) or provide {surface_size}x{surface_size} maps."
        )
    if not np.all(np.isfinite(surfaces)):
        raise DataError(f"Subject {subject}: surface maps contain NaN or infinite values.")
    return surfaces


def caption_lists(captions, n: int) -> list[list[str]]:
    """Per-sample lists of non-empty captions from an ``(n,)`` / ``(n, k)`` array or None."""
    if captions is None:
        return [[] for _ in range(n)]
    captions = np.asarray(captions)
    if captions.ndim == 1:
        captions = captions[:, None]
    return [[str(c) for c in row if str(c).strip()] for row in captions]


def resize_images(images: np.ndarray, size: int, method: str = "bicubic") -> np.ndarray:
    """uint8 ``(n, h, w, 3)`` -> uint8 ``(n, size, size, 3)``.

    ``method="bicubic"``: torch bicubic with antialiasing, rounded. ``"pil-bilinear"``: PIL's
    bilinear resampling, what the official ``dataset/dataset.py`` gets from torchvision's
    ``transforms.Resize((512, 512))`` on a PIL image.
    """
    if method not in IMAGE_RESIZE:
        raise BrainreconError(f"Unknown image_resize {method!r}. Valid choices: {', '.join(map(repr, IMAGE_RESIZE))}.")
    if images.shape[1:3] == (size, size):
        return np.asarray(images)
    if method == "pil-bilinear":
        from PIL import Image

        return np.stack([np.asarray(Image.fromarray(np.asarray(im, dtype=np.uint8)).resize(
            (size, size), Image.BILINEAR)) for im in images])
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


class BatchSchedule:
    """Which samples each step sees: per-epoch permutations of a seed, cut into global batches.

    A global batch of step ``k`` is ``batch_size * num_processes * grad_accum`` consecutive
    positions of the permuted data; micro-step ``m`` of process ``r`` takes the slice
    ``(m * num_processes + r) * batch_size``, so the samples of a step do not depend on how
    they are split between processes and micro-steps.
    """

    def __init__(self, n: int, batch_size: int, num_processes: int, seed: int, grad_accum: int = 1):
        self.n, self.batch_size, self.num_processes, self.seed = n, batch_size, num_processes, seed
        self.grad_accum = grad_accum
        self._perms: dict[int, np.ndarray] = {}

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.num_processes * self.grad_accum

    def steps_per_epoch(self) -> int:
        return max(1, math.ceil(self.n / self.global_batch))

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) > 4:
                self._perms.pop(min(self._perms))
            self._perms[epoch] = np.random.default_rng([self.seed, epoch, 7]).permutation(self.n)
        return self._perms[epoch]

    def positions(self, step: int, rank: int, micro: int = 0) -> np.ndarray:
        start = step * self.global_batch + (micro * self.num_processes + rank) * self.batch_size
        flat = np.arange(start, start + self.batch_size)
        return np.array([self._perm(int(p // self.n))[p % self.n] for p in flat], dtype=np.int64)


def step_seed(seed: int, step: int, rank: int, stream: int = 0) -> int:
    return int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, step, rank, stream]).generate_state(1)[0])


def lr_factor(schedule: str, step: int, total_steps: int, warmup_steps: int = 0) -> float:
    """Multiplier of the base learning rate at optimiser step ``step`` (0-based)."""
    if schedule not in LR_SCHEDULES:
        raise BrainreconError(f"Unknown lr_schedule {schedule!r}. Valid choices: {', '.join(map(repr, LR_SCHEDULES))}.")
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    if schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


# ---------------------------------------------------------------------------- text
@torch.no_grad()
def encode_text(tokenizer, text_encoder, captions: list[str], device) -> torch.Tensor:
    """``(B, L, E)`` last hidden state (after the final LayerNorm) of the text encoder."""
    ids = tokenizer(list(captions), padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids.to(device)
    return text_encoder(ids).last_hidden_state.float()


class _DetachContext:
    """Attention processor wrapper feeding a detached context (emulates ``no_grad`` on the UNet encoder)."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, *args, **kwargs):
        if encoder_hidden_states is not None:
            encoder_hidden_states = encoder_hidden_states.detach()
        return self.inner(attn, hidden_states, encoder_hidden_states, *args, **kwargs)


def detach_encoder_context(unet) -> dict:
    """Install :class:`_DetachContext` on the UNet's down and mid blocks; return the old processors."""
    old = dict(unet.attn_processors)
    new = {name: (_DetachContext(proc) if name.startswith(("down_blocks", "mid_block")) else proc)
           for name, proc in old.items()}
    unet.set_attn_processor(new)
    return old


# ---------------------------------------------------------------------------- the loop
def make_accelerator(cfg: TrainConfig):
    from accelerate import Accelerator

    return Accelerator(mixed_precision=cfg.mixed_precision, cpu=cfg.device == "cpu")


def weight_dtype(mixed_precision: str) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision, torch.float32)


def run_training(
    *,
    net: torch.nn.Module,
    cfg: TrainConfig,
    data: TrainingData,
    base=None,
    empty_context: torch.Tensor | None = None,
    sem_text_model=None,
    validate: Callable[[torch.nn.Module, int, Path], None] | None = None,
    stats: dict | None = None,
) -> list[float]:
    """Train ``net`` in place for ``cfg.total_steps`` optimiser steps; return the loss per step.

    Parameters
    ----------
    net : torch.nn.Module
        :class:`~brainrecon.decoders.neuropictor.model.NeuroPictorNet` (diffusion stages) or
        :class:`~brainrecon.decoders.neuropictor.model.FMRIAutoencoder` (stage ``"encoder"``).
    cfg : TrainConfig
    data : TrainingData
    base : BaseComponents, optional
        Frozen UNet / VAE / text encoder (diffusion stages).
    empty_context : torch.Tensor, optional
        ``(L, E)`` embedding of the empty caption (CFG dropout).
    sem_text_model : optional
        Text model of the semantic-loss target when it is not ``base.text_encoder``.
    validate : callable, optional
        ``validate(net, step, directory)`` called on the main process every ``cfg.validate_every`` steps.
    stats : dict, optional
        Filled with ``step_seconds`` (wall time of each step run here), ``samples_per_step``
        (global batch) and, on CUDA, ``peak_memory_bytes`` (``torch.cuda.max_memory_allocated``).
    """
    accelerator = make_accelerator(cfg)
    device = accelerator.device
    wdtype = weight_dtype(accelerator.mixed_precision)
    diffusion = cfg.stage != "encoder"
    rank, world = accelerator.process_index, accelerator.num_processes
    accum = max(1, int(cfg.grad_accum))
    schedule = BatchSchedule(len(data), cfg.batch_size, world, cfg.seed, accum)

    old_processors = None
    if diffusion:
        from brainrecon.decoders.neuropictor.sample import training_scheduler

        noise_scheduler = training_scheduler()
        for module in (base.unet, base.vae, base.text_encoder):
            place(module, device, wdtype)
        if sem_text_model is not None:
            place(sem_text_model, device, wdtype)
        if cfg.gradient_checkpointing:
            base.unet.enable_gradient_checkpointing()
            net.controlnet.enable_gradient_checkpointing()
        if cfg.detach_unet_encoder:
            old_processors = detach_encoder_context(base.unet)
        empty = empty_context.to(device)
        text_model = sem_text_model if sem_text_model is not None else base.text_encoder
    if cfg.gradient_checkpointing:
        net.fmri_encoder.gradient_checkpointing = True
        if not diffusion:
            net.head.gradient_checkpointing = True
    net.to(device).train()
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)

    start, losses = 0, []
    if cfg.resume and cfg.checkpoint_dir:
        found = newest_intact_checkpoint(cfg.checkpoint_dir, log=accelerator.print,
                                         check=checkpoint_check(net, optimizer))
        if found:
            start, losses = load_checkpoint(found[0], net, optimizer, cfg, loaded=found[1])
            for group in optimizer.param_groups:  # the settings given now win over the saved ones
                group["lr"], group["weight_decay"] = cfg.lr, cfg.weight_decay
            accelerator.print(f"Resuming {cfg.stage} from {found[0]} (step {start}).")
        else:
            accelerator.print(f"No checkpoint in {cfg.checkpoint_dir}; starting at step 0.")
    losses = losses[:start]
    wrapped, optimizer = accelerator.prepare(net, optimizer)

    from tqdm.auto import tqdm

    from brainrecon.progress import bar_disabled

    bar = tqdm(total=cfg.total_steps, initial=start, desc=f"neuropictor {cfg.stage}",
               disable=bar_disabled(cfg.progress and accelerator.is_main_process), unit="step")
    rate = None
    stats = {} if stats is None else stats
    stats["step_seconds"] = []
    stats["samples_per_step"] = schedule.global_batch
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        for step in range(start, cfg.total_steps):
            tic = time.perf_counter()
            factor = lr_factor(cfg.lr_schedule, step, cfg.total_steps, int(cfg.lr_warmup_steps))
            for group in optimizer.param_groups:
                group["lr"] = cfg.lr * factor
            total = torch.zeros((), device=device)
            for micro in range(accum):
                # Draws are keyed by the slot of the global batch, not by process and micro-step,
                # so one process accumulating and several processes give the same noise.
                slot = micro * world + rank
                gen = torch.Generator().manual_seed(step_seed(cfg.seed, step, 0, stream=2 * slot))
                rng = np.random.default_rng(step_seed(cfg.seed, step, 0, stream=2 * slot + 1))
                batch = data.batch(schedule.positions(step, rank, micro), rng)
                surfaces = batch["surfaces"].to(device)
                # Gradients are synchronised between processes on the last micro-step only.
                sync = contextlib.nullcontext() if micro == accum - 1 else accelerator.no_sync(wrapped)
                with sync:
                    with accelerator.autocast():
                        if diffusion:
                            loss = diffusion_loss(wrapped, base, batch, surfaces, gen, cfg, noise_scheduler,
                                                   empty, text_model, wdtype, device)
                        else:
                            loss = F.mse_loss(wrapped(surfaces).float(), surfaces)
                    accelerator.backward(loss / accum)
                total = total + loss.detach().float() / accum
            if cfg.grad_clip:
                accelerator.clip_grad_norm_(params, float(cfg.grad_clip))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            value = float(accelerator.reduce(total, reduction="mean"))
            losses.append(value)
            done = step + 1
            elapsed = time.perf_counter() - tic  # float() above synchronised the device
            stats["step_seconds"].append(elapsed)
            now = schedule.global_batch / max(elapsed, 1e-9)
            rate = now if rate is None else 0.9 * rate + 0.1 * now
            bar.update(1)
            bar.set_postfix(loss=f"{value:.4f}", samples_per_s=f"{rate:.1f}")
            if cfg.checkpoint_dir and cfg.checkpoint_every and done % cfg.checkpoint_every == 0:
                if accelerator.is_main_process:
                    save_checkpoint(Path(cfg.checkpoint_dir), done,
                                    accelerator.unwrap_model(wrapped), optimizer, cfg, losses)
                accelerator.wait_for_everyone()
            if validate and cfg.validate_every and done % cfg.validate_every == 0:
                if accelerator.is_main_process:
                    validate(accelerator.unwrap_model(wrapped), done, Path(cfg.checkpoint_dir))
                    net.train()
                accelerator.wait_for_everyone()
    finally:
        bar.close()
        if device.type == "cuda":
            stats["peak_memory_bytes"] = int(torch.cuda.max_memory_allocated(device))
        if old_processors is not None:
            base.unet.set_attn_processor(old_processors)
        if diffusion and cfg.gradient_checkpointing:
            base.unet.disable_gradient_checkpointing()
    net.eval()
    return losses


def diffusion_loss(net, base, batch, surfaces, gen, cfg: TrainConfig, noise_scheduler, empty,
                   text_model, wdtype, device) -> torch.Tensor:
    """The loss of one batch (diffusion + weighted semantic); random draws from ``gen`` in a fixed order."""
    images = batch["images"].to(device=device, dtype=wdtype)
    with torch.no_grad():
        posterior = base.vae.encode(images).latent_dist
        z0 = posterior.sample(generator=gen).float() * base.vae.config.scaling_factor
    n = z0.shape[0]
    # The draws are made on the CPU generator in a fixed order, so they do not depend on the device.
    t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (n,), generator=gen).to(device)
    eps = torch.randn(z0.shape, generator=gen).to(device)
    drop = None
    if cfg.cfg_drop > 0:
        drop = (torch.rand(n, generator=gen) < cfg.cfg_drop).to(device)
    zt = noise_scheduler.add_noise(z0, eps, t)
    down, mid, context, context_main = net(surfaces, zt, t, use_aux=cfg.use_aux, drop_mask=drop,
                                           empty_context=empty)
    eps_hat = base.unet(
        zt.to(wdtype), t, encoder_hidden_states=context.to(wdtype),
        down_block_additional_residuals=[d.to(wdtype) for d in down],
        mid_block_additional_residual=mid.to(wdtype),
    ).sample.float()
    loss = F.mse_loss(eps_hat, eps)
    if cfg.semantic_weight > 0:
        target = encode_text(base.tokenizer, text_model, batch["captions"], device)
        loss = loss + cfg.semantic_weight * F.mse_loss(context_main.float(), target)
    return loss


__all__ = ["TrainConfig", "TrainingData", "encode_text", "list_checkpoints", "run_training"]
