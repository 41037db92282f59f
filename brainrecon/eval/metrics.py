"""The four weight-free computations behind the eight NSD reconstruction metrics.

Every function here is pure: arrays in, numbers out, no network weights and no
preprocessing. The harness (:mod:`brainrecon.eval.harness`) brings images to the
size each metric is computed at and turns images into features; these functions
only score. The recipe is the one of MindEye's and Brain-Diffuser's evaluation code:

- :func:`pixcorr` — mean per-image Pearson correlation of all pixels, all channels.
- :func:`ssim` — mean grayscale SSIM with Gaussian weights (sigma 1.5, truncate
  3.5, ``reflect`` borders), population covariances, data range 1, map cropped by
  5 px before averaging; ``mode="2d"`` (scikit-image >= 0.20 semantics, MindEye) or
  ``mode="columnwise"`` (scikit-image 0.17 ``multichannel=True`` on a gray image,
  Brain-Diffuser).
- :func:`two_way_identification` — for each reconstruction, the fraction of the
  other ground-truth images it correlates with *strictly* less than with its own.
- :func:`correlation_distance` — mean over pairs of ``1 - r``.
- :func:`retrieval_per_image` — MindEye's 300-way top-1 retrieval: for each query (a
  prediction, or a true target), the chance that its own counterpart is the most
  cosine-similar one in a random set of ``min(300, N)`` candidates containing it;
  :func:`retrieval_sampled` is MindEye's loop over 30 seeded random subsets.

Each function accepts numpy arrays or torch tensors. Numpy input is computed on
the CPU (SSIM through :func:`scipy.ndimage.correlate1d`, fastest there); a torch
tensor is computed with torch on the tensor's device, so the harness can keep
everything on a GPU. All arithmetic is float64 whatever the input dtype, as in
the reference code (``np.corrcoef``).
"""

from __future__ import annotations

import numpy as np
import scipy.ndimage as ndi
import torch

__all__ = [
    "GRAY_WEIGHTS",
    "correlation_distance",
    "correlation_distance_per_pair",
    "RETRIEVAL_REPEATS",
    "RETRIEVAL_WAY",
    "pixcorr",
    "pixcorr_per_image",
    "retrieval_per_image",
    "retrieval_sampled",
    "ssim",
    "ssim_per_image",
    "two_way_identification",
    "two_way_per_reconstruction",
]

# Luma weights of scikit-image ``rgb2gray`` (ITU-R BT.709), which every NSD paper uses.
GRAY_WEIGHTS = (0.2125, 0.7154, 0.0721)

SSIM_SIGMA = 1.5
SSIM_TRUNCATE = 3.5
SSIM_RADIUS = int(SSIM_TRUNCATE * SSIM_SIGMA + 0.5)  # 5 -> an 11-tap window
SSIM_MODES = ("2d", "columnwise")

# Float64 working blocks of the identification matrix of ~64 MB each: at N = 982 on AlexNet(2)
# features this took the scoring's peak from 2.97 GB to 2.23 GB (features alone: 1.91 GB),
# at no cost in time (benchmarks/eval.py).
_BLOCK_ELEMENTS = 2**23

# MindEye1 (src/Retrievals.py @6b30ea53) and MindEye2 (src/final_evaluations.ipynb @c1847188):
# top-1 among 300 candidates, averaged over 30 random subsets of the test set.
RETRIEVAL_WAY = 300
RETRIEVAL_REPEATS = 30


def _is_torch(*arrays) -> bool:
    return any(isinstance(a, torch.Tensor) for a in arrays)


def _check_pair(gt, rec, ndim: int | None, what: str) -> None:
    if tuple(gt.shape) != tuple(rec.shape):
        raise ValueError(
            f"{what}: ground truth has shape {tuple(gt.shape)} but reconstructions have "
            f"shape {tuple(rec.shape)}; they must match."
        )
    if ndim is not None and gt.ndim != ndim:
        raise ValueError(f"{what}: expected arrays with {ndim} dimensions, got shape {tuple(gt.shape)}.")
    if gt.shape[0] == 0:
        raise ValueError(f"{what}: got zero images.")


