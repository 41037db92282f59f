"""Readers of the two NSD distributions the published decoders train on.

**MindEye1** (HF ``pscotti/naturalscenesdataset``, folders ``webdataset_avg_split`` and
``webdataset_avg_new``; MedARC-AI/fMRI-reconstruction-NSD ``src/utils.py``)::

    webdataset_avg_split/train/train_subj01_{0..17}.tar     val/val_subj01_0.tar     test/test_subj01_{0..1}.tar
    webdataset_avg_split/metadata_subj01.json               {"totals": {"train": ..., "val": ..., "test": ...}}

or the same shards extracted into folders, as BrainGuard's README tells its users to do
(``train/train_subj01/``, ``val/val_subj01/``, ``test/subj01/``; ``{split}/subj01/`` and
``{split}/{split}_subj01/`` are both read). A sample is the members of one key:
``sample000000349.nsdgeneral.npy`` (voxels, (3, V): the image's repetitions), ``.jpg`` (or
``.png``), ``.coco73k.npy`` (the 0-based 73k id, shape (1,)), ``.trial.npy`` (the global trial of
the first repetition, (1,)) and ``.num_uniques.npy`` (how many of the 3 rows are distinct trials,
(1,)). MedARC's webdataset creation code (``MedARC-AI/fMRI-Algonauts-Challenge-2023
src/algo_webdataset_creation.py``, the script issue #33 of fMRI-reconstruction-NSD points to)
pads an image seen once by repeating its trial and an image seen twice by appending the mean of
the two; brainrecon keeps the first ``num_uniques`` rows as single trials, so their mean is the
image's average (and equals the mean of the 3 stored rows).

Known traps, handled here:

* **duplicated samples** in the train shards (fMRI-reconstruction-NSD #38, #55: 26,577 samples
  for 8,858 unique images in subject 1, some images present 2, 3 or 6 times). Samples are read in
  key order and an image already seen keeps its first sample; how many were dropped (and how many
  of those disagreed on their first trial) is reported by ``brainrecon data info``.
* **session-wise z-scored betas** (#33): the voxels are not raw betas; recorded as the source's
  normalisation, and compared by ``brainrecon data verify`` after each source's own normalisation.
* ``webdataset_avg_split`` vs ``webdataset_avg_new`` (#51): the same file names; ``_new`` adds
  sessions 38-40 (released after the Algonauts challenge). The variant is recorded in the spec.

``train`` is the union of the ``train`` and ``val`` shards (MindEye1 trains on both:
``num_train = 8559 + 300``); the ``val`` shards' images are the dataset's validation split
(BrainGuard's ``get_dls`` validates on them). ``test`` is the shared images (982 with
``webdataset_avg_split``).

**MindEye2** (HF ``pscotti/mindeyev2``; MedARC-AI/MindEyeV2 ``src/Train.ipynb``)::

    betas_all_subj01_fp32_renorm.hdf5          dataset "betas" (n_trials, V) float32, row = global trial
    coco_images_224_float16.hdf5               dataset "images" (73000, 3, 224, 224) float16 in [0, 1]
    wds/subj01/train/{0..39}.tar               one shard per session, non-shared trials
    wds/subj01/new_test/0.tar                  shared trials of all 40 sessions (1,000 images)
    wds/subj01/test/0.tar                      shared trials of sessions 1-37 (MindEye1's 982 images)
    COCO_73k_annots_curated.npy                (73000, 5) captions (optional)

Each sample's ``behav.npy`` is (1, 17): column 0 the 0-based 73k id (row of the image HDF5),
column 5 the global trial (row of the betas HDF5), column 1 the subject. Betas rows are read
lazily (h5py), images too. ``test_set`` chooses ``1000`` (``new_test``, default) or ``982``
(``test``). MindEye2 has no validation split: the dataset's seeded hold-out is used. Test images
are ordered by ascending 73k id (MindEye2's evaluation order); training images by first trial.
Repetition index = chronological order of an image's trials.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from brainrecon.data.dataset import Dataset, SplitArrays, TrialAverages, Trials, choose_subjects
from brainrecon.data.webdataset import LazyImages, Member, MemberReader, _one_line, scan_folder, scan_tar
from brainrecon.errors import BrainreconWarning, DataError

MINDEYE1_VARIANTS = ("webdataset_avg_split", "webdataset_avg_new")
MINDEYE1_NORMALISATION = ("session-wise z-score of single-trial betas (MindEye1 webdataset; "
                          "fMRI-reconstruction-NSD issue #33)")
MINDEYE2_NORMALISATION = ("session-wise z-score of betas_fithrf single trials ('_fp32_renorm' HDF5; "
                          "MindEyeV2 src/dataset_creation.ipynb)")
CAPTIONS_FILE = "COCO_73k_annots_curated.npy"
VOXELS_KEY = "nsdgeneral.npy"
IMAGE_KEYS = ("jpg", "png")
TEST_SETS = {"1000": "new_test", "982": "test"}
N_BEHAV = 17

_FIX_ME1 = ("download the subject's shards again (`huggingface-cli download pscotti/naturalscenesdataset "
            "--repo-type dataset --include 'webdataset_avg_split/*'`) or re-extract them")
_FIX_ME2 = ("download the subject's files again (`huggingface-cli download pscotti/mindeyev2 --repo-type "
            "dataset --include 'betas_all_subj01_fp32_renorm.hdf5' 'wds/subj01/*' "
            "'coco_images_224_float16.hdf5'`)")


# ================================================================ MindEye1
def mindeye1_root(path: Path) -> Path | None:
    """The ``webdataset_avg_*`` folder at or under ``path``, or None."""
    if _is_mindeye1(path):
        return path
    found = [path / v for v in MINDEYE1_VARIANTS if _is_mindeye1(path / v)]
    if len(found) > 1:
        raise DataError(f"{path} holds both {found[0].name} and {found[1].name} (sessions 1-37 and 1-40, "
                        f"fMRI-reconstruction-NSD #51); pass the one to read as source, e.g. {found[0]}.",
                        parameters=("source",))
    return found[0] if found else None


def _is_mindeye1(path: Path) -> bool:
    return path.is_dir() and bool(mindeye1_subjects(path))


def mindeye1_subjects(root: Path) -> list[int]:
    train = root / "train"
    if not train.is_dir():
        return []
    found = set()
    for entry in train.iterdir():
        m = re.fullmatch(r"(?:train_)?subj(\d\d)(?:_\d+\.tar)?", entry.name)
        if m and (entry.is_dir() or entry.name.endswith(".tar")):
            found.add(int(m.group(1)))
    return sorted(found)


def _mindeye1_sources(root: Path, split: str, subject: int) -> tuple[str, list[Path]]:
    """(``"tar"`` or ``"folders"``, shard files or the extracted folder) of one split."""
    d = root / split
    tars = {}
    for p in d.glob(f"{split}_subj{subject:02d}_*.tar") if d.is_dir() else ():
        m = re.fullmatch(rf"{split}_subj{subject:02d}_(\d+)\.tar", p.name)
        if m:
            tars[int(m.group(1))] = p
    folders = [d / f"{split}_subj{subject:02d}", d / f"subj{subject:02d}"]
    folders = [f for f in folders if f.is_dir()]
    if tars:
        missing = [i for i in range(max(tars) + 1) if i not in tars]
        if missing:
            names = ", ".join(f"{split}_subj{subject:02d}_{i}.tar" for i in missing)
            raise DataError(f"{d}: shard(s) {names} missing (shards 0..{max(tars)} expected); {_FIX_ME1}.")
        return "tar", [tars[i] for i in sorted(tars)]
    if folders:
        return "folders", folders[:1]
    raise DataError(f"{d}: no {split} data for subject {subject}: expected {split}_subj{subject:02d}_0.tar ... or "
                    f"the extracted folder {split}_subj{subject:02d}/ (or subj{subject:02d}/); {_FIX_ME1}.")


class _Sample:
    __slots__ = ("first_trial", "key", "members", "n_unique", "nsd_id", "origin")

    def __init__(self, key, members, nsd_id, n_unique, first_trial, origin):
        self.key, self.members, self.nsd_id = key, members, nsd_id
        self.n_unique, self.first_trial, self.origin = n_unique, first_trial, origin


def _read_mindeye1_split(root: Path, split: str, subject: int, reader: MemberReader) -> tuple[list[_Sample], str]:
    layout, sources = _mindeye1_sources(root, split, subject)
    members: dict[str, dict[str, Member]] = {}
    for src in sources:
        found = scan_tar(src, _FIX_ME1) if layout == "tar" else scan_folder(src)
        if not found:
            raise DataError(f"{src} holds no samples; {_FIX_ME1}.")
        for key, m in found.items():
            members.setdefault(key, {}).update(m)
    if not members:
        raise DataError(f"{sources[0]} holds no samples; {_FIX_ME1}.")
    samples = []
    for key in sorted(members):
        m = members[key]
        where = next(iter(m.values())).path
        where = where if layout == "tar" else where.parent
        for need in (VOXELS_KEY, "coco73k.npy", "trial.npy", "num_uniques.npy"):
            if need not in m:
                raise DataError(f"{where}: sample {key} has no {key}.{need} (it has "
                                f"{', '.join(sorted(m))}); {_FIX_ME1}.")
        if not any(k in m for k in IMAGE_KEYS):
            raise DataError(f"{where}: sample {key} has no image ({key}.jpg or {key}.png); {_FIX_ME1}.")
        nsd_id = _scalar(reader, m["coco73k.npy"], f"{key}.coco73k.npy", 0, 73000)
        n_unique = _scalar(reader, m["num_uniques.npy"], f"{key}.num_uniques.npy", 1, 4)
        trial = _scalar(reader, m["trial.npy"], f"{key}.trial.npy", 0, 10 ** 7)
        samples.append(_Sample(key, m, nsd_id, n_unique, trial, split))
    return samples, layout


def _scalar(reader: MemberReader, member: Member, name: str, lo: int, hi: int) -> int:
    arr = reader.npy(member, name)
    value = arr.reshape(-1)[0] if arr.size == 1 and arr.dtype.kind in "iuf" else None
    if value is None or not np.isfinite(value) or float(value) != int(value) or not lo <= int(value) < hi:
        raise DataError(f"{member.where(name)} holds {arr.dtype} of shape {arr.shape}"
                        f"{' = ' + str(arr.reshape(-1)[:3].tolist()) if arr.size else ''}, expected one integer in "
                        f"[{lo}, {hi}); {reader.fix}.")
    return int(arr.reshape(-1)[0])


class _Stacks:
    """The (3, V) voxel stacks of a split's samples, read on demand: ``shape`` (n, 3, V)."""

    def __init__(self, samples: list[_Sample], reader: MemberReader):
        self.samples = samples
        self.reader = reader
        first = self._read(0)
        self.shape = (len(samples),) + first.shape
        self._cache: tuple[int, np.ndarray] | None = (0, first)

    def _read(self, i: int) -> np.ndarray:
        s = self.samples[i]
        name = f"{s.key}.{VOXELS_KEY}"
        arr = self.reader.npy(s.members[VOXELS_KEY], name)
        if arr.ndim != 2 or arr.shape[0] != 3 or arr.dtype.kind != "f":
            raise DataError(f"{s.members[VOXELS_KEY].where(name)} holds {arr.dtype} of shape {arr.shape}, expected "
                            f"float (3, n_voxels): an image's repetitions; {self.reader.fix}.")
        if hasattr(self, "shape") and arr.shape != self.shape[1:]:
            raise DataError(f"{s.members[VOXELS_KEY].where(name)} has shape {arr.shape} but the split's other samples "
                            f"have {self.shape[1:]}; {self.reader.fix}.")
        return arr

    def get(self, i: int) -> np.ndarray:
        if self._cache is None or self._cache[0] != i:
            self._cache = (i, self._read(i))
        return self._cache[1]


