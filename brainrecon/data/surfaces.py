"""NeuroPictor's 2-D cortical surface maps: readers, the visual-cortex crop, preparation.

NeuroPictor (Huo et al. 2024) feeds its fMRI encoder 256 x 256 crops of a flattened-cortex map
of each sample's response. The projection from NSD betas to that map is not public, so
brainrecon reads the maps the authors released (NeuroPictor's ``NSD_full_brain`` release, jingyanghuo/neuropictor):

per-sample maps (``NSD/fmri_npy.zip``)
    ``fmri_npy/{SS}_norm/surf_{k:06d}.npy`` (256, 256) float, already cropped, and
    ``fmri_npy/{SS}_label.npy``: the 0-based NSD 73k id of sample ``k``.
full-cortex maps (``NSD_full_brain``)
    ``fmri/{SS}_norm.h5`` with datasets ``images`` (N, H, W) and ``labels`` (N,), and
    ``vc_roi.npz`` (key ``images``, element 0: 1 = visual cortex, -1 = other cortex,
    0 = background). Each map is cropped to the visual cortex on reading (:class:`VCCrop`).

The visual-cortex crop (NeuroPictor's ``data_process/convert_brain.py``)
----------------------------------------------------------------------
1. Bounding box of the ``mask == 1`` pixels, widened by 1 pixel in x (columns) and 10 pixels
   in y (rows), clipped to the map; the box is inclusive at both ends.
2. Crop the map and the mask to the box; resize to 256 x 256, bilinear for the map (OpenCV's
   ``INTER_LINEAR``: half-pixel centres, no antialiasing) and nearest for the mask (OpenCV's
   ``INTER_NEAREST``: source index ``floor(i * in / out)``). Both are implemented here in
   numpy with OpenCV's index arithmetic, so OpenCV is not needed.
3. Set pixels outside the resized mask to 0.

NeuroPictor's script finds the box minimum after setting coordinates equal to 0 to "far
away", which ignores visual-cortex pixels in row or column 0; here the true minimum is used
(the two differ only when the visual cortex touches the map's first row or column).

Which sample an image gets (``duplicates``)
-------------------------------------------
The released files hold one map per trial, so an image seen three times has three samples.
NeuroPictor's dataloader (``dataset/dataset.py``) builds a ``{label: sample}`` dictionary for
training, so the **last** sample of an image wins, and uses ``np.where(labels == id)[0][0]``
for testing, so the **first** sample wins. ``duplicates="neuropictor"`` (default) reproduces
this; ``"first"`` and ``"last"`` use one rule for both splits; ``"mean"`` averages all the
samples of an image (the analogue of the repetition-averaged betas of ``prepare-nsd``).

Joining the dataset
-------------------
:func:`prepare_surfaces` writes ``subjXX/{train,test}_surfaces.npy`` (float32 (n, 256, 256))
into a brainrecon-format directory, one map per existing row, matched by image id, so that
``Split.surfaces(subject)`` aligns with ``Split.ids(subject)``. For a subject that
``prepare-nsd`` has not prepared, it creates a surfaces-only subject: rows are the images of
the maps (test: the ids of ``test_ids``, in that file's order, that have a map; train: every
other image, in order of first appearance), and ``{split}_voxels.npy`` holds the map values
at the pixels inside the visual-cortex mask (float32 (n, n_pixels)) so that voxel-based
decoders can use the same data. Images (``nsddata_stimuli/stimuli/images/image_{id:06d}.png``)
and captions (``COCO_73k_annots_curated.npy``) are added when found in the release folder.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from brainrecon.data.nsd import (
    MANIFEST,
    NpyRowWriter,
    _read_manifest,
    _tqdm,
    check_subject,
    peak_memory_mb,
)
from brainrecon.errors import DataError
from brainrecon.io import replace_directory, write_array_atomic, write_json_atomic

SURFACE_SIZE = 256
PAD_X = 1
PAD_Y = 10
DUPLICATE_POLICIES = ("neuropictor", "first", "last", "mean")
MISSING_POLICIES = ("error", "zero")
_SPLITS = ("train", "test")


# ----------------------------------------------------------------------------- resizing
def linear_resize_matrix(n_in: int, n_out: int) -> np.ndarray:
    """OpenCV ``INTER_LINEAR`` weights along one axis.

    Returns
    -------
    float64 array of shape (n_out, n_in)
        Row ``i`` holds the weights of the source pixels for output pixel ``i``: source
        position ``(i + 0.5) * n_in / n_out - 0.5``, clamped to the first and last pixel.
    """
    scale = n_in / n_out
    pos = (np.arange(n_out) + 0.5) * scale - 0.5
    left = np.floor(pos).astype(np.int64)
    frac = pos - left
    frac[left < 0] = 0.0
    left[left < 0] = 0
    at_end = left >= n_in - 1
    frac[at_end] = 0.0
    left[at_end] = n_in - 1
    right = np.minimum(left + 1, n_in - 1)
    weights = np.zeros((n_out, n_in))
    rows = np.arange(n_out)
    np.add.at(weights, (rows, left), 1.0 - frac)
    np.add.at(weights, (rows, right), frac)
    return weights


def nearest_resize_index(n_in: int, n_out: int) -> np.ndarray:
    """OpenCV ``INTER_NEAREST`` source indices along one axis: ``floor(i * n_in / n_out)``."""
    return np.minimum(np.floor(np.arange(n_out) * (n_in / n_out)).astype(np.int64), n_in - 1)


def resize_bilinear(maps: np.ndarray, size: int = SURFACE_SIZE) -> np.ndarray:
    """Resize maps bilinearly, as ``cv2.resize(m, (size, size))`` does.

    Parameters
    ----------
    maps : array of shape (H, W) or (n, H, W)

    Returns
    -------
    float32 array of shape (size, size) or (n, size, size)
    """
    maps = np.asarray(maps, dtype=np.float64)
    ry = linear_resize_matrix(maps.shape[-2], size)
    rx = linear_resize_matrix(maps.shape[-1], size)
    return (ry @ maps @ rx.T).astype(np.float32)


def resize_nearest(maps: np.ndarray, size: int = SURFACE_SIZE) -> np.ndarray:
    """Resize by nearest neighbour, as ``cv2.resize(m, (size, size), interpolation=INTER_NEAREST)``."""
    maps = np.asarray(maps)
    iy = nearest_resize_index(maps.shape[-2], size)
    ix = nearest_resize_index(maps.shape[-1], size)
    return maps[..., iy[:, None], ix[None, :]]


# ----------------------------------------------------------------------------- VC crop
def vc_crop_box(mask: np.ndarray, pad_x: int = PAD_X, pad_y: int = PAD_Y) -> tuple[int, int, int, int]:
    """Bounding box of the visual cortex, padded and clipped.

    Parameters
    ----------
    mask : int array of shape (H, W)
        1 = visual cortex.

    Returns
    -------
    (y0, y1, x0, x1) : ints
        Inclusive bounds: the crop is ``map[y0:y1 + 1, x0:x1 + 1]``.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise DataError(f"The visual-cortex mask must be 2-D (H, W), got shape {mask.shape}.")
    ys, xs = np.nonzero(mask == 1)
    if ys.size == 0:
        raise DataError("The visual-cortex mask has no pixel equal to 1 (1 = visual cortex, -1 = other "
                        "cortex, 0 = background); check the vc_roi.npz file.")
    h, w = mask.shape
    # Upper bounds are clipped to H and W (not H-1, W-1) as in NeuroPictor; slicing absorbs it.
    return (max(int(ys.min()) - pad_y, 0), min(int(ys.max()) + pad_y, h),
            max(int(xs.min()) - pad_x, 0), min(int(xs.max()) + pad_x, w))


