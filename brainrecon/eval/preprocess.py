"""Evaluation preprocessing: image sets in any layout, checked, put in ground-truth order by
id, and resized and normalised as each recipe does (:mod:`brainrecon.eval.harness` describes
the two recipes)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from brainrecon.errors import DataError
from brainrecon.eval.extractors import NETWORK_METRICS, FeatureNetwork
from brainrecon.targets.clip import CLIP_MEAN, CLIP_STD

_METRIC_NETWORK = {m: net for net, ms in NETWORK_METRICS.items() for m in ms}
# MindEye's per-network resize (shorter side; inputs are square by then), Reconstruction_Metrics.py.
_MINDEYE_SIZE = {"alexnet": 256, "inception": 342, "clip": 224, "effnet": 255, "swav": 224}
_BD_SIZE = 224
_LOW_LEVEL_SIZE = 425
_BASE_SIZE = 256
_IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
_CLIP = (CLIP_MEAN, CLIP_STD)
# Float images may overshoot [0, 1] by rounding only; anything beyond is a real range error.
_RANGE_TOL = 1e-5


# ============================================================================ input checks


class _ImageSource:
    """Batched, validated access to one image set in any layout (lazy arrays stay lazy)."""

    def __init__(self, images, which: str):
        if isinstance(images, torch.Tensor):
            images = images.detach().cpu().numpy()
        if not hasattr(images, "shape") or not hasattr(images, "__getitem__"):
            images = np.asarray(images)
        self.data = images
        self.which = which
        shape = tuple(images.shape)
        if len(shape) != 4:
            raise DataError(
                f"{which} images must have shape (n, H, W, 3) or (n, 3, H, W); got shape {shape}."
            )
        if shape[-1] == 3:
            self.layout = "hwc"
            self.size = shape[1:3]
        elif shape[1] == 3:
            self.layout = "chw"
            self.size = shape[2:4]
        else:
            raise DataError(
                f"{which} images must be RGB with shape (n, H, W, 3) or (n, 3, H, W); got shape {shape}."
            )
        self.dtype = np.dtype(images.dtype)
        if self.dtype != np.uint8 and not np.issubdtype(self.dtype, np.floating):
            raise DataError(
                f"{which} images have dtype {self.dtype}; pass uint8 (0-255) or float images in [0, 1]."
            )
        self.n = shape[0]

    def raw(self, index: np.ndarray) -> np.ndarray:
        """Images at ``index`` as HWC numpy (uint8 or float), checked."""
        block = _take(self.data, index)
        block = np.asarray(block)
        if self.layout == "chw":
            block = block.transpose(0, 2, 3, 1)
        if block.dtype != np.uint8:
            bad = ~np.isfinite(block)
            if bad.any():
                i = int(index[np.argmax(bad.reshape(len(block), -1).any(axis=1))])
                raise DataError(
                    f"{self.which} images contain non-finite values (NaN or inf), first in image {i}; "
                    "fix or drop those images."
                )
            lo, hi = float(block.min()), float(block.max())
            if lo < -_RANGE_TOL or hi > 1 + _RANGE_TOL:
                per = block.reshape(len(block), -1)
                i = int(index[np.argmax((per.min(axis=1) < -_RANGE_TOL) | (per.max(axis=1) > 1 + _RANGE_TOL))])
                raise DataError(
                    f"{self.which} images are float with values outside [0, 1] (min {lo:.4g}, max {hi:.4g}; "
                    f"first in image {i}). Pass uint8 images, or scale float images to [0, 1] "
                    "(divide 0-255 values by 255; clip decoder outputs)."
                )
            block = np.clip(block, 0.0, 1.0).astype(np.float32, copy=False)
        return block

    def tensor(self, index: np.ndarray, device) -> torch.Tensor:
        """Images at ``index`` as float32 (B, 3, H, W) in [0, 1] on ``device``."""
        block = np.ascontiguousarray(self.raw(index))
        if not block.flags.writeable:  # read-only memory maps; torch wants writable memory
            block = block.copy()
        t = torch.from_numpy(block).to(device)
        t = t.permute(0, 3, 1, 2)
        if t.dtype == torch.uint8:
            return t.float().div_(255.0)
        return t.float()


def _take(data, index: np.ndarray):
    """``data[index]`` that also works for HDF5 datasets (which need increasing indices)."""
    if len(index) and np.all(np.diff(index) == 1):
        return data[int(index[0]) : int(index[-1]) + 1]
    if isinstance(data, np.ndarray):
        return data[index]
    order = np.argsort(index, kind="stable")
    block = np.asarray(data[np.sort(index)])
    out = np.empty_like(block)
    out[order] = block
    return out


def _align_ids(gt_ids, rec_ids, n_gt: int, n_rec: int) -> tuple[np.ndarray, bool]:
    """Index into the reconstructions that puts them in ground-truth order."""
    if n_gt != n_rec:
        raise DataError(
            f"Ground truth has {n_gt} images but there are {n_rec} reconstructions; "
            "evaluate the same test set on both sides."
        )
    identity = np.arange(n_rec)
    if gt_ids is None or rec_ids is None:
        return identity, False
    gt_ids = np.asarray(gt_ids).ravel()
    rec_ids = np.asarray(rec_ids).ravel()
    for name, ids, n in (("gt_ids", gt_ids, n_gt), ("rec_ids", rec_ids, n_rec)):
        if len(ids) != n:
            raise DataError(f"{name} has {len(ids)} entries for {n} images; give one id per image.")
        uniq, counts = np.unique(ids, return_counts=True)
        if (counts > 1).any():
            raise DataError(f"{name} contains duplicate id {uniq[np.argmax(counts > 1)]}; ids must be unique.")
    if np.array_equal(gt_ids, rec_ids):
        return identity, True
    rec_pos = {int(v): i for i, v in enumerate(rec_ids)}
    missing = [int(v) for v in gt_ids if int(v) not in rec_pos]
    if missing:
        first = int(np.argmax(gt_ids != rec_ids))
        extra = [int(v) for v in rec_ids if int(v) not in set(map(int, gt_ids))]
        raise DataError(
            f"Image ids differ: first difference at position {first} (ground truth id {int(gt_ids[first])}, "
            f"reconstruction id {int(rec_ids[first])}); ground-truth id {missing[0]} has no reconstruction "
            f"and reconstruction id {extra[0]} is not in the ground truth ({len(missing)} ids differ). "
            "Evaluate reconstructions of the same test images."
        )
    return np.array([rec_pos[int(v)] for v in gt_ids]), True


# ============================================================================ preprocessing


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """MindEye's tensor ``Resize``: bilinear, antialias off, square output."""
    if tuple(x.shape[-2:]) == (size, size):
        return x
    import torchvision.transforms.functional as TF

    return TF.resize(x, [size, size], interpolation=TF.InterpolationMode.BILINEAR, antialias=False)


