"""What a BrainGuard fit computes around the federated rounds, as functions of the decoder's parameters.

:func:`train_config` checks the parameters and gives the :class:`~.federated.TrainConfig`;
:func:`site_data` is what one site computes from its own data alone (standardised voxels, token
targets, the validation split); :func:`initial_models` gives every client the same shared layers
(or the models of ``init_from``, checked by :func:`check_init_source`); :func:`raw_predict` the
uncalibrated outputs the fitted state is calibrated on. ``params`` is the decoder's parameter
mapping (``get_params()``). :class:`~brainrecon.decoders.brainguard.decoder.BrainGuardDecoder`
calls these in ``fit``, and a Flower site (:mod:`brainrecon.federation.site`) through the
decoder's methods of the same names.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from brainrecon.decoders.brainguard.federated import EMA_MODES, TrainConfig
from brainrecon.decoders.brainguard.model import (
    CALIBRATIONS,
    BrainGuardNet,
    token_shape,
)
from brainrecon.errors import BrainreconError, DataError
from brainrecon.targets import get_target

NAN_POLICIES = ("error", "zero")
VALIDATIONS = ("fraction", "dataset")
TRIALS = ("average", "single")
_PREDICT_BATCH = 256


# ---------------------------------------------------------------------------- parameters
def train_config(params: Mapping[str, Any]) -> TrainConfig:
    """The checked training configuration of a decoder's parameters (one :class:`DataError` per bad value)."""
    def positive_int(name: str, minimum: int = 1) -> int:
        value = params[name]
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
            raise DataError(f"{name} must be an integer >= {minimum}, got {value!r}.")
        return int(value)

    def positive_float(name: str, allow_zero: bool = False) -> float:
        value = params[name]
        ok = isinstance(value, (int, float, np.number)) and not isinstance(value, bool) and \
            np.isfinite(value) and (value >= 0 if allow_zero else value > 0)
        if not ok:
            bound = ">= 0" if allow_zero else "> 0"
            raise DataError(f"{name} must be a finite number {bound}, got {value!r}.")
        return float(value)

    if params["ema"] not in EMA_MODES:
        raise DataError(f"Unknown ema {params['ema']!r}. Valid choices: {', '.join(map(repr, EMA_MODES))}.")
    check_choices(params)
    if not 0.0 <= float(params["dropout"]) < 1.0:
        raise DataError(f"dropout must be in [0, 1), got {params['dropout']!r}.")
    if not 0.0 <= float(params["ema_decay"]) <= 1.0:
        raise DataError(f"ema_decay must be in [0, 1], got {params['ema_decay']!r}.")
    if params["resume"] and params["checkpoint_dir"] is None:
        raise DataError(
            "resume=True needs checkpoint_dir, the directory the interrupted run wrote its "
            "checkpoints to.", parameters=("resume", "checkpoint_dir")
        )
    positive_int("checkpoint_every")
    positive_int("checkpoint_keep")
    if not isinstance(params["decay_layernorm"], bool):
        raise DataError(f"decay_layernorm must be True or False, got {params['decay_layernorm']!r}.")
    fraction = params["validation_fraction"]
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
    sync_tensors = None if params["sync_tensors"] is None else positive_int("sync_tensors", 0)
    projector_hidden = None if params["projector_hidden"] is None else positive_int("projector_hidden")
    branches = None
    if params["branches"] is not None:
        if isinstance(params["branches"], (str, bytes)) or not hasattr(params["branches"], "__len__"):
            raise DataError(f"branches must be a list of token counts, e.g. [257, 77]; got {params['branches']!r}.")
        branches = tuple(int(b) for b in params["branches"])
        if len(branches) == 1:
            branches = None  # one group: the plain single-branch network
    return TrainConfig(
        branches=branches, projector_hidden=projector_hidden,
        hidden=positive_int("hidden"), n_blocks=n_blocks, dropout=float(params["dropout"]),
        rounds=positive_int("rounds"), local_iterations=positive_int("local_iterations"),
        sync_layers=sync_layers, sync_tensors=sync_tensors,
        batch_size=positive_int("batch_size"), lr=positive_float("lr"),
        weight_decay=positive_float("weight_decay", True),
        mse_weight=positive_float("mse_weight", True), softclip_tau=positive_float("softclip_tau"),
        softclip_weight=positive_float("softclip_weight", True),
        dfl_eta=positive_float("dfl_eta", True), dfl_grad_scale=positive_float("dfl_grad_scale", True),
        dfl_threshold=positive_float("dfl_threshold", True),
        dfl_num_pre_loss=positive_int("dfl_num_pre_loss"),
        dfl_max_epochs=positive_int("dfl_max_epochs"), ema=params["ema"],
        ema_decay=float(params["ema_decay"]), warmup_epochs=positive_float("warmup_epochs", True),
        decay_layernorm=bool(params["decay_layernorm"]), seed=int(params["seed"]),
    )



def check_choices(params: Mapping[str, Any]) -> None:
    """``calibration``, ``nan_policy``, ``validation`` and ``trials`` are among their choices."""
    if params["calibration"] != "auto" and params["calibration"] not in CALIBRATIONS:
        raise DataError(
            f"Unknown calibration {params['calibration']!r}. Valid choices: 'auto', "
            f"{', '.join(map(repr, CALIBRATIONS))}."
        )
    if params["nan_policy"] not in NAN_POLICIES:
        raise DataError(
            f"Unknown nan_policy {params['nan_policy']!r}. Valid choices: 'error', 'zero'."
        )
    if params["validation"] not in VALIDATIONS:
        raise DataError(f"Unknown validation {params['validation']!r}. Valid choices: "
                        f"{', '.join(map(repr, VALIDATIONS))}.")
    if params["trials"] not in TRIALS:
        raise DataError(f"Unknown trials {params['trials']!r}. Valid choices: {', '.join(map(repr, TRIALS))}.")


