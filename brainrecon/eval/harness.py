"""The evaluation harness: the eight NSD metrics for any set of reconstructions.

:func:`evaluate` takes ground-truth and reconstructed images in any common layout
(uint8 or float in [0, 1], HWC or CHW, any size), applies one of two published
preprocessing recipes (MindEye's or Brain-Diffuser's) and returns an :class:`EvalReport`.

``variant="mindeye"`` (default)
    Both sets are first brought to 256 x 256 (bilinear, no antialiasing); PixCorr
    and SSIM are computed after a further bilinear resize to 425; each network gets
    its own bilinear resize (AlexNet 256, Inception 342, CLIP 224, EffNet-B 255,
    SwAV 224) and ImageNet or CLIP normalisation; EffNet-B1 uses the ImageNet V2
    weights; SSIM is true 2-D SSIM. Ground truth goes through the same 256-px step
    as the reconstructions (MindEye's published 256-px ground truth came from a
    resampler the spec marks unverified; for exact parity pass those tensors).
``variant="braindiffuser"``
    Ground truth at its native size (425 in NSD); the reconstructions are resized to
    the ground-truth size with Pillow's bicubic filter for PixCorr and SSIM; every
    network gets a Pillow bilinear (antialiased) 224 x 224 resize; EffNet-B1 uses
    the V1 weights; SSIM is the column-wise form scikit-image 0.17 computed.

Images are streamed in batches: one pass computes PixCorr/SSIM per image and the
features of every network. Ground-truth features of networks with known weights
are cached on disk, keyed by a hash of the ground-truth pixels, so a second
decoder evaluated on the same test set only runs the networks on its own images.
"""

from __future__ import annotations

import datetime as _dt
import difflib
import hashlib
import json
import math
import os
import platform
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from PIL import Image

from brainrecon.devices import resolve_device
from brainrecon.errors import BrainreconError, DamagedCacheWarning, DataError, WeightsNotFoundError
from brainrecon.eval import metrics as M
from brainrecon.eval import stats
from brainrecon.eval.extractors import NETWORK_METRICS, FeatureNetwork, build_network, wrap_extractor
from brainrecon.progress import bar_disabled

__all__ = [
    "ALL_METRICS",
    "CLIP_RETRIEVAL_METRICS",
    "DISTANCE_METRICS",
    "HIGHER_IS_BETTER",
    "LOW_LEVEL_METRICS",
    "METRICS",
    "PERCENT_METRICS",
    "RETRIEVAL_METRICS",
    "TARGET_RETRIEVAL_METRICS",
    "TWO_WAY_METRICS",
    "VARIANTS",
    "EvalReport",
    "evaluate",
    "evaluate_run",
]

METRICS: tuple[str, ...] = ("PixCorr", "SSIM", "AlexNet(2)", "AlexNet(5)", "Inception", "CLIP", "EffNet-B", "SwAV")
LOW_LEVEL_METRICS = ("PixCorr", "SSIM")
TWO_WAY_METRICS = ("AlexNet(2)", "AlexNet(5)", "Inception", "CLIP")
DISTANCE_METRICS = ("EffNet-B", "SwAV")
# Brain <-> image retrieval (MindEye's 300-way top-1), in both directions: "ImageRet" asks, for
# each prediction, whether its own image is the most similar of the candidates (which image did
# the brain see?); "BrainRet" asks, for each image, whether its own prediction is.
TARGET_RETRIEVAL_METRICS = ("ImageRet(target)", "BrainRet(target)")  # in the decoder's target space
CLIP_RETRIEVAL_METRICS = ("ImageRet(CLIP)", "BrainRet(CLIP)")  # CLIP image space, reconstructions vs GT
RETRIEVAL_METRICS = TARGET_RETRIEVAL_METRICS + CLIP_RETRIEVAL_METRICS
#: The eight NSD metrics, then the retrieval metrics: every column a report can have.
ALL_METRICS: tuple[str, ...] = METRICS + RETRIEVAL_METRICS
#: Fractions printed as percentages (chance: 50 % for two-way, 1/min(300, N) for retrieval).
PERCENT_METRICS = TWO_WAY_METRICS + RETRIEVAL_METRICS
HIGHER_IS_BETTER: dict[str, bool] = {m: m not in DISTANCE_METRICS for m in ALL_METRICS}
VARIANTS = ("mindeye", "braindiffuser")
REPORT_FORMAT = "brainrecon.eval.report/1"
# Bump when a preprocessing change would alter cached ground-truth features.
_RECIPE_VERSION = 1

_METRIC_NETWORK = {m: net for net, ms in NETWORK_METRICS.items() for m in ms}
# MindEye's per-network resize (shorter side; inputs are square by then), Reconstruction_Metrics.py.
_MINDEYE_SIZE = {"alexnet": 256, "inception": 342, "clip": 224, "effnet": 255, "swav": 224}
_BD_SIZE = 224
_LOW_LEVEL_SIZE = 425
_BASE_SIZE = 256
_IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
_CLIP = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
# Float images may overshoot [0, 1] by rounding only; anything beyond is a real range error.
_RANGE_TOL = 1e-5
_DEFAULT_SSIM_MODE = {"mindeye": "2d", "braindiffuser": "columnwise"}
_EFFNET_WEIGHTS = {"mindeye": "IMAGENET1K_V2", "braindiffuser": "IMAGENET1K_V1"}


# ============================================================================ report


