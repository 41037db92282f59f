"""BrainGuard's training checkpoint format: one folder per round, written atomically.

``round-NNNNN/`` holds ``checkpoint.json`` (format, round, configuration, each client's
bookkeeping), ``global.safetensors`` (the last global model) and ``client-<subject>.safetensors``
per client (model, EMA, optimiser, random generator states); ``latest.json`` beside the folders
names the newest complete one. Loading checks every tensor's name, shape and dtype against the
configuration the JSON records, so a damaged or foreign checkpoint is one clear error;
:func:`restore_clients` resumes from the newest intact one, falling back past damaged ones.
Split out of :mod:`brainrecon.decoders.brainguard.federated`, which re-exports these names.
"""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from safetensors.torch import save_file

from brainrecon.decoders.brainguard.model import BrainGuardNet, decay_groups, is_private
from brainrecon.errors import BrainreconError
from brainrecon.io import (
    check_arrays,
    jsonable,
    load_safetensors,
    read_json,
    write_json_atomic,
)

CHECKPOINT_FORMAT = 1
LATEST = "latest.json"


def save_checkpoint(directory: str | os.PathLike, *, round_index: int, clients: Sequence[Any],
                    global_state: Mapping[str, torch.Tensor], meta: Mapping[str, Any],
                    keep: int = 1) -> Path:
    """Write the state after round ``round_index`` (0-based) as safetensors + JSON; ``clients`` are
    :class:`~brainrecon.decoders.brainguard.federated.Client` objects (their ``checkpoint_state()``).

    Layout: ``round-NNNNN/{global.safetensors, client-S.safetensors, checkpoint.json}`` and
    ``latest.json`` naming the newest complete round directory. The round directory is
    written under a temporary name and renamed; ``latest.json`` is replaced atomically after
    it, and only then are round directories beyond the newest ``keep`` removed, so an
    interruption at any point leaves a complete checkpoint. Every checkpoint also holds each
    client's best-by-validation model (``best.*`` tensors) when clients validate, so keeping
    the last ``keep`` rounds always keeps the best models too.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    name = f"round-{round_index + 1:05d}"
    final = directory / name
    tmp = directory / f".{name}.partial"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    client_meta = {}
    for c in clients:
        tensors, cmeta = c.checkpoint_state()
        save_file(_cpu_contiguous(tensors), str(tmp / f"client-{c.subject}.safetensors"))
        client_meta[str(c.subject)] = cmeta
    save_file(_cpu_contiguous({f"global.{k}": v for k, v in global_state.items()}),
              str(tmp / "global.safetensors"))
    write_json_atomic(tmp / "checkpoint.json", {
        "format": CHECKPOINT_FORMAT,
        "rounds_completed": round_index + 1,
        **meta,
        "clients": client_meta,
    })
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    write_json_atomic(directory / LATEST, {"rounds_completed": round_index + 1, "directory": name})
    prune_rounds(directory, keep=keep, newest=final)
    return final


def prune_rounds(directory: str | os.PathLike, *, keep: int, newest: Path) -> None:
    """Remove all but the ``keep`` newest ``round-NNNNN`` directories (never ``newest``)."""
    rounds = sorted(p for p in Path(directory).glob("round-[0-9]*") if p.is_dir())
    survivors = set(rounds[-max(int(keep), 1):]) | {newest}
    for path in rounds:
        if path not in survivors:
            shutil.rmtree(path, ignore_errors=True)


def read_latest(directory: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint directory under ``directory``, or None."""
    pointer = Path(directory) / LATEST
    if not pointer.is_file():
        return None
    try:
        info = read_json(pointer)
    except (OSError, ValueError, BrainreconError):
        return None
    if not isinstance(info, dict):
        return None
    path = Path(directory) / str(info.get("directory", ""))
    return path if (path / "checkpoint.json").is_file() else None


