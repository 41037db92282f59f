"""The runs as the leaderboard sees them: :class:`LeaderboardEntry` and :func:`collect`, which reads
every run directory under a root (its ``run.json``, evaluation report and per-image scores)."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from brainrecon.errors import BrainreconError, DataError
from brainrecon.eval.report import (
    ALL_METRICS,
    METRICS,
    RETRIEVAL_METRICS,
    TARGET_RETRIEVAL_METRICS,
    EvalReport,
)
from brainrecon.eval.stats import DEFAULT_PERMUTATIONS

__all__ = ["LeaderboardEntry", "collect"]


@dataclass
class LeaderboardEntry:
    """One run as the leaderboard sees it.

    Attributes
    ----------
    name, decoder : str
    path : Path
    subject : int or None
    data_name, data_kind : str
    is_nsd : bool
        Real NSD data (ids are NSD ids and the data is not synthetic).
    fingerprint : str
    n_test : int
    ids_sha256 : str
    variant : str or None
        None when the run has no (readable) ``metrics.json``.
    scores : dict of str to float
    unavailable : dict of str to str
    grid : Path or None
    note : str
    """

    name: str
    path: Path
    decoder: str
    subject: int | None
    data_name: str
    data_kind: str
    is_nsd: bool
    fingerprint: str
    n_test: int
    ids_sha256: str
    variant: str | None
    scores: dict[str, float] = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)
    grid: Path | None = None
    note: str = ""
    rank: int | None = None
    intervals: dict[str, tuple[float, float]] = field(default_factory=dict)
    per_image: dict[str, dict[int, float]] = field(default_factory=dict)
    #: The network metrics were scored on the first this many test images only (None: all).
    network_images: int | None = None
    #: The target space of the target-space retrieval scores (e.g. "pixels (32, 32, 3)").
    retrieval_space: str | None = None
    #: Test ids shown in the run's grid.png (recorded by ``evaluate``), when known.
    grid_ids: list[int] | None = None
    # Filled by compare_to_best, per metric: the pair's own p-value against the group's best run
    # (the number `compare --stats` prints), the family-wise adjusted one (used for the marks),
    # the images compared, why a cell was not tested, and the metrics this run is the best on.
    p_vs_best: dict[str, float] = field(default_factory=dict)
    p_adjusted: dict[str, float] = field(default_factory=dict)
    p_exact: dict[str, bool] = field(default_factory=dict)
    n_compared: dict[str, int] = field(default_factory=dict)
    not_tested: dict[str, str] = field(default_factory=dict)
    best_of: set = field(default_factory=set)
    n_permutations: int = DEFAULT_PERMUTATIONS

    @property
    def metric_set(self) -> tuple[str, ...]:
        """The metrics this run was scored on (NaN included; unavailable ones not)."""
        return tuple(m for m in ALL_METRICS if m in self.scores)

    @property
    def group_key(self) -> tuple:
        return (self.data_kind, self.fingerprint, self.n_test, self.ids_sha256, self.variant, self.metric_set,
                self.network_images, self.retrieval_space)

    @property
    def group_label(self) -> str:
        subj = f"subject {self.subject}" if self.subject is not None else "all subjects"
        variant = f"variant {self.variant}" if self.variant else "not evaluated"
        label = f"{self.data_name} · {subj} · {self.n_test} test images · {variant}"
        if self.variant is None:
            return label
        eight = [m for m in METRICS if m in self.scores]
        label += (" · all 8 metrics" if len(eight) == len(METRICS)
                  else f" · {len(eight)} of 8 metrics ({', '.join(eight) or 'none'})")
        if self.network_images is not None:
            label += f" · network metrics on the first {self.network_images} test images"
        if any(m in self.scores for m in RETRIEVAL_METRICS):
            label += " · retrieval"
            if self.retrieval_space:
                label += f" (target space: {self.retrieval_space})"
        return label


def _ids_hash(ids) -> str:
    return hashlib.sha256(np.asarray(ids, dtype=np.int64).tobytes()).hexdigest()


def collect(runs_dir: str | os.PathLike = "runs", variant: str = "mindeye") -> list[LeaderboardEntry]:
    """Read every run directly under ``runs_dir``.

    Parameters
    ----------
    runs_dir : path-like
    variant : {"mindeye", "braindiffuser"}
        Which evaluation report of each run to read (``metrics.json`` for MindEye's recipe,
        ``metrics-braindiffuser.json`` for Brain-Diffuser's; see ``Run.metrics``).

    Returns
    -------
    list of LeaderboardEntry
        Runs without ``metrics.json`` are included with ``variant=None`` and a note.
    """
    from brainrecon.eval.report import report_files
    from brainrecon.runs import list_runs

    report_file, per_image_file = report_files(variant)
    evaluate = "`brainrecon evaluate`" if variant == "mindeye" else f"`brainrecon evaluate RUN --variant {variant}`"
    entries = []
    for run in list_runs(runs_dir):
        info = run.info
        data = info.get("data") or {}
        kind = str(data.get("kind", "unknown"))
        try:
            ids_sha = _ids_hash(np.sort(run.test_ids()))  # the set of test images, in any order
        except (OSError, ValueError):
            ids_sha = "unknown"
        entry = LeaderboardEntry(
            name=str(info.get("name", run.path.name)),
            path=run.path,
            decoder=str(info.get("decoder", "?")),
            subject=int(info["subject"]) if info.get("subject") is not None else None,
            data_name=str(info.get("data_name") or kind),
            data_kind=kind,
            is_nsd=bool(info.get("ids_are_nsd")) and kind != "synthetic",
            fingerprint=str(info.get("fingerprint", "")),
            n_test=int(info.get("n_test", 0)),
            ids_sha256=ids_sha,
            variant=None,
            grid=run.path / "grid.png" if (run.path / "grid.png").is_file() else None,
        )
        raw = None
        try:
            raw = run.metrics(variant)
        except (ValueError, BrainreconError):
            entry.note = f"{report_file} is damaged (not valid JSON or not a report); run {evaluate}"
        if raw is not None:
            try:
                report = EvalReport.from_json(raw)
            except (DataError, KeyError, TypeError, ValueError):
                entry.note = f"{report_file} is not a brainrecon report; run {evaluate}"
            else:
                entry.variant = report.variant
                entry.scores = dict(report)
                entry.unavailable = dict(report.unavailable)
                entry.intervals = dict(report.intervals)
                if report.n_images != entry.n_test:
                    entry.n_test = report.n_images
                entry.per_image = _read_per_image(run.path / per_image_file, entry, run.test_ids(), list(report))
                k = report.settings.get("network_images")
                if (isinstance(k, int) and not isinstance(k, bool) and k < report.n_images
                        and any(m in entry.scores for m in METRICS if m not in ("PixCorr", "SSIM"))):
                    entry.network_images = k
                    if not entry.note:
                        entry.note = (f"network metrics scored on the first {k} of {report.n_images} test images; "
                                      f"`brainrecon evaluate {run.path}` scores them on all")
                retrieval = report.settings.get("retrieval")
                if isinstance(retrieval, dict) and any(m in entry.scores for m in TARGET_RETRIEVAL_METRICS):
                    entry.retrieval_space = str(retrieval.get("target_space") or "unknown")
                grid_ids = report.settings.get("grid_ids")
                if isinstance(grid_ids, list) and all(isinstance(i, int) for i in grid_ids):
                    entry.grid_ids = grid_ids
        elif not entry.note:
            entry.note = (f"not evaluated; run {evaluate}" if variant == "mindeye" or not run.variants()
                          else f"not evaluated with --variant {variant}; run {evaluate}")
        entries.append(entry)
    return entries


def _read_per_image(path: Path, entry: LeaderboardEntry, ids, metrics) -> dict[str, dict[int, float]]:
    """A run's per-image scores as metric -> {test id: score}, checked against the run's test
    ids and metric names; a damaged file becomes a note."""
    from brainrecon.eval.report import scores_by_id

    if not path.exists():
        return {}
    try:
        return scores_by_id(path, expected_ids=ids, metrics=metrics)
    except DataError as exc:
        entry.note = str(exc)
        return {}
