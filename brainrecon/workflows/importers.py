"""Published models into brainrecon: ``brainrecon import neuropictor``.

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


def write_runs(decoder, *, data=None, dataset=None, out: str | os.PathLike = "runs", name: str | None = None,
               overwrite: bool = False, evaluate: bool = False, log=None) -> list:
    """Reconstruct the test split with an imported decoder and write one run per subject.

    The runs are what ``fit`` writes (``run.json``, ``decoder/``, ``reconstructions.npy``), so
    ``brainrecon evaluate RUN``, ``predict RUN`` and ``neuropictor-sample RUN`` take them.
    Run names default to ``neuropictor-official-subjNN``; each run records only its own
    subject's data and the file it was imported from.
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
    names = {s: name if name and len(subjects) == 1 else f"{name or 'neuropictor-official'}-subj{s:02d}"
             for s in subjects}
    return write_subject_runs({s: decoder.for_subject(s) for s in subjects}, ds, out=out, names=names,
                              private=True, overwrite=overwrite,
                              extra={"recipe": None, "imported_from": decoder.imported_.get("file")},
                              evaluate=evaluate, log=log)


__all__ = ["import_neuropictor", "import_official_checkpoint", "write_runs"]