class VCCrop:
    """NeuroPictor's visual-cortex crop of full-cortex flat maps (see the module docstring).

    Parameters
    ----------
    mask : int array of shape (H, W)
        The flat-map mask, 1 = visual cortex.
    size : int
        Output side (256).

    Attributes
    ----------
    box : (y0, y1, x0, x1)
        Inclusive crop bounds.
    resized_mask : bool array of shape (size, size)
        The cropped mask after nearest resizing; pixels outside it are 0 in every output.
    """

    def __init__(self, mask: np.ndarray, size: int = SURFACE_SIZE, pad_x: int = PAD_X, pad_y: int = PAD_Y):
        self.mask = np.asarray(mask)
        self.size = int(size)
        self.box = vc_crop_box(self.mask, pad_x, pad_y)
        y0, y1, x0, x1 = self.box
        cropped = (self.mask[y0:y1 + 1, x0:x1 + 1] == 1).astype(np.float64)
        self.resized_mask = resize_nearest(cropped, self.size) != 0

    @classmethod
    def from_npz(cls, path: str | os.PathLike, size: int = SURFACE_SIZE) -> "VCCrop":
        """Read NeuroPictor's ``vc_roi.npz`` (key ``images``, element 0)."""
        path = Path(path)
        if not path.is_file():
            raise DataError(f"Visual-cortex mask not found: {path}. Expected NeuroPictor's vc_roi.npz "
                            f"(Hugging Face dataset Fudan-fMRI/neuropictor, NSD_full_brain/vc_roi.npz).")
        import zipfile

        hint = "expected NeuroPictor's vc_roi.npz with an integer array 'images' of shape (1, H, W)"
        if path.is_dir():
            raise DataError(f"{path} is a directory; {hint}. Re-download it.")
        try:
            with np.load(path, allow_pickle=False) as z:
                if "images" not in z:
                    raise DataError(f"{path} has no array 'images' (arrays: {list(z.keys())}); {hint}. Re-download it.")
                arr = z["images"]
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
            raise DataError(f"{path} could not be read ({type(exc).__name__}: {exc}); the file is corrupt or "
                            f"truncated; {hint}. Re-download it.") from None
        if arr.dtype.kind not in "iufb" or not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[0] >= 1)):
            raise DataError(f"{path} holds {arr.dtype} of shape {arr.shape}; {hint}. Re-download it.")
        mask = arr[0] if arr.ndim == 3 else arr
        try:
            return cls(mask, size)
        except DataError as exc:
            raise DataError(f"{path}: {exc} Re-download it.") from None

    def __call__(self, maps: np.ndarray) -> np.ndarray:
        """Crop and resize.

        Parameters
        ----------
        maps : array of shape (H, W) or (n, H, W), on the mask's grid

        Returns
        -------
        float32 array of shape (size, size) or (n, size, size)
        """
        maps = np.asarray(maps)
        if maps.shape[-2:] != self.mask.shape:
            raise DataError(f"A full-cortex map has shape {maps.shape[-2:]} but the visual-cortex mask has "
                            f"shape {self.mask.shape}; they must be on the same flat-map grid.")
        y0, y1, x0, x1 = self.box
        out = resize_bilinear(maps[..., y0:y1 + 1, x0:x1 + 1], self.size)
        out[..., ~self.resized_mask] = 0.0
        return out