# ---------------------------------------------------------------------------- a site's data
@dataclass
class SiteData:
    """One subject's training tensors at its site: standardised voxels ((n, V) averages, or
    (n, 3, V) single-trial stacks), token targets, the validation images' averages and targets."""

    voxels: torch.Tensor
    targets: torch.Tensor
    val_voxels: torch.Tensor | None
    val_targets: torch.Tensor | None
    stats: tuple[np.ndarray, np.ndarray]


def site_data(params: Mapping[str, Any], train, subject: int, target_shape: tuple[int, ...],
              saved_stats: tuple[np.ndarray, np.ndarray] | None = None) -> SiteData:
    """One subject's standardised voxels and token targets, split for validation.

    Everything here is computed from that subject's data alone (it runs at the site).
    ``saved_stats``: the voxel mean and std of a model continued from ``init_from`` (kept: the
    network was trained on voxels scaled that way); otherwise the subject's own.
    """
    space = get_target(params["target"], **(params["target_options"] or {}))
    n_tokens, token_dim = token_shape(target_shape)
    s = int(subject)
    X = train.voxels(s, nan_policy=params["nan_policy"])
    Y = np.asarray(space.load(train, s, progress=params["progress"]), dtype=np.float32)
    if Y.shape != (X.shape[0],) + target_shape:
        raise DataError(
            f"Subject {s}: {X.shape[0]} voxel rows but targets of shape {Y.shape}; "
            f"expected {(X.shape[0],) + target_shape}."
        )
    if not np.all(np.isfinite(Y)):
        raise DataError(f"Subject {s}: the {params['target']!r} targets contain NaN or infinite values.")
    # Standardising with the subject's own training statistics is part of the
    # subject-specific input layer: computed on the client, never shared. A model continued
    # from init_from keeps the scaling it was trained with (saved_stats).
    if saved_stats is not None:
        mean, std = (np.asarray(v, dtype=np.float64) for v in saved_stats)
    else:
        mean = X.mean(axis=0, dtype=np.float64)
        std = X.std(axis=0, dtype=np.float64)
        std = np.where(std > 1e-8, std, 1.0)
    Xs = torch.from_numpy(((X - mean) / std).astype(np.float32))
    Yt = torch.from_numpy(Y.reshape(len(Y), n_tokens, token_dim))
    stats = (mean.astype(np.float32), std.astype(np.float32))
    if params["validation"] == "dataset":
        val_rows = np.asarray(train.validation_rows(s), dtype=np.int64)
        if not 1 <= len(val_rows) < len(X):
            raise DataError(f"Subject {s}: the dataset's validation split has {len(val_rows)} of {len(X)} training "
                            f"images; both validation and training need at least one.")
    else:
        n_val = round(float(params["validation_fraction"]) * len(X))
        if params["validation_fraction"] and not 1 <= n_val < len(X):
            raise DataError(
                f"validation_fraction={params['validation_fraction']} leaves subject {s} "
                f"{n_val} validation and {len(X) - n_val} training samples; both need at least one."
            )
        order = np.random.default_rng(np.random.SeedSequence([int(params["seed"]), s, 3])).permutation(len(X))
        val_rows = np.sort(order[:n_val])
    fit_rows = np.setdiff1d(np.arange(len(X)), val_rows)
    if params["trials"] == "single":
        stack = train.trial_stack(s, nan_policy=params["nan_policy"])
        train_voxels = torch.from_numpy(((stack[fit_rows] - mean) / std).astype(np.float32))
    else:
        train_voxels = Xs[torch.from_numpy(fit_rows)]
    fit_t = torch.from_numpy(fit_rows)
    if not len(val_rows):
        return SiteData(train_voxels, Yt[fit_t], None, None, stats)
    val = torch.from_numpy(val_rows)
    return SiteData(train_voxels, Yt[fit_t], Xs[val], Yt[val], stats)


# ---------------------------------------------------------------------------- models
def initial_models(config: TrainConfig, n_voxels: dict[int, int], n_tokens: int, token_dim: int,
                   saved_models: Mapping[int, BrainGuardNet] | None = None) -> dict[int, BrainGuardNet]:
    """Identical shared layers for every client; each subject's input layer seeded apart.

    With ``saved_models`` (those of ``init_from``) each subject starts from its saved model instead.
    """
    if saved_models is not None:
        models = {}
        for s, V in n_voxels.items():
            model = config.build(V, n_tokens, token_dim)
            model.load_state_dict(saved_models[s].state_dict(), strict=True)
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


def check_init_source(source, where: str, subjects: list[int], config: TrainConfig, n_tokens: int,
                      token_dim: int, n_voxels: dict[int, int]) -> None:
    """The saved decoder ``source`` (``init_from``, named ``where``) fits this training: its
    subjects, voxel counts and network sizes."""
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


def own_record(record: dict, subject: int) -> dict:
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


def raw_predict(model: BrainGuardNet, voxels: torch.Tensor, device: torch.device) -> np.ndarray:
    """Uncalibrated outputs (n, n_tokens, token_dim) of ``model`` in evaluation mode."""
    outs = []
    with torch.no_grad():
        for start in range(0, voxels.shape[0], _PREDICT_BATCH):
            batch = voxels[start:start + _PREDICT_BATCH].to(device)
            outs.append(model(batch).float().cpu().numpy())
    return np.concatenate(outs, axis=0)
