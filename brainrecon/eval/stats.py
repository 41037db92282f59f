"""Uncertainty of evaluation scores and paired comparisons between runs.

Every NSD metric is a mean over test images of a per-image score: PixCorr, SSIM and the
correlation distances per image, and for two-way identification, per reconstruction, the
fraction of the other N - 1 ground-truth images it beats. So

- :func:`bootstrap_interval` gives a percentile bootstrap interval of a metric by
  resampling images (seeded; the number of resamples is recorded in every report);
- :func:`paired_comparison` compares two runs scored on the same images through their
  per-image differences: a paired bootstrap interval of the mean difference, a two-sided
  sign-flip permutation p-value, and how many images each run wins.

A two-way score of one image depends on the other images of the set (they are its
distractors); resampling the per-image fractions treats them as independent, the usual
approximation. Its intervals are therefore approximate for the two-way metrics, and
exact in the sense of a plain bootstrap for the others.

>>> import numpy as np
>>> lo, hi = bootstrap_interval(np.linspace(0, 1, 101), seed=0)
>>> bool(lo < 0.5 < hi)
True
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

__all__ = [
    "BOOTSTRAP_METHOD",
    "DEFAULT_CONFIDENCE",
    "DEFAULT_RESAMPLES",
    "DEFAULT_SEED",
    "TWO_WAY_APPROXIMATION",
    "PairedComparison",
    "bootstrap_interval",
    "paired_comparison",
]

DEFAULT_RESAMPLES = 2000
DEFAULT_PERMUTATIONS = 10000
DEFAULT_CONFIDENCE = 0.95
DEFAULT_SEED = 0
BOOTSTRAP_METHOD = "percentile bootstrap over test images"
TWO_WAY_APPROXIMATION = (
    "two-way identification: the per-image fractions are resampled as if independent, "
    "although each image's distractors are the other images of the set (an approximation)"
)
# Resamples drawn per block: bounds the index matrix to ~8M entries at N = 982.
_BLOCK = 8192


def _values(values) -> np.ndarray:
    v = np.asarray(values, dtype=np.float64).ravel()
    if v.size == 0:
        raise ValueError("no per-image values to resample")
    return v


def _resampled_means(values: np.ndarray, n_resamples: int, rng: np.random.Generator) -> np.ndarray:
    n = values.size
    out = np.empty(n_resamples, dtype=np.float64)
    step = max(1, _BLOCK * 1000 // max(n, 1))
    for s in range(0, n_resamples, step):
        k = min(step, n_resamples - s)
        idx = rng.integers(0, n, size=(k, n))
        out[s : s + k] = values[idx].mean(axis=1)
    return out


def bootstrap_interval(
    values,
    *,
    n_resamples: int = DEFAULT_RESAMPLES,
    confidence: float = DEFAULT_CONFIDENCE,
    seed: int = DEFAULT_SEED,
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (one value per image).

    Parameters
    ----------
    values : array of shape (n_images,)
    n_resamples : int
    confidence : float
        E.g. 0.95 for a 95 % interval.
    seed : int
        Same seed, same interval.

    Returns
    -------
    (lo, hi) : tuple of float
        NaN, NaN when any value is NaN (a metric that is NaN has no interval).
    """
    v = _values(values)
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if np.isnan(v).any():
        return float("nan"), float("nan")
    means = _resampled_means(v, int(n_resamples), np.random.default_rng(seed))
    alpha = (1 - confidence) / 2
    lo, hi = np.quantile(means, [alpha, 1 - alpha])
    return float(lo), float(hi)


@dataclass(frozen=True)
class PairedComparison:
    """Run A against run B on one metric, over the images both were scored on.

    ``diff`` is mean(A) - mean(B) in the metric's own units; ``better`` names the run the
    metric's direction favours ("a", "b" or "tie"); ``wins_a`` / ``wins_b`` count images
    where that run's score is better (ties are neither); ``p_value`` is two-sided.
    """

    metric: str
    n_images: int
    mean_a: float
    mean_b: float
    diff: float
    diff_lo: float
    diff_hi: float
    p_value: float
    wins_a: int
    wins_b: int
    ties: int
    better: str
    n_resamples: int
    n_permutations: int
    seed: int

    def significant(self, alpha: float = 0.05) -> bool:
        """Whether the difference is significant at level ``alpha``."""
        return bool(self.p_value < alpha)

    def to_dict(self) -> dict:
        return asdict(self)


def paired_comparison(
    a,
    b,
    *,
    metric: str = "",
    higher_is_better: bool = True,
    n_resamples: int = DEFAULT_RESAMPLES,
    n_permutations: int = DEFAULT_PERMUTATIONS,
    confidence: float = DEFAULT_CONFIDENCE,
    seed: int = DEFAULT_SEED,
) -> PairedComparison:
    """Compare two runs' per-image scores on the same images (same order).

    The interval of the mean difference is a paired percentile bootstrap (images
    resampled, both runs together); the p-value is a two-sided sign-flip permutation test
    of "the per-image differences are symmetric about zero": each difference's sign is
    flipped at random, and p = (1 + #{|mean of flipped| >= |observed mean|}) / (1 + P).

    Parameters
    ----------
    a, b : array of shape (n_images,)
        Per-image scores of run A and run B, aligned by image.
    metric : str
        Only recorded.
    higher_is_better : bool
        The metric's direction (decides ``better`` and the wins).
    n_resamples, n_permutations : int
    confidence : float
    seed : int

    Returns
    -------
    PairedComparison
    """
    va, vb = _values(a), _values(b)
    if va.shape != vb.shape:
        raise ValueError(f"paired comparison needs scores of the same images: {va.size} against {vb.size}")
    keep = ~(np.isnan(va) | np.isnan(vb))
    va, vb = va[keep], vb[keep]
    if va.size == 0:
        raise ValueError(f"no image has a score in both runs for {metric or 'this metric'}")
    d = va - vb
    n = d.size
    obs = float(d.mean())
    rng = np.random.default_rng(seed)
    boot = _resampled_means(d, int(n_resamples), rng)
    alpha = (1 - confidence) / 2
    lo, hi = (float(x) for x in np.quantile(boot, [alpha, 1 - alpha]))
    n_perm = int(n_permutations)
    extreme = 0
    tol = 1e-12 * max(1.0, abs(obs))
    step = max(1, _BLOCK * 1000 // n)
    for s in range(0, n_perm, step):
        k = min(step, n_perm - s)
        signs = rng.integers(0, 2, size=(k, n), dtype=np.int8) * 2 - 1
        means = (signs * d).mean(axis=1)
        extreme += int((np.abs(means) >= abs(obs) - tol).sum())
    p = (1 + extreme) / (1 + n_perm)
    better_a = d > 0 if higher_is_better else d < 0
    better_b = d < 0 if higher_is_better else d > 0
    wins_a, wins_b = int(better_a.sum()), int(better_b.sum())
    if obs == 0:
        better = "tie"
    else:
        better = "a" if (obs > 0) == higher_is_better else "b"
    return PairedComparison(
        metric=metric, n_images=n, mean_a=float(va.mean()), mean_b=float(vb.mean()), diff=obs,
        diff_lo=lo, diff_hi=hi, p_value=float(p), wins_a=wins_a, wins_b=wins_b, ties=n - wins_a - wins_b,
        better=better, n_resamples=int(n_resamples), n_permutations=n_perm, seed=int(seed),
    )
