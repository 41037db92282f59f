"""Prepare the raw Natural Scenes Dataset (NSD) release for the decoders.

:func:`prepare_nsd` (CLI: ``brainrecon prepare-nsd``) turns the files of the NSD release into
one subject's averaged betas, images, captions and 73k image ids, streaming one session and
one image at a time so that a full subject fits in a workstation's memory.

The recipe (Brain-Diffuser's ``prepare_nsddata.py``, Ozcelik & VanRullen 2023)
----------------------------------------------------------------------------------
Files read, relative to the NSD root::

    nsddata/experiments/nsd/nsd_expdesign.mat            masterordering, subjectim (1-based)
    nsddata/ppdata/subjXX/func1pt8mm/roi/nsdgeneral.nii.gz                  voxels: mask > 0
    nsddata_betas/ppdata/subjXX/func1pt8mm/betas_fithrf_GLMdenoise_RR/betas_sessionNN.nii.gz
    nsddata_stimuli/stimuli/nsd/nsd_stimuli.hdf5          imgBrick (73000, 425, 425, 3) uint8

1. Trial ``j`` (0-based, chronological, shared by all subjects) showed list position
   ``k = masterordering[j]`` (1..10000) of the subject's image list, whose 0-based 73k id is
   ``subjectim[subject - 1, k - 1] - 1``. Row ``r`` of session ``s`` is trial ``750 (s-1) + r``.
2. Positions ``k <= 1000`` are the shared images: the **test** split. All others: **train**.
   ``test_set=982`` keeps only the shared images shown in sessions 1-37 (the test set of
   Brain-Diffuser, MindEye1, NeuroPictor: the release before the Algonauts sessions 38-40);
   shared images first shown later are dropped from both splits, never moved into training.
3. Voxels are ``betas[mask > 0]`` on the (X, Y, Z, 750) array as nibabel loads it (C order
   over X, Y, Z), the same order as Brain-Diffuser's files.
4. The betas of all repetitions of an image within the chosen sessions are averaged in voxel
   space: a float32 sum in trial order divided by the count, which is bit-identical to
   Brain-Diffuser's ``np.mean`` over float32 rows.
5. Rows are ordered by the image's first appearance (Brain-Diffuser's order), and the 0-based
   73k id of every row is kept.

Units
-----
``zscore="none"`` keeps NSD's stored units, % signal change x 300 (the int16 values of the
beta files; divide by 300 for % signal change), in both output formats, exactly as
Brain-Diffuser's files hold them. ``zscore="session"`` (MindEye's convention) z-scores each
voxel over the 750 trials of each session (mean 0, standard deviation 1, ``ddof=0``,
statistics over all the session's trials, shared images included; a voxel that is constant
in a session becomes 0 there) before the repetitions are averaged. The manifest records the
units (``source.voxel_units``).

Output formats
--------------
``brainrecon`` (default): ``OUT/brainrecon-data.json`` and
``OUT/subjXX/{train,test}_{voxels,ids,images,captions}.npy`` (voxels float32 (n, V), ids
int64 (n,), images uint8 (n, 425, 425, 3), captions str (n, 5)), read by
:func:`brainrecon.data.load_dataset`. Preparing another subject into the same directory adds
it to the manifest; all subjects of one directory must share the recipe options.

``brain-diffuser``: Brain-Diffuser's names under ``OUT/subjXX/``:
``nsd_{train,test}_fmriavg_nsdgeneral_subN.npy`` (float32 here, where Brain-Diffuser stores the
same values as float64), ``nsd_{train,test}_stim_subN.npy`` (uint8 here, float64 there) and
``nsd_{train,test}_cap_subN.npy`` when captions are given; plus
``nsd_{train,test}_ids_subN.npy`` (int64 73k ids), a file Brain-Diffuser does not have and
ignores.

Streaming, resuming, atomic outputs
-----------------------------------
Work happens in ``OUT/.prepare-nsd-subjXX.partial/``:

1. each session's betas are read in blocks of volumes (never the whole 4-D file) and the
   masked (750, V) matrix is staged as ``betas/session_NN.npy`` (atomic write);
2. the staged sessions are z-scored if asked and summed into per-image accumulators
   (float32 (n_images, V): 0.63 GB for subject 1's 10,000 images x 15,724 voxels);
3. images are copied one at a time from ``imgBrick`` into ``.npy`` files written with plain
   file writes (no memory map, so the page cache never counts as the process's memory);
   ``state.json`` records how many are done.

Interrupting and re-running the same command continues: staged sessions whose source file
is unchanged are not read again and image copying restarts from the last checkpoint. The
finished subject directory is assembled inside the partial directory and renamed into place
in one step; the manifest is updated last.
"""