def _normalise(x: torch.Tensor, which: str) -> torch.Tensor:
    mean, std = _CLIP if which == "clip" else _IMAGENET
    mean = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def _pil_resize(block: np.ndarray, size_wh: tuple[int, int], resample) -> np.ndarray:
    """Pillow resize of HWC images, uint8 or float; returns float32 HWC (values /255 for uint8)."""
    out = np.empty((len(block), size_wh[1], size_wh[0], 3), dtype=np.float32)
    for i, img in enumerate(block):
        if img.dtype == np.uint8:
            out[i] = np.asarray(Image.fromarray(img).resize(size_wh, resample), dtype=np.float32) / 255.0
        else:
            # Pillow has no float RGB mode; resize each channel as a 32-bit float image.
            for c in range(3):
                ch = Image.fromarray(np.ascontiguousarray(img[..., c], dtype=np.float32))
                out[i, ..., c] = np.asarray(ch.resize(size_wh, resample), dtype=np.float32)
    return out


def _hwc_to_float(block: np.ndarray) -> np.ndarray:
    return block.astype(np.float32) / 255.0 if block.dtype == np.uint8 else block.astype(np.float32)


def _net_input_size(net: FeatureNetwork, variant: str) -> int:
    if variant == "braindiffuser":
        return _BD_SIZE
    return _MINDEYE_SIZE[_METRIC_NETWORK[net.metrics[0]]]


def _net_norm(net: FeatureNetwork) -> str:
    return "clip" if _METRIC_NETWORK[net.metrics[0]] == "clip" else "imagenet"