class _StackTrials:
    """Rows ``(image, repetition)`` of :class:`_Stacks`, as a lazy (n_trials, V) array."""

    def __init__(self, stacks: _Stacks, image: np.ndarray, rep: np.ndarray):
        self.stacks, self.image, self.rep = stacks, image, rep
        self.shape = (len(image), stacks.shape[2])
        self.dtype = np.dtype(np.float32)
        self.ndim = 2

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index: Any) -> np.ndarray:
        if isinstance(index, (int, np.integer)):
            return self.stacks.get(int(self.image[index]))[int(self.rep[index])].astype(np.float32)
        rows = np.atleast_1d(np.arange(self.shape[0])[index])
        out = np.empty((len(rows), self.shape[1]), dtype=np.float32)
        for k in np.argsort(self.image[rows], kind="stable"):  # one read per image
            r = rows[k]
            out[k] = self.stacks.get(int(self.image[r]))[int(self.rep[r])]
        return out

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        arr = self[slice(None)]
        return arr if dtype is None else arr.astype(dtype)


def load_mindeye1(path: str | Path, subjects: Sequence[int] | None = None,
                  options: dict[str, Any] | None = None) -> Dataset:
    """Open MindEye1's ``webdataset_avg_split`` / ``webdataset_avg_new`` (shards or extracted
    folders; see the module docstring)."""
    path = Path(path)
    root = mindeye1_root(path)
    if root is None:
        raise DataError(f"{path} holds no MindEye1 webdataset (train/train_subjXX_0.tar or train/train_subjXX/); "
                        f"{_FIX_ME1}.")
    present = mindeye1_subjects(root)
    wanted = choose_subjects(present, subjects, lambda absent: (
        f"MindEye1 data for subject(s) {absent} not found in {root}; subjects present: {present}."))
    reader = MemberReader(_FIX_ME1)
    captions = find_captions(root)
    data, val_rows, report, layouts = {}, {}, {}, set()
    for s in wanted:
        by_split, counts = {}, {}
        for split in ("train", "val", "test"):
            if split == "val" and not (root / "val").is_dir():
                by_split[split] = []
                continue
            by_split[split], layout = _read_mindeye1_split(root, split, s, reader)
            counts[split] = len(by_split[split])
            layouts.add(layout)
        _check_totals(root, s, counts)
        dup: dict[str, Any] = {}
        train = _dedupe(by_split["train"] + by_split["val"], dup)
        test = _dedupe(by_split["test"], {})
        overlap = sorted({x.nsd_id for x in train} & {x.nsd_id for x in test})
        if overlap:
            raise DataError(f"{root}: subject {s}'s test shards share {len(overlap)} image(s) with its train/val "
                            f"shards (73k ids {overlap[:5]}); the shards are mixed up; {_FIX_ME1}.")
        splits = {}
        for split, samples in (("train", train), ("test", test)):
            splits[split] = _mindeye1_split(samples, reader, captions)
        if splits["train"].voxels.shape[1] != splits["test"].voxels.shape[1]:
            raise DataError(f"{root}: subject {s}'s train samples have {splits['train'].voxels.shape[1]} voxels but its "
                            f"test samples {splits['test'].voxels.shape[1]}; {_FIX_ME1}.")
        val_rows[s] = np.array([i for i, x in enumerate(train) if x.origin == "val"], dtype=np.int64)
        report[str(s)] = {"samples": counts, "duplicates_dropped": dup.get("dropped", 0),
                          "duplicates_disagreeing": dup.get("disagreeing", 0)}
        data[s] = splits
    spec = {"kind": "mindeye1", "path": str(root.resolve()), "subjects": wanted, "variant": root.name,
            "layout": "+".join(sorted(layouts)), "normalisation": MINDEYE1_NORMALISATION,
            **_validation_options(options)}
    ds = Dataset(data, spec=spec, name=f"mindeye1:{root.name}", ids_are_nsd=True, validation_rows=val_rows)
    ds.source_report = report
    return ds


