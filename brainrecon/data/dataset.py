"""One dataset type for the whole toolkit.

A :class:`Dataset` holds, per subject and per split (``train`` / ``test``):

- ``voxels``: responses, array of shape (n, n_voxels) (memory-mapped where the source allows);
- ``ids``: one integer image id per row — the 0-based NSD 73k id where it is known, so that
  images, captions and metrics align across subjects and projects;
- ``images``: uint8 (n, H, W, 3), read lazily (memory-mapped ``.npy``, HDF5, or generated on
  demand) — a full NSD stimulus set is never loaded whole;
- ``captions`` (optional): strings of shape (n, k);
- ``surfaces`` (optional): 2-D cortical surface maps of shape (n, H, W) (NeuroPictor's input);
- ``trials`` (optional): the single trials behind the averaged ``voxels`` (:class:`Trials`: each
  trial's voxels, the row of its image in the split, its 0-based repetition index and its global
  NSD trial number where the source gives it).

Rows of ``voxels`` are per-image averages (what ridge, the leaderboard and evaluation use); where a
source carries single trials, the average of an image's trials equals its row of ``voxels``.

Every dataset has a named **validation split**: a subset of the training images given by
``Dataset.validation_rows`` — the source's own validation images where it has them (MindEye1's
``val`` shards), else a seeded hold-out of ``VALIDATION_FRACTION`` of each subject's training images
(seed ``VALIDATION_SEED``; never test images). ``dataset.train`` still holds every training image
(validation included: ridge and Brain-Diffuser fit on all of them); decoders that select a model by
validation fit on the training images outside it. The validation ids enter the fingerprint.

Decoders receive a :class:`Split` (``dataset.train``, ``dataset.validation`` or ``dataset.test``). A
fingerprint per subject identifies the data and the split; runs record it and the leaderboard ranks
only runs with the same fingerprint.

The arrays of one subject in one split (:class:`SplitArrays`, :class:`Trials` and the lazy
array-likes) are defined in :mod:`brainrecon.data.arrays` and importable from here as before.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from brainrecon.data.arrays import (  # noqa: F401 - TrialAverages re-exported: it was defined here
    RowSubset,
    SplitArrays,
    TrialAverages,
    Trials,
    trial_summary,
    validate_split_arrays,
)
from brainrecon.errors import DataError

SPLITS = ("train", "test")
#: The named splits a :class:`Split` can be: the two stored ones and the validation subset of ``train``.
SPLIT_NAMES = ("train", "validation", "test")
NAN_POLICIES = ("error", "zero")
#: Default share of a subject's training images held out as its validation split, when the
#: source has none (MindEye1 holds out 300 of 8,859, about 3.4 %; BrainGuard's earlier brainrecon
#: recipe held out 5 %, kept here).
VALIDATION_FRACTION = 0.05
VALIDATION_SEED = 0
#: Repetitions in the released BrainGuard / MindEye1 stacks (``voxel[:, batch_index % 3]``).
STACK_REPETITIONS = 3


@dataclass
class Dataset:
    """Per-subject train/test data. See the module docstring.

    Parameters
    ----------
    subjects_data : dict
        ``subject -> {"train": SplitArrays, "test": SplitArrays}``.
    spec : dict
        JSON-able description from which :func:`brainrecon.data.dataset_from_spec` re-opens
        the same data (stored in run records). Optional ``validation_fraction`` and
        ``validation_seed`` set the hold-out used where the source has no validation split.
    name : str
        Short human-readable name.
    validation_rows : dict, optional
        ``subject -> rows of its training split`` that the source names as validation images;
        subjects missing here get a seeded hold-out.
    """

    subjects_data: dict[int, dict[str, SplitArrays]]
    spec: dict[str, Any]
    name: str = "dataset"
    ids_are_nsd: bool = False
    validation_rows: dict[int, np.ndarray] = field(default_factory=dict)
    _fingerprints: dict[int, str] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if not self.subjects_data:
            raise DataError("A dataset needs at least one subject.")
        self.subjects_data = {int(k): v for k, v in sorted(self.subjects_data.items())}
        for subject, splits in self.subjects_data.items():
            for split in SPLITS:
                if split not in splits:
                    raise DataError(f"Subject {subject} has no {split!r} split.")
                validate_split_arrays(splits[split], subject, split)
            n_vox = {s: np.shape(splits[s].voxels)[1] for s in SPLITS}
            if n_vox["train"] != n_vox["test"]:
                raise DataError(
                    f"Subject {subject}: train has {n_vox['train']} voxels but test has "
                    f"{n_vox['test']}; both splits must come from the same ROI mask."
                )
        given = {int(k): np.asarray(v, dtype=np.int64) for k, v in (self.validation_rows or {}).items()}
        self.validation_origin: dict[int, str] = {}
        rows: dict[int, np.ndarray] = {}
        for subject in self.subjects_data:
            n = int(np.shape(self.subjects_data[subject]["train"].voxels)[0])
            if subject in given:
                r = np.unique(given[subject])
                if len(r) and (r[0] < 0 or r[-1] >= n):
                    raise DataError(f"Subject {subject}: validation rows must lie in 0..{n - 1} (the training "
                                    f"split), got {r[0]}..{r[-1]}.")
                rows[subject], self.validation_origin[subject] = r, "source"
            else:
                rows[subject] = holdout_rows(n, subject, self.validation_fraction, self.validation_seed)
                self.validation_origin[subject] = "holdout"
        self.validation_rows = rows
        self._subsets: dict[tuple[int, str], SplitArrays] = {}
        self.train = Split(self, "train")
        self.validation = Split(self, "validation")
        self.test = Split(self, "test")

    @property
    def validation_fraction(self) -> float:
        return float(self.spec.get("validation_fraction", VALIDATION_FRACTION))

    @property
    def validation_seed(self) -> int:
        return int(self.spec.get("validation_seed", VALIDATION_SEED))

    @property
    def subjects(self) -> list[int]:
        return list(self.subjects_data)

    def n_voxels(self, subject: int) -> int:
        return int(np.shape(self._get(subject, "train").voxels)[1])

    def _get(self, subject: int, split: str) -> SplitArrays:
        try:
            if split == "validation":
                return self._validation_arrays(int(subject))
            return self.subjects_data[int(subject)][split]
        except KeyError:
            raise DataError(
                f"Subject {subject} is not in this dataset ({self.name}); "
                f"available subjects: {self.subjects}."
            ) from None

    def _validation_arrays(self, subject: int) -> SplitArrays:
        key = (subject, "validation")
        if key not in self._subsets:
            train = self.subjects_data[subject]["train"]
            rows = self.validation_rows[subject]
            if not len(rows):
                raise DataError(f"Subject {subject} has no validation images: its training split has "
                                f"{np.shape(train.voxels)[0]} image(s).")
            trials = None
            if train.trials is not None:
                keep = np.flatnonzero(np.isin(train.trials.rows, rows))
                trials = Trials(RowSubset(train.trials.voxels, keep),
                                np.searchsorted(rows, train.trials.rows[keep]),
                                train.trials.repetition[keep], train.trials.trial[keep])

            def sub(a: Any) -> Any:
                return None if a is None else RowSubset(a, rows)

            self._subsets[key] = SplitArrays(
                voxels=sub(train.voxels), ids=np.asarray(train.ids)[rows], images=sub(train.images),
                captions=None if train.captions is None else np.asarray(train.captions)[rows],
                surfaces=sub(train.surfaces), surface_fn=train.surface_fn, trials=trials)
        return self._subsets[key]

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
            validation_rows={s: self.validation_rows[s] for s in subjects
                             if self.validation_origin[s] == "source"},
        )
        ds._fingerprints = {s: f for s, f in self._fingerprints.items() if s in subjects}
        return ds

    def fingerprint(self, subject: int) -> str:
        """Hash of what identifies this subject's data and split (source, ids, shapes, content
        sample, the validation images)."""
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
                if arrays.trials is not None:
                    h.update(b"trials")
                    h.update(np.ascontiguousarray(arrays.trials.rows).tobytes())
                    h.update(np.ascontiguousarray(arrays.trials.repetition).tobytes())
            # The validation images: a model selected on other images is another experiment.
            h.update(b"validation")
            h.update(np.ascontiguousarray(
                np.asarray(self._get(subject, "train").ids)[self.validation_rows[subject]]).tobytes())
            self._fingerprints[subject] = h.hexdigest()[:16]
        return self._fingerprints[subject]

    def info(self) -> dict[str, Any]:
        """A summary: per subject, counts, voxels, image size, what is present; trials,
        repetitions and the validation split; the test-set convention and the normalisation
        the source applied (where the source says)."""
        rows = {}
        for s in self.subjects:
            tr, te = self._get(s, "train"), self._get(s, "test")
            img_shape = tuple(np.shape(tr.images)[1:]) if tr.images is not None else None
            n_test = int(np.shape(te.voxels)[0])
            rows[s] = {
                "n_train": int(np.shape(tr.voxels)[0]),
                "n_test": n_test,
                "n_voxels": self.n_voxels(s),
                "image_shape": img_shape,
                "captions": tr.captions is not None,
                "surfaces": tr.surfaces is not None or tr.surface_fn is not None,
                "fingerprint": self.fingerprint(s),
                "n_validation": int(len(self.validation_rows[s])),
                "validation": self.validation_origin[s] if self.validation_origin[s] == "source" else
                f"hold-out {self.validation_fraction:g} of training images, seed {self.validation_seed}",
                "test_convention": test_convention(n_test, self.ids_are_nsd),
                "trials": {split: trial_summary(self._get(s, split)) for split in SPLITS},
            }
        return {"name": self.name, "spec": self.spec, "ids_are_nsd": self.ids_are_nsd,
                "normalisation": self.spec.get("normalisation", "as stored (not stated by the source)"),
                "subjects": rows}

    def __repr__(self) -> str:
        return f"Dataset(name={self.name!r}, subjects={self.subjects})"


def choose_subjects(present: Sequence[int], subjects: Sequence[int] | None,
                    not_found: Callable[[list[int]], str]) -> list[int]:
    """The subjects a reader opens: ``subjects`` (every one ``present`` when None), all present.

    Otherwise a :class:`DataError` with ``not_found(absent)``: the subjects asked for that are
    absent, or all of them when none was asked for or present. Each reader words its own fix.
    """
    wanted = list(present) if subjects is None else [int(s) for s in subjects]
    missing = [s for s in wanted if s not in present]
    if missing or not wanted:
        raise DataError(not_found(missing or wanted))
    return wanted


def holdout_rows(n: int, subject: int, fraction: float = VALIDATION_FRACTION,
                 seed: int = VALIDATION_SEED) -> np.ndarray:
    """The seeded validation hold-out of ``n`` training images: ``round(fraction * n)`` rows (at
    least one, leaving at least one for training), sorted; a function of (seed, subject, n) only."""
    fraction = float(fraction)
    if not 0.0 <= fraction < 1.0:
        raise DataError(f"validation_fraction must be in [0, 1), got {fraction!r}.",
                        parameters=("validation_fraction",))
    if n < 2 or fraction == 0.0:
        return np.zeros(0, dtype=np.int64)
    k = min(n - 1, max(1, int(round(fraction * n))))
    order = np.random.default_rng([int(seed), int(subject), 7919]).permutation(n)
    return np.sort(order[:k]).astype(np.int64)


def test_convention(n_test: int, ids_are_nsd: bool) -> str:
    """Which published test set ``n_test`` images are: NSD's shared images seen in sessions 1-37
    (982, the pre-2023 papers) or in all 40 sessions (1000, MindEye2), else "other"."""
    if ids_are_nsd and n_test == 982:
        return "982 (shared images of sessions 1-37)"
    if ids_are_nsd and n_test == 1000:
        return "1000 (shared images of all 40 sessions)"
    return f"other ({n_test} images)"


class Split:
    """One split (``"train"`` or ``"test"``) of a :class:`Dataset`, across its subjects.

    This is what :meth:`brainrecon.decoders.Decoder.fit` and ``predict`` receive.
    """

    def __init__(self, dataset: Dataset, name: str):
        if name not in SPLIT_NAMES:
            raise DataError(f"Unknown split {name!r}; valid splits: 'train', 'validation', 'test'.")
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
        X = np.asarray(self._arrays(subject).voxels, dtype=np.float32)
        return _finite(X, nan_policy, subject, f"{self.name} split")

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

    # ------------------------------------------------------------------ trials and validation
    def has_trials(self, subject: int) -> bool:
        """Whether this split carries the single trials behind its averages."""
        return self._arrays(subject).trials is not None

    def trials(self, subject: int) -> Trials:
        """The single trials (:class:`Trials`); a :class:`DataError` when the source has none."""
        t = self._arrays(subject).trials
        if t is None:
            raise DataError(
                f"Subject {subject} ({self.name} split) has no single trials in this dataset "
                f"({self.dataset.name}): its source stores per-image averages only. Use a source that "
                f"keeps repetitions (MindEye1 webdataset, MindEye2 HDF5, synthetic), or pass "
                f"trials='average'.", parameters=("trials",))
        return t

    def trial_voxels(self, subject: int, nan_policy: str = "error") -> tuple[np.ndarray, np.ndarray]:
        """Single-trial voxels, float32 (n_trials, V), and the row of each trial's image."""
        t = self.trials(subject)
        X = _finite(np.asarray(t.voxels, dtype=np.float32), nan_policy, subject, f"{self.name} split, single trials")
        return X, t.rows

    def trial_stack(self, subject: int, repetitions: int = STACK_REPETITIONS,
                    nan_policy: str = "error") -> np.ndarray:
        """Each image's trials as float32 (n_images, repetitions, V), padded as MindEye1's webdataset
        (and hence BrainGuard's released training) stores them: an image seen once repeats its trial,
        one seen twice gets the mean of its two as third row (MedARC's webdataset creation code,
        ``fMRI-Algonauts-Challenge-2023 src/algo_webdataset_creation.py``); more trials than
        ``repetitions`` keep the first ones. The mean over axis 1 is the image's average."""
        t = self.trials(subject)
        X, rows = self.trial_voxels(subject, nan_policy)
        n = self.n_images(subject)
        out = np.empty((n, repetitions, X.shape[1]), dtype=np.float32)
        filled = np.zeros(n, dtype=np.int64)
        order = np.lexsort((t.repetition, rows))
        for k in order:
            r = rows[k]
            if filled[r] < repetitions:
                out[r, filled[r]] = X[k]
                filled[r] += 1
        for count in range(1, repetitions):
            for r in np.flatnonzero(filled == count):
                if count == 1:
                    out[r, 1:] = out[r, 0]
                else:
                    out[r, count:] = out[r, :count].mean(axis=0)
        return out

    def validation_rows(self, subject: int) -> np.ndarray:
        """Rows of this (training) split that form the dataset's validation split."""
        if self.name != "train":
            raise DataError(f"validation_rows is defined on the training split, not {self.name!r}.")
        self.dataset._get(subject, "train")
        return self.dataset.validation_rows[int(subject)]


def _finite(X: np.ndarray, nan_policy: str, subject: int, where: str) -> np.ndarray:
    if nan_policy not in NAN_POLICIES:
        raise DataError(f"Unknown nan_policy {nan_policy!r}; valid: 'error', 'zero'.")
    # Checked in row blocks: no full-size mask beside a large array unless something is wrong.
    if all(np.isfinite(X[i:i + 4096]).all() for i in range(0, X.shape[0], 4096)):
        return X
    bad = ~np.isfinite(X)
    n_bad = int(bad.sum())
    if n_bad:
        if nan_policy == "error":
            rows = int(bad.any(axis=1).sum())
            raise DataError(
                f"Subject {subject} ({where}): {n_bad} voxel values are NaN or "
                f"infinite, in {rows} of {X.shape[0]} rows. Fix the data, or pass "
                f"nan_policy='zero' to replace them with 0.", parameters=("nan_policy",)
            )
        X = np.where(bad, np.float32(0), X)
    return X


def _as_uint8_images(block: Any) -> np.ndarray:
    arr = np.asarray(block)
    if arr.dtype == np.uint8:
        return arr
    # Brain-Diffuser stores stimuli as float64 in 0..255.
    return np.clip(np.rint(arr), 0, 255).astype(np.uint8)


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
