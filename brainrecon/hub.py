"""Where downloaded model weights live, whether a missing one may be downloaded now, and what
an ``hf://`` address names.

Shared by every module that loads pretrained weights (metric networks, IP-Adapter, Stable
Diffusion), so that one switch turns downloads off everywhere.

``hf://owner/name`` or ``hf://owner/name@revision`` is accepted wherever a run or a saved
decoder is (``load_decoder``, ``Run.open``, ``brainrecon predict`` …). It resolves through the
Hugging Face cache as the hub does (``refs/<revision>``); once cached it works offline, and
offline (``HF_HUB_OFFLINE=1``, or downloads not allowed) only the cache is used.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

from brainrecon.errors import BrainreconError

HF_PREFIX = "hf://"

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


def hf_cache_snapshot(repo_id: str) -> Path:
    """A snapshot folder of ``repo_id`` in the Hugging Face cache layout, where ``brainrecon
    weights --download`` puts a repository's files (``refs/main`` is written on fetch)."""
    return hf_hub_cache() / ("models--" + repo_id.replace("/", "--")) / "snapshots" / "main"


def is_hub_address(value: Any) -> bool:
    return isinstance(value, str) and value.startswith(HF_PREFIX)


def _parse(address: str) -> tuple[str, str | None]:
    body = address[len(HF_PREFIX):]
    repo, _, revision = body.partition("@")
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise BrainreconError(f"{address!r} is not a hub address; write hf://owner/name or hf://owner/name@revision.")
    return repo, revision or None


def resolve_hub_address(address: str) -> Path:
    """The local snapshot folder of ``hf://owner/name[@revision]``, from the Hugging Face cache
    (downloaded into it first only when downloads are allowed and the hub is not offline)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    repo, revision = _parse(address)
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes") or not downloads_allowed()
    try:
        with hub_offline_unless_allowed():
            path = snapshot_download(repo, revision=revision, local_files_only=offline, cache_dir=hf_hub_cache())
    except LocalEntryNotFoundError:
        raise BrainreconError(
            f"{address} is not in the Hugging Face cache ({hf_hub_cache()}) and downloads are off. "
            "Allow them for this command (BRAINRECON_ALLOW_DOWNLOADS=1, HF_HUB_OFFLINE unset), or fetch it "
            f"elsewhere with `huggingface-cli download {repo}` and copy the cache."
        ) from None
    except Exception as exc:  # noqa: BLE001 - hub errors of many kinds become one line
        raise BrainreconError(f"could not fetch {address}: {type(exc).__name__}: {exc}") from exc
    return Path(path)