def _dedupe(samples: list[_Sample], stats: dict[str, Any]) -> list[_Sample]:
    kept: dict[int, _Sample] = {}
    for x in samples:
        first = kept.get(x.nsd_id)
        if first is None:
            kept[x.nsd_id] = x
            continue
        stats["dropped"] = stats.get("dropped", 0) + 1
        if first.first_trial != x.first_trial or first.n_unique != x.n_unique:
            stats["disagreeing"] = stats.get("disagreeing", 0) + 1
    return list(kept.values())


def _check_totals(root: Path, subject: int, counts: dict[str, int]) -> None:
    meta = root / f"metadata_subj{subject:02d}.json"
    if not meta.exists():
        return
    try:
        totals = json.loads(meta.read_text())["totals"]
    except (ValueError, KeyError, TypeError, OSError):
        warnings.warn(BrainreconWarning(f"{meta} is not the expected {{'totals': {{...}}}} object; sample counts "
                                        f"not checked against it."), stacklevel=3)
        return
    for split, n in counts.items():
        want = totals.get(split) if isinstance(totals, dict) else None
        if isinstance(want, int) and want != n:
            warnings.warn(BrainreconWarning(
                f"{root}: subject {subject}'s {split} shards hold {n} samples but {meta.name} says {want}; a shard "
                f"may be missing or incomplete ({_FIX_ME1})."), stacklevel=3)


