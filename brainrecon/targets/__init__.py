"""Target spaces: what a decoder predicts for each image.

``pixels``
    Each image downsampled (default 32×32×3, float in [0, 1]); decoded pixels are upsampled
    back for evaluation. Needs no weights.
``ipadapter``
    The 16×768 image-prompt tokens of IP-Adapter Plus (SD 1.5), turned into images by
    Stable Diffusion with IP-Adapter (:mod:`brainrecon.targets.ipadapter`,
    :mod:`brainrecon.generate`).
``clip``
    CLIP ViT-L/14 image hidden states (257×768) and caption text states (77×768), stacked
    (334×768) and normalised as BrainGuard's and MindBridge's ``Clipper`` does; turned into images
    by Versatile Diffusion (:mod:`brainrecon.targets.clip_states`, :mod:`brainrecon.generate.versatile`).

Targets are computed once per image and cached on disk keyed by image id
(:class:`~brainrecon.targets.cache.IdKeyedCache`): under ``DATA_DIR/targets/`` for prepared
data, under ``$BRAINRECON_CACHE`` (default ``~/.cache/brainrecon``) otherwise.
"""

from __future__ import annotations

import abc
import hashlib
import json
import os
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from brainrecon.errors import BrainreconError, DataError
from brainrecon.plugins import Registry
from brainrecon.targets.cache import IdKeyedCache, default_cache_root


class TargetSpace(abc.ABC):
    """A target space. Subclasses set :attr:`name` and implement :meth:`compute`."""

    name: ClassVar[str] = ""
    #: Storage dtype of the cache.
    cache_dtype: ClassVar[str] = "float32"

    @property
    @abc.abstractmethod
    def shape(self) -> tuple[int, ...]:
        """Shape of one image's target."""

    @abc.abstractmethod
    def compute(self, images: np.ndarray) -> np.ndarray:
        """Targets of uint8 images of shape (n, H, W, 3) -> float32 (n, *shape)."""

    def config(self) -> dict[str, Any]:
        """What identifies the computed values (stored with the cache)."""
        return {"name": self.name}

    def _compute_rows(self, split, subject: int, rows: np.ndarray) -> np.ndarray:
        """Targets of rows ``rows`` of ``split`` for ``subject`` (default: :meth:`compute` of its images)."""
        return self.compute(split.images(subject, rows))

    def to_images(self, predictions: np.ndarray, image_size: int | None = None, **kwargs: Any) -> np.ndarray:
        """Turn predictions of shape (n, *shape) into uint8 images (n, H, W, 3)."""
        raise BrainreconError(
            f"Predictions in the {self.name!r} target space need a generator to become images; "
            f"see brainrecon.generate."
        )

    # -------------------------------------------------------------- caching
    def cache_dir(self, split) -> Path:
        spec = split.dataset.spec
        key = hashlib.sha256(json.dumps(self.config(), sort_keys=True).encode()).hexdigest()[:12]
        path = spec.get("path")
        if path and Path(path).is_dir() and os.access(path, os.W_OK):
            return Path(path) / "targets" / f"{self.name}-{key}"
        data_key = hashlib.sha256(
            json.dumps({k: v for k, v in spec.items() if k != "subjects"}, sort_keys=True,
                       default=str).encode()
        ).hexdigest()[:12]
        return default_cache_root() / "targets" / f"{spec.get('kind', 'data')}-{data_key}" / f"{self.name}-{key}"

    def load(self, split, subject: int, progress: bool = True) -> np.ndarray:
        """Targets of ``split``'s images for ``subject``, float32 (n, *shape), from the cache.

        Missing values are computed from the images (batched, with a progress bar) and stored.
        """
        ids = split.ids(subject)
        order = np.argsort(ids, kind="stable")
        cache = IdKeyedCache(self.cache_dir(split), self.shape, self.cache_dtype, self.config())
        # The id -> row lookup for this subject's split.
        row_of = {int(i): r for r, i in enumerate(ids)}

        def compute(batch_ids: np.ndarray) -> np.ndarray:
            rows = np.array([row_of[int(i)] for i in batch_ids])
            return self._compute_rows(split, subject, rows)

        values = cache.get_or_compute(ids[order], compute, progress=progress,
                                      desc=f"{self.name} targets, subject {subject}")
        out = np.empty_like(values, dtype=np.float32)
        out[order] = values
        return out


class PixelTarget(TargetSpace):
    """Low-resolution pixels: images downsampled to ``size``×``size``×3, float in [0, 1].

    Downsampling averages each output pixel's area of the input (``mode="area"``), so the
    target is the image's low spatial frequencies — a weight-free baseline that PixCorr and SSIM reward.
    """

    name = "pixels"

    def __init__(self, size: int = 32):
        if int(size) < 2:
            raise DataError(f"Pixel target size must be at least 2, got {size}.")
        self.size = int(size)

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.size, self.size, 3)

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "size": self.size}

    def compute(self, images: np.ndarray) -> np.ndarray:
        import torch
        import torch.nn.functional as F

        x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
        y = F.interpolate(x, size=(self.size, self.size), mode="area")
        return y.clamp(0, 1).permute(0, 2, 3, 1).numpy().astype(np.float32)

    def to_images(self, predictions: np.ndarray, image_size: int | None = None, **kwargs: Any) -> np.ndarray:
        import torch
        import torch.nn.functional as F

        pred = np.asarray(predictions, dtype=np.float32).reshape((-1,) + self.shape)
        size = int(image_size or self.size)
        x = torch.from_numpy(pred).permute(0, 3, 1, 2).clamp(0, 1)
        if size != self.size:
            x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)
        return (x.permute(0, 2, 3, 1).numpy() * 255 + 0.5).astype(np.uint8)


#: The target-space registry (:mod:`brainrecon.plugins`): name -> "module:Class";
#: ``ipadapter`` is imported only when used (it needs diffusers).
TARGETS = Registry("brainrecon.targets", {
    "pixels": "brainrecon.targets:PixelTarget",
    "ipadapter": "brainrecon.targets.ipadapter:IPAdapterTarget",
    "clip": "brainrecon.targets.clip_states:ClipTarget",
}, kind="target")
#: Entry-point group through which other packages add target spaces.
ENTRY_POINT_GROUP = TARGETS.group


def available_targets() -> list[str]:
    """Names of the target spaces (built-in and plugins), sorted."""
    return TARGETS.available()


def get_target(name: str, **options: Any) -> TargetSpace:
    """Build the target space ``name`` (``"pixels"``, ``"ipadapter"`` or a plugin's)."""
    return TARGETS.load(name)(**options)


__all__ = ["IdKeyedCache", "PixelTarget", "TargetSpace", "available_targets", "get_target"]
