"""Reconstructing images with a fitted NeuroPictor decoder: the methods of :class:`ReconstructionMixin`.

:class:`~brainrecon.decoders.neuropictor.decoder.NeuroPictorDecoder` inherits them: ``predict``
(every test image of every fitted subject), ``reconstruct`` (any surface maps), and the paper's
two experiments, ``swap_semantics`` (Fig. 2 / 7) and ``control_sweep`` (Fig. 1 / 6), and the
image grids ``fit`` writes while it trains (``validate_every``). They check their input and call :func:`~brainrecon.decoders.neuropictor.sample.reconstruct_images` with the
frozen components placed on the decoder's device in the sampling precision.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from brainrecon.decoders.neuropictor import model, sample
from brainrecon.decoders.neuropictor import train as train_module
from brainrecon.errors import BrainreconError, DataError

VALIDATION_ROWS = 4
VALIDATION_STEPS = 20  # DDIM steps of the validation grids, as in the original code


class ReconstructionMixin:
    """Images from a fitted NeuroPictor decoder (mixed into ``NeuroPictorDecoder``, whose
    parameters, fitted networks, ``_base()``, ``_device()`` and checks they use)."""

    def _check_images_stage(self) -> None:
        self._check_fitted()
        if self.stage_ == "encoder":
            raise BrainreconError(
                "This NeuroPictor decoder was trained in stage 'encoder' (a surface-map "
                "autoencoder) and cannot reconstruct images; use it as init_from of a 'pretrain' "
                "stage (`brainrecon fit --decoder neuropictor --stage pretrain --init-from DIR`)."
            )

    def _sample(self, net, structure: np.ndarray, semantics: np.ndarray, image_ids, *,
                geometry=None, use_aux=None, empty=None, steps=None, control_scale=None) -> np.ndarray:
        base = self._base()
        geometry = geometry or self.geometry_
        use_aux = self.aux_active_ if use_aux is None else use_aux
        empty = self.empty_context_ if empty is None else empty
        device = self._device()
        self._check_choice("sample_precision", sample.SAMPLE_PRECISION)
        self._check_choice("pixel_rounding", sample.PIXEL_ROUNDING)
        dtype = train_module.weight_dtype(self._mixed_precision(device))
        autocast = None
        if self.sample_precision == "fp16-autocast" and device.type == "cuda":
            dtype, autocast = torch.float32, torch.float16  # fp32 weights, fp16 autocast (official)
        model.place(base.unet, device, dtype)
        model.place(base.vae, device, dtype)
        net.to(device).eval()
        return sample.reconstruct_images(
            net, base, structure, semantics, sample.image_seeds(self.seed, image_ids), geometry=geometry,
            use_aux=use_aux, empty_context=empty, device=device, image_size=self.image_size,
            batch_size=self.predict_batch_size,
            control_scale=self.control_scale if control_scale is None else control_scale,
            guidance_scale=self.guidance_scale,
            num_inference_steps=self.num_inference_steps if steps is None else steps,
            autocast_dtype=autocast, rounding=self.pixel_rounding)

    def reconstruct(self, surfaces: np.ndarray, *, semantic_surfaces: np.ndarray | None = None,
                    image_ids: Sequence[int] | None = None, control_scale: float | None = None,
                    num_inference_steps: int | None = None) -> np.ndarray:
        """Reconstruct images from surface maps.

        Parameters
        ----------
        surfaces : array of shape (n, S, S)
            Surface maps giving the structure (the ControlNet hint) and, unless
            ``semantic_surfaces`` is given, the semantics.
        semantic_surfaces : array of shape (n, S, S), optional
            Surface maps giving the semantic context (the swap experiment).
        image_ids : sequence of int, optional
            Seed each image's noise (default ``0..n-1``).
        control_scale : float, optional
            alpha (default: the decoder's ``control_scale``).

        Returns
        -------
        uint8 array of shape (n, image_size, image_size, 3)
        """
        self._check_images_stage()
        surfaces = self._as_maps(surfaces, "surfaces")
        semantics = surfaces if semantic_surfaces is None else self._as_maps(semantic_surfaces, "semantic_surfaces")
        if len(semantics) != len(surfaces):
            raise DataError(f"{len(surfaces)} structure maps but {len(semantics)} semantic maps; give one each.")
        ids = np.arange(len(surfaces)) if image_ids is None else np.asarray(image_ids)
        return self._sample(self.net_, surfaces, semantics, ids, control_scale=control_scale,
                            steps=num_inference_steps)

    def _as_maps(self, surfaces, what: str) -> np.ndarray:
        surfaces = np.asarray(surfaces, dtype=np.float32)
        if surfaces.ndim != 3 or surfaces.shape[1:] != (self.surface_size, self.surface_size):
            raise DataError(
                f"{what} must have shape (n, {self.surface_size}, {self.surface_size}), got {surfaces.shape}."
            )
        return surfaces

    def _test_surfaces(self, test, subject: int) -> np.ndarray:
        if self.n_voxels_.get(int(subject)) != 0:  # 0: imported, surface maps only
            self._check_voxels(np.empty((0, int(test.dataset.n_voxels(subject)))), subject)
        return train_module.check_surfaces(test.surfaces(subject), subject, self.surface_size, test)

    def predict(self, test) -> dict[int, np.ndarray]:
        """Reconstruct the test images of every fitted subject in ``test``.

        Returns
        -------
        dict
            ``subject -> uint8 (n, image_size, image_size, 3)`` aligned with ``test.ids(subject)``;
            each image's noise is seeded by ``seed`` and its image id.
        """
        self._check_fitted()
        subjects = self._predict_subjects(test)
        self._check_images_stage()
        out = {}
        for s in subjects:
            surfaces = self._test_surfaces(test, s)
            out[s] = self._sample(self.net_, surfaces, surfaces, test.ids(s))
        return out

    def swap_semantics(self, test, subject: int, pairs: Sequence[tuple[int, int]]) -> np.ndarray:
        """Semantics from one test fMRI, structure from another (the paper's Fig. 2 / 7).

        Parameters
        ----------
        pairs : sequence of (a, b)
            Row positions in ``test`` of ``subject``: the context comes from ``a``, the
            ControlNet hint from ``b``.

        Returns
        -------
        uint8 array of shape (len(pairs), image_size, image_size, 3)
        """
        self._check_images_stage()
        surfaces = self._test_surfaces(test, subject)
        pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
        bad = pairs[(pairs < 0) | (pairs >= len(surfaces))]
        if bad.size:
            raise DataError(
                f"Test index {int(bad[0])} is out of range: subject {subject} has {len(surfaces)} test "
                f"images (0..{len(surfaces) - 1})."
            )
        ids = test.ids(subject)[pairs[:, 1]]
        return self._sample(self.net_, surfaces[pairs[:, 1]], surfaces[pairs[:, 0]], ids)

    def control_sweep(self, test, subject: int, indices: Sequence[int],
                      scales: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0)) -> np.ndarray:
        """Reconstructions of the same test images at several control scales (Fig. 1 / 6).

        Returns
        -------
        uint8 array of shape (len(indices), len(scales), image_size, image_size, 3)
            The same noise for every scale of an image.
        """
        self._check_images_stage()
        surfaces = self._test_surfaces(test, subject)
        indices = np.asarray(indices, dtype=np.int64)
        if indices.size and (indices.min() < 0 or indices.max() >= len(surfaces)):
            raise DataError(
                f"Test indices must be in 0..{len(surfaces) - 1} for subject {subject}, got {indices.tolist()}."
            )
        ids = test.ids(subject)[indices]
        columns = [self._sample(self.net_, surfaces[indices], surfaces[indices], ids, control_scale=float(a))
                   for a in scales]
        return np.stack(columns, axis=1)

    def _validation_callback(self, split, subjects, geometry, use_aux, empty):
        if not self.validate_every:
            return None
        subject = subjects[0] if subjects[0] in split.subjects else split.subjects[0]
        surfaces = train_module.check_surfaces(split.surfaces(subject), subject, self.surface_size, split)
        rows = np.arange(min(VALIDATION_ROWS, len(surfaces)))

        def validate(net, step: int, directory: Path) -> None:
            path = directory / "validation" / f"step_{step:08d}.png"
            if self.stage == "encoder":
                with torch.no_grad():
                    dev = next(net.parameters()).device
                    recon = net(torch.from_numpy(surfaces[rows]).to(dev)).float().cpu().numpy()
                top, bottom = sample.maps_to_images(surfaces[rows]), sample.maps_to_images(recon)
            else:
                top = train_module.resize_images(split.images(subject, rows), self.image_size)
                bottom = self._sample(net, surfaces[rows], surfaces[rows], split.ids(subject)[rows],
                                      geometry=geometry, use_aux=use_aux, empty=empty,
                                      steps=VALIDATION_STEPS)
            sample.save_grid(np.stack([top, bottom]), path)

        return validate