def _mindeye1_split(samples: list[_Sample], reader: MemberReader, captions: Any) -> SplitArrays:
    stacks = _Stacks(samples, reader)
    n_rep = stacks.shape[1]
    image, rep, trial = [], [], []
    for i, x in enumerate(samples):
        k = min(x.n_unique, n_rep)
        image.extend([i] * k)
        rep.extend(range(k))
        trial.extend([x.first_trial] + [-1] * (k - 1))
    trials = Trials(_StackTrials(stacks, np.array(image), np.array(rep)), rows=image, repetition=rep, trial=trial)
    ids = np.array([x.nsd_id for x in samples], dtype=np.int64)
    images = LazyImages([(x.members[next(k for k in IMAGE_KEYS if k in x.members)],
                          f"{x.key}.{next(k for k in IMAGE_KEYS if k in x.members)}") for x in samples], reader)
    return SplitArrays(voxels=TrialAverages(trials, len(samples)), ids=ids, images=images,
                       captions=None if captions is None else np.asarray(captions[ids]).astype(str), trials=trials)


# ================================================================ MindEye2
def mindeye2_subjects(root: Path) -> list[int]:
    if not (root / "wds").is_dir():
        return []
    found = []
    for p in root.glob("betas_all_subj[0-9][0-9]_fp32_renorm.hdf5"):
        s = int(p.name[len("betas_all_subj"):][:2])
        if (root / "wds" / f"subj{s:02d}").is_dir():
            found.append(s)
    return sorted(found)


