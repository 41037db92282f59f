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
    The built-in synthetic dataset; ``synthetic:n_train=200,n_test=16`` sets its options.
``arrays``
    One ``.h5`` / ``.hdf5`` file with datasets ``subjXX/{train,test}_{voxels,images,ids,
    captions,surfaces}`` (images and ids optional), or a directory of such ``.npy`` files
    without a manifest.

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

from brainrecon.data.dataset import SPLITS, Dataset, SplitArrays
from brainrecon.errors import DataError
from brainrecon.io import read_json

ENV_VAR = "BRAINRECON_DATA"
MANIFEST = "brainrecon-data.json"
SYNTHETIC = "synthetic"

_BD_VOXELS = "nsd_{split}_fmriavg_nsdgeneral_sub{n}.npy"
_BD_STIM = "nsd_{split}_stim_sub{n}.npy"
_BD_CAP = "nsd_{split}_cap_sub{n}.npy"
# Written beside Brain-Diffuser's files by `brainrecon prepare-nsd --format brain-diffuser`.
_BD_IDS = "nsd_{split}_ids_sub{n}.npy"


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
        tried.append(f"explicit argument / --data: {source}")
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
    path = Path(source).expanduser()
    if not path.exists():
        raise DataError(
            f"Data not found at {path}. Places tried, in order: {'; '.join(tried)}. "
            f"Pass --data DIR (a brainrecon or Brain-Diffuser prepared directory, or an .h5 "
            f"file), set {ENV_VAR}, or omit both to use the built-in synthetic dataset."
        )
    kind = detect_format(path)
    if kind == "brainrecon":
        ds = load_brainrecon(path, subjects=subjects)
    elif kind == "brain-diffuser":
        ds = load_brain_diffuser(path, subjects=subjects)
    elif kind == "arrays":
        ds = load_arrays_file(path, subjects=subjects)
    else:
        raise DataError(
            f"{path} holds no recognised data layout. Expected one of: a {MANIFEST} manifest "
            f"(brainrecon prepare-nsd), Brain-Diffuser files "
            f"(subjXX/{_BD_VOXELS.format(split='train', n='N')}), or an .h5 file with "
            f"subjXX/train_voxels datasets. Places tried: {'; '.join(tried)}."
        )
    return ds


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
    if (path / MANIFEST).is_file():
        return "brainrecon"
    if _brain_diffuser_subjects(path):
        return "brain-diffuser"
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
        if (d / _BD_VOXELS.format(split="train", n=n)).is_file():
            found.append(n)
    return found


def _mmap(path: Path) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as exc:
        raise DataError(f"{path} could not be read as a plain .npy array: {exc}") from exc


def load_brain_diffuser(path: str | os.PathLike, subjects: Sequence[int] | None = None) -> Dataset:
    """Open Brain-Diffuser's ``processed_data`` directory (see the module docstring)."""
    path = Path(path)
    root = _brain_diffuser_root(path)
    present = _brain_diffuser_subjects(path)
    wanted = present if subjects is None else [int(s) for s in subjects]
    missing = [s for s in wanted if s not in present]
    if missing or not wanted:
        raise DataError(
            f"Brain-Diffuser data for subject(s) {missing or wanted} not found under {root}; "
            f"expected {root}/subjXX/{_BD_VOXELS.format(split='train', n='N')}. "
            f"Subjects present: {present}."
        )
    data = {}
    all_ids_known = True
    for s in wanted:
        d = root / f"subj{s:02d}"
        splits = {}
        for split in SPLITS:
            vox_file = d / _BD_VOXELS.format(split=split, n=s)
            if not vox_file.is_file():
                raise DataError(f"Missing {vox_file} (Brain-Diffuser {split} voxels of subject {s}).")
            voxels = _mmap(vox_file)
            n = voxels.shape[0]
            stim = d / _BD_STIM.format(split=split, n=s)
            cap = d / _BD_CAP.format(split=split, n=s)
            ids_file = d / _BD_IDS.format(split=split, n=s)
            if ids_file.is_file():
                ids = np.load(ids_file, allow_pickle=False)
            else:
                ids = np.arange(n) if split == "test" else 1_000_000 * s + np.arange(n)
                all_ids_known = False
            captions = None
            if cap.is_file():
                captions = np.load(cap, allow_pickle=False)
            splits[split] = SplitArrays(
                voxels=voxels,
                ids=ids,
                images=_mmap(stim) if stim.is_file() else None,
                captions=captions,
            )
        data[s] = splits
    spec = {"kind": "brain-diffuser", "path": str(path.resolve()), "subjects": wanted}
    return Dataset(data, spec=spec, name=f"brain-diffuser:{path.name}", ids_are_nsd=all_ids_known)


