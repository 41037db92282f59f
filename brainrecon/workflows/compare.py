"""Two runs compared statistically, metric by metric, over the test images they share.

>>> from brainrecon.workflows.compare import paired_stats
>>> result = paired_stats("runs/ridge-subj01-pixels", "runs/brainguard-subj01-pixels")  # doctest: +SKIP
>>> result.rows[0].metric, result.rows[0].comparison.p_value                           # doctest: +SKIP

The p-value of a pair is :func:`brainrecon.eval.stats.paired_comparison_by_id`'s, the same number
the leaderboard shows as ``p_vs_best`` for the same pair and seed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from brainrecon.errors import BrainreconError
from brainrecon.eval.report import ALL_METRICS, HIGHER_IS_BETTER
from brainrecon.eval.stats import paired_comparison_by_id
from brainrecon.runs import Run
from brainrecon.workflows.evaluate import run_scores_by_id


@dataclass
class PairedRow:
    """One metric compared: the paired comparison (means, difference and interval, p, N, wins)."""

    metric: str
    comparison: object


@dataclass
class PairedStats:
    """The comparison of runs ``a`` and ``b``: one row per metric both scored, and one note per
    metric not compared or compared on fewer images (and why)."""

    a: Run
    b: Run
    rows: list[PairedRow] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def paired_stats(run_a: str | Path | Run, run_b: str | Path | Run, seed: int = 0) -> PairedStats:
    """Compare two runs on every metric both were scored on, image by image (matched by test id).

    Raises
    ------
    BrainreconError
        The runs share no scored test image on any metric.
    """
    a, b = (r if isinstance(r, Run) else Run.open(r) for r in (run_a, run_b))
    scores = [run_scores_by_id(a), run_scores_by_id(b)]
    unavailable = [dict(getattr(r.metrics(), "unavailable", None) or {}) for r in (a, b)]
    out = PairedStats(a, b)
    for m in ALL_METRICS:
        have = [m in scores[0], m in scores[1]]
        if not all(have):
            if any(have) or m in unavailable[0] or m in unavailable[1]:
                why = [f"unavailable in {side} ({un[m]})" if m in un else f"not scored in {side}"
                       for side, ok, un in (("A", have[0], unavailable[0]), ("B", have[1], unavailable[1])) if not ok]
                out.notes.append(f"{m}: {', '.join(why)}; not compared")
            continue
        try:
            c = paired_comparison_by_id(scores[0][m], scores[1][m], metric=m, higher_is_better=HIGHER_IS_BETTER[m],
                                        seed=seed)
        except ValueError:
            out.notes.append(f"{m}: no test image has a score in both runs; not compared")
            continue
        total = len(set(scores[0][m]) | set(scores[1][m]))
        if total > c.n_images:
            d = c.dropped
            why = [f"{count} {text}" for count, text in ((d.get("a", 0), "without a score in A (NaN)"),
                                                         (d.get("b", 0), "without a score in B (NaN)"),
                                                         (d.get("only_a", 0), "scored only in A"),
                                                         (d.get("only_b", 0), "scored only in B")) if count]
            out.notes.append(f"{m}: {total - c.n_images} of {total} images dropped ({', '.join(why)})")
        out.rows.append(PairedRow(m, c))
    if not out.rows:
        raise BrainreconError(f"Runs {a.name!r} and {b.name!r} share no scored test image on any metric.")
    return out


__all__ = ["PairedRow", "PairedStats", "paired_stats"]
