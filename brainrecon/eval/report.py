"""The evaluation report: the metric names, :class:`EvalReport`, and the files it is kept in.

:func:`brainrecon.eval.evaluate` returns an :class:`EvalReport`; :meth:`EvalReport.save` writes
it as ``metrics.json`` with the per-image scores beside it (:func:`write_per_image`, read back by
:func:`read_per_image`), and :func:`report_files` names that pair for each evaluation variant.
Reading a report needs numpy only (no torch, no feature networks).
"""

from __future__ import annotations

import datetime as _dt
import difflib
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from brainrecon.errors import DataError
from brainrecon.eval.names import (  # the metric names are defined once, there
    ALL_METRICS,
    CLIP_RETRIEVAL_METRICS,
    DISTANCE_METRICS,
    LOW_LEVEL_METRICS,
    METRICS,
    RETRIEVAL_METRICS,
    TARGET_RETRIEVAL_METRICS,
    TWO_WAY_METRICS,
)

__all__ = [
    "ALL_METRICS",
    "CLIP_RETRIEVAL_METRICS",
    "DISTANCE_METRICS",
    "HIGHER_IS_BETTER",
    "LOW_LEVEL_METRICS",
    "METRICS",
    "METRICS_FILE",
    "PERCENT_METRICS",
    "PER_IMAGE_FILE",
    "RETRIEVAL_METRICS",
    "TARGET_RETRIEVAL_METRICS",
    "TWO_WAY_METRICS",
    "VARIANTS",
    "EvalReport",
    "per_image_path",
    "read_per_image",
    "report_files",
    "scores_by_id",
    "unavailable_summary",
    "write_per_image",
]

#: Fractions printed as percentages (chance: 50 % for two-way, 1/min(300, N) for retrieval).
PERCENT_METRICS = TWO_WAY_METRICS + RETRIEVAL_METRICS
HIGHER_IS_BETTER: dict[str, bool] = {m: m not in DISTANCE_METRICS for m in ALL_METRICS}
VARIANTS = ("mindeye", "braindiffuser")
REPORT_FORMAT = "brainrecon.eval.report/1"


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


# ============================================================================ names given by the caller


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