def _rows_pearson(a, b):
    """Pearson r between matching rows of two (N, D) arrays, float64 (numpy or torch)."""
    if _is_torch(a, b):
        a = torch.as_tensor(a).to(torch.float64)
        b = torch.as_tensor(b, device=a.device).to(torch.float64)
        a = a - a.mean(dim=1, keepdim=True)
        b = b - b.mean(dim=1, keepdim=True)
        num = (a * b).sum(dim=1)
        den = torch.sqrt((a * a).sum(dim=1) * (b * b).sum(dim=1))
        return (num / den).cpu().numpy()
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    a = a - a.mean(axis=1, keepdims=True)
    b = b - b.mean(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.einsum("nd,nd->n", a, b) / np.sqrt(np.einsum("nd,nd->n", a, a) * np.einsum("nd,nd->n", b, b))


# ----------------------------------------------------------------------------- PixCorr


def pixcorr_per_image(gt, rec) -> np.ndarray:
    """Pearson correlation of all pixels of each image pair.

    Parameters
    ----------
    gt, rec : array of shape (n_images, 3, H, W)
        Float images in [0, 1] at the resolution PixCorr is computed at (425 x 425 in
        the published recipe). Numpy arrays or torch tensors.

    Returns
    -------
    r : float64 array of shape (n_images,)
        NaN for a pair in which one image is constant (as ``np.corrcoef``).
    """
    _check_pair(gt, rec, 4, "pixcorr")
    n = gt.shape[0]
    return _rows_pearson(gt.reshape(n, -1), rec.reshape(n, -1))


def pixcorr(gt, rec) -> float:
    """PixCorr: mean over images of the per-image Pearson r of all pixels (↑).

    Parameters
    ----------
    gt, rec : array of shape (n_images, 3, H, W)
        Float images in [0, 1], same order, already at the metric's resolution.

    Returns
    -------
    float
    """
    return float(np.mean(pixcorr_per_image(gt, rec)))


# ----------------------------------------------------------------------------- SSIM


def _gaussian_taps() -> np.ndarray:
    x = np.arange(-SSIM_RADIUS, SSIM_RADIUS + 1, dtype=np.float64)
    taps = np.exp(-0.5 * (x / SSIM_SIGMA) ** 2)
    return taps / taps.sum()


def _to_gray(images):
    """(N, 3, H, W) RGB -> (N, H, W) float64 luma."""
    w = GRAY_WEIGHTS
    if isinstance(images, torch.Tensor):
        images = images.to(torch.float64)
    else:
        images = np.asarray(images, dtype=np.float64)
    return w[0] * images[:, 0] + w[1] * images[:, 1] + w[2] * images[:, 2]


def _smooth_numpy(stack: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
    taps = _gaussian_taps()
    for axis in axes:
        stack = ndi.correlate1d(stack, taps, axis=axis, mode="reflect")
    return stack


def _smooth_torch(stack: torch.Tensor, axes: tuple[int, ...]) -> torch.Tensor:
    # Weighted sum of shifted views after symmetric padding: scipy's "reflect"
    # border (d c b a | a b c d | d c b a) has no torch.nn.functional.pad equivalent.
    taps = _gaussian_taps().tolist()
    r = SSIM_RADIUS
    for axis in axes:
        n = stack.shape[axis]
        if n < r:
            raise ValueError(f"ssim: images must be at least {r} pixels along each filtered axis, got {n}.")
        padded = torch.cat(
            [stack.narrow(axis, 0, r).flip(axis), stack, stack.narrow(axis, n - r, r).flip(axis)], dim=axis
        )
        out = taps[0] * padded.narrow(axis, 0, n)
        for k in range(1, 2 * r + 1):
            out = out + taps[k] * padded.narrow(axis, k, n)
        stack = out
    return stack


def ssim_per_image(gt, rec, mode: str = "2d") -> np.ndarray:
    """Grayscale SSIM of each image pair, the recipe of every NSD paper.

    Both images are converted with scikit-image's ``rgb2gray`` weights, local
    statistics come from a Gaussian window (sigma 1.5, truncate 3.5, ``reflect``
    borders), variances are population variances, the data range is 1, and the
    SSIM map is cropped by 5 pixels before its mean.

    Parameters
    ----------
    gt, rec : array of shape (n_images, 3, H, W)
        Float images in [0, 1] at the resolution SSIM is computed at (425 x 425 in
        the published recipe). Numpy arrays or torch tensors.
    mode : {"2d", "columnwise"}
        ``"2d"``: true 2-D SSIM (scikit-image >= 0.20, MindEye). ``"columnwise"``: the
        mean of 1-D SSIMs down each pixel column, which is what Brain-Diffuser's
        ``multichannel=True`` call computed under scikit-image 0.17.

    Returns
    -------
    s : float64 array of shape (n_images,)
    """
    if mode not in SSIM_MODES:
        raise ValueError(f"Unknown SSIM mode {mode!r}. Valid modes: {', '.join(map(repr, SSIM_MODES))}.")
    _check_pair(gt, rec, 4, "ssim")
    if _is_torch(gt, rec):
        dev = gt.device if isinstance(gt, torch.Tensor) else rec.device
        gt, rec = torch.as_tensor(gt, device=dev), torch.as_tensor(rec, device=dev)
    x, y = _to_gray(gt), _to_gray(rec)
    axes = (1, 2) if mode == "2d" else (1,)
    r = SSIM_RADIUS
    c1 = (0.01 * 1.0) ** 2
    c2 = (0.03 * 1.0) ** 2
    n = x.shape[0]
    if isinstance(x, torch.Tensor):
        smooth = _smooth_torch(torch.cat([x, y, x * x, y * y, x * y]), axes)
    else:
        smooth = _smooth_numpy(np.concatenate([x, y, x * x, y * y, x * y]), axes)
    mx, my, mxx, myy, mxy = (smooth[i * n : (i + 1) * n] for i in range(5))
    var_x = mxx - mx * mx
    var_y = myy - my * my
    cov = mxy - mx * my
    smap = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx * mx + my * my + c1) * (var_x + var_y + c2))
    # The window is only complete r pixels away from the border; the recipe drops the rest.
    if mode == "2d":
        smap = smap[:, r:-r, r:-r]
    else:
        smap = smap[:, r:-r, :]
    if isinstance(smap, torch.Tensor):
        return smap.reshape(n, -1).mean(dim=1).cpu().numpy()
    return smap.reshape(n, -1).mean(axis=1)


