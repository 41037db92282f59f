""":class:`NeuroPictorDecoder`: the three-stage NeuroPictor diffusion decoder behind the Decoder interface.

The class holds the parameters, the ``fit`` of one stage and the saved files' state; it inherits
reconstruction (``predict``, ``reconstruct``, the paper's experiments, the validation grids) from
:class:`~.reconstruction.ReconstructionMixin` and ``from_official`` from
:class:`~.loader.FromOfficialMixin`. The work is done by the modules: :mod:`.plan` (per-stage
settings, batch and steps), :mod:`.networks` (building, saving and loading the networks),
:mod:`.train` (the training loop), :mod:`.sample` (DDIM sampling), :mod:`.official` (the
released files' converter).
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any, Sequence

import torch

from brainrecon.decoders.base import CliOption, Decoder
from brainrecon.decoders.neuropictor import model, networks, plan, sample
from brainrecon.decoders.neuropictor import train as train_module
from brainrecon.decoders.neuropictor.encoder import (
    LAYER_NORM_EPS,
    LEGACY_LAYER_NORM_EPS,
)
from brainrecon.decoders.neuropictor.loader import FromOfficialMixin
from brainrecon.decoders.neuropictor.networks import LAYOUT
from brainrecon.decoders.neuropictor.plan import (  # noqa: F401 - single_process_cpu_launch re-exported
    STAGES,
    single_process_cpu_launch,
)
from brainrecon.decoders.neuropictor.recipes import RECIPES
from brainrecon.decoders.neuropictor.reconstruction import ReconstructionMixin
from brainrecon.devices import resolve_device
from brainrecon.errors import BrainreconError, DataError

SEM_TARGETS = ("penultimate", "last")
MIXED_PRECISION = ("auto", "no", "bf16", "fp16")


class NeuroPictorDecoder(ReconstructionMixin, FromOfficialMixin, Decoder):
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
        return networks.sizes(self.get_params())

    def _encoder_options(self, training: bool) -> dict[str, float]:
        """LayerNorm eps and (in training) the dropout rates of the fMRI encoder."""
        return networks.encoder_options(self.get_params(), training)

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

    # ------------------------------------------------------------------ building parts
    def _build_trainable(self, stage: str, init_cfg: dict | None, base) -> tuple[torch.nn.Module, dict]:
        """Fresh or ``init_from``-initialised trainable network for ``stage``; also returns geometry."""
        return networks.build_trainable(self.get_params(), stage, init_cfg, base)

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
        self._check_choice("sample_precision", sample.SAMPLE_PRECISION)
        sizes = self._sizes()
        subjects = self._fit_subjects(train)
        device = self._device()
        mixed = self._mixed_precision(device)
        init_cfg = networks.init_config(self.init_from, self.name)
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
        keys = plan.stage_keys(stage, use_aux)
        data = train_module.TrainingData(
            train, subjects, sizes.surface_size, self.image_size if diffusion else None,
            captions=diffusion and plan.semantic_weight(self.get_params(), stage, keys) > 0,
            image_resize=self.image_resize,
        )
        settings = self.training_plan(len(data), stage=stage, use_aux=use_aux)
        semantic_weight, grad_accum, steps = settings["semantic_weight"], settings["grad_accum"], settings["steps"]
        empty = None
        if diffusion:
            text_device = next(base.text_encoder.parameters()).device
            empty = train_module.encode_text(base.tokenizer, base.text_encoder, [""], text_device)[0].cpu()
        cfg = train_module.TrainConfig(
            stage=stage,
            lr=settings["lr"],
            weight_decay=float(self.weight_decay),
            batch_size=int(self.batch_size),
            total_steps=steps,
            semantic_weight=float(semantic_weight),
            grad_accum=grad_accum,
            grad_clip=None if self.grad_clip is None else float(self.grad_clip),
            lr_schedule=self.lr_schedule,
            lr_warmup_steps=int(self.lr_warmup_steps),
            use_aux=use_aux,
            cfg_drop=settings["cfg_drop"],
            detach_unet_encoder=settings["detach_unet_encoder"],
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
                      "encoder_eps": float(self.encoder_eps), "global_batch": settings["global_batch"]},
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
        self.training_plan_ = settings
        self.steps_trained_ = steps
        self.subjects_ = subjects
        self.n_voxels_ = {s: int(train.dataset.n_voxels(s)) for s in subjects}
        return self

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
        processes = plan.num_processes(cpu=self._device().type == "cpu") if processes is None else int(processes)
        return plan.training_plan(self.get_params(), n_samples, stage=stage, use_aux=use_aux, processes=processes)

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

    def for_subject(self, subject: int) -> "NeuroPictorDecoder":
        """This decoder restricted to ``subject`` (the networks are shared, not copied)."""
        self._check_fitted()
        if int(subject) not in self.subjects_:
            raise DataError(f"This decoder was fitted on subject(s) {self.subjects_}, not {subject}.")
        view = copy.copy(self)
        view.subjects_ = [int(subject)]
        view.n_voxels_ = {int(subject): self.n_voxels_[int(subject)]}
        return view

    # ------------------------------------------------------------------ persistence
    def _save_weights(self, directory: Path) -> dict[str, Any]:
        networks.save_networks(self.net_, self.stage_, getattr(self, "empty_context_", None), directory)
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
        self.net_, self.empty_context_ = networks.load_networks(directory, sizes, state, options)
