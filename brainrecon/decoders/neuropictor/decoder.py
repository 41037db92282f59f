""":class:`NeuroPictorDecoder`: the three-stage NeuroPictor diffusion decoder behind the Decoder interface."""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from brainrecon.decoders.base import CliOption, Decoder
from brainrecon.decoders.neuropictor import control, model, official, sample
from brainrecon.decoders.neuropictor import train as train_module
from brainrecon.decoders.neuropictor.encoder import (
    LAYER_NORM_EPS,
    LEGACY_LAYER_NORM_EPS,
)
from brainrecon.decoders.neuropictor.recipes import RECIPES
from brainrecon.decoders.neuropictor.weights import (
    SAVED_FIX,
    empty_init,
    load_safetensors_strict,
    load_state_dict_strict,
    read_safetensors,
    save_safetensors_atomic,
)
from brainrecon.devices import resolve_device
from brainrecon.errors import BrainreconError, BrainreconWarning, DataError
from brainrecon.io import check_arrays

STAGES = ("encoder", "pretrain", "finetune", "cfg")
# Learning rate and epochs of each stage when not given (spec neuropictor.md §7).
STAGE_LR = {"encoder": 1e-4, "pretrain": 1e-4, "finetune": 1e-4, "cfg": 1e-5}
STAGE_EPOCHS = {"encoder": 100, "pretrain": 100, "finetune": 160, "cfg": 20}
SEM_TARGETS = ("penultimate", "last")
MIXED_PRECISION = ("auto", "no", "bf16", "fp16")
SAMPLE_PRECISION = ("auto", "fp16-autocast")
PIXEL_ROUNDING = ("round", "truncate")
# Keys of per-stage parameter mappings: brainrecon's stages and the official yaml names
# (models/{pretrain,pretrain_mask,finetune,finetune_mask}.yaml). Stage "cfg" looks up
# "pretrain_mask" or "finetune_mask" (by whether it continues a pre-trained or a fine-tuned
# model), then "cfg".
STAGE_KEYS = ("encoder", "pretrain", "pretrain_mask", "finetune", "finetune_mask", "cfg")
PER_STAGE = ("lr", "steps", "epochs", "semantic_weight", "global_batch", "detach_unet_encoder")
SIZE_PARAMS = tuple(model.Sizes.__dataclass_fields__)
ENCODER_SIZES = ("surface_size", "patch_size", "encoder_dim", "encoder_depth", "encoder_heads")
HEAD_SIZES = ("bottleneck_dim", "decoder_dim", "decoder_depth", "decoder_heads")

ENCODER_FILE = "fmri_encoder.safetensors"
HEAD_FILE = "fmri_autoencoder_head.safetensors"
SEMANTIC_FILE = "semantic.safetensors"
EMPTY_CONTEXT_FILE = "empty_context.safetensors"
# Layout of a saved NeuroPictor decoder (``state["layout"]`` in brainrecon.json). 1 (no field):
# encoder LayerNorm eps 1e-6; 2: eps taken from the ``encoder_eps`` parameter (default 1e-5).
LAYOUT = 2
VALIDATION_ROWS = 4
VALIDATION_STEPS = 20  # DDIM steps of the validation grids, as in the original code


