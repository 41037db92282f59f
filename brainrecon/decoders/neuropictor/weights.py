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
from brainrecon.io import check_arrays, load_safetensors, save_safetensors_atomic  # noqa: F401 - the last re-exported

_SHOWN = 8
# What to do about a damaged weights file of a saved decoder or checkpoint.
SAVED_FIX = ("the saved NeuroPictor decoder is damaged or does not match its brainrecon.json: refit it "
             "(or save the fitted decoder again)")
ARCHITECTURE_FIX = ("the file was saved with a different architecture or size settings; build the decoder with "
                    "the parameters it was trained with (they are in brainrecon.json)")


class StateDictMismatchError(BrainreconError):
    """A weights file does not match the module it is loaded into."""


def read_safetensors(path: str | os.PathLike, what: str, fix: str = SAVED_FIX) -> dict[str, torch.Tensor]:
    """Read all tensors of ``path``; a missing file raises :class:`WeightsNotFoundError`, a
    damaged one (truncated, empty, garbage, a directory) a :class:`BrainreconError` naming it."""
    path = Path(path)
    if not path.exists():
        raise WeightsNotFoundError(
            f"The {what} weights file {path} does not exist; the saved decoder directory is "
            f"incomplete. Save the decoder again, or point to a complete directory."
        )
    return load_safetensors(path, fix=fix)


def _key_list(keys: list[str]) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:_SHOWN])
    return shown + (f" (and {len(keys) - _SHOWN} more)" if len(keys) > _SHOWN else "")


def check_state_dict(module: nn.Module, state: dict[str, torch.Tensor], what: str,
                     source: str = "", ignore_prefix: str | None = None, fix: str = ARCHITECTURE_FIX) -> None:
    """Raise :class:`StateDictMismatchError` naming missing and unexpected keys, then every
    tensor whose shape or dtype differs from the module's (:func:`brainrecon.io.check_arrays`)."""
    expected = {k: v for k, v in module.state_dict().items()
                if not (ignore_prefix and k.startswith(ignore_prefix))}
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    where = f" from {source}" if source else ""
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys: {_key_list(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_key_list(unexpected)}")
        raise StateDictMismatchError(f"Cannot load the {what} weights{where}: " + "; ".join(parts) + f"; {fix}.")
    try:
        check_arrays(source or what, state,
                     {k: (tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in expected.items()},
                     fix=fix)
    except BrainreconError as exc:
        raise StateDictMismatchError(f"Cannot load the {what} weights: {exc}") from None


def empty_init(factory):
    """Call ``factory()`` with parameters created on the meta device (no memory, no random init).

    The module must then be filled by a strict load with ``assign=True``; buffers are real.
    """
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        return factory()


def load_state_dict_strict(module: nn.Module, state: dict[str, torch.Tensor], what: str,
                           source: str = "", ignore_prefix: str | None = None,
                           assign: bool = False, fix: str = ARCHITECTURE_FIX) -> None:
    """Check ``state`` against ``module`` (see :func:`check_state_dict`), then load it.

    ``assign=True`` replaces the module's tensors by the loaded ones (for modules built with
    :func:`empty_init`).
    """
    check_state_dict(module, state, what, source, ignore_prefix, fix=fix)
    if ignore_prefix:
        # Keys under ignore_prefix belong to a sub-module loaded separately: load the rest
        # into each child so that every key of the file is still checked above.
        own = module.state_dict()
        merged = {k: (state[k] if k in state else own[k]) for k in own}
        module.load_state_dict(merged, strict=True, assign=assign)
    else:
        module.load_state_dict(state, strict=True, assign=assign)


def load_safetensors_strict(module: nn.Module, path: str | os.PathLike, what: str,
                            ignore_prefix: str | None = None, assign: bool = False,
                            fix: str = SAVED_FIX) -> None:
    """Load a safetensors file into ``module`` with strict key, shape and dtype checks."""
    state = read_safetensors(path, what, fix=fix)
    load_state_dict_strict(module, state, what, source=str(path), ignore_prefix=ignore_prefix,
                           assign=assign, fix=fix)
