"""Loading a file released with BrainGuard or WeADL as a fitted decoder: :class:`FromOfficialMixin`.

As diffusers splits ``from_single_file`` (a loader mixin) from the pure state-dict converters,
the converter here is :mod:`.official` and this mixin gives
:class:`~brainrecon.decoders.brainguard.decoder.BrainGuardDecoder` its ``from_official`` class
method, which sets a one-subject decoder up around the converted network. Nothing is written.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from brainrecon.targets import get_target


class FromOfficialMixin:
    """``from_official``: a fitted BrainGuard decoder from a released file (mixed into ``BrainGuardDecoder``)."""

    @classmethod
    def from_official(cls, checkpoint: str | os.PathLike, *, subject: int | None = None, layout: str | None = None,
                      negative_tokens: str | os.PathLike | None = None, voxel_counts: Mapping[int, int] | None = None,
                      target_options: Mapping[str, Any] | None = None, params: Mapping[str, Any] | None = None,
                      output_report: bool = False):
        """A fitted decoder from a released BrainGuard or WeADL file (see :mod:`.official`).

        Parameters
        ----------
        checkpoint : path
            BrainGuard's ``client{1,2,5,7}_best.pth`` (Hugging Face ``Zhibo2333/Brainguard``) or
            WeADL's ``model.pth`` (``ig16/visual-brain-decoding-1``): the ``state_dict()`` of the
            released ``BrainGuardModule``, read with ``torch.load(weights_only=True)``.
        subject : int, optional
            The subject the file decodes; default: the one whose voxel count equals the file's
            input width. Either way the count is checked.
        layout : {"brainguard", "weadl"}, optional
            Default: detected from the keys (a text branch means ``"brainguard"``).
        negative_tokens : path, optional
            WeADL's ``unconditional_embeddings.pt``: kept with the decoder and used as the negative
            (unconditional) tokens when its runs are reconstructed, as the deployed server does.
        voxel_counts : mapping, optional
            Subject -> voxel count to check against (the data's); default NSD's nsdgeneral counts.
        target_options : mapping, optional
            Options of the target space (``ipadapter_dir`` for WeADL's IP-Adapter tokens, ``model`` for
            the CLIP states), recorded for ``fit --init-from`` and ``reconstruct``.
        params : mapping, optional
            Further decoder parameters (``device``, ``nan_policy``, ...); the sizes come from the file.
        output_report : bool
            Also return the :class:`~.official.ImportReport`.

        Notes
        -----
        The released networks read voxels as they are (MindEye's webdataset: nsdgeneral betas
        z-scored per session, test images averaged over repetitions; ``brainrecon prepare-nsd
        --zscore session``), so the imported decoder's voxel standardisation is the identity.
        Their outputs go to the generators unscaled (``calibration="none"``).
        """
        from brainrecon.data.nsd.release import NSD_GENERAL_VOXELS
        from brainrecon.decoders.brainguard import official

        source = str(checkpoint)
        state = official.read_state(checkpoint)
        net, arch, layout, ignored = official.convert_state(state, layout=layout, source=source)
        counts = dict(voxel_counts) if voxel_counts is not None else dict(NSD_GENERAL_VOXELS)
        where = "the data's subjects" if voxel_counts is not None else "NSD's nsdgeneral voxel counts"
        s, inferred = official.infer_subject(arch.n_voxels, counts, subject, source, where)
        d = arch.token_dim
        options = dict(target_options) if target_options else None
        if layout == "brainguard":
            target = "clip"
            if arch.branches != (257, 77) or d != 768:
                options = {**(options or {}), "image_tokens": arch.branches[0], "text_tokens": arch.branches[1],
                           "dim": d}
        else:
            target = "ipadapter"
            # The IP-Adapter target's shape comes from its weights: checked when they are named.
            expected = tuple(get_target(target, **options).shape) if options else (16, 768)
            if (arch.branches[0], d) != expected:
                raise official.OfficialFileError(
                    f"{source} predicts {arch.branches[0]}x{d} tokens; the IP-Adapter Plus target "
                    f"{'of target_options ' if options else ''}has {expected[0]}x{expected[1]}.")
        fixed = sorted(set(params or {}) & {"subjects", "target", "target_options", "hidden", "n_blocks", "branches",
                                             "projector_hidden", "calibration"})
        if fixed:
            raise official.OfficialFileError(f"{', '.join(fixed)} come(s) from the file, not from params.")
        decoder = cls(subjects=[s], target=target, target_options=options, hidden=arch.hidden,
                      n_blocks=arch.n_blocks, branches=list(arch.branches) if len(arch.branches) > 1 else None,
                      projector_hidden=None if arch.projector_hidden == arch.hidden else arch.projector_hidden,
                      calibration="none", **dict(params or {}))
        V = arch.n_voxels
        decoder.models_ = {s: net}
        decoder.voxel_stats_ = {s: (np.zeros(V, dtype=np.float32), np.ones(V, dtype=np.float32))}
        decoder.calibration_stats_ = {s: {}}
        decoder.target_shape_ = (sum(arch.branches), d)
        decoder.token_shape_ = (sum(arch.branches), d)
        published = {"brainguard": (4, "kunzhan/BrainGuard main.py: clients 1, 2, 5, 7"),
                     "weadl": (3, "IoanaGabor/bachelor-thesis main.py: clients 1, 2, 5")}[layout]
        decoder.federation_ = {"subjects": [s], "n_sites": published[0], "n_train": {str(s): 8859},
                               "rounds_completed": None, "published": published[1]}
        decoder.history_ = []
        decoder.n_voxels_ = {s: V}
        decoder.subjects_ = [s]
        decoder.imported_ = {"file": Path(source).name, "path": str(Path(source).resolve()), "layout": layout,
                             "ignored": list(ignored), "subject_inferred": bool(inferred)}
        report = official.ImportReport(source=source, layout=layout, architecture=arch, subject=s,
                                       subject_inferred=inferred, n_tensors=len(state),
                                       n_parameters=sum(p.numel() for p in net.parameters()), ignored=list(ignored))
        if negative_tokens is not None:
            if layout != "weadl":
                raise official.OfficialFileError(
                    "negative_tokens (unconditional_embeddings.pt) belong to the WeADL model's IP-Adapter generator; "
                    "the BrainGuard model's Versatile Diffusion generator uses zero unconditional inputs.",
                    parameters=("negative_tokens",))
            decoder.negative_tokens_ = official.read_negative_tokens(negative_tokens, decoder.token_shape_).numpy()
            decoder.imported_["negative_tokens"] = Path(str(negative_tokens)).name
            report.notes.append(f"negative tokens from {negative_tokens} (used by `brainrecon reconstruct`)")
        elif layout == "weadl":
            report.notes.append("no negative tokens given: reconstruct will use IP-Adapter's own unconditional "
                                "tokens, not the deployed unconditional_embeddings.pt")
        return (decoder, report) if output_report else decoder