from __future__ import annotations

import hashlib
import os
import resource
import shutil
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from brainrecon.errors import BrainreconError, DataError
from brainrecon.io import read_json, replace_directory, write_array_atomic, write_json_atomic
from brainrecon.progress import bar_disabled

#: Number of NSD scan sessions per subject (NSD Data Manual, Technical notes).
NSD_SESSIONS = {1: 40, 2: 40, 3: 32, 4: 30, 5: 40, 6: 32, 7: 40, 8: 30}
#: nsdgeneral voxel counts (mask > 0) per subject, for reference and messages.
NSD_GENERAL_VOXELS = {1: 15724, 2: 14278, 3: 15226, 4: 13153, 5: 13039, 6: 17907, 7: 12682, 8: 14386}
TRIALS_PER_SESSION = 750
#: Sessions in the release before the Algonauts sessions 38-40 were added (982 test images).
OLD_RELEASE_SESSIONS = 37
N_SHARED = 1000
BETA_VERSION = "betas_fithrf_GLMdenoise_RR"
FORMATS = ("brainrecon", "brain-diffuser")
ZSCORE_MODES = ("none", "session")
TEST_SETS = (982, 1000)
MANIFEST = "brainrecon-data.json"
STATE_VERSION = 1
#: Images copied between two progress checkpoints (an fsync and a state write).
IMAGE_CHECKPOINT = 64

DESIGN_FILE = "nsddata/experiments/nsd/nsd_expdesign.mat"
STIMULI_FILE = "nsddata_stimuli/stimuli/nsd/nsd_stimuli.hdf5"
_MASK_FILE = "nsddata/ppdata/subj{s:02d}/func1pt8mm/roi/nsdgeneral.nii.gz"
_BETA_FILE = "nsddata_betas/ppdata/subj{s:02d}/func1pt8mm/{version}/betas_session{n:02d}.nii.gz"
# Noise-ceiling SNR of every voxel, one per beta version (NSD data manual).
_NCSNR_FILE = "nsddata_betas/ppdata/subj{s:02d}/func1pt8mm/{version}/ncsnr.nii.gz"
_BD_NAMES = {
    "voxels": "nsd_{split}_fmriavg_nsdgeneral_sub{n}.npy",
    "images": "nsd_{split}_stim_sub{n}.npy",
    "captions": "nsd_{split}_cap_sub{n}.npy",
    "ids": "nsd_{split}_ids_sub{n}.npy",
}
_BR_NAMES = {k: "{split}_" + k + ".npy" for k in ("voxels", "ids", "images", "captions")}
_SPLITS = ("train", "test")
_DOWNLOAD_HINT = "Download it from the NSD release (AWS bucket s3://natural-scenes-dataset/, same relative path)."


# ----------------------------------------------------------------------------- release layout
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


def resolve_sessions(subject: int, sessions: int | str | None, test_set: int | None) -> tuple[int, str, int]:
    """Turn the user's ``sessions`` / ``test_set`` request into numbers.

    Parameters
    ----------
    subject : int
    sessions : int, "all" or None
        The first K sessions, all of the subject's sessions, or the default: all sessions,
        except with ``test_set=982`` where the default is the first 37 (clipped to what the
        subject has).
    test_set : {982, 1000} or None
        None means 1000 (every shared image shown in the chosen sessions).

    Returns
    -------
    n_sessions : int
    request : str
        What was asked, as recorded in the manifest ("all", "37-or-fewer" or "K").
    test_set : int
    """
    subject = check_subject(subject)
    have = NSD_SESSIONS[subject]
    if test_set is None:
        test_set = 1000
    try:
        test_set = int(test_set)
    except (TypeError, ValueError):
        test_set = -1
    if test_set not in TEST_SETS:
        raise DataError(f"Unknown test set {test_set!r}; valid: 982 (sessions 1-37, the pre-2023 papers' "
                        f"test set) or 1000 (all shared images).")
    if sessions is None:
        if test_set == 982:
            return min(OLD_RELEASE_SESSIONS, have), "37-or-fewer", test_set
        return have, "all", test_set
    if isinstance(sessions, str) and sessions.strip().lower() == "all":
        return have, "all", test_set
    try:
        k = int(sessions)
    except (TypeError, ValueError):
        raise DataError(f"--sessions must be a number of sessions or 'all', got {sessions!r}.") from None
    if k < 1:
        raise DataError(f"--sessions must be at least 1, got {k}.")
    if k > have:
        raise DataError(
            f"Subject {subject} has {have} NSD sessions (1-{have}); --sessions {k} asks for sessions "
            f"up to {k}, which this subject does not have. Use --sessions {have} or --sessions all."
        )
    return k, str(k), test_set