class EvalReport(Mapping):
    """Scores of one evaluation: a read-only mapping ``metric name -> float``.

    Two-way identification scores are fractions (0.5 = chance); papers print them as
    percentages. Metrics that could not be computed are absent from the mapping and
    listed in :attr:`unavailable` with the reason.

    Attributes
    ----------
    n_images : int
    variant : str
    unavailable : dict of str to str
        Metric -> why it is missing (e.g. which weight file, where it was searched).
    settings : dict
        ``ssim_mode``, ``blend``, ``effnet_weights``, ``networks`` (metric -> weights
        source), ``aligned_by_id``, ``ids_sha256``...
    versions : dict
        Library versions the numbers depend on.
    timings : dict of str to float
        Seconds per stage.
    per_image : dict of str to ndarray
        Metric -> score of each test image (its mean is the metric); empty for a report
        read back from ``metrics.json`` alone (:meth:`load` reads the CSV beside it).
    ids : ndarray or None
        Test image id of each per-image row (ground-truth order).
    intervals : dict of str to (float, float)
        Metric -> 95 % percentile bootstrap interval over images (see
        :mod:`brainrecon.eval.stats`; settings in :attr:`bootstrap`).
    bootstrap : dict
        ``method``, ``n_resamples``, ``confidence``, ``seed``, ``two_way_note``.
    """

    directions = {m: ("higher" if HIGHER_IS_BETTER[m] else "lower") for m in ALL_METRICS}

    def __init__(
        self,
        scores: Mapping[str, float],
        *,
        n_images: int,
        variant: str,
        unavailable: Mapping[str, str] | None = None,
        settings: Mapping[str, Any] | None = None,
        versions: Mapping[str, str] | None = None,
        timings: Mapping[str, float] | None = None,
        created: str | None = None,
        per_image: Mapping[str, Any] | None = None,
        ids=None,
        intervals: Mapping[str, Any] | None = None,
        bootstrap: Mapping[str, Any] | None = None,
    ):
        self._scores = {m: float(scores[m]) for m in ALL_METRICS if m in scores}
        self.n_images = int(n_images)
        self.variant = variant
        self.unavailable = dict(unavailable or {})
        self.settings = dict(settings or {})
        self.versions = dict(versions or {})
        self.timings = dict(timings or {})
        self.created = created or _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        self.per_image = {m: np.asarray(v, dtype=np.float64) for m, v in (per_image or {}).items()}
        self.ids = None if ids is None else np.asarray(ids, dtype=np.int64)
        self.intervals = {m: (float("nan") if v[0] is None else float(v[0]),
                              float("nan") if v[1] is None else float(v[1]))
                          for m, v in (intervals or {}).items()}
        self.bootstrap = dict(bootstrap or {})

    def __getitem__(self, metric: str) -> float:
        if metric in self._scores:
            return self._scores[metric]
        if metric in self.unavailable:
            raise KeyError(f"{metric} is unavailable: {self.unavailable[metric]}")
        raise KeyError(metric)

    def __iter__(self) -> Iterator[str]:
        return iter(self._scores)

    def __len__(self) -> int:
        return len(self._scores)

    def __repr__(self) -> str:
        parts = [f"{m}={_format_score(m, v)}" for m, v in self._scores.items()]
        if self.unavailable:
            parts.append(f"unavailable={sorted(self.unavailable)}")
        return f"EvalReport(n={self.n_images}, variant={self.variant!r}, " + ", ".join(parts) + ")"

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (NaN scores become ``null``)."""
        return {
            "format": REPORT_FORMAT,
            "metrics": {m: (None if math.isnan(v) else v) for m, v in self._scores.items()},
            "directions": {m: self.directions[m] for m in self._scores},
            "n_images": self.n_images,
            "variant": self.variant,
            "unavailable": self.unavailable,
            "settings": self.settings,
            "versions": self.versions,
            "timings_s": self.timings,
            "created": self.created,
            "intervals": {m: [None if math.isnan(x) else x for x in v] for m, v in self.intervals.items()},
            "bootstrap": self.bootstrap,
            "per_image_file": PER_IMAGE_FILE if self.per_image else None,
        }

    def to_json(self, indent: int = 2) -> str:
        """The report as JSON text (the content of a run's ``metrics.json``)."""
        return json.dumps(self.to_dict(), indent=indent, default=str)

    @classmethod
    def from_json(cls, data: str | bytes | Mapping[str, Any]) -> "EvalReport":
        """Rebuild a report from :meth:`to_json` text or the equivalent dict.

        Raises
        ------
        DataError
            If the content is not a brainrecon evaluation report.
        """
        if isinstance(data, EvalReport):
            return data  # already a report (what ``Run.metrics()`` returns)
        if isinstance(data, (str, bytes)):
            data = json.loads(data)
        if not isinstance(data, Mapping) or data.get("format") != REPORT_FORMAT:
            raise DataError(
                f"Not a brainrecon evaluation report (expected format {REPORT_FORMAT!r}); "
                "recompute it with `brainrecon evaluate RUN`."
            )
        fix = "recompute it with `brainrecon evaluate RUN`"
        kinds = {"metrics": dict, "n_images": int, "variant": str, "unavailable": (dict, type(None)),
                 "settings": (dict, type(None)), "intervals": (dict, type(None)), "bootstrap": (dict, type(None))}
        for key, kind in kinds.items():
            if key in ("metrics", "n_images", "variant") and key not in data:
                raise DataError(f"The evaluation report is missing field {key!r}; {fix}.")
            if key in data and (not isinstance(data[key], kind) or isinstance(data[key], bool)):
                raise DataError(f"The evaluation report's field {key!r} is {data[key]!r:.60}, not {kind}; {fix}.")
        unknown = [m for m in data["metrics"] if m not in ALL_METRICS]
        if unknown:
            raise DataError(f"The evaluation report names unknown metric(s) {unknown}; {fix}.")
        try:
            scores = {m: (float("nan") if v is None else float(v)) for m, v in data["metrics"].items()}
            return cls(
                scores,
                n_images=data["n_images"],
                variant=data["variant"],
                unavailable=data.get("unavailable"),
                settings=data.get("settings"),
                versions=data.get("versions"),
                timings=data.get("timings_s"),
                created=data.get("created"),
                intervals=data.get("intervals"),
                bootstrap=data.get("bootstrap"),
            )
        except (TypeError, ValueError, KeyError, AttributeError) as exc:
            raise DataError(f"The evaluation report holds values of the wrong kind ({exc}); {fix}.") from None

    @classmethod
    def load(cls, path) -> "EvalReport":
        """Read ``metrics.json`` and, when present, the per-image scores written beside it.

        Raises
        ------
        DataError
            If either file is not what :meth:`save` writes.
        """
        from brainrecon.io import read_json

        path = Path(path)
        try:
            report = cls.from_json(read_json(path, fix="recompute it with `brainrecon evaluate RUN`"))
        except DataError as exc:
            raise DataError(f"{path}: {exc}") from None
        csv_path = per_image_path(path)
        if csv_path.is_file():
            report.ids, report.per_image = read_per_image(csv_path, metrics=list(report))
            if len(report.ids) != report.n_images:
                raise DataError(f"{csv_path} has {len(report.ids)} rows, but {path} reports {report.n_images} "
                                f"images; recompute both with `brainrecon evaluate RUN`.")
        return report

    def save(self, path) -> Path:
        """Write :meth:`to_json` to ``path`` atomically, and the per-image scores beside it
        (:func:`per_image_path`: ``per_image.csv`` beside ``metrics.json``,
        ``per_image-<variant>.csv`` beside ``metrics-<variant>.json``; one row per test image
        id, one column per metric)."""
        from brainrecon.io import write_json_atomic

        path = Path(path)
        data = self.to_dict()
        if self.per_image:
            csv_path = write_per_image(per_image_path(path), self.per_image, self.ids)
            data["per_image_file"] = csv_path.name
        return write_json_atomic(path, data)


METRICS_FILE = "metrics.json"
PER_IMAGE_FILE = "per_image.csv"


def report_files(variant: str = "mindeye") -> tuple[str, str]:
    """File names of a run's evaluation report with ``variant``: (scores, per-image scores).

    The default variant (MindEye's recipe) keeps ``metrics.json`` and ``per_image.csv``; every
    other variant has its own pair, ``metrics-<variant>.json`` and ``per_image-<variant>.csv``
    (``metrics-braindiffuser.json``), so scoring a run with another recipe never replaces the
    default report.
    """
    variant = _check_variant(variant)
    if variant == VARIANTS[0]:
        return METRICS_FILE, PER_IMAGE_FILE
    return f"metrics-{variant}.json", f"per_image-{variant}.csv"


def per_image_path(metrics_path) -> Path:
    """Where the per-image scores of the report at ``metrics_path`` are: ``per_image-<variant>.csv``
    beside ``metrics-<variant>.json``, else ``per_image.csv``."""
    metrics_path = Path(metrics_path)
    name = metrics_path.name
    if name.startswith("metrics-") and name.endswith(".json"):
        return metrics_path.with_name(f"per_image-{name[len('metrics-'):-len('.json')]}.csv")
    return metrics_path.with_name(PER_IMAGE_FILE)


def unavailable_summary(unavailable: Mapping[str, str]) -> str | None:
    """One short line saying which metrics were not scored and the one command that helps, or
    None when every metric was scored. The per-metric reasons (file names, places searched)
    stay in the report's ``unavailable``.

    >>> unavailable_summary({"CLIP": "weights openai/clip-vit-large-patch14 not found (...)"})
    'CLIP not scored (weights missing): run `brainrecon weights` to see which files to fetch'
    """
    if not unavailable:
        return None

    def names(ms: list[str]) -> str:
        return ", ".join(ms) if len(ms) <= 2 else f"{len(ms)} metrics"

    weights = [m for m, why in unavailable.items() if "not found" in why]
    parts = []
    if weights:
        parts.append(f"{names(weights)} not scored (weights missing): run `brainrecon weights` "
                     "to see which files to fetch")
    others = {m: why for m, why in unavailable.items() if m not in weights}
    for why in dict.fromkeys(others.values()):
        parts.append(f"{names([m for m, w in others.items() if w == why])} not scored: {why}")
    return "; ".join(parts)


def write_per_image(path, per_image: Mapping[str, Any], ids=None) -> Path:
    """Write per-image scores as CSV (``image_id`` then one column per metric; exact floats).

    ``pandas.read_csv(path, index_col="image_id")`` reads it directly.
    """
    import csv
    import io as _io

    from brainrecon.io import atomic_path

    metrics = [m for m in ALL_METRICS if m in per_image]
    n = len(next(iter(per_image.values())))
    ids = np.arange(n) if ids is None else np.asarray(ids, dtype=np.int64)
    if len(ids) != n or any(len(per_image[m]) != n for m in metrics):
        raise ValueError("per-image scores and ids must have one entry per test image")
    buf = _io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["image_id", *metrics])
    cols = [np.asarray(per_image[m], dtype=np.float64) for m in metrics]
    for i in range(n):
        w.writerow([int(ids[i]), *(repr(float(c[i])) if not math.isnan(c[i]) else "" for c in cols)])
    with atomic_path(path) as tmp:
        tmp.write_text(buf.getvalue(), encoding="utf-8")
    return Path(path)


