"""Figures of runs: ground truth beside several runs' reconstructions, matched by image id;
and the NeuroPictor paper's manipulation figures from a NeuroPictor run.

:func:`compare_runs` opens the runs, aligns their reconstructions by test image id (optionally
the images the first run scores worst or best on) and draws them with
:func:`brainrecon.viz.image_grid`. :func:`run_figures` draws a NeuroPictor run's semantics swap
and control-scale sweep.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from brainrecon.errors import BrainreconError
from brainrecon.viz import image_grid

__all__ = ["compare_runs", "parse_floats", "parse_pairs", "run_figures"]


def compare_runs(
    run_paths: Sequence,
    out: str | os.PathLike,
    *,
    max_rows: int = 8,
    cell_size: int = 128,
    data_source=None,
    sort_by: str | None = None,
    worst: bool = True,
    variant: str = "mindeye",
) -> Path:
    """Several runs side by side on the test images they share.

    Parameters
    ----------
    run_paths : sequence of path-like or brainrecon.runs.Run
        Runs with reconstructions. Their test images are matched by id; ground truth
        comes from the first run's dataset.
    out : path-like
        PNG to write (atomically).
    max_rows : int
        Number of test images shown (the first shared ones, in the first run's order).
    cell_size : int
        Side of each cell in pixels.
    data_source : path-like, optional
        Where the first run's dataset is now, if it moved.
    sort_by : str, optional
        A metric: show the ``max_rows`` images the first run scores worst (``worst=True``)
        or best on it, from its per-image scores, each row labelled with its score.
    worst : bool
        With ``sort_by``: worst first (failure cases) or best first.
    variant : str
        With ``sort_by``: the evaluation variant whose per-image scores rank the images.

    Returns
    -------
    Path
        ``out``.

    Raises
    ------
    BrainreconError
        A run without reconstructions, runs on different data, or no shared test image.
    """
    from brainrecon.runs import Run

    runs = [r if isinstance(r, Run) else Run.open(r) for r in run_paths]
    if not runs:
        raise BrainreconError("compare needs at least one run directory.")
    first = runs[0]
    for run in runs:
        if run.reconstructions() is None:
            raise BrainreconError(f"Run {run.name!r} ({run.path}) has no reconstructions.npy to show.")
        # Ids name the same picture across datasets only when they are NSD ids.
        same_data = _data_source(run.info) == _data_source(first.info)
        if not same_data and not (run.info.get("ids_are_nsd") and first.info.get("ids_are_nsd")):
            raise BrainreconError(
                f"Runs {first.name!r} and {run.name!r} were fitted on different data; "
                "their test images cannot be matched. Compare runs of the same dataset."
            )
    id_lists = [np.asarray(r.test_ids(), dtype=np.int64) for r in runs]
    shared = set(map(int, id_lists[0]))
    for ids in id_lists[1:]:
        shared &= set(map(int, ids))
    chosen = [int(v) for v in id_lists[0] if int(v) in shared]
    labels = None
    if sort_by is not None:
        chosen, labels = _ranked(first, chosen, sort_by, worst, variant)
    chosen = chosen[:max_rows]
    if not chosen:
        raise BrainreconError(f"The runs {[r.name for r in runs]} share no test image.")
    labels = labels[: len(chosen)] if labels else [str(v) for v in chosen]
    ds = first.dataset(data_source)
    ds_ids = np.asarray(ds.test.ids(first.subject), dtype=np.int64)
    ds_pos = {int(v): i for i, v in enumerate(ds_ids)}
    gt = ds.test.images(first.subject, index=np.array([ds_pos[v] for v in chosen]))
    columns: dict[str, np.ndarray] = {}
    for run, ids in zip(runs, id_lists):
        pos = {int(v): i for i, v in enumerate(ids)}
        label = run.name
        k = 2
        while label in columns:  # two runs may share a name (different parent folders)
            label = f"{run.name} ({k})"
            k += 1
        columns[label] = np.asarray(run.reconstructions()[np.array([pos[v] for v in chosen])])
    image_grid(gt, columns, path=out, max_rows=max_rows, cell_size=cell_size, row_labels=labels)
    return Path(out)


def _data_source(info: dict) -> dict:
    """A run's data spec without what names the subjects loaded beside its own (a per-subject
    federated run records only its own subject)."""
    data = info.get("data") or {}
    return {k: v for k, v in data.items() if k not in ("subjects", "path", "n_voxels", "subject_info")}


def _ranked(run, ids: list[int], metric: str, worst: bool, variant: str = "mindeye") -> tuple[list[int], list[str]]:
    """``ids`` ordered by ``run``'s per-image score on ``metric`` (worst or best first), with labels."""
    from brainrecon.eval.report import HIGHER_IS_BETTER, METRICS, TWO_WAY_METRICS
    from brainrecon.workflows.evaluate import run_scores_by_id

    if metric not in METRICS:
        raise BrainreconError(f"Unknown metric {metric!r} to sort by. Valid: {', '.join(map(repr, METRICS))}.")
    scores = run_scores_by_id(run, variant)
    if metric not in scores:
        raise BrainreconError(f"Run {run.name!r} was not scored on {metric}; evaluate it with that metric.")
    score = scores[metric]
    have = [i for i in ids if i in score and not np.isnan(score[i])]
    # Worst first: the lowest of a higher-is-better metric, the highest of a distance.
    descending = HIGHER_IS_BETTER[metric] != worst
    have.sort(key=lambda i: score[i], reverse=descending)
    fmt = (lambda v: f"{100 * v:.1f}%") if metric in TWO_WAY_METRICS else (lambda v: f"{v:.3f}")
    return have, [f"{i} {metric} {fmt(score[i])}" for i in have]


