"""Fuzz every input file brainrecon reads: the NSD release prepare-nsd consumes, prepare-nsd's own
work folder (state, staged sessions, half-copied images) and manifest, a prepared brainrecon
folder, a Brain-Diffuser folder, an .h5 arrays file, NeuroPictor's surface maps, MindEye1's
webdataset (tar shards and extracted folders) and MindEye2's HDF5 + behaviour shards.

Each corruption (truncation at 10/50/90 %, the last byte cut, an empty file, garbage bytes, a
directory in place of the file, and per format: not-JSON, JSON of the wrong kind, a missing,
null or wrongly typed field; an array of the wrong dtype or shape; a missing HDF5 dataset or one
of the wrong shape or dtype; a .mat without its variables; a NIfTI of the wrong shape; a tar shard without one member of its first sample, with that
member's array of the wrong shape or its bytes garbled, or with no members) is applied
to one file of a hard-linked copy. Then the reader runs (prepare-nsd, then opening the dataset
and reading every array). Each case must end in a :class:`BrainreconError` whose message names
the file, or give exactly the intact result; anything else (a raw exception, a different answer)
is collected, and each file's failures are one assertion message.

Images stored as float are Brain-Diffuser's own form, so the "as floats" case of a uint8 image
array is the exact float copy (accepted or refused, never rounded differently).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import sys
import time
import warnings
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest
import scipy.io

from brainrecon.data import load_dataset
from brainrecon.data import nsd
from brainrecon.data.nsd import prepare as nsd_prepare  # where the preparation looks its helpers up
from brainrecon.data.miniature import write_mindeye1, write_mindeye2
from brainrecon.data.nsd import prepare_nsd
from brainrecon.errors import BrainreconError

sys.path.insert(0, str(Path(__file__).parent))
from test_nsd_prepare import build_release  # noqa: E402
from test_surfaces import make_mask, write_brainrecon, write_per_sample  # noqa: E402

pytestmark = pytest.mark.slow

CAPTIONS = "COCO_73k_annots_curated.npy"
_MASK = "nsddata/ppdata/subj01/func1pt8mm/roi/nsdgeneral.nii.gz"
_BETAS = "nsddata_betas/ppdata/subj01/func1pt8mm/betas_fithrf_GLMdenoise_RR/"
PARTIAL = ".prepare-nsd-subj01.partial"
SURF_LABELS = np.array([5, 7, 5, 9, 7, 5, 11, 3, 3, 13])


# --------------------------------------------------------------------------- what a user gets
def _use(path: Path) -> dict:
    """Everything a user reads from a dataset, as plain values to compare."""
    ds = load_dataset(path)
    out = {"ids_are_nsd": ds.ids_are_nsd, "source": ds.spec.get("source")}
    for s in ds.subjects:
        out[f"{s} fingerprint"] = ds.fingerprint(s)
        for split in ("train", "test"):
            part = getattr(ds, split)
            out[f"{s} {split} ids"] = part.ids(s)
            out[f"{s} {split} voxels"] = part.voxels(s)
            out[f"{s} {split} images"] = part.images(s) if part._arrays(s).images is not None else None
            out[f"{s} {split} captions"] = part.captions(s)
            out[f"{s} {split} surfaces"] = part.surfaces(s)
            if part.has_trials(s):
                t = part.trials(s)
                out[f"{s} {split} trials"] = {"voxels": part.trial_voxels(s)[0], "rows": t.rows,
                                              "repetition": t.repetition, "trial": t.trial}
        out[f"{s} validation ids"] = ds.validation.ids(s) if len(ds.validation_rows[s]) else None
    return out


def _prepare(root: Path, out: Path, **kw) -> dict:
    kw = {"sessions": 1, "captions": root / CAPTIONS, "ncsnr_threshold": 0.0, "progress": False, **kw}
    with contextlib.redirect_stderr(io.StringIO()):
        prepare_nsd(root, 1, out, **kw)
    return _use(out)


def _same(a, b) -> bool:
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return (isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.dtype == b.dtype
                and a.shape == b.shape and np.array_equal(a, b, equal_nan=a.dtype.kind == "f"))
    return type(a) is type(b) and a == b


# --------------------------------------------------------------------------- corruptions
def _replace(path: Path, data: bytes) -> None:
    path.unlink()  # the copy's untouched files are hard links to the pristine ones
    path.write_bytes(data)


def _bytes_cases(path: Path) -> dict:
    data = path.read_bytes()
    rng = np.random.default_rng(len(data))
    cases = {f"truncated to {k:.0%}": data[: int(len(data) * k)] for k in (0.1, 0.5, 0.9)}
    cases["last byte cut"] = data[:-1]
    cases["empty"] = b""
    cases["garbage"] = rng.integers(0, 256, len(data), dtype=np.uint8).tobytes()
    return {name: (lambda p, d=d: _replace(p, d)) for name, d in cases.items()}


def _directory(path: Path) -> None:
    path.unlink()
    path.mkdir()


def _json_cases(path: Path) -> dict:
    obj = json.loads(path.read_text())
    cases = {"not JSON": b"hello", "a JSON list": b"[]", "a JSON string": b'"x"', "a JSON number": b"3",
             "extra field": json.dumps({**obj, "zz_extra": [1, 2]}).encode()}
    for key, value in obj.items():
        cases[f"missing {key!r}"] = json.dumps({k: v for k, v in obj.items() if k != key}).encode()
        cases[f"{key!r} is null"] = json.dumps({**obj, key: None}).encode()
        other = [["x"]] if isinstance(value, str) else "x"
        cases[f"{key!r} of another kind"] = json.dumps({**obj, key: other}).encode()
        if isinstance(value, list) and value:
            cases[f"{key!r} holds strings"] = json.dumps({**obj, key: ["x"] * len(value)}).encode()
        if isinstance(value, dict) and value:
            first = next(iter(value))
            other = [["x"]] if isinstance(value[first], str) else "x"
            cases[f"{key!r}.{first} of another kind"] = json.dumps({**obj, key: {**value, first: other}}).encode()
    return {name: (lambda p, d=d: _replace(p, d)) for name, d in cases.items()}


def _saver(new):
    return lambda p: (p.unlink(), np.save(p, new))


def _npy_cases(path: Path) -> dict:
    arr = np.load(path)
    cases = {"as strings": _saver(arr.astype(str)), "flattened": _saver(arr.reshape(-1)),
             "an extra axis": _saver(arr[None]), "a scalar": _saver(np.asarray(arr.reshape(-1)[0]))}
    if arr.ndim:
        cases["one row less"] = _saver(arr[:-1])
    if arr.dtype.kind == "f":
        cases["as integers"] = _saver(arr.astype(np.int64))
    elif arr.dtype == np.uint8:
        cases["as floats"] = _saver(arr.astype(np.float64))  # Brain-Diffuser's own image dtype
    elif arr.dtype.kind in "iu":
        cases["as floats"] = _saver(arr.astype(np.float64) + 0.5)
    else:
        cases["as floats"] = _saver(np.zeros(arr.shape))
    return cases


def _npz_cases(path: Path) -> dict:
    with np.load(path) as f:
        arrays = {k: f[k] for k in f.files}

    def saver(new):
        return lambda p: (p.unlink(), np.savez(p, **new))

    cases = {"extra array": saver({**arrays, "zz_extra": np.zeros(3)})}
    for k, v in arrays.items():
        cases[f"missing {k!r}"] = saver({n: a for n, a in arrays.items() if n != k})
        cases[f"{k!r} as strings"] = saver({**arrays, k: v.astype(str)})
        cases[f"{k!r} one row less"] = saver({**arrays, k: v[:-1]})
        cases[f"{k!r} flattened"] = saver({**arrays, k: v.reshape(-1)})
    return cases


def _h5_rewrite(path: Path, change: dict) -> None:
    """Rewrite ``path`` with every dataset copied except those in ``change`` (name -> None to
    drop it, or a callable(dataset) -> (shape, dtype, data or None) for a new one)."""
    tmp = path.with_name(path.name + ".new")
    with h5py.File(path, "r") as src, h5py.File(tmp, "w") as dst:
        for k, v in src.attrs.items():
            dst.attrs[k] = v

        def visit(name, obj):
            if isinstance(obj, h5py.Group):
                dst.require_group(name)
                return
            if name in change:
                if change[name] is None:
                    return
                shape, dtype, data = change[name](obj)
                if data is not None:
                    dst.create_dataset(name, data=data)
                else:
                    dst.create_dataset(name, shape=shape, dtype=dtype, chunks=(1,) + tuple(shape[1:]))
            else:
                src.copy(obj, dst.require_group(os.path.dirname(name) or "/"), name=os.path.basename(name))
        src.visititems(visit)
    path.unlink()
    os.replace(tmp, path)


def _h5_cases(path: Path) -> dict:
    with h5py.File(path, "r") as f:
        names = []
        f.visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) else None)
        big = {n for n in names if f[n].size > 10_000_000}
    cases = {}
    for n in names:
        cases[f"missing {n!r}"] = lambda p, n=n: _h5_rewrite(p, {n: None})
        if n in big:  # too big to rewrite: new empty datasets of the wrong shape or dtype
            cases[f"{n!r} as float32"] = lambda p, n=n: _h5_rewrite(p, {n: lambda d: (d.shape, np.float32, None)})
            cases[f"{n!r} without its last axis"] = lambda p, n=n: _h5_rewrite(p, {n: lambda d: (d.shape[:-1], d.dtype, None)})
            cases[f"{n!r} with 100 rows"] = lambda p, n=n: _h5_rewrite(p, {n: lambda d: ((100,) + d.shape[1:], d.dtype, None)})
            continue
        cases[f"{n!r} one row less"] = lambda p, n=n: _h5_rewrite(p, {n: lambda d: (None, None, d[:-1])})
        cases[f"{n!r} an extra axis"] = lambda p, n=n: _h5_rewrite(p, {n: lambda d: (None, None, d[()][None])})
        cases[f"{n!r} as strings"] = lambda p, n=n: _h5_rewrite(
            p, {n: lambda d: (None, None, np.char.encode(np.asarray(d[()]).astype(str)))})
        cases[f"{n!r} wrong dtype"] = lambda p, n=n: _h5_rewrite(p, {n: lambda d: (None, None, _other_dtype(d[()]))})
    return cases


def _other_dtype(a: np.ndarray) -> np.ndarray:
    if a.dtype.kind == "f":
        return a.astype(np.int64)
    if a.dtype.kind in "iub":
        return a.astype(np.float64) + 0.5
    return np.zeros(a.shape)


def _mat_cases(path: Path) -> dict:
    mat = {k: v for k, v in scipy.io.loadmat(path).items() if not k.startswith("__")}

    def saver(new):
        return lambda p: (p.unlink(), scipy.io.savemat(p, new))

    cases = {"no variables": saver({"x": np.zeros(1)})}
    for k in ("masterordering", "subjectim"):
        cases[f"missing {k!r}"] = saver({n: v for n, v in mat.items() if n != k})
        cases[f"{k!r} as text"] = saver({**mat, k: "abc"})
        cases[f"{k!r} non-integer"] = saver({**mat, k: mat[k] + 0.5})
        cases[f"{k!r} transposed"] = saver({**mat, k: mat[k].T})
        cases[f"{k!r} cut short"] = saver({**mat, k: mat[k][:, :100]})
    cases["masterordering holds 0"] = saver({**mat, "masterordering": mat["masterordering"] * 0})
    return cases


def _nifti_cases(path: Path) -> dict:
    img = nib.load(path)
    data = np.asanyarray(img.dataobj)

    def saver(new):
        return lambda p: (p.unlink(), nib.save(nib.Nifti1Image(new, np.eye(4)), p))

    cases = {"2-D": saver(data[..., 0]), "another grid": saver(data[:-1]), "5-D": saver(data[..., None, None]),
             "as float64": saver(data.astype(np.float64)), "zeros": saver(np.zeros_like(data))}
    if data.ndim == 4:
        cases["a volume less"] = saver(data[..., :-1])
    return cases


def _tar_cases(path: Path) -> dict:
    import tarfile

    with tarfile.open(path) as tf:
        members = [(m.name, tf.extractfile(m).read()) for m in tf if m.isfile()]
    first = members[0][0].split(".", 1)[0]

    def writer(new):
        def write(p):
            p.unlink()
            with tarfile.open(p, "w", format=tarfile.USTAR_FORMAT) as out:
                for name, data in new:
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    out.addfile(info, io.BytesIO(data))
        return write

    buf = io.BytesIO()
    np.save(buf, np.zeros(2))
    cases = {"no members": writer([])}
    for name, _ in members:
        if name.split(".", 1)[0] != first:
            continue
        ext = name.split(".", 1)[1]
        cases[f"without {ext} of the first sample"] = writer([(n, d) for n, d in members if n != name])
        cases[f"{ext} garbled"] = writer([(n, d if n != name else b"\x93NUMPY garbage" + d[:7])
                                          for n, d in members])
        if ext.endswith(".npy"):
            cases[f"{ext} a (2,) array"] = writer([(n, d if n != name else buf.getvalue()) for n, d in members])
    return cases


FAMILIES = {"json": _json_cases, "npy": _npy_cases, "npz": _npz_cases, "hdf5": _h5_cases, "mat": _mat_cases,
            "nifti": _nifti_cases, "tar": _tar_cases, "image": lambda path: {}}


# --------------------------------------------------------------------------- the files
def _copy_tree(src: Path, dst: Path, real: bool = False) -> Path:
    shutil.copytree(src, dst, copy_function=shutil.copy2 if real else os.link)
    return dst


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    top = tmp_path_factory.mktemp("fuzz-inputs")
    root = top / "nsd"
    build_release(root)
    rng = np.random.default_rng(7)
    ncsnr = root / _BETAS / "ncsnr.nii.gz"
    nib.save(nib.Nifti1Image(rng.normal(size=(8, 7, 6)).astype(np.float32), np.eye(4)), ncsnr)

    prepared = top / "prepared"
    intact_nsd = _prepare(root, prepared)
    # Surface maps as prepare-surfaces writes them (small here: the loader reads any (n, H, W)).
    for split in ("train", "test"):
        n = np.load(prepared / "subj01" / f"{split}_ids.npy").size
        np.save(prepared / "subj01" / f"{split}_surfaces.npy", rng.normal(size=(n, 6, 5)).astype(np.float32))

    bd = top / "bd"
    with contextlib.redirect_stderr(io.StringIO()):
        prepare_nsd(root, 1, bd, sessions=1, captions=root / CAPTIONS, format="brain-diffuser", progress=False)

    arrays = top / "arrays"
    arrays.mkdir()
    with h5py.File(arrays / "data.h5", "w") as f:
        g = f.create_group("subj01")
        for split in ("train", "test"):
            for name in ("voxels", "ids", "images", "captions", "surfaces"):
                a = np.load(prepared / "subj01" / f"{split}_{name}.npy")
                g[f"{split}_{name}"] = np.char.encode(a) if a.dtype.kind == "U" else a
        f.attrs["ids_are_nsd"] = True

    # prepare-nsd killed while copying training images: a staged session, a state file, and
    # half of images_train.npy written.
    killed = top / "killed"
    real = nsd_prepare._read_image
    calls = []

    def stop(*a):
        calls.append(1)
        if len(calls) > 10:
            raise KeyboardInterrupt
        return real(*a)

    saved = nsd_prepare._read_image, nsd_prepare.IMAGE_CHECKPOINT
    nsd_prepare._read_image, nsd_prepare.IMAGE_CHECKPOINT = stop, 4
    try:
        with pytest.raises(KeyboardInterrupt), contextlib.redirect_stderr(io.StringIO()):
            prepare_nsd(root, 1, killed, sessions=1, captions=root / CAPTIONS, ncsnr_threshold=0.0, progress=False)
    finally:
        nsd_prepare._read_image, nsd_prepare.IMAGE_CHECKPOINT = saved
    assert json.loads((killed / PARTIAL / "state.json").read_text())["images"]["train"]["done"] == 8

    per_sample = top / "per-sample"
    write_per_sample(per_sample / "NSD")
    vc = make_mask(60, 60, rng, top=10, left=10, bh=40, bw=40)
    np.savez(per_sample / "NSD" / "vc_roi.npz", images=vc[None])
    write_brainrecon(per_sample / "data", 1, [11, 5, 7, 13], [3, 9])
    full = top / "full-brain"
    (full / "NSD" / "fmri").mkdir(parents=True)
    np.savez(full / "NSD" / "vc_roi.npz", images=vc[None])
    with h5py.File(full / "NSD" / "fmri" / "01_norm.h5", "w") as f:
        f["images"] = rng.normal(size=(len(SURF_LABELS), 60, 60)).astype(np.float32)
        f["labels"] = SURF_LABELS
    write_brainrecon(full / "data", 1, [11, 5, 7, 13], [3, 9])

    def surfaces(copy: Path, scratch: Path) -> dict:
        from brainrecon.data.surfaces import prepare_surfaces

        prepare_surfaces(copy / "NSD", 1, copy / "data", progress=False)
        return _use(copy / "data")

    with_trials = top / "prepared-trials"
    _prepare(root, with_trials, keep_repetitions=True)

    mini = {"subjects": (1,), "n_voxels": 12, "n_train": 10, "n_val": 3, "n_test": 5, "duplicates": 2}
    me1 = top / "me1"
    write_mindeye1(me1, **mini)
    me1f = top / "me1-folders"
    write_mindeye1(me1f, layout="folders", **mini)
    me2 = top / "me2"
    write_mindeye2(me2, subjects=(1,), n_voxels=12, n_images=10, n_shared=5, n_sessions=2, image_size=16)
    wds = "webdataset_avg_split"

    scenarios = {
        "prepared-trials": (with_trials, lambda copy, scratch: _use(copy), _use(with_trials), False),
        "mindeye1": (me1, lambda copy, scratch: _use(copy / wds), _use(me1 / wds), False),
        "mindeye1-folders": (me1f, lambda copy, scratch: _use(copy / wds), _use(me1f / wds), False),
        "mindeye2": (me2, lambda copy, scratch: _use(copy), _use(me2), False),
        "nsd": (root, lambda copy, scratch: _prepare(copy, scratch / "out"), intact_nsd, False),
        "manifest": (prepared, lambda copy, scratch: _prepare(root, copy, overwrite=True), intact_nsd, False),
        "killed": (killed, lambda copy, scratch: _prepare(root, copy), intact_nsd, True),
        "prepared": (prepared, lambda copy, scratch: _use(copy), _use(prepared), False),
        "brain-diffuser": (bd, lambda copy, scratch: _use(copy), _use(bd), False),
        "arrays": (arrays, lambda copy, scratch: _use(copy / "data.h5"), _use(arrays / "data.h5"), False),
        "per-sample": (per_sample, surfaces, surfaces(_copy_tree(per_sample, top / "ps-ref"), top), False),
        "full-brain": (full, surfaces, surfaces(_copy_tree(full, top / "fb-ref"), top), False),
    }
    return scenarios


# Every file each reader reads, by the family that fuzzes it.
LAYOUT = {
    "nsd": {nsd.DESIGN_FILE: "mat", _MASK: "nifti", _BETAS + "ncsnr.nii.gz": "nifti",
            _BETAS + "betas_session01.nii.gz": "nifti", nsd.STIMULI_FILE: "hdf5", CAPTIONS: "npy"},
    "manifest": {"brainrecon-data.json": "json"},
    "killed": {f"{PARTIAL}/state.json": "json", f"{PARTIAL}/betas/session_01.npy": "npy",
               f"{PARTIAL}/images_train.npy": "npy"},
    "prepared": {"brainrecon-data.json": "json",
                 **{f"subj01/{s}_{n}.npy": "npy" for s in ("train", "test")
                    for n in ("voxels", "ids", "images", "captions", "surfaces")}},
    "brain-diffuser": {f"subj01/nsd_{s}_{n}_sub1.npy": "npy" for s in ("train", "test")
                       for n in ("fmriavg_nsdgeneral", "stim", "cap", "ids")},
    "arrays": {"data.h5": "hdf5"},
    "per-sample": {"NSD/fmri_npy/01_label.npy": "npy", "NSD/fmri_npy/01_norm/surf_000004.npy": "npy",
                   "NSD/vc_roi.npz": "npz"},
    "full-brain": {"NSD/fmri/01_norm.h5": "hdf5", "NSD/vc_roi.npz": "npz"},
    "prepared-trials": {f"subj01/{s}_trials_{k}.npy": "npy" for s in ("train", "test")
                        for k in ("voxels", "rows", "repetition", "trial")},
    "mindeye1": {"webdataset_avg_split/train/train_subj01_0.tar": "tar", "webdataset_avg_split/val/val_subj01_0.tar": "tar",
                 "webdataset_avg_split/test/test_subj01_1.tar": "tar", "webdataset_avg_split/metadata_subj01.json": "json"},
    "mindeye1-folders": {f"webdataset_avg_split/train/train_subj01/sample000000000.{ext}": fam for ext, fam in (
        ("nsdgeneral.npy", "npy"), ("coco73k.npy", "npy"), ("trial.npy", "npy"), ("num_uniques.npy", "npy"),
        ("jpg", "image"))},
    "mindeye2": {"betas_all_subj01_fp32_renorm.hdf5": "hdf5", "coco_images_224_float16.hdf5": "hdf5",
                 "wds/subj01/train/0.tar": "tar", "wds/subj01/new_test/0.tar": "tar"},
}
CASES = [(s, rel) for s in LAYOUT for rel in LAYOUT[s]]


def _check_case(world, scenario, rel, name, corrupt, scratch: Path) -> str | None:
    """None if the case ends well, else what went wrong."""
    src, run, intact, real = world[scenario]
    copy = _copy_tree(src, scratch / "copy", real=real)
    try:
        corrupt(copy / rel)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                got = run(copy, scratch)
        except BrainreconError as exc:
            if Path(rel).name not in str(exc):
                return f"{name}: the error does not name the file: {exc}"[:400]
            if "\n" in str(exc).strip():
                return f"{name}: the message is more than one line: {exc}"[:400]
            return None
        except Exception as exc:  # noqa: BLE001 - this is what the suite looks for
            return f"{name}: {type(exc).__name__}: {exc}"[:400]
        if not _same(got, intact):
            differ = [k for k in intact if k not in got or not _same(got[k], intact[k])]
            return f"{name}: accepted with a different answer ({differ[:6]})"
        return None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir()


@pytest.mark.parametrize("scenario,rel", CASES, ids=[f"{s}:{Path(r).name}" for s, r in CASES])
def test_every_corruption_of_every_input_file_is_a_clear_error_or_harmless(world, tmp_path, scenario, rel):
    src = world[scenario][0]
    cases = {**_bytes_cases(src / rel), "a directory": _directory, **FAMILIES[LAYOUT[scenario][rel]](src / rel)}
    if scenario == "arrays":  # ids are optional per split in an arrays file (rows get positions): not damage
        for split in ("train", "test"):
            cases.pop(f"missing 'subj01/{split}_ids'")
    start = time.perf_counter()
    failures = [f for name, corrupt in cases.items()
                if (f := _check_case(world, scenario, rel, name, corrupt, tmp_path)) is not None]
    print(f"{scenario}:{rel}: {len(cases)} corruptions in {time.perf_counter() - start:.1f} s")
    assert not failures, f"{rel}: {len(failures)} of {len(cases)} corruptions went wrong:\n" + "\n".join(failures)


def test_the_pristine_files_were_not_touched(world):
    for scenario in ("prepared", "brain-diffuser", "arrays"):
        src, _, intact, _ = world[scenario]
        assert _same(_use(src if scenario != "arrays" else src / "data.h5"), intact), scenario


def test_layout_covers_every_file_of_a_prepared_and_a_brain_diffuser_folder(world):
    for scenario in ("prepared", "brain-diffuser"):
        src = world[scenario][0]
        found = {str(p.relative_to(src)) for p in src.rglob("*") if p.is_file()}
        assert found == set(LAYOUT[scenario]), scenario


# --------------------------------------------------------------------------- leftover .partial
def test_prepare_nsd_killed_after_its_manifest_cleans_the_leftover_partial(world, tmp_path, capsys):
    """SIGKILL after the manifest was written, before the .partial work folder was removed: the
    rerun of the same command notices, removes the leftover folder, says so, and succeeds."""
    root, _, intact, _ = world["nsd"]
    out = tmp_path / "out"
    real = shutil.rmtree

    def killed(path, *a, **kw):
        if Path(path).name == PARTIAL:
            raise KeyboardInterrupt  # what SIGKILL leaves: the manifest written, the work folder not removed
        return real(path, *a, **kw)

    nsd_prepare.shutil.rmtree = killed
    try:
        with pytest.raises(KeyboardInterrupt):
            prepare_nsd(root, 1, out, sessions=1, captions=root / CAPTIONS, ncsnr_threshold=0.0, progress=False)
    finally:
        nsd_prepare.shutil.rmtree = real
    assert (out / PARTIAL).is_dir() and (out / "brainrecon-data.json").is_file()
    before = {p: p.stat().st_mtime_ns for p in (out / "subj01").iterdir()}
    capsys.readouterr()
    summary = prepare_nsd(root, 1, out, sessions=1, captions=root / CAPTIONS, ncsnr_threshold=0.0, progress=False)
    assert not (out / PARTIAL).exists()
    assert "left by an earlier run" in capsys.readouterr().err
    assert summary["n_train"] == intact["1 train ids"].size and summary["n_voxels"] == intact["1 train voxels"].shape[1]
    assert {p: p.stat().st_mtime_ns for p in (out / "subj01").iterdir()} == before  # nothing redone
    assert _same(_use(out), intact)
    # And the after-swap leftover (subject folder in place, manifest not yet written) is finished too.
    (out / "brainrecon-data.json").unlink()
    nsd_prepare.shutil.rmtree = killed
    try:
        with pytest.raises(KeyboardInterrupt):
            prepare_nsd(root, 1, out, sessions=1, captions=root / CAPTIONS, ncsnr_threshold=0.0, progress=False,
                        overwrite=True)
    finally:
        nsd_prepare.shutil.rmtree = real
    manifest = (out / "brainrecon-data.json").read_text()
    (out / "brainrecon-data.json").unlink()
    prepare_nsd(root, 1, out, sessions=1, captions=root / CAPTIONS, ncsnr_threshold=0.0, progress=False)
    assert not (out / PARTIAL).exists()
    assert json.loads((out / "brainrecon-data.json").read_text()) == json.loads(manifest)
    assert _same(_use(out), intact)


def test_a_leftover_partial_with_other_options_is_named(world, tmp_path):
    """A work folder that is not a finished run of this request, beside a prepared subject: the
    usual 'already prepared' error names the folder and what to do with it."""
    root, _, _, _ = world["nsd"]
    out = tmp_path / "out"
    prepare_nsd(root, 1, out, sessions=1, captions=root / CAPTIONS, ncsnr_threshold=0.0, progress=False)
    (out / PARTIAL).mkdir()
    (out / PARTIAL / "state.json").write_text("{")
    with pytest.raises(BrainreconError, match=r"Subject 1 is already prepared.*overwrite=True.*"
                                              r"prepare-nsd-subj01\.partial of an unfinished earlier run.*delete it"):
        prepare_nsd(root, 1, out, sessions=1, progress=False)