def checkpoint_candidates(directory: str | os.PathLike) -> list[Path]:
    """Complete round directories under ``directory``, newest first.

    The one ``latest.json`` names comes first; the other ``round-NNNNN`` directories (kept with
    ``checkpoint_keep`` > 1) follow, so a resume can fall back to an older one when the newest
    is damaged. A damaged ``latest.json`` is not fatal: the round directories are listed anyway.
    """
    directory = Path(directory)
    rounds = sorted((p for p in directory.glob("round-[0-9]*") if (p / "checkpoint.json").is_file()),
                    key=lambda p: p.name, reverse=True)
    pointed = read_latest(directory)
    if pointed is not None:
        rounds = [pointed] + [p for p in rounds if p != pointed]
    return rounds


def load_checkpoint(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor],
                                                       dict[int, dict[str, torch.Tensor]]]:
    """Read a round directory written by :func:`save_checkpoint`.

    Returns
    -------
    meta, global_state, client_tensors
    """
    path = Path(path)
    fix = CHECKPOINT_FIX
    file = path / "checkpoint.json"
    meta = read_json(file, required=_META_KINDS, types=_META_KINDS, fix=fix)
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise BrainreconError(
            f"{file} is a BrainGuard checkpoint of format {meta.get('format')}, this brainrecon "
            f"reads format {CHECKPOINT_FORMAT}; start a fresh run (resume=False)."
        )
    _check_meta(file, meta, fix)
    global_file = path / "global.safetensors"
    global_state = {k[len("global."):]: v
                    for k, v in load_safetensors(global_file, fix=fix).items()}
    client_tensors = {}
    for subject in meta["clients"]:
        file = path / f"client-{subject}.safetensors"
        if not file.exists():
            raise BrainreconError(f"Checkpoint {path} is incomplete: {file.name} is missing; {fix}.")
        client_tensors[int(subject)] = load_safetensors(file, fix=fix)
    _check_tensors(path, meta, global_state, client_tensors, fix)
    return meta, global_state, client_tensors


CHECKPOINT_FIX = "this checkpoint cannot be resumed from"
# What checkpoint.json must hold, and of which kinds (every entry is compared with the run
# that resumes, so a missing or null one is damage, not a change of settings).
_META_KINDS = {"format": int, "rounds_completed": int, "clients": dict, "config": dict, "params": dict,
               "subjects": list, "n_voxels": dict, "n_samples": dict, "fingerprints": dict,
               "target_shape": list, "history": list}
_CLIENT_KINDS = {"subject": int, "n_samples": int, "optimizer": dict, "scheduler": dict,
                 "dfl_start_phase": bool, "has_fusion_weights": bool, "best_score": (float, int, type(None))}


def _check_meta(file: Path, meta: dict, fix: str) -> None:
    def bad(what: str):
        return BrainreconError(f"{file}: {what}; {fix}.")

    if meta["rounds_completed"] < 1 or len(meta["history"]) != meta["rounds_completed"]:
        raise bad(f"{len(meta['history'])} round records for {meta['rounds_completed']} rounds completed")
    subjects = [str(s) for s in meta["subjects"]]
    if sorted(meta["clients"]) != sorted(subjects) or sorted(map(str, meta["n_voxels"])) != sorted(subjects):
        raise bad(f"clients {sorted(meta['clients'])} and n_voxels {sorted(meta['n_voxels'])} do not match "
                  f"subjects {subjects}")
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in meta["n_voxels"].values()):
        raise bad(f"n_voxels {meta['n_voxels']} are not positive integers")
    if not meta["target_shape"] or not all(isinstance(v, int) and v > 0 for v in meta["target_shape"]):
        raise bad(f"target_shape {meta['target_shape']} is not a shape")
    for key in ("hidden", "n_blocks"):
        if not isinstance(meta["config"].get(key), int):
            raise bad(f"config field {key!r} is {meta['config'].get(key)!r}, expected an integer")
    for subject, entry in meta["clients"].items():
        if not isinstance(entry, dict):
            raise bad(f"clients[{subject!r}] is not an object")
        for key, kinds in _CLIENT_KINDS.items():
            value = entry.get(key)
            kinds = kinds if isinstance(kinds, tuple) else (kinds,)
            if key not in entry or not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
                raise bad(f"clients[{subject!r}][{key!r}] is {value!r}, expected {'/'.join(k.__name__ for k in kinds)}")
        opt = entry["optimizer"]
        if not (isinstance(opt.get("param_groups"), list) and all(isinstance(g, dict) for g in opt["param_groups"])
                and isinstance(opt.get("scalars"), dict) and isinstance(opt.get("indices"), list)):
            raise bad(f"clients[{subject!r}]['optimizer'] lacks param_groups, scalars or indices")