def load_brainrecon(path: str | os.PathLike, subjects: Sequence[int] | None = None) -> Dataset:
    """Open a directory prepared by ``brainrecon prepare-nsd`` (see the module docstring)."""
    path = Path(path)
    manifest = read_json(path / MANIFEST)
    if manifest.get("format") != "brainrecon-data":
        raise DataError(f"{path / MANIFEST} is not a brainrecon data manifest (format field).")
    present = [int(s) for s in manifest.get("subjects", [])]
    wanted = present if subjects is None else [int(s) for s in subjects]
    missing = [s for s in wanted if s not in present]
    if missing or not wanted:
        raise DataError(
            f"Subject(s) {missing or wanted} not prepared in {path}; subjects present: {present}. "
            f"Run: brainrecon prepare-nsd --subject N --out {path}"
        )
    data = {}
    for s in wanted:
        d = path / f"subj{s:02d}"
        splits = {}
        for split in SPLITS:
            def opt(name: str):
                f = d / f"{split}_{name}.npy"
                return _mmap(f) if f.is_file() else None

            voxels = opt("voxels")
            ids = opt("ids")
            if voxels is None or ids is None:
                raise DataError(
                    f"Missing {d}/{split}_voxels.npy or {split}_ids.npy; re-run brainrecon prepare-nsd."
                )
            captions = None
            if (d / f"{split}_captions.npy").is_file():
                captions = np.load(d / f"{split}_captions.npy", allow_pickle=False)
            splits[split] = SplitArrays(
                voxels=voxels,
                ids=np.asarray(ids),
                images=opt("images"),
                captions=captions,
                surfaces=opt("surfaces"),
            )
        data[s] = splits
    spec = {"kind": "brainrecon", "path": str(path.resolve()), "subjects": wanted,
            "source": manifest.get("source", {})}
    return Dataset(
        data,
        spec=spec,
        name=manifest.get("name", f"brainrecon:{path.name}"),
        ids_are_nsd=bool(manifest.get("ids_are_nsd", True)),
    )


def load_arrays_file(path: str | os.PathLike, subjects: Sequence[int] | None = None) -> Dataset:
    """Open an ``.h5`` file with ``subjXX/{train,test}_voxels`` etc. (lazy HDF5 reads)."""
    import h5py

    path = Path(path)
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise DataError(f"{path} could not be opened as HDF5: {exc}") from exc
    present = sorted(int(m.group(1)) for k in f.keys() if (m := re.fullmatch(r"subj(\d\d)", k)))
    wanted = present if subjects is None else [int(s) for s in subjects]
    missing = [s for s in wanted if s not in present]
    if missing or not wanted:
        raise DataError(
            f"{path}: subject group(s) {['subj%02d' % s for s in (missing or wanted)]} not found; "
            f"groups present: {list(f.keys())}."
        )
    data = {}
    for s in wanted:
        g = f[f"subj{s:02d}"]
        splits = {}
        for split in SPLITS:
            if f"{split}_voxels" not in g:
                raise DataError(f"{path}: dataset subj{s:02d}/{split}_voxels is missing.")
            voxels = g[f"{split}_voxels"]
            n = voxels.shape[0]
            ids = g[f"{split}_ids"][:] if f"{split}_ids" in g else (
                np.arange(n) if split == "test" else 1_000_000 * s + np.arange(n)
            )
            captions = g[f"{split}_captions"][:].astype(str) if f"{split}_captions" in g else None
            splits[split] = SplitArrays(
                voxels=voxels,
                ids=ids,
                images=g[f"{split}_images"] if f"{split}_images" in g else None,
                captions=captions,
                surfaces=g[f"{split}_surfaces"] if f"{split}_surfaces" in g else None,
            )
        data[s] = splits
    ids_are_nsd = bool(f.attrs.get("ids_are_nsd", False))
    spec = {"kind": "arrays", "path": str(path.resolve()), "subjects": wanted}
    return Dataset(data, spec=spec, name=f"arrays:{path.name}", ids_are_nsd=ids_are_nsd)


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
    if kind in ("brain-diffuser", "brainrecon", "arrays"):
        path = Path(spec["path"])
        if not path.exists():
            raise DataError(
                f"The run's data is no longer at {path}; pass --data to point at its new location."
            )
        loader = {"brain-diffuser": load_brain_diffuser, "brainrecon": load_brainrecon,
                  "arrays": load_arrays_file}[kind]
        return loader(path, subjects=subjects)
    raise DataError(f"Unknown dataset kind {kind!r} in a run record; valid: synthetic, brain-diffuser, brainrecon, arrays.")
