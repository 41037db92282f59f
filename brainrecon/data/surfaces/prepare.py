"""Joining released surface maps to a brainrecon-format dataset (:func:`prepare_surfaces`, CLI
``brainrecon prepare-surfaces``): which sample gives each image's map (:func:`select_samples`),
and the resumable writing of ``{split}_surfaces.npy`` (or of a surfaces-only subject). See
:mod:`brainrecon.data.surfaces`."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from brainrecon.data.layout import BRAINRECON_FILES, MANIFEST
from brainrecon.data.nsd.prepare import _read_manifest
from brainrecon.data.nsd.release import check_subject
from brainrecon.data.resumable import NpyRowWriter, peak_memory_mb, progress_bar
from brainrecon.data.surfaces.maps import SURFACE_SIZE, SurfaceSource, _as_labels, open_surfaces
from brainrecon.errors import DataError
from brainrecon.io import replace_directory, write_array_atomic, write_json_atomic

DUPLICATE_POLICIES = ("neuropictor", "first", "last", "mean")
MISSING_POLICIES = ("error", "zero")
_SPLITS = ("train", "test")


def _file(split: str, name: str) -> str:
    """File name of one array of one split in a subject directory (:mod:`brainrecon.data.layout`)."""
    return BRAINRECON_FILES[name].format(split=split)


# ----------------------------------------------------------------------------- sample choice
def select_samples(labels: np.ndarray, ids: np.ndarray, split: str, duplicates: str = "neuropictor") -> list[np.ndarray]:
    """Which samples give the map of each image.

    Parameters
    ----------
    labels : int array of shape (n_samples,)
        73k id of each sample.
    ids : int array of shape (n,)
        The images wanted.
    split : {"train", "test"}
    duplicates : {"neuropictor", "first", "last", "mean"}
        ``neuropictor``: the last sample for train, the first for test (NeuroPictor's loader).

    Returns
    -------
    list of int64 arrays
        One per id: the sample indices to average (one index, or all for ``mean``; empty
        when the image has no map).
    """
    if duplicates not in DUPLICATE_POLICIES:
        raise DataError(f"Unknown duplicates policy {duplicates!r}; valid: "
                        f"{', '.join(repr(p) for p in DUPLICATE_POLICIES)}.")
    rule = duplicates
    if duplicates == "neuropictor":
        rule = "last" if split == "train" else "first"
    order = np.argsort(labels, kind="stable")  # samples of one label stay in file order
    sorted_labels = labels[order]
    lo = np.searchsorted(sorted_labels, ids, side="left")
    hi = np.searchsorted(sorted_labels, ids, side="right")
    out = []
    for a, b in zip(lo, hi):
        group = order[a:b]
        if group.size and rule == "first":
            group = group[:1]
        elif group.size and rule == "last":
            group = group[-1:]
        out.append(group.astype(np.int64))
    return out


def _read_test_ids(path: Path) -> tuple[np.ndarray, bool]:
    """Test ids from an ``.npy`` list (0-based) or ``nsd_expdesign.mat`` (``sharedix``, 1-based).

    Returns the ids and whether their order should be kept (True for an .npy list).
    """
    if not path.is_file():
        raise DataError(f"Test-id file not found: {path}; expected an .npy array of 0-based 73k ids (e.g. "
                        f"NeuroPictor's sub1257_shared_triallabel.npy) or NSD's nsd_expdesign.mat.")
    if path.suffix == ".mat":
        from brainrecon.data.nsd.release import read_design

        design = read_design(path)
        if "sharedix" not in design:
            raise DataError(f"{path} has no field 'sharedix' (the 1000 shared images); expected NSD's nsd_expdesign.mat.")
        return design["sharedix"] - 1, False
    try:
        ids = np.load(path, allow_pickle=False)
    except ValueError as exc:
        raise DataError(f"{path} could not be read as a plain integer array ({exc}); expected 0-based 73k ids.") from exc
    return _as_labels(ids, path), True


# ----------------------------------------------------------------------------- prepare
def prepare_surfaces(
    source: str | os.PathLike,
    subject: int,
    out: str | os.PathLike,
    *,
    duplicates: str = "neuropictor",
    missing: str = "error",
    test_ids: str | os.PathLike | None = None,
    vc_roi: str | os.PathLike | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Add NeuroPictor's surface maps of one subject to a brainrecon-format directory.

    Parameters
    ----------
    source : path
        Released maps (see :func:`open_surfaces`).
    subject : int
    out : path
        A directory written by :func:`brainrecon.data.nsd.prepare_nsd` (the maps are joined to
        its rows by image id), or a new / surfaces-only directory (a surfaces-only subject is
        created; see the module docstring).
    duplicates : {"neuropictor", "first", "last", "mean"}
        Which sample of a repeated image to use (module docstring).
    missing : {"error", "zero"}
        When joining, what to do with rows whose image has no map: raise, or write a zero map
        (the counts are recorded in the manifest).
    test_ids : path, optional
        Surfaces-only subjects: the test images, as an ``.npy`` list of 0-based ids
        (NeuroPictor's ``sub1257_shared_triallabel.npy``, found automatically in ``source``)
        or ``nsd_expdesign.mat`` (its 1000 shared images).
    vc_roi : path, optional
        ``vc_roi.npz`` (needed for full-cortex maps; found automatically in ``source``).
    overwrite : bool
        Replace surfaces already prepared for this subject.
    progress : bool

    Returns
    -------
    dict
        ``subject, out, mode ("joined" or "surfaces-only"), reader, n_train, n_test,
        missing ({split: count}), peak_memory_mb``.
    """
    subject = check_subject(subject)
    if duplicates not in DUPLICATE_POLICIES:
        raise DataError(f"Unknown duplicates policy {duplicates!r}; valid: "
                        f"{', '.join(repr(p) for p in DUPLICATE_POLICIES)}.")
    if missing not in MISSING_POLICIES:
        raise DataError(f"Unknown missing policy {missing!r}; valid: 'error', 'zero'.")
    out = Path(out).expanduser()
    manifest = _read_manifest(out)
    present = [int(s) for s in manifest.get("subjects", [])] if manifest else []
    reader = open_surfaces(source, subject, vc_roi=vc_roi)
    try:
        if subject in present and manifest.get("source", {}).get("kind") != "neuropictor-surfaces":
            summary = _join(reader, subject, out, manifest, duplicates, missing, overwrite, progress)
        else:
            if manifest is not None and present and manifest.get("source", {}).get("kind") != "neuropictor-surfaces":
                raise DataError(
                    f"{out} holds NSD-prepared subjects {present}, not subject {subject}. Run `brainrecon prepare-nsd "
                    f"--subject {subject} --out {out}` first (the maps then join its rows), or use another out "
                    f"directory for a surfaces-only dataset.", parameters=("out",)
                )
            summary = _surfaces_only(reader, subject, out, manifest, duplicates, test_ids, Path(source).expanduser(),
                                     overwrite, progress)
    finally:
        reader.close()
    summary["peak_memory_mb"] = peak_memory_mb()
    return summary


def _write_maps(reader: SurfaceSource, groups: list[np.ndarray], path: Path, progress: bool, desc: str) -> None:
    """Write one map per group (zeros for an empty group) into ``path`` atomically."""
    tmp = path.with_name(f".{path.name}.partial")
    with NpyRowWriter(tmp, (len(groups), SURFACE_SIZE, SURFACE_SIZE), np.float32) as writer, \
            progress_bar(progress, total=len(groups), desc=desc, unit="map") as bar:
        for row, group in enumerate(groups):
            if group.size == 0:
                surface = np.zeros((SURFACE_SIZE, SURFACE_SIZE), np.float32)
            elif group.size == 1:
                surface = reader.read(int(group[0]))
            else:
                acc = np.zeros((SURFACE_SIZE, SURFACE_SIZE), np.float64)
                for k in group:
                    acc += reader.read(int(k))
                surface = (acc / group.size).astype(np.float32)
            writer.write(row, surface)
            bar.update(1)
    os.replace(tmp, path)


def _join(reader, subject, out, manifest, duplicates, missing, overwrite, progress) -> dict[str, Any]:
    d = out / f"subj{subject:02d}"
    if not overwrite and any((d / _file(split, "surfaces")).is_file() for split in _SPLITS):
        raise DataError(f"Subject {subject} in {out} already has surface maps; pass overwrite=True to replace them.",
                        parameters=("overwrite",))
    groups, n_missing = {}, {}
    for split in _SPLITS:
        ids_file = d / _file(split, "ids")
        if not ids_file.is_file():
            raise DataError(f"Missing {ids_file}; re-run `brainrecon prepare-nsd --subject {subject} --out {out}`.")
        ids = np.load(ids_file, allow_pickle=False)
        groups[split] = select_samples(reader.labels, ids, split, duplicates)
        absent = [int(i) for i, g in zip(ids, groups[split]) if g.size == 0]
        n_missing[split] = len(absent)
        if absent and missing == "error":
            raise DataError(
                f"{len(absent)} of {ids.size} {split} images of subject {subject} have no surface map in "
                f"{reader.path} (listed in {reader.label_file}; first ids: {absent[:5]}). The released maps may cover fewer sessions than "
                f"the prepared data (NeuroPictor used sessions 1-37: `brainrecon prepare-nsd --sessions 37 "
                f"--test-set 982`), or pass missing='zero' to write zero maps for them.", parameters=("missing",)
            )
    for split in _SPLITS:
        _write_maps(reader, groups[split], d / _file(split, "surfaces"), progress,
                    f"subj{subject:02d} {split} surfaces")
    manifest.setdefault("surfaces", {})[str(subject)] = {
        "source": str(Path(reader.path).resolve()),
        "reader": reader.kind,
        "duplicates": duplicates,
        "missing_policy": missing,
        "missing": n_missing,
        "size": SURFACE_SIZE,
    }
    write_json_atomic(out / MANIFEST, manifest)
    return {"subject": subject, "out": d, "mode": "joined", "reader": reader.kind,
            "n_train": len(groups["train"]), "n_test": len(groups["test"]), "missing": n_missing}


def _first_appearance(labels: np.ndarray, keep: np.ndarray) -> np.ndarray:
    uniq, first = np.unique(labels[keep], return_index=True)
    return uniq[np.argsort(first, kind="stable")]


def _surfaces_only(reader, subject, out, manifest, duplicates, test_ids, root, overwrite, progress) -> dict[str, Any]:
    present = [int(s) for s in manifest.get("subjects", [])] if manifest else []
    if subject in present and not overwrite:
        raise DataError(f"Subject {subject} is already prepared in {out}; pass overwrite=True to replace it.",
                        parameters=("overwrite",))
    if subject not in present and (out / f"subj{subject:02d}").exists():
        raise DataError(f"{out / f'subj{subject:02d}'} exists but is not a subject of a brainrecon manifest (Brain-"
                        f"Diffuser files?). Surface maps join brainrecon-format data (`brainrecon prepare-nsd "
                        f"--format brainrecon`); choose another out directory.", parameters=("out",))
    source = {"kind": "neuropictor-surfaces", "duplicates": duplicates,
              "voxel_units": "surface map values inside the visual-cortex mask"}
    others = [s for s in present if s != subject]
    if others and manifest.get("source", {}).get("duplicates") != duplicates:
        raise DataError(f"{out} holds surfaces-only subjects {others} prepared with duplicates="
                        f"{manifest['source'].get('duplicates')!r}; use the same duplicates or another out directory.",
                        parameters=("duplicates", "out"))
    if test_ids is None:
        for candidate in (root / "sub1257_shared_triallabel.npy", root.parent / "sub1257_shared_triallabel.npy"):
            if candidate.is_file():
                test_ids = candidate
                break
    if test_ids is None:
        raise DataError(
            f"Subject {subject} is not prepared in {out}, so its rows come from the maps, and the test images "
            f"must be named: pass test_ids (NeuroPictor's sub1257_shared_triallabel.npy, or NSD's "
            f"nsd_expdesign.mat for all 1000 shared images), or run `brainrecon prepare-nsd` first.",
            parameters=("test_ids",)
        )
    wanted, keep_order = _read_test_ids(Path(test_ids).expanduser())
    labels = reader.labels
    in_test = np.isin(labels, wanted)
    if keep_order:
        have = set(labels[in_test].tolist())
        test = np.array([i for i in dict.fromkeys(wanted.tolist()) if i in have], dtype=np.int64)
    else:
        test = _first_appearance(labels, in_test)
    train = _first_appearance(labels, ~in_test)
    if test.size == 0 or train.size == 0:
        raise DataError(f"Subject {subject}: the maps in {reader.path} give {train.size} training and {test.size} "
                        f"test images with the test ids of {test_ids}; both must be non-empty.")
    ids = {"train": train.astype(np.int64), "test": test}

    partial = out / f".prepare-surfaces-subj{subject:02d}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    for split in _SPLITS:
        groups = select_samples(labels, ids[split], split, duplicates)
        _write_maps(reader, groups, partial / _file(split, "surfaces"), progress, f"subj{subject:02d} {split} surfaces")
        write_array_atomic(partial / _file(split, "ids"), ids[split])
    pixels = _vc_pixels(reader, [partial / _file(split, "surfaces") for split in _SPLITS])
    for split in _SPLITS:
        surfaces = np.load(partial / _file(split, "surfaces"), mmap_mode="r")
        with NpyRowWriter(partial / _file(split, "voxels"), (surfaces.shape[0], int(pixels.sum())), np.float32) as w:
            for start in range(0, surfaces.shape[0], 256):
                block = np.asarray(surfaces[start:start + 256])
                for i, row in enumerate(block[:, pixels]):
                    w.write(start + i, row)
        del surfaces
    extras = _images_and_captions(root, ids, partial, progress)
    replace_directory(partial, out / f"subj{subject:02d}")

    manifest = manifest or {"format": "brainrecon-data", "version": 1, "name": out.resolve().name,
                            "subjects": [], "ids_are_nsd": True}
    manifest["subjects"] = sorted({*present, subject})
    manifest["source"] = source
    manifest["ids_are_nsd"] = True
    manifest.setdefault("subject_info", {})[str(subject)] = {
        "n_train": int(train.size), "n_test": int(test.size), "n_voxels": int(pixels.sum()),
        "voxels": "surface pixels inside the resized visual-cortex mask, row-major over (256, 256)",
        "test_ids": str(Path(test_ids).resolve()), **extras,
    }
    manifest.setdefault("surfaces", {})[str(subject)] = {
        "source": str(Path(reader.path).resolve()), "reader": reader.kind, "duplicates": duplicates,
        "missing_policy": "error", "missing": {"train": 0, "test": 0}, "size": SURFACE_SIZE,
    }
    write_json_atomic(out / MANIFEST, manifest)
    return {"subject": subject, "out": out / f"subj{subject:02d}", "mode": "surfaces-only", "reader": reader.kind,
            "n_train": int(train.size), "n_test": int(test.size), "missing": {"train": 0, "test": 0}}


def _vc_pixels(reader: SurfaceSource, files: list[Path]) -> np.ndarray:
    """Pixels that are visual cortex: the crop's mask when known, else non-zero in any map."""
    if reader.vc_crop is not None:
        return reader.vc_crop.resized_mask.copy()
    seen = np.zeros((SURFACE_SIZE, SURFACE_SIZE), dtype=bool)
    for f in files:
        maps = np.load(f, mmap_mode="r")
        for start in range(0, maps.shape[0], 256):
            seen |= np.any(np.asarray(maps[start:start + 256]) != 0, axis=0)
        del maps
    if not seen.any():
        raise DataError(f"Every surface map read from {reader.path} is zero; nothing to use as voxels.")
    return seen


def _images_and_captions(root: Path, ids: dict[str, np.ndarray], partial: Path, progress: bool) -> dict[str, Any]:
    """Copy stimulus PNGs and captions found in NeuroPictor's NSD folder, when present."""
    extras: dict[str, Any] = {"images": None, "captions": None}
    image_dir = next((p for p in (root / "nsddata_stimuli/stimuli/images", root.parent / "nsddata_stimuli/stimuli/images")
                      if p.is_dir()), None)
    if image_dir is not None:
        from PIL import Image

        for split in _SPLITS:
            writer = None
            with progress_bar(progress, total=int(ids[split].size), desc=f"{split} images", unit="img") as bar:
                for row, nsd_id in enumerate(ids[split]):
                    png = image_dir / f"image_{int(nsd_id):06d}.png"
                    if not png.is_file():
                        raise DataError(f"Stimulus image not found: {png}; expected NeuroPictor's "
                                        f"nsddata_stimuli/stimuli/images/image_XXXXXX.png for every map's image.")
                    with Image.open(png) as im:
                        arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
                    if writer is None:
                        shape = (int(ids[split].size),) + arr.shape
                        writer = NpyRowWriter(partial / _file(split, "images"), shape, np.uint8)
                    if arr.shape != writer.shape[1:]:
                        writer.close()
                        raise DataError(f"{png} has shape {arr.shape}; the other images are {writer.shape[1:]}.")
                    writer.write(row, arr)
                    bar.update(1)
            writer.close()
        extras["images"] = str(image_dir.resolve())
    caption_file = next((p for p in (root / "COCO_73k_annots_curated.npy", root.parent / "COCO_73k_annots_curated.npy")
                         if p.is_file()), None)
    if caption_file is not None:
        try:
            caps = np.load(caption_file, mmap_mode="r", allow_pickle=False)
        except ValueError as exc:
            raise DataError(f"{caption_file} could not be read as a plain string array ({exc}); expected (73000, 5) "
                            f"strings.") from exc
        for split in _SPLITS:
            rows = np.asarray(caps[ids[split]])
            write_array_atomic(partial / _file(split, "captions"), rows.astype(str) if rows.dtype.kind == "S" else rows)
        extras["captions"] = str(caption_file.resolve())
    return extras
