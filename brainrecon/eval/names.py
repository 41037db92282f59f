"""The names of the evaluation's metrics, defined once: the harness, the report, the published
reference rows, the leaderboard and the command line all take them from here.

Nothing is imported here, so any layer can read the names without loading the evaluation's
networks.
"""

from __future__ import annotations

#: The eight NSD reconstruction metrics, in the order papers print them.
METRICS: tuple[str, ...] = ("PixCorr", "SSIM", "AlexNet(2)", "AlexNet(5)", "Inception", "CLIP", "EffNet-B", "SwAV")
LOW_LEVEL_METRICS = ("PixCorr", "SSIM")
#: Two-way identification (fractions, 0.5 = chance).
TWO_WAY_METRICS = ("AlexNet(2)", "AlexNet(5)", "Inception", "CLIP")
#: Correlation distances (lower is better).
DISTANCE_METRICS = ("EffNet-B", "SwAV")
# Brain <-> image retrieval (MindEye's 300-way top-1), in both directions: "ImageRet" asks, for
# each prediction, whether its own image is the most similar of the candidates (which image did
# the brain see?); "BrainRet" asks, for each image, whether its own prediction is.
TARGET_RETRIEVAL_METRICS = ("ImageRet(target)", "BrainRet(target)")  # in the decoder's target space
CLIP_RETRIEVAL_METRICS = ("ImageRet(CLIP)", "BrainRet(CLIP)")  # CLIP image space, reconstructions vs GT
RETRIEVAL_METRICS = TARGET_RETRIEVAL_METRICS + CLIP_RETRIEVAL_METRICS
#: The eight NSD metrics, then the retrieval metrics: every column a report can have.
ALL_METRICS: tuple[str, ...] = METRICS + RETRIEVAL_METRICS

__all__ = [
    "ALL_METRICS",
    "CLIP_RETRIEVAL_METRICS",
    "DISTANCE_METRICS",
    "LOW_LEVEL_METRICS",
    "METRICS",
    "RETRIEVAL_METRICS",
    "TARGET_RETRIEVAL_METRICS",
    "TWO_WAY_METRICS",
]