# ----------------------------------------------------------------------------- design / plan
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


@dataclass
class TrialPlan:
    """Which split and row each trial of the chosen sessions feeds.

    Attributes
    ----------
    subject, n_sessions, test_set : int
    train_ids, test_ids : int64 arrays of shape (n_train,), (n_test,)
        0-based 73k ids in order of first appearance.
    trial_split : int8 array of shape (n_sessions * 750,)
        0 = train, 1 = test, -1 = dropped (a shared image outside the 982 test set).
    trial_row : int64 array of shape (n_sessions * 750,)
        Row of the trial's image in its split (-1 when dropped).
    n_dropped_shared : int
        Shared images shown in the chosen sessions but outside the test set.
    """

    subject: int
    n_sessions: int
    test_set: int
    train_ids: np.ndarray
    test_ids: np.ndarray
    trial_split: np.ndarray
    trial_row: np.ndarray
    n_dropped_shared: int

    def ids(self, split: str) -> np.ndarray:
        return self.train_ids if split == "train" else self.test_ids


def plan_trials(design: dict[str, np.ndarray], subject: int, n_sessions: int, test_set: int = 1000) -> TrialPlan:
    """Assign every trial of the first ``n_sessions`` sessions to a split and a row.

    Parameters
    ----------
    design : dict
        From :func:`read_design`.
    subject : int
    n_sessions : int
    test_set : {982, 1000}

    Returns
    -------
    TrialPlan
    """
    subject = check_subject(subject)
    mo = design["masterordering"]
    n_trials = n_sessions * TRIALS_PER_SESSION
    if mo.size < n_trials:
        raise DataError(f"nsd_expdesign.mat: masterordering has {mo.size} trials but {n_sessions} sessions "
                        f"need {n_trials}. {_DOWNLOAD_HINT}")
    pos = mo[:n_trials]
    ids = design["subjectim"][subject - 1, pos - 1] - 1
    shared = pos <= N_SHARED
    split = np.where(shared, 1, 0).astype(np.int8)
    n_dropped = 0
    if test_set == 982:
        old_n = OLD_RELEASE_SESSIONS * TRIALS_PER_SESSION
        if mo.size < old_n:
            raise DataError(f"nsd_expdesign.mat: masterordering has {mo.size} trials; the 982 test set needs "
                            f"the first {old_n}. {_DOWNLOAD_HINT}")
        old_pos = np.unique(mo[:old_n][mo[:old_n] <= N_SHARED])
        outside = shared & ~np.isin(pos, old_pos)
        split[outside] = -1
        n_dropped = int(np.unique(pos[outside]).size)
    rows = np.full(n_trials, -1, dtype=np.int64)
    ordered = {}
    for code, name in ((0, "train"), (1, "test")):
        sel = np.flatnonzero(split == code)
        uniq, first, inverse = np.unique(ids[sel], return_index=True, return_inverse=True)
        order = np.argsort(first, kind="stable")
        rank = np.empty(len(uniq), dtype=np.int64)
        rank[order] = np.arange(len(uniq))
        rows[sel] = rank[inverse.reshape(-1)]
        ordered[name] = uniq[order].astype(np.int64)
    return TrialPlan(subject, n_sessions, test_set, ordered["train"], ordered["test"], split, rows, n_dropped)


# ----------------------------------------------------------------------------- volumes
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
                        f"out --ncsnr-threshold. {_DOWNLOAD_HINT}")
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


# ----------------------------------------------------------------------------- npy row writer
class NpyRowWriter:
    """Write the rows of a ``.npy`` file one at a time with plain file writes.

    Creating the file reserves its full size (sparse where the filesystem allows); rows can
    be written in any order and rewritten, so a resumed copy may overlap the last checkpoint.

    Parameters
    ----------
    path : Path
    shape : tuple
        Full array shape; rows are along axis 0.
    dtype : numpy dtype
    resume : bool
        Reuse an existing file of the same shape and dtype instead of creating a new one.
    """

    def __init__(self, path: str | os.PathLike, shape: tuple[int, ...], dtype: Any, *, resume: bool = False):
        self.path = Path(path)
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        self.row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        existing = None
        if resume and self.path.is_file():
            try:
                existing = np.load(self.path, mmap_mode="r")
                if existing.shape != self.shape or existing.dtype != self.dtype:
                    existing = None
            except (ValueError, OSError, EOFError):
                existing = None
        if existing is None:
            existing = np.lib.format.open_memmap(self.path, mode="w+", dtype=self.dtype, shape=self.shape)
        self.offset = int(existing.offset)
        del existing
        self._f = open(self.path, "r+b")

    def write(self, row: int, value: np.ndarray) -> None:
        value = np.ascontiguousarray(value, dtype=self.dtype)
        if value.shape != self.shape[1:]:
            raise DataError(f"{self.path}: row {row} has shape {value.shape}; expected {self.shape[1:]}.")
        self._f.seek(self.offset + row * self.row_bytes)
        self._f.write(value.tobytes())

    def sync(self) -> None:
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        if not self._f.closed:
            self.sync()
            self._f.close()

    def __enter__(self) -> "NpyRowWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ----------------------------------------------------------------------------- main entry