# ----------------------------------------------------------------------------- readers
def _as_labels(labels: np.ndarray, path: Path) -> np.ndarray:
    labels = np.asarray(labels).reshape(-1)
    if labels.dtype.kind == "f":
        if not np.all(np.isfinite(labels)) or not np.all(labels == np.round(labels)):
            raise DataError(f"{path}: labels must be integer 73k image ids; found non-integer values.")
    elif labels.dtype.kind not in "iu":
        raise DataError(f"{path}: labels have dtype {labels.dtype}; expected integer 73k image ids.")
    labels = labels.astype(np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= 73000):
        raise DataError(f"{path}: labels range {labels.min()}..{labels.max()}; expected 0-based NSD 73k ids "
                        f"(0..72999).")
    return labels


class SurfaceSource:
    """One subject's released surface maps.

    Attributes
    ----------
    subject : int
    labels : int64 array of shape (n_samples,)
        0-based NSD 73k id of each sample.
    kind : str
        ``"per-sample"`` or ``"full-brain"``.
    path : Path
        The file or folder read.
    vc_crop : VCCrop or None
        The crop (when the mask is known).
    """

    kind = "abstract"

    def __init__(self, subject: int, labels: np.ndarray, path: Path, vc_crop: VCCrop | None = None):
        #: The file the labels were read from (named in errors about them).
        self.label_file = path
        self.subject = subject
        self.labels = labels
        self.path = path
        self.vc_crop = vc_crop

    def __len__(self) -> int:
        return int(self.labels.size)

    def read(self, index: int) -> np.ndarray:
        """Map of sample ``index``: float32 array of shape (256, 256)."""
        raise NotImplementedError

    def close(self) -> None:
        pass