def _check_tensors(path: Path, meta: dict, global_state: Mapping[str, torch.Tensor],
                   client_tensors: Mapping[int, Mapping[str, torch.Tensor]], fix: str) -> None:
    """Every tensor of the checkpoint against what checkpoint.json says: the network its config
    builds, the optimizer state of each of its parameters, the clients' flags."""
    from brainrecon.decoders.brainguard.model import token_shape

    config = meta["config"]
    n_tokens, dim = token_shape(tuple(meta["target_shape"]))
    for subject, tensors in client_tensors.items():
        entry = meta["clients"][str(subject)]
        with torch.device("meta"):
            model = BrainGuardNet(int(meta["n_voxels"][str(subject)]), int(config["hidden"]), int(config["n_blocks"]),
                                  n_tokens, dim, 0.0, branches=config.get("branches"),
                                  projector_hidden=config.get("projector_hidden"))
        state = {k: (tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in model.state_dict().items()}
        shared = {n: state[n] for n, _ in model.named_parameters() if not is_private(n)}
        params = [p for g in decay_groups(model, 0.0, layernorm=bool(config.get("decay_layernorm", False)))
                  for p in g["params"]]
        expected = {f"model.{k}": v for k, v in state.items()}
        for i in entry["optimizer"]["indices"]:
            if not isinstance(i, int) or not 0 <= i < len(params):
                raise BrainreconError(f"{path / 'checkpoint.json'}: optimizer index {i!r} of client {subject} "
                                      f"is not one of its {len(params)} parameters; {fix}.")
            shape = tuple(params[i].shape)
            expected.update({f"optimizer.{i}.exp_avg": (shape, "float32"),
                             f"optimizer.{i}.exp_avg_sq": (shape, "float32"),
                             f"optimizer.{i}.step": ((), "float32")})
        if entry["has_fusion_weights"]:
            expected.update({f"fusion.{k}": v for k, v in shared.items()})
        if config.get("ema", "none") != "none":
            expected.update({f"ema.{k}": v for k, v in shared.items()})
        if entry["best_score"] is not None:
            expected.update({f"best.{k}": v for k, v in state.items()})
        rng = torch.Generator().get_state()
        expected.update({"rng.shuffle": (tuple(rng.shape), "uint8"), "rng.dropout": ((None,), "uint8")})
        if "rng.dropout" in tensors and tensors["rng.dropout"].shape[0] not in (rng.shape[0], 16):
            # 16 bytes: a CUDA generator's seed and offset
            expected["rng.dropout"] = (tuple(rng.shape), "uint8")
        check_arrays(path / f"client-{subject}.safetensors", tensors, expected,
                     fix=f"{fix} (checkpoint.json says {meta['n_voxels'][str(subject)]} voxels, "
                         f"hidden={config['hidden']}, n_blocks={config['n_blocks']}, tokens {n_tokens}x{dim})")
    check_arrays(path / "global.safetensors", global_state, shared, fix=fix)


def restore_clients(candidates: list[Path], run_meta: dict, clients: Sequence[Any],
                    server_device: torch.device) -> tuple[int, dict, list]:
    """Restore ``clients`` from the newest of ``candidates`` (:func:`checkpoint_candidates`) whose
    files read back intact; returns the rounds completed, the global state and the history.

    ``run_meta`` describes this run (configuration, parameters, subjects, data); a checkpoint
    written with anything else is refused, naming each difference.

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


def _cpu_contiguous(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}


__all__ = ["CHECKPOINT_FORMAT", "LATEST", "checkpoint_candidates", "load_checkpoint", "prune_rounds",
           "read_latest", "restore_clients", "save_checkpoint"]