def scores_by_id(path, *, expected_ids=None, metrics=None) -> dict[str, dict[int, float]]:
    """:func:`read_per_image` as ``{metric: {test image id: score}}``, for matching runs by id."""
    ids, cols = read_per_image(path, expected_ids=expected_ids, metrics=metrics)
    return {m: dict(zip(map(int, ids), map(float, v))) for m, v in cols.items()}


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


def read_per_image(path, *, expected_ids=None, metrics=None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Read :func:`write_per_image`'s CSV: ``(ids, {metric: scores})``.

    With ``expected_ids`` (the run's test ids) the rows must be exactly those images; with
    ``metrics`` (the metric names of ``metrics.json``) the columns must be exactly those.

    Raises
    ------
    DataError
        Naming the file and what is wrong with it (bad header, a cut-off or malformed row,
        rows or columns that differ from the run's).
    """
    import csv

    path = Path(path)
    fix = f"delete {path} and recompute it with `brainrecon evaluate RUN`"
    if path.is_dir():
        raise DataError(f"{path} is a directory where per-image scores should be; {fix}.")
    try:
        with open(path, newline="", encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read per-image scores {path}: {exc}; {fix}.") from exc
    if text and not text.endswith("\n"):
        raise DataError(f"{path} ends in the middle of a row (truncated); {fix}.")
    rows = list(csv.reader(text.splitlines()))
    if not rows or not rows[0] or rows[0][0] != "image_id" or any(m not in ALL_METRICS for m in rows[0][1:]):
        raise DataError(f"{path} is not a brainrecon per-image score file (bad header); {fix}.")
    head = rows[0]
    body = [r for r in rows[1:] if r]
    try:
        if any(len(r) != len(head) for r in body):
            raise ValueError(f"a row has {next(len(r) for r in body if len(r) != len(head))} fields, the header {len(head)}")
        ids = np.array([int(r[0]) for r in body], dtype=np.int64)
        cols = {m: np.array([float(r[j]) if r[j] != "" else np.nan for r in body], dtype=np.float64)
                for j, m in enumerate(head) if j > 0}
    except (ValueError, IndexError) as exc:
        raise DataError(f"{path} has a malformed row ({exc}); {fix}.") from exc
    if len(np.unique(ids)) != len(ids):
        raise DataError(f"{path} lists some test image ids twice; {fix}.")
    if expected_ids is not None and not np.array_equal(np.sort(ids), np.sort(np.asarray(expected_ids))):
        raise DataError(
            f"{path} has scores for {len(ids)} images, but the run's test set has {len(expected_ids)} "
            f"(the ids differ); {fix}."
        )
    if metrics is not None and set(head[1:]) != set(metrics):
        raise DataError(
            f"{path} has columns {head[1:]}, but metrics.json has {sorted(metrics)}; {fix}."
        )
    return ids, cols


def _format_score(metric: str, value: float) -> str:
    if metric in PERCENT_METRICS:
        return f"{100 * value:.2f}%"
    return f"{value:.4f}"


def _versions() -> dict[str, str]:
    """Versions the numbers depend on (scipy's filters compute SSIM; the optional packages are
    listed when installed)."""
    from importlib.metadata import PackageNotFoundError, version

    import brainrecon

    out = {"brainrecon": brainrecon.__version__, "python": platform.python_version()}
    for dist in ("torch", "torchvision", "scipy", "numpy", "pillow", "transformers", "scikit-image"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            pass
    return out


# ============================================================================ input checks


def _check_metrics(metrics) -> list[str]:
    if metrics is None:
        return list(ALL_METRICS)
    if isinstance(metrics, str):
        metrics = [metrics]
    out = []
    for m in metrics:
        if m not in ALL_METRICS:
            lower = {name.lower(): name for name in ALL_METRICS}
            close = difflib.get_close_matches(str(m).lower(), list(lower), n=1, cutoff=0.5)
            hint = f" Did you mean {lower[close[0]]!r}?" if close else ""
            raise DataError(f"Unknown metric {m!r}.{hint} Valid metrics: {', '.join(map(repr, ALL_METRICS))}.")
        if m not in out:
            out.append(m)
    return [m for m in ALL_METRICS if m in out]


def _check_variant(variant: str) -> str:
    if variant not in VARIANTS:
        raise DataError(f"Unknown variant {variant!r}. Valid variants: {', '.join(map(repr, VARIANTS))}.")
    return variant


class _ImageSource:
    """Batched, validated access to one image set in any layout (lazy arrays stay lazy)."""

    def __init__(self, images, which: str):
        if isinstance(images, torch.Tensor):
            images = images.detach().cpu().numpy()
        if not hasattr(images, "shape") or not hasattr(images, "__getitem__"):
            images = np.asarray(images)
        self.data = images
        self.which = which
        shape = tuple(images.shape)
        if len(shape) != 4:
            raise DataError(
                f"{which} images must have shape (n, H, W, 3) or (n, 3, H, W); got shape {shape}."
            )
        if shape[-1] == 3:
            self.layout = "hwc"
            self.size = shape[1:3]
        elif shape[1] == 3:
            self.layout = "chw"
            self.size = shape[2:4]
        else:
            raise DataError(
                f"{which} images must be RGB with shape (n, H, W, 3) or (n, 3, H, W); got shape {shape}."
            )
        self.dtype = np.dtype(images.dtype)
        if self.dtype != np.uint8 and not np.issubdtype(self.dtype, np.floating):
            raise DataError(
                f"{which} images have dtype {self.dtype}; pass uint8 (0-255) or float images in [0, 1]."
            )
        self.n = shape[0]

    def raw(self, index: np.ndarray) -> np.ndarray:
        """Images at ``index`` as HWC numpy (uint8 or float), checked."""
        block = _take(self.data, index)
        block = np.asarray(block)
        if self.layout == "chw":
            block = block.transpose(0, 2, 3, 1)
        if block.dtype != np.uint8:
            bad = ~np.isfinite(block)
            if bad.any():
                i = int(index[np.argmax(bad.reshape(len(block), -1).any(axis=1))])
                raise DataError(
                    f"{self.which} images contain non-finite values (NaN or inf), first in image {i}; "
                    "fix or drop those images."
                )
            lo, hi = float(block.min()), float(block.max())
            if lo < -_RANGE_TOL or hi > 1 + _RANGE_TOL:
                per = block.reshape(len(block), -1)
                i = int(index[np.argmax((per.min(axis=1) < -_RANGE_TOL) | (per.max(axis=1) > 1 + _RANGE_TOL))])
                raise DataError(
                    f"{self.which} images are float with values outside [0, 1] (min {lo:.4g}, max {hi:.4g}; "
                    f"first in image {i}). Pass uint8 images, or scale float images to [0, 1] "
                    "(divide 0-255 values by 255; clip decoder outputs)."
                )
            block = np.clip(block, 0.0, 1.0).astype(np.float32, copy=False)
        return block

    def tensor(self, index: np.ndarray, device) -> torch.Tensor:
        """Images at ``index`` as float32 (B, 3, H, W) in [0, 1] on ``device``."""
        block = np.ascontiguousarray(self.raw(index))
        if not block.flags.writeable:  # read-only memory maps; torch wants writable memory
            block = block.copy()
        t = torch.from_numpy(block).to(device)
        t = t.permute(0, 3, 1, 2)
        if t.dtype == torch.uint8:
            return t.float().div_(255.0)
        return t.float()


def _take(data, index: np.ndarray):
    """``data[index]`` that also works for HDF5 datasets (which need increasing indices)."""
    if len(index) and np.all(np.diff(index) == 1):
        return data[int(index[0]) : int(index[-1]) + 1]
    if isinstance(data, np.ndarray):
        return data[index]
    order = np.argsort(index, kind="stable")
    block = np.asarray(data[np.sort(index)])
    out = np.empty_like(block)
    out[order] = block
    return out


def _align_ids(gt_ids, rec_ids, n_gt: int, n_rec: int) -> tuple[np.ndarray, bool]:
    """Index into the reconstructions that puts them in ground-truth order."""
    if n_gt != n_rec:
        raise DataError(
            f"Ground truth has {n_gt} images but there are {n_rec} reconstructions; "
            "evaluate the same test set on both sides."
        )
    identity = np.arange(n_rec)
    if gt_ids is None or rec_ids is None:
        return identity, False
    gt_ids = np.asarray(gt_ids).ravel()
    rec_ids = np.asarray(rec_ids).ravel()
    for name, ids, n in (("gt_ids", gt_ids, n_gt), ("rec_ids", rec_ids, n_rec)):
        if len(ids) != n:
            raise DataError(f"{name} has {len(ids)} entries for {n} images; give one id per image.")
        uniq, counts = np.unique(ids, return_counts=True)
        if (counts > 1).any():
            raise DataError(f"{name} contains duplicate id {uniq[np.argmax(counts > 1)]}; ids must be unique.")
    if np.array_equal(gt_ids, rec_ids):
        return identity, True
    rec_pos = {int(v): i for i, v in enumerate(rec_ids)}
    missing = [int(v) for v in gt_ids if int(v) not in rec_pos]
    if missing:
        first = int(np.argmax(gt_ids != rec_ids))
        extra = [int(v) for v in rec_ids if int(v) not in set(map(int, gt_ids))]
        raise DataError(
            f"Image ids differ: first difference at position {first} (ground truth id {int(gt_ids[first])}, "
            f"reconstruction id {int(rec_ids[first])}); ground-truth id {missing[0]} has no reconstruction "
            f"and reconstruction id {extra[0]} is not in the ground truth ({len(missing)} ids differ). "
            "Evaluate reconstructions of the same test images."
        )
    return np.array([rec_pos[int(v)] for v in gt_ids]), True


# ============================================================================ preprocessing


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """MindEye's tensor ``Resize``: bilinear, antialias off, square output."""
    if tuple(x.shape[-2:]) == (size, size):
        return x
    import torchvision.transforms.functional as TF

    return TF.resize(x, [size, size], interpolation=TF.InterpolationMode.BILINEAR, antialias=False)


def _normalise(x: torch.Tensor, which: str) -> torch.Tensor:
    mean, std = _CLIP if which == "clip" else _IMAGENET
    mean = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def _pil_resize(block: np.ndarray, size_wh: tuple[int, int], resample) -> np.ndarray:
    """Pillow resize of HWC images, uint8 or float; returns float32 HWC (values /255 for uint8)."""
    out = np.empty((len(block), size_wh[1], size_wh[0], 3), dtype=np.float32)
    for i, img in enumerate(block):
        if img.dtype == np.uint8:
            out[i] = np.asarray(Image.fromarray(img).resize(size_wh, resample), dtype=np.float32) / 255.0
        else:
            # Pillow has no float RGB mode; resize each channel as a 32-bit float image.
            for c in range(3):
                ch = Image.fromarray(np.ascontiguousarray(img[..., c], dtype=np.float32))
                out[i, ..., c] = np.asarray(ch.resize(size_wh, resample), dtype=np.float32)
    return out


def _hwc_to_float(block: np.ndarray) -> np.ndarray:
    return block.astype(np.float32) / 255.0 if block.dtype == np.uint8 else block.astype(np.float32)


# ============================================================================ networks and cache


def _default_cache_dir() -> Path:
    if os.environ.get("BRAINRECON_CACHE"):
        return Path(os.environ["BRAINRECON_CACHE"]).expanduser() / "eval"
    return Path("~/.cache/brainrecon/eval").expanduser()


def _build_networks(
    wanted: list[str], variant: str, extractors, weights_dir, strict: bool, allow_download
) -> tuple[list[FeatureNetwork], dict[str, str]]:
    extractors = dict(extractors or {})
    for m in extractors:
        if m not in METRICS or m in LOW_LEVEL_METRICS:
            raise DataError(
                f"extractors has an entry for {m!r}; extractors can replace only "
                f"{', '.join(map(repr, TWO_WAY_METRICS + DISTANCE_METRICS))}."
            )
    nets: list[FeatureNetwork] = []
    unavailable: dict[str, str] = {}
    need_standard: list[str] = []
    shared: dict[int, FeatureNetwork] = {}
    for m in wanted:
        if m in LOW_LEVEL_METRICS:
            continue
        if m in extractors:
            ext = extractors[m]
            if isinstance(ext, FeatureNetwork):
                # One network object may serve several metrics (AlexNet(2) and (5)): run it once,
                # asking only for the metrics it was given for and that are wanted.
                if id(ext) not in shared:
                    if m not in ext.metrics:
                        raise DataError(f"extractors[{m!r}] is a network for {ext.metrics}, not for {m!r}.")
                    served = tuple(x for x in ext.metrics if x in wanted and extractors.get(x) is ext)
                    shared[id(ext)] = FeatureNetwork(ext.name, served, ext.module, ext.cache_key, ext.source)
                    nets.append(shared[id(ext)])
            else:
                nets.append(wrap_extractor(m, ext))
        elif _METRIC_NETWORK[m] not in need_standard:
            need_standard.append(_METRIC_NETWORK[m])
    for name in need_standard:
        served = [m for m in NETWORK_METRICS[name] if m in wanted and m not in extractors]
        try:
            net = build_network(name, variant, weights_dir=weights_dir, allow_download=allow_download)
        except WeightsNotFoundError as exc:
            if strict:
                raise
            for m in served:
                unavailable[m] = str(exc)
            continue
        except ImportError as exc:  # CLIP needs transformers (the diffusion extra)
            from brainrecon.extras import missing_extra_message

            message = missing_extra_message(exc)
            if message is None or strict:
                raise
            for m in served:
                unavailable[m] = message
            continue
        net.metrics = tuple(served)
        nets.append(net)
    return nets, unavailable


def _net_input_size(net: FeatureNetwork, variant: str) -> int:
    if variant == "braindiffuser":
        return _BD_SIZE
    return _MINDEYE_SIZE[_METRIC_NETWORK[net.metrics[0]]]


def _net_norm(net: FeatureNetwork) -> str:
    return "clip" if _METRIC_NETWORK[net.metrics[0]] == "clip" else "imagenet"


def _content_hash(src: _ImageSource, batch_size: int) -> str:
    h = hashlib.sha256()
    h.update(f"{src.data.shape}|{src.dtype}|{src.layout}".encode())
    for start in range(0, src.n, batch_size):
        idx = np.arange(start, min(start + batch_size, src.n))
        h.update(np.ascontiguousarray(_take(src.data, idx)).tobytes())
    return h.hexdigest()


def _cache_key(gt_hash: str, variant: str, net: FeatureNetwork, n_net: int) -> str:
    return json.dumps(
        {"gt": gt_hash, "variant": variant, "net": net.name, "weights": net.cache_key,
         "metrics": net.metrics, "recipe": _RECIPE_VERSION, "images": n_net},
        sort_keys=True,
    )


def _cache_file(cache_root: Path, key: str, net: FeatureNetwork) -> Path:
    return cache_root / f"gt-{net.name}-{hashlib.sha256(key.encode()).hexdigest()[:24]}.safetensors"


def _features_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _load_cached(path: Path, key: str, net: FeatureNetwork, n: int, device) -> dict[str, torch.Tensor] | None:
    """The cached ground-truth features, or None. An entry that fails any check (unreadable,
    written for another key, other metrics or image count, contents that do not match the
    digest written with them) is recomputed, with a :class:`DamagedCacheWarning`; never trusted."""
    if not path.exists():
        return None
    from safetensors import safe_open

    def damaged(reason: str) -> None:
        warnings.warn(f"Ground-truth feature cache entry {path} is damaged ({reason}); its features are "
                      f"recomputed and the entry rewritten.", DamagedCacheWarning, stacklevel=3)

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own SafetensorError, or OSError
        damaged(f"unreadable: {exc}")
        return None
    if meta.get("key") != key:
        damaged("written for other ground truth, weights or settings" if "key" in meta
                else "no key recorded: written by an older brainrecon")
        return None
    if set(tensors) != set(net.metrics) or any(t.ndim == 0 or t.shape[0] != n for t in tensors.values()):
        damaged(f"holds {sorted(tensors)} for {sorted({int(t.shape[0]) if t.ndim else 0 for t in tensors.values()})} "
                f"images, expected {sorted(net.metrics)} for {n}")
        return None
    if meta.get("sha256") != _features_digest(tensors):
        damaged("its contents do not match the digest written with them")
        return None
    return {m: t.to(device) for m, t in tensors.items()}


def _save_cached(path: Path, key: str, feats: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    from brainrecon.io import atomic_path

    tensors = {m: t.detach().cpu().contiguous() for m, t in feats.items()}
    try:
        if path.is_dir():
            raise IsADirectoryError(f"{path} is a directory")
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata={"key": key, "sha256": _features_digest(tensors)})
    except OSError as exc:  # the scores are right; only the next evaluation is slower
        warnings.warn(f"Ground-truth feature cache entry {path} could not be written ({exc}); "
                      f"delete it or pass another --cache-dir.", DamagedCacheWarning, stacklevel=3)


# ============================================================================ evaluate


def evaluate(
    gt,
    rec,
    metrics=None,
    variant: str = "mindeye",
    device="auto",
    *,
    gt_ids=None,
    rec_ids=None,
    weights_dir=None,
    extractors: Mapping[str, Any] | None = None,
    strict: bool = False,
    batch_size: int = 32,
    cache_dir=None,
    progress: bool = True,
    ssim_mode: str | None = None,
    blend=None,
    allow_download: bool | None = None,
    n_resamples: int = stats.DEFAULT_RESAMPLES,
    confidence: float = stats.DEFAULT_CONFIDENCE,
    seed: int = stats.DEFAULT_SEED,
    network_images: int | None = None,
    predictions=None,
    targets=None,
    target_space: str | None = None,
    retrieval_way: int = M.RETRIEVAL_WAY,
) -> EvalReport:
    """Score reconstructions against ground truth with the eight NSD metrics and retrieval.

    Parameters
    ----------
    gt, rec : array of shape (n_images, H, W, 3) or (n_images, 3, H, W)
        uint8 (0-255) or float in [0, 1]; numpy arrays, memory maps, HDF5 datasets or
        torch tensors. Sizes may differ between the two sets.
    metrics : list of str, optional
        Subset of ``METRICS`` (default all eight).
    variant : {"mindeye", "braindiffuser"}
        Preprocessing recipe (module docstring).
    device : str
        ``"auto"`` (CUDA when present), ``"cpu"``, ``"cuda"``, ``"cuda:N"``.
    gt_ids, rec_ids : int array of shape (n_images,), optional
        Image ids (NSD 73k ids). When both are given the reconstructions are put in
        ground-truth order; different id sets are an error naming the first difference.
    weights_dir : path-like, optional
        Searched for weight files before the torch hub / Hugging Face caches.
    extractors : mapping of metric name to callable, optional
        Replace a metric's feature network; ``f(x)`` gets a preprocessed float32 batch
        (B, 3, S, S) and returns (B, ...) features.
    strict : bool
        Raise :class:`WeightsNotFoundError` instead of reporting a metric unavailable.
    batch_size : int
        Images per forward pass.
    cache_dir : path-like or False, optional
        Ground-truth feature cache (default ``$BRAINRECON_CACHE/eval`` or
        ``~/.cache/brainrecon/eval``); ``False`` disables it. Only networks with known
        weights are cached.
    progress : bool
        Show a progress bar.
    ssim_mode : {"2d", "columnwise"}, optional
        Default: ``"2d"`` for MindEye, ``"columnwise"`` for Brain-Diffuser.
    blend : array like ``rec``, optional
        MindEye2's "enhanced" evaluation: reconstructions become 0.75 * rec + 0.25 * blend
        at 256 px before every metric (MindEye variant only; off by default).
    allow_download : bool, optional
        Whether missing weights may be downloaded (default: yes, unless offline
        variables are set or under pytest).
    n_resamples, confidence, seed
        The bootstrap of each metric's interval over images (recorded in the report).
    network_images : int, optional
        Score the six network metrics on the first ``network_images`` images only (in
        ground-truth order; PixCorr and SSIM still use all): a quick look on a CPU, recorded
        in ``settings["network_images"]``; their per-image rows beyond it are empty.
    predictions, targets : array of shape (n_images, ...), optional
        The decoder's predictions in its target space (in ``rec`` order, like the
        reconstructions) and the true targets of the ground-truth images (in ``gt`` order):
        with both, ``ImageRet(target)`` and ``BrainRet(target)`` are scored (cosine similarity of
        the flattened vectors; no weights needed). ``ImageRet(CLIP)`` and ``BrainRet(CLIP)``
        use the CLIP metric's embeddings of reconstructions and ground truth.
    target_space : str, optional
        Names the target space (recorded; runs are compared on retrieval only within one space).
    retrieval_way : int
        Candidates per retrieval set (MindEye: 300); ``min(retrieval_way, N)`` are used.

    Returns
    -------
    EvalReport

    Raises
    ------
    DataError
        Non-finite pixels, float values outside [0, 1], mismatched counts or ids,
        unknown metric or variant.
    WeightsNotFoundError
        Only with ``strict=True``.
    """
    from tqdm.auto import tqdm

    t_start = time.perf_counter()
    wanted = _check_metrics(metrics)
    variant = _check_variant(variant)
    ssim_mode = ssim_mode or _DEFAULT_SSIM_MODE[variant]
    if ssim_mode not in M.SSIM_MODES:
        raise DataError(f"Unknown ssim_mode {ssim_mode!r}. Valid modes: {', '.join(map(repr, M.SSIM_MODES))}.")
    if blend is not None and variant != "mindeye":
        raise DataError("blend is MindEye2's recipe; use it with variant='mindeye'.")
    dev = resolve_device(device)
    if int(batch_size) < 1:
        raise DataError(f"batch_size must be a positive integer, got {batch_size!r}.")
    batch_size = int(batch_size)

    gt_src = _ImageSource(gt, "ground-truth")
    rec_src = _ImageSource(rec, "reconstruction")
    rec_order, aligned = _align_ids(gt_ids, rec_ids, gt_src.n, rec_src.n)
    blend_src = None
    if blend is not None:
        blend_src = _ImageSource(blend, "blend")
        if blend_src.n != rec_src.n:
            raise DataError(f"blend has {blend_src.n} images for {rec_src.n} reconstructions.")
    n = gt_src.n
    if n < 2 and any(m in TWO_WAY_METRICS for m in wanted):
        raise DataError(f"Two-way identification needs at least 2 images; got {n}.")
    target_ret = [m for m in wanted if m in TARGET_RETRIEVAL_METRICS]
    if target_ret and (predictions is None or targets is None):
        if metrics is None:  # by default scored only where the caller has the target space
            wanted = [m for m in wanted if m not in TARGET_RETRIEVAL_METRICS]
        target_ret = []
    pred_arr = true_arr = None
    if target_ret:
        pred_arr = np.asarray(predictions)
        true_arr = np.asarray(targets)
        if len(pred_arr) != n or len(true_arr) != n:
            raise DataError(f"Retrieval needs one prediction and one true target per test image: got "
                            f"{len(pred_arr)} predictions and {len(true_arr)} targets for {n} images.")
        if n < 2:
            raise DataError(f"Retrieval needs at least 2 images; got {n}.")
        pred_arr = pred_arr[rec_order]
    clip_ret = [m for m in wanted if m in CLIP_RETRIEVAL_METRICS]
    # The CLIP-space retrieval needs the CLIP metric's embeddings, wanted or not.
    net_wanted = [m for m in wanted if m in METRICS] + (["CLIP"] if clip_ret and "CLIP" not in wanted else [])
    if network_images is not None and int(network_images) < 2:
        raise DataError(f"network_images must be at least 2 (two-way identification), got {network_images}.")
    n_net = n if network_images is None else min(n, int(network_images))

    nets, unavailable = _build_networks(net_wanted, variant, extractors, weights_dir, strict, allow_download)
    if "CLIP" in unavailable:
        unavailable.update({m: unavailable["CLIP"] for m in clip_ret})
        if "CLIP" not in wanted:
            del unavailable["CLIP"]
    missing_targets = [m for m in wanted if m in TARGET_RETRIEVAL_METRICS and m not in target_ret]
    unavailable.update({m: "no predictions and true targets in the decoder's target space were given"
                        for m in missing_targets})
    for net in nets:
        net.to(dev)

    timings: dict[str, float] = {}
    # Features are written into tensors of the full test-set size allocated at the first batch:
    # no per-batch lists to concatenate (which doubled the peak memory, fragmented heap included).
    gt_feats: dict[str, torch.Tensor] = {}
    cache_root = None if cache_dir is False else Path(cache_dir).expanduser() if cache_dir else _default_cache_dir()
    cache_files: dict[str, tuple[Path, str]] = {}
    cached_nets: set[str] = set()
    if cache_root is not None and any(net.cache_key for net in nets):
        t0 = time.perf_counter()
        gt_hash = _content_hash(gt_src, batch_size)
        for net in nets:
            if net.cache_key:
                key = _cache_key(gt_hash, variant, net, n_net)
                cache_files[net.name] = (_cache_file(cache_root, key, net), key)
                hit = _load_cached(cache_files[net.name][0], key, net, n_net, dev)
                if hit is not None:
                    gt_feats.update(hit)
                    cached_nets.add(net.name)
        timings["gt cache lookup"] = time.perf_counter() - t0
    rec_feats: dict[str, torch.Tensor] = {}
    pix_scores: list[np.ndarray] = []
    ssim_scores: list[np.ndarray] = []
    low_level = [m for m in wanted if m in LOW_LEVEL_METRICS]

    def tick(key: str, t0: float) -> float:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        now = time.perf_counter()
        timings[key] = timings.get(key, 0.0) + now - t0
        return now

    n_batches = math.ceil(n / batch_size)
    for b in tqdm(range(n_batches), desc=f"evaluate ({variant})", unit="batch", disable=bar_disabled(progress)):
        gi = np.arange(b * batch_size, min((b + 1) * batch_size, n))
        ri = rec_order[gi]
        t0 = time.perf_counter()
        if variant == "mindeye":
            g = _resize(gt_src.tensor(gi, dev), _BASE_SIZE)
            r = _resize(rec_src.tensor(ri, dev), _BASE_SIZE)
            if blend_src is not None:
                r = 0.75 * r + 0.25 * _resize(blend_src.tensor(ri, dev), _BASE_SIZE)
            if low_level:
                g_ll, r_ll = _resize(g, _LOW_LEVEL_SIZE), _resize(r, _LOW_LEVEL_SIZE)
                if dev.type == "cpu":  # scipy's filters beat torch's on a CPU
                    g_ll, r_ll = g_ll.numpy(), r_ll.numpy()
            net_inputs = {}
            for net in nets:
                key = (_net_input_size(net, variant), _net_norm(net))
                if key not in net_inputs:
                    net_inputs[key] = (_normalise(_resize(g, key[0]), key[1]), _normalise(_resize(r, key[0]), key[1]))
            t0 = tick("load + resize", t0)
        else:
            g_raw, r_raw = gt_src.raw(gi), rec_src.raw(ri)
            if low_level:
                g_ll = _hwc_to_float(g_raw)
                if tuple(r_raw.shape[1:3]) != tuple(g_raw.shape[1:3]):
                    r_ll = _pil_resize(r_raw, (g_raw.shape[2], g_raw.shape[1]), Image.Resampling.BICUBIC)
                else:
                    r_ll = _hwc_to_float(r_raw)
                g_ll, r_ll = g_ll.transpose(0, 3, 1, 2), r_ll.transpose(0, 3, 1, 2)
                if dev.type != "cpu":
                    g_ll, r_ll = torch.from_numpy(g_ll).to(dev), torch.from_numpy(r_ll).to(dev)
            net_inputs = {}
            if nets:

                def to_net(raw):
                    x = _pil_resize(raw, (_BD_SIZE, _BD_SIZE), Image.Resampling.BILINEAR)
                    return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous().to(dev)

                g224, r224 = to_net(g_raw), to_net(r_raw)
                for norm in {_net_norm(net) for net in nets}:
                    net_inputs[(_BD_SIZE, norm)] = (_normalise(g224, norm), _normalise(r224, norm))
            t0 = tick("load + resize", t0)
        if low_level:
            if "PixCorr" in wanted:
                pix_scores.append(M.pixcorr_per_image(g_ll, r_ll))
            if "SSIM" in wanted:
                ssim_scores.append(M.ssim_per_image(g_ll, r_ll, mode=ssim_mode))
            t0 = tick("PixCorr + SSIM", t0)
        rows = max(0, min(len(gi), n_net - int(gi[0])))  # the batch's rows the networks see
        for net in nets if rows else ():
            x_g, x_r = net_inputs[(_net_input_size(net, variant), _net_norm(net))]
            if net.name not in cached_nets:
                for m, f in net(x_g[:rows]).items():
                    _store(gt_feats, m, f, int(gi[0]), n_net)
            for m, f in net(x_r[:rows]).items():
                _store(rec_feats, m, f, int(gi[0]), n_net)
            t0 = tick(f"network {net.name}", t0)

    per_image: dict[str, np.ndarray] = {}
    if "PixCorr" in wanted:
        per_image["PixCorr"] = np.concatenate(pix_scores)
    if "SSIM" in wanted:
        per_image["SSIM"] = np.concatenate(ssim_scores)
    t0 = time.perf_counter()
    way = int(retrieval_way)
    sampled: dict[str, float] = {}
    if target_ret:
        # Image retrieval: each prediction among the true targets; brain retrieval: the reverse.
        pairs = {"ImageRet(target)": (pred_arr, true_arr), "BrainRet(target)": (true_arr, pred_arr)}
        for m in target_ret:
            per_image[m] = M.retrieval_per_image(*pairs[m], way=way)
            sampled[m] = M.retrieval_sampled(*pairs[m], way=way, seed=seed)
    for net in nets:
        if net.name not in cached_nets:
            if net.name in cache_files:
                _save_cached(*cache_files[net.name], {m: gt_feats[m] for m in net.metrics})
        for m in net.metrics:
            fr = rec_feats.pop(m)
            if m == "CLIP" and clip_ret:
                pairs = {"ImageRet(CLIP)": (fr, gt_feats[m]), "BrainRet(CLIP)": (gt_feats[m], fr)}
                for r in clip_ret:
                    per_image[r] = M.retrieval_per_image(*pairs[r], way=way)
                    sampled[r] = M.retrieval_sampled(*pairs[r], way=way, seed=seed)
                if "CLIP" not in wanted:
                    del fr
                    gt_feats.pop(m)
                    continue
            if m in TWO_WAY_METRICS:
                per_image[m] = M.two_way_per_reconstruction(gt_feats[m], fr)
            else:
                per_image[m] = M.correlation_distance_per_pair(gt_feats[m], fr)
            del fr
            gt_feats.pop(m)
    tick("scores", t0)
    per_image = {m: per_image[m] for m in ALL_METRICS if m in per_image}
    scores = {m: float(np.mean(v)) for m, v in per_image.items()}
    t0 = time.perf_counter()
    intervals = {
        m: stats.bootstrap_interval(v, n_resamples=n_resamples, confidence=confidence, seed=seed)
        for m, v in per_image.items()
    }
    tick("bootstrap intervals", t0)
    if n_net < n:  # network metrics cover the first n_net images; the others' rows stay empty
        for m, v in per_image.items():
            if len(v) == n_net:
                per_image[m] = np.concatenate([v, np.full(n - n_net, np.nan)])
    timings["total"] = time.perf_counter() - t_start

    settings = {
        "ssim_mode": ssim_mode,
        "blend": blend is not None,
        "effnet_weights": _EFFNET_WEIGHTS[variant],
        "networks": {m: net.source for net in nets for m in net.metrics},
        # Content hashes of the weight files (the ground-truth cache key): which weights, exactly.
        "weights_identity": {m: net.cache_key for net in nets for m in net.metrics if net.cache_key},
        "gt_features_cached": sorted(m for net in nets if net.name in cached_nets for m in net.metrics),
        "network_images": n_net,
        "aligned_by_id": aligned,
        "ids_sha256": _ids_hash(gt_ids) if gt_ids is not None else None,
        "gt_size": list(gt_src.size),
        "rec_size": list(rec_src.size),
        "device": str(dev),
    }
    if sampled:
        settings["retrieval"] = {
            "way": way,
            "effective_way": {m: min(way, n if m in TARGET_RETRIEVAL_METRICS else n_net) for m in sampled},
            "similarity": "cosine of the flattened, L2-normalised vectors",
            "per_image": "exact mean over all random sets of min(way, N) test images containing the image",
            "target_space": target_space if target_ret else None,
            "clip_space": "the CLIP metric's image embeddings, reconstruction vs ground truth" if clip_ret else None,
            "mindeye_sampled": {"repeats": M.RETRIEVAL_REPEATS, "seed": int(seed), "scores": sampled},
        }
    bootstrap = {
        "method": stats.BOOTSTRAP_METHOD, "n_resamples": int(n_resamples), "confidence": float(confidence),
        "seed": int(seed), "two_way_note": stats.TWO_WAY_APPROXIMATION,
    }
    return EvalReport(
        scores, n_images=n, variant=variant, unavailable=unavailable, settings=settings,
        versions=_versions(), timings={k: round(v, 4) for k, v in timings.items()},
        per_image=per_image, ids=gt_ids if gt_ids is not None else np.arange(n), intervals=intervals,
        bootstrap=bootstrap,
    )


def _store(buf: dict[str, torch.Tensor], metric: str, feats: torch.Tensor, start: int, n: int) -> None:
    """Write one batch of features at rows ``start:`` of the metric's (n, ...) tensor."""
    if metric not in buf:
        buf[metric] = torch.empty((n, *feats.shape[1:]), dtype=feats.dtype, device=feats.device)
    buf[metric][start : start + feats.shape[0]] = feats


def _ids_hash(ids) -> str:
    return hashlib.sha256(np.asarray(ids, dtype=np.int64).tobytes()).hexdigest()


# ============================================================================ runs


def evaluate_run(
    run,
    variant: str = "mindeye",
    *,
    metrics=None,
    device="auto",
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
    variant, metrics, device, weights_dir, extractors, strict, batch_size, cache_dir, progress, ssim_mode
        As in :func:`evaluate`.
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

