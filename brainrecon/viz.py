"""Pictures: ground truth beside reconstructions, one row per test image.

:func:`image_grid` lays out any image sets (first column ground truth, then one
column per run or decoder, each labelled). Images in, picture out: drawing runs
(:func:`brainrecon.workflows.figures.compare_runs`) is application work.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from brainrecon.errors import DataError

__all__ = ["image_grid", "to_uint8_hwc"]

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
