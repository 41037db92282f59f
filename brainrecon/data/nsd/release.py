"""Readers of the raw NSD release: where its files are (:class:`NSDRelease`), the experimental
design (``nsd_expdesign.mat``), the nsdgeneral ROI and ncsnr maps, a session's betas (streamed a
block of volumes at a time) and the stimulus images (``nsd_stimuli.hdf5``).

Files read, relative to the NSD root::

    nsddata/experiments/nsd/nsd_expdesign.mat            masterordering, subjectim (1-based)
    nsddata/ppdata/subjXX/func1pt8mm/roi/nsdgeneral.nii.gz                  voxels: mask > 0
    nsddata_betas/ppdata/subjXX/func1pt8mm/betas_fithrf_GLMdenoise_RR/betas_sessionNN.nii.gz
    nsddata_stimuli/stimuli/nsd/nsd_stimuli.hdf5          imgBrick (73000, 425, 425, 3) uint8
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from brainrecon.errors import DataError

#: Number of NSD scan sessions per subject (NSD Data Manual, Technical notes).
NSD_SESSIONS = {1: 40, 2: 40, 3: 32, 4: 30, 5: 40, 6: 32, 7: 40, 8: 30}
#: nsdgeneral voxel counts (mask > 0) per subject, for reference and messages.
NSD_GENERAL_VOXELS = {1: 15724, 2: 14278, 3: 15226, 4: 13153, 5: 13039, 6: 17907, 7: 12682, 8: 14386}
TRIALS_PER_SESSION = 750
BETA_VERSION = "betas_fithrf_GLMdenoise_RR"

DESIGN_FILE = "nsddata/experiments/nsd/nsd_expdesign.mat"
STIMULI_FILE = "nsddata_stimuli/stimuli/nsd/nsd_stimuli.hdf5"
_MASK_FILE = "nsddata/ppdata/subj{s:02d}/func1pt8mm/roi/nsdgeneral.nii.gz"
_BETA_FILE = "nsddata_betas/ppdata/subj{s:02d}/func1pt8mm/{version}/betas_session{n:02d}.nii.gz"
# Noise-ceiling SNR of every voxel, one per beta version (NSD data manual).
_NCSNR_FILE = "nsddata_betas/ppdata/subj{s:02d}/func1pt8mm/{version}/ncsnr.nii.gz"
_DOWNLOAD_HINT = "Download it from the NSD release (AWS bucket s3://natural-scenes-dataset/, same relative path)."


@dataclass(frozen=True)
class NSDRelease:
    """Paths of the raw NSD files for one subject.

    Parameters
    ----------
    root : Path
        The NSD root (the directory holding ``nsddata``, ``nsddata_betas``, ``nsddata_stimuli``).
    subject : int
        Subject number, 1..8.
    beta_version : str
        GLM folder of the betas (default ``betas_fithrf_GLMdenoise_RR``, Brain-Diffuser's).
    """

    root: Path
    subject: int
    beta_version: str = BETA_VERSION

    @property
    def design(self) -> Path:
        return self.root / DESIGN_FILE

    @property
    def mask(self) -> Path:
        return self.root / _MASK_FILE.format(s=self.subject)

    @property
    def stimuli(self) -> Path:
        return self.root / STIMULI_FILE

    @property
    def ncsnr(self) -> Path:
        return self.root / _NCSNR_FILE.format(s=self.subject, version=self.beta_version)

    def betas(self, session: int) -> Path:
        """Path of ``betas_sessionNN.nii.gz`` for 1-based ``session``."""
        return self.root / _BETA_FILE.format(s=self.subject, version=self.beta_version, n=session)

def check_subject(subject: int) -> int:
    """Return ``subject`` as int, or raise a :class:`DataError` naming the valid subjects."""
    try:
        s = int(subject)
    except (TypeError, ValueError):
        s = -1
    if s not in NSD_SESSIONS:
        raise DataError(f"Unknown NSD subject {subject!r}; valid subjects: 1, 2, 3, 4, 5, 6, 7, 8.")
    return s


def read_design(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read ``nsd_expdesign.mat``.

    Returns
    -------
    dict
        ``masterordering`` int64 (n_trials,) and ``subjectim`` int64 (8, 10000), both 1-based as
        stored; ``sharedix`` int64 (1000,) when present.

    Raises
    ------
    DataError
        When the file is missing, unreadable, or lacks a field or has a wrong shape.
    """
    import scipy.io

    path = Path(path)
    if not path.is_file():
        raise DataError(f"NSD design file not found: {path}. Expected {DESIGN_FILE} under the NSD root. "
                        f"{_DOWNLOAD_HINT}")
    try:
        mat = scipy.io.loadmat(path, squeeze_me=False)
    except Exception as exc:  # scipy raises several unrelated types for a damaged .mat
        raise DataError(f"{path} could not be read as a MATLAB .mat file ({type(exc).__name__}: {exc}); "
                        f"the file is corrupt or truncated. Expected NSD's nsd_expdesign.mat. "
                        f"{_DOWNLOAD_HINT}") from exc
    out = {}
    for field in ("masterordering", "subjectim"):
        if field not in mat:
            raise DataError(f"{path} has no field {field!r} (fields: "
                            f"{sorted(k for k in mat if not k.startswith('__'))}); expected NSD's nsd_expdesign.mat.")
    fields = {}
    for field in ("masterordering", "subjectim", "sharedix"):
        if field not in mat:
            continue
        value = np.asarray(mat[field])
        if value.dtype.kind not in "iuf" or (value.dtype.kind == "f" and not (
                np.isfinite(value).all() and (value == np.round(value)).all())):
            raise DataError(f"{path}: {field} holds {value.dtype} values that are not whole numbers; expected NSD's "
                            f"nsd_expdesign.mat (1-based integer indices). {_DOWNLOAD_HINT}")
        fields[field] = value
    mo = fields["masterordering"].reshape(-1)
    si = fields["subjectim"]
    if si.ndim != 2 or si.shape[0] != 8:
        raise DataError(f"{path}: subjectim has shape {si.shape}; expected (8, 10000). {_DOWNLOAD_HINT}")
    out["masterordering"] = mo.astype(np.int64)
    out["subjectim"] = si.astype(np.int64)
    if "sharedix" in fields:
        out["sharedix"] = fields["sharedix"].reshape(-1).astype(np.int64)
    n_list = si.shape[1]
    if mo.size and (mo.min() < 1 or mo.max() > n_list):
        raise DataError(f"{path}: masterordering holds values {mo.min()}..{mo.max()}; expected 1-based "
                        f"positions 1..{n_list} into subjectim. {_DOWNLOAD_HINT}")
    if si.size and (si.min() < 1 or si.max() > 73000):
        raise DataError(f"{path}: subjectim holds values {si.min()}..{si.max()}; expected 1-based NSD image ids "
                        f"1..73000. {_DOWNLOAD_HINT}")
    return out


def _corrupt(path: Path, what: str, exc: BaseException) -> DataError:
    return DataError(f"{path} could not be read ({type(exc).__name__}: {exc}); the file is corrupt or "
                     f"truncated. Expected {what}. {_DOWNLOAD_HINT}")

def _nifti_errors() -> tuple[type[BaseException], ...]:
    from nibabel.filebasedimages import ImageFileError

    return (OSError, EOFError, ValueError, zlib.error, ImageFileError)

def load_mask(path: str | os.PathLike) -> np.ndarray:
    """Read the nsdgeneral ROI: bool array of shape (X, Y, Z), True where the mask is > 0."""
    import nibabel as nib

    path = Path(path)
    if not path.is_file():
        raise DataError(f"ROI mask not found: {path}. Expected the subject's nsdgeneral.nii.gz. {_DOWNLOAD_HINT}")
    try:
        data = np.asanyarray(nib.load(path).dataobj)
    except _nifti_errors() as exc:
        raise _corrupt(path, "a 3-D NIfTI volume (the nsdgeneral ROI)", exc) from exc
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise DataError(f"{path}: the ROI mask has shape {data.shape}; expected a 3-D volume (X, Y, Z).")
    mask = data > 0
    if not mask.any():
        raise DataError(f"{path}: the ROI mask has no voxel > 0; expected the nsdgeneral ROI (values -1, 0, 1).")
    return mask

def load_ncsnr(path: str | os.PathLike, shape: tuple[int, ...], mask_path) -> np.ndarray:
    """Read a subject's ``ncsnr.nii.gz`` (float, shape ``shape``, the ROI mask's grid)."""
    import nibabel as nib

    path = Path(path)
    if not path.is_file():
        raise DataError(f"ncsnr map not found: {path}. Expected ncsnr.nii.gz beside the session betas, or leave "
                        f"ncsnr_threshold out. {_DOWNLOAD_HINT}", parameters=("ncsnr_threshold",))
    try:
        data = np.asanyarray(nib.load(path).dataobj).astype(np.float64)
    except _nifti_errors() as exc:
        raise _corrupt(path, "a 3-D NIfTI volume (the ncsnr map)", exc) from exc
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.shape != tuple(shape):
        raise DataError(f"{path} has shape {data.shape} but the ROI mask {mask_path} has shape {tuple(shape)}; "
                        "use the ncsnr map of the same 1.8-mm grid (func1pt8mm).")
    return np.nan_to_num(data, nan=-np.inf)

def read_session_betas(
    path: str | os.PathLike,
    mask: np.ndarray,
    *,
    mask_path: str | os.PathLike = "nsdgeneral.nii.gz",
    block: int = 50,
    progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Read one session's betas inside ``mask``, a block of volumes at a time.

    Parameters
    ----------
    path : path
        ``betas_sessionNN.nii.gz`` of shape (X, Y, Z, 750).
    mask : bool array of shape (X, Y, Z)
    block : int
        Volumes per read. NIfTI stores the volume axis slowest, so each block is one
        contiguous stretch of the file; the file stays open so blocks are decompressed in order.
    progress : callable, optional
        Called with the number of volumes read after each block.

    Returns
    -------
    array of shape (750, V)
        int16 as stored (% signal change x 300) when the file has no scaling, else float32.
    """
    import nibabel as nib

    path = Path(path)
    if not path.is_file():
        raise DataError(f"Betas file not found: {path}. {_DOWNLOAD_HINT}")
    expected = f"a NIfTI volume of shape {mask.shape + (TRIALS_PER_SESSION,)}"
    img = None
    try:
        img = nib.load(path, keep_file_open=True)
        shape = tuple(img.shape)
        if len(shape) != 4 or shape[:3] != mask.shape:
            raise DataError(
                f"Mask/beta shape mismatch: {path} has shape {shape} but the ROI mask {mask_path} has "
                f"shape {mask.shape}; expected betas of shape {mask.shape + (TRIALS_PER_SESSION,)} on the "
                f"same 1.8-mm grid (func1pt8mm) as the mask."
            )
        if shape[3] != TRIALS_PER_SESSION:
            raise DataError(f"{path} has {shape[3]} volumes; expected {TRIALS_PER_SESSION} trials per NSD session.")
        out = None
        nonzero = False
        for t0 in range(0, TRIALS_PER_SESSION, block):
            t1 = min(TRIALS_PER_SESSION, t0 + block)
            chunk = np.asarray(img.dataobj[..., t0:t1])
            masked = chunk[mask]  # (V, t1 - t0), C order over (X, Y, Z)
            if out is None:
                dtype = chunk.dtype if np.issubdtype(chunk.dtype, np.integer) else np.float32
                out = np.empty((TRIALS_PER_SESSION, masked.shape[0]), dtype=dtype)
            out[t0:t1] = masked.T
            nonzero = nonzero or bool(masked.any())
            del chunk, masked
            if progress is not None:
                progress(t1 - t0)
    except DataError:
        raise
    except _nifti_errors() as exc:
        raise _corrupt(path, expected, exc) from exc
    finally:
        # The array proxy closes the file it kept open when it is collected.
        del img
    if not nonzero:
        raise DataError(f"{path} holds only zeros inside the ROI mask {mask_path}; the file is damaged or not a "
                        f"session's betas. {_DOWNLOAD_HINT}")
    return out

def _open_stimuli(path: Path):
    import h5py

    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise _corrupt(path, "an HDF5 file with dataset 'imgBrick' (73000, 425, 425, 3) uint8", exc) from exc
    if "imgBrick" not in f:
        keys = list(f.keys())
        f.close()
        raise DataError(f"{path} has no dataset 'imgBrick' (datasets: {keys}); expected NSD's nsd_stimuli.hdf5.")
    dset = f["imgBrick"]
    if dset.ndim != 4 or dset.shape[-1] != 3 or dset.dtype != np.uint8:
        shape, dtype = dset.shape, dset.dtype
        f.close()
        raise DataError(f"{path}: imgBrick has shape {shape} and dtype {dtype}; expected (73000, 425, 425, 3) uint8.")
    return f, dset

def _read_image(dset, nsd_id: int, path: Path) -> np.ndarray:
    try:
        return dset[nsd_id]
    except OSError as exc:
        raise _corrupt(path, f"image {nsd_id} of imgBrick (425 x 425 x 3 uint8)", exc) from exc
