"""The ground-truth feature cache: features of the ground-truth images per network, on disk.

Entries are keyed by a hash of the ground-truth pixels, the variant, the network's weights and
the recipe version, so a second decoder evaluated on the same test set only runs the networks
on its own images. An entry that fails any check is recomputed (:class:`DamagedCacheWarning`),
never trusted.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from brainrecon.errors import DamagedCacheWarning
from brainrecon.eval.extractors import FeatureNetwork
from brainrecon.eval.preprocess import _ImageSource, _take

# Bump when a preprocessing change would alter cached ground-truth features.
_RECIPE_VERSION = 1


def _default_cache_dir() -> Path:
    if os.environ.get("BRAINRECON_CACHE"):
        return Path(os.environ["BRAINRECON_CACHE"]).expanduser() / "eval"
    return Path("~/.cache/brainrecon/eval").expanduser()


def _content_hash(src: _ImageSource, batch_size: int) -> str:
    h = hashlib.sha256()
    h.update(f"{src.data.shape}|{src.dtype}|{src.layout}".encode())
    for start in range(0, src.n, batch_size):
        idx = np.arange(start, min(start + batch_size, src.n))
        h.update(np.ascontiguousarray(_take(src.data, idx)).tobytes())
    return h.hexdigest()


def _cache_key(gt_hash: str, variant: str, net: FeatureNetwork, n_net: int) -> str:
    return json.dumps(
        {"gt": gt_hash, "variant": variant, "net": net.name, "weights": net.cache_key,
         "metrics": net.metrics, "recipe": _RECIPE_VERSION, "images": n_net},
        sort_keys=True,
    )


def _cache_file(cache_root: Path, key: str, net: FeatureNetwork) -> Path:
    return cache_root / f"gt-{net.name}-{hashlib.sha256(key.encode()).hexdigest()[:24]}.safetensors"


def _features_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _load_cached(path: Path, key: str, net: FeatureNetwork, n: int, device) -> dict[str, torch.Tensor] | None:
    """The cached ground-truth features, or None. An entry that fails any check (unreadable,
    written for another key, other metrics or image count, contents that do not match the
    digest written with them) is recomputed, with a :class:`DamagedCacheWarning`; never trusted."""
    if not path.exists():
        return None
    from safetensors import safe_open

    def damaged(reason: str) -> None:
        warnings.warn(f"Ground-truth feature cache entry {path} is damaged ({reason}); its features are "
                      f"recomputed and the entry rewritten.", DamagedCacheWarning, stacklevel=3)

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own SafetensorError, or OSError
        damaged(f"unreadable: {exc}")
        return None
    if meta.get("key") != key:
        damaged("written for other ground truth, weights or settings" if "key" in meta
                else "no key recorded: written by an older brainrecon")
        return None
    if set(tensors) != set(net.metrics) or any(t.ndim == 0 or t.shape[0] != n for t in tensors.values()):
        damaged(f"holds {sorted(tensors)} for {sorted({int(t.shape[0]) if t.ndim else 0 for t in tensors.values()})} "
                f"images, expected {sorted(net.metrics)} for {n}")
        return None
    if meta.get("sha256") != _features_digest(tensors):
        damaged("its contents do not match the digest written with them")
        return None
    return {m: t.to(device) for m, t in tensors.items()}


def _save_cached(path: Path, key: str, feats: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    from brainrecon.io import atomic_path

    tensors = {m: t.detach().cpu().contiguous() for m, t in feats.items()}
    try:
        if path.is_dir():
            raise IsADirectoryError(f"{path} is a directory")
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata={"key": key, "sha256": _features_digest(tensors)})
    except OSError as exc:  # the scores are right; only the next evaluation is slower
        warnings.warn(DamagedCacheWarning(f"Ground-truth feature cache entry {path} could not be written ({exc}); "
                                          f"delete it or pass another cache_dir.", parameters=("cache_dir",)),
                      stacklevel=3)
