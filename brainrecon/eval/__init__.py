"""Evaluation: the eight NSD reconstruction metrics, one harness for every decoder.

>>> from brainrecon.eval import evaluate
>>> report = evaluate(gt_images, reconstructions)          # doctest: +SKIP
>>> report["CLIP"], report.unavailable                      # doctest: +SKIP

- :mod:`brainrecon.eval.metrics` — pure functions (PixCorr, SSIM, two-way
  identification, correlation distance, 300-way retrieval), no weights.
- :mod:`brainrecon.eval.stats` — bootstrap intervals, paired tests, the leaderboard's
  family-wise (max-statistic) adjustment.
- :mod:`brainrecon.eval.extractors` — the feature networks.
- :mod:`brainrecon.eval.weights` — where weight files are found and fetched.
- :mod:`brainrecon.eval.harness` — :func:`evaluate`, :class:`EvalReport`, :func:`evaluate_run`.
- :mod:`brainrecon.eval.published` — published reference scores, with citations.

This package knows nothing of decoders; :func:`evaluate_run` reads run directories.
"""

from brainrecon.eval.harness import (
    ALL_METRICS,
    DISTANCE_METRICS,
    HIGHER_IS_BETTER,
    LOW_LEVEL_METRICS,
    METRICS,
    RETRIEVAL_METRICS,
    TWO_WAY_METRICS,
    VARIANTS,
    EvalReport,
    evaluate,
    evaluate_run,
)
from brainrecon.eval.metrics import (
    correlation_distance,
    pixcorr,
    ssim,
    two_way_identification,
)
from brainrecon.eval.weights import WEIGHT_FILES, weights_status

__all__ = [
    "ALL_METRICS",
    "DISTANCE_METRICS",
    "HIGHER_IS_BETTER",
    "LOW_LEVEL_METRICS",
    "METRICS",
    "RETRIEVAL_METRICS",
    "TWO_WAY_METRICS",
    "VARIANTS",
    "WEIGHT_FILES",
    "EvalReport",
    "correlation_distance",
    "evaluate",
    "evaluate_run",
    "pixcorr",
    "ssim",
    "two_way_identification",
    "weights_status",
]
