"""Where downloaded model weights live, and whether a missing one may be downloaded now.

Shared by every module that loads pretrained weights (metric networks, IP-Adapter, Stable
Diffusion), so that one switch turns downloads off everywhere.
"""

from __future__ import annotations

import os
from pathlib import Path

_TRUE = {"1", "true", "yes", "on"}


def downloads_allowed() -> bool:
    """Whether a missing weight file may be downloaded now.

    Returns
    -------
    bool
        False when ``BRAINRECON_OFFLINE`` or ``HF_HUB_OFFLINE`` is set to a true value,
        or when running under pytest (tests never download); True otherwise.
    """
    for var in ("BRAINRECON_OFFLINE", "HF_HUB_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in _TRUE:
            return False
    return "PYTEST_CURRENT_TEST" not in os.environ


def hf_hub_cache() -> Path:
    """The Hugging Face hub cache directory, read from the environment at call time.

    (huggingface_hub freezes its constants at import, so a test or a user who sets
    ``HF_HOME`` later would otherwise be ignored.)
    """
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)
