"""The registered ``brainguard`` decoder: federated multi-subject MLP decoders."""

from __future__ import annotations

import copy
import os
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from safetensors.torch import save_file

from brainrecon.decoders.base import CliOption, Decoder
from brainrecon.decoders.brainguard.federated import (
    EMA_MODES,
    Client,
    TrainConfig,
    checkpoint_candidates,
    client_devices,
    load_checkpoint,
    run_federation,
    save_checkpoint,
)
from brainrecon.decoders.brainguard.model import (
    CALIBRATIONS,
    BrainGuardNet,
    apply_calibration,
    check_branches,
    fit_calibration,
    token_shape,
)
from brainrecon.decoders.brainguard.recipes import RECIPES
from brainrecon.errors import BrainreconError, BrainreconWarning, DataError
from brainrecon.io import check_arrays, jsonable, load_safetensors
from brainrecon.recipes import Recipe
from brainrecon.targets import get_target

NAN_POLICIES = ("error", "zero")
VALIDATIONS = ("fraction", "dataset")
TRIALS = ("average", "single")
_PREDICT_BATCH = 256
# Parameters that do not change what training computes: a checkpoint written under other
# values of these can be resumed.
_RESUME_FREE = ("checkpoint_dir", "checkpoint_every", "checkpoint_keep", "resume", "progress", "device",
                "calibration")