class NeuroPictorDecoder(Decoder):
    """NeuroPictor (Huo et al., ECCV 2024): fMRI surface maps modulate a frozen Stable Diffusion 2.1-base.

    An fMRI encoder turns a cortical surface map into tokens (257 x 1024); a high-level
    guiding network maps them to the 77 x 1024 text-conditioning space; a ControlNet whose
    conditioning embedding is the fMRI feature transformation adds 13 residuals into the
    frozen UNet. Trained in stages; each ``fit`` runs one stage, starting from the decoder
    saved by the previous one (``init_from``)::

        encoder   -> ViT autoencoder on surface maps (MSE)                       (any subjects)
        pretrain  -> diffusion loss, semantic weight 0, auxiliary branch off       (subjects 1-8)
        finetune  -> diffusion + 0.1 x semantic loss, auxiliary branch on          (one subject)
        cfg       -> 5 % of contexts replaced by the empty caption, lr 1e-5        (after pretrain or finetune)

    Parameters
    ----------
    stage : {"encoder", "pretrain", "finetune", "cfg"}
        The training stage ``fit`` runs.
    subjects : list of int, optional
        Subjects to train on (default: all subjects of the training split).
    base_model : str
        The frozen Stable Diffusion 2.1-base: Hugging Face repo id, a local directory in the
        diffusers layout (``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``), ``"tiny"``
        (small random components built in-process, for tests without weights) or
        ``"tiny-pixel"`` (a tiny UNet on an exact pixel-space autoencoder, for smoke runs on
        the synthetic data).
    init_from : str, optional
        Directory of a saved NeuroPictor decoder (a previous stage). Its fMRI encoder is
        loaded; from a diffusion stage also the semantic network and the ControlNet. Required
        for stage ``"cfg"``.
    surface_size, patch_size, encoder_dim, encoder_depth, encoder_heads : int
        fMRI encoder: 256, 16, 1024, 24, 16.
    encoder_init : str, optional
        The released UK-Biobank fMRI autoencoder (``checkpoint_120000.pth``, or a file of the
        same layout) to start the fMRI encoder from, when ``init_from`` is not given (read by
        :func:`~brainrecon.decoders.neuropictor.load_official_encoder`; its sizes must agree with
        the size parameters above). In stage ``"encoder"`` the file's autoencoder decoder
        (``pred``, ``decoder_*``) is loaded too, to continue its training.
    encoder_config : str, optional
        Its ``fMRI_AutoEncoder.yaml``: heads and dropout rate (sizes are checked against the file).
    encoder_eps : float
        LayerNorm eps of the encoder (1e-5, the official ``nn.LayerNorm`` default). Decoders
        saved before this parameter existed load with the 1e-6 they were trained with.
    encoder_drop, encoder_attn_drop, encoder_drop_path : float, optional
        Dropout, attention-dropout and stochastic-depth rates of the encoder blocks during
        training. Default: ``Model.drop_rate`` of ``encoder_config`` for all three (as the
        official model uses it), else 0; the last two default to ``encoder_drop``.
    bottleneck_dim, decoder_dim, decoder_depth, decoder_heads : int
        Autoencoder bottleneck and decoder (stage ``"encoder"`` only): 2048, 512, 8, 16.
    semantic_hidden : int, optional
        Intermediate token count of the guiding network (default: encoder tokens // 2, the
        official rule; 128 at 257 tokens).
    image_size : int
        Training images are resized to, and reconstructions have, this side (512).
    image_resize : {"bicubic", "pil-bilinear"}
        Resizing of training images: torch bicubic with antialiasing (default), or PIL bilinear
        as the official data loader (torchvision ``Resize`` on PIL images).
    sem_target : {"penultimate", "last"}
        Semantic-loss target. ``"penultimate"``: the SD 2.1 text encoder's output, which is
        the conditioning the UNet uses (diffusers' SD 2.1 text encoder already ends at the
        OpenCLIP penultimate layer). ``"last"``: the official code's target, the 24-layer
        OpenCLIP ViT-H/14 text tower's last layer, loaded from ``sem_text_model``.
    sem_text_model : str
        Repo id or directory of the 24-layer text model used when ``sem_target="last"``.
    lr : float or dict, optional
        AdamW learning rate (default 1e-4; 1e-5 in stage ``"cfg"``). This and the other
        parameters marked "or dict" also take a per-stage mapping, keyed by brainrecon's stage
        names or the official yaml names (``{"pretrain": 1e-4, "pretrain_mask": 1e-5,
        "finetune": 1e-4, "finetune_mask": 1e-5}``; stage ``"cfg"`` reads ``"pretrain_mask"``
        or ``"finetune_mask"`` by the model it continues, then ``"cfg"``); stages not in the
        mapping get the default. This is how one recipe covers every stage.
    weight_decay : float
        AdamW weight decay (0.01).
    grad_clip : float, optional
        Clip the global gradient norm to this value (None: no clipping, as the official code).
    lr_schedule : {"constant", "linear", "cosine"}
        Learning-rate schedule over the run's steps ("constant": the official code's).
    lr_warmup_steps : int
        Linear warm-up steps before the schedule (0).
    batch_size : int
        Samples per micro-step and per GPU (16).
    global_batch : int or dict, optional
        Samples per optimiser step over all processes; gradient accumulation makes up the
        difference: ``grad_accum = global_batch / (batch_size * processes)`` (must divide).
        The official runs use 96 in pre-training (6 GPUs x 16) and 32 in fine-tuning (2 x 16).
    grad_accum : int, optional
        Micro-steps per optimiser step (default 1, or derived from ``global_batch``).
    steps, epochs : int or dict, optional
        Optimiser steps; if ``steps`` is None, ``epochs`` passes over the data (default per
        stage: 100, 100, 160, 20), at ``global_batch`` samples per step.
    semantic_weight : float or dict, optional
        lambda of the semantic loss (default 0 in ``"pretrain"``, 0.1 in ``"finetune"``, and in
        ``"cfg"`` 0.1 when the auxiliary branch is active, else 0).
    cfg_drop : float
        Probability of replacing a context by the empty-caption embedding in stage ``"cfg"`` (0.05).
    detach_unet_encoder : bool or dict, optional
        Run the frozen UNet's encoder and middle block on a detached context (the original's
        ``no_grad`` in pre-training from SD). Default: true in ``"pretrain"`` only.
    gradient_checkpointing : bool
        Recompute activations in the backward pass (fMRI encoder, ControlNet, UNet).
    mixed_precision : {"auto", "no", "bf16", "fp16"}
        ``"auto"``: bf16 on CUDA, none on CPU. Frozen modules are stored in this dtype.
    sample_precision : {"auto", "fp16-autocast"}
        Precision of sampling. ``"auto"``: the frozen modules in the ``mixed_precision`` dtype
        (bf16 on CUDA). ``"fp16-autocast"``: float32 weights under fp16 autocast, as the
        official ``reconstruction.py`` (``--precision autocast``); on CPU, where there is no
        fp16 autocast, float32.
    pixel_rounding : {"round", "truncate"}
        Quantisation of the decoded images to uint8: to the nearest level (default), or
        truncated as the official ``reconstruction.py`` writes its PNGs.
    control_scale : float
        alpha, multiplies the 13 ControlNet residuals at inference (1.0; 0 = semantics only).
    guidance_scale : float
        Classifier-free guidance on the semantics (5.0).
    num_inference_steps : int
        DDIM steps (50).
    predict_batch_size : int
        Images denoised together at inference (4).
    seed : int
        Seeds data order, noise, initialisation and the per-image inference noise.
    device : str, default "auto"
        ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"auto"`` (CUDA when available; None, as older
        saved decoders hold, means the same). Under ``accelerate launch`` the process's device
        is used.
        Several CPU processes (gloo): ``accelerate launch --multi_gpu --num_processes N
        --num_machines 1 --mixed_precision no --dynamo_backend no -m brainrecon.cli fit --decoder
        neuropictor --device cpu ...`` (``accelerate launch --cpu`` starts one process whatever
        ``--num_processes`` says).
    checkpoint_dir : str, optional
        Where training checkpoints (and validation grids) go.
    resume : bool
        Continue from the newest checkpoint in ``checkpoint_dir``.
    checkpoint_every : int
        Steps between checkpoints (1000).
    validate_every : int, optional
        Steps between validation grids (written to ``checkpoint_dir/validation/``).
    progress : bool
        Show a progress bar with loss and throughput.

    Notes
    -----
    Sizes default to the official architecture: fMRI encoder 302,575,616 parameters,
    semantic network 2,207,074, feature transformation 4,803,332, ControlNet 363,141,760,
    frozen UNet 865,910,724 (:func:`component_parameter_counts`).

    Recipes (``fit --recipe NAME``; ``brainrecon decoders describe neuropictor`` lists every
    value with its source): ``neuropictor-released`` sets the official code's values per stage
    (``models/*.yaml``, ``train.py``, ``reconstruction.py``, ``dataset/dataset.py`` of
    jingyanghuo/neuropictor) and the epoch counts of the released models;
    ``neuropictor-paper`` replaces them where the paper (Huo et al., ECCV 2024, §4.1) says
    otherwise (batch 64 and 100k iterations in pre-training, 60k in fine-tuning).

    Where brainrecon still differs from the official code, and why:

    - frozen UNet / VAE / text encoder are stored in the mixed-precision dtype (bf16) instead
      of fp32 weights under bf16 autocast: half the memory of 1.3 B frozen parameters; the
      trainable part is fp32 under autocast as officially. The UNet gets no gradients of its
      own (officially computed and discarded, ~3.5 GB);
    - noise and sample order come from per-step seeds (resumable, process-count independent
      data order) and each reconstruction from a per-image seed, not one global seed 42, so
      individual images differ from the official ones while the distribution is the same;
    - the semantic target defaults to the penultimate text layer (no 354 M-parameter second
      text tower to download); the recipes set the official ``"last"``;
    - stage lengths are counted in optimiser steps at the global batch; the recipes give the
      released epochs. Fine-tuning subjects 2, 5 and 7 ran 180-200 epochs officially: pass
      ``--param epochs='{"finetune": 200}'`` (the released files do not say which);
    - the unused image-hint encoder of the ControlNet copy is not built, and the training-time
      validation metrics (LPIPS, EffNet, Inception on 25 % of the test set) are replaced by
      image grids (``validate_every``); ``brainrecon evaluate`` scores the final model;
    - subjects per stage are not part of a recipe (``--subjects 1 2 3 4 5 6 7 8`` for
      pre-training, one subject for fine-tuning);
    - stage ``"encoder"`` trains the autoencoder on the training split's surface maps; the
      released encoder was pre-trained on UK-Biobank resting-state maps of 40k subjects (batch
      384, AdamW 5e-4, linear schedule; script not released), which brainrecon cannot repeat:
      start from it with ``encoder_init`` instead.
    """

    name = "neuropictor"
    predicts = "images"
    multi_subject = True
    summary = "NeuroPictor: fMRI surface maps control Stable Diffusion 2.1 (ControlNet + semantic context)"
    citation = ("NeuroPictor: refining fMRI-to-image reconstruction via multi-individual pretraining and "
                "multi-level modulation (Huo et al., ECCV 2024).")
    main_params = ("stage", "base_model", "init_from", "image_size", "batch_size", "steps",
                   "control_scale", "guidance_scale")
    recipes = RECIPES
    cli_options = (
        CliOption("stage", "--stage", "str", "training stage", STAGES),
        CliOption("init_from", "--init-from", "path", "saved decoder (run/decoder) of the previous stage"),
    )

    def __init__(
        self,
        *,
        stage: str = "pretrain",
        subjects: Sequence[int] | None = None,
        base_model: str = model.SD21_BASE,
        init_from: str | None = None,
        surface_size: int = 256,
        patch_size: int = 16,
        encoder_dim: int = 1024,
        encoder_depth: int = 24,
        encoder_heads: int = 16,
        encoder_init: str | None = None,
        encoder_config: str | None = None,
        encoder_eps: float = LAYER_NORM_EPS,
        encoder_drop: float | None = None,
        encoder_attn_drop: float | None = None,
        encoder_drop_path: float | None = None,
        bottleneck_dim: int = 2048,
        decoder_dim: int = 512,
        decoder_depth: int = 8,
        decoder_heads: int = 16,
        semantic_hidden: int | None = None,
        image_size: int = 512,
        image_resize: str = "bicubic",
        sem_target: str = "penultimate",
        sem_text_model: str = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
        lr: float | dict | None = None,
        weight_decay: float = 0.01,
        grad_clip: float | None = None,
        lr_schedule: str = "constant",
        lr_warmup_steps: int = 0,
        batch_size: int = 16,
        global_batch: int | dict | None = None,
        grad_accum: int | None = None,
        steps: int | dict | None = None,
        epochs: int | dict | None = None,
        semantic_weight: float | dict | None = None,
        cfg_drop: float = 0.05,
        detach_unet_encoder: bool | dict | None = None,
        gradient_checkpointing: bool = True,
        mixed_precision: str = "auto",
        sample_precision: str = "auto",
        pixel_rounding: str = "round",
        control_scale: float = 1.0,
        guidance_scale: float = 5.0,
        num_inference_steps: int = 50,
        predict_batch_size: int = 4,
        seed: int = 0,
        device: str | None = "auto",
        checkpoint_dir: str | None = None,
        resume: bool = False,
        checkpoint_every: int = 1000,
        validate_every: int | None = None,
        progress: bool = True,
    ):
        self.stage = stage
        self.subjects = subjects
        self.base_model = base_model
        self.init_from = init_from
        self.surface_size = surface_size
        self.patch_size = patch_size
        self.encoder_dim = encoder_dim
        self.encoder_depth = encoder_depth
        self.encoder_heads = encoder_heads
        self.encoder_init = encoder_init
        self.encoder_config = encoder_config
        self.encoder_eps = encoder_eps
        self.encoder_drop = encoder_drop
        self.encoder_attn_drop = encoder_attn_drop
        self.encoder_drop_path = encoder_drop_path
        self.bottleneck_dim = bottleneck_dim
        self.decoder_dim = decoder_dim
        self.decoder_depth = decoder_depth
        self.decoder_heads = decoder_heads
        self.semantic_hidden = semantic_hidden
        self.image_size = image_size
        self.image_resize = image_resize
        self.sem_target = sem_target
        self.sem_text_model = sem_text_model
        self.lr = lr
        self.weight_decay = weight_decay
        self.grad_clip = grad_clip
        self.lr_schedule = lr_schedule
        self.lr_warmup_steps = lr_warmup_steps
        self.batch_size = batch_size
        self.global_batch = global_batch
        self.grad_accum = grad_accum
        self.steps = steps
        self.epochs = epochs
        self.semantic_weight = semantic_weight
        self.cfg_drop = cfg_drop
        self.detach_unet_encoder = detach_unet_encoder
        self.gradient_checkpointing = gradient_checkpointing
        self.mixed_precision = mixed_precision
        self.sample_precision = sample_precision
        self.pixel_rounding = pixel_rounding
        self.control_scale = control_scale
        self.guidance_scale = guidance_scale
        self.num_inference_steps = num_inference_steps
        self.predict_batch_size = predict_batch_size
        self.seed = seed
        self.device = device
        self.checkpoint_dir = checkpoint_dir
        self.resume = resume
        self.checkpoint_every = checkpoint_every
        self.validate_every = validate_every
        self.progress = progress

    describe_text = staticmethod(model.describe_text)

    # ------------------------------------------------------------------ validation of parameters
    def _sizes(self) -> model.Sizes:
        values = {k: getattr(self, k) for k in SIZE_PARAMS}
        if values["semantic_hidden"] is None:
            values["semantic_hidden"] = _default_semantic_hidden(values)
        for k, v in values.items():
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
                raise BrainreconError(f"{k} must be a positive integer, got {v!r}.")
        if self.surface_size % self.patch_size:
            raise BrainreconError(
                f"surface_size {self.surface_size} is not a multiple of patch_size {self.patch_size}; "
                f"choose a patch_size that divides it."
            )
        for dim, heads, what in ((self.encoder_dim, self.encoder_heads, "encoder"),
                                 (self.decoder_dim, self.decoder_heads, "decoder")):
            if dim % heads or dim % 4:
                raise BrainreconError(
                    f"{what}_dim {dim} must be a multiple of 4 and of {what}_heads {heads}."
                )
        return model.Sizes(**{k: int(v) for k, v in values.items()})

    def _encoder_options(self, training: bool) -> dict[str, float]:
        """LayerNorm eps and (in training) the dropout rates of the fMRI encoder."""
        eps = float(self.encoder_eps)
        if not eps > 0:
            raise BrainreconError(f"encoder_eps must be positive, got {self.encoder_eps!r}.")
        if not training:  # dropout is inactive in eval mode; the yaml need not exist here
            return {"eps": eps}
        drop = self.encoder_drop
        if drop is None:
            drop = official.read_encoder_config(self.encoder_config).get("drop_rate", 0.0)
        rates = {"drop": drop,
                 "attn_drop": drop if self.encoder_attn_drop is None else self.encoder_attn_drop,
                 "drop_path": drop if self.encoder_drop_path is None else self.encoder_drop_path}
        for name, rate in rates.items():
            if not 0.0 <= float(rate) < 1.0:
                raise BrainreconError(f"The encoder's {name} rate must be in [0, 1), got {rate!r}.")
        return {"eps": eps, **{k: float(v) for k, v in rates.items()}}

    def _official_encoder(self, sizes: model.Sizes):
        """The encoder of ``encoder_init`` (with this decoder's eps and rates), checked against the sizes.

        Returns the encoder and the file's (prefix-stripped) state dict.
        """
        obj = official.torch_load_weights_only(self.encoder_init, "fMRI encoder (encoder_init)")
        state = official.encoder_state_from_file(obj, str(self.encoder_init))
        spec = official.infer_encoder_spec(state, official.read_encoder_config(self.encoder_config),
                                           str(self.encoder_init))
        found = {"surface_size": spec.surface_size, "patch_size": spec.patch_size,
                 "encoder_dim": spec.dim, "encoder_depth": spec.depth, "encoder_heads": spec.heads}
        diff = [f"{k}={v}" for k, v in found.items() if getattr(sizes, k) != v]
        if diff or spec.in_chans != 1:
            what = ", ".join(f"{k}={getattr(sizes, k)}" for k in found)
            raise BrainreconError(
                f"encoder_init={self.encoder_init!r} holds an encoder with "
                f"{', '.join(f'{k}={v}' for k, v in found.items())}, in_chans={spec.in_chans}"
                + ("" if self.encoder_config else " (heads: the official 16, no encoder_config given)")
                + f", but this decoder has {what}. Build the decoder with "
                + (", ".join(diff) if diff else "the same sizes") + " (single-channel surface maps)."
            )
        encoder = official.encoder_from_state(state, self.encoder_config, source=str(self.encoder_init),
                                              **self._encoder_options(training=True))
        return encoder, state

    def _official_head(self, encoder, state, sizes: model.Sizes):
        """The released autoencoder's bottleneck and decoder, checked against this decoder's sizes."""
        head = official.autoencoder_head_from_state(state, encoder.official_spec,
                                                    self.encoder_config, source=str(self.encoder_init),
                                                    **self._encoder_options(training=True))
        found = {"bottleneck_dim": head.pred.out_features, "decoder_dim": head.decoder_embed.out_features,
                 "decoder_depth": len(head.decoder_blocks), "decoder_heads": encoder.official_spec.heads}
        diff = [f"{k}={v}" for k, v in found.items() if getattr(sizes, k) != v]
        if diff:
            raise BrainreconError(
                f"encoder_init={self.encoder_init!r} holds an autoencoder decoder with "
                f"{', '.join(f'{k}={v}' for k, v in found.items())}, but this decoder has "
                f"{', '.join(f'{k}={getattr(sizes, k)}' for k in found)}. Build the decoder with {', '.join(diff)}."
            )
        return head

    @staticmethod
    def _stage_keys(stage: str, use_aux: bool) -> tuple[str, ...]:
        if stage == "cfg":
            return ("finetune_mask" if use_aux else "pretrain_mask", "cfg")
        return (stage,)

    def _per_stage(self, name: str, keys: Sequence[str], default=None):
        """Parameter ``name`` for the stage with lookup ``keys``; a mapping is read per stage."""
        value = getattr(self, name)
        if isinstance(value, Mapping):
            unknown = sorted(set(value) - set(STAGE_KEYS))
            if unknown:
                raise BrainreconError(
                    f"{name} maps unknown stage(s) {unknown}; valid keys: {', '.join(STAGE_KEYS)}."
                )
            value = next((value[k] for k in keys if k in value), None)
        return default if value is None else value

    def _grad_accum(self, keys: Sequence[str], processes: int) -> int:
        """Micro-steps per optimiser step, from ``grad_accum`` or ``global_batch``."""
        accum = self.grad_accum
        global_batch = self._per_stage("global_batch", keys)
        per_step = int(self.batch_size) * processes
        if global_batch is not None:
            if int(global_batch) < 1 or int(global_batch) % per_step:
                raise BrainreconError(
                    f"global_batch {global_batch} is not a multiple of batch_size {self.batch_size} x "
                    f"{processes} process(es) = {per_step}; choose a batch_size (or number of GPUs) "
                    f"that divides it."
                )
            derived = int(global_batch) // per_step
            if accum is not None and int(accum) != derived:
                raise BrainreconError(
                    f"grad_accum={accum} contradicts global_batch {global_batch} = batch_size "
                    f"{self.batch_size} x {processes} process(es) x {derived}; give one of the two."
                )
            accum = derived
        accum = 1 if accum is None else accum
        if not isinstance(accum, (int, np.integer)) or isinstance(accum, bool) or accum < 1:
            raise BrainreconError(f"grad_accum must be a positive integer, got {accum!r}.")
        return int(accum)

    def _check_choice(self, name: str, choices: Sequence[str]) -> None:
        value = getattr(self, name)
        if value not in choices:
            raise BrainreconError(
                f"Unknown {name} {value!r}. Valid choices: {', '.join(map(repr, choices))}."
            )

    @property
    def reconstructs_images(self) -> bool:
        """False for an encoder-stage decoder, which reconstructs surface maps, not images."""
        return getattr(self, "stage_", self.stage) != "encoder"

    def _device(self) -> torch.device:
        return resolve_device(self.device)

    def _mixed_precision(self, device: torch.device) -> str:
        self._check_choice("mixed_precision", MIXED_PRECISION)
        if self.mixed_precision == "auto":
            return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "no"
        if self.mixed_precision != "no" and device.type != "cuda":
            raise BrainreconError(
                f"mixed_precision={self.mixed_precision!r} needs a CUDA device; on CPU use 'no' or 'auto'."
            )
        return self.mixed_precision

    # ------------------------------------------------------------------ frozen components
    def _base(self) -> model.BaseComponents:
        cache = getattr(self, "_base_cache", None)
        if cache is None or cache.source != self.base_model:
            cache = model.load_base_components(self.base_model, seed=int(self.seed))
            self._base_cache = cache
        return cache

    def _sem_text_model(self):
        if self.sem_target != "last":
            return None
        cached = getattr(self, "_sem_model_cache", None)
        if cached is None:
            cached = self._sem_model_cache = model.load_text_model(self.sem_text_model)
        return cached

    def _geometry(self, base: model.BaseComponents) -> dict[str, int]:
        factor = base.vae_scale_factor
        down = 2 ** (len(base.unet.config.block_out_channels) - 1)
        if self.image_size % (factor * down):
            raise BrainreconError(
                f"image_size {self.image_size} must be a multiple of {factor * down} (VAE factor "
                f"{factor} x UNet down-sampling {down}); e.g. 512."
            )
        return {
            "latent_size": self.image_size // factor,
            "latent_channels": int(base.unet.config.in_channels),
            "channels": int(base.unet.config.block_out_channels[0]),
            "context_tokens": base.context_tokens,
            "context_dim": base.context_dim,
        }

    # ------------------------------------------------------------------ building and loading parts
    def _init_config(self) -> dict | None:
        if self.init_from is None:
            return None
        cfg = model.read_saved_config(self.init_from)
        if cfg.get("decoder") != self.name:
            raise BrainreconError(
                f"init_from={self.init_from!r} holds a {cfg.get('decoder')!r} decoder, not a NeuroPictor one."
            )
        return cfg

    def _check_init_sizes(self, init_cfg: dict, names: Sequence[str]) -> None:
        params = dict(init_cfg.get("params", {}))
        mine = {k: getattr(self, k) for k in names}
        if "semantic_hidden" in mine:  # compare the widths actually built
            if params.get("semantic_hidden") is None:
                params["semantic_hidden"] = _default_semantic_hidden(params)
            mine["semantic_hidden"] = self._sizes().semantic_hidden
        diff = [f"{k}={params.get(k)!r} there vs {v!r} here" for k, v in mine.items() if params.get(k) != v]
        if diff:
            raise BrainreconError(
                f"init_from={self.init_from!r} was trained with other sizes ({'; '.join(diff)}); "
                f"build this decoder with the same sizes."
            )

    def _build_trainable(self, stage: str, init_cfg: dict | None, base) -> tuple[torch.nn.Module, dict]:
        """Fresh or ``init_from``-initialised trainable network for ``stage``; also returns geometry."""
        sizes = self._sizes()
        init_stage = (init_cfg or {}).get("state", {}).get("stage")
        init_dir = Path(self.init_from) if self.init_from else None
        with torch.random.fork_rng(devices=[]):  # seeded initialisation without touching the caller's RNG
            torch.manual_seed(int(self.seed))
            return self._build_trainable_seeded(stage, init_cfg, base, sizes, init_stage, init_dir)

    def _build_trainable_seeded(self, stage, init_cfg, base, sizes, init_stage, init_dir):
        options = self._encoder_options(training=True)
        if self.encoder_init is not None:
            if init_cfg is not None:
                raise BrainreconError(
                    "Give either init_from (a saved brainrecon decoder) or encoder_init (the released "
                    "fMRI encoder file), not both: init_from already holds an fMRI encoder."
                )
            encoder, official_state = self._official_encoder(sizes)
        else:
            encoder = sizes.encoder(**options)
        if init_cfg is not None:
            self._check_init_sizes(init_cfg, ENCODER_SIZES)
            saved_eps = _saved_encoder_eps(init_cfg)
            if saved_eps != float(self.encoder_eps):
                raise BrainreconError(
                    f"init_from={self.init_from!r} was trained with encoder LayerNorm eps {saved_eps:g}, "
                    f"this decoder has encoder_eps={self.encoder_eps!r}. Pass encoder_eps={saved_eps:g} "
                    f"to continue with the value it was trained with, or refit the earlier stage.",
                    parameters=("encoder_eps",)
                )
            load_state_dict_strict(encoder, read_safetensors(init_dir / ENCODER_FILE, "fMRI encoder"),
                                   "fMRI encoder", source=str(init_dir / ENCODER_FILE))
        if stage == "encoder" and self.encoder_init is not None:
            # Continue the released autoencoder (e.g. on NSD surfaces): its decoder comes along.
            return model.FMRIAutoencoder(encoder, self._official_head(encoder, official_state, sizes)), {}
        if stage == "encoder":
            head = sizes.autoencoder_head(**options)
            if init_stage == "encoder":
                self._check_init_sizes(init_cfg, HEAD_SIZES)
                load_state_dict_strict(head, read_safetensors(init_dir / HEAD_FILE, "autoencoder head"),
                                       "autoencoder head", source=str(init_dir / HEAD_FILE))
            return model.FMRIAutoencoder(encoder, head), {}
        geometry = self._geometry(base)
        if init_cfg is not None and init_stage != "encoder":
            self._check_init_sizes(init_cfg, ("semantic_hidden", "image_size"))
            saved = init_cfg["state"].get("geometry", {})
            if saved != geometry:
                raise BrainreconError(
                    f"init_from={self.init_from!r} was trained on a base model of another shape "
                    f"({saved}) than base_model={self.base_model!r} ({geometry}); use the same base_model."
                )
            net = _load_diffusion_parts(init_dir, sizes, init_cfg["state"], {}, encoder=encoder)
            return net, geometry
        semantic = sizes.semantic(geometry["context_tokens"], geometry["context_dim"])
        transform = sizes.feature_transform(geometry["channels"], geometry["latent_size"])
        controlnet = control.build_controlnet(base.unet, transform)
        return model.NeuroPictorNet(encoder, semantic, controlnet), geometry

    # ------------------------------------------------------------------ fit
    def fit(self, train, validation=None) -> "NeuroPictorDecoder":
        """Run the configured training stage.

        Parameters
        ----------
        train : brainrecon.data.Split
            Uses ``train.surfaces(subject)`` ``(n, S, S)``, ``train.images(subject, idx)``
            (resized to ``image_size``) and ``train.captions(subject)`` (empty when absent).
        validation : brainrecon.data.Split, optional
            Source of the validation grids (default: the dataset's named validation split,
            ``train.dataset.validation`` — the source's own or its seeded hold-out of training images).

        Returns
        -------
        self
        """
        self._check_choice("stage", STAGES)
        self._check_choice("sem_target", SEM_TARGETS)
        self._check_choice("image_resize", train_module.IMAGE_RESIZE)
        self._check_choice("lr_schedule", train_module.LR_SCHEDULES)
        self._check_choice("sample_precision", SAMPLE_PRECISION)
        sizes = self._sizes()
        subjects = self._fit_subjects(train)
        device = self._device()
        mixed = self._mixed_precision(device)
        init_cfg = self._init_config()
        init_state = (init_cfg or {}).get("state", {})
        stage = self.stage
        if stage == "cfg" and (init_cfg is None or init_state.get("stage") == "encoder"):
            raise BrainreconError(
                "Stage 'cfg' continues a trained diffusion model: pass init_from=<saved decoder of "
                "stage 'pretrain' or 'finetune'> (e.g. runs/<run>/decoder).", parameters=("init_from",)
            )
        if self.validate_every and not self.checkpoint_dir:
            raise BrainreconError("validate_every needs checkpoint_dir (the grids are written there).")
        diffusion = stage != "encoder"
        base = self._base() if diffusion else None
        net, geometry = self._build_trainable(stage, init_cfg, base)
        if stage == "encoder":
            use_aux = False
        elif stage == "cfg":
            use_aux = bool(init_state.get("aux_active", False))
        else:
            use_aux = stage == "finetune"
        if diffusion:
            net.semantic.aux.requires_grad_(use_aux)
            net.semantic.aux_zero.requires_grad_(use_aux)
        keys = self._stage_keys(stage, use_aux)
        data = train_module.TrainingData(
            train, subjects, sizes.surface_size, self.image_size if diffusion else None,
            captions=diffusion and self._semantic_weight(stage, keys) > 0, image_resize=self.image_resize,
        )
        plan = self.training_plan(len(data), stage=stage, use_aux=use_aux)
        semantic_weight, grad_accum, steps = plan["semantic_weight"], plan["grad_accum"], plan["steps"]
        empty = None
        if diffusion:
            text_device = next(base.text_encoder.parameters()).device
            empty = train_module.encode_text(base.tokenizer, base.text_encoder, [""], text_device)[0].cpu()
        cfg = train_module.TrainConfig(
            stage=stage,
            lr=plan["lr"],
            weight_decay=float(self.weight_decay),
            batch_size=int(self.batch_size),
            total_steps=steps,
            semantic_weight=float(semantic_weight),
            grad_accum=grad_accum,
            grad_clip=None if self.grad_clip is None else float(self.grad_clip),
            lr_schedule=self.lr_schedule,
            lr_warmup_steps=int(self.lr_warmup_steps),
            use_aux=use_aux,
            cfg_drop=plan["cfg_drop"],
            detach_unet_encoder=plan["detach_unet_encoder"],
            gradient_checkpointing=bool(self.gradient_checkpointing),
            mixed_precision=mixed,
            seed=int(self.seed),
            device=device.type,
            checkpoint_dir=self.checkpoint_dir,
            resume=bool(self.resume),
            checkpoint_every=self.checkpoint_every,
            validate_every=self.validate_every,
            progress=bool(self.progress),
            identity={"stage": stage, "seed": int(self.seed), "batch_size": int(self.batch_size),
                      "subjects": subjects, "n_samples": len(data),
                      **dataclasses.asdict(sizes), "image_size": self.image_size,
                      "encoder_eps": float(self.encoder_eps), "global_batch": plan["global_batch"]},
        )
        if validation is None:
            validation = getattr(getattr(train, "dataset", None), "validation", train)
        validate = self._validation_callback(validation,
                                             subjects, geometry, use_aux, empty)
        stats: dict = {}
        losses = train_module.run_training(
            net=net, cfg=cfg, data=data, base=base, empty_context=empty,
            sem_text_model=self._sem_text_model() if diffusion and semantic_weight > 0 else None,
            validate=validate, stats=stats,
        )
        self.net_ = net.eval()
        self.stage_ = stage
        self.aux_active_ = use_aux
        self.geometry_ = geometry
        self.empty_context_ = empty
        self.lineage_ = list(init_state.get("lineage", [])) + [stage]
        self.losses_ = losses
        self.train_stats_ = stats
        self.training_plan_ = plan
        self.steps_trained_ = steps
        self.subjects_ = subjects
        self.n_voxels_ = {s: int(train.dataset.n_voxels(s)) for s in subjects}
        return self

    def _semantic_weight(self, stage: str, keys: Sequence[str]) -> float:
        default = 0.1 if stage == "finetune" or (stage == "cfg" and "finetune_mask" in keys) else 0.0
        return float(self._per_stage("semantic_weight", keys, default))

    def training_plan(self, n_samples: int, *, stage: str | None = None, use_aux: bool | None = None,
                      processes: int | None = None) -> dict[str, Any]:
        """The settings ``fit`` trains a stage with, per-stage mappings and recipes resolved.

        Parameters
        ----------
        n_samples : int
            Training samples (sets the steps of an epoch-counted stage).
        stage : str, optional
            Default: the decoder's ``stage``.
        use_aux : bool, optional
            Whether the auxiliary branch is on (stage ``"cfg"``: whether it continues a
            fine-tuned model, which selects the ``"finetune_mask"`` settings). Default: on in
            ``"finetune"``, off otherwise.
        processes : int, optional
            Training processes (default: the current ``accelerate`` state, else 1).

        Returns
        -------
        dict
            ``lr``, ``semantic_weight``, ``cfg_drop``, ``detach_unet_encoder``, ``grad_accum``,
            ``processes``, ``global_batch``, ``steps``, ``stage_keys``.
        """
        stage = self.stage if stage is None else stage
        self._check_choice("stage", STAGES)
        use_aux = (stage == "finetune") if use_aux is None else bool(use_aux)
        processes = _num_processes(cpu=self._device().type == "cpu") if processes is None else int(processes)
        keys = self._stage_keys(stage, use_aux)
        grad_accum = self._grad_accum(keys, processes)
        global_batch = int(self.batch_size) * processes * grad_accum
        return {
            "stage_keys": list(keys),
            "lr": float(self._per_stage("lr", keys, STAGE_LR[stage])),
            "semantic_weight": self._semantic_weight(stage, keys) if stage != "encoder" else 0.0,
            "cfg_drop": float(self.cfg_drop) if stage == "cfg" else 0.0,
            "detach_unet_encoder": bool(self._per_stage("detach_unet_encoder", keys, stage == "pretrain"))
            and stage != "encoder",
            "grad_accum": grad_accum,
            "processes": processes,
            "global_batch": global_batch,
            "steps": self._total_steps(int(n_samples), stage, keys, global_batch),
        }

    def _fit_subjects(self, train) -> list[int]:
        if self.subjects is None:
            return [int(s) for s in train.subjects]
        subjects = [int(s) for s in self.subjects]
        missing = [s for s in subjects if s not in train.subjects]
        if missing:
            raise DataError(
                f"Subject(s) {missing} are not in the training data; available subjects: {train.subjects}."
            )
        if not subjects:
            raise BrainreconError("subjects is empty; give at least one subject or None for all.")
        return subjects

    def _total_steps(self, n: int, stage: str, keys: Sequence[str], global_batch: int) -> int:
        steps = self._per_stage("steps", keys)
        if steps is not None:
            if int(steps) < 1:
                raise BrainreconError(f"steps must be at least 1, got {steps}.")
            return int(steps)
        epochs = self._per_stage("epochs", keys, STAGE_EPOCHS[stage])
        if int(epochs) < 1:
            raise BrainreconError(f"epochs must be at least 1, got {epochs}.")
        return int(epochs) * max(1, math.ceil(n / global_batch))

    def _validation_callback(self, split, subjects, geometry, use_aux, empty):
        if not self.validate_every:
            return None
        subject = subjects[0] if subjects[0] in split.subjects else split.subjects[0]
        surfaces = train_module.check_surfaces(split.surfaces(subject), subject, self.surface_size, split)
        rows = np.arange(min(VALIDATION_ROWS, len(surfaces)))

        def validate(net, step: int, directory: Path) -> None:
            path = directory / "validation" / f"step_{step:08d}.png"
            if self.stage == "encoder":
                with torch.no_grad():
                    dev = next(net.parameters()).device
                    recon = net(torch.from_numpy(surfaces[rows]).to(dev)).float().cpu().numpy()
                top, bottom = _maps_to_images(surfaces[rows]), _maps_to_images(recon)
            else:
                top = train_module.resize_images(split.images(subject, rows), self.image_size)
                bottom = self._sample(net, surfaces[rows], surfaces[rows], split.ids(subject)[rows],
                                      geometry=geometry, use_aux=use_aux, empty=empty,
                                      steps=VALIDATION_STEPS)
            sample.save_grid(np.stack([top, bottom]), path)

        return validate

    # ------------------------------------------------------------------ inference
    def _check_images_stage(self) -> None:
        self._check_fitted()
        if self.stage_ == "encoder":
            raise BrainreconError(
                "This NeuroPictor decoder was trained in stage 'encoder' (a surface-map "
                "autoencoder) and cannot reconstruct images; use it as init_from of a 'pretrain' "
                "stage (`brainrecon fit --decoder neuropictor --stage pretrain --init-from DIR`)."
            )

    def _sample(self, net, structure: np.ndarray, semantics: np.ndarray, image_ids, *,
                geometry=None, use_aux=None, empty=None, steps=None, control_scale=None) -> np.ndarray:
        base = self._base()
        geometry = geometry or self.geometry_
        use_aux = self.aux_active_ if use_aux is None else use_aux
        empty = self.empty_context_ if empty is None else empty
        device = self._device()
        self._check_choice("sample_precision", SAMPLE_PRECISION)
        self._check_choice("pixel_rounding", PIXEL_ROUNDING)
        dtype = train_module.weight_dtype(self._mixed_precision(device))
        autocast = None
        if self.sample_precision == "fp16-autocast" and device.type == "cuda":
            dtype, autocast = torch.float32, torch.float16  # fp32 weights, fp16 autocast (official)
        model.place(base.unet, device, dtype)
        model.place(base.vae, device, dtype)
        net.to(device).eval()
        alpha = self.control_scale if control_scale is None else control_scale
        steps = self.num_inference_steps if steps is None else steps
        seeds = sample.image_seeds(self.seed, image_ids)
        shape = (geometry["latent_channels"], geometry["latent_size"], geometry["latent_size"])
        out = np.empty((len(structure), self.image_size, self.image_size, 3), dtype=np.uint8)
        bs = int(self.predict_batch_size)
        with torch.no_grad():
            for start in range(0, len(structure), bs):
                sl = slice(start, start + bs)
                tokens = net.fmri_encoder(torch.from_numpy(np.asarray(structure[sl], np.float32)).to(device))
                sem_tokens = net.fmri_encoder(torch.from_numpy(np.asarray(semantics[sl], np.float32)).to(device))
                context, _ = net.semantic(sem_tokens, use_aux=use_aux)
                latents = sample.denoise(
                    unet=base.unet, controlnet=net.controlnet, tokens=tokens, context=context,
                    empty_context=empty.to(device), latents=sample.initial_latents(seeds[sl], shape).to(device),
                    control_scale=alpha, guidance_scale=self.guidance_scale, num_inference_steps=steps,
                    autocast_dtype=autocast,
                )
                out[sl] = sample.decode_latents(base.vae, latents, autocast_dtype=autocast,
                                                rounding=self.pixel_rounding)
        return out

    def reconstruct(self, surfaces: np.ndarray, *, semantic_surfaces: np.ndarray | None = None,
                    image_ids: Sequence[int] | None = None, control_scale: float | None = None,
                    num_inference_steps: int | None = None) -> np.ndarray:
        """Reconstruct images from surface maps.

        Parameters
        ----------
        surfaces : array of shape (n, S, S)
            Surface maps giving the structure (the ControlNet hint) and, unless
            ``semantic_surfaces`` is given, the semantics.
        semantic_surfaces : array of shape (n, S, S), optional
            Surface maps giving the semantic context (the swap experiment).
        image_ids : sequence of int, optional
            Seed each image's noise (default ``0..n-1``).
        control_scale : float, optional
            alpha (default: the decoder's ``control_scale``).

        Returns
        -------
        uint8 array of shape (n, image_size, image_size, 3)
        """
        self._check_images_stage()
        surfaces = self._as_maps(surfaces, "surfaces")
        semantics = surfaces if semantic_surfaces is None else self._as_maps(semantic_surfaces, "semantic_surfaces")
        if len(semantics) != len(surfaces):
            raise DataError(f"{len(surfaces)} structure maps but {len(semantics)} semantic maps; give one each.")
        ids = np.arange(len(surfaces)) if image_ids is None else np.asarray(image_ids)
        return self._sample(self.net_, surfaces, semantics, ids, control_scale=control_scale,
                            steps=num_inference_steps)

    def _as_maps(self, surfaces, what: str) -> np.ndarray:
        surfaces = np.asarray(surfaces, dtype=np.float32)
        if surfaces.ndim != 3 or surfaces.shape[1:] != (self.surface_size, self.surface_size):
            raise DataError(
                f"{what} must have shape (n, {self.surface_size}, {self.surface_size}), got {surfaces.shape}."
            )
        return surfaces

    def _test_surfaces(self, test, subject: int) -> np.ndarray:
        if self.n_voxels_.get(int(subject)) != 0:  # 0: imported, surface maps only
            self._check_voxels(np.empty((0, int(test.dataset.n_voxels(subject)))), subject)
        return train_module.check_surfaces(test.surfaces(subject), subject, self.surface_size, test)

    def predict(self, test) -> dict[int, np.ndarray]:
        """Reconstruct the test images of every fitted subject in ``test``.

        Returns
        -------
        dict
            ``subject -> uint8 (n, image_size, image_size, 3)`` aligned with ``test.ids(subject)``;
            each image's noise is seeded by ``seed`` and its image id.
        """
        self._check_fitted()
        subjects = self._predict_subjects(test)
        self._check_images_stage()
        out = {}
        for s in subjects:
            surfaces = self._test_surfaces(test, s)
            out[s] = self._sample(self.net_, surfaces, surfaces, test.ids(s))
        return out

    def swap_semantics(self, test, subject: int, pairs: Sequence[tuple[int, int]]) -> np.ndarray:
        """Semantics from one test fMRI, structure from another (the paper's Fig. 2 / 7).

        Parameters
        ----------
        pairs : sequence of (a, b)
            Row positions in ``test`` of ``subject``: the context comes from ``a``, the
            ControlNet hint from ``b``.

        Returns
        -------
        uint8 array of shape (len(pairs), image_size, image_size, 3)
        """
        self._check_images_stage()
        surfaces = self._test_surfaces(test, subject)
        pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
        bad = pairs[(pairs < 0) | (pairs >= len(surfaces))]
        if bad.size:
            raise DataError(
                f"Test index {int(bad[0])} is out of range: subject {subject} has {len(surfaces)} test "
                f"images (0..{len(surfaces) - 1})."
            )
        ids = test.ids(subject)[pairs[:, 1]]
        return self._sample(self.net_, surfaces[pairs[:, 1]], surfaces[pairs[:, 0]], ids)

    def control_sweep(self, test, subject: int, indices: Sequence[int],
                      scales: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0)) -> np.ndarray:
        """Reconstructions of the same test images at several control scales (Fig. 1 / 6).

        Returns
        -------
        uint8 array of shape (len(indices), len(scales), image_size, image_size, 3)
            The same noise for every scale of an image.
        """
        self._check_images_stage()
        surfaces = self._test_surfaces(test, subject)
        indices = np.asarray(indices, dtype=np.int64)
        if indices.size and (indices.min() < 0 or indices.max() >= len(surfaces)):
            raise DataError(
                f"Test indices must be in 0..{len(surfaces) - 1} for subject {subject}, got {indices.tolist()}."
            )
        ids = test.ids(subject)[indices]
        columns = [self._sample(self.net_, surfaces[indices], surfaces[indices], ids, control_scale=float(a))
                   for a in scales]
        return np.stack(columns, axis=1)

    def for_subject(self, subject: int) -> "NeuroPictorDecoder":
        """This decoder restricted to ``subject`` (the networks are shared, not copied)."""
        self._check_fitted()
        if int(subject) not in self.subjects_:
            raise DataError(f"This decoder was fitted on subject(s) {self.subjects_}, not {subject}.")
        view = copy.copy(self)
        view.subjects_ = [int(subject)]
        view.n_voxels_ = {int(subject): self.n_voxels_[int(subject)]}
        return view

    # ------------------------------------------------------------------ published files
    @classmethod
    def from_official(cls, checkpoint: str | os.PathLike, *, encoder: str | os.PathLike | None = None,
                      encoder_config: str | os.PathLike | Mapping | None = None, base_model: str | None = None,
                      subjects: Sequence[int] | None = None, check: bool = False, seed: int = 0,
                      params: Mapping[str, Any] | None = None, output_report: bool = False):
        """A fitted decoder from a file released with NeuroPictor (epoch file or ``control_sd21_ini.ckpt``).

        The file is converted strictly by :func:`~.official.convert_official_checkpoint`; this
        method sets the decoder up around the converted modules. Nothing is written: ``save``
        the decoder to keep it (``brainrecon import neuropictor`` does).

        Parameters
        ----------
        checkpoint : path
            An epoch file (``finetune_single_sub/sub01/epoch_015.pth``,
            ``pretrain_multi_sub/sub_all_womask/epoch_080.pth``) or the initial
            ``control_sd21_ini.ckpt`` (no fMRI parts: the fMRI encoder must then come from
            ``encoder``, the guiding network and feature transformation start fresh).
        encoder, encoder_config : path, optional
            ``checkpoint_120000.pth`` and ``fMRI_AutoEncoder.yaml``, for files without an fMRI
            encoder; ``encoder_config`` also gives the heads of an epoch file's encoder.
        base_model : str, optional
            The frozen SD 2.1-base (repo id or local diffusers folder; default the hub copy). The
            file's UNet and VAE, converted with diffusers' ``convert_ldm_unet_checkpoint`` /
            ``convert_ldm_vae_checkpoint``, must equal it (NeuroPictor never trains them).
        subjects : list of int, optional
            Subjects the model decodes (default: from a ``subNN`` folder in the path, else 1-8).
        check : bool
            Also compute, on one fixed input, the differences between the imported modules and
            the file's tensors used directly (see :func:`~.official.check_import`).
        seed : int
            The decoder's seed; also seeds the modules that start fresh.
        params : mapping, optional
            Further decoder parameters (e.g. ``device``, ``num_inference_steps``); the sizes come
            from the file. Sampling defaults to the official settings (fp16 autocast on CUDA,
            truncation to uint8).
        output_report : bool
            Also return the :class:`~.official.ImportReport` (as diffusers'
            ``output_loading_info``).

        Returns
        -------
        decoder : NeuroPictorDecoder
            Fitted (``save`` writes ``brainrecon.json`` + safetensors).
        report : ImportReport
            Only with ``output_report=True``.
        """
        converted = official.convert_official_checkpoint(checkpoint, encoder=encoder, encoder_config=encoder_config,
                                                         base_model=base_model, seed=seed)
        source, spec, base, report = converted.source, converted.spec, converted.base, converted.report
        if subjects is None:
            subjects, said = official.subjects_from_folder(source)
            report.inferred.append(said)
        else:
            report.inferred.append(f"subjects {[int(s) for s in subjects]} (as given)")
        report.inferred.append("stage finetune (its auxiliary branch is trained)" if converted.aux_active else
                               "stage pretrain (its auxiliary branch is still zero)")
        decoder = cls(
            stage="finetune" if converted.aux_active else "pretrain", subjects=[int(s) for s in subjects],
            base_model=converted.base_model, surface_size=spec.surface_size, patch_size=spec.patch_size,
            encoder_dim=spec.dim, encoder_depth=spec.depth, encoder_heads=spec.heads, encoder_eps=spec.eps,
            semantic_hidden=converted.semantic_hidden,
            image_size=converted.geometry["latent_size"] * base.vae_scale_factor, seed=seed,
            encoder_config=None if encoder_config is None or isinstance(encoder_config, Mapping)
            else official.absolute_or_hub(encoder_config),
            sample_precision="fp16-autocast", pixel_rounding="truncate",
        )
        sizes = ("surface_size", "patch_size", "encoder_dim", "encoder_depth", "encoder_heads", "encoder_eps",
                 "semantic_hidden", "image_size", "stage", "base_model", "subjects")
        fixed = sorted(set(params or {}) & set(sizes))
        if fixed:
            raise official.OfficialFileError(f"{', '.join(fixed)} come(s) from the file (or base_model / "
                                             f"subjects), not from params.", parameters=("base_model", "subjects"))
        decoder.set_params(**dict(params or {}))
        decoder._base_cache = base
        decoder.net_ = converted.net
        decoder.stage_ = decoder.stage
        decoder.aux_active_ = converted.aux_active
        decoder.geometry_ = converted.geometry
        decoder.empty_context_ = train_module.encode_text(base.tokenizer, base.text_encoder, [""], "cpu")[0].cpu()
        decoder.lineage_ = [f"official:{Path(source).name}"]
        decoder.losses_ = []
        decoder.steps_trained_ = 0
        decoder.training_plan_ = None
        decoder.subjects_ = [int(s) for s in subjects]
        decoder.n_voxels_ = {int(s): 0 for s in subjects}  # surface maps only: no voxel count to check
        decoder.imported_ = {"file": Path(source).name, "layout": LAYOUT, "ignored": dict(report.ignored),
                             "fresh": list(report.fresh), "encoder_settings": dict(report.encoder),
                             "inferred": list(report.inferred)}
        if check:
            report.checks = official.check_import(decoder, converted.state)
        return (decoder, report) if output_report else decoder

    # ------------------------------------------------------------------ persistence
    def _save_weights(self, directory: Path) -> dict[str, Any]:
        net = self.net_
        save_safetensors_atomic(net.fmri_encoder.state_dict(), directory / ENCODER_FILE)
        state = {
            "stage": self.stage_,
            "aux_active": bool(self.aux_active_),
            "lineage": list(self.lineage_),
            "steps_trained": int(self.steps_trained_),
            "final_loss": float(self.losses_[-1]) if self.losses_ else None,
            "geometry": dict(self.geometry_),
            "layout": LAYOUT,
            "training_plan": getattr(self, "training_plan_", None),
        }
        if getattr(self, "imported_", None):
            state["imported"] = dict(self.imported_)
        if self.stage_ == "encoder":
            save_safetensors_atomic(net.head.state_dict(), directory / HEAD_FILE)
            return state
        save_safetensors_atomic(net.semantic.state_dict(), directory / SEMANTIC_FILE)
        control.save_controlnet(net.controlnet, directory)
        save_safetensors_atomic({"empty_context": self.empty_context_}, directory / EMPTY_CONTEXT_FILE)
        return state

    def _load_weights(self, directory: Path, state: dict[str, Any]) -> None:
        sizes = self._sizes()
        directory = Path(directory)
        self.stage_ = state["stage"]
        self.aux_active_ = bool(state.get("aux_active", False))
        self.lineage_ = list(state.get("lineage", [state["stage"]]))
        self.steps_trained_ = int(state.get("steps_trained", 0))
        self.losses_ = [state["final_loss"]] if state.get("final_loss") is not None else []
        self.geometry_ = dict(state.get("geometry", {}))
        self.training_plan_ = state.get("training_plan")
        if state.get("imported"):
            self.imported_ = dict(state["imported"])
        if int(state.get("layout", 1)) < 2:
            # Saved before the encoder followed the official eps: keep the value it was trained with.
            self.encoder_eps = LEGACY_LAYER_NORM_EPS
        elif int(state["layout"]) > LAYOUT:
            raise BrainreconError(
                f"{directory} was saved by a newer brainrecon (NeuroPictor layout {state['layout']}, "
                f"this one reads up to {LAYOUT}); upgrade brainrecon to load it."
            )
        options = self._encoder_options(training=False)
        if self.stage_ == "encoder":
            encoder = empty_init(lambda: sizes.encoder(**options))
            head = empty_init(lambda: sizes.autoencoder_head(**options))
            load_safetensors_strict(encoder, directory / ENCODER_FILE, "fMRI encoder", assign=True)
            load_safetensors_strict(head, directory / HEAD_FILE, "autoencoder head", assign=True)
            self.net_ = model.FMRIAutoencoder(encoder, head).eval()
            self.empty_context_ = None
            return
        self.net_ = _load_diffusion_parts(directory, sizes, state, options).eval()
        path = directory / EMPTY_CONTEXT_FILE
        empty = read_safetensors(path, "empty-caption context")
        geometry = state.get("geometry", {})
        check_arrays(path, empty, {"empty_context": ((geometry.get("context_tokens"), geometry.get("context_dim")),
                                                     "float32")},
                     fix=f"{SAVED_FIX} (brainrecon.json says {geometry.get('context_tokens')} x "
                         f"{geometry.get('context_dim')} context tokens)")
        self.empty_context_ = empty["empty_context"]


