"""Prepare the raw Natural Scenes Dataset (NSD) release for the decoders.

Three modules: :mod:`~brainrecon.data.nsd.release` reads the release's files,
:mod:`~brainrecon.data.nsd.trials` plans which split and row every trial feeds, and
:mod:`~brainrecon.data.nsd.prepare` runs the resumable preparation. The output file names are
those of :mod:`brainrecon.data.layout`, which the loaders read.

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
6. With ``keep_repetitions=True`` (brainrecon format) every single trial is also written, in
   chronological order and in the averages' units: ``subjXX/{split}_trials_voxels.npy`` (n_trials,
   V) float32, ``_rows.npy`` (the row of its image), ``_repetition.npy`` (0-based rank among the
   image's trials) and ``_trial.npy`` (the 0-based global trial), streamed to disk per session.

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

from brainrecon.data.layout import MANIFEST
from brainrecon.data.nsd.prepare import (
    FORMATS,
    IMAGE_CHECKPOINT,
    STATE_VERSION,
    ZSCORE_MODES,
    prepare_nsd,
    zscore_session,
)
from brainrecon.data.nsd.release import (
    BETA_VERSION,
    DESIGN_FILE,
    NSD_GENERAL_VOXELS,
    NSD_SESSIONS,
    STIMULI_FILE,
    TRIALS_PER_SESSION,
    NSDRelease,
    check_subject,
    load_mask,
    load_ncsnr,
    read_design,
    read_session_betas,
)
from brainrecon.data.nsd.trials import (
    N_SHARED,
    OLD_RELEASE_SESSIONS,
    TEST_SETS,
    TrialPlan,
    plan_trials,
    resolve_sessions,
)
from brainrecon.data.resumable import NpyRowWriter, peak_memory_mb

__all__ = [
    "BETA_VERSION",
    "DESIGN_FILE",
    "FORMATS",
    "IMAGE_CHECKPOINT",
    "MANIFEST",
    "NSD_GENERAL_VOXELS",
    "NSD_SESSIONS",
    "N_SHARED",
    "NSDRelease",
    "NpyRowWriter",
    "OLD_RELEASE_SESSIONS",
    "STATE_VERSION",
    "STIMULI_FILE",
    "TEST_SETS",
    "TRIALS_PER_SESSION",
    "TrialPlan",
    "ZSCORE_MODES",
    "check_subject",
    "load_mask",
    "load_ncsnr",
    "peak_memory_mb",
    "plan_trials",
    "prepare_nsd",
    "read_design",
    "read_session_betas",
    "resolve_sessions",
    "zscore_session",
]
