"""Reading NeuroPictor's released surface maps: the per-sample and full-cortex layouts
(:func:`open_surfaces`), and the visual-cortex crop with OpenCV's resizing arithmetic in numpy
(:class:`VCCrop`). What the maps are and how the crop is made: :mod:`brainrecon.data.surfaces`."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from brainrecon.data.nsd.release import check_subject
from brainrecon.errors import DataError

SURFACE_SIZE = 256
PAD_X = 1
PAD_Y = 10


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
                                f"or {root.parent}; pass its path as vc_roi.", parameters=("vc_roi",))
            return FullBrainSurfaces(h5, subject, crop)
    raise DataError(
        f"No surface maps for subject {subject} under {root}. Looked for {root}/fmri_npy/{subject:02d}_label.npy "
        f"(+ {subject:02d}_norm/surf_XXXXXX.npy), {root}/{subject:02d}_label.npy, {root}/fmri/{subject:02d}_norm.h5 "
        f"and {root}/{subject:02d}_norm.h5."
    )
