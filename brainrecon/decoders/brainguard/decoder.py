"""The registered ``brainguard`` decoder: federated multi-subject MLP decoders.

The class holds the parameters, ``fit`` (the federated rounds, checkpoints, resuming),
``predict`` and the saved files; :mod:`.training` computes the pieces around the rounds (the
checked configuration, each site's data, the initial models), :mod:`.federated` runs the rounds,
:mod:`.checkpoint` writes and restores checkpoints, and ``from_official`` comes from
:class:`~.loader.FromOfficialMixin`.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from safetensors.torch import save_file

from brainrecon.decoders.base import CliOption, Decoder
from brainrecon.decoders.brainguard import training
from brainrecon.decoders.brainguard.checkpoint import restore_clients
from brainrecon.decoders.brainguard.federated import (
    Client,
    TrainConfig,
    checkpoint_candidates,
    client_devices,
    run_federation,
    save_checkpoint,
)
from brainrecon.decoders.brainguard.loader import FromOfficialMixin
from brainrecon.decoders.brainguard.model import (
    BrainGuardNet,
    apply_calibration,
    check_branches,
    fit_calibration,
    token_shape,
)
from brainrecon.decoders.brainguard.recipes import RECIPES
from brainrecon.decoders.brainguard.training import SiteData
from brainrecon.errors import BrainreconError, BrainreconWarning, DataError
from brainrecon.io import check_arrays, jsonable, load_safetensors
from brainrecon.recipes import Recipe
from brainrecon.targets import get_target

# Parameters that do not change what training computes: a checkpoint written under other
# values of these can be resumed.
_RESUME_FREE = ("checkpoint_dir", "checkpoint_every", "checkpoint_keep", "resume", "progress", "device",
                "calibration")


class BrainGuardDecoder(FromOfficialMixin, Decoder):
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
        return training.train_config(self.get_params())

    def _check_choices(self) -> None:
        training.check_choices(self.get_params())

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
            start_round, global_state, history = restore_clients(candidates, run_meta, clients, server_device)
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
        if source is not None:
            training.check_init_source(source, f"init_from={str(self.init_from)!r}", subjects, config, n_tokens,
                                       token_dim, n_voxels)

    def _site_data(self, train, subject: int, target_shape: tuple[int, ...]) -> SiteData:
        """One subject's standardised voxels and token targets, split for validation (at its site)."""
        source = self._init_source()
        saved = source.voxel_stats_.get(int(subject)) if source is not None else None
        return training.site_data(self.get_params(), train, subject, target_shape, saved_stats=saved)

    def _set_fitted(self, clients: list[Client], voxel_stats: dict, target_shape: tuple[int, ...],
                    history: list, *, rounds: int, n_sites: int) -> None:
        """Fitted attributes from trained clients (their final, or best-by-validation, models)."""
        self.models_, self.voxel_stats_, self.calibration_stats_ = {}, {}, {}
        for client in clients:
            s = client.subject
            model = client.final_model()
            model.eval()
            raw = training.raw_predict(model, client.average_voxels, client.device)
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
        return training.initial_models(config, n_voxels, n_tokens, token_dim,
                                       None if source is None else source.models_)

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
            raw = training.raw_predict(model, Xs, device)
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
        single.history_ = [training.own_record(r, subject) for r in self.history_]
        single.n_voxels_ = {subject: self.n_voxels_[subject]}
        single.subjects_ = [subject]
        return single

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


__all__ = ["BrainGuardDecoder"]
