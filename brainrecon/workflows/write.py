"""The one run writer: one run per subject, whoever made the decoder.

``brainrecon fit`` (:func:`brainrecon.workflows.fit`), a BrainGuard site on Flower
(:meth:`brainrecon.federation.site.Site.write_run`) and an imported published model
(:func:`brainrecon.workflows.importers.write_runs`) all write their runs here, with
:func:`brainrecon.runs.write_run`: predict the test split with each subject's decoder, turn the
predictions into images, write the run, and score it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any, Callable

from brainrecon.runs import Run, write_run

Log = Callable[[str], None]


def _quiet(message: str) -> None:
    pass


def own_data(dataset, subject: int):
    """``dataset`` as a run of ``subject`` records it: nothing about the other subjects."""
    own = dataset.select([subject])
    own.spec = {k: ({kk: vv for kk, vv in v.items() if str(kk) == str(subject)} if isinstance(v, dict) else v)
                for k, v in own.spec.items()}
    return own


def write_subject_runs(
    decoders: Mapping[int, Any],
    dataset,
    *,
    out: str | os.PathLike,
    names: Mapping[int, str],
    private: bool = False,
    overwrite: bool = False,
    extra: Mapping[str, Any] | None = None,
    seed: int | None = None,
    evaluate: bool = False,
    kept: Collection[int] = (),
    log: Log = _quiet,
) -> list[Run]:
    """Predict ``dataset``'s test split with each subject's decoder and write one run per subject.

    Parameters
    ----------
    decoders : mapping of int to decoder
        Subject -> fitted decoder of that subject (for a multi-subject decoder, its
        ``for_subject`` view). Runs are written in this order.
    dataset : Dataset
        The data whose test split is predicted.
    out : path
        The runs folder; subject ``s``'s run is ``out/names[s]``.
    names : mapping of int to str
        Run name per subject.
    private : bool
        Record in each run only its own subject's part of ``dataset`` (:func:`own_data`), so a
        run names no other subject (BrainGuard's privacy; imported models). Otherwise the
        dataset is recorded as given.
    overwrite : bool
        Replace existing runs (else an existing run is an error).
    extra : mapping, optional
        Fields added to each ``run.json`` (``recipe``, ``engine``, ``imported_from``).
    seed : int, optional
        The fit's seed: predictions are made with the global generators seeded by it
        (:func:`brainrecon.workflows.seeded`) and it is recorded in the provenance. None
        leaves the generators alone and records the decoder's own ``seed`` parameter.
    evaluate : bool
        Score each run that has reconstructions (:func:`brainrecon.workflows.evaluate_run_safely`);
        the metrics that could not be scored are said once at the end.
    kept : collection of int
        Subjects whose run this fit wrote before it was interrupted (``--resume``): the run is
        kept as it is (scored if it was not yet), not predicted or written again.
    log : callable
        Where progress lines go.

    Returns
    -------
    list of Run
        One per subject, in the order of ``decoders``.
    """
    # The package's own helpers; imported here because the package imports this module.
    from brainrecon.workflows import evaluate_run_safely, log_unavailable, make_reconstructions, seeded

    runs, reports = [], []
    for s, dec in decoders.items():
        if s in kept:
            run = Run.open(Path(out) / names[s])
            log(f"kept run {run.path}: this fit wrote it before it was interrupted")
            if evaluate and run.metrics() is None and (run.path / "reconstructions.npy").exists():
                reports.append(evaluate_run_safely(run, log=log))
            runs.append(Run.open(run.path))
            continue
        # A NeuroPictor encoder-stage decoder only calibrates the fMRI encoder: no images yet.
        with seeded(seed) if seed is not None else contextlib.nullcontext():
            pred = dec.predict(dataset.test)[s] if getattr(dec, "reconstructs_images", True) else None
        recon = make_reconstructions(dec, pred, dataset, s, log=log)
        run = write_run(out, names[s], decoder=dec, dataset=own_data(dataset, s) if private else dataset,
                        subject=s, predictions=pred, reconstructions=recon, overwrite=overwrite,
                        extra=dict(extra or {}), seed=seed)
        log(f"wrote run {run.path}")
        if evaluate and recon is not None:
            reports.append(evaluate_run_safely(run, log=log))
        runs.append(Run.open(run.path))
    log_unavailable(reports, log)
    return runs


__all__ = ["own_data", "write_subject_runs"]
