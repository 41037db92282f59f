"""Safetensors writing and strict loading that names every missing and unexpected key.

The official code loads every checkpoint non-strictly (`strict` switched off), which silently leaves
mismatched parameters at their initial values. Here a mismatch is an error that lists the
keys, so a wrong file or a changed architecture is seen at once.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from brainrecon.errors import BrainreconError, WeightsNotFoundError
from brainrecon.io import atomic_path

_SHOWN = 8


class StateDictMismatchError(BrainreconError):
    """A weights file does not match the module it is loaded into."""


def save_safetensors_atomic(state: dict[str, torch.Tensor], path: str | os.PathLike,
                            metadata: dict[str, str] | None = None) -> Path:
    """Write ``state`` to ``path`` as safetensors, atomically (contiguous CPU copies)."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return Path(path)


def read_safetensors(path: str | os.PathLike, what: str) -> dict[str, torch.Tensor]:
    """Read all tensors of ``path``; a missing file raises :class:`WeightsNotFoundError`."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise WeightsNotFoundError(
            f"The {what} weights file {path} does not exist; the saved decoder directory is "
            f"incomplete. Save the decoder again, or point to a complete directory."
        )
    return load_file(str(path))


def _key_list(keys: list[str]) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:_SHOWN])
    return shown + (f" (and {len(keys) - _SHOWN} more)" if len(keys) > _SHOWN else "")


def check_state_dict(module: nn.Module, state: dict[str, torch.Tensor], what: str,
                     source: str = "", ignore_prefix: str | None = None) -> None:
    """Raise :class:`StateDictMismatchError` naming missing, unexpected and mis-shaped keys."""
    expected = {k: v for k, v in module.state_dict().items()
                if not (ignore_prefix and k.startswith(ignore_prefix))}
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
              for k, v in expected.items() if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys: {_key_list(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_key_list(unexpected)}")
        if shapes:
            parts.append(f"shape mismatches (file vs model): {_key_list(shapes)}")
        where = f" from {source}" if source else ""
        raise StateDictMismatchError(
            f"Cannot load the {what} weights{where}: " + "; ".join(parts) + ". The file was "
            "saved with a different architecture or size settings; build the decoder with the "
            "parameters it was trained with (they are in brainrecon.json)."
        )


def empty_init(factory):
    """Call ``factory()`` with parameters created on the meta device (no memory, no random init).

    The module must then be filled by a strict load with ``assign=True``; buffers are real.
    """
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        return factory()


def load_state_dict_strict(module: nn.Module, state: dict[str, torch.Tensor], what: str,
                           source: str = "", ignore_prefix: str | None = None,
                           assign: bool = False) -> None:
    """Check ``state`` against ``module`` (see :func:`check_state_dict`), then load it.

    ``assign=True`` replaces the module's tensors by the loaded ones (for modules built with
    :func:`empty_init`).
    """
    check_state_dict(module, state, what, source, ignore_prefix)
    if ignore_prefix:
        # Keys under ignore_prefix belong to a sub-module loaded separately: load the rest
        # into each child so that every key of the file is still checked above.
        own = module.state_dict()
        merged = {k: (state[k] if k in state else own[k]) for k in own}
        module.load_state_dict(merged, strict=True, assign=assign)
    else:
        module.load_state_dict(state, strict=True, assign=assign)


def load_safetensors_strict(module: nn.Module, path: str | os.PathLike, what: str,
                            ignore_prefix: str | None = None, assign: bool = False) -> None:
    """Load a safetensors file into ``module`` with strict key and shape checks."""
    state = read_safetensors(path, what)
    load_state_dict_strict(module, state, what, source=str(path), ignore_prefix=ignore_prefix,
                           assign=assign)