class PerSampleSurfaces(SurfaceSource):
    """``fmri_npy/{SS}_norm/surf_{k:06d}.npy`` with ``fmri_npy/{SS}_label.npy``.

    Parameters
    ----------
    folder : path
        The ``fmri_npy`` folder.
    subject : int
    vc_crop : VCCrop, optional
        Only used to know which pixels are visual cortex (the maps are already cropped).
    """

    kind = "per-sample"

    def __init__(self, folder: str | os.PathLike, subject: int, vc_crop: VCCrop | None = None):
        folder = Path(folder)
        label_file = folder / f"{subject:02d}_label.npy"
        if not label_file.is_file():
            raise DataError(f"Label file not found: {label_file}; expected NeuroPictor's fmri_npy/{subject:02d}_label.npy "
                            f"(sample index -> 73k id).")
        try:
            labels = np.load(label_file, allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise DataError(f"{label_file} could not be read ({type(exc).__name__}: {exc}); expected an integer "
                            f"array of 73k ids.") from exc
        super().__init__(subject, _as_labels(labels, label_file), folder / f"{subject:02d}_norm", vc_crop)
        self.label_file = label_file
        if not self.path.is_dir():
            raise DataError(f"Surface folder not found: {self.path}; expected NeuroPictor's "
                            f"fmri_npy/{subject:02d}_norm/surf_000000.npy ... (unzip NSD/fmri_npy.zip).")

    def read(self, index: int) -> np.ndarray:
        path = self.path / f"surf_{int(index):06d}.npy"
        if not path.is_file():
            raise DataError(f"Surface map not found: {path}; {len(self)} samples are listed in the label file, "
                            f"so surf_000000.npy .. surf_{len(self) - 1:06d}.npy are expected.")
        try:
            surface = np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise DataError(f"{path} could not be read ({type(exc).__name__}: {exc}); the file is corrupt. "
                            f"Expected a (256, 256) float array.") from exc
        surface = np.squeeze(surface)
        if surface.shape != (SURFACE_SIZE, SURFACE_SIZE):
            raise DataError(f"{path} has shape {surface.shape}; expected ({SURFACE_SIZE}, {SURFACE_SIZE}) "
                            f"visual-cortex crops.")
        return surface.astype(np.float32)


class FullBrainSurfaces(SurfaceSource):
    """``{SS}_norm.h5`` (``images`` (N, H, W), ``labels`` (N,)) cropped with ``vc_roi.npz``.

    Parameters
    ----------
    h5_path : path
    subject : int
    vc_crop : VCCrop
    """

    kind = "full-brain"

    def __init__(self, h5_path: str | os.PathLike, subject: int, vc_crop: VCCrop):
        import h5py

        h5_path = Path(h5_path)
        try:
            self._file = h5py.File(h5_path, "r")
        except OSError as exc:
            raise DataError(f"{h5_path} could not be opened as HDF5 ({exc}); expected NeuroPictor's "
                            f"{subject:02d}_norm.h5 with datasets 'images' (N, H, W) and 'labels' (N,).") from exc
        missing = [k for k in ("images", "labels") if k not in self._file]
        if missing:
            keys = list(self._file.keys())
            self._file.close()
            raise DataError(f"{h5_path} lacks dataset(s) {missing} (datasets: {keys}); expected 'images' (N, H, W) "
                            f"and 'labels' (N,).")
        self._images = self._file["images"]
        if self._images.dtype.kind != "f":
            dtype = self._images.dtype
            self._file.close()
            raise DataError(f"{h5_path}: 'images' holds {dtype} values; expected float maps (N, H, W). Re-download "
                            f"NeuroPictor's {subject:02d}_norm.h5.")
        try:
            labels = _as_labels(self._file["labels"][()], h5_path)
        except (OSError, DataError):
            self._file.close()
            raise
        if self._images.ndim != 3 or self._images.shape[0] != labels.size:
            shape = self._images.shape
            self._file.close()
            raise DataError(f"{h5_path}: 'images' has shape {shape} for {labels.size} labels; expected "
                            f"({labels.size}, H, W).")
        if tuple(self._images.shape[1:]) != vc_crop.mask.shape:
            shape = self._images.shape
            self._file.close()
            raise DataError(f"{h5_path}: maps of shape {shape[1:]} but the visual-cortex mask has shape "
                            f"{vc_crop.mask.shape}; use the vc_roi.npz of the same release.")
        super().__init__(subject, labels, h5_path, vc_crop)

    def read(self, index: int) -> np.ndarray:
        return self.vc_crop(self._images[int(index)])

    def close(self) -> None:
        self._file.close()


def _find_vc_roi(root: Path) -> Path | None:
    for candidate in (root / "vc_roi.npz", root.parent / "vc_roi.npz"):
        if candidate.is_file():
            return candidate
    return None


def open_surfaces(source: str | os.PathLike, subject: int, *, vc_roi: str | os.PathLike | None = None) -> SurfaceSource:
    """Open one subject's released NeuroPictor surface maps, detecting the layout.

    Parameters
    ----------
    source : path
        NeuroPictor's ``NSD`` folder (holding ``fmri_npy/``), the ``fmri_npy`` folder itself,
        or the ``NSD_full_brain`` folder (holding ``fmri/{SS}_norm.h5`` and ``vc_roi.npz``).
        Per-sample maps are preferred when both are present.
    subject : int
    vc_roi : path, optional
        ``vc_roi.npz``; by default looked for in ``source`` and its parent.

    Returns
    -------
    SurfaceSource
    """
    subject = check_subject(subject)
    root = Path(source).expanduser()
    if not root.exists():
        raise DataError(f"Surface source {root} does not exist; expected NeuroPictor's NSD folder (with "
                        f"fmri_npy/) or NSD_full_brain folder (with fmri/{subject:02d}_norm.h5).")
    roi = Path(vc_roi).expanduser() if vc_roi is not None else _find_vc_roi(root)
    crop = VCCrop.from_npz(roi) if roi is not None else None
    for folder in (root / "fmri_npy", root):
        if (folder / f"{subject:02d}_label.npy").is_file():
            return PerSampleSurfaces(folder, subject, crop)
    for h5 in (root / "fmri" / f"{subject:02d}_norm.h5", root / f"{subject:02d}_norm.h5"):
        if h5.is_file():
            if crop is None:
                raise DataError(f"Full-cortex maps {h5} need the visual-cortex mask vc_roi.npz, not found in {root} "
                                f"or {root.parent}; pass --vc-roi FILE.")
            return FullBrainSurfaces(h5, subject, crop)
    raise DataError(
        f"No surface maps for subject {subject} under {root}. Looked for {root}/fmri_npy/{subject:02d}_label.npy "
        f"(+ {subject:02d}_norm/surf_XXXXXX.npy), {root}/{subject:02d}_label.npy, {root}/fmri/{subject:02d}_norm.h5 "
        f"and {root}/{subject:02d}_norm.h5."
    )


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
        from brainrecon.data.nsd import read_design

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
                    f"--subject {subject} --out {out}` first (the maps then join its rows), or use another --out "
                    f"for a surfaces-only dataset."
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
            _tqdm(progress, total=len(groups), desc=desc, unit="map") as bar:
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
    if not overwrite and any((d / f"{split}_surfaces.npy").is_file() for split in _SPLITS):
        raise DataError(f"Subject {subject} in {out} already has surface maps; pass --overwrite to replace them.")
    groups, n_missing = {}, {}
    for split in _SPLITS:
        ids_file = d / f"{split}_ids.npy"
        if not ids_file.is_file():
            raise DataError(f"Missing {ids_file}; re-run brainrecon prepare-nsd --subject {subject} --out {out}.")
        ids = np.load(ids_file, allow_pickle=False)
        groups[split] = select_samples(reader.labels, ids, split, duplicates)
        absent = [int(i) for i, g in zip(ids, groups[split]) if g.size == 0]
        n_missing[split] = len(absent)
        if absent and missing == "error":
            raise DataError(
                f"{len(absent)} of {ids.size} {split} images of subject {subject} have no surface map in "
                f"{reader.path} (listed in {reader.label_file}; first ids: {absent[:5]}). The released maps may cover fewer sessions than "
                f"the prepared data (NeuroPictor used sessions 1-37: prepare-nsd --sessions 37 --test-set 982), "
                f"or pass --missing zero to write zero maps for them."
            )
    for split in _SPLITS:
        _write_maps(reader, groups[split], d / f"{split}_surfaces.npy", progress,
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
        raise DataError(f"Subject {subject} is already prepared in {out}; pass --overwrite to replace it.")
    if subject not in present and (out / f"subj{subject:02d}").exists():
        raise DataError(f"{out / f'subj{subject:02d}'} exists but is not a subject of a brainrecon manifest (Brain-"
                        f"Diffuser files?). Surface maps join brainrecon-format data (prepare-nsd --format "
                        f"brainrecon); choose another --out.")
    source = {"kind": "neuropictor-surfaces", "duplicates": duplicates,
              "voxel_units": "surface map values inside the visual-cortex mask"}
    others = [s for s in present if s != subject]
    if others and manifest.get("source", {}).get("duplicates") != duplicates:
        raise DataError(f"{out} holds surfaces-only subjects {others} prepared with duplicates="
                        f"{manifest['source'].get('duplicates')!r}; use the same --duplicates or another --out.")
    if test_ids is None:
        for candidate in (root / "sub1257_shared_triallabel.npy", root.parent / "sub1257_shared_triallabel.npy"):
            if candidate.is_file():
                test_ids = candidate
                break
    if test_ids is None:
        raise DataError(
            f"Subject {subject} is not prepared in {out}, so its rows come from the maps, and the test images "
            f"must be named: pass --test-ids FILE (NeuroPictor's sub1257_shared_triallabel.npy, or NSD's "
            f"nsd_expdesign.mat for all 1000 shared images), or run prepare-nsd first."
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
        _write_maps(reader, groups, partial / f"{split}_surfaces.npy", progress, f"subj{subject:02d} {split} surfaces")
        write_array_atomic(partial / f"{split}_ids.npy", ids[split])
    pixels = _vc_pixels(reader, [partial / f"{split}_surfaces.npy" for split in _SPLITS])
    for split in _SPLITS:
        surfaces = np.load(partial / f"{split}_surfaces.npy", mmap_mode="r")
        with NpyRowWriter(partial / f"{split}_voxels.npy", (surfaces.shape[0], int(pixels.sum())), np.float32) as w:
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
            with _tqdm(progress, total=int(ids[split].size), desc=f"{split} images", unit="img") as bar:
                for row, nsd_id in enumerate(ids[split]):
                    png = image_dir / f"image_{int(nsd_id):06d}.png"
                    if not png.is_file():
                        raise DataError(f"Stimulus image not found: {png}; expected NeuroPictor's "
                                        f"nsddata_stimuli/stimuli/images/image_XXXXXX.png for every map's image.")
                    with Image.open(png) as im:
                        arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
                    if writer is None:
                        shape = (int(ids[split].size),) + arr.shape
                        writer = NpyRowWriter(partial / f"{split}_images.npy", shape, np.uint8)
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
            write_array_atomic(partial / f"{split}_captions.npy", rows.astype(str) if rows.dtype.kind == "S" else rows)
        extras["captions"] = str(caption_file.resolve())
    return extras
