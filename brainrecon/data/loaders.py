"""Loaders from files into the one :class:`~brainrecon.data.Dataset` type.

Supported sources (detected from what the directory or file holds):

``brain-diffuser``
    Brain-Diffuser's ``processed_data/subjXX/nsd_{train,test}_fmriavg_nsdgeneral_subN.npy``,
    ``nsd_{train,test}_stim_subN.npy`` and optional ``nsd_{train,test}_cap_subN.npy``
    (memory-mapped). Brain-Diffuser's own files carry no image ids: the test rows are the
    same images in the same order for every subject and get ids ``0..n_test-1``; training
    rows get ``1_000_000 * subject + row`` (distinct per subject), and ``ids_are_nsd`` is
    False. Files written by ``brainrecon prepare-nsd --format brain-diffuser`` add
    ``nsd_{train,test}_ids_subN.npy`` with the NSD 73k ids, which are then used.
``brainrecon``
    The prepared format written by ``brainrecon prepare-nsd`` / ``prepare-surfaces``: a
    ``brainrecon-data.json`` manifest and ``subjXX/{split}_{voxels,ids,images,captions,
    surfaces}.npy`` (memory-mapped), with NSD 73k ids.
``synthetic``
    The built-in synthetic dataset: NSD's eight subjects, 1 to 8, subjects 1, 2, 5 and 7
    unless ``subjects`` chooses others; ``synthetic:n_train=200,n_test=16`` sets its options.
``mindeye1``
    MindEye1's ``webdataset_avg_split`` / ``webdataset_avg_new`` (HF
    ``pscotti/naturalscenesdataset``): the ``.tar`` shards as published or the folders they
    extract to; single trials (repetitions) kept, the ``val`` shards as validation split
    (:mod:`brainrecon.data.mindeye`).
``mindeye2``
    MindEye2's ``pscotti/mindeyev2`` download: ``betas_all_subjXX_fp32_renorm.hdf5``,
    ``wds/subjXX/{train,new_test,test}/*.tar`` and ``coco_images_224_float16.hdf5``, read lazily.
``arrays``
    One ``.h5`` / ``.hdf5`` file with datasets ``subjXX/{train,test}_{voxels,images,ids,
    captions,surfaces}`` (images and ids optional), or a directory of such ``.npy`` files
    without a manifest.

Source options follow the path after ``::`` as ``key=value`` pairs, e.g.
``mindeye2/::test_set=982`` or ``processed_data::validation_fraction=0.1,validation_seed=3``:
``test_set`` (MindEye2: 1000 or 982), ``sessions`` (MindEye2: training sessions 1..N),
``validation_fraction`` and ``validation_seed`` (the hold-out used where a source has no
validation split). They are recorded in the dataset's spec and fingerprint.

Location precedence (the first one given wins): an explicit ``source`` argument (the CLI's
``--data`` flag passes it), the ``BRAINRECON_DATA`` environment variable, then the built-in
synthetic dataset.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from brainrecon.data.dataset import SPLITS, Dataset, SplitArrays, Trials, choose_subjects
from brainrecon.data.layout import ARRAYS, BRAIN_DIFFUSER_FILES, BRAINRECON_FILES, MANIFEST, TRIAL_FILES
from brainrecon.errors import DataError
from brainrecon.io import load_array, read_json

ENV_VAR = "BRAINRECON_DATA"
SYNTHETIC = "synthetic"


def load_dataset(
    source: str | os.PathLike | None = None,
    *,
    subjects: Sequence[int] | None = None,
    **synthetic_options: Any,
) -> Dataset:
    """Open a dataset.

    Parameters
    ----------
    source : path, "synthetic" or None
        A prepared directory (brainrecon or Brain-Diffuser layout), an ``.h5`` arrays file,
        or ``"synthetic"``. None falls back to ``$BRAINRECON_DATA``, then the synthetic data.
    subjects : sequence of int, optional
        Keep only these subjects.
    **synthetic_options
        Passed to :func:`brainrecon.data.synthetic.make_synthetic` when the synthetic
        dataset is used.

    Raises
    ------
    DataError
        When the source does not exist or holds no recognised layout; the message lists
        every place tried.
    """
    tried = []
    if source is not None:
        tried.append(f"explicit argument: {source}")
    elif os.environ.get(ENV_VAR):
        source = os.environ[ENV_VAR]
        tried.append(f"${ENV_VAR}: {source}")
    if source is None or str(source) == SYNTHETIC or str(source).startswith(SYNTHETIC + ":"):
        from brainrecon.data.synthetic import make_synthetic

        options = _synthetic_options(str(source)) if source is not None else {}
        options.update(synthetic_options)
        if subjects is not None:
            options["subjects"] = subjects
        return make_synthetic(**options)
    path_text, options = split_source_options(str(source))
    path = Path(path_text).expanduser()
    if not path.exists():
        raise DataError(
            f"Data not found at {path}. Places tried, in order: {'; '.join(tried)}. "
            f"Pass its location as source (a brainrecon or Brain-Diffuser prepared directory, or an .h5 "
            f"file), set {ENV_VAR}, or omit both to use the built-in synthetic dataset.", parameters=("source",)
        )
    kind = detect_format(path)
    if kind in ("mindeye1", "mindeye2"):
        from brainrecon.data.mindeye import load_mindeye1, load_mindeye2

        loader = load_mindeye1 if kind == "mindeye1" else load_mindeye2
        return loader(path, subjects=subjects, options=options)
    if kind in _LOADERS:
        unknown = set(options) - {"validation_fraction", "validation_seed"}
        if unknown:
            raise DataError(f"Unknown option(s) {sorted(unknown)} for {kind} data; valid: validation_fraction, "
                            f"validation_seed.")
        ds = _LOADERS[kind](path, subjects=subjects)
        if options:
            ds = _with_validation_options(ds, options)
    else:
        raise DataError(
            f"{path} holds no recognised data layout. Expected one of: a {MANIFEST} manifest "
            f"(brainrecon prepare-nsd), Brain-Diffuser files "
            f"(subjXX/{BRAIN_DIFFUSER_FILES['voxels'].format(split='train', n='N')}), MindEye1's "
            f"webdataset_avg_split (train/train_subjXX_0.tar or extracted train/train_subjXX/), MindEye2's "
            f"pscotti/mindeyev2 (betas_all_subjXX_fp32_renorm.hdf5 + wds/subjXX/), or an .h5 file with "
            f"subjXX/train_voxels datasets. Places tried: {'; '.join(tried)}."
        )
    return ds


_OPTION_KINDS = {"test_set": str, "sessions": int, "validation_fraction": float, "validation_seed": int}


def split_source_options(source: str) -> tuple[str, dict[str, Any]]:
    """``"PATH::key=value,..."`` -> (PATH, options); see the module docstring for the keys."""
    path, sep, rest = source.partition("::")
    options: dict[str, Any] = {}
    for item in filter(None, rest.split(",")) if sep else ():
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or key not in _OPTION_KINDS:
            raise DataError(f"Bad data option {item!r} in {source!r}; write PATH::key=value,... with keys "
                            f"{', '.join(sorted(_OPTION_KINDS))}.", parameters=("source",))
        try:
            options[key] = _OPTION_KINDS[key](value.strip())
        except ValueError:
            raise DataError(f"Data option {key}={value!r} is not a {_OPTION_KINDS[key].__name__}.",
                            parameters=("source",)) from None
    return path, options


def _with_validation_options(ds: Dataset, options: dict[str, Any]) -> Dataset:
    spec = dict(ds.spec, **options)
    return Dataset(ds.subjects_data, spec=spec, name=ds.name, ids_are_nsd=ds.ids_are_nsd)


def _synthetic_options(source: str) -> dict[str, Any]:
    """``synthetic:n_train=200,n_test=16,seed=1`` -> keyword options for make_synthetic."""
    _, _, rest = source.partition(":")
    options: dict[str, Any] = {}
    allowed = {"seed", "n_train", "n_test", "image_size", "surface_size", "noise", "repetitions"}
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        if not sep or key not in allowed:
            raise DataError(
                f"Bad synthetic data option {item!r}; write synthetic:key=value,... with keys "
                f"{', '.join(sorted(allowed))}."
            )
        options[key] = float(value) if key == "noise" else int(value)
    return options


def detect_format(path: Path) -> str | None:
    if path.is_file() and path.suffix in (".h5", ".hdf5"):
        return "arrays"
    if (path / MANIFEST).exists():  # a damaged manifest is reported by the reader, never skipped
        return "brainrecon"
    if _brain_diffuser_subjects(path):
        return "brain-diffuser"
    from brainrecon.data.mindeye import mindeye1_root, mindeye2_subjects

    if path.is_dir() and mindeye2_subjects(path):
        return "mindeye2"
    if path.is_dir() and mindeye1_root(path) is not None:
        return "mindeye1"
    return None


def _brain_diffuser_root(path: Path) -> Path:
    return path / "processed_data" if (path / "processed_data").is_dir() else path


def _brain_diffuser_subjects(path: Path) -> list[int]:
    root = _brain_diffuser_root(path)
    found = []
    if not root.is_dir():
        return found
    for d in sorted(root.glob("subj[0-9][0-9]")):
        n = int(d.name[4:])
        if (d / BRAIN_DIFFUSER_FILES["voxels"].format(split="train", n=n)).exists():
            found.append(n)
    return found


def _mmap(path: Path) -> np.ndarray:
    return load_array(path, mmap=True, fix="re-create it with the command that wrote it")


_FIX_BR = "re-run `brainrecon prepare-nsd` (and prepare-surfaces) for this subject"
_FIX_BD = ("re-run `brainrecon prepare-nsd --format brain-diffuser` (or Brain-Diffuser's prepare_nsddata.py) "
           "for this subject")
_FIX_H5 = "re-create the file with the datasets described in brainrecon.data.loaders"
# name -> (accepted dtype kinds, shape as shown, number of dimensions)
_ARRAY_KINDS = {
    "voxels": ("f", "float (n, n_voxels)", 2),
    "ids": ("iu", "integer (n,)", 1),
    "images": ("u", "uint8 (n, H, W, 3)", 4),
    "captions": ("USO", "strings (n, k)", 2),
    "surfaces": ("f", "float (n, H, W)", 3),
}


def _checked(path: Path, name: str, arr: Any, fix: str, kinds: str | None = None) -> Any:
    """``arr`` read from ``path`` as the ``name`` array of a split; a wrong dtype or shape is a
    :class:`DataError` naming the file, expected vs found, and ``fix``."""
    want_kinds, shown, ndim = _ARRAY_KINDS[name]
    kinds = kinds or want_kinds
    dtype, shape = np.dtype(arr.dtype), tuple(arr.shape)
    ok = dtype.kind in kinds and len(shape) == ndim and (name != "images" or shape[-1] == 3)
    if ok and name == "images" and dtype.kind == "u":
        ok = dtype == np.uint8
    if name == "captions" and dtype.kind == "O":  # h5py variable-length strings
        ok = ok and (not len(arr) or isinstance(np.asarray(arr[:1]).reshape(-1)[0], (str, bytes)))
    if not ok:
        if kinds != want_kinds and name == "images":
            shown = "uint8 or float (n, H, W, 3)"
        raise DataError(f"{path} holds {dtype} of shape {shape}, expected {shown}; {fix}.")
    return arr


def _check_rows(files: dict[str, tuple[Path, Any]], fix: str) -> None:
    """Every array of one split has one row per voxel row; the split is not empty."""
    vox_path, voxels = files["voxels"]
    n = int(voxels.shape[0])
    if n == 0:
        raise DataError(f"{vox_path} has 0 rows (an empty split); {fix}.")
    for name, (path, arr) in files.items():
        if arr is not None and int(arr.shape[0]) != n:
            raise DataError(f"{path} has {int(arr.shape[0])} rows but {vox_path} has {n}; the files of one split "
                            f"must match row for row; {fix}.")


def _check_voxel_counts(first: tuple[Path, Any], second: tuple[Path, Any], fix: str) -> None:
    (p1, a1), (p2, a2) = first, second
    if a1.shape[1] != a2.shape[1]:
        raise DataError(f"{p1} has {a1.shape[1]} voxels per row but {p2} has {a2.shape[1]}; both splits must come "
                        f"from the same ROI mask; {fix}.")


def load_brain_diffuser(path: str | os.PathLike, subjects: Sequence[int] | None = None) -> Dataset:
    """Open Brain-Diffuser's ``processed_data`` directory (see the module docstring)."""
    path = Path(path)
    root = _brain_diffuser_root(path)
    present = _brain_diffuser_subjects(path)
    wanted = choose_subjects(present, subjects, lambda absent: (
        f"Brain-Diffuser data for subject(s) {absent} not found under {root}; "
        f"expected {root}/subjXX/{BRAIN_DIFFUSER_FILES['voxels'].format(split='train', n='N')}. "
        f"Subjects present: {present}."))
    data = {}
    all_ids_known = True
    for s in wanted:
        d = root / f"subj{s:02d}"
        splits, voxel_files = {}, {}
        for split in SPLITS:
            vox_file = d / BRAIN_DIFFUSER_FILES["voxels"].format(split=split, n=s)
            if not vox_file.exists():
                raise DataError(f"Missing {vox_file} (Brain-Diffuser {split} voxels of subject {s}); {_FIX_BD}.")
            voxels = _checked(vox_file, "voxels", load_array(vox_file, mmap=True, fix=_FIX_BD), _FIX_BD)
            n = voxels.shape[0]
            stim, cap, ids_file = (d / BRAIN_DIFFUSER_FILES[k].format(split=split, n=s)
                                   for k in ("images", "captions", "ids"))
            files: dict[str, tuple[Path, Any]] = {"voxels": (vox_file, voxels)}
            if ids_file.exists():
                ids = _checked(ids_file, "ids", load_array(ids_file, fix=_FIX_BD), _FIX_BD)
                files["ids"] = (ids_file, ids)
            else:
                ids = np.arange(n) if split == "test" else 1_000_000 * s + np.arange(n)
                all_ids_known = False
            images = captions = None
            if stim.exists():
                # Brain-Diffuser stores its stimuli as float64 in 0..255.
                images = _checked(stim, "images", load_array(stim, mmap=True, fix=_FIX_BD), _FIX_BD, kinds="uf")
                files["images"] = (stim, images)
            if cap.exists():
                captions = _checked(cap, "captions", load_array(cap, fix=_FIX_BD), _FIX_BD, kinds="US")
                files["captions"] = (cap, captions)
            _check_rows(files, _FIX_BD)
            voxel_files[split] = (vox_file, voxels)
            splits[split] = SplitArrays(voxels=voxels, ids=ids, images=images, captions=captions)
        _check_voxel_counts(voxel_files["train"], voxel_files["test"], _FIX_BD)
        data[s] = splits
    spec = {"kind": "brain-diffuser", "path": str(path.resolve()), "subjects": wanted}
    return Dataset(data, spec=spec, name=f"brain-diffuser:{path.name}", ids_are_nsd=all_ids_known)