def _behav_rows(tars: list[Path], subject: int) -> np.ndarray:
    reader = MemberReader(_FIX_ME2)
    rows = []
    for tar in tars:
        found = scan_tar(tar, _FIX_ME2)
        if not found:
            raise DataError(f"{tar} holds no samples; {_FIX_ME2}.")
        for key, m in sorted(found.items()):
            if "behav.npy" not in m:
                raise DataError(f"{tar}: sample {key} has no behav.npy member (it has {', '.join(sorted(m))}); "
                                f"{_FIX_ME2}.")
            b = reader.npy(m["behav.npy"], f"{key}.behav.npy")
            if b.ndim != 2 or b.shape[1] != N_BEHAV or b.shape[0] < 1:
                raise DataError(f"{m['behav.npy'].where(key + '.behav.npy')} holds shape {b.shape}, expected (1, "
                                f"{N_BEHAV}) behaviour columns; {_FIX_ME2}.")
            row = b[0]
            used = row[[0, 1, 5]]
            if b.dtype.kind not in "iuf" or not np.all(np.isfinite(used)) or np.any(used != np.round(used)):
                raise DataError(f"{m['behav.npy'].where(key + '.behav.npy')} holds {b.dtype} values {used.tolist()} in "
                                f"columns 0, 1, 5 (73k id, subject, global trial), expected integers; {_FIX_ME2}.")
            if int(row[1]) != subject:
                raise DataError(f"{m['behav.npy'].where(key + '.behav.npy')} is a trial of subject {int(row[1])}, but "
                                f"it sits in subject {subject}'s folder; the files of two subjects are mixed up; "
                                f"{_FIX_ME2}.")
            rows.append(row)
    reader.close()
    if not rows:
        raise DataError(f"{tars[0].parent} holds no samples; {_FIX_ME2}.")
    return np.stack(rows)


