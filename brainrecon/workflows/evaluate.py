"""Evaluate a run: its saved reconstructions against its dataset's ground truth, with the
report and ``grid.png`` written into the run; and a run's per-image scores by test image id.

>>> from brainrecon.workflows.evaluate import evaluate_run
>>> report = evaluate_run("runs/ridge-subj01-pixels")     # doctest: +SKIP
>>> report["PixCorr"], report.intervals["PixCorr"]          # doctest: +SKIP

The scoring itself is :func:`brainrecon.eval.evaluate` (arrays in, report out).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from brainrecon.errors import BrainreconError, DataError
from brainrecon.eval import stats
from brainrecon.eval.harness import evaluate
from brainrecon.eval.report import (
    TARGET_RETRIEVAL_METRICS,
    VARIANTS,
    EvalReport,
    _check_metrics,
    report_files,
    scores_by_id,
)

__all__ = ["evaluate_run", "run_scores_by_id"]


def evaluate_run(
    run,
    metrics=None,
    variant: str = "mindeye",
    device="auto",
    *,
    weights_dir=None,
    extractors: Mapping[str, Any] | None = None,
    strict: bool = False,
    batch_size: int = 32,
    cache_dir=None,
    progress: bool = True,
    write: bool = True,
    data_source=None,
    grid_rows: int = 8,
    ssim_mode: str | None = None,
    blend=None,
    n_resamples: int = stats.DEFAULT_RESAMPLES,
    seed: int = stats.DEFAULT_SEED,
    network_images: int | None = None,
) -> EvalReport:
    """(Re)compute a run's evaluation report and ``grid.png`` from its saved reconstructions.

    The report goes to the variant's own files (:func:`report_files`): ``metrics.json`` and
    ``per_image.csv`` for MindEye's recipe (the default), ``metrics-braindiffuser.json`` and
    ``per_image-braindiffuser.csv`` for Brain-Diffuser's, so one variant never replaces another.

    Parameters
    ----------
    run : brainrecon.runs.Run or path-like
        A run directory written by ``brainrecon fit``.
    metrics, variant, device, weights_dir, extractors, strict, batch_size, cache_dir, progress, ssim_mode
        As in :func:`evaluate` (the first three in the same order).
    blend : run, path-like or array, optional
        MindEye2's enhanced evaluation: the images blended into the reconstructions, as
        another run (matched by test id), a ``.npy`` file or an array in this run's test
        order.
    n_resamples, seed, network_images
        As in :func:`evaluate`.
    write : bool
        Write the report (:func:`report_files`, atomically) and ``grid.png`` into the run.
    data_source : path-like, optional
        Where the run's dataset is now, if it moved since the fit.
    grid_rows : int
        Test images shown in ``grid.png`` (the first ones in test order, each row labelled with
        its id; the ids are recorded in ``settings["grid_ids"]``).

    Returns
    -------
    EvalReport

    Raises
    ------
    BrainreconError
        When the run has no reconstructions, or its test ids are not in the dataset.
    """
    from brainrecon.runs import Run

    if not isinstance(run, Run):
        run = Run.open(run)
    recs = run.reconstructions()
    if recs is None:
        raise BrainreconError(
            f"Run {run.name!r} at {run.path} has no reconstructions.npy, so there is nothing to evaluate. "
            "Decoders that predict a target space need their images generated first."
        )
    rec_ids = np.asarray(run.test_ids(), dtype=np.int64)
    ds = run.dataset(data_source)
    subject = run.subject
    ds_ids = np.asarray(ds.test.ids(subject), dtype=np.int64)
    pos = {int(v): i for i, v in enumerate(ds_ids)}
    missing = [int(v) for v in rec_ids if int(v) not in pos]
    if missing:
        raise DataError(
            f"Run {run.name!r} has reconstructions of test id {missing[0]}, which subject {subject}'s test "
            f"split of {ds!r} does not contain ({len(missing)} such ids). Was the dataset changed since the fit?"
        )
    index = np.array([pos[int(v)] for v in rec_ids], dtype=np.int64)
    gt = ds.test.images(subject, index=index)
    blend_images, blend_source = _blend_images(blend, rec_ids)
    wanted = _check_metrics(metrics)
    predictions = targets = space = None
    why_not = None
    if any(m in TARGET_RETRIEVAL_METRICS for m in wanted):
        predictions, targets, space, why_not = _target_space_inputs(run, ds, subject, index)
    report = evaluate(
        gt, recs, metrics=metrics, variant=variant, device=device, gt_ids=rec_ids, rec_ids=rec_ids,
        weights_dir=weights_dir, extractors=extractors, strict=strict, batch_size=batch_size,
        cache_dir=cache_dir, progress=progress, ssim_mode=ssim_mode, blend=blend_images,
        n_resamples=n_resamples, seed=seed, network_images=network_images,
        predictions=predictions, targets=targets, target_space=space,
    )
    if why_not is not None:
        report.unavailable.update({m: why_not for m in wanted if m in TARGET_RETRIEVAL_METRICS})
    report.settings["run"] = run.name
    report.settings["subject"] = subject
    if blend_source is not None:
        report.settings["blend_source"] = blend_source
    rows = min(int(grid_rows), len(rec_ids))
    if write and rows > 0:
        report.settings["grid_ids"] = [int(v) for v in rec_ids[:rows]]
    if write:
        from brainrecon.viz import image_grid

        report.save(run.path / report_files(variant)[0])
        if rows > 0:
            image_grid(gt[:rows], {run.name: np.asarray(recs[:rows])}, path=run.path / "grid.png", max_rows=rows,
                       row_labels=[f"id {int(v)}" for v in rec_ids[:rows]])
    return report


def evaluate_runs(path: str | os.PathLike, *, on_report=None, **options: Any) -> tuple[int, int]:
    """Evaluate one run, or each run with reconstructions in a folder of runs.

    In a folder, a broken run is skipped with a :class:`~brainrecon.runs.BrokenRunWarning` naming
    it and the others go on. ``on_report(run_path, report)`` is called after each evaluation;
    ``options`` go to :func:`evaluate_run`. Returns ``(evaluated, attempted)``.

    Raises
    ------
    BrainreconError
        A single run that cannot be evaluated; a folder without runs to evaluate, or where none
        could be evaluated.
    """
    import warnings

    from brainrecon.runs import RUN_FILE, BrokenRunWarning, list_runs

    path = Path(path)
    if (path / RUN_FILE).exists() or not path.is_dir() or not any((p / RUN_FILE).exists() for p in path.iterdir()):
        targets = [path]  # one run (or not a run at all: evaluate_run says why)
    else:
        targets = [r.path for r in list_runs(path) if (r.path / "reconstructions.npy").exists()]
        if not targets:
            raise BrainreconError(f"{path} holds no run with reconstructions to evaluate.")
    done = 0
    for target in targets:
        try:
            report = evaluate_run(target, **options)
        except BrainreconError as exc:
            if len(targets) == 1:
                raise
            warnings.warn(BrokenRunWarning(f"skipping broken run {target.name}: {exc}", parameters=exc.parameters),
                          stacklevel=2)
            continue
        done += 1
        if on_report is not None:
            on_report(target, report)
    if len(targets) > 1 and not done:
        raise BrainreconError(f"None of the {len(targets)} runs in {path} could be evaluated (see the warnings).")
    return done, len(targets)


def _target_space_inputs(run, ds, subject: int, index: np.ndarray):
    """A run's predictions and the true targets of its test images (both in the run's test
    order) with the target space's name, or (None, None, None, why not)."""
    info = run.info
    if info.get("predicts") != "target" or not info.get("target"):
        return None, None, None, ("the decoder predicts images, not a target space (retrieval in CLIP space "
                                  "still applies)")
    try:
        predictions = run.predictions()
    except BrainreconError as exc:
        return None, None, None, str(exc)
    if predictions is None:
        return None, None, None, f"the run has no predictions.npy in its {info['target']!r} target space"
    from brainrecon.targets import get_target

    options = (info.get("params") or {}).get("target_options") or {}
    try:
        target = get_target(str(info["target"]), **options)
        targets = np.asarray(target.load(ds.test, subject, progress=False))[index]
    except (BrainreconError, OSError, ImportError, TypeError) as exc:
        return None, None, None, f"the true {info['target']!r} targets could not be loaded ({exc})"
    predictions = np.asarray(predictions)
    if predictions.reshape(len(predictions), -1).shape[1] != targets.reshape(len(targets), -1).shape[1]:
        return None, None, None, (f"predictions.npy has shape {predictions.shape}, the {info['target']!r} "
                                  f"targets {targets.shape}")
    return predictions, targets, f"{info['target']} {tuple(targets.shape[1:])}", None


