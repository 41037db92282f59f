"""Pictures: ground truth beside reconstructions, one row per test image.

:func:`image_grid` lays out any image sets (first column ground truth, then one
column per run or decoder, each labelled); :func:`compare_runs` builds that grid
from run directories, aligning their reconstructions by image id.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from brainrecon.errors import BrainreconError, DataError

__all__ = ["compare_runs", "image_grid", "to_uint8_hwc"]

_PAD = 4
_HEADER = 22
_BACKGROUND = (255, 255, 255)
_TEXT = (20, 20, 20)


def to_uint8_hwc(images, what: str = "images") -> np.ndarray:
    """Images in any common layout as uint8 (n, H, W, 3).

    Parameters
    ----------
    images : array of shape (n, H, W, 3) or (n, 3, H, W)
        uint8, or float in [0, 1] (clipped).
    what : str
        Name used in error messages.

    Returns
    -------
    uint8 array of shape (n, H, W, 3)
    """
    arr = np.asarray(images)
    if arr.ndim != 4 or (arr.shape[-1] != 3 and arr.shape[1] != 3):
        raise DataError(f"{what} must have shape (n, H, W, 3) or (n, 3, H, W); got {arr.shape}.")
    if arr.shape[-1] != 3:
        arr = arr.transpose(0, 2, 3, 1)
    if arr.dtype == np.uint8:
        return np.ascontiguousarray(arr)
    if not np.issubdtype(arr.dtype, np.floating):
        raise DataError(f"{what} must be uint8 or float in [0, 1]; got dtype {arr.dtype}.")
    if not np.isfinite(arr).all():
        raise DataError(f"{what} contain non-finite values (NaN or inf).")
    return np.ascontiguousarray(np.round(np.clip(arr, 0.0, 1.0) * 255.0).astype(np.uint8))


def _font():
    try:
        return ImageFont.load_default(size=13)
    except TypeError:  # Pillow without FreeType support for the built-in font
        return ImageFont.load_default()


def _fit_text(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def _save_png_atomic(image: Image.Image, path) -> Path:
    from brainrecon.io import atomic_path

    path = Path(path)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
    return path


def image_grid(
    gt,
    columns: Mapping[str, object],
    path: str | os.PathLike | None = None,
    *,
    max_rows: int = 8,
    cell_size: int = 128,
    gt_label: str = "ground truth",
    row_labels: Sequence[str] | None = None,
) -> Image.Image:
    """A labelled grid: one row per test image, ground truth first, then each column.

    Parameters
    ----------
    gt : array of shape (n, H, W, 3) or (n, 3, H, W)
        Ground-truth images, uint8 or float in [0, 1].
    columns : mapping of str to array of shape (n_i, H_i, W_i, 3) or (n_i, 3, H_i, W_i)
        Column label (run or decoder name) -> images in the same order as ``gt``;
        sizes may differ (every cell is resized to ``cell_size``).
    path : path-like, optional
        Where to write the PNG (atomically).
    max_rows : int
        At most this many test images (the first ones).
    cell_size : int
        Side of each square cell in pixels.
    gt_label : str
        Header of the first column.
    row_labels : sequence of str, optional
        Text at the left of each row (e.g. image ids).

    Returns
    -------
    PIL.Image.Image
    """
    gt_img = to_uint8_hwc(gt[:max_rows], "ground-truth images")
    n_rows = len(gt_img)
    if n_rows == 0:
        raise DataError("image_grid needs at least one ground-truth image.")
    cols = [(gt_label, gt_img)]
    for label, imgs in columns.items():
        arr = to_uint8_hwc(np.asarray(imgs[:n_rows]), f"images of column {label!r}")
        if len(arr) < n_rows:
            raise DataError(f"Column {label!r} has {len(arr)} images; the grid shows {n_rows} rows.")
        cols.append((str(label), arr))
    font = _font()
    left = 0
    scratch = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    if row_labels is not None:
        left = int(max(scratch.textlength(str(t), font=font) for t in row_labels[:n_rows])) + 2 * _PAD
    width = left + len(cols) * (cell_size + _PAD) + _PAD
    height = _HEADER + n_rows * (cell_size + _PAD) + _PAD
    canvas = Image.new("RGB", (width, height), _BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for c, (label, imgs) in enumerate(cols):
        x = left + _PAD + c * (cell_size + _PAD)
        draw.text((x, 4), _fit_text(draw, label, font, cell_size), fill=_TEXT, font=font)
        for r in range(n_rows):
            y = _HEADER + r * (cell_size + _PAD)
            cell = Image.fromarray(imgs[r]).resize((cell_size, cell_size), Image.Resampling.BILINEAR)
            canvas.paste(cell, (x, y))
    if row_labels is not None:
        for r in range(n_rows):
            y = _HEADER + r * (cell_size + _PAD) + cell_size // 2 - 6
            draw.text((_PAD, y), str(row_labels[r]), fill=_TEXT, font=font)
    if path is not None:
        _save_png_atomic(canvas, path)
    return canvas


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
    from brainrecon.eval.harness import HIGHER_IS_BETTER, METRICS, TWO_WAY_METRICS, run_scores_by_id

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
