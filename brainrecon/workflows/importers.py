"""Published models into brainrecon: ``brainrecon import neuropictor`` and ``brainrecon import brainguard``.

The conversion itself lives beside the model it produces
(:mod:`brainrecon.decoders.neuropictor.official`, and the loader method
:meth:`NeuroPictorDecoder.from_official <brainrecon.decoders.neuropictor.decoder.NeuroPictorDecoder.from_official>`);
here the imported decoder is saved as an ordinary brainrecon decoder (:func:`import_neuropictor`)
and turned into runs (:func:`write_runs`), so everything downstream — predict, reconstruct,
evaluate, leaderboard, push — works on it unchanged.
"""

from __future__ import annotations

import os
from pathlib import Path

from brainrecon.decoders.neuropictor.decoder import NeuroPictorDecoder
from brainrecon.decoders.neuropictor.official import ImportReport
from brainrecon.errors import BrainreconError
from brainrecon.workflows.write import write_subject_runs


def import_official_checkpoint(checkpoint: str | os.PathLike, **options) -> tuple[NeuroPictorDecoder, ImportReport]:
    """An official NeuroPictor file as a fitted decoder, and the report of its import.

    ``options`` are those of :meth:`NeuroPictorDecoder.from_official` (``encoder``,
    ``encoder_config``, ``base_model``, ``subjects``, ``check``, ``seed``, ``params``).
    """
    return NeuroPictorDecoder.from_official(checkpoint, output_report=True, **options)


def import_neuropictor(checkpoint: str | os.PathLike, out: str | os.PathLike, *, overwrite: bool = False,
                       **options) -> tuple[Path, ImportReport]:
    """:func:`import_official_checkpoint`, then save the decoder to ``out`` (``brainrecon.json`` + safetensors).

    The directory loads with :func:`brainrecon.decoders.load_decoder` and serves as
    ``fit --init-from``. ``options`` are those of :func:`import_official_checkpoint`.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise BrainreconError(f"{out} already exists; pass overwrite=True (CLI: --overwrite) to replace it.")
    decoder, report = import_official_checkpoint(checkpoint, **options)
    return decoder.save(out, overwrite=overwrite), report


def import_brainguard(checkpoint: str | os.PathLike, out: str | os.PathLike, *, subject: int | None = None,
                      layout: str | None = None, negative_tokens: str | os.PathLike | None = None, data=None,
                      dataset=None, target_options: dict | None = None, params: dict | None = None,
                      overwrite: bool = False):
    """A released BrainGuard (``client{N}_best.pth``) or WeADL (``model.pth``) file as a saved decoder.

    Converted strictly by :meth:`BrainGuardDecoder.from_official
    <brainrecon.decoders.brainguard.decoder.BrainGuardDecoder.from_official>`; the voxel count is checked
    against ``data``'s subjects when data are given, else against NSD's nsdgeneral counts. Saved to
    ``out`` (loads with :func:`brainrecon.decoders.load_decoder`, serves as ``fit --init-from``).

    Returns
    -------
    path, report, decoder
    """
    from brainrecon.decoders.brainguard.decoder import BrainGuardDecoder

    out = Path(out)
    if out.exists() and not overwrite:
        raise BrainreconError(f"{out} already exists; pass overwrite=True to replace it.", parameters=("overwrite",))
    counts = None
    if data is not None or dataset is not None:
        from brainrecon.data import load_dataset

        ds = dataset if dataset is not None else load_dataset(data)
        counts = {s: ds.n_voxels(s) for s in ds.subjects}
    decoder, report = BrainGuardDecoder.from_official(
        checkpoint, subject=subject, layout=layout, negative_tokens=negative_tokens, voxel_counts=counts,
        target_options=target_options, params=params, output_report=True)
    return decoder.save(out, overwrite=overwrite), report, decoder


def write_runs(decoder, *, data=None, dataset=None, out: str | os.PathLike = "runs", name: str | None = None,
               overwrite: bool = False, evaluate: bool = False, log=None) -> list:
    """Reconstruct the test split with an imported decoder and write one run per subject.

    The runs are what ``fit`` writes (``run.json``, ``decoder/``, ``reconstructions.npy`` where the
    decoder makes images itself), so ``brainrecon evaluate RUN``, ``predict RUN``, ``reconstruct RUN``
    and ``neuropictor-sample RUN`` take them. Run names default to ``neuropictor-official-subjNN``
    (``brainguard-official-subjNN``, ``weadl-official-subjNN`` for BrainGuard-family files); each run
    records only its own subject's data and the file it was imported from.
    """
    from brainrecon.data import load_dataset

    log = log or (lambda message: None)
    ds = dataset if dataset is not None else load_dataset(data, subjects=decoder.subjects_)
    subjects = [s for s in decoder.subjects_ if s in ds.subjects]
    if not subjects:
        raise BrainreconError(
            f"The data has subject(s) {ds.subjects}, the imported model decodes {decoder.subjects_}; "
            f"give data of those subjects (or --subject)."
        )
    imported = getattr(decoder, "imported_", None) or {}
    default = f"{imported.get('layout', decoder.name) if decoder.name == 'brainguard' else decoder.name}-official"
    names = {s: name if name and len(subjects) == 1 else f"{name or default}-subj{s:02d}" for s in subjects}
    return write_subject_runs({s: decoder.for_subject(s) for s in subjects}, ds, out=out, names=names,
                              private=True, overwrite=overwrite,
                              extra={"recipe": None, "imported_from": imported.get("file")},
                              evaluate=evaluate, log=log)


__all__ = ["import_brainguard", "import_neuropictor", "import_official_checkpoint", "write_runs"]
