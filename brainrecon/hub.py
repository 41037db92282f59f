"""Where downloaded model weights live, and whether a missing one may be downloaded now.

Shared by every module that loads pretrained weights (metric networks, IP-Adapter, Stable
Diffusion), so that one switch turns downloads off everywhere.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

_TRUE = {"1", "true", "yes", "on"}


def downloads_allowed() -> bool:
    """Whether a missing weight file may be downloaded now (opt-in).

    Returns
    -------
    bool
        True only when ``BRAINRECON_ALLOW_DOWNLOADS`` is set to a true value (what
        ``brainrecon weights --download`` and ``evaluate --download`` do) and neither
        ``BRAINRECON_OFFLINE`` nor ``HF_HUB_OFFLINE`` is set; False otherwise, so no
        command opens a connection to fetch weights unless asked.
    """
    for var in ("BRAINRECON_OFFLINE", "HF_HUB_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in _TRUE:
            return False
    return os.environ.get("BRAINRECON_ALLOW_DOWNLOADS", "").strip().lower() in _TRUE


@contextlib.contextmanager
def hub_offline_unless_allowed():
    """Within the block, huggingface_hub makes no request unless :func:`downloads_allowed`.

    ``local_files_only=True`` is not enough: huggingface_hub also fetches side data (its
    agent registry) from the hub unless its import-time ``HF_HUB_OFFLINE`` constant is set,
    so the constant is switched on for the block and restored afterwards.
    """
    if downloads_allowed():
        yield
        return
    from huggingface_hub import constants

    old = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = old


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