def load_brainrecon(path: str | os.PathLike, subjects: Sequence[int] | None = None) -> Dataset:
    """Open a directory prepared by ``brainrecon prepare-nsd`` (see the module docstring)."""
    path = Path(path)
    manifest = read_brainrecon_manifest(path / MANIFEST, fix=_FIX_BR)
    present = manifest["subjects"]
    wanted = choose_subjects(present, subjects, lambda absent: (
        f"Subject(s) {absent} not prepared in {path}; subjects present: {present} "
        f"(its {MANIFEST}). Run `brainrecon prepare-nsd --subject N --out {path}`."))
    data = {}
    for s in wanted:
        d = path / f"subj{s:02d}"
        splits, voxel_files = {}, {}
        for split in SPLITS:
            files: dict[str, tuple[Path, Any]] = {}
            for name in ARRAYS:
                f = d / BRAINRECON_FILES[name].format(split=split)
                if not f.exists():
                    if name in ("voxels", "ids"):
                        raise DataError(f"Missing {f} (subject {s} is listed in {path / MANIFEST}); {_FIX_BR}.")
                    continue
                lazy = name in ("voxels", "images", "surfaces")
                files[name] = (f, _checked(f, name, load_array(f, mmap=lazy, fix=_FIX_BR), _FIX_BR))
            _check_rows(files, _FIX_BR)
            voxel_files[split] = files["voxels"]

            def get(name: str):
                return files[name][1] if name in files else None

            splits[split] = SplitArrays(
                voxels=get("voxels"),
                ids=np.asarray(get("ids")),
                images=get("images"),
                captions=get("captions"),
                surfaces=get("surfaces"),
                trials=_read_trials(d, split, files["voxels"], _FIX_BR),
            )
        _check_voxel_counts(voxel_files["train"], voxel_files["test"], _FIX_BR)
        data[s] = splits
    spec = {"kind": "brainrecon", "path": str(path.resolve()), "subjects": wanted,
            "source": manifest.get("source", {})}
    return Dataset(
        data,
        spec=spec,
        name=manifest.get("name", f"brainrecon:{path.name}"),
        ids_are_nsd=manifest.get("ids_are_nsd", True),
    )


