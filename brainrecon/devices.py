"""Choosing the torch device: one rule for every module that runs networks."""

from __future__ import annotations

from brainrecon.errors import DataError


def resolve_device(device=None):
    """The ``torch.device`` for a user's ``device`` choice.

    Parameters
    ----------
    device : str, torch.device or None
        ``"auto"`` / None (CUDA when a device is visible, else the CPU), ``"cpu"``,
        ``"cuda"``, ``"cuda:N"`` or ``"mps"``.

    Raises
    ------
    DataError
        For an unknown name, or when CUDA is asked for and none is visible.
    """
    import torch

    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise DataError(
            f"Unknown device {device!r}; valid: 'auto', 'cpu', 'cuda', 'cuda:N', 'mps'."
        ) from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DataError(
            f"device={str(device)!r} was requested but no CUDA device is visible to torch; "
            f"use device='cpu' or device='auto'.", parameters=("device",)
        )
    return dev