def _blend_images(blend, rec_ids: np.ndarray):
    """The blend images of :func:`evaluate_run` in the run's test order, and where they came from."""
    from brainrecon.runs import Run

    if blend is None:
        return None, None
    if isinstance(blend, Run) or (isinstance(blend, (str, os.PathLike)) and Path(blend).is_dir()):
        other = blend if isinstance(blend, Run) else Run.open(blend)
        images = other.reconstructions()
        if images is None:
            raise DataError(f"Blend run {other.name!r} ({other.path}) has no reconstructions.npy to blend in.")
        pos = {int(v): i for i, v in enumerate(np.asarray(other.test_ids(), dtype=np.int64))}
        missing = [int(v) for v in rec_ids if int(v) not in pos]
        if missing:
            raise DataError(
                f"Blend run {other.name!r} has no reconstruction of test id {missing[0]} "
                f"({len(missing)} ids missing); blend a run of the same test images."
            )
        return np.asarray(images)[np.array([pos[int(v)] for v in rec_ids])], f"run {other.path}"
    if isinstance(blend, (str, os.PathLike)):
        from brainrecon.io import load_array

        arr = load_array(blend, fix="pass a .npy of images (n, H, W, 3) in the run's test order, or a run directory")
        source = str(blend)
    else:
        arr, source = np.asarray(blend), "array"
    if len(arr) != len(rec_ids):
        raise DataError(f"blend has {len(arr)} images for the run's {len(rec_ids)} test images.")
    return arr, source


def run_scores_by_id(run, variant: str = "mindeye") -> dict[str, dict[int, float]]:
    """A run's per-image scores by id for ``variant`` (:func:`report_files`), checked against the
    run's test ids and its report; a run never evaluated with them is a clear error."""
    path = run.path / report_files(variant)[1]
    if not path.is_file():
        option = "" if variant == VARIANTS[0] else f" --variant {variant}"
        raise BrainreconError(
            f"Run {run.name!r} has no per-image scores ({path}); run `brainrecon evaluate {run.path}{option}` first."
        )
    report = run.metrics(variant)
    return scores_by_id(path, expected_ids=run.test_ids(), metrics=None if report is None else list(report))
