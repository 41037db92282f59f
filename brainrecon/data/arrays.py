"""The arrays a :class:`~brainrecon.data.dataset.Dataset` holds for one subject in one split
(:class:`SplitArrays`), the single trials behind its averaged rows (:class:`Trials`), the lazy
array-likes that read them (:class:`TrialAverages`: per-image averages of trials; :class:`RowSubset`:
some rows of an array, what the validation split holds), and the check of one split's arrays."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from brainrecon.errors import DataError

__all__ = ["RowSubset", "SplitArrays", "TrialAverages", "Trials", "trial_summary", "validate_split_arrays"]


@dataclass
class Trials:
    """The single trials of one subject in one split.

    Attributes
    ----------
    voxels : array-like of shape (n_trials, n_voxels)
        One row per trial (may be lazy: HDF5 rows, tar members).
    rows : int array of shape (n_trials,)
        Row of the trial's image in the split (its image id is ``split.ids(subject)[rows]``).
    repetition : int array of shape (n_trials,)
        0-based repetition index of the trial among its image's trials (chronological where the
        source says when each trial happened).
    trial : int array of shape (n_trials,)
        Global NSD trial number (0-based, chronological) where the source gives it, else -1.
    """

    voxels: Any
    rows: np.ndarray
    repetition: np.ndarray
    trial: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.rows = np.asarray(self.rows, dtype=np.int64)
        self.repetition = np.asarray(self.repetition, dtype=np.int64)
        n = len(self.rows)
        self.trial = (np.full(n, -1, dtype=np.int64) if self.trial is None
                      else np.asarray(self.trial, dtype=np.int64))
        shape = tuple(np.shape(self.voxels))
        if len(shape) != 2 or shape[0] != n or self.repetition.shape != (n,) or self.trial.shape != (n,):
            raise DataError(f"Trials: voxels of shape {shape}, {n} image rows, {self.repetition.shape[0]} "
                            f"repetition indices and {self.trial.shape[0]} trial numbers do not match.")

    def __len__(self) -> int:
        return len(self.rows)


class TrialAverages:
    """Per-image averages of single trials, read lazily: ``shape`` (n_images, V); indexing reads
    only the trials of the requested images; the whole array is computed once, streaming the
    trials in row order (so an HDF5 source is read sequentially), then kept."""

    def __init__(self, trials: Trials, n_images: int, chunk: int = 512):
        self.trials = trials
        self.n_images = int(n_images)
        self.shape = (self.n_images, int(np.shape(trials.voxels)[1]))
        self.dtype = np.dtype(np.float32)
        self.ndim = 2
        self.chunk = int(chunk)
        self.counts = np.bincount(trials.rows, minlength=self.n_images)
        if self.counts.shape[0] != self.n_images or (self.counts == 0).any():
            missing = np.flatnonzero(self.counts[:self.n_images] == 0)[:5].tolist()
            raise DataError(f"Trials: image rows {missing} have no trial; every image needs at least one.")
        self._full: np.ndarray | None = None

    def __len__(self) -> int:
        return self.n_images

    def _average(self, trial_index: np.ndarray, image_rows: np.ndarray, out_rows: np.ndarray,
                 out: np.ndarray, progress: bool = False) -> None:
        # Read trials in increasing source order (HDF5 needs it; disks like it).
        order = np.argsort(trial_index, kind="stable")
        trial_index, out_rows = trial_index[order], out_rows[order]
        steps = range(0, len(trial_index), self.chunk)
        if progress:
            from tqdm.auto import tqdm

            from brainrecon.progress import bar_disabled
            steps = tqdm(steps, desc="averaging single trials", disable=bar_disabled(True))
        for start in steps:
            block = np.asarray(self.trials.voxels[trial_index[start:start + self.chunk]], dtype=np.float32)
            np.add.at(out, out_rows[start:start + self.chunk], block)
        out /= self.counts[image_rows][:, None].astype(np.float32)

    def __getitem__(self, index: Any) -> np.ndarray:
        if self._full is not None:
            return self._full[index]
        if isinstance(index, (int, np.integer)):
            return self[np.array([int(index)])][0]
        rows = np.arange(self.n_images)[index]
        rows = np.atleast_1d(rows)
        if len(rows) == self.n_images and np.array_equal(rows, np.arange(self.n_images)):
            return np.asarray(self)
        position = {int(r): k for k, r in enumerate(np.unique(rows))}
        uniq = np.array(sorted(position), dtype=np.int64)
        picked = np.flatnonzero(np.isin(self.trials.rows, uniq))
        out = np.zeros((len(uniq), self.shape[1]), dtype=np.float32)
        out_rows = np.array([position[int(r)] for r in self.trials.rows[picked]], dtype=np.int64)
        self._average(picked, uniq, out_rows, out)
        return out[np.searchsorted(uniq, rows)]

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        if self._full is None:
            out = np.zeros(self.shape, dtype=np.float32)
            self._average(np.arange(len(self.trials)), np.arange(self.n_images), self.trials.rows.copy(), out,
                          progress=len(self.trials) > 20 * self.chunk)
            out.setflags(write=False)
            self._full = out
        return self._full if dtype is None or np.dtype(dtype) == self._full.dtype else self._full.astype(dtype)


class RowSubset:
    """Rows ``rows`` of an array-like, read lazily (what ``dataset.validation`` holds)."""

    def __init__(self, source: Any, rows: np.ndarray):
        self.source = source
        self.rows = np.asarray(rows, dtype=np.int64)
        self.shape = (len(self.rows),) + tuple(np.shape(source)[1:])
        self.dtype = getattr(source, "dtype", np.asarray(source[:0]).dtype)
        self.ndim = len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index: Any) -> np.ndarray:
        if isinstance(index, (int, np.integer)):
            return np.asarray(self.source[int(self.rows[index])])
        picked = np.atleast_1d(self.rows[index])
        order = np.argsort(picked, kind="stable")
        uniq, inverse = np.unique(picked[order], return_inverse=True)
        block = np.asarray(self.source[uniq]) if len(uniq) else np.asarray(self.source[0:0])
        out = np.empty((len(picked),) + block.shape[1:], dtype=block.dtype)
        out[order] = block[inverse]
        return out

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        arr = self[np.arange(self.shape[0])]
        return arr if dtype is None else arr.astype(dtype)


@dataclass
class SplitArrays:
    """The arrays of one subject in one split. Array-likes may be lazy (memmap, HDF5)."""

    voxels: Any
    ids: np.ndarray
    images: Any = None
    captions: Any = None
    surfaces: Any = None
    #: Optional callable voxels (n, V) -> surfaces (n, H, W), used when ``surfaces`` is None.
    surface_fn: Callable[[np.ndarray], np.ndarray] | None = None
    #: Optional single trials behind ``voxels`` (:class:`Trials`).
    trials: Trials | None = None

    def __post_init__(self) -> None:
        self.ids = np.asarray(self.ids, dtype=np.int64)


def validate_split_arrays(arrays: SplitArrays, subject: int, split: str) -> None:
    """Check one subject's arrays in one split: 2-D voxels, one id, image, caption and surface per row,
    single trials covering every image, images of shape (n, H, W, 3); a :class:`DataError` otherwise."""
    shape = np.shape(arrays.voxels)
    if len(shape) != 2:
        raise DataError(
            f"Subject {subject} ({split}): voxels must be 2-D (n_images, n_voxels), got shape {shape}."
        )
    n = shape[0]
    if n == 0:
        raise DataError(f"Subject {subject}: the {split} split is empty (0 rows).")
    if arrays.ids.shape != (n,):
        raise DataError(
            f"Subject {subject} ({split}): {n} voxel rows but {arrays.ids.shape[0]} image ids."
        )
    for field_name in ("images", "captions", "surfaces"):
        value = getattr(arrays, field_name)
        if value is not None and np.shape(value)[0] != n:
            raise DataError(
                f"Subject {subject} ({split}): {n} voxel rows but {np.shape(value)[0]} {field_name}; "
                f"the splits are mismatched."
            )
    if arrays.trials is not None:
        t = arrays.trials
        if np.shape(t.voxels)[1] != shape[1]:
            raise DataError(f"Subject {subject} ({split}): single trials have {np.shape(t.voxels)[1]} voxels but "
                            f"the averages have {shape[1]}.")
        if len(t) and (t.rows.min() < 0 or t.rows.max() >= n or len(np.unique(t.rows)) != n):
            raise DataError(f"Subject {subject} ({split}): the single trials' image rows must cover every one of "
                            f"the {n} images and no other.")
    if arrays.images is not None:
        ishape = np.shape(arrays.images)
        if len(ishape) != 4 or ishape[-1] != 3:
            raise DataError(
                f"Subject {subject} ({split}): images must have shape (n, H, W, 3), got {ishape}."
            )


def trial_summary(arrays: SplitArrays) -> dict[str, Any] | None:
    """Counts of one split's single trials (trials, images, images per number of repetitions), or None."""
    t = arrays.trials
    if t is None:
        return None
    per_image = np.bincount(t.rows, minlength=int(np.shape(arrays.voxels)[0]))
    hist = np.bincount(per_image)
    return {"n_trials": int(len(t)), "n_images": int(len(per_image)),
            "repetitions": {str(k): int(v) for k, v in enumerate(hist) if v}}
