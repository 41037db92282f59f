"""One dataset type for the whole toolkit.

A :class:`Dataset` holds, per subject and per split (``train`` / ``test``):

- ``voxels``: responses, array of shape (n, n_voxels) (memory-mapped where the source allows);
- ``ids``: one integer image id per row — the 0-based NSD 73k id where it is known, so that
  images, captions and metrics align across subjects and projects;
- ``images``: uint8 (n, H, W, 3), read lazily (memory-mapped ``.npy``, HDF5, or generated on
  demand) — a full NSD stimulus set is never loaded whole;
- ``captions`` (optional): strings of shape (n, k);
- ``surfaces`` (optional): 2-D cortical surface maps of shape (n, H, W) (NeuroPictor's input).

Decoders receive a :class:`Split` (``dataset.train`` or ``dataset.test``). A fingerprint per
subject identifies the data and the split; runs record it and the leaderboard ranks only runs
with the same fingerprint.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from brainrecon.errors import DataError

SPLITS = ("train", "test")
NAN_POLICIES = ("error", "zero")


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

    def __post_init__(self) -> None:
        self.ids = np.asarray(self.ids, dtype=np.int64)


@dataclass
class Dataset:
    """Per-subject train/test data. See the module docstring.

    Parameters
    ----------
    subjects_data : dict
        ``subject -> {"train": SplitArrays, "test": SplitArrays}``.
    spec : dict
        JSON-able description from which :func:`brainrecon.data.dataset_from_spec` re-opens
        the same data (stored in run records).
    name : str
        Short human-readable name.
    """

    subjects_data: dict[int, dict[str, SplitArrays]]
    spec: dict[str, Any]
    name: str = "dataset"
    ids_are_nsd: bool = False
    _fingerprints: dict[int, str] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if not self.subjects_data:
            raise DataError("A dataset needs at least one subject.")
        self.subjects_data = {int(k): v for k, v in sorted(self.subjects_data.items())}
        for subject, splits in self.subjects_data.items():
            for split in SPLITS:
                if split not in splits:
                    raise DataError(f"Subject {subject} has no {split!r} split.")
                _validate_split_arrays(splits[split], subject, split)
            n_vox = {s: np.shape(splits[s].voxels)[1] for s in SPLITS}
            if n_vox["train"] != n_vox["test"]:
                raise DataError(
                    f"Subject {subject}: train has {n_vox['train']} voxels but test has "
                    f"{n_vox['test']}; both splits must come from the same ROI mask."
                )
        self.train = Split(self, "train")
        self.test = Split(self, "test")

    @property
    def subjects(self) -> list[int]:
        return list(self.subjects_data)

    def n_voxels(self, subject: int) -> int:
        return int(np.shape(self._get(subject, "train").voxels)[1])

    def _get(self, subject: int, split: str) -> SplitArrays:
        try:
            return self.subjects_data[int(subject)][split]
        except KeyError:
            raise DataError(
                f"Subject {subject} is not in this dataset ({self.name}); "
                f"available subjects: {self.subjects}."
            ) from None

    def select(self, subjects: Sequence[int]) -> "Dataset":
        """A dataset restricted to ``subjects`` (same arrays, no copy)."""
        subjects = [int(s) for s in subjects]
        for s in subjects:
            self._get(s, "train")
        spec = dict(self.spec, subjects=subjects)
        ds = Dataset(
            {s: self.subjects_data[s] for s in subjects},
            spec=spec,
            name=self.name,
            ids_are_nsd=self.ids_are_nsd,
        )
        ds._fingerprints = {s: f for s, f in self._fingerprints.items() if s in subjects}
        return ds

    def fingerprint(self, subject: int) -> str:
        """Hash of what identifies this subject's data and split (source, ids, shapes, content sample)."""
        subject = int(subject)
        if subject not in self._fingerprints:
            h = hashlib.sha256()
            # What other subjects were loaded beside this one does not change its data.
            source = {k: v for k, v in self.spec.items()
                      if k not in ("subjects", "path", "n_voxels", "subject_info")}
            h.update(json.dumps(source, sort_keys=True, default=str).encode())
            h.update(str(subject).encode())
            for split in SPLITS:
                arrays = self._get(subject, split)
                h.update(split.encode())
                h.update(np.ascontiguousarray(arrays.ids).tobytes())
                vox = arrays.voxels
                h.update(str(tuple(np.shape(vox))).encode())
                n = np.shape(vox)[0]
                rows = sorted({0, n // 2, n - 1})
                for row in rows:
                    h.update(np.ascontiguousarray(np.asarray(vox[row], dtype=np.float32)).tobytes())
                # Stored surface maps (NeuroPictor's input) are data of their own: decoders fitted
                # on different maps of the same voxels are not comparable.
                if arrays.surfaces is not None:
                    h.update(str(tuple(np.shape(arrays.surfaces))).encode())
                    for row in rows:
                        h.update(np.ascontiguousarray(
                            np.asarray(arrays.surfaces[row], dtype=np.float32)).tobytes())
            self._fingerprints[subject] = h.hexdigest()[:16]
        return self._fingerprints[subject]

    def info(self) -> dict[str, Any]:
        """A summary: per subject, counts, voxels, image size, what is present."""
        rows = {}
        for s in self.subjects:
            tr, te = self._get(s, "train"), self._get(s, "test")
            img_shape = tuple(np.shape(tr.images)[1:]) if tr.images is not None else None
            rows[s] = {
                "n_train": int(np.shape(tr.voxels)[0]),
                "n_test": int(np.shape(te.voxels)[0]),
                "n_voxels": self.n_voxels(s),
                "image_shape": img_shape,
                "captions": tr.captions is not None,
                "surfaces": tr.surfaces is not None or tr.surface_fn is not None,
                "fingerprint": self.fingerprint(s),
            }
        return {"name": self.name, "spec": self.spec, "ids_are_nsd": self.ids_are_nsd, "subjects": rows}

    def __repr__(self) -> str:
        return f"Dataset(name={self.name!r}, subjects={self.subjects})"


class Split:
    """One split (``"train"`` or ``"test"``) of a :class:`Dataset`, across its subjects.

    This is what :meth:`brainrecon.decoders.Decoder.fit` and ``predict`` receive.
    """

    def __init__(self, dataset: Dataset, name: str):
        if name not in SPLITS:
            raise DataError(f"Unknown split {name!r}; valid splits: 'train', 'test'.")
        self.dataset = dataset
        self.name = name

    def __repr__(self) -> str:
        return f"Split({self.name!r}, dataset={self.dataset.name!r}, subjects={self.subjects})"

    @property
    def subjects(self) -> list[int]:
        return self.dataset.subjects

    def _arrays(self, subject: int) -> SplitArrays:
        return self.dataset._get(subject, self.name)

    def n_images(self, subject: int) -> int:
        return int(np.shape(self._arrays(subject).voxels)[0])

    def ids(self, subject: int) -> np.ndarray:
        """Image ids, int64 array of shape (n,)."""
        return self._arrays(subject).ids

    def voxels(self, subject: int, nan_policy: str = "error") -> np.ndarray:
        """Responses as float32 of shape (n, n_voxels).

        Parameters
        ----------
        nan_policy : {"error", "zero"}
            What to do with NaN or infinite values: raise a :class:`DataError` naming how many
            and which subject, or replace them by 0.
        """
        if nan_policy not in NAN_POLICIES:
            raise DataError(f"Unknown nan_policy {nan_policy!r}; valid: 'error', 'zero'.")
        X = np.asarray(self._arrays(subject).voxels, dtype=np.float32)
        bad = ~np.isfinite(X)
        n_bad = int(bad.sum())
        if n_bad:
            if nan_policy == "error":
                rows = int(bad.any(axis=1).sum())
                raise DataError(
                    f"Subject {subject} ({self.name} split): {n_bad} voxel values are NaN or "
                    f"infinite, in {rows} of {X.shape[0]} rows. Fix the data, or pass "
                    f"nan_policy='zero' to replace them with 0.", parameters=("nan_policy",)
                )
            X = np.where(bad, np.float32(0), X)
        return X

    def images(self, subject: int, index: Any = None) -> np.ndarray:
        """Stimulus images as uint8 of shape (n, H, W, 3), read lazily.

        Parameters
        ----------
        index : slice, int array or None
            Rows to read (all when None).
        """
        source = self._arrays(subject).images
        if source is None:
            raise DataError(f"Subject {subject} ({self.name} split) has no images in this dataset.")
        if index is None:
            index = slice(None)
        if isinstance(index, (list, np.ndarray)):
            index = np.asarray(index, dtype=np.int64)
            # h5py needs increasing indices; read sorted, then restore the requested order.
            order = np.argsort(index, kind="stable")
            sorted_idx = index[order]
            uniq, inverse = np.unique(sorted_idx, return_inverse=True)
            block = _as_uint8_images(source[uniq] if len(uniq) else np.asarray(source[0:0]))
            out = np.empty((len(index),) + block.shape[1:], dtype=np.uint8)
            out[order] = block[inverse]
            return out
        return _as_uint8_images(source[index])

    def iter_images(self, subject: int, batch_size: int = 64):
        """Yield ``(start, images)`` batches of uint8 images, reading one batch at a time."""
        n = self.n_images(subject)
        for start in range(0, n, batch_size):
            yield start, self.images(subject, slice(start, min(n, start + batch_size)))

    def captions(self, subject: int) -> np.ndarray | None:
        """Captions as an array of str of shape (n, k), or None when the dataset has none."""
        caps = self._arrays(subject).captions
        return None if caps is None else np.asarray(caps)

    def surfaces(self, subject: int) -> np.ndarray | None:
        """2-D cortical surface maps, float32 of shape (n, H, W), or None."""
        arrays = self._arrays(subject)
        if arrays.surfaces is not None:
            return np.asarray(arrays.surfaces, dtype=np.float32)
        if arrays.surface_fn is not None:
            return arrays.surface_fn(self.voxels(subject, nan_policy="zero")).astype(np.float32)
        return None

    def fingerprint(self, subject: int) -> str:
        return self.dataset.fingerprint(subject)


def _as_uint8_images(block: Any) -> np.ndarray:
    arr = np.asarray(block)
    if arr.dtype == np.uint8:
        return arr
    # Brain-Diffuser stores stimuli as float64 in 0..255.
    return np.clip(np.rint(arr), 0, 255).astype(np.uint8)


def _validate_split_arrays(arrays: SplitArrays, subject: int, split: str) -> None:
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
    if arrays.images is not None:
        ishape = np.shape(arrays.images)
        if len(ishape) != 4 or ishape[-1] != 3:
            raise DataError(
                f"Subject {subject} ({split}): images must have shape (n, H, W, 3), got {ishape}."
            )


def from_arrays(
    subjects: Mapping[int, Mapping[str, Any]],
    *,
    name: str = "arrays",
    spec: dict[str, Any] | None = None,
    ids_are_nsd: bool = False,
) -> Dataset:
    """Build a dataset from in-memory (or memory-mapped) arrays.

    Parameters
    ----------
    subjects : mapping
        ``subject -> {"train_voxels", "test_voxels", "train_images", "test_images",
        optional "train_ids", "test_ids", "train_captions", "test_captions",
        "train_surfaces", "test_surfaces"}``. Missing ids become row positions (test ids
        0..n_test-1, shared across subjects; train ids offset per subject).
    """
    data: dict[int, dict[str, SplitArrays]] = {}
    for subject, arrays in subjects.items():
        subject = int(subject)
        splits = {}
        for split in SPLITS:
            key = f"{split}_voxels"
            if key not in arrays:
                raise DataError(f"Subject {subject}: {key!r} is missing.")
            n = np.shape(arrays[key])[0]
            ids = arrays.get(f"{split}_ids")
            if ids is None:
                ids = np.arange(n) if split == "test" else 1_000_000 * subject + np.arange(n)
            splits[split] = SplitArrays(
                voxels=arrays[key],
                ids=ids,
                images=arrays.get(f"{split}_images"),
                captions=arrays.get(f"{split}_captions"),
                surfaces=arrays.get(f"{split}_surfaces"),
            )
        data[subject] = splits
    return Dataset(data, spec=spec or {"kind": "arrays"}, name=name, ids_are_nsd=ids_are_nsd)
