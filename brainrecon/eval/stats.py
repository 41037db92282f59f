"""Uncertainty of evaluation scores and paired comparisons between runs.

Every NSD metric is a mean over test images of a per-image score: PixCorr, SSIM and the
correlation distances per image, and for two-way identification, per reconstruction, the
fraction of the other N - 1 ground-truth images it beats. So

- :func:`bootstrap_interval` gives a percentile bootstrap interval of a metric by
  resampling images (seeded; the number of resamples is recorded in every report);
- :func:`paired_comparison` compares two runs scored on the same images through their
  per-image differences: a paired bootstrap interval of the mean difference, a two-sided
  sign-flip permutation p-value (:func:`sign_flip_p_value`, exact for small N), and how many
  images each run wins; :func:`paired_comparison_by_id` does it for scores keyed by image id,
  in one canonical order, so every caller gets the same p-value for the same pair and seed;
- :func:`max_statistic_p_values` compares K runs with one reference run (e.g. the best, chosen
  after looking) and controls the family-wise error: single-step max-statistic permutation test
  over all pairs of runs (Westfall & Young 1993, *Resampling-Based Multiple Testing*, Wiley;
  Nichols & Holmes 2002, *Hum. Brain Mapp.* 15:1-25).

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

import math
from dataclasses import asdict, dataclass, field

import numpy as np

__all__ = [
    "BOOTSTRAP_METHOD",
    "DEFAULT_CONFIDENCE",
    "DEFAULT_RESAMPLES",
    "DEFAULT_SEED",
    "TWO_WAY_APPROXIMATION",
    "EXACT_MAX_IMAGES",
    "MULTIPLICITY_METHOD",
    "MaxStatisticResult",
    "PairedComparison",
    "bootstrap_interval",
    "format_p_value",
    "max_statistic_p_values",
    "paired_comparison",
    "paired_comparison_by_id",
    "sign_flip_p_value",
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
#: Up to this many images (2**13 = 8192 sign patterns, fewer than the default 10000 random
#: ones) the sign-flip test enumerates every pattern: an exact p-value, no seed involved.
EXACT_MAX_IMAGES = 13
MULTIPLICITY_METHOD = (
    "single-step max-statistic permutation test over all pairs of the group's runs (run labels "
    "permuted within each image; Westfall & Young 1993; Nichols & Holmes 2002)"
)
# The permutation draws come from their own stream of the seed, apart from the bootstrap's, so
# a p-value does not depend on whether (or how many) bootstrap resamples were drawn before it.
_SIGN_STREAM = 1
_MAX_STREAM = 2


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
    exact: bool = False
    #: Images left out because a run has no score for them: {"a": n, "b": n} (NaN or not scored).
    dropped: dict = field(default_factory=dict)

    def significant(self, alpha: float = 0.05) -> bool:
        """Whether the difference is significant at level ``alpha``."""
        return bool(self.p_value < alpha)

    def to_dict(self) -> dict:
        return asdict(self)


def sign_flip_p_value(diffs, *, n_permutations: int = DEFAULT_PERMUTATIONS, seed: int = DEFAULT_SEED
                      ) -> tuple[float, bool]:
    """Two-sided sign-flip permutation p-value of "the per-image differences are symmetric about 0".

    Every caller (leaderboard, ``compare --stats``, the CSV) gets its p-values from here, so the
    same differences, permutations and seed give the same number everywhere.

    Parameters
    ----------
    diffs : array of shape (n_images,)
        Per-image differences, no NaN, in a fixed order (e.g. sorted by image id).
    n_permutations : int
        Random sign patterns P; with ``2**n_images <= P + 1`` (n <= 13 for the default 10000)
        every pattern is enumerated instead.
    seed : int

    Returns
    -------
    (p, exact) : (float, bool)
        Monte Carlo: p = (1 + #{|mean of flipped| >= |observed mean|}) / (1 + P), never below
        1 / (P + 1); exact: the fraction of all 2**n patterns (the observed one included).
    """
    d = _values(diffs)
    if np.isnan(d).any():
        raise ValueError("sign_flip_p_value needs differences without NaN (drop those images first)")
    n = d.size
    obs = abs(float(d.mean()))
    tol = 1e-12 * max(1.0, obs)
    n_perm = int(n_permutations)
    if n <= EXACT_MAX_IMAGES and 2 ** n <= n_perm + 1:
        codes = np.arange(2 ** n, dtype=np.int64)[:, None]
        signs = ((codes >> np.arange(n)) & 1) * 2 - 1
        means = (signs * d).mean(axis=1)
        return float(np.mean(np.abs(means) >= obs - tol)), True
    rng = np.random.default_rng([int(seed), _SIGN_STREAM])
    extreme = 0
    step = max(1, _BLOCK * 1000 // n)
    for s in range(0, n_perm, step):
        k = min(step, n_perm - s)
        signs = rng.integers(0, 2, size=(k, n), dtype=np.int8) * 2 - 1
        means = (signs * d).mean(axis=1)
        extreme += int((np.abs(means) >= obs - tol).sum())
    return (1 + extreme) / (1 + n_perm), False


def format_p_value(p: float, n_permutations: int, exact: bool = False) -> str:
    """A p-value as printed everywhere: 4 significant digits, or ``< 1/(P+1)`` at the floor of a
    Monte Carlo test with P permutations (the test cannot say more than that)."""
    if p is None or (isinstance(p, float) and math.isnan(p)):
        return "–"
    if not exact and p <= 1 / (int(n_permutations) + 1) * (1 + 1e-9):
        return f"< 1/{int(n_permutations) + 1}"
    return f"{p:.4g}"


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
    resampled, both runs together); the p-value is :func:`sign_flip_p_value`, drawn from its
    own stream of ``seed`` (the same whatever ``n_resamples`` is, and the same for A - B as
    for B - A). Images where either run has no score (NaN) are left out and counted in
    ``dropped``.

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
    nan_a, nan_b = np.isnan(va), np.isnan(vb)
    dropped = {"a": int(nan_a.sum()), "b": int((nan_b & ~nan_a).sum())}
    keep = ~(nan_a | nan_b)
    va, vb = va[keep], vb[keep]
    if va.size == 0:
        raise ValueError(f"no image has a score in both runs for {metric or 'this metric'}")
    d = va - vb
    n = d.size
    obs = float(d.mean())
    alpha = (1 - confidence) / 2
    if int(n_resamples) > 1:
        boot = _resampled_means(d, int(n_resamples), np.random.default_rng(seed))
        lo, hi = (float(x) for x in np.quantile(boot, [alpha, 1 - alpha]))
    else:  # no interval asked for (the leaderboard needs only the p-value)
        lo = hi = float("nan")
    p, exact = sign_flip_p_value(d, n_permutations=n_permutations, seed=seed)
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
        better=better, n_resamples=int(n_resamples), n_permutations=int(n_permutations), seed=int(seed),
        exact=exact, dropped=dropped,
    )


def paired_comparison_by_id(a: dict, b: dict, **kwargs) -> PairedComparison:
    """:func:`paired_comparison` of scores keyed by image id (``{id: score}``).

    Images are matched by id and taken in ascending id order, whatever order each run stored
    them in, so the leaderboard, ``compare --stats`` and the CSV compute the same p-value for
    the same pair and seed. ``dropped`` also counts the images only one run was scored on
    (``"only_a"``, ``"only_b"``).
    """
    shared = sorted(set(a) & set(b))
    if not shared:
        raise ValueError(f"the two runs share no scored image for {kwargs.get('metric') or 'this metric'}")
    c = paired_comparison([a[i] for i in shared], [b[i] for i in shared], **kwargs)
    c.dropped.update({"only_a": len(set(a) - set(b)), "only_b": len(set(b) - set(a))})
    return c


@dataclass(frozen=True)
class MaxStatisticResult:
    """Adjusted p-values of K runs against one reference run (see :func:`max_statistic_p_values`)."""

    p_adjusted: np.ndarray
    n_images: int
    n_permutations: int
    exact: bool
    method: str = MULTIPLICITY_METHOD


def max_statistic_p_values(
    scores,
    *,
    reference: int,
    n_permutations: int = DEFAULT_PERMUTATIONS,
    seed: int = DEFAULT_SEED,
) -> MaxStatisticResult:
    """Family-wise adjusted p-values of every run against ``reference`` (e.g. the best run).

    Single-step max-statistic permutation test: under the null hypothesis that the K runs are
    exchangeable on every image, their labels are permuted independently within each image;
    the statistic of a permutation is the largest absolute difference between any two runs'
    mean scores (the range of the K means). The adjusted p-value of run k is the fraction of
    permutations whose range reaches ``|mean(reference) - mean(k)|`` (counting the observed
    one). Because the maximum is taken over all pairs, choosing the reference after looking
    at the means (the best run) does not inflate the error: the chance that any run is
    declared different at ``alpha`` when all K are equal is at most ``alpha``; under
    partial nulls the control is strong under subset pivotality (Westfall & Young 1993;
    Nichols & Holmes 2002). For K = 2 it is the two-sided sign-flip test itself
    (:func:`sign_flip_p_value`, same stream, same number); when all (K!)**N relabellings are
    no more than ``n_permutations + 1`` they are enumerated (exact).

    Parameters
    ----------
    scores : array of shape (n_images, K)
        Per-image scores of K runs on the same images (no NaN), in a fixed image order.
    reference : int
        Column of the reference run.
    n_permutations : int
    seed : int

    Returns
    -------
    MaxStatisticResult
        ``p_adjusted[reference]`` is NaN.
    """
    x = np.asarray(scores, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] < 2 or x.shape[0] < 1:
        raise ValueError(f"scores must have shape (n_images, K >= 2), got {x.shape}")
    if np.isnan(x).any():
        raise ValueError("max_statistic_p_values needs scores without NaN (drop those images first)")
    n, k = x.shape
    n_perm = int(n_permutations)
    means = x.mean(axis=0)
    obs = np.abs(means[reference] - means)
    p = np.full(k, np.nan)
    if k == 2:
        other = 1 - reference
        p[other], exact = sign_flip_p_value(x[:, other] - x[:, reference], n_permutations=n_perm, seed=seed)
        return MaxStatisticResult(p, n, n_perm, exact)
    tol = 1e-12 * max(1.0, float(np.abs(means).max()))
    others = [j for j in range(k) if j != reference]
    if math.factorial(k) ** n <= n_perm + 1:
        import itertools

        perms = np.array(list(itertools.permutations(range(k))))
        ranges = []
        for combo in itertools.product(range(len(perms)), repeat=n):
            relabelled = x[np.arange(n)[:, None], perms[list(combo)]].mean(axis=0)
            ranges.append(relabelled.max() - relabelled.min())
        ranges = np.asarray(ranges)
        for j in others:
            p[j] = float(np.mean(ranges >= obs[j] - tol))
        return MaxStatisticResult(p, n, n_perm, True)
    rng = np.random.default_rng([int(seed), _MAX_STREAM])
    counts = np.zeros(k, dtype=np.int64)
    step = max(1, _BLOCK * 1000 // (n * k))
    for s in range(0, n_perm, step):
        b = min(step, n_perm - s)
        # A uniform random permutation of the K labels of every image: the order of K random keys.
        order = np.argsort(rng.random((b, n, k), dtype=np.float32), axis=2)
        relabelled = np.take_along_axis(np.broadcast_to(x, (b, n, k)), order, axis=2).mean(axis=1)
        ranges = relabelled.max(axis=1) - relabelled.min(axis=1)
        counts += (ranges[:, None] >= obs[None, :] - tol).sum(axis=0)
    for j in others:
        p[j] = (1 + counts[j]) / (1 + n_perm)
    return MaxStatisticResult(p, n, n_perm, False)
