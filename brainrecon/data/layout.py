"""Where prepared data lives on disk: one table of file names, used by the writers
(:func:`brainrecon.data.nsd.prepare_nsd`, :func:`brainrecon.data.surfaces.prepare_surfaces`)
and by the loaders (:mod:`brainrecon.data.loaders`), so that the two never disagree.

``brainrecon`` format: ``OUT/brainrecon-data.json`` and ``OUT/subjXX/{split}_{array}.npy``.
``brain-diffuser`` format: Brain-Diffuser's names under ``processed_data/subjXX/``.
"""

from __future__ import annotations

#: The manifest of a directory in the brainrecon format.
MANIFEST = "brainrecon-data.json"
#: The arrays of one split of one subject, in the order the loaders read them.
ARRAYS = ("voxels", "ids", "images", "captions", "surfaces")
#: brainrecon format: array -> file name in ``subjXX/`` (``.format(split=...)``).
BRAINRECON_FILES = {name: "{split}_" + name + ".npy" for name in ARRAYS}
#: Single trials kept by ``prepare-nsd --keep-repetitions`` (brainrecon format): trial voxels (n_trials, V),
#: the row of each trial's image in the split, its repetition index and its global NSD trial number.
TRIAL_ARRAYS = ("voxels", "rows", "repetition", "trial")
TRIAL_FILES = {name: "{split}_trials_" + name + ".npy" for name in TRIAL_ARRAYS}
#: Brain-Diffuser's ``processed_data/subjXX/`` names (``.format(split=..., n=subject)``). The ids
#: file is written beside them by ``brainrecon prepare-nsd --format brain-diffuser``;
#: Brain-Diffuser itself has none and ignores it.
BRAIN_DIFFUSER_FILES = {
    "voxels": "nsd_{split}_fmriavg_nsdgeneral_sub{n}.npy",
    "images": "nsd_{split}_stim_sub{n}.npy",
    "captions": "nsd_{split}_cap_sub{n}.npy",
    "ids": "nsd_{split}_ids_sub{n}.npy",
}

__all__ = ["ARRAYS", "BRAINRECON_FILES", "BRAIN_DIFFUSER_FILES", "MANIFEST", "TRIAL_ARRAYS", "TRIAL_FILES"]
