"""Within one group of comparable runs: the ranks (:func:`rank_group`) and, per metric, the paired
comparison of every run with the group's best run, adjusted for multiplicity (:func:`compare_to_best`),
and the mark each cell gets from it (:func:`cell_mark`)."""

from __future__ import annotations

import math

import numpy as np

from brainrecon.errors import DataError
from brainrecon.eval.report import ALL_METRICS, HIGHER_IS_BETTER
from brainrecon.eval.stats import (
    DEFAULT_PERMUTATIONS,
    max_statistic_p_values,
    paired_comparison_by_id,
)
from brainrecon.leaderboard.entries import LeaderboardEntry

__all__ = ["BEST", "DEFAULT_ALPHA", "DIFFERS", "NOT_DISTINGUISHABLE", "NOT_TESTED", "cell_mark", "compare_to_best",
           "rank_group"]

#: Marks of a cell against its group's best run on that metric (see :func:`cell_mark`).
BEST = "best"
NOT_DISTINGUISHABLE = "n.s."
NOT_TESTED = "n.t."
DIFFERS = "differs"
DEFAULT_ALPHA = 0.05


def compare_to_best(members: list[LeaderboardEntry], *, seed: int = 0,
                    n_permutations: int = DEFAULT_PERMUTATIONS) -> None:
    """Compare, per metric, every run of a group with the group's best run on that metric.

    Sets on each member, per metric: ``p_vs_best`` (the pair's own two-sided sign-flip p-value,
    :func:`~brainrecon.eval.stats.paired_comparison_by_id`: the number ``compare --stats`` prints
    for the same pair and seed), ``p_adjusted`` (family-wise adjusted over all the group's runs
    with per-image scores, :func:`~brainrecon.eval.stats.max_statistic_p_values`; the marks use
    it), ``n_compared`` (images in the family test), ``not_tested`` (why a cell has no test:
    the run or the best run has no per-image scores) and ``best_of``.
    """
    best = _best(members)
    for e in members:
        e.p_vs_best, e.p_adjusted, e.p_exact, e.n_compared, e.not_tested = {}, {}, {}, {}, {}
        e.best_of = set()
        e.n_permutations = int(n_permutations)
    for m, value in best.items():
        present = [e for e in members if _present(e, m)]
        leader = next(e for e in present if e.scores[m] == value)
        leader.best_of.add(m)
        others = [e for e in present if e is not leader]
        if not leader.per_image.get(m):
            for e in others:
                e.not_tested[m] = f"the group's best run on {m} ({leader.name}) has no per-image scores"
            continue
        family = [leader]
        for e in others:
            if e.per_image.get(m):
                family.append(e)
            else:
                e.not_tested[m] = "no per-image scores"
        if len(family) < 2:
            continue
        ref = leader.per_image[m]
        for e in family[1:]:
            try:
                c = paired_comparison_by_id(e.per_image[m], ref, metric=m, higher_is_better=HIGHER_IS_BETTER[m],
                                            n_resamples=1, n_permutations=n_permutations, seed=seed)
            except ValueError:
                continue
            e.p_vs_best[m], e.p_exact[m] = c.p_value, c.exact
        finite = [{i for i, v in f.per_image[m].items() if not math.isnan(v)} for f in family]
        ids = sorted(set.intersection(*finite))
        if not ids:
            for e in family[1:]:
                e.not_tested[m] = f"no image has a {m} score in every run of the group"
            continue
        scores = np.array([[f.per_image[m][i] for f in family] for i in ids], dtype=np.float64)
        result = max_statistic_p_values(scores, reference=0, n_permutations=n_permutations, seed=seed)
        for j, e in enumerate(family[1:], start=1):
            e.p_adjusted[m] = float(result.p_adjusted[j])
            e.n_compared[m] = len(ids)


def cell_mark(entry: LeaderboardEntry, metric: str, alpha: float = DEFAULT_ALPHA) -> str:
    """The mark of one cell after :func:`compare_to_best`.

    Returns
    -------
    str
        ``"best"`` (the group's best run on the metric: the reference), ``"n.s."`` (not
        distinguishable from the best at ``alpha``, family-wise adjusted — not evidence that
        the two are equal), ``"differs"`` (different from the best at ``alpha``, adjusted),
        ``"n.t."`` (not tested: this run or the best run has no per-image scores) or ``""``
        (nothing to compare: one run, or no score).
    """
    if metric in entry.best_of:
        return BEST
    if metric in entry.not_tested:
        return NOT_TESTED
    p = entry.p_adjusted.get(metric)
    if p is None:
        return ""
    return NOT_DISTINGUISHABLE if p >= alpha else DIFFERS


def _check_sort(sort: str | None) -> str | None:
    if sort is None or sort == "rank":
        return None
    if sort not in ALL_METRICS:
        raise DataError(
            f"Unknown sort key {sort!r}. Valid: 'rank' (mean rank over metrics), "
            f"{', '.join(map(repr, ALL_METRICS))}."
        )
    return sort


def _present(entry: LeaderboardEntry, metric: str) -> bool:
    v = entry.scores.get(metric)
    return v is not None and not math.isnan(v)


def rank_group(entries: list[LeaderboardEntry], sort: str | None = None) -> list[LeaderboardEntry]:
    """Order one group of comparable runs and set their ``rank``.

    Parameters
    ----------
    entries : list of LeaderboardEntry
        Runs of one group.
    sort : str, optional
        A metric name (ranked in its own direction); default: mean over metrics of each
        run's rank on that metric (ties share the better rank), lower is better.

    Returns
    -------
    list of LeaderboardEntry
        Best first; runs with nothing to rank on come last without a rank.
    """
    sort = _check_sort(sort)

    def metric_key(e: LeaderboardEntry, m: str) -> float:
        v = e.scores[m]
        return -v if HIGHER_IS_BETTER[m] else v

    if sort is not None:
        have = [e for e in entries if _present(e, sort)]
        rest = [e for e in entries if not _present(e, sort)]
        have.sort(key=lambda e: metric_key(e, sort))
    else:
        mean_rank: dict[int, float] = {}
        for e in entries:
            ranks = []
            for m in ALL_METRICS:
                if not _present(e, m):
                    continue
                others = [o for o in entries if _present(o, m)]
                ranks.append(1 + sum(metric_key(o, m) < metric_key(e, m) for o in others))
            if ranks:
                mean_rank[id(e)] = sum(ranks) / len(ranks)
        have = sorted((e for e in entries if id(e) in mean_rank), key=lambda e: (mean_rank[id(e)], e.name))
        rest = [e for e in entries if id(e) not in mean_rank]
    for i, e in enumerate(have, start=1):
        e.rank = i
    for e in rest:
        e.rank = None
    return have + rest


def _groups(entries: list[LeaderboardEntry], sort: str | None) -> list[tuple[str, list[LeaderboardEntry]]]:
    by_key: dict[tuple, list[LeaderboardEntry]] = {}
    for e in entries:
        by_key.setdefault(e.group_key, []).append(e)
    groups = []
    # NSD groups first, then other data; unevaluated groups last.
    for key in sorted(by_key, key=lambda k: (k[4] is None, not by_key[k][0].is_nsd, by_key[k][0].group_label)):
        members = rank_group(by_key[key], sort)
        groups.append((members[0].group_label, members))
    return groups



def _best(members: list[LeaderboardEntry]) -> dict[str, float]:
    best = {}
    for m in ALL_METRICS:
        vals = [e.scores[m] for e in members if _present(e, m)]
        if len(vals) > 1:
            best[m] = max(vals) if HIGHER_IS_BETTER[m] else min(vals)
    return best
