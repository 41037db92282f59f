"""NeuroPictor's training checkpoints: one folder per step, written atomically.

``step_NNNNNNNN/`` holds ``trainable.safetensors`` (the trained weights), ``optimizer.safetensors``
(the AdamW moments) with ``optimizer.json`` (parameter groups and scalar state) and ``trainer.json``
(step, the settings a resume must agree on, the losses so far); the :data:`KEEP_CHECKPOINTS` newest
are kept. Reading checks every file, and :func:`checkpoint_check` every weight and moment against the
network and optimizer to resume, so that :func:`newest_intact_checkpoint` falls back past a damaged
checkpoint, naming it. Split out of :mod:`brainrecon.decoders.neuropictor.train`, whose training loop
uses these functions and which re-exports their names.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from brainrecon.decoders.neuropictor.weights import (
    load_state_dict_strict,
    save_safetensors_atomic,
)
from brainrecon.errors import BrainreconError
from brainrecon.io import (
    atomic_directory,
    check_arrays,
    jsonable,
    load_safetensors,
    read_json,
    write_json_atomic,
)

__all__ = [
    "CHECKPOINT_FIX",
    "CHECKPOINT_PREFIX",
    "IDENTITY_DEFAULTS",
    "IDENTITY_OPTIONAL",
    "KEEP_CHECKPOINTS",
    "checkpoint_check",
    "list_checkpoints",
    "load_checkpoint",
    "newest_intact_checkpoint",
    "optimizer_from_safetensors",
    "optimizer_to_safetensors",
    "read_checkpoint",
    "save_checkpoint",
]

KEEP_CHECKPOINTS = 2
CHECKPOINT_PREFIX = "step_"
# Identity entries that checkpoints written before they existed implicitly had.
IDENTITY_DEFAULTS = {"encoder_eps": 1e-6}
# Identity entries not compared when a checkpoint predates them (its global batch is unknown).
IDENTITY_OPTIONAL = ("global_batch",)


def optimizer_to_safetensors(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer ``state_dict`` into tensors and a JSON-able rest."""
    tensors, scalars = {}, {}
    for pid, entry in state["state"].items():
        for name, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"state.{pid}.{name}"] = value
            else:
                scalars.setdefault(str(pid), {})[name] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def optimizer_from_safetensors(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        _, pid, name = key.split(".", 2)
        state.setdefault(int(pid), {})[name] = value
    for pid, entry in meta.get("scalars", {}).items():
        state.setdefault(int(pid), {}).update(entry)
    return {"state": state, "param_groups": meta["param_groups"]}


def list_checkpoints(directory: str | Path) -> list[Path]:
    """Complete checkpoints in ``directory``, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [p for p in directory.glob(f"{CHECKPOINT_PREFIX}*") if (p / "trainer.json").is_file()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def save_checkpoint(directory: Path, step: int, net, optimizer, cfg: Any, losses: list[float]) -> Path:
    """Write checkpoint ``step`` under ``directory`` atomically (``cfg``: the run's
    :class:`~brainrecon.decoders.neuropictor.train.TrainConfig`, of which its ``identity`` is kept)
    and delete all but the :data:`KEEP_CHECKPOINTS` newest."""
    path = Path(directory) / f"{CHECKPOINT_PREFIX}{step:08d}"
    with atomic_directory(path, overwrite=True) as tmp:
        save_safetensors_atomic(net.state_dict(), tmp / "trainable.safetensors")
        tensors, meta = optimizer_to_safetensors(optimizer.state_dict())
        save_safetensors_atomic(tensors, tmp / "optimizer.safetensors")
        write_json_atomic(tmp / "optimizer.json", meta)
        write_json_atomic(tmp / "trainer.json", {"step": step, "identity": cfg.identity,
                                                 "losses": losses})
    for old in list_checkpoints(directory)[:-KEEP_CHECKPOINTS]:
        shutil.rmtree(old, ignore_errors=True)
    return path


CHECKPOINT_FIX = "this checkpoint cannot be resumed from"


def read_checkpoint(path: Path) -> dict[str, Any]:
    """Every file of a checkpoint, read and checked; a damaged one is a :class:`BrainreconError`
    naming it (so :func:`run_training` can fall back to an older checkpoint)."""
    path = Path(path)
    file = path / "trainer.json"
    info = read_json(file, required=("step", "identity", "losses"),
                     types={"step": int, "identity": dict, "losses": list}, fix=CHECKPOINT_FIX)
    if path.name.startswith(CHECKPOINT_PREFIX) and info["step"] != int(path.name[len(CHECKPOINT_PREFIX):]):
        raise BrainreconError(f"{file} says step {info['step']}, its directory {path.name}; {CHECKPOINT_FIX}.")
    losses = info["losses"]
    if len(losses) != info["step"] or not all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                              for x in losses):
        raise BrainreconError(f"{file} holds {len(losses)} losses for step {info['step']}, expected one number "
                              f"per step; {CHECKPOINT_FIX}.")
    meta_file = path / "optimizer.json"
    meta = read_json(meta_file, required=("param_groups", "scalars"), types={"param_groups": list, "scalars": dict},
                     fix=CHECKPOINT_FIX)
    if not all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in meta["param_groups"]) or \
            not all(isinstance(v, dict) for v in meta["scalars"].values()):
        raise BrainreconError(f"{meta_file} does not hold optimizer parameter groups; {CHECKPOINT_FIX}.")
    return {
        "info": info,
        "trainable": load_safetensors(path / "trainable.safetensors", fix=CHECKPOINT_FIX),
        "optimizer": load_safetensors(path / "optimizer.safetensors", fix=CHECKPOINT_FIX),
        "optimizer_meta": meta,
    }


def checkpoint_check(net, optimizer) -> Callable[[Path, dict[str, Any]], None]:
    """A check of a read checkpoint against the network and optimizer it is to be loaded into:
    every weight and AdamW moment by name, shape and dtype, the parameter groups entry by entry."""
    expected = {k: (tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in net.state_dict().items()}
    params = [p for g in optimizer.param_groups for p in g["params"]]
    moments = {}
    for i, p in enumerate(params):
        dtype = str(p.dtype).removeprefix("torch.")
        moments.update({f"state.{i}.exp_avg": (tuple(p.shape), dtype), f"state.{i}.exp_avg_sq": (tuple(p.shape), dtype),
                        f"state.{i}.step": ((), "float32")})
    groups = jsonable(optimizer.state_dict()["param_groups"])

    def kind(value):
        return float if isinstance(value, int) and not isinstance(value, bool) else type(value)

    def check(path: Path, loaded: dict[str, Any]) -> None:
        check_arrays(path / "trainable.safetensors", loaded["trainable"], expected, fix=CHECKPOINT_FIX)
        file = path / "optimizer.safetensors"
        tensors = loaded["optimizer"]
        check_arrays(file, tensors, moments, optional=moments, fix=CHECKPOINT_FIX)
        for i in range(len(params)):
            present = [n for n in ("exp_avg", "exp_avg_sq", "step") if f"state.{i}.{n}" in tensors]
            if present and len(present) != 3:
                raise BrainreconError(f"{file} holds only {present} of parameter {i}'s AdamW state; "
                                      f"{CHECKPOINT_FIX}.")
        meta_file = path / "optimizer.json"
        saved = loaded["optimizer_meta"]
        bad = [f"{len(saved['param_groups'])} parameter groups, expected {len(groups)}"] \
            if len(saved["param_groups"]) != len(groups) else []
        for n, (got, want) in enumerate(zip(saved["param_groups"], groups)):
            if sorted(got) != sorted(want):
                bad.append(f"group {n} has entries {sorted(got)}, expected {sorted(want)}")
            elif got["params"] != want["params"]:
                bad.append(f"group {n} holds other parameters")
            else:
                bad += [f"group {n} entry {k!r} is {got[k]!r}" for k in want if kind(got[k]) is not kind(want[k])]
        if any(not str(k).isdigit() or int(k) >= len(params) for k in saved["scalars"]):
            bad.append(f"scalars for parameters {sorted(saved['scalars'])}")
        if bad:
            raise BrainreconError(f"{meta_file} does not match the optimizer: {'; '.join(bad[:4])}; {CHECKPOINT_FIX}.")

    return check


def newest_intact_checkpoint(directory: str | Path, log: Callable[[str], None] = print,
                             check: Callable[[Path, dict[str, Any]], None] | None = None
                             ) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint in ``directory`` whose files read back intact, and its contents.

    Damaged ones (cut mid-write, disk full, a bad copy, or not matching ``check``: see
    :func:`checkpoint_check`) are skipped, each with a line naming it; None when there is no
    checkpoint; a :class:`BrainreconError` when every one is damaged.
    """
    found = list_checkpoints(directory)
    damaged = []
    for path in reversed(found):
        try:
            loaded = read_checkpoint(path)
            if check is not None:
                check(path, loaded)
        except BrainreconError as exc:
            damaged.append(str(exc))
            log(f"Skipping damaged checkpoint {path.name}: {exc}")
            continue
        if damaged:
            log(f"Resuming from the older checkpoint {path}; newer ones are damaged.")
        return path, loaded
    if damaged:
        raise BrainreconError(
            f"Cannot resume from {directory}: no intact checkpoint is left ({damaged[0]}). "
            f"Start afresh with resume=False.", parameters=("resume",)
        )
    return None


def load_checkpoint(path: Path, net, optimizer, cfg: Any,
                    loaded: dict[str, Any] | None = None) -> tuple[int, list[float]]:
    """Load checkpoint ``path`` (or its already read contents ``loaded``) into ``net`` and ``optimizer``
    after checking that it was written with the same ``cfg.identity`` (``cfg``: the run's
    :class:`~brainrecon.decoders.neuropictor.train.TrainConfig`); returns the step and the losses so far."""
    loaded = read_checkpoint(path) if loaded is None else loaded
    info = loaded["info"]
    saved = {**IDENTITY_DEFAULTS, **info.get("identity", {})}
    # The global batch, not its split into processes and micro-steps, must agree: a run
    # resumed on another number of GPUs accumulates to the same samples per step.
    diff = {k: (saved.get(k), v) for k, v in cfg.identity.items()
            if saved.get(k) != v and not (k in IDENTITY_OPTIONAL and k not in saved)}
    if diff:
        shown = ", ".join(f"{k}={a!r} in the checkpoint vs {b!r} now" for k, (a, b) in diff.items())
        raise BrainreconError(
            f"Cannot resume from {path}: it was written with different settings ({shown}). "
            f"Use the same settings, or another checkpoint_dir to start afresh."
        )
    load_state_dict_strict(net, loaded["trainable"], "checkpoint", source=str(path))
    optimizer.load_state_dict(optimizer_from_safetensors(loaded["optimizer"], loaded["optimizer_meta"]))
    return int(info["step"]), [float(x) for x in info.get("losses", [])]