def _read_trials(d: Path, split: str, voxels: tuple[Path, Any], fix: str) -> Trials | None:
    """The single trials written by ``prepare-nsd --keep-repetitions``, checked against the averages."""
    paths = {k: d / name.format(split=split) for k, name in TRIAL_FILES.items()}
    present = [k for k, p in paths.items() if p.exists()]
    if not present:
        return None
    if len(present) != len(paths):
        missing = [str(paths[k]) for k in paths if k not in present]
        raise DataError(f"{missing[0]} is missing but {paths[present[0]].name} is present (single trials come as "
                        f"{len(paths)} files); {fix}.")
    vox = _checked(paths["voxels"], "voxels", load_array(paths["voxels"], mmap=True, fix=fix), fix)
    arrays = {k: _checked(paths[k], "ids", load_array(paths[k], fix=fix), fix) for k in ("rows", "repetition", "trial")}
    n_trials, n_images = vox.shape[0], voxels[1].shape[0]
    for k, a in arrays.items():
        if a.shape[0] != n_trials:
            raise DataError(f"{paths[k]} has {a.shape[0]} rows but {paths['voxels']} has {n_trials}; {fix}.")
    rows = arrays["rows"]
    if vox.shape[1] != voxels[1].shape[1]:
        raise DataError(f"{paths['voxels']} has {vox.shape[1]} voxels per trial but {voxels[0]} has "
                        f"{voxels[1].shape[1]}; {fix}.")
    if n_trials == 0 or rows.min() < 0 or rows.max() >= n_images or np.unique(rows).size != n_images:
        raise DataError(f"{paths['rows']} must give every one of the {n_images} images of {voxels[0].name} at least "
                        f"one trial, and no other row; {fix}.")
    if arrays["repetition"].min() < 0:
        raise DataError(f"{paths['repetition']} holds negative repetition indices; {fix}.")
    return Trials(vox, rows=rows, repetition=arrays["repetition"], trial=arrays["trial"])