# ---------------------------------------------------------------- NeuroPictor's manipulation figures


def parse_pairs(items: Sequence[str]) -> list[tuple[int, int]]:
    """``["3:7", "0:1"]`` -> ``[(3, 7), (0, 1)]`` (test-set positions, semantics:structure)."""
    pairs = []
    for item in items:
        a, sep, b = str(item).partition(":")
        try:
            if not sep:
                raise ValueError
            pairs.append((int(a), int(b)))
        except ValueError:
            raise BrainreconError(
                f"--swap-semantics expects A:B (test-image positions: semantics from A, structure "
                f"from B), got {item!r}."
            ) from None
    return pairs


def parse_floats(text: str, what: str = "--control-sweep") -> list[float]:
    """``"0,0.25,1"`` -> ``[0.0, 0.25, 1.0]``."""
    try:
        values = [float(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise BrainreconError(f"{what} expects comma-separated numbers, e.g. 0,0.25,0.5,0.75,1; got {text!r}.") from None
    if not values:
        raise BrainreconError(f"{what} is empty; give comma-separated numbers, e.g. 0,0.5,1.")
    return values


def run_figures(
    run: str | os.PathLike,
    *,
    swap_pairs: Sequence[tuple[int, int]] | None = None,
    scales: Sequence[float] | None = None,
    indices: Sequence[int] = (0, 1, 2, 3),
    out_dir: str | os.PathLike | None = None,
    data: str | os.PathLike | None = None,
) -> dict[str, Path]:
    """Write the swap and/or control-sweep grids of a NeuroPictor run.

    Parameters
    ----------
    run : path
        Run directory written by ``brainrecon fit --decoder neuropictor``.
    swap_pairs : sequence of (a, b), optional
        Test-image positions: semantics (context) from ``a``, structure (ControlNet hint) from ``b``
        (the paper's Fig. 2 / 7). Grid columns: image ``b``, image ``a``, the swap result.
    scales : sequence of float, optional
        Control scales for the sweep (Fig. 1 / 6): one column per scale after ground truth.
    indices : sequence of int
        Test-image positions of the sweep rows.
    out_dir : path, optional
        Where the PNGs go (default: the run directory).
    data : path, optional
        The run's data if it moved (checked by fingerprint).

    Returns
    -------
    dict
        ``"swap_semantics"`` / ``"control_sweep"`` -> written PNG path.
    """
    from brainrecon.runs import Run
    from brainrecon.viz import image_grid

    if not swap_pairs and not scales:
        raise BrainreconError("Nothing to draw: give --swap-semantics A:B and/or --control-sweep 0,0.5,1.")
    r = Run.open(run)
    if r.info.get("decoder") != "neuropictor":
        raise BrainreconError(f"{run} is a {r.info.get('decoder')!r} run; these figures need a NeuroPictor run.")
    decoder = r.load_decoder()
    test = r.dataset(data).test
    subject = r.subject
    out_dir = Path(out_dir) if out_dir is not None else r.path
    written = {}
    if swap_pairs:
        swapped = decoder.swap_semantics(test, subject, swap_pairs)
        a = [p[0] for p in swap_pairs]
        b = [p[1] for p in swap_pairs]
        written["swap_semantics"] = out_dir / "swap_semantics.png"
        image_grid(test.images(subject, b), {"semantics from": test.images(subject, a), "swap": swapped},
                   written["swap_semantics"], max_rows=len(swap_pairs), gt_label="structure from",
                   row_labels=[f"{x}:{y}" for x, y in swap_pairs])
    if scales:
        sweep = decoder.control_sweep(test, subject, list(indices), list(scales))
        written["control_sweep"] = out_dir / "control_sweep.png"
        image_grid(test.images(subject, list(indices)),
                   {f"alpha={s:g}": sweep[:, j] for j, s in enumerate(scales)},
                   written["control_sweep"], max_rows=len(indices),
                   row_labels=[str(i) for i in indices])
    return written
