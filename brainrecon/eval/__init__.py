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
- :mod:`brainrecon.eval.harness` — :func:`evaluate`.
- :mod:`brainrecon.eval.report` — :class:`EvalReport`, the metric names, ``metrics.json`` and
  the per-image table.
- :mod:`brainrecon.eval.preprocess` — each recipe's resizing and normalisation.
- :mod:`brainrecon.eval.feature_cache` — the ground-truth feature cache.
- :mod:`brainrecon.eval.published` — published reference scores, with citations.

Arrays in, report out: this package knows nothing of decoders or run directories.
Evaluating a run is :func:`brainrecon.workflows.evaluate.evaluate_run`.
"""

from brainrecon.eval.names import (
    ALL_METRICS,
    DISTANCE_METRICS,
    LOW_LEVEL_METRICS,
    METRICS,
    RETRIEVAL_METRICS,
    TWO_WAY_METRICS,
)
from brainrecon.extras import lazy_exports

# The rest is imported when first used, so that reading the metric names (the command line's
# choices, the leaderboard) does not load torch and the feature networks.
_LAZY = {
    "evaluate": "brainrecon.eval.harness",
    "EvalReport": "brainrecon.eval.report",
    "HIGHER_IS_BETTER": "brainrecon.eval.report",
    "VARIANTS": "brainrecon.eval.report",
    "correlation_distance": "brainrecon.eval.metrics",
    "pixcorr": "brainrecon.eval.metrics",
    "ssim": "brainrecon.eval.metrics",
    "two_way_identification": "brainrecon.eval.metrics",
    "WEIGHT_FILES": "brainrecon.eval.weights",
    "weights_status": "brainrecon.eval.weights",
}


__getattr__ = lazy_exports(__name__, _LAZY)


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
    "pixcorr",
    "ssim",
    "two_way_identification",
    "weights_status",
]