def read_brainrecon_manifest(path: str | os.PathLike, *, fix: str) -> dict[str, Any]:
    """Read and check a ``brainrecon-data.json`` manifest: an object with ``format``
    "brainrecon-data", ``subjects`` (a list of subject numbers), ``source`` (an object whose
    ``kind`` is a string) and optional fields of the right kinds; anything else is one
    :class:`DataError` naming the file, expected vs found, and ``fix``."""
    path = Path(path)
    manifest = read_json(path, required=("format", "subjects", "source"), fix=fix,
                         types={"format": str, "subjects": list, "source": dict, "ids_are_nsd": bool,
                                "name": str, "version": int, "subject_info": dict, "surfaces": dict})
    if manifest["format"] != "brainrecon-data":
        raise DataError(f"{path} is not a brainrecon data manifest: its 'format' is {manifest['format']!r}, expected "
                        f"'brainrecon-data'; {fix}.")
    subjects = manifest["subjects"]
    if not all(isinstance(x, int) and not isinstance(x, bool) for x in subjects):
        raise DataError(f"{path}: 'subjects' is {subjects!r}, expected a list of subject numbers; {fix}.")
    if not isinstance(manifest["source"].get("kind", ""), str):
        raise DataError(f"{path}: 'source.kind' is {manifest['source']['kind']!r}, expected a string; {fix}.")
    for key in ("subject_info", "surfaces"):
        bad = [k for k, v in manifest.get(key, {}).items() if not isinstance(v, dict)]
        if bad:
            raise DataError(f"{path}: '{key}' entries {bad} are not objects; {fix}.")
    return manifest


