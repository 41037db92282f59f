"""The leaderboard: runs ranked within groups of comparable runs.

Two runs are comparable when they were scored on the same images under the same
recipe: same dataset fingerprint (data and subject), same test ids and the same
metric variant. :func:`collect` reads every run directory under a root;
:func:`leaderboard` renders the groups as a terminal table, Markdown, CSV or one
self-contained HTML page (tables plus each run's reconstruction grid, embedded).

Published NSD results (:mod:`brainrecon.eval.published`) are shown as reference
rows under groups of NSD runs only, marked as published and cited; they take no
rank and never appear beside runs on synthetic data.

Runs are also grouped by what they were scored on: the same metrics (a run scored on
PixCorr and SSIM only is never ranked against runs scored on all eight), the same network
subset (``network_images``) and, for target-space retrieval, the same target space.

Each cell shows ``mean ± half-width`` of the run's 95 % bootstrap interval over test
images (from its ``metrics.json``). Within a group, on each metric, every run is compared
with the group's best run (chosen after looking) by a single-step max-statistic
permutation test over all the group's runs (:func:`brainrecon.eval.stats.max_statistic_p_values`),
which keeps the chance of marking any run as different, when all are equal, at most
``alpha``. Marks: ``(best)`` (terminal; bold elsewhere) the reference; ``n.s.`` not
distinguishable from it at ``alpha`` after that adjustment (not evidence of equality);
``n.t.`` not tested, because the run or the best run has no per-image scores; no mark:
different from the best. Values: ``n/a`` unavailable (reason below the group), ``NaN``
undefined for some image (reason below), ``–`` not scored.

The package is split at its seams: :mod:`~brainrecon.leaderboard.entries` reads the runs
(:class:`LeaderboardEntry`, :func:`collect`), :mod:`~brainrecon.leaderboard.marks` ranks a group and
compares its runs with the best (:func:`rank_group`, :func:`compare_to_best`, :func:`cell_mark`) and
:mod:`~brainrecon.leaderboard.render` writes the four formats; :func:`leaderboard` joins them.
"""
from __future__ import annotations

import html
import os
from pathlib import Path

from brainrecon.errors import DataError
from brainrecon.leaderboard.entries import LeaderboardEntry, collect
from brainrecon.leaderboard.marks import (  # noqa: F401 - the marks' names re-exported
    BEST,
    DEFAULT_ALPHA,
    DIFFERS,
    NOT_DISTINGUISHABLE,
    NOT_TESTED,
    _check_sort,
    cell_mark,
    compare_to_best,
    rank_group,
)
from brainrecon.leaderboard.render import (  # noqa: F401 - _unavailable_notes re-exported
    _build,
    _render_csv,
    _render_html,
    _render_markdown,
    _render_table,
    _unavailable_notes,
)

__all__ = ["FORMATS", "LeaderboardEntry", "cell_mark", "collect", "compare_to_best", "leaderboard", "rank_group"]

FORMATS = ("table", "markdown", "csv", "html")


def leaderboard(
    runs_dir: str | os.PathLike = "runs",
    sort: str | None = None,
    fmt: str = "table",
    *,
    include_published: bool = True,
    include_ablations: bool = False,
    title: str = "brainrecon leaderboard",
    entries: list[LeaderboardEntry] | None = None,
    alpha: float = DEFAULT_ALPHA,
    variant: str = "mindeye",
) -> str:
    """Render the runs under ``runs_dir`` as ranked groups of comparable runs.

    Parameters
    ----------
    runs_dir : path-like
        Folder holding run directories.
    sort : str, optional
        ``"rank"`` / None (mean rank over the metrics) or a metric name.
    fmt : {"table", "markdown", "csv", "html"}
        ``html`` is one self-contained page with each run's grid embedded.
    include_published : bool
        Show published reference rows under groups of evaluated NSD runs (never under
        synthetic or other non-NSD data). False hides them.
    include_ablations : bool
        Also list NeuroPictor's published ablation rows.
    title : str
        HTML page title.
    entries : list of LeaderboardEntry, optional
        Use these instead of reading ``runs_dir``.
    alpha : float
        Significance level of the paired comparisons with each group's best run.
    variant : {"mindeye", "braindiffuser"}
        Which evaluation report of each run is ranked (:func:`collect`).

    Returns
    -------
    str
    """
    if fmt not in FORMATS:
        raise DataError(f"Unknown format {fmt!r}. Valid formats: {', '.join(map(repr, FORMATS))}.")
    _check_sort(sort)
    if entries is None:
        entries = collect(runs_dir, variant)
    if not entries and fmt != "csv":
        msg = f"No runs under {Path(runs_dir)}. Fit one with `brainrecon fit` or `brainrecon demo`."
        return f"<!DOCTYPE html><html><body><p>{html.escape(msg)}</p></body></html>\n" if fmt == "html" else msg + "\n"
    if not 0 < alpha < 1:
        raise DataError(f"alpha must be between 0 and 1 (e.g. 0.05), got {alpha}.")
    groups, citations = _build(entries, sort, include_published, include_ablations, alpha)
    if fmt == "table":
        return _render_table(groups, citations, alpha)
    if fmt == "markdown":
        return _render_markdown(groups, citations, alpha)
    if fmt == "csv":
        return _render_csv(groups, citations, alpha)
    return _render_html(groups, citations, title, alpha)