class BrainGuardDecoder(Decoder):
    """Per-subject MLP decoders trained by federated learning (BrainGuard, Tian et al., AAAI 2025).

    Every subject is a client: it keeps its voxels and its subject-specific input layer
    (``ridge``, ``Linear(V -> hidden)``) and trains the whole network on its own data; a
    server averages the shared layers (residual blocks, head, per-token projector) weighted
    by the clients' sample counts; each round every client merges the global model into its
    own in three tiers — the ridge layer is retained, the first shared units are overwritten,
    and the last ``sync_layers`` units are blended element-wise with weights learned by the
    Dynamic Fusion Learner. After the last round each subject keeps its own (personalised)
    model, and its outputs are brought to the training targets' scale (``calibration``).

    Parameters
    ----------
    subjects : list of int or None
        Subjects (clients) to train; None: every subject of the training split.
    target : {"pixels", "ipadapter", "clip"}
        Target space; ``target_options`` is passed to :func:`brainrecon.targets.get_target`.
        A target of shape ``(a, *rest)`` is predicted as ``a`` tokens of ``prod(rest)`` values
        (pixels ``(32, 32, 3)``: 32 rows of 96; IP-Adapter ``(16, 768)``; CLIP ``(257 + 77, 768)``).
    hidden, n_blocks, dropout : int, int, float
        Width h of the network, number of residual blocks, dropout in the blocks.
    branches : list of int or None
        Token counts of separately headed token groups: None (default) is one head and one
        projector for all tokens; ``[257, 77]`` on the ``clip`` target is the released
        two-branch network (image and text heads and projectors, the loss summed over both;
        recipe ``brainguard-paper``).
    projector_hidden : int or None
        Width of the projector's hidden layers; None: ``hidden`` (the WeADL fork). The
        released two-branch code fixes it at 2048.
    init_from : path or None
        A saved BrainGuard decoder (``brainrecon import brainguard``'s output, or a run's
        ``decoder/``) whose per-subject models start the training instead of a fresh
        initialisation: continued federated training from published weights. Its subjects must
        include every subject fitted, with the same voxel counts and network sizes; its voxel
        standardisation is kept (the network was trained on voxels scaled that way).
    rounds : int
        Federated rounds (600 in the released scripts).
    local_iterations : int
        Local epochs each client trains per round (the ablation's 1/5/10/20).
    sync_layers : int
        Number of trailing shared layer units (of ``[block 0, …, block n-1, head,
        projector]``) fused adaptively; the other shared units are overwritten by the global
        model. 0 to ``n_blocks + 2``.
    sync_tensors : int or None
        Count of trailing parameter *tensors* fused adaptively instead (the released code's
        ``layer_idx``, 24 in its scripts); overrides ``sync_layers`` when given.
    batch_size, lr, weight_decay : int, float, float
        Per-client batch size; AdamW (betas 0.9/0.9999) learning rate with a OneCycle schedule
        over all rounds; decay applied to Linear weights only.
    mse_weight, softclip_tau, softclip_weight : float
        Loss = ``mse_weight · MSE`` of the L2-normalised flattened prediction and target
        ``+ softclip_weight · SoftCLIP`` at temperature ``softclip_tau``.
    dfl_eta, dfl_grad_scale, dfl_threshold, dfl_num_pre_loss, dfl_max_epochs
        Dynamic Fusion Learner: step size, gradient scale (1000 in BrainGuard), the stopping
        rule of its first call (std of the last ``dfl_num_pre_loss`` epoch losses below
        ``dfl_threshold``) and a cap on that call's epochs. At BrainGuard's loss scale the
        threshold of 50 is met at the first check, so the first call always runs
        ``dfl_num_pre_loss + 1`` epochs (11 with the released values).
    ema : {"none", "standard", "inverted"}
        What a client uploads: its weights ("none"), a standard EMA of them
        (``ema ← d·ema + (1-d)·θ`` after each step, restarted from the fused model after
        each round's fusion), or the released code's inverted update
        (``ema ← d·θ + (1-d)·ema`` before each step). ``ema_decay`` is d.
    warmup_epochs : float
        OneCycle warm-up length in local epochs (the released ``pct_start`` is
        ``2 / (rounds · local_steps)``: two epochs, whatever ``local_iterations`` is).
    decay_layernorm : bool
        Also decay LayerNorm weights, as the released code does by accident of its
        parameter-name matching (biases are never decayed).
    validation : {"fraction", "dataset"}
        Where each subject's validation images come from: ``"dataset"`` is the data's named
        validation split (``dataset.validation``: MindEye1's ``val`` shards, which the released
        code validates on, else the data's seeded hold-out); ``"fraction"`` holds out
        ``validation_fraction`` of the training images at the client (seeded by ``seed``). Either
        way the client trains on the other training images, scores its model on the validation
        images (their averaged voxels) after every local epoch and keeps the best, as the released
        code keeps ``client{id}_best.pth``.
    validation_fraction : float
        Share held out with ``validation="fraction"``; 0 validates nothing and keeps the last model.
    trials : {"average", "single"}
        What a training batch holds: each image's averaged voxels, or — as the released code
        trains on MindEye1's (3, V) stacks — one single trial per image, repetition
        ``batch_index % 3`` for every sample of the batch (``clients/client.py``: ``voxel[:,
        train_i % 3]``), images seen fewer than 3 times padded as MindEye1 pads them
        (:meth:`~brainrecon.data.Split.trial_stack`). The Dynamic Fusion Learner, validation and
        prediction use averages either way; the voxel standardisation uses the averages' statistics.
        Needs data with single trials.
    calibration : {"auto", "token", "norm", "none"}
        Output scale (see :func:`~brainrecon.decoders.brainguard.model.fit_calibration`);
        can be changed after fitting. The loss only sees each prediction's direction, so
        raw outputs have an arbitrary per-sample scale. ``"auto"`` (default) is ``"norm"``
        for pixel targets and ``"token"`` for token targets (IP-Adapter). On pixels the
        tokens are image rows, and ``"token"``'s per-row rescaling imprints horizontal bands:
        with h = 128, 15 rounds, 2 synthetic subjects x 300 samples, 16 x 16 pixels, the
        row/column variance ratio of the test residuals' means was 1.68 / 1.36 / 1.26 with
        ``"token"`` against 0.87 / 0.73 / 0.68 with ``"norm"`` (0.82 / 1.01 / 0.93 for the
        training-mean predictor; seed 0 subject 1, seed 1 subjects 1 and 2), and the mean
        per-image correlation rose from 0.5076 / 0.4413 / 0.4440 to 0.5132 / 0.4585 / 0.4586.
        The released code and the WeADL fork feed raw predictions to their generators (the
        recipes set ``"none"``).
    seed : int
        Seeds the common initialisation, each subject's input layer, shuffling and dropout.
    device : str
        "auto" (all GPUs, one client per GPU round-robin; CPU without CUDA), "cpu", "cuda",
        "cuda:N".
    checkpoint_dir : path or None
        Where a checkpoint (every client's model, optimiser, schedule, fusion weights and
        random state, and the global model) is written after every ``checkpoint_every``-th
        round and after the last one; the newest ``checkpoint_keep`` are kept (each also
        holds every client's best-by-validation model). At the published size (four
        clients, h = 2048) one checkpoint is about 5 GB.
    resume : bool
        Continue from the checkpoint in ``checkpoint_dir`` when one exists. A damaged one
        (cut mid-write, a bad copy) is skipped with a warning for the next older intact one
        (kept with ``checkpoint_keep`` >= 2); with none left, one error names the damaged file.
    nan_policy : {"error", "zero"}
        Non-finite voxel values: raise, or replace by 0.
    progress : bool
        Show progress bars.
    """

    name: ClassVar[str] = "brainguard"
    predicts: ClassVar[str] = "target"
    multi_subject: ClassVar[bool] = True
    summary: ClassVar[str] = ("Per-subject MLP decoders trained by federated learning "
                              "(subject input layers stay private; shared layers fused by DFL).")
    citation: ClassVar[str] = (
        "BrainGuard: privacy-preserving multisubject image reconstructions from brain activities "
        "(Tian, Quan, Ma, Zhan, Yang; AAAI 2025; doi:10.1609/aaai.v39i13.33579).")
    private_runs: ClassVar[bool] = True
    main_params: ClassVar[tuple[str, ...]] = (
        "target", "hidden", "rounds", "local_iterations", "sync_layers", "batch_size", "lr", "seed")
    recipes: ClassVar[tuple[Recipe, ...]] = RECIPES
    cli_options: ClassVar[tuple[CliOption, ...]] = (
        CliOption("rounds", "--rounds", "int", "federated rounds"),
        CliOption("local_iterations", "--local-iterations", "int", "local epochs per round"),
        CliOption("sync_layers", "--sync-layers", "int",
                  "trailing layers (of blocks, head, projector) fused adaptively; raw tensor count: --param sync_tensors=N"),
        CliOption("hidden", "--hidden", "int", "hidden width"),
        CliOption("init_from", "--init-from", "path",
                  "saved BrainGuard decoder (e.g. `brainrecon import brainguard` output) to continue training from"),
    )

    def __init__(
        self,
        *,
        subjects: list[int] | None = None,
        target: str = "pixels",
        target_options: dict | None = None,
        hidden: int = 2048,
        n_blocks: int = 4,
        dropout: float = 0.15,
        branches: list[int] | None = None,
        projector_hidden: int | None = None,
        init_from: str | None = None,
        rounds: int = 600,
        local_iterations: int = 1,
        sync_layers: int = 4,
        sync_tensors: int | None = None,
        batch_size: int = 50,
        lr: float = 3e-4,
        weight_decay: float = 1e-2,
        mse_weight: float = 2e4,
        softclip_tau: float = 0.05,
        softclip_weight: float = 1.0,
        dfl_eta: float = 1.0,
        dfl_grad_scale: float = 1000.0,
        dfl_threshold: float = 50.0,
        dfl_num_pre_loss: int = 10,
        dfl_max_epochs: int = 100,
        ema: str = "none",
        ema_decay: float = 0.999,
        warmup_epochs: float = 2.0,
        decay_layernorm: bool = False,
        validation: str = "fraction",
        validation_fraction: float = 0.0,
        trials: str = "average",
        calibration: str = "auto",
        seed: int = 0,
        device: str = "auto",
        checkpoint_dir: str | None = None,
        checkpoint_every: int = 1,
        checkpoint_keep: int = 1,
        resume: bool = False,
        nan_policy: str = "error",
        progress: bool = True,
    ):
        self.subjects = subjects
        self.target = target
        self.target_options = target_options
        self.hidden = hidden
        self.n_blocks = n_blocks
        self.dropout = dropout
        self.branches = branches
        self.projector_hidden = projector_hidden
        self.init_from = init_from
        self.rounds = rounds
        self.local_iterations = local_iterations
        self.sync_layers = sync_layers
        self.sync_tensors = sync_tensors
        self.batch_size = batch_size
        self.lr = lr
        self.weight_decay = weight_decay
        self.mse_weight = mse_weight
        self.softclip_tau = softclip_tau
        self.softclip_weight = softclip_weight
        self.dfl_eta = dfl_eta
        self.dfl_grad_scale = dfl_grad_scale
        self.dfl_threshold = dfl_threshold
        self.dfl_num_pre_loss = dfl_num_pre_loss
        self.dfl_max_epochs = dfl_max_epochs
        self.ema = ema
        self.ema_decay = ema_decay
        self.warmup_epochs = warmup_epochs
        self.decay_layernorm = decay_layernorm
        self.validation = validation
        self.validation_fraction = validation_fraction
        self.trials = trials
        self.calibration = calibration
        self.seed = seed
        self.device = device
        self.checkpoint_dir = checkpoint_dir
        self.checkpoint_every = checkpoint_every
        self.checkpoint_keep = checkpoint_keep
        self.resume = resume
        self.nan_policy = nan_policy
        self.progress = progress

    # ------------------------------------------------------------------ validation
    def _train_config(self) -> TrainConfig:
        def positive_int(name: str, minimum: int = 1) -> int:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
                raise DataError(f"{name} must be an integer >= {minimum}, got {value!r}.")
            return int(value)

        def positive_float(name: str, allow_zero: bool = False) -> float:
            value = getattr(self, name)
            ok = isinstance(value, (int, float, np.number)) and not isinstance(value, bool) and \
                np.isfinite(value) and (value >= 0 if allow_zero else value > 0)
            if not ok:
                bound = ">= 0" if allow_zero else "> 0"
                raise DataError(f"{name} must be a finite number {bound}, got {value!r}.")
            return float(value)

        if self.ema not in EMA_MODES:
            raise DataError(f"Unknown ema {self.ema!r}. Valid choices: {', '.join(map(repr, EMA_MODES))}.")
        self._check_choices()
        if not 0.0 <= float(self.dropout) < 1.0:
            raise DataError(f"dropout must be in [0, 1), got {self.dropout!r}.")
        if not 0.0 <= float(self.ema_decay) <= 1.0:
            raise DataError(f"ema_decay must be in [0, 1], got {self.ema_decay!r}.")
        if self.resume and self.checkpoint_dir is None:
            raise DataError(
                "resume=True needs checkpoint_dir, the directory the interrupted run wrote its "
                "checkpoints to.", parameters=("resume", "checkpoint_dir")
            )
        positive_int("checkpoint_every")
        positive_int("checkpoint_keep")
        if not isinstance(self.decay_layernorm, bool):
            raise DataError(f"decay_layernorm must be True or False, got {self.decay_layernorm!r}.")
        fraction = self.validation_fraction
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float, np.number)) or \
                not 0.0 <= float(fraction) < 1.0:
            raise DataError(f"validation_fraction must be in [0, 1), got {fraction!r}.")
        n_blocks = positive_int("n_blocks", 0)
        sync_layers = positive_int("sync_layers", 0)
        if sync_layers > n_blocks + 2:
            raise DataError(
                f"sync_layers={sync_layers} must be between 0 and {n_blocks + 2} (the shared "
                f"layer units: {n_blocks} blocks, the head and the projector)."
            )
        sync_tensors = None if self.sync_tensors is None else positive_int("sync_tensors", 0)
        projector_hidden = None if self.projector_hidden is None else positive_int("projector_hidden")
        branches = None
        if self.branches is not None:
            if isinstance(self.branches, (str, bytes)) or not hasattr(self.branches, "__len__"):
                raise DataError(f"branches must be a list of token counts, e.g. [257, 77]; got {self.branches!r}.")
            branches = tuple(int(b) for b in self.branches)
            if len(branches) == 1:
                branches = None  # one group: the plain single-branch network
        return TrainConfig(
            branches=branches, projector_hidden=projector_hidden,
            hidden=positive_int("hidden"), n_blocks=n_blocks, dropout=float(self.dropout),
            rounds=positive_int("rounds"), local_iterations=positive_int("local_iterations"),
            sync_layers=sync_layers, sync_tensors=sync_tensors,
            batch_size=positive_int("batch_size"), lr=positive_float("lr"),
            weight_decay=positive_float("weight_decay", True),
            mse_weight=positive_float("mse_weight", True), softclip_tau=positive_float("softclip_tau"),
            softclip_weight=positive_float("softclip_weight", True),
            dfl_eta=positive_float("dfl_eta", True), dfl_grad_scale=positive_float("dfl_grad_scale", True),
            dfl_threshold=positive_float("dfl_threshold", True),
            dfl_num_pre_loss=positive_int("dfl_num_pre_loss"),
            dfl_max_epochs=positive_int("dfl_max_epochs"), ema=self.ema,
            ema_decay=float(self.ema_decay), warmup_epochs=positive_float("warmup_epochs", True),
            decay_layernorm=bool(self.decay_layernorm), seed=int(self.seed),
        )

    def _check_choices(self) -> None:
        if self.calibration != "auto" and self.calibration not in CALIBRATIONS:
            raise DataError(
                f"Unknown calibration {self.calibration!r}. Valid choices: 'auto', "
                f"{', '.join(map(repr, CALIBRATIONS))}."
            )
        if self.nan_policy not in NAN_POLICIES:
            raise DataError(
                f"Unknown nan_policy {self.nan_policy!r}. Valid choices: 'error', 'zero'."
            )
        if self.validation not in VALIDATIONS:
            raise DataError(f"Unknown validation {self.validation!r}. Valid choices: "
                            f"{', '.join(map(repr, VALIDATIONS))}.")
        if self.trials not in TRIALS:
            raise DataError(f"Unknown trials {self.trials!r}. Valid choices: {', '.join(map(repr, TRIALS))}.")

    def _fit_subjects(self, train) -> list[int]:
        if self.subjects is None:
            return [int(s) for s in train.subjects]
        subjects = [int(s) for s in self.subjects]
        if not subjects:
            raise DataError("subjects is empty; give at least one subject or None for all.")
        if len(set(subjects)) != len(subjects):
            raise DataError(f"subjects has duplicates: {subjects}.")
        missing = [s for s in subjects if s not in train.subjects]
        if missing:
            raise DataError(
                f"Subject(s) {missing} are not in the training data; available subjects: "
                f"{train.subjects}."
            )
        return subjects

    # ------------------------------------------------------------------ fit
    def fit(self, train) -> "BrainGuardDecoder":
        """Train one decoder per subject by federated learning.

        Parameters
        ----------
        train : Split
            Training split; each subject's voxels (n_s, V_s) and its target-space values
            (n_s, *target_shape) are used by that subject's client only.

        Returns
        -------
        self
        """
        config = self._train_config()
        subjects = self._fit_subjects(train)
        target_shape, n_tokens, token_dim = self._target_layout()
        self._check_init_source(subjects, config, n_tokens, token_dim, {s: train.dataset.n_voxels(s) for s in subjects})
        sites = {s: self._site_data(train, s, target_shape) for s in subjects}
        voxel_stats = {s: sites[s].stats for s in subjects}
        tensors = {s: (sites[s].voxels, sites[s].targets) for s in subjects}
        devices = client_devices(self.device, len(subjects))
        models = self._initial_models(config, {s: tensors[s][0].shape[-1] for s in subjects},
                                      n_tokens, token_dim)
        clients = [Client(s, tensors[s][0], tensors[s][1], models[s], config, dev,
                          sites[s].val_voxels, sites[s].val_targets)
                   for s, dev in zip(subjects, devices)]
        server_device = devices[0] if len(set(devices)) == 1 else torch.device("cpu")

        run_meta = {
            "config": asdict(config),
            "params": {k: jsonable(v) for k, v in self.get_params().items()
                       if k not in _RESUME_FREE and k != "subjects"},
            "subjects": subjects,
            "n_voxels": {str(s): int(tensors[s][0].shape[-1]) for s in subjects},
            "n_samples": {str(s): int(tensors[s][0].shape[0]) for s in subjects},
            "fingerprints": {str(s): train.fingerprint(s) for s in subjects},
            "target_shape": list(target_shape),
        }
        history: list[dict] = []
        start_round, global_state = 0, None
        ckpt_dir = Path(self.checkpoint_dir) if self.checkpoint_dir is not None else None
        candidates = checkpoint_candidates(ckpt_dir) if ckpt_dir is not None else []
        if candidates and self.resume:
            start_round, global_state, history = self._restore(candidates, run_meta, clients, server_device)
        elif candidates:
            warnings.warn(BrainreconWarning(
                f"{ckpt_dir} holds a checkpoint that will be replaced by this fresh run; pass "
                f"resume=True to continue it instead.", parameters=("resume",)), stacklevel=2)

        every = int(self.checkpoint_every)

        def on_round_end(r: int, state: dict, record: dict) -> None:
            history.append(jsonable(record))
            if ckpt_dir is not None and ((r + 1) % every == 0 or r + 1 == config.rounds):
                save_checkpoint(ckpt_dir, round_index=r, clients=clients, global_state=state,
                                meta={**run_meta, "history": history}, keep=int(self.checkpoint_keep))

        if start_round < config.rounds:
            run_federation(clients, rounds=config.rounds, local_iterations=config.local_iterations,
                           start_round=start_round, global_state=global_state,
                           server_device=server_device, on_round_end=on_round_end,
                           progress=bool(self.progress))

        self._set_fitted(clients, voxel_stats, target_shape, history, rounds=config.rounds,
                         n_sites=len(subjects))
        return self

    # ------------------------------------------------------------------ pieces a site runs
    def _target_layout(self) -> tuple[tuple[int, ...], int, int]:
        space = get_target(self.target, **(self.target_options or {}))
        target_shape = tuple(int(s) for s in space.shape)
        n_tokens, token_dim = token_shape(target_shape)
        if self.branches is not None:
            check_branches(self.branches, n_tokens)
        return (target_shape, n_tokens, token_dim)

    def _init_source(self) -> BrainGuardDecoder | None:
        """The saved decoder ``init_from`` names (loaded once), or None."""
        if self.init_from is None:
            return None
        cached = getattr(self, "_init_cache", None)
        if cached is not None and cached[0] == str(self.init_from):
            return cached[1]
        from brainrecon.decoders.base import CONFIG_FILE

        path = Path(self.init_from)
        if not (path / CONFIG_FILE).is_file():
            raise BrainreconError(
                f"init_from={str(self.init_from)!r} is not a saved decoder ({CONFIG_FILE} missing); give the "
                f"directory `brainrecon import brainguard` wrote, or a run's decoder/ folder.",
                parameters=("init_from",))
        source = Decoder.load(path)
        if not isinstance(source, BrainGuardDecoder):
            raise BrainreconError(f"init_from={str(self.init_from)!r} holds a {source.name!r} decoder, not a "
                                  f"BrainGuard one.", parameters=("init_from",))
        self._init_cache = (str(self.init_from), source)
        return source

    def _check_init_source(self, subjects: list[int], config: TrainConfig, n_tokens: int, token_dim: int,
                           n_voxels: dict[int, int]) -> None:
        """``init_from`` fits this training: its subjects, voxel counts and network sizes."""
        source = self._init_source()
        if source is None:
            return
        where = f"init_from={str(self.init_from)!r}"
        missing = [s for s in subjects if s not in source.subjects_]
        if missing:
            raise BrainreconError(f"{where} holds subject(s) {source.subjects_}, not {missing}; fit only "
                                  f"those subjects (subjects={source.subjects_}).", parameters=("init_from", "subjects"))
        for s in subjects:
            if source.n_voxels_[s] != n_voxels[s]:
                raise DataError(f"{where}: subject {s}'s model reads {source.n_voxels_[s]} voxels but the "
                                f"training data has {n_voxels[s]}; use data prepared with the same ROI mask.")
        mine = {"hidden": config.hidden, "n_blocks": config.n_blocks,
                "branches": None if config.branches is None else list(config.branches),
                "projector_hidden": config.projector_hidden or config.hidden,
                "tokens": [n_tokens, token_dim]}
        saved_branches = source.branches if source.branches is not None and len(source.branches) > 1 else None
        theirs = {"hidden": int(source.hidden), "n_blocks": int(source.n_blocks),
                  "branches": None if saved_branches is None else [int(b) for b in saved_branches],
                  "projector_hidden": int(source.projector_hidden or source.hidden),
                  "tokens": [int(t) for t in source.token_shape_]}
        diff = [k for k in mine if mine[k] != theirs[k]]
        if diff:
            wanted = ", ".join(f"{k}={theirs[k]!r}" for k in diff if k != "tokens")
            target = f"; target {source.target!r} ({theirs['tokens'][0]}x{theirs['tokens'][1]} tokens)" \
                if "tokens" in diff else ""
            raise BrainreconError(
                f"{where} is a network of other sizes: " + "; ".join(f"{k} {theirs[k]} (saved) vs {mine[k]}"
                                                                   for k in diff)
                + f". Fit with the saved sizes ({wanted or 'same sizes'}{target}).",
                parameters=tuple(k for k in diff if k != "tokens") or ("init_from",))

    def _site_data(self, train, subject: int, target_shape: tuple[int, ...]) -> SiteData:
        """One subject's standardised voxels and token targets, split for validation.

        Everything here is computed from that subject's data alone (it runs at the site).
        """
        space = get_target(self.target, **(self.target_options or {}))
        n_tokens, token_dim = token_shape(target_shape)
        s = int(subject)
        X = train.voxels(s, nan_policy=self.nan_policy)
        Y = np.asarray(space.load(train, s, progress=self.progress), dtype=np.float32)
        if Y.shape != (X.shape[0],) + target_shape:
            raise DataError(
                f"Subject {s}: {X.shape[0]} voxel rows but targets of shape {Y.shape}; "
                f"expected {(X.shape[0],) + target_shape}."
            )
        if not np.all(np.isfinite(Y)):
            raise DataError(f"Subject {s}: the {self.target!r} targets contain NaN or infinite values.")
        # Standardising with the subject's own training statistics is part of the
        # subject-specific input layer: computed on the client, never shared. A model continued
        # from init_from keeps the scaling it was trained with.
        source = self._init_source()
        if source is not None and s in source.voxel_stats_:
            mean, std = (np.asarray(v, dtype=np.float64) for v in source.voxel_stats_[s])
        else:
            mean = X.mean(axis=0, dtype=np.float64)
            std = X.std(axis=0, dtype=np.float64)
            std = np.where(std > 1e-8, std, 1.0)
        Xs = torch.from_numpy(((X - mean) / std).astype(np.float32))
        Yt = torch.from_numpy(Y.reshape(len(Y), n_tokens, token_dim))
        stats = (mean.astype(np.float32), std.astype(np.float32))
        if self.validation == "dataset":
            val_rows = np.asarray(train.validation_rows(s), dtype=np.int64)
            if not 1 <= len(val_rows) < len(X):
                raise DataError(f"Subject {s}: the dataset's validation split has {len(val_rows)} of {len(X)} training "
                                f"images; both validation and training need at least one.")
        else:
            n_val = round(float(self.validation_fraction) * len(X))
            if self.validation_fraction and not 1 <= n_val < len(X):
                raise DataError(
                    f"validation_fraction={self.validation_fraction} leaves subject {s} "
                    f"{n_val} validation and {len(X) - n_val} training samples; both need at least one."
                )
            order = np.random.default_rng(np.random.SeedSequence([int(self.seed), s, 3])).permutation(len(X))
            val_rows = np.sort(order[:n_val])
        fit_rows = np.setdiff1d(np.arange(len(X)), val_rows)
        if self.trials == "single":
            stack = train.trial_stack(s, nan_policy=self.nan_policy)
            train_voxels = torch.from_numpy(((stack[fit_rows] - mean) / std).astype(np.float32))
        else:
            train_voxels = Xs[torch.from_numpy(fit_rows)]
        fit_t = torch.from_numpy(fit_rows)
        if not len(val_rows):
            return SiteData(train_voxels, Yt[fit_t], None, None, stats)
        val = torch.from_numpy(val_rows)
        return SiteData(train_voxels, Yt[fit_t], Xs[val], Yt[val], stats)

    def _set_fitted(self, clients: list[Client], voxel_stats: dict, target_shape: tuple[int, ...],
                    history: list, *, rounds: int, n_sites: int) -> None:
        """Fitted attributes from trained clients (their final, or best-by-validation, models)."""
        self.models_, self.voxel_stats_, self.calibration_stats_ = {}, {}, {}
        for client in clients:
            s = client.subject
            model = client.final_model()
            model.eval()
            raw = _raw_predict(model, client.average_voxels, client.device)
            self.calibration_stats_[s] = fit_calibration(
                raw, client.targets.cpu().numpy(), kind="token")
            model.set_generator(None)
            self.models_[s] = model.to("cpu")
            self.voxel_stats_[s] = voxel_stats[s]
        self.target_shape_ = tuple(target_shape)
        self.token_shape_ = token_shape(self.target_shape_)
        self.federation_ = {
            "subjects": [c.subject for c in clients],
            "n_sites": int(n_sites),
            "n_train": {str(c.subject): int(c.n_samples) for c in clients},
            "rounds_completed": int(rounds),
        }
        self.history_ = history
        self.n_voxels_ = {c.subject: int(c.voxels.shape[-1]) for c in clients}
        self.subjects_ = [c.subject for c in clients]

    def _initial_models(self, config: TrainConfig, n_voxels: dict[int, int], n_tokens: int,
                        token_dim: int) -> dict[int, BrainGuardNet]:
        """Identical shared layers for every client; each subject's input layer seeded apart.

        With ``init_from`` each subject starts from its saved model instead.
        """
        source = self._init_source()
        if source is not None:
            self._check_init_source(list(n_voxels), config, n_tokens, token_dim, dict(n_voxels))
            models = {}
            for s, V in n_voxels.items():
                model = config.build(V, n_tokens, token_dim)
                model.load_state_dict(source.models_[s].state_dict(), strict=True)
                models[s] = model
            return models
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            template = config.build(1, n_tokens, token_dim)
            models = {}
            for s, V in n_voxels.items():
                torch.manual_seed(int(np.random.SeedSequence([config.seed, s, 1]).generate_state(1)[0]))
                model = copy.deepcopy(template)
                # Re-assigning keeps ``ridge`` first in the parameter order.
                model.ridge = torch.nn.Linear(V, config.hidden)
                models[s] = model
        return models

    def _restore(self, candidates: list[Path], run_meta: dict, clients: list[Client],
                 server_device: torch.device) -> tuple[int, dict, list]:
        """Restore from the newest checkpoint whose files read back intact.

        A damaged one (cut mid-write, disk full, bad copy) is skipped with a warning naming it;
        when none is left, one :class:`BrainreconError` names the damaged file.
        """
        damaged: list[str] = []
        for latest in candidates:
            try:
                meta, global_state, client_tensors = load_checkpoint(latest)
            except BrainreconError as exc:
                damaged.append(str(exc))
                warnings.warn(f"Skipping damaged checkpoint {latest.name}: {exc}", UserWarning, stacklevel=3)
                continue
            if damaged:
                warnings.warn(f"Resuming from the older checkpoint {latest} (round "
                              f"{meta.get('rounds_completed')}); newer ones are damaged.",
                              UserWarning, stacklevel=3)
            break
        else:
            raise BrainreconError(
                f"Cannot resume from {candidates[0].parent}: no intact checkpoint is left "
                f"({damaged[0]}). Start afresh with resume=False (the damaged checkpoint is replaced); "
                f"checkpoint_keep=2 keeps an older one to fall back on.", parameters=("resume", "checkpoint_keep")
            )
        # Checkpoints written before the two-branch option lack its (default) settings.
        meta["config"] = {"branches": None, "projector_hidden": None, **(meta.get("config") or {})}
        differences = [k for k in ("config", "params", "subjects", "n_voxels", "n_samples",
                                   "fingerprints", "target_shape")
                       if jsonable(meta.get(k)) != jsonable(run_meta[k])]
        if differences:
            detail = []
            for k in differences:
                old, new = meta.get(k), run_meta[k]
                if isinstance(old, dict) and isinstance(new, dict):
                    keys = sorted(set(old) | set(new), key=str)
                    changed = [f"{kk}: {old.get(kk)!r} -> {new.get(kk)!r}" for kk in keys
                               if old.get(kk) != new.get(kk)]
                    detail.append(f"{k} ({'; '.join(changed)})")
                else:
                    detail.append(f"{k} ({old!r} -> {new!r})")
            raise BrainreconError(
                f"Cannot resume from {latest}: it was written with different settings or data: "
                f"{', '.join(detail)}. Use the original settings, or another checkpoint_dir "
                f"(or resume=False to start over)."
            )
        for client in clients:
            client.restore(client_tensors[client.subject], meta["clients"][str(client.subject)])
        global_state = {k: v.to(server_device) for k, v in global_state.items()}
        return int(meta["rounds_completed"]), global_state, list(meta.get("history", []))

    # ------------------------------------------------------------------ predict
    def predict(self, test) -> dict[int, np.ndarray]:
        """Predict target-space values for every fitted subject present in ``test``.

        Returns
        -------
        dict int -> float32 array of shape (n_test_s, *target_shape)
            Calibrated to the training targets' scale (``calibration``), aligned with
            ``test.ids(subject)``.
        """
        subjects = self._predict_subjects(test)
        self._check_choices()
        device = client_devices(self.device, 1)[0]
        out = {}
        for s in subjects:
            X = test.voxels(s, nan_policy=self.nan_policy)
            self._check_voxels(X, s)
            mean, std = self.voxel_stats_[s]
            Xs = torch.from_numpy(((X - mean) / std).astype(np.float32))
            model = self.models_[s].to(device)
            model.eval()
            raw = _raw_predict(model, Xs, device)
            self.models_[s] = model.to("cpu")
            pred = apply_calibration(raw, self.calibration_stats_[s], self._calibration_kind())
            out[s] = pred.reshape((len(X),) + tuple(self.target_shape_))
        return out

    def _branches(self) -> tuple[int, ...] | None:
        return None if self.branches is None else tuple(int(b) for b in self.branches)

    def _calibration_kind(self) -> str:
        """``calibration`` with ``"auto"`` resolved for this decoder's target."""
        if self.calibration != "auto":
            return self.calibration
        return "norm" if self.target == "pixels" else "token"

    def for_subject(self, subject: int) -> "BrainGuardDecoder":
        """A decoder holding only ``subject``'s fitted model (for one run per subject).

        It carries nothing about the other subjects: ``subjects`` becomes ``[subject]``,
        ``federation_`` keeps only the number of sites, the rounds and this subject's sample
        count, and ``history_`` only this subject's per-round records.
        """
        self._check_fitted()
        subject = int(subject)
        if subject not in self.subjects_:
            raise DataError(
                f"Subject {subject} is not among this decoder's fitted subjects {self.subjects_}."
            )
        single = type(self)(**{**self.get_params(), "subjects": [subject]})
        single.models_ = {subject: self.models_[subject]}
        single.voxel_stats_ = {subject: self.voxel_stats_[subject]}
        single.calibration_stats_ = {subject: self.calibration_stats_[subject]}
        if getattr(self, "imported_", None):
            single.imported_ = dict(self.imported_)
        if getattr(self, "negative_tokens_", None) is not None:
            single.negative_tokens_ = self.negative_tokens_
        single.target_shape_ = self.target_shape_
        single.token_shape_ = self.token_shape_
        single.federation_ = {
            "subjects": [subject],
            "n_sites": int(self.federation_.get("n_sites", len(self.subjects_))),
            "n_train": {str(subject): self.federation_["n_train"][str(subject)]},
            "rounds_completed": self.federation_["rounds_completed"],
        }
        single.history_ = [_own_record(r, subject) for r in self.history_]
        single.n_voxels_ = {subject: self.n_voxels_[subject]}
        single.subjects_ = [subject]
        return single

    # ------------------------------------------------------------------ published weights
    @classmethod
    def from_official(cls, checkpoint: str | os.PathLike, *, subject: int | None = None, layout: str | None = None,
                      negative_tokens: str | os.PathLike | None = None, voxel_counts: Mapping[int, int] | None = None,
                      target_options: Mapping[str, Any] | None = None, params: Mapping[str, Any] | None = None,
                      output_report: bool = False):
        """A fitted decoder from a released BrainGuard or WeADL file (see :mod:`.official`).

        Parameters
        ----------
        checkpoint : path
            BrainGuard's ``client{1,2,5,7}_best.pth`` (Hugging Face ``Zhibo2333/Brainguard``) or
            WeADL's ``model.pth`` (``ig16/visual-brain-decoding-1``): the ``state_dict()`` of the
            released ``BrainGuardModule``, read with ``torch.load(weights_only=True)``.
        subject : int, optional
            The subject the file decodes; default: the one whose voxel count equals the file's
            input width. Either way the count is checked.
        layout : {"brainguard", "weadl"}, optional
            Default: detected from the keys (a text branch means ``"brainguard"``).
        negative_tokens : path, optional
            WeADL's ``unconditional_embeddings.pt``: kept with the decoder and used as the negative
            (unconditional) tokens when its runs are reconstructed, as the deployed server does.
        voxel_counts : mapping, optional
            Subject -> voxel count to check against (the data's); default NSD's nsdgeneral counts.
        target_options : mapping, optional
            Options of the target space (``ipadapter_dir`` for WeADL's IP-Adapter tokens, ``model`` for
            the CLIP states), recorded for ``fit --init-from`` and ``reconstruct``.
        params : mapping, optional
            Further decoder parameters (``device``, ``nan_policy``, ...); the sizes come from the file.
        output_report : bool
            Also return the :class:`~.official.ImportReport`.

        Notes
        -----
        The released networks read voxels as they are (MindEye's webdataset: nsdgeneral betas
        z-scored per session, test images averaged over repetitions; ``brainrecon prepare-nsd
        --zscore session``), so the imported decoder's voxel standardisation is the identity.
        Their outputs go to the generators unscaled (``calibration="none"``).
        """
        from brainrecon.data.nsd.release import NSD_GENERAL_VOXELS
        from brainrecon.decoders.brainguard import official

        source = str(checkpoint)
        state = official.read_state(checkpoint)
        net, arch, layout, ignored = official.convert_state(state, layout=layout, source=source)
        counts = dict(voxel_counts) if voxel_counts is not None else dict(NSD_GENERAL_VOXELS)
        where = "the data's subjects" if voxel_counts is not None else "NSD's nsdgeneral voxel counts"
        s, inferred = official.infer_subject(arch.n_voxels, counts, subject, source, where)
        d = arch.token_dim
        options = dict(target_options) if target_options else None
        if layout == "brainguard":
            target = "clip"
            if arch.branches != (257, 77) or d != 768:
                options = {**(options or {}), "image_tokens": arch.branches[0], "text_tokens": arch.branches[1],
                           "dim": d}
        else:
            target = "ipadapter"
            # The IP-Adapter target's shape comes from its weights: checked when they are named.
            expected = tuple(get_target(target, **options).shape) if options else (16, 768)
            if (arch.branches[0], d) != expected:
                raise official.OfficialFileError(
                    f"{source} predicts {arch.branches[0]}x{d} tokens; the IP-Adapter Plus target "
                    f"{'of target_options ' if options else ''}has {expected[0]}x{expected[1]}.")
        fixed = sorted(set(params or {}) & {"subjects", "target", "target_options", "hidden", "n_blocks", "branches",
                                             "projector_hidden", "calibration"})
        if fixed:
            raise official.OfficialFileError(f"{', '.join(fixed)} come(s) from the file, not from params.")
        decoder = cls(subjects=[s], target=target, target_options=options, hidden=arch.hidden,
                      n_blocks=arch.n_blocks, branches=list(arch.branches) if len(arch.branches) > 1 else None,
                      projector_hidden=None if arch.projector_hidden == arch.hidden else arch.projector_hidden,
                      calibration="none", **dict(params or {}))
        V = arch.n_voxels
        decoder.models_ = {s: net}
        decoder.voxel_stats_ = {s: (np.zeros(V, dtype=np.float32), np.ones(V, dtype=np.float32))}
        decoder.calibration_stats_ = {s: {}}
        decoder.target_shape_ = (sum(arch.branches), d)
        decoder.token_shape_ = (sum(arch.branches), d)
        published = {"brainguard": (4, "kunzhan/BrainGuard main.py: clients 1, 2, 5, 7"),
                     "weadl": (3, "IoanaGabor/bachelor-thesis main.py: clients 1, 2, 5")}[layout]
        decoder.federation_ = {"subjects": [s], "n_sites": published[0], "n_train": {str(s): 8859},
                               "rounds_completed": None, "published": published[1]}
        decoder.history_ = []
        decoder.n_voxels_ = {s: V}
        decoder.subjects_ = [s]
        decoder.imported_ = {"file": Path(source).name, "path": str(Path(source).resolve()), "layout": layout,
                             "ignored": list(ignored), "subject_inferred": bool(inferred)}
        report = official.ImportReport(source=source, layout=layout, architecture=arch, subject=s,
                                       subject_inferred=inferred, n_tensors=len(state),
                                       n_parameters=sum(p.numel() for p in net.parameters()), ignored=list(ignored))
        if negative_tokens is not None:
            if layout != "weadl":
                raise official.OfficialFileError(
                    "negative_tokens (unconditional_embeddings.pt) belong to the WeADL model's IP-Adapter generator; "
                    "the BrainGuard model's Versatile Diffusion generator uses zero unconditional inputs.",
                    parameters=("negative_tokens",))
            decoder.negative_tokens_ = official.read_negative_tokens(negative_tokens, decoder.token_shape_).numpy()
            decoder.imported_["negative_tokens"] = Path(str(negative_tokens)).name
            report.notes.append(f"negative tokens from {negative_tokens} (used by `brainrecon reconstruct`)")
        elif layout == "weadl":
            report.notes.append("no negative tokens given: reconstruct will use IP-Adapter's own unconditional "
                                "tokens, not the deployed unconditional_embeddings.pt")
        return (decoder, report) if output_report else decoder

    # ------------------------------------------------------------------ persistence
    def _save_weights(self, directory: Path) -> dict[str, Any]:
        for s in self.subjects_:
            mean, std = self.voxel_stats_[s]
            tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in self.models_[s].state_dict().items()}
            tensors["voxel_mean"] = torch.from_numpy(np.ascontiguousarray(mean))
            tensors["voxel_std"] = torch.from_numpy(np.ascontiguousarray(std))
            if getattr(self, "negative_tokens_", None) is not None:
                tensors["negative_tokens"] = torch.from_numpy(np.ascontiguousarray(self.negative_tokens_, dtype=np.float32))
            for k, v in self.calibration_stats_[s].items():
                tensors[f"calibration.{k}"] = torch.from_numpy(np.ascontiguousarray(v))
            save_file(tensors, str(directory / f"subject-{s}.safetensors"))
        return {
            "target_shape": list(self.target_shape_),
            "token_shape": list(self.token_shape_),
            "federation": self.federation_,
            "history": self.history_,
            **({"imported": dict(self.imported_)} if getattr(self, "imported_", None) else {}),
        }

    def _load_weights(self, directory: Path, state: dict[str, Any]) -> None:
        self.target_shape_ = tuple(int(s) for s in state["target_shape"])
        self.token_shape_ = tuple(int(s) for s in state["token_shape"])
        self.federation_ = state.get("federation", {})
        self.history_ = state.get("history", [])
        if state.get("imported"):
            self.imported_ = dict(state["imported"])
        self.models_, self.voxel_stats_, self.calibration_stats_ = {}, {}, {}
        for s in self.subjects_:
            path = directory / f"subject-{s}.safetensors"
            if not path.is_file():
                raise BrainreconError(f"{directory} is incomplete: {path.name} is missing.")
            fix = "the saved BrainGuard decoder is damaged: refit it"
            tensors = load_safetensors(path, fix=fix)
            with torch.device("meta"):
                model = BrainGuardNet(self.n_voxels_[s], int(self.hidden), int(self.n_blocks),
                                      self.token_shape_[0], self.token_shape_[1], float(self.dropout),
                                      branches=self._branches(), projector_hidden=self.projector_hidden)
            n_tokens, dim = self.token_shape_
            expected = {f"model.{k}": (tuple(v.shape), str(v.dtype).removeprefix("torch."))
                        for k, v in model.state_dict().items()}
            expected.update({"voxel_mean": ((self.n_voxels_[s],), "float32"),
                             "voxel_std": ((self.n_voxels_[s],), "float32")})
            calibration = {"target_norm": ((1,), "float64"), "pred_mean": ((n_tokens, dim), "float64"),
                           "target_mean": ((n_tokens, dim), "float64"), "scale": ((n_tokens,), "float64")}
            expected.update({f"calibration.{k}": v for k, v in calibration.items()})
            needed = {"none": set(), "norm": {"target_norm"}}.get(self._calibration_kind(), set(calibration))
            expected["negative_tokens"] = ((n_tokens, dim), "float32")
            check_arrays(path, tensors, expected,
                         optional={f"calibration.{k}" for k in set(calibration) - needed} | {"negative_tokens"},
                         fix=f"{fix} (brainrecon.json says {self.n_voxels_[s]} voxels, hidden={self.hidden}, "
                             f"n_blocks={self.n_blocks}, tokens {n_tokens}x{dim})")
            model = model.to_empty(device="cpu")
            model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")},
                                  strict=True)
            model.eval()
            self.models_[s] = model
            self.voxel_stats_[s] = (tensors["voxel_mean"].numpy(), tensors["voxel_std"].numpy())
            if "negative_tokens" in tensors:
                self.negative_tokens_ = tensors["negative_tokens"].numpy()
            self.calibration_stats_[s] = {k[len("calibration."):]: v.numpy() for k, v in tensors.items()
                                          if k.startswith("calibration.")}


