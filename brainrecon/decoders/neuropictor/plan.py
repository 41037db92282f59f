"""How a NeuroPictor stage is trained: per-stage settings, batch arithmetic, steps, processes.

:func:`training_plan` resolves a decoder's parameters for one stage into the settings
:meth:`NeuroPictorDecoder.fit <brainrecon.decoders.neuropictor.decoder.NeuroPictorDecoder.fit>`
trains with: per-stage mappings (keyed by brainrecon's stage names or the official yaml names),
the gradient accumulation that makes up the global batch over the training processes, and the
number of optimiser steps. ``params`` is the decoder's parameter mapping (``get_params()``);
nothing here builds or touches a network.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from brainrecon.errors import BrainreconError, BrainreconWarning

STAGES = ("encoder", "pretrain", "finetune", "cfg")
# Learning rate and epochs of each stage when not given (spec neuropictor.md §7).
STAGE_LR = {"encoder": 1e-4, "pretrain": 1e-4, "finetune": 1e-4, "cfg": 1e-5}
STAGE_EPOCHS = {"encoder": 100, "pretrain": 100, "finetune": 160, "cfg": 20}
# Keys of per-stage parameter mappings: brainrecon's stages and the official yaml names
# (models/{pretrain,pretrain_mask,finetune,finetune_mask}.yaml). Stage "cfg" looks up
# "pretrain_mask" or "finetune_mask" (by whether it continues a pre-trained or a fine-tuned
# model), then "cfg".
STAGE_KEYS = ("encoder", "pretrain", "pretrain_mask", "finetune", "finetune_mask", "cfg")
PER_STAGE = ("lr", "steps", "epochs", "semantic_weight", "global_batch", "detach_unet_encoder")

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


def num_processes(cpu: bool = False) -> int:
    """Training processes of this run (the ``accelerate`` state; 1 when there is none).

    Warns (attributed to the caller of the method that asks) when ``accelerate launch --cpu``
    was asked for several processes, since it starts one.
    """
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


def stage_keys(stage: str, use_aux: bool) -> tuple[str, ...]:
    """The keys a per-stage mapping is read with for ``stage``, in order of preference."""
    if stage == "cfg":
        return ("finetune_mask" if use_aux else "pretrain_mask", "cfg")
    return (stage,)


def per_stage(params: Mapping[str, Any], name: str, keys: Sequence[str], default=None):
    """Parameter ``name`` for the stage with lookup ``keys``; a mapping is read per stage."""
    value = params[name]
    if isinstance(value, Mapping):
        unknown = sorted(set(value) - set(STAGE_KEYS))
        if unknown:
            raise BrainreconError(
                f"{name} maps unknown stage(s) {unknown}; valid keys: {', '.join(STAGE_KEYS)}."
            )
        value = next((value[k] for k in keys if k in value), None)
    return default if value is None else value


def grad_accum(params: Mapping[str, Any], keys: Sequence[str], processes: int) -> int:
    """Micro-steps per optimiser step, from ``grad_accum`` or ``global_batch``."""
    accum = params["grad_accum"]
    global_batch = per_stage(params, "global_batch", keys)
    batch_size = params["batch_size"]
    per_step = int(batch_size) * processes
    if global_batch is not None:
        if int(global_batch) < 1 or int(global_batch) % per_step:
            raise BrainreconError(
                f"global_batch {global_batch} is not a multiple of batch_size {batch_size} x "
                f"{processes} process(es) = {per_step}; choose a batch_size (or number of GPUs) "
                f"that divides it."
            )
        derived = int(global_batch) // per_step
        if accum is not None and int(accum) != derived:
            raise BrainreconError(
                f"grad_accum={accum} contradicts global_batch {global_batch} = batch_size "
                f"{batch_size} x {processes} process(es) x {derived}; give one of the two."
            )
        accum = derived
    accum = 1 if accum is None else accum
    if not isinstance(accum, (int, np.integer)) or isinstance(accum, bool) or accum < 1:
        raise BrainreconError(f"grad_accum must be a positive integer, got {accum!r}.")
    return int(accum)


def total_steps(params: Mapping[str, Any], n: int, stage: str, keys: Sequence[str], global_batch: int) -> int:
    """Optimiser steps: ``steps``, else ``epochs`` passes over ``n`` samples at ``global_batch``."""
    steps = per_stage(params, "steps", keys)
    if steps is not None:
        if int(steps) < 1:
            raise BrainreconError(f"steps must be at least 1, got {steps}.")
        return int(steps)
    epochs = per_stage(params, "epochs", keys, STAGE_EPOCHS[stage])
    if int(epochs) < 1:
        raise BrainreconError(f"epochs must be at least 1, got {epochs}.")
    return int(epochs) * max(1, math.ceil(n / global_batch))


def semantic_weight(params: Mapping[str, Any], stage: str, keys: Sequence[str]) -> float:
    """lambda of the semantic loss (default 0.1 where the auxiliary branch trains, else 0)."""
    default = 0.1 if stage == "finetune" or (stage == "cfg" and "finetune_mask" in keys) else 0.0
    return float(per_stage(params, "semantic_weight", keys, default))


def training_plan(params: Mapping[str, Any], n_samples: int, *, stage: str, use_aux: bool,
                  processes: int) -> dict[str, Any]:
    """The settings a stage trains with (see :meth:`NeuroPictorDecoder.training_plan
    <brainrecon.decoders.neuropictor.decoder.NeuroPictorDecoder.training_plan>`)."""
    keys = stage_keys(stage, use_aux)
    accum = grad_accum(params, keys, processes)
    global_batch = int(params["batch_size"]) * processes * accum
    return {
        "stage_keys": list(keys),
        "lr": float(per_stage(params, "lr", keys, STAGE_LR[stage])),
        "semantic_weight": semantic_weight(params, stage, keys) if stage != "encoder" else 0.0,
        "cfg_drop": float(params["cfg_drop"]) if stage == "cfg" else 0.0,
        "detach_unet_encoder": bool(per_stage(params, "detach_unet_encoder", keys, stage == "pretrain"))
        and stage != "encoder",
        "grad_accum": accum,
        "processes": processes,
        "global_batch": global_batch,
        "steps": total_steps(params, int(n_samples), stage, keys, global_batch),
    }