# ---------------------------------------------------------------------------- helpers
# Several CPU processes: `accelerate launch --cpu` always starts ONE process (its simple
# launcher; accelerate runs several CPU processes only through mpirun) and refuses `--cpu`
# together with `--multi_gpu`. `--multi_gpu` goes through torchrun and starts them; with
# device cpu (or no GPU) they join one gloo process group.
CPU_LAUNCH = ("accelerate launch --multi_gpu --num_processes {n} --num_machines 1 --mixed_precision no "
              "--dynamo_backend no -m brainrecon.cli fit --decoder neuropictor --device cpu ...")
_LAUNCHER_ENV = ("WORLD_SIZE", "LOCAL_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


def single_process_cpu_launch() -> bool:
    """Whether this process was started by ``accelerate launch --cpu --num_processes N>1``.

    That launcher sets ``ACCELERATE_USE_CPU`` and, for more than one process, ``MASTER_ADDR``,
    but starts a single process and no ``WORLD_SIZE``: the run would silently train alone.
    """
    env = os.environ
    return (env.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
            and "MASTER_ADDR" in env and not any(k in env for k in _LAUNCHER_ENV))


def _num_processes(cpu: bool = False) -> int:
    if single_process_cpu_launch():
        warnings.warn(BrainreconWarning(
            "`accelerate launch --cpu --num_processes N` starts one process whatever N is (accelerate "
            "runs several CPU processes only through mpirun); this run trains in ONE process (with "
            "global_batch=G it still accumulates to that global batch). For N gloo processes use "
            f"`{CPU_LAUNCH.format(n='N')}` (or `torchrun --nproc_per_node N -m brainrecon.cli fit ...`).",
            parameters=("global_batch",)), stacklevel=3,
        )
    try:
        from accelerate import PartialState

        # The first PartialState fixes the process group for the run; on CPU it must be asked
        # for (cpu=True), or several CPU processes (gloo) would each train alone.
        return int(PartialState(cpu=cpu).num_processes)
    except Exception:  # accelerate state not initialisable (e.g. no backend): one process
        return 1


def _default_semantic_hidden(sizes: Mapping) -> int:
    """The official hidden width of the guiding network: encoder tokens // 2 (128 at 257)."""
    surface, patch = sizes.get("surface_size", 256), sizes.get("patch_size", 16)
    try:
        return max(1, (1 + (int(surface) // int(patch)) ** 2) // 2)
    except (TypeError, ValueError, ZeroDivisionError):
        return 128  # invalid sizes are reported by the size check


def _saved_encoder_eps(config: dict) -> float:
    """The encoder LayerNorm eps a saved decoder was trained with (1e-6 before layout 2)."""
    if int(config.get("state", {}).get("layout", 1)) < 2:
        return LEGACY_LAYER_NORM_EPS
    return float(config.get("params", {}).get("encoder_eps", LAYER_NORM_EPS))


def _load_diffusion_parts(directory: Path, sizes: model.Sizes, state: dict, encoder_options: dict,
                          encoder: torch.nn.Module | None = None) -> model.NeuroPictorNet:
    """Semantic network, ControlNet and feature transformation (and encoder) of a saved diffusion stage."""
    geometry = state["geometry"]
    if encoder is None:
        encoder = empty_init(lambda: sizes.encoder(**encoder_options))
        load_safetensors_strict(encoder, directory / ENCODER_FILE, "fMRI encoder", assign=True)
    semantic = empty_init(lambda: sizes.semantic(geometry["context_tokens"], geometry["context_dim"]))
    load_safetensors_strict(semantic, directory / SEMANTIC_FILE, "semantic network", assign=True)
    transform = empty_init(lambda: sizes.feature_transform(geometry["channels"], geometry["latent_size"]))
    controlnet = control.load_controlnet(directory, transform)
    return model.NeuroPictorNet(encoder, semantic, controlnet)


def _maps_to_images(maps: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(maps, [1, 99])
    gray = np.clip((maps - lo) / max(hi - lo, 1e-6), 0, 1)
    return np.repeat((gray[..., None] * 255).round().astype(np.uint8), 3, axis=-1)