class _LazyH5:
    """A lazy array over rows of an HDF5 dataset: indexing reads only the rows asked for, each
    once and in ascending order, and returns them in the order asked; a read failure is a
    DataError naming the file. Subclasses set ``shape``/``dtype`` and :meth:`_keys` (the dataset
    rows of an index) and :meth:`_read` (sorted unique rows -> array)."""

    what = "rows"
    ndim: int
    shape: tuple[int, ...]
    dtype: np.dtype

    def __init__(self, dset: Any, path: Path):
        self.dset, self.path = dset, path

    def __len__(self) -> int:
        return self.shape[0]

    def _keys(self, index: Any) -> np.ndarray:
        raise NotImplementedError

    def _read(self, uniq: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def __getitem__(self, index: Any) -> np.ndarray:
        single = isinstance(index, (int, np.integer))
        want = self._keys(index)
        uniq, inverse = np.unique(want, return_inverse=True)
        try:
            out = self._read(uniq)
        except OSError as exc:
            raise DataError(f"{self.path}: {self.what} could not be read ({_one_line(exc)}); the file is damaged or "
                            f"truncated; {_FIX_ME2}.") from None
        if len(uniq) != len(want) or not np.array_equal(uniq, want):
            out = out[inverse]
        return out[0] if single else out

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        arr = self[slice(None)]
        return arr if dtype is None or np.dtype(dtype) == arr.dtype else arr.astype(dtype)


class _CocoImages(_LazyH5):
    """MindEye2's (73000, 3, 224, 224) float16 [0, 1] images at ``ids``, as lazy uint8 (n, H, W, 3)."""

    what = "images"

    def __init__(self, dset: Any, ids: np.ndarray, path: Path):
        super().__init__(dset, path)
        self.ids = np.asarray(ids)
        self.shape = (len(ids), int(dset.shape[2]), int(dset.shape[3]), 3)
        self.dtype = np.dtype(np.uint8)
        self.ndim = 4

    def _keys(self, index: Any) -> np.ndarray:
        return self.ids[np.atleast_1d(np.arange(self.shape[0])[index])]

    def _read(self, uniq: np.ndarray) -> np.ndarray:
        out = np.empty((len(uniq),) + self.shape[1:], dtype=np.uint8)
        for start in range(0, len(uniq), 32):  # bounded float temporaries
            block = np.asarray(self.dset[uniq[start:start + 32]], dtype=np.float32)
            block *= 255.0
            np.rint(block, out=block)
            np.clip(block, 0, 255, out=block)
            out[start:start + 32] = block.transpose(0, 2, 3, 1)
        return out


class _H5Rows(_LazyH5):
    """Rows ``rows`` of an HDF5 dataset (sorted reads), a DataError naming the file on failure."""

    what = "betas"
    BLOCK = 256

    def __init__(self, dset: Any, rows: np.ndarray, path: Path):
        super().__init__(dset, path)
        self.rows = np.asarray(rows, dtype=np.int64)
        self.shape = (len(self.rows), int(dset.shape[1]))
        self.dtype = np.dtype(np.float32)
        self.ndim = 2

    def _keys(self, index: Any) -> np.ndarray:
        return np.atleast_1d(self.rows[index])

    def _read(self, uniq: np.ndarray) -> np.ndarray:
        # Contiguous blocks over the requested span, keeping the rows asked for: sequential reads
        # with bounded temporary memory (h5py's point selection of thousands of rows is slow).
        out = np.empty((len(uniq), self.shape[1]), dtype=np.float32)
        k = 0
        while k < len(uniq):
            start = int(uniq[k])
            stop = min(start + self.BLOCK, int(uniq[-1]) + 1)
            j = int(np.searchsorted(uniq, stop))
            block = self.dset[start:stop]
            out[k:j] = block[uniq[k:j] - start]
            k = j
        return out


def _open_h5(path: Path, name: str, ndim: int, what: str) -> Any:
    import h5py

    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise DataError(f"{path} could not be opened as HDF5 ({_one_line(exc)}); the file is damaged, truncated or not "
                        f"HDF5; {_FIX_ME2}.") from None
    if name not in f or not isinstance(f[name], h5py.Dataset):
        raise DataError(f"{path} has no dataset {name!r} (it has {', '.join(f.keys()) or 'nothing'}); expected "
                        f"{what}; {_FIX_ME2}.")
    d = f[name]
    if d.ndim != ndim or d.dtype.kind != "f":
        raise DataError(f"{path}: dataset {name!r} is {d.dtype} of shape {d.shape}, expected {what}; {_FIX_ME2}.")
    return d


def load_mindeye2(path: str | Path, subjects: Sequence[int] | None = None,
                  options: dict[str, Any] | None = None) -> Dataset:
    """Open MindEye2's ``pscotti/mindeyev2`` download (see the module docstring).

    ``options``: ``test_set`` ("1000" default, or "982"), ``sessions`` (keep training trials of
    sessions 1..N only; default all), ``validation_fraction`` / ``validation_seed``.
    """
    root = Path(path)
    options = dict(options or {})
    test_set = str(options.get("test_set", "1000"))
    if test_set not in TEST_SETS:
        raise DataError(f"Unknown MindEye2 test_set {test_set!r}; valid: '1000' (wds/subjXX/new_test, all 40 "
                        f"sessions) or '982' (wds/subjXX/test, MindEye1's sessions 1-37).", parameters=("test_set",))
    sessions = options.get("sessions")
    present = mindeye2_subjects(root)
    wanted = choose_subjects(present, subjects, lambda absent: (
        f"MindEye2 data for subject(s) {absent} not found in {root}: expected "
        f"betas_all_subjXX_fp32_renorm.hdf5 and wds/subjXX/; subjects present: {present}."))
    image_file = root / "coco_images_224_float16.hdf5"
    images_dset = _open_h5(image_file, "images", 4, "float (73000, 3, 224, 224) images in [0, 1]") \
        if image_file.exists() else None
    if images_dset is not None and images_dset.shape[1] != 3:
        raise DataError(f"{image_file}: dataset 'images' has shape {images_dset.shape}, expected (73000, 3, H, W); "
                        f"{_FIX_ME2}.")
    captions = find_captions(root)
    data = {}
    for s in wanted:
        betas_file = root / f"betas_all_subj{s:02d}_fp32_renorm.hdf5"
        betas = _open_h5(betas_file, "betas", 2, "float (n_trials, n_voxels) single-trial betas")
        wds = root / "wds" / f"subj{s:02d}"
        train_tars = _numbered_tars(wds / "train")
        test_tars = _numbered_tars(wds / TEST_SETS[test_set])
        splits = {}
        for split, tars in (("train", train_tars), ("test", test_tars)):
            behav = _behav_rows(tars, s)
            nsd_ids, trial = behav[:, 0].astype(np.int64), behav[:, 5].astype(np.int64)
            bad = np.flatnonzero((trial < 0) | (trial >= betas.shape[0]))
            if len(bad):
                raise DataError(f"{wds}: {len(bad)} {split} trial(s) point at betas rows outside {betas_file.name}'s "
                                f"{betas.shape[0]} rows (e.g. row {int(trial[bad[0]])}); the betas file and the "
                                f"shards are from different downloads or subjects; {_FIX_ME2}.")
            if images_dset is not None and (nsd_ids.min() < 0 or nsd_ids.max() >= images_dset.shape[0]):
                raise DataError(f"{wds}: {split} 73k ids outside the {images_dset.shape[0]} rows of {image_file.name}; "
                                f"{_FIX_ME2}.")
            if split == "train" and sessions is not None:
                keep = trial // 750 < int(sessions)
                nsd_ids, trial = nsd_ids[keep], trial[keep]
            splits[split] = _mindeye2_split(nsd_ids, trial, betas, betas_file, images_dset, image_file, captions,
                                            by_id=(split == "test"))
        overlap = np.intersect1d(splits["train"].ids, splits["test"].ids)
        if len(overlap):
            # The shared images can reappear in sessions outside the chosen test set's range: never train on them.
            splits["train"] = _mindeye2_drop(splits["train"], overlap, betas, betas_file, images_dset, image_file,
                                             captions)
        data[s] = splits
    spec = {"kind": "mindeye2", "path": str(root.resolve()), "subjects": wanted, "test_set": test_set,
            "normalisation": MINDEYE2_NORMALISATION, **({"sessions": int(sessions)} if sessions is not None else {}),
            **_validation_options(options)}
    return Dataset(data, spec=spec, name=f"mindeye2:{root.name}", ids_are_nsd=True)


def _numbered_tars(d: Path) -> list[Path]:
    tars = {}
    for p in d.glob("*.tar") if d.is_dir() else ():
        if p.stem.isdigit():
            tars[int(p.stem)] = p
    if not tars:
        raise DataError(f"{d} holds no shards (0.tar, 1.tar, ...); {_FIX_ME2}.")
    missing = [i for i in range(max(tars) + 1) if i not in tars]
    if missing:
        raise DataError(f"{d}: shard(s) {', '.join(f'{i}.tar' for i in missing)} missing (0..{max(tars)} expected); "
                        f"{_FIX_ME2}.")
    return [tars[i] for i in sorted(tars)]


def _mindeye2_split(nsd_ids, trial, betas, betas_file, images_dset, image_file, captions, *, by_id: bool) -> SplitArrays:
    order = np.argsort(trial, kind="stable")
    nsd_ids, trial = nsd_ids[order], trial[order]
    if by_id:
        ids = np.unique(nsd_ids)
    else:
        _, first = np.unique(nsd_ids, return_index=True)
        ids = nsd_ids[np.sort(first)]
    row_of = {int(i): r for r, i in enumerate(ids)}
    rows = np.array([row_of[int(i)] for i in nsd_ids], dtype=np.int64)
    rep = np.zeros(len(rows), dtype=np.int64)
    seen: dict[int, int] = {}
    for k, r in enumerate(rows):
        rep[k] = seen.get(int(r), 0)
        seen[int(r)] = rep[k] + 1
    trials = Trials(_H5Rows(betas, trial, betas_file), rows=rows, repetition=rep, trial=trial)
    return SplitArrays(voxels=TrialAverages(trials, len(ids)), ids=ids,
                       images=None if images_dset is None else _CocoImages(images_dset, ids, image_file),
                       captions=None if captions is None else np.asarray(captions[ids]).astype(str), trials=trials)


def _mindeye2_drop(arrays, drop_ids, betas, betas_file, images_dset, image_file, captions) -> SplitArrays:
    t = arrays.trials
    nsd = arrays.ids[t.rows]
    keep = ~np.isin(nsd, drop_ids)
    return _mindeye2_split(nsd[keep], t.trial[keep], betas, betas_file, images_dset, image_file, captions,
                           by_id=False)


# ================================================================ shared
def find_captions(root: Path) -> Any:
    """``COCO_73k_annots_curated.npy`` beside the data (or in ``annots/``, or one folder up), or None."""
    for d in (root, root / "annots", root.parent, root.parent / "annots"):
        f = d / CAPTIONS_FILE
        if f.exists():
            try:
                arr = np.load(f, mmap_mode="r", allow_pickle=False)
            except (ValueError, OSError) as exc:
                raise DataError(f"{f} is not a readable caption array ({_one_line(exc)}); download it again from "
                                f"pscotti/naturalscenesdataset (annots/).") from None
            if arr.ndim != 2 or arr.shape[0] != 73000 or arr.dtype.kind not in "US":
                raise DataError(f"{f} holds {arr.dtype} of shape {arr.shape}, expected strings (73000, 5); download "
                                f"it again from pscotti/naturalscenesdataset (annots/).")
            return arr
    return None


def _validation_options(options: dict[str, Any] | None) -> dict[str, Any]:
    out = {}
    for key, kind in (("validation_fraction", float), ("validation_seed", int)):
        if options and key in options:
            out[key] = kind(options[key])
    return out


__all__ = ["load_mindeye1", "load_mindeye2", "mindeye1_root", "mindeye2_subjects"]
