"""NeuroPictor's 2-D cortical surface maps: readers, the visual-cortex crop, preparation.

Two modules: :mod:`~brainrecon.data.surfaces.maps` reads the released maps and crops them to
the visual cortex; :mod:`~brainrecon.data.surfaces.prepare` joins them to a dataset.

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

from brainrecon.data.surfaces.maps import (
    PAD_X,
    PAD_Y,
    SURFACE_SIZE,
    FullBrainSurfaces,
    PerSampleSurfaces,
    SurfaceSource,
    VCCrop,
    linear_resize_matrix,
    nearest_resize_index,
    open_surfaces,
    resize_bilinear,
    resize_nearest,
    vc_crop_box,
)
from brainrecon.data.surfaces.prepare import (
    DUPLICATE_POLICIES,
    MISSING_POLICIES,
    prepare_surfaces,
    select_samples,
)

__all__ = [
    "DUPLICATE_POLICIES",
    "MISSING_POLICIES",
    "PAD_X",
    "PAD_Y",
    "SURFACE_SIZE",
    "FullBrainSurfaces",
    "PerSampleSurfaces",
    "SurfaceSource",
    "VCCrop",
    "linear_resize_matrix",
    "nearest_resize_index",
    "open_surfaces",
    "prepare_surfaces",
    "resize_bilinear",
    "resize_nearest",
    "select_samples",
    "vc_crop_box",
]