def load_arrays_file(path: str | os.PathLike, subjects: Sequence[int] | None = None) -> Dataset:
    """Open an ``.h5`` file with ``subjXX/{train,test}_voxels`` etc. (lazy HDF5 reads)."""
    import h5py

    path = Path(path)
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise DataError(f"{path} could not be opened as HDF5 ({exc}); the file is damaged, truncated or not "
                        f"HDF5; {_FIX_H5}.") from None
    present = sorted(int(m.group(1)) for k in f.keys() if (m := re.fullmatch(r"subj(\d\d)", k)))
    wanted = choose_subjects(present, subjects, lambda absent: (
        f"{path}: subject group(s) {['subj%02d' % s for s in absent]} not found; "
        f"groups present: {list(f.keys())}."))
    ids_are_nsd = f.attrs.get("ids_are_nsd", False)
    if not isinstance(ids_are_nsd, (bool, np.bool_)):
        raise DataError(f"{path}: attribute 'ids_are_nsd' is {ids_are_nsd!r}, expected true or false; {_FIX_H5}.")
    ids_are_nsd = bool(ids_are_nsd)
    data = {}
    for s in wanted:
        g = f[f"subj{s:02d}"]
        if not isinstance(g, h5py.Group):
            raise DataError(f"{path}: subj{s:02d} is a dataset, expected a group; {_FIX_H5}.")
        splits, voxel_files = {}, {}
        for split in SPLITS:
            # Optional datasets come in pairs: one split having what the other lacks is damage.
            # (Ids may be given for one split only: the other gets row positions.)
            for name in ("images", "captions", "surfaces"):
                have = [sp for sp in SPLITS if f"{sp}_{name}" in g]
                if len(have) == 1:
                    other = "test" if have[0] == "train" else "train"
                    raise DataError(f"{path}: dataset subj{s:02d}/{have[0]}_{name} is present but "
                                    f"subj{s:02d}/{other}_{name} is missing; {_FIX_H5}.")
            if f"{split}_voxels" not in g:
                raise DataError(f"{path}: dataset subj{s:02d}/{split}_voxels is missing; {_FIX_H5}.")
            files: dict[str, tuple[str, Any]] = {}
            for name in ("voxels", "ids", "images", "captions", "surfaces"):
                key = f"{split}_{name}"
                if key not in g:
                    continue
                dset = g[key]
                where = f"{path}: dataset subj{s:02d}/{key}"
                if not isinstance(dset, h5py.Dataset):
                    raise DataError(f"{where} is a group, expected a dataset; {_FIX_H5}.")
                kinds = "SUO" if name == "captions" else None
                arr = _checked(Path(f"{where}"), name, dset, _FIX_H5, kinds=kinds)
                if name in ("ids", "captions"):
                    arr = _H5Array(arr, path)[()]
                    arr = arr.astype(str) if name == "captions" else arr
                else:
                    arr = _H5Array(arr, path)
                files[name] = (where, arr)
            _check_rows(files, _FIX_H5)
            voxel_files[split] = files["voxels"]
            n = files["voxels"][1].shape[0]

            def get(name: str):
                return files[name][1] if name in files else None

            ids = get("ids")
            if ids is None:
                ids = np.arange(n) if split == "test" else 1_000_000 * s + np.arange(n)
            splits[split] = SplitArrays(voxels=get("voxels"), ids=ids, images=get("images"),
                                        captions=get("captions"), surfaces=get("surfaces"))
        _check_voxel_counts(voxel_files["train"], voxel_files["test"], _FIX_H5)
        data[s] = splits
    spec = {"kind": "arrays", "path": str(path.resolve()), "subjects": wanted}
    return Dataset(data, spec=spec, name=f"arrays:{path.name}", ids_are_nsd=ids_are_nsd)