def _sha(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:20]


def _file_key(path: Path) -> dict[str, int]:
    st = path.stat()
    return {"size": int(st.st_size), "mtime_ns": int(st.st_mtime_ns)}


def peak_memory_mb() -> float:
    """Peak resident memory of this process so far, in MB (``getrusage`` max RSS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1e6 if sys.platform == "darwin" else rss / 1e3


def _tqdm(progress: bool, **kwargs):
    from tqdm.auto import tqdm

    return tqdm(disable=bar_disabled(progress), **kwargs)


def prepare_nsd(
    nsd_root: str | os.PathLike,
    subject: int,
    out: str | os.PathLike,
    *,
    sessions: int | str | None = None,
    test_set: int | None = None,
    zscore: str = "none",
    captions: str | os.PathLike | None = None,
    format: str = "brainrecon",
    beta_version: str = BETA_VERSION,
    overwrite: bool = False,
    progress: bool = True,
    name: str | None = None,
    ncsnr_threshold: float | None = None,
) -> dict[str, Any]:
    """Prepare one NSD subject from the raw release (see the module docstring for the recipe).

    Parameters
    ----------
    nsd_root : path
        Directory holding ``nsddata``, ``nsddata_betas`` and ``nsddata_stimuli``.
    subject : int
        1..8.
    out : path
        Output directory (created). For the brainrecon format it may already hold other
        subjects prepared with the same options.
    sessions : int, "all" or None
        Use the first K sessions; None: all, or the first 37 with ``test_set=982``.
    test_set : {982, 1000} or None
        982: the shared images shown in sessions 1-37; 1000 (default): every shared image
        shown in the chosen sessions.
    zscore : {"none", "session"}
        Raw NSD units, or per-session per-voxel z-scoring before averaging.
    captions : path, optional
        ``COCO_73k_annots_curated.npy`` (73000, 5) strings.
    format : {"brainrecon", "brain-diffuser"}
    beta_version : str
        GLM folder name under ``func1pt8mm``.
    overwrite : bool
        Replace this subject's existing prepared files.
    progress : bool
        Show progress bars.
    name : str, optional
        Dataset name recorded in a new manifest (default: the output directory's name).
    ncsnr_threshold : float, optional
        Keep only nsdgeneral voxels whose noise-ceiling SNR (``ncsnr.nii.gz`` of the chosen
        beta version) exceeds this value, the voxel selection of MindEye2's preparation;
        recorded in the dataset's source (so in its fingerprint).

    Returns
    -------
    dict
        ``subject, out (Path of the subject directory), n_train, n_test, n_voxels, n_sessions,
        test_set, zscore, format, peak_memory_mb`` (process max RSS so far).

    Raises
    ------
    DataError
        Missing or corrupt input files, a subject without the requested sessions, a mask/beta
        shape mismatch, conflicting options for an existing output directory.
    """
    subject = check_subject(subject)
    if format not in FORMATS:
        raise DataError(f"Unknown format {format!r}; valid: 'brainrecon', 'brain-diffuser'.")
    if zscore not in ZSCORE_MODES:
        raise DataError(f"Unknown zscore mode {zscore!r}; valid: 'none', 'session'.")
    if format == "brain-diffuser" and zscore != "none":
        raise DataError("--format brain-diffuser writes raw betas as Brain-Diffuser's files hold them; "
                        "--zscore session is only available with --format brainrecon.")
    n_sessions, request, test_set = resolve_sessions(subject, sessions, test_set)
    root = Path(nsd_root).expanduser()
    if not root.is_dir():
        raise DataError(f"NSD root {root} is not a directory; expected the folder holding nsddata/, "
                        f"nsddata_betas/ and nsddata_stimuli/.")
    release = NSDRelease(root, subject, beta_version)
    out = Path(out).expanduser()
    captions = Path(captions).expanduser() if captions is not None else None

    source = {
        "kind": "nsd",
        "beta_version": beta_version,
        "sessions": request,
        "test_set": test_set,
        "zscore": zscore,
        "voxel_units": "session_zscore" if zscore == "session" else "nsd_raw_x300",
        "voxel_order": "nibabel C order over (X, Y, Z) of nsdgeneral > 0",
        "row_order": "first appearance",
    }
    if ncsnr_threshold is not None:
        source["ncsnr_threshold"] = float(ncsnr_threshold)
        source["voxel_order"] = f"nibabel C order over (X, Y, Z) of nsdgeneral > 0 and ncsnr > {float(ncsnr_threshold):g}"
    subject_dir = out / f"subj{subject:02d}"
    partial = out / f".prepare-nsd-subj{subject:02d}.partial"
    request = {"source": source, "format": format, "nsd_root": str(root.resolve()), "n_sessions": n_sessions,
               "captions": str(captions.resolve()) if captions is not None else None}
    # A run killed after its finished subject folder was swapped in (before or after the manifest
    # was written, before its work folder was removed) is completed here without redoing it.
    finished = None if overwrite else _finished_run(partial, subject_dir, request)
    if finished is not None:
        manifest = _read_manifest(out) if format == "brainrecon" else None
        if format == "brainrecon" and (manifest is None or subject not in manifest["subjects"]
                                       or manifest.get("subject_info", {}).get(str(subject)) != finished["info"]):
            _update_manifest(out, subject, source, finished["info"], name)
        shutil.rmtree(partial, ignore_errors=True)
        print(f"prepare-nsd: subject {subject} was finished by an earlier run that was stopped before it cleaned up; "
              f"removed the work folder {partial} left by an earlier run.", file=sys.stderr)
        return {**finished["summary"], "out": subject_dir, "peak_memory_mb": peak_memory_mb()}
    # Fail fast, before any long work: the output directory, then every input file.
    _check_output(out, subject, format, source, overwrite)
    for session in range(1, n_sessions + 1):
        if not release.betas(session).is_file():
            raise DataError(
                f"Betas file for subject {subject}, session {session} not found: {release.betas(session)}. "
                f"Expected betas_session01..{n_sessions:02d}.nii.gz ({n_sessions} sessions requested) in "
                f"{release.betas(session).parent}. {_DOWNLOAD_HINT}"
            )
    if not release.stimuli.is_file():
        raise DataError(f"Stimulus file not found: {release.stimuli}. Expected {STIMULI_FILE} under the NSD "
                        f"root. {_DOWNLOAD_HINT}")
    if captions is not None and not captions.is_file():
        raise DataError(f"Captions file not found: {captions}. Expected COCO_73k_annots_curated.npy "
                        f"(73000 x 5 strings), or leave out --captions.")

    design = read_design(release.design)
    plan = plan_trials(design, subject, n_sessions, test_set)
    mask = load_mask(release.mask)
    if ncsnr_threshold is not None:
        mask = mask & (load_ncsnr(release.ncsnr, mask.shape, release.mask) > float(ncsnr_threshold))
        if not mask.any():
            raise DataError(f"No nsdgeneral voxel of subject {subject} has ncsnr > {ncsnr_threshold:g} "
                            f"({release.ncsnr}); choose a lower --ncsnr-threshold.")
    n_voxels = int(mask.sum())

    partial.mkdir(parents=True, exist_ok=True)
    state = _load_state(partial, subject, mask, release.mask)

    staged = _stage_sessions(release, plan, mask, partial, state, progress)
    voxels = _average(plan, staged, n_voxels, zscore, progress)
    images = _copy_images(release.stimuli, plan, partial, state, progress)
    caps = _read_captions(captions, plan) if captions is not None else None

    # Assemble the finished subject directory inside the partial one, then swap it in.
    names = _BR_NAMES if format == "brainrecon" else _BD_NAMES
    build = partial / "out"
    if build.exists():
        shutil.rmtree(build)
    build.mkdir()
    for split in _SPLITS:
        fill = {"split": split, "n": subject}
        write_array_atomic(build / names["voxels"].format(**fill), voxels[split])
        write_array_atomic(build / names["ids"].format(**fill), plan.ids(split))
        os.replace(images[split], build / names["images"].format(**fill))
        if caps is not None:
            write_array_atomic(build / names["captions"].format(**fill), caps[split])
    summary = {
        "subject": subject,
        "out": subject_dir,
        "n_train": int(plan.train_ids.size),
        "n_test": int(plan.test_ids.size),
        "n_voxels": n_voxels,
        "n_sessions": n_sessions,
        "test_set": test_set,
        "zscore": zscore,
        "format": format,
        "n_dropped_shared": plan.n_dropped_shared,
    }
    info = None
    if format == "brainrecon":
        info = {
            "nsd_root": str(root.resolve()),
            "n_sessions": n_sessions,
            "n_train": summary["n_train"],
            "n_test": summary["n_test"],
            "n_voxels": n_voxels,
            "n_dropped_shared": plan.n_dropped_shared,
            "captions": str(captions.resolve()) if captions is not None else None,
        }
    # Recorded before the swap: a rerun after a kill from here on finishes without redoing anything.
    state["finished"] = {"request": request, "info": info,
                         "summary": {k: v for k, v in summary.items() if k != "out"}}
    _save_state(state)
    replace_directory(build, subject_dir)
    if format == "brainrecon":
        _update_manifest(out, subject, source, info, name)
    shutil.rmtree(partial, ignore_errors=True)
    summary["peak_memory_mb"] = peak_memory_mb()
    return summary


# ----------------------------------------------------------------------------- steps
def _read_manifest(out: Path) -> dict[str, Any] | None:
    from brainrecon.data.loaders import read_brainrecon_manifest

    path = out / MANIFEST
    if not path.exists():
        return None
    return read_brainrecon_manifest(path, fix=f"fix or remove it (then re-run prepare-nsd for every subject of {out})")


_RECIPE_KEYS = ("kind", "beta_version", "sessions", "test_set", "zscore")


def _finished_run(partial: Path, subject_dir: Path, request: dict) -> dict[str, Any] | None:
    """What an earlier run of the same request recorded as finished, when its subject folder is in
    place (swapped in: the work folder has no ``out`` build left), else None."""
    state_file = partial / "state.json"
    if not (state_file.is_file() and subject_dir.is_dir()) or (partial / "out").exists():
        return None
    try:
        state = read_json(state_file)
    except BrainreconError:
        return None
    finished = state.get("finished") if isinstance(state, dict) else None
    if not (isinstance(finished, dict) and finished.get("request") == request
            and isinstance(finished.get("summary"), dict)):
        return None
    if request["format"] == "brainrecon" and not isinstance(finished.get("info"), dict):
        return None
    return finished


def _check_output(out: Path, subject: int, format: str, source: dict, overwrite: bool) -> None:
    subject_dir = out / f"subj{subject:02d}"
    manifest = _read_manifest(out) if format == "brainrecon" else None
    present = [int(s) for s in manifest.get("subjects", [])] if manifest else []
    partial = out / f".prepare-nsd-subj{subject:02d}.partial"
    unfinished = partial.is_dir()
    if subject in present and not overwrite:
        left = (f" The work folder {partial} of an unfinished earlier run is there too: --overwrite resumes "
                f"from what it staged, or delete it." if unfinished else "")
        raise DataError(f"Subject {subject} is already prepared in {out}; pass --overwrite to replace it "
                        f"(its surface maps, if any, are dropped and must be prepared again).{left}")
    # A run killed after swapping the subject directory in, before recording it (manifest) and
    # removing its work folder, is finished by re-running the same command.
    if subject_dir.exists() and not overwrite and not unfinished:
        # Another layout's files are never replaced silently.
        raise DataError(f"{subject_dir} already exists; pass --overwrite to replace it, or choose another --out.")
    if manifest is None:
        return
    others = [s for s in present if s != subject]
    old = manifest.get("source", {})
    differ = {k: (old.get(k), source[k]) for k in _RECIPE_KEYS if old.get(k) != source[k]}
    if others and differ:
        detail = ", ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in differ.items())
        raise DataError(f"{out} holds subject(s) {others} prepared with other options ({detail}). All subjects of "
                        f"one directory share the recipe; use another --out or the same options.")


def _update_manifest(out: Path, subject: int, source: dict, info: dict, name: str | None) -> None:
    manifest = _read_manifest(out) or {
        "format": "brainrecon-data",
        "version": 1,
        "name": name or out.resolve().name,
        "subjects": [],
        "ids_are_nsd": True,
    }
    subjects = sorted({int(s) for s in manifest.get("subjects", [])} | {subject})
    manifest["subjects"] = subjects
    manifest["ids_are_nsd"] = True
    manifest["source"] = source
    manifest.setdefault("subject_info", {})[str(subject)] = info
    # A re-prepared subject has new rows; surfaces joined to the old rows are gone with them.
    manifest.get("surfaces", {}).pop(str(subject), None)
    write_json_atomic(out / MANIFEST, manifest)


def _state_ok(state: Any, subject: int, mask_key: dict) -> bool:
    """Whether a read ``state.json`` has the structure this version writes (else staging restarts)."""
    if not (isinstance(state, dict) and state.get("version") == STATE_VERSION and state.get("subject") == subject
            and state.get("mask") == mask_key and isinstance(state.get("sessions"), dict)
            and isinstance(state.get("images"), dict)):
        return False
    for entry in state["images"].values():
        if not (isinstance(entry, dict) and isinstance(entry.get("key"), dict) and isinstance(entry.get("done"), int)
                and not isinstance(entry["done"], bool) and entry["done"] >= 0):
            return False
    return True


def _load_state(partial: Path, subject: int, mask: np.ndarray, mask_path: Path) -> dict[str, Any]:
    state_file = partial / "state.json"
    mask_key = {"shape": list(mask.shape), "n_voxels": int(mask.sum()), "sha": _sha(np.packbits(mask))}
    state = None
    if state_file.is_dir():
        shutil.rmtree(state_file)
    if state_file.is_file():
        try:
            state = read_json(state_file)
        except (ValueError, BrainreconError):  # damaged: start this subject's staging over
            state = None
    if not _state_ok(state, subject, mask_key):
        # Nothing staged is valid for this mask (or the state is damaged): start over.
        for sub in ("betas",):
            shutil.rmtree(partial / sub, ignore_errors=True)
        state = {"version": STATE_VERSION, "subject": subject, "mask": mask_key, "sessions": {}, "images": {}}
        write_json_atomic(state_file, state)
    state["_file"] = str(state_file)
    return state


def _staged_key(src: Path, dst: Path) -> dict[str, Any]:
    """What a staged session is valid for: its source file and the staged file as written."""
    return {"source": _file_key(src), "staged": _file_key(dst)}


def _save_state(state: dict[str, Any]) -> None:
    write_json_atomic(state["_file"], {k: v for k, v in state.items() if k != "_file"})


def _stage_sessions(release: NSDRelease, plan: TrialPlan, mask: np.ndarray, partial: Path,
                    state: dict[str, Any], progress: bool) -> list[Path]:
    staged_dir = partial / "betas"
    staged_dir.mkdir(exist_ok=True)
    paths = []
    todo = []
    for session in range(1, plan.n_sessions + 1):
        src = release.betas(session)
        dst = staged_dir / f"session_{session:02d}.npy"
        paths.append(dst)
        if dst.is_dir():
            shutil.rmtree(dst)
        # A staged file that was changed or replaced since it was written is staged again.
        if not (dst.is_file() and state["sessions"].get(str(session)) == _staged_key(src, dst)):
            todo.append((session, src, dst))
    outer = _tqdm(progress, total=plan.n_sessions, initial=plan.n_sessions - len(todo),
                  desc=f"subj{plan.subject:02d} betas", unit="session")
    with outer:
        for session, src, dst in todo:
            with _tqdm(progress, total=TRIALS_PER_SESSION, desc=f"session {session:02d}", unit="vol",
                       leave=False) as bar:
                betas = read_session_betas(src, mask, mask_path=release.mask, progress=bar.update)
            write_array_atomic(dst, betas)
            del betas
            state["sessions"][str(session)] = _staged_key(src, dst)
            _save_state(state)
            outer.update(1)
    return paths


def zscore_session(betas: np.ndarray) -> np.ndarray:
    """Z-score each voxel over one session's trials.

    Parameters
    ----------
    betas : array of shape (n_trials, V)

    Returns
    -------
    float32 array of shape (n_trials, V)
        Mean 0 and standard deviation 1 (``ddof=0``) per column; constant columns become 0.
    """
    x = np.asarray(betas, dtype=np.float64)
    mean = x.mean(axis=0)
    std = x.std(axis=0)
    safe = np.where(std > 0, std, 1.0)
    z = (x - mean) / safe
    z[:, std == 0] = 0.0
    return z.astype(np.float32)


def _average(plan: TrialPlan, staged: list[Path], n_voxels: int, zscore: str, progress: bool) -> dict[str, np.ndarray]:
    sums = {split: np.zeros((plan.ids(split).size, n_voxels), dtype=np.float32) for split in _SPLITS}
    counts = {split: np.zeros(plan.ids(split).size, dtype=np.int64) for split in _SPLITS}
    with _tqdm(progress, total=len(staged), desc=f"subj{plan.subject:02d} average", unit="session") as bar:
        for s, path in enumerate(staged):
            try:
                betas = np.load(path, allow_pickle=False)
            except (ValueError, OSError, EOFError) as exc:
                raise DataError(f"Staged betas {path} could not be read ({exc}); delete {path.parent.parent} and "
                                f"re-run.") from None
            if betas.shape != (TRIALS_PER_SESSION, n_voxels):
                raise DataError(f"Staged betas {path} have shape {betas.shape}, expected "
                                f"({TRIALS_PER_SESSION}, {n_voxels}); delete {path.parent.parent} and re-run.")
            values = zscore_session(betas) if zscore == "session" else betas.astype(np.float32)
            del betas
            sl = slice(s * TRIALS_PER_SESSION, (s + 1) * TRIALS_PER_SESSION)
            for code, split in ((0, "train"), (1, "test")):
                sel = np.flatnonzero(plan.trial_split[sl] == code)
                rows = plan.trial_row[sl][sel]
                # In trial order, so sums match a chronological np.mean bit for bit.
                np.add.at(sums[split], rows, values[sel])
                np.add.at(counts[split], rows, 1)
            del values
            bar.update(1)
    for split in _SPLITS:
        if (counts[split] == 0).any():  # cannot happen with a consistent plan
            raise DataError(f"Internal error: {int((counts[split] == 0).sum())} {split} images without trials.")
        sums[split] /= counts[split][:, None].astype(np.float32)
    return sums


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


def _copy_images(stimuli: Path, plan: TrialPlan, partial: Path, state: dict[str, Any], progress: bool) -> dict[str, Path]:
    checkpoint = IMAGE_CHECKPOINT
    f, dset = _open_stimuli(stimuli)
    paths = {}
    try:
        max_id = max(int(plan.train_ids.max(initial=-1)), int(plan.test_ids.max(initial=-1)))
        if max_id >= dset.shape[0]:
            raise DataError(f"{stimuli}: imgBrick holds {dset.shape[0]} images but image id {max_id} is needed; "
                            f"expected all 73000 NSD images.")
        shape_hw = tuple(int(s) for s in dset.shape[1:])
        source_key = _file_key(stimuli)
        for split in _SPLITS:
            ids = plan.ids(split)
            path = partial / f"images_{split}.npy"
            paths[split] = path
            key = {"ids": _sha(ids), "source": source_key, "shape": [int(ids.size), *shape_hw]}
            entry = state["images"].get(split)
            if path.is_dir():
                shutil.rmtree(path)
            # A half-copied file that is no longer the array started (truncated, replaced) starts over.
            resume = bool(entry and entry.get("key") == key and _npy_matches(path, (int(ids.size), *shape_hw), np.uint8)
                          and int(entry["done"]) <= ids.size)
            done = int(entry["done"]) if resume else 0
            if not resume:
                state["images"][split] = {"key": key, "done": 0}
                _save_state(state)
            with NpyRowWriter(path, (ids.size, *shape_hw), np.uint8, resume=resume) as writer, \
                    _tqdm(progress, total=int(ids.size), initial=done, desc=f"subj{plan.subject:02d} {split} images",
                          unit="img") as bar:
                for i in range(done, ids.size):
                    writer.write(i, _read_image(dset, int(ids[i]), stimuli))
                    bar.update(1)
                    if (i + 1) % checkpoint == 0 or i + 1 == ids.size:
                        writer.sync()
                        state["images"][split]["done"] = i + 1
                        _save_state(state)
    finally:
        f.close()
    return paths


def _npy_matches(path: Path, shape: tuple[int, ...], dtype: Any) -> bool:
    if not path.is_file():
        return False
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError):
        return False
    ok = arr.shape == tuple(shape) and arr.dtype == np.dtype(dtype)
    del arr
    return ok


def _read_image(dset, nsd_id: int, path: Path) -> np.ndarray:
    try:
        return dset[nsd_id]
    except OSError as exc:
        raise _corrupt(path, f"image {nsd_id} of imgBrick (425 x 425 x 3 uint8)", exc) from exc


def _read_captions(path: Path, plan: TrialPlan) -> dict[str, np.ndarray]:
    try:
        caps = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as exc:
        raise DataError(f"{path} could not be read as a plain string array ({exc}); expected "
                        f"COCO_73k_annots_curated.npy, (73000, 5) strings, not pickled objects.") from exc
    except (OSError, EOFError) as exc:
        raise _corrupt(path, "COCO_73k_annots_curated.npy, (73000, 5) strings", exc) from exc
    if caps.ndim != 2 or caps.dtype.kind not in "US":
        raise DataError(f"{path} holds {caps.dtype} of shape {caps.shape}; expected (73000, 5) strings.")
    out = {}
    for split in _SPLITS:
        ids = plan.ids(split)
        if ids.size and ids.max() >= caps.shape[0]:
            raise DataError(f"{path} has {caps.shape[0]} rows but image id {int(ids.max())} is needed; "
                            f"expected one row per NSD 73k image.")
        rows = np.asarray(caps[ids])
        out[split] = rows.astype(str) if rows.dtype.kind == "S" else rows
    return out