@dataclass
class SiteData:
    """One subject's training tensors at its site: standardised voxels ((n, V) averages, or
    (n, 3, V) single-trial stacks), token targets, the validation images' averages and targets."""

    voxels: torch.Tensor
    targets: torch.Tensor
    val_voxels: torch.Tensor | None
    val_targets: torch.Tensor | None
    stats: tuple[np.ndarray, np.ndarray]


def _own_record(record: dict, subject: int) -> dict:
    """A round record reduced to one subject's entries (keys are subject ids)."""
    out = {}
    for key, value in record.items():
        if isinstance(value, dict):
            mine = {k: v for k, v in value.items() if str(k) == str(subject)}
            if mine:
                out[key] = mine
        else:
            out[key] = value
    return out


def _raw_predict(model: BrainGuardNet, voxels: torch.Tensor, device: torch.device) -> np.ndarray:
    """Uncalibrated outputs (n, n_tokens, token_dim) of ``model`` in evaluation mode."""
    outs = []
    with torch.no_grad():
        for start in range(0, voxels.shape[0], _PREDICT_BATCH):
            batch = voxels[start:start + _PREDICT_BATCH].to(device)
            outs.append(model(batch).float().cpu().numpy())
    return np.concatenate(outs, axis=0)


__all__ = ["BrainGuardDecoder"]