class _H5Array:
    """An HDF5 dataset read lazily; a read that fails (a damaged file) is a :class:`DataError`
    naming the file instead of h5py's OSError."""

    def __init__(self, dset: Any, path: Path):
        self._dset = dset
        self.path = path
        self.shape = tuple(dset.shape)
        self.dtype = dset.dtype
        self.ndim = len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index: Any) -> np.ndarray:
        try:
            return self._dset[index]
        except OSError as exc:
            raise DataError(f"{self.path}: dataset {self._dset.name} could not be read ({exc}); the file is damaged "
                            f"or truncated; {_FIX_H5}.") from None

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        arr = np.asarray(self[()])
        return arr if dtype is None else arr.astype(dtype)


def dataset_from_spec(spec: dict[str, Any]) -> Dataset:
    """Re-open the dataset described by ``Dataset.spec`` (as stored in a run record)."""
    kind = spec.get("kind")
    subjects = spec.get("subjects")
    if kind == "synthetic":
        from brainrecon.data.synthetic import make_synthetic

        options = {k: v for k, v in spec.items() if k != "kind"}
        if "n_voxels" in options:
            options["n_voxels"] = {int(k): int(v) for k, v in options["n_voxels"].items()}
        return make_synthetic(**options)
    options = {k: spec[k] for k in _OPTION_KINDS if k in spec}
    if kind in ("brain-diffuser", "brainrecon", "arrays", "mindeye1", "mindeye2"):
        path = Path(spec["path"])
        if not path.exists():
            raise DataError(
                f"The run's data is no longer at {path}; pass its new location as source.", parameters=("source",)
            )
        if kind in ("mindeye1", "mindeye2"):
            from brainrecon.data.mindeye import load_mindeye1, load_mindeye2

            loader = load_mindeye1 if kind == "mindeye1" else load_mindeye2
            return loader(path, subjects=subjects, options=options)
        ds = _LOADERS[kind](path, subjects=subjects)
        return _with_validation_options(ds, options) if options else ds
    raise DataError(f"Unknown dataset kind {kind!r} in a run record; valid: synthetic, brain-diffuser, brainrecon, "
                    f"arrays, mindeye1, mindeye2.")


_LOADERS = {"brain-diffuser": load_brain_diffuser, "brainrecon": load_brainrecon, "arrays": load_arrays_file}
