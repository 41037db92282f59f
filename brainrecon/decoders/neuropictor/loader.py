"""Loading a file released with NeuroPictor as a fitted decoder: :class:`FromOfficialMixin`.

As diffusers splits ``from_single_file`` (a loader mixin, ``loaders/single_file.py``) from the
pure state-dict converters (``loaders/single_file_utils.py``), the converter here is
:mod:`.official` and this mixin gives
:class:`~brainrecon.decoders.neuropictor.decoder.NeuroPictorDecoder` its ``from_official``
class method, which sets a decoder up around the converted modules. Nothing is written.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from brainrecon.decoders.neuropictor import official
from brainrecon.decoders.neuropictor import train as train_module
from brainrecon.decoders.neuropictor.networks import LAYOUT


class FromOfficialMixin:
    """``from_official``: a fitted NeuroPictor decoder from a released file (mixed into ``NeuroPictorDecoder``)."""

    @classmethod
    def from_official(cls, checkpoint: str | os.PathLike, *, encoder: str | os.PathLike | None = None,
                      encoder_config: str | os.PathLike | Mapping | None = None, base_model: str | None = None,
                      subjects: Sequence[int] | None = None, check: bool = False, seed: int = 0,
                      params: Mapping[str, Any] | None = None, output_report: bool = False):
        """A fitted decoder from a file released with NeuroPictor (epoch file or ``control_sd21_ini.ckpt``).

        The file is converted strictly by :func:`~.official.convert_official_checkpoint`; this
        method sets the decoder up around the converted modules. Nothing is written: ``save``
        the decoder to keep it (``brainrecon import neuropictor`` does).

        Parameters
        ----------
        checkpoint, encoder, encoder_config, base_model
            The released file, and what it needs besides: as for
            :func:`~.official.convert_official_checkpoint`.
        subjects : list of int, optional
            Subjects the model decodes (default: from a ``subNN`` folder in the path, else 1-8).
        check : bool
            Also compute, on one fixed input, the differences between the imported modules and
            the file's tensors used directly (see :func:`~.official.check_import`).
        seed : int
            The decoder's seed; also seeds the modules that start fresh.
        params : mapping, optional
            Further decoder parameters (e.g. ``device``, ``num_inference_steps``); the sizes come
            from the file. Sampling defaults to the official settings (fp16 autocast on CUDA,
            truncation to uint8).
        output_report : bool
            Also return the :class:`~.official.ImportReport` (as diffusers'
            ``output_loading_info``).

        Returns
        -------
        decoder : NeuroPictorDecoder
            Fitted (``save`` writes ``brainrecon.json`` + safetensors).
        report : ImportReport
            Only with ``output_report=True``.
        """
        converted = official.convert_official_checkpoint(checkpoint, encoder=encoder, encoder_config=encoder_config,
                                                         base_model=base_model, seed=seed)
        source, spec, base, report = converted.source, converted.spec, converted.base, converted.report
        if subjects is None:
            subjects, said = official.subjects_from_folder(source)
            report.inferred.append(said)
        else:
            report.inferred.append(f"subjects {[int(s) for s in subjects]} (as given)")
        report.inferred.append("stage finetune (its auxiliary branch is trained)" if converted.aux_active else
                               "stage pretrain (its auxiliary branch is still zero)")
        decoder = cls(
            stage="finetune" if converted.aux_active else "pretrain", subjects=[int(s) for s in subjects],
            base_model=converted.base_model, surface_size=spec.surface_size, patch_size=spec.patch_size,
            encoder_dim=spec.dim, encoder_depth=spec.depth, encoder_heads=spec.heads, encoder_eps=spec.eps,
            semantic_hidden=converted.semantic_hidden,
            image_size=converted.geometry["latent_size"] * base.vae_scale_factor, seed=seed,
            encoder_config=None if encoder_config is None or isinstance(encoder_config, Mapping)
            else official.absolute_or_hub(encoder_config),
            sample_precision="fp16-autocast", pixel_rounding="truncate",
        )
        sizes = ("surface_size", "patch_size", "encoder_dim", "encoder_depth", "encoder_heads", "encoder_eps",
                 "semantic_hidden", "image_size", "stage", "base_model", "subjects")
        fixed = sorted(set(params or {}) & set(sizes))
        if fixed:
            raise official.OfficialFileError(f"{', '.join(fixed)} come(s) from the file (or base_model / "
                                             f"subjects), not from params.", parameters=("base_model", "subjects"))
        decoder.set_params(**dict(params or {}))
        decoder._base_cache = base
        decoder.net_ = converted.net
        decoder.stage_ = decoder.stage
        decoder.aux_active_ = converted.aux_active
        decoder.geometry_ = converted.geometry
        decoder.empty_context_ = train_module.encode_text(base.tokenizer, base.text_encoder, [""], "cpu")[0].cpu()
        decoder.lineage_ = [f"official:{Path(source).name}"]
        decoder.losses_ = []
        decoder.steps_trained_ = 0
        decoder.training_plan_ = None
        decoder.subjects_ = [int(s) for s in subjects]
        decoder.n_voxels_ = {int(s): 0 for s in subjects}  # surface maps only: no voxel count to check
        decoder.imported_ = {"file": Path(source).name, "layout": LAYOUT, "ignored": dict(report.ignored),
                             "fresh": list(report.fresh), "encoder_settings": dict(report.encoder),
                             "inferred": list(report.inferred)}
        if check:
            report.checks = official.check_import(decoder, converted.state)
        return (decoder, report) if output_report else decoder