def ssim(gt, rec, mode: str = "2d") -> float:
    """SSIM: mean over images of grayscale Gaussian-window SSIM (↑).

    Parameters
    ----------
    gt, rec : array of shape (n_images, 3, H, W)
        Float images in [0, 1], same order, already at the metric's resolution.
    mode : {"2d", "columnwise"}
        See :func:`ssim_per_image`.

    Returns
    -------
    float
    """
    return float(np.mean(ssim_per_image(gt, rec, mode=mode)))


# ----------------------------------------------------------------------------- features


def _as_float64_matrix(feats, name: str, device=None) -> torch.Tensor:
    t = feats if isinstance(feats, torch.Tensor) else torch.from_numpy(np.asarray(feats))
    if t.ndim < 2:
        raise ValueError(f"{name} must have shape (n_images, n_features), got {tuple(t.shape)}.")
    t = t.reshape(t.shape[0], -1)
    if device is not None:
        t = t.to(device)
    return t


def _standardised_gram(fg: torch.Tensor, fr: torch.Tensor) -> torch.Tensor:
    """rho[i, j] = Pearson r(fg_i, fr_j) in float64, accumulated over feature blocks."""
    n_g, d = fg.shape
    n_r = fr.shape[0]
    block = max(1, _BLOCK_ELEMENTS // max(n_g, n_r))
    dev = fg.device
    mean_g = torch.zeros(n_g, dtype=torch.float64, device=dev)
    mean_r = torch.zeros(n_r, dtype=torch.float64, device=dev)
    for s in range(0, d, block):
        mean_g += fg[:, s : s + block].to(torch.float64).sum(dim=1)
        mean_r += fr[:, s : s + block].to(torch.float64).sum(dim=1)
    mean_g /= d
    mean_r /= d
    rho = torch.zeros(n_g, n_r, dtype=torch.float64, device=dev)
    ss_g = torch.zeros(n_g, dtype=torch.float64, device=dev)
    ss_r = torch.zeros(n_r, dtype=torch.float64, device=dev)
    for s in range(0, d, block):
        a = fg[:, s : s + block].to(torch.float64) - mean_g[:, None]
        b = fr[:, s : s + block].to(torch.float64) - mean_r[:, None]
        ss_g += (a * a).sum(dim=1)
        ss_r += (b * b).sum(dim=1)
        rho += a @ b.T
    # A constant feature vector gives 0/0 = NaN, which then fails every comparison.
    return rho / (torch.sqrt(ss_g)[:, None] * torch.sqrt(ss_r)[None, :])


def two_way_per_reconstruction(gt_feats, rec_feats) -> np.ndarray:
    """Per-reconstruction two-way identification accuracy.

    Parameters
    ----------
    gt_feats, rec_feats : array of shape (n_images, ...)
        Features of the ground-truth images and of the reconstructions, same order;
        every trailing dimension is flattened (no pooling). Numpy or torch.

    Returns
    -------
    acc : float64 array of shape (n_images,)
        For reconstruction j, the fraction of the n - 1 other ground-truth images i
        with ``r(gt_i, rec_j) < r(gt_j, rec_j)`` (strict: ties and NaNs fail).
    """
    dev = gt_feats.device if isinstance(gt_feats, torch.Tensor) else None
    fg = _as_float64_matrix(gt_feats, "gt_feats", dev)
    fr = _as_float64_matrix(rec_feats, "rec_feats", fg.device)
    if fg.shape != fr.shape:
        raise ValueError(
            f"two_way_identification: ground-truth features have shape {tuple(fg.shape)} but "
            f"reconstruction features have shape {tuple(fr.shape)}; they must match."
        )
    n = fg.shape[0]
    if n < 2:
        raise ValueError(f"two_way_identification needs at least 2 images, got {n}.")
    rho = _standardised_gram(fg, fr)
    own = torch.diagonal(rho)
    wins = (rho < own[None, :]).sum(dim=0)  # rho_jj < rho_jj is False: the diagonal never counts
    return (wins.to(torch.float64) / (n - 1)).cpu().numpy()


def two_way_identification(gt_feats, rec_feats) -> float:
    """Two-way identification accuracy (↑; chance 0.5), as a fraction.

    For each reconstruction j, the fraction of the other n - 1 ground-truth images
    whose Pearson correlation with reconstruction j is strictly lower than that of
    its own ground truth; averaged over reconstructions (MindEye's ``two_way_identification``).

    Parameters
    ----------
    gt_feats, rec_feats : array of shape (n_images, ...)
        Features, same image order; trailing dimensions are flattened.

    Returns
    -------
    float
    """
    return float(np.mean(two_way_per_reconstruction(gt_feats, rec_feats)))


def correlation_distance_per_pair(gt_feats, rec_feats) -> np.ndarray:
    """``1 - r`` between each ground-truth feature vector and its reconstruction's.

    Parameters
    ----------
    gt_feats, rec_feats : array of shape (n_images, ...)
        Features, same order; trailing dimensions are flattened.

    Returns
    -------
    d : float64 array of shape (n_images,)
        NaN where a feature vector is constant (as ``scipy.spatial.distance.correlation``).
    """
    dev = gt_feats.device if isinstance(gt_feats, torch.Tensor) else None
    fg = _as_float64_matrix(gt_feats, "gt_feats", dev)
    fr = _as_float64_matrix(rec_feats, "rec_feats", fg.device)
    if fg.shape != fr.shape or fg.shape[0] == 0:
        raise ValueError(
            f"correlation_distance: ground-truth features have shape {tuple(fg.shape)} but "
            f"reconstruction features have shape {tuple(fr.shape)}; they must match and be non-empty."
        )
    return 1.0 - _rows_pearson(fg, fr)


def correlation_distance(gt_feats, rec_feats) -> float:
    """Mean correlation distance ``1 - r`` over (ground truth, reconstruction) pairs (↓).

    Parameters
    ----------
    gt_feats, rec_feats : array of shape (n_images, ...)
        Features, same order; trailing dimensions are flattened.

    Returns
    -------
    float
    """
    return float(np.mean(correlation_distance_per_pair(gt_feats, rec_feats)))


# ---------------------------------------------------------------------------- retrieval


def _cosine_matrix(queries, candidates) -> np.ndarray:
    """``sim[i, j] = cos(query_i, candidate_j)`` of flattened vectors (float64); a zero vector's
    similarities are NaN."""
    q = np.asarray(queries.detach().cpu() if isinstance(queries, torch.Tensor) else queries, dtype=np.float64)
    c = np.asarray(candidates.detach().cpu() if isinstance(candidates, torch.Tensor) else candidates,
                   dtype=np.float64)
    q, c = q.reshape(len(q), -1), c.reshape(len(c), -1)
    if q.shape != c.shape:
        raise ValueError(
            f"retrieval: queries have shape {q.shape} but candidates have shape {c.shape} (flattened); "
            "they must match, one candidate per query."
        )
    with np.errstate(invalid="ignore", divide="ignore"):
        qn = q / np.linalg.norm(q, axis=1, keepdims=True)
        cn = c / np.linalg.norm(c, axis=1, keepdims=True)
    return qn @ cn.T


def retrieval_per_image(queries, candidates, way: int = RETRIEVAL_WAY) -> np.ndarray:
    """Per-query top-1 retrieval among ``way`` candidates (MindEye's 300-way retrieval).

    Query ``i`` succeeds in a candidate set that contains its own candidate ``i`` when
    ``cos(q_i, c_i)`` is *strictly* larger than ``cos(q_i, c_j)`` for every other ``j`` in the
    set (ties and NaN fail, as in two-way identification). MindEye draws 30 random sets of
    300 and averages; here each query's score is the exact average over *all* sets of
    ``k = min(way, N)`` test images that contain it: with ``r_i`` other candidates at least as
    similar as its own, ``C(N - 1 - r_i, k - 1) / C(N - 1, k - 1)``. The mean of these scores is
    the expected value of MindEye's subset average (each image is in a random set with the same
    probability), without its sampling noise; with N <= ``way`` it is plain N-way top-1.

    Parameters
    ----------
    queries, candidates : array of shape (n_images, ...)
        E.g. predictions and true targets (image retrieval: which image did the brain see?) or
        the reverse (brain retrieval); flattened and compared by cosine similarity.
    way : int
        Size of the candidate sets (MindEye: 300); at most N is used.

    Returns
    -------
    float64 array of shape (n_images,)
    """
    sim = _cosine_matrix(queries, candidates)
    n = sim.shape[0]
    if n < 2:
        raise ValueError(f"retrieval needs at least 2 images, got {n}.")
    k = min(int(way), n)
    if k < 2:
        raise ValueError(f"retrieval needs sets of at least 2 candidates, got way={way}.")
    own = np.diagonal(sim)
    # Candidates that beat or tie the query's own (NaN compares as not-less: a failure).
    competitors = (~(sim < own[:, None])).sum(axis=1) - 1
    competitors[np.isnan(own)] = n - 1
    from scipy.special import gammaln

    def log_comb(a, b):
        return gammaln(a + 1) - gammaln(b + 1) - gammaln(a - b + 1)

    free = (n - 1 - competitors).astype(np.float64)
    ok = free >= k - 1
    out = np.zeros(n, dtype=np.float64)
    out[ok] = np.exp(log_comb(free[ok], k - 1) - log_comb(float(n - 1), k - 1))
    out[ok & (competitors == 0)] = 1.0  # exactly, not exp(0) up to rounding
    return out


def retrieval_sampled(queries, candidates, way: int = RETRIEVAL_WAY, repeats: int = RETRIEVAL_REPEATS,
                      seed: int = 0) -> float:
    """MindEye's retrieval loop: ``repeats`` random sets of ``min(way, N)`` test images (drawn
    without replacement, seeded), top-1 accuracy of the queries within each set, averaged.

    A noisy estimate of the mean of :func:`retrieval_per_image`; recorded beside it for
    comparison with MindEye's printed numbers (their loop: ``np.random.choice(N, 300,
    replace=False)`` x 30, ``topk(sim, labels, k=1)``).
    """
    sim = _cosine_matrix(queries, candidates)
    n = sim.shape[0]
    k = min(int(way), n)
    rng = np.random.default_rng(seed)
    accs = []
    for _ in range(int(repeats)):
        subset = rng.choice(n, size=k, replace=False)
        block = sim[np.ix_(subset, subset)]
        own = np.diagonal(block)
        wins = ~((~(block < own[:, None])).sum(axis=1) > 1) & ~np.isnan(own)
        accs.append(float(wins.mean()))
    return float(np.mean(accs))
