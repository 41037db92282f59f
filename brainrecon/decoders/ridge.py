"""Ridge regression with exact, efficient leave-one-out selection of alpha per target.

Two layers live here:

* :class:`RidgeCV`, an array-level scikit-learn style estimator (``fit(X, Y)`` /
  ``predict(X)``), and the solver functions it delegates to (:data:`RIDGE_CV_SOLVERS`,
  himalaya style: plain functions taking backend arrays);
* :class:`RidgeDecoder`, the registered ``ridge`` decoder: one subject's z-scored voxels
  to a target space (pixels, IP-Adapter tokens), with optional rescaling of predictions.

The solver factorises the problem once and then scores every alpha
for every target with one large matrix product per alpha:

1. centre X and Y (the unpenalised intercept), ``K = Xc Xcᵀ = V diag(s) Vᵀ`` when
   ``n <= p`` (dual), or ``Xcᵀ Xc`` when ``n > p`` (primal, with the orthonormal basis
   ``Q = Xc U / sqrt(s)``);
2. ``Z = Qᵀ Yc``;
3. per alpha, with ``g = alpha / (s + alpha)`` and the hat diagonal ``h`` (one GEMV with
   ``Q∘Q``), the exact leave-one-out residuals are ``E = diag(1/(1-h)) Q diag(g) Z``: one
   ``n x n x t`` GEMM, after which squaring and a column sum (a GEMV) give the mean squared
   LOO error of every target;
4. per-target (or per-group, or global) arg-min, then a refit grouped by chosen alpha and
   the primal weights ``B = Xcᵀ C``.

The same code runs on the numpy, torch (CPU) and torch_cuda backends of himalaya; the
backend modules are imported directly, so himalaya's global backend is never changed.
"""

from __future__ import annotations

import contextlib
import importlib
import math
import warnings
from numbers import Integral
from pathlib import Path
from typing import Any, Callable

import numpy as np
from sklearn.base import BaseEstimator, MultiOutputMixin, RegressorMixin
from sklearn.exceptions import NotFittedError as _SklearnNotFittedError

from brainrecon.errors import DataError, NotFittedError
from brainrecon.io import check_arrays, load_npz
from brainrecon.progress import bar_disabled

try:  # scikit-learn >= 1.6
    from sklearn.utils.validation import validate_data as _validate_data
except ImportError:  # pragma: no cover - older scikit-learn
    _validate_data = None
from sklearn.utils.validation import check_array, check_X_y

__all__ = [
    "RIDGE_CV_SOLVERS",
    "AlphaGridWarning",
    "RidgeCV",
    "RidgeDecoder",
    "RidgeNotFittedError",
    "default_alphas",
    "get_ridge_backend",
    "solve_ridge_gcv",
    "solve_ridge_loo",
]

DEVICES = ("auto", "cpu", "cuda", "numpy", "torch", "torch_cuda")
DTYPES = ("float32", "float64")
GRANULARITIES = ("target", "token", "global")
ROUTES = ("auto", "dual", "primal")
# Cap on the per-batch buffer of leave-one-out residuals (n x n_targets_batch) when
# n_targets_batch is None; NSD scale (n = 8859, t = 12288, float32: 435 MB) runs unbatched.
_AUTO_BATCH_BYTES = 1 << 30


class RidgeNotFittedError(NotFittedError, _SklearnNotFittedError):
    """``predict`` before ``fit``; also a scikit-learn ``NotFittedError``."""


class AlphaGridWarning(UserWarning):
    """Some targets chose the smallest or largest alpha of the grid: extend the grid."""


def default_alphas(n_features: int) -> np.ndarray:
    """The default alpha grid, ``n_features * 10 ** linspace(-2, 2, 9)``.

    With z-scored features (ddof 1) the trace of the kernel ``X Xᵀ`` is
    ``(n - 1) * n_features``, so its mean eigenvalue is about ``n_features`` and alpha
    relative to ``n_features`` is what carries across subjects (peers use 2e4-1e5 at about 15k voxels, i.e. 1.3-6.4 x n_features).

    Returns
    -------
    array of shape (9,)
    """
    return float(n_features) * np.logspace(-2, 2, 9)


# --------------------------------------------------------------------------- backends
def get_ridge_backend(device: str = "auto"):
    """The himalaya backend module for ``device``, without touching himalaya's global state.

    Parameters
    ----------
    device : {"auto", "cpu", "cuda", "numpy", "torch", "torch_cuda"}
        ``"cpu"`` is torch on the CPU (MKL GEMM and LAPACK eigh), ``"cuda"`` torch on the
        GPU, ``"auto"`` CUDA when available, else ``"cpu"``. A himalaya backend name picks
        that backend (``"numpy"``: numpy + SciPy, no torch).
    """
    if device not in DEVICES:
        raise DataError(
            f"Unknown device {device!r}. Valid devices: {', '.join(map(repr, DEVICES))}."
        )
    name = {"cpu": "torch", "cuda": "torch_cuda"}.get(device, device)
    if name == "auto":
        name = "torch_cuda" if _cuda_available() else "torch"
    if name == "torch_cuda" and not _cuda_available():
        # Checked here because importing himalaya.backend.torch_cuda without CUDA raises
        # (and, under pytest, skips the calling test at import time).
        raise DataError(
            f"device={device!r} needs a CUDA GPU visible to torch, and none is "
            "(torch.cuda.is_available() is False); use device='cpu' or 'auto'."
        )
    return importlib.import_module(f"himalaya.backend.{name}")


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return False
    return bool(torch.cuda.is_available())


def _is_torch(backend) -> bool:
    return backend.name.startswith("torch")


def _mul_into(backend, a, b, out):
    """``out = a * b`` (broadcasting) without a temporary."""
    if _is_torch(backend):
        import torch

        return torch.mul(a, b, out=out)
    return np.multiply(a, b, out=out)


def _index(backend, idx: np.ndarray, ref):
    """An integer index array usable on ``ref``'s backend and device."""
    if _is_torch(backend):
        import torch

        return torch.as_tensor(idx, dtype=torch.int64, device=ref.device)
    return idx


def _is_finite(x) -> bool:
    # A sum is non-finite iff some entry is NaN or inf (overflow is impossible for the
    # bounded arrays checked here); one reduction instead of a boolean mask.
    return math.isfinite(float(x.sum()))


@contextlib.contextmanager
def _full_precision_matmul(backend):
    """Keep TF32 off for float32 products on CUDA (restored on exit)."""
    if not _is_torch(backend):
        yield
        return
    import torch

    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):  # torch >= 2.9
        previous = matmul.fp32_precision
        matmul.fp32_precision = "ieee"
        try:
            yield
        finally:
            matmul.fp32_precision = previous
    else:  # pragma: no cover - older torch
        previous = matmul.allow_tf32
        matmul.allow_tf32 = False
        try:
            yield
        finally:
            matmul.allow_tf32 = previous


def _eigh(backend, A):
    """Eigendecomposition of a symmetric matrix, ascending eigenvalues, with fallbacks.

    numpy uses SciPy's divide-and-conquer driver ("evd"), 2-5x faster than numpy's and
    SciPy's default drivers at n = 2000-3000 on the reference CPU. If the decomposition
    fails or returns non-finite values (float32 ``torch.linalg.eigh`` on CUDA is known to),
    it is redone in float64 on the CPU and cast back.
    """
    import scipy.linalg

    dtype = A.dtype
    try:
        if _is_torch(backend):
            import torch

            s, V = torch.linalg.eigh(A)
        else:
            s, V = scipy.linalg.eigh(A, driver="evd", check_finite=False)
        if not (_is_finite(s) and _is_finite(V)):
            raise np.linalg.LinAlgError("non-finite eigenvalues or eigenvectors")
        return s, V
    except (RuntimeError, np.linalg.LinAlgError, ValueError) as error:
        warnings.warn(
            f"eigh of the {A.shape[0]}x{A.shape[0]} Gram matrix failed on backend "
            f"{backend.name!r} ({type(error).__name__}: {error}); retrying in float64 on "
            "the CPU.",
            RuntimeWarning,
            stacklevel=3,
        )
    A64 = np.asarray(backend.to_numpy(A), dtype=np.float64)
    try:
        s, V = scipy.linalg.eigh(A64, driver="evd", check_finite=False)
    except (np.linalg.LinAlgError, ValueError):
        # Last resort: for a symmetric positive semi-definite matrix the SVD is an
        # eigendecomposition (descending order there).
        V, s, _ = scipy.linalg.svd(A64, lapack_driver="gesvd")
        s, V = s[::-1].copy(), V[:, ::-1].copy()
    return backend.asarray(s, dtype=dtype), backend.asarray(V, dtype=dtype)


# --------------------------------------------------------------------------- solver
def _check_alphas(alphas) -> np.ndarray:
    arr = np.asarray(alphas, dtype=np.float64).reshape(-1)
    if arr.size == 0 or not np.all(np.isfinite(arr)) or np.any(arr <= 0):
        raise DataError(
            f"alphas must be a non-empty sequence of positive finite numbers, got {alphas!r}."
        )
    return arr


def _group_index(granularity: str, target_groups, n_targets: int) -> np.ndarray | None:
    """Integer group label (0..G-1) per target, or None for per-target selection."""
    if granularity not in GRANULARITIES:
        raise DataError(
            f"Unknown granularity {granularity!r}. Valid choices: "
            f"{', '.join(map(repr, GRANULARITIES))}."
        )
    if granularity == "target":
        return None
    if granularity == "global":
        return np.zeros(n_targets, dtype=np.int64)
    if target_groups is None:
        raise DataError(
            "granularity='token' needs target_groups: the number of equal consecutive groups "
            "(e.g. 16 for 16 x 768 IP-Adapter tokens) or one group label per target."
        )
    if isinstance(target_groups, Integral) and not isinstance(target_groups, bool):
        k = int(target_groups)
        if k <= 0 or n_targets % k:
            raise DataError(
                f"target_groups={k} must be a positive divisor of the number of targets "
                f"({n_targets}); pass one label per target for unequal groups."
            )
        return np.repeat(np.arange(k), n_targets // k)
    labels = np.asarray(target_groups).reshape(-1)
    if labels.shape[0] != n_targets:
        raise DataError(
            f"target_groups has {labels.shape[0]} labels but there are {n_targets} targets."
        )
    return np.unique(labels, return_inverse=True)[1].reshape(-1)


def _select(scores: np.ndarray, groups: np.ndarray | None) -> np.ndarray:
    """Index of the chosen alpha per target; ties go to the first alpha in grid order."""
    if groups is None:
        return np.argmin(scores, axis=0)
    n_groups = int(groups.max()) + 1
    summed = np.stack([np.bincount(groups, weights=row, minlength=n_groups) for row in scores])
    return np.argmin(summed, axis=0)[groups]


def _batches(n_targets: int, size: int):
    for start in range(0, n_targets, size):
        yield slice(start, min(start + size, n_targets))


def _solve_eigen(
    X,
    Y,
    alphas,
    *,
    score: str,
    backend,
    fit_intercept: bool = True,
    granularity: str = "target",
    target_groups=None,
    n_targets_batch: int | None = None,
    route: str = "auto",
    loo_prediction_stats: bool = False,
    progress: bool | None = False,
    overwrite_inputs: bool = False,
) -> dict[str, Any]:
    """Shared body of the "loo" and "gcv" solvers; see :func:`solve_ridge_loo`."""
    from tqdm.auto import tqdm

    alphas_np = _check_alphas(alphas)
    n, p = X.shape
    t = Y.shape[1]
    n_alphas = alphas_np.shape[0]
    if route not in ROUTES:
        raise DataError(f"Unknown route {route!r}. Valid choices: {', '.join(map(repr, ROUTES))}.")
    if route == "auto":
        route = "dual" if n <= p else "primal"
    groups = _group_index(granularity, target_groups, t)
    itemsize = X.dtype.itemsize
    if n_targets_batch is None:
        n_targets_batch = max(1, min(t, _AUTO_BATCH_BYTES // (itemsize * n)))
    elif not (isinstance(n_targets_batch, Integral) and n_targets_batch > 0):
        raise DataError(
            f"n_targets_batch must be a positive integer or None, got {n_targets_batch!r}."
        )
    tb = int(min(n_targets_batch, t))

    # Centring X and Y and leaving the intercept unpenalised are the same model; the
    # 1/n term of the hat diagonal below accounts for re-estimating the intercept.
    if fit_intercept:
        mu_x = backend.mean_float64(X, axis=0)
        mu_y = backend.mean_float64(Y, axis=0)
        if overwrite_inputs:  # saves a copy of X and of Y in device memory
            X -= mu_x
            Y -= mu_y
            Xc, Yc = X, Y
        else:
            Xc = X - mu_x
            Yc = Y - mu_y
    else:
        mu_x = mu_y = None
        Xc, Yc = X, Y

    # Orthonormal basis Q (n x r) of the column space of Xc with eigenvalues s. Targets
    # are kept as rows (t x ...): ZT = (Qᵀ Yc)ᵀ, so that target batches and the per-alpha
    # groups of the refit are contiguous rows. "baseT" is the part of Ycᵀ outside
    # span(Q) (None when Q spans all of R^n, the dual case).
    if route == "dual":
        K = backend.matmul(Xc, Xc.T)
        s, Q = _eigh(backend, K)
        del K
        if not _is_torch(backend):
            Q = np.ascontiguousarray(Q)  # LAPACK returns Fortran order
        s = backend.clip(s, 0, None)
        if fit_intercept:
            # The constant vector is an exact null vector of the centred kernel. eigh
            # returns its eigenvalue as round-off (about eps * max(s)), which would leak
            # into 1 - h = sum_k Q_ik^2 g_k - 1/n through the cancellation with 1/n when
            # alpha is small; set it to the exact 0.
            alignment = backend.abs(backend.matmul(backend.ones_like(Q, shape=(n,)), Q))
            s[int(backend.argmax(alignment))] = 0
        ZT = backend.matmul(Yc.T, Q)
        baseT = None
        # 1 - h_i = sum_k Q_ik^2 g_k - 1/n: exact with the complete basis (rows of Q have
        # unit norm) and free of the cancellation in 1 - (1/n + sum Q^2 f) for small alpha.
        one_minus_h_offset = -1.0 / n if fit_intercept else 0.0
        # Bᵀ = (ZT diag(1/(s+a))) (Xcᵀ Q)ᵀ: forming PT = Qᵀ Xc (2pn^2) and then one
        # t x n x p product beats Cᵀ = ZT diag(1/(s+a)) Qᵀ (2n^2t) then Cᵀ Xc (2npt)
        # when p < t.
        PT = backend.matmul(Q.T, Xc) if p < t else None
    else:
        G = backend.matmul(Xc.T, Xc)
        s_all, U = _eigh(backend, G)
        del G
        if not _is_torch(backend):
            U = np.ascontiguousarray(U)
        s_max = float(s_all.max()) if s_all.shape[0] else 0.0
        tol = s_max * max(n, p) * float(backend.finfo(s_all.dtype).eps)
        keep = _index(backend, np.flatnonzero(backend.to_numpy(s_all) > tol), s_all)
        s = s_all[keep]
        U = U[:, keep]
        root = backend.sqrt(s)
        Q = backend.matmul(Xc, U)
        Q /= root
        PT = (U * root).T  # Qᵀ Xc = diag(sqrt(s)) Uᵀ
        del U
        ZT = backend.matmul(Yc.T, Q)
        baseT = Yc.T - backend.matmul(ZT, Q.T)
        Q2_rows = (Q * Q).sum(1)
        one_minus_h_offset = 1.0 - Q2_rows - (1.0 / n if fit_intercept else 0.0)
        del Q2_rows
    del Yc

    r = Q.shape[1]
    Q2 = Q * Q  # hat diagonal for any alpha is one GEMV with Q∘Q
    dtype = Q.dtype
    alphas_dev = backend.asarray_like(alphas_np, ref=s)
    buffer = backend.zeros_like(Q, shape=(tb * n,))
    scaledT = backend.zeros_like(Q, shape=(r, n))
    scores = backend.zeros_like(Q, shape=(n_alphas, t))
    inv_n = backend.ones_like(Q, shape=(n,)) / n

    def one_minus_h(alpha):
        g = alpha / (s + alpha)
        omh = backend.matmul(Q2, g) + one_minus_h_offset
        # Leverage 1 points (possible only for tiny alpha) would divide by zero.
        return g, backend.clip(omh, float(backend.finfo(dtype).eps), None)

    if score == "loo":
        show = bar_disabled(True if progress is None else progress)
        for a in tqdm(range(n_alphas), desc="ridge LOO", disable=show, leave=False):
            g, omh = one_minus_h(alphas_dev[a])
            # In-sample residuals Rᵀ = ZT diag(g) Qᵀ (+ baseT): scale the r x n factor,
            # not the t x r targets. LOO residuals are R_i / (1 - h_i), so the mean
            # squared LOO error is a GEMV of Rᵀ∘Rᵀ with weights 1 / (n (1 - h)^2).
            _mul_into(backend, Q.T, g[:, None], scaledT)
            weights = inv_n / (omh * omh)
            for rows in _batches(t, tb):
                k = rows.stop - rows.start
                RT = buffer[: k * n].reshape(k, n)
                backend.matmul(ZT[rows], scaledT, out=RT)
                if baseT is not None:
                    RT += baseT[rows]
                RT *= RT
                scores[a, rows] = backend.matmul(RT, weights)
    elif score == "gcv":
        # ||R_t||^2 = sum_k g_k^2 Z_kt^2 (+ ||base_t||^2) since Q is orthonormal: all
        # alphas at once with one (t x r)(r x A) product; the hat diagonal is replaced by
        # its mean, trace(H)/n.
        g_all = alphas_dev[:, None] / (s[None, :] + alphas_dev[:, None])
        trace = (1.0 - g_all).sum(1) + (1.0 if fit_intercept else 0.0)
        denom = n * (1.0 - trace / n) ** 2
        g2T = (g_all * g_all).T
        for rows in _batches(t, tb):
            k = rows.stop - rows.start
            Zsq = buffer[: k * r].reshape(k, r)
            _mul_into(backend, ZT[rows], ZT[rows], Zsq)
            rss = backend.matmul(Zsq, g2T)
            if baseT is not None:
                rss = rss + (baseT[rows] * baseT[rows]).sum(1)[:, None]
            scores[:, rows] = (rss / denom[None, :]).T
    else:
        raise DataError(f"Unknown cv {score!r}. Valid choices: 'loo', 'gcv'.")
    del scaledT
    if not loo_prediction_stats:
        del Q2  # n x r; the refit does not need it

    scores_np = np.asarray(backend.to_numpy(scores), dtype=np.float64)
    del scores
    if not np.all(np.isfinite(scores_np)):
        raise DataError(
            "Non-finite cross-validation scores: check that X and Y are finite and that the "
            "alphas are not tiny compared with the eigenvalues of X Xᵀ."
        )
    chosen = _select(scores_np, groups)

    def groups_of_targets():
        """(alpha index, target rows) in batches of at most tb targets."""
        for a in np.unique(chosen):
            rows_np = np.flatnonzero(chosen == a)
            if rows_np.shape[0] == t:
                for rows in _batches(t, tb):
                    yield int(a), rows
            else:
                for start in range(0, rows_np.shape[0], tb):
                    yield int(a), _index(backend, rows_np[start : start + tb], ZT)

    # Refit grouped by chosen alpha: in total one t x r x (n or p) product, whatever the
    # number of distinct alphas; rows of coefT (t x p) are written whole.
    coefT = backend.zeros_like(Q, shape=(t, p))
    if PT is None:
        CT = buffer.reshape(tb, n) if tb == t else backend.zeros_like(Q, shape=(t, n))
        right, dest = Q.T, CT
    else:
        right, dest = PT, coefT
    for a, rows in groups_of_targets():
        dest[rows] = backend.matmul(ZT[rows] / (s + alphas_dev[a])[None, :], right)
    if PT is None:
        backend.matmul(CT, Xc, out=coefT)
        del CT
    del right, dest

    result = {
        "coef": coefT.T,
        "alphas": alphas_np[chosen],
        "alpha_index": chosen,
        "cv_scores": scores_np,
        "route": route,
    }
    if fit_intercept:
        result["intercept"] = mu_y - backend.matmul(coefT, mu_x)
    else:
        result["intercept"] = backend.zeros_like(Q, shape=(t,))

    if loo_prediction_stats:
        # Exact LOO predictions at the chosen alpha, in centred coordinates:
        # Yc - E = (Q - diag(w) Q diag(g)) Z + (1 - w) ∘ base.
        mean = backend.zeros_like(Q, shape=(t,))
        std = backend.zeros_like(Q, shape=(t,))
        for a in np.unique(chosen):
            g, omh = one_minus_h(alphas_dev[int(a)])
            w = 1.0 / omh
            factorT = (Q - (Q * g[None, :]) * w[:, None]).T
            rows_np = np.flatnonzero(chosen == a)
            for start in range(0, rows_np.shape[0], tb):
                rows = _index(backend, rows_np[start : start + tb], ZT)
                predT = backend.matmul(ZT[rows], factorT)
                if baseT is not None:
                    predT += baseT[rows] * (1.0 - w)[None, :]
                m = predT.mean(1)
                predT -= m[:, None]
                mean[rows] = m
                std[rows] = backend.sqrt((predT * predT).mean(1))
        if fit_intercept:
            mean = mean + mu_y
        result["loo_mean"] = mean
        result["loo_std"] = std
    return result


_SOLVER_PARAMETERS_DOC = """
    Parameters
    ----------
    X : backend array of shape (n_samples, n_features)
    Y : backend array of shape (n_samples, n_targets)
        Same backend, device and float dtype as ``X``; neither is modified unless
        ``overwrite_inputs``.
    alphas : array-like of shape (n_alphas,)
        Positive regularisation strengths, in the order used to break ties.
    backend : module
        A himalaya backend module (see :func:`get_ridge_backend`).
    fit_intercept : bool
        Fit an unpenalised intercept (centre X and Y); the scores account for
        re-estimating it without the left-out sample.
    granularity : {"target", "token", "global"}
        Choose alpha per target, per group of targets (summing scores over the group, e.g.
        the 768 dimensions of an IP-Adapter token), or one alpha for all targets.
    target_groups : int or array-like of shape (n_targets,), optional
        For ``granularity="token"``: the number of equal consecutive groups (targets
        reshaped row-major to ``(target_groups, -1)``), or one label per target.
    n_targets_batch : int, optional
        Targets per matrix product in the alpha loop; bounds the ``(n, n_targets_batch)``
        work buffer. None: all targets if that buffer stays under 1 GiB.
    route : {"auto", "dual", "primal"}
        Eigendecomposition of ``Xc Xcᵀ`` (dual, n x n) or ``Xcᵀ Xc`` (primal, p x p);
        "auto" takes the smaller. Results agree to round-off.
    loo_prediction_stats : bool
        Also return the mean and standard deviation (ddof 0) over samples of the exact
        leave-one-out predictions at each target's chosen alpha (one extra
        ``n x n x n_targets`` product).
    progress : bool or None
        Show a progress bar over alphas; None shows it only on a terminal.
    overwrite_inputs : bool
        Centre X and Y in place (they must be private copies, e.g. on the GPU).

    Returns
    -------
    dict with keys
        ``coef`` (backend array of shape (n_features, n_targets)), ``intercept``
        ((n_targets,)), ``alphas`` (numpy (n_targets,), the chosen alpha per target),
        ``alpha_index`` (numpy int (n_targets,)), ``cv_scores`` (numpy float64
        (n_alphas, n_targets), mean squared error per alpha and target), ``route``, and
        with ``loo_prediction_stats`` ``loo_mean`` and ``loo_std`` ((n_targets,)).
"""


def solve_ridge_loo(X, Y, alphas, *, backend, **params) -> dict[str, Any]:
    """Ridge with alpha chosen by exact efficient leave-one-out cross-validation.

    The score of an alpha for a target is the mean over samples of the squared
    leave-one-out residual, identical (to round-off) to refitting without each sample in
    turn, and to scikit-learn's ``RidgeCV(alpha_per_target=True)`` with ``cv=None``.
    Cost beyond the factorisation: one ``n x n x n_targets`` product per alpha (dual
    route), plus one for ``Qᵀ Y`` and one for the refit, and ``Xᵀ C``.
    """
    return _solve_eigen(X, Y, alphas, score="loo", backend=backend, **params)


def solve_ridge_gcv(X, Y, alphas, *, backend, **params) -> dict[str, Any]:
    """Ridge with alpha chosen by generalised cross-validation (an approximation of LOO).

    GCV replaces each leverage ``h_i`` by the mean leverage ``trace(H) / n``, so all alphas
    are scored with one ``(n_alphas x n) (n x n_targets)`` product instead of one
    ``n x n x n_targets`` product per alpha; the choice can differ from exact LOO when
    leverages are uneven. Factorisation and refit are those of :func:`solve_ridge_loo`.
    """
    return _solve_eigen(X, Y, alphas, score="gcv", backend=backend, **params)


solve_ridge_loo.__doc__ += _SOLVER_PARAMETERS_DOC
solve_ridge_gcv.__doc__ += _SOLVER_PARAMETERS_DOC

#: cv name -> solver function (himalaya style).
RIDGE_CV_SOLVERS: dict[str, Callable[..., dict[str, Any]]] = {
    "loo": solve_ridge_loo,
    "gcv": solve_ridge_gcv,
}


# --------------------------------------------------------------------------- estimator
class RidgeCV(MultiOutputMixin, RegressorMixin, BaseEstimator):
    """Multi-target ridge regression with alpha chosen per target by exact leave-one-out.

    Minimises ``||Y - 1 b0ᵀ - X B||² + alpha_t ||B[:, t]||²`` for every target ``t``
    with its own ``alpha_t`` from a grid, the intercept unpenalised. The alphas and
    coefficients equal scikit-learn's ``RidgeCV(alphas, alpha_per_target=True)`` (to
    round-off in float64), at the cost of a few large matrix products
    (:func:`solve_ridge_loo`), on numpy, torch CPU or CUDA.

    Parameters
    ----------
    alphas : array-like of shape (n_alphas,), optional
        Grid of positive regularisation strengths. None: :func:`default_alphas`,
        ``n_features * 10 ** linspace(-2, 2, 9)``, which assumes z-scored features (mean
        kernel eigenvalue about ``n_features``).
    fit_intercept : bool, default True
        Fit an unpenalised intercept.
    device : {"auto", "cpu", "cuda", "numpy", "torch", "torch_cuda"}, default "auto"
        Where to compute (:func:`get_ridge_backend`): CUDA when available, else torch on
        the CPU. Fitted attributes are numpy arrays whatever the device.
    dtype : {"float32", "float64"}, default "float32"
        Working precision. float32 is adequate: useful alphas are far above the
        float32 error of the kernel eigenvalues.
    cv : {"loo", "gcv"}, default "loo"
        Exact leave-one-out, or generalised cross-validation (cheaper alpha loop, an
        approximation; see :func:`solve_ridge_gcv`).
    granularity : {"target", "token", "global"}, default "target"
        One alpha per target, per group of targets (``target_groups``), or one for all.
    target_groups : int or array-like of shape (n_targets,), optional
        Groups for ``granularity="token"``: a number of equal consecutive groups (16 for
        16 x 768 tokens) or one label per target.
    n_targets_batch : int, optional
        Targets per matrix product; None: all, unless the ``n x n_targets`` work buffer
        would exceed 1 GiB.
    loo_prediction_stats : bool, default False
        Also store ``loo_mean_`` and ``loo_std_``, the per-target mean and standard
        deviation of the exact leave-one-out predictions at the chosen alpha (one extra
        matrix product; used for non-transductive rescaling of predictions).
    progress : bool or None, default False
        Progress bar over alphas; None: only on a terminal.

    Attributes
    ----------
    coef_ : ndarray of shape (n_features, n_targets), or (n_features,) for 1-D ``y``
    intercept_ : ndarray of shape (n_targets,), or float for 1-D ``y``
    alphas_ : ndarray of shape (n_targets,)
        Chosen alpha per target.
    cv_scores_ : ndarray of shape (n_alphas, n_targets), float64
        Leave-one-out (or GCV) mean squared error of every alpha for every target.
    n_features_in_ : int
    alpha_grid_ : ndarray of shape (n_alphas,)
        The grid used (resolves ``alphas=None``).
    route_ : str
        "dual" or "primal".

    Notes
    -----
    Ties go to the first alpha in grid order (as in scikit-learn). An
    :class:`AlphaGridWarning` is emitted when any target chose the smallest or largest
    alpha of a grid of several.

    Memory at NSD scale (n = 8,859, p = 15,724, t = 12,288, float32, all targets in one
    batch), by accounting (not yet measured on a GPU): X 0.56 GB and Y 0.44 GB copied to
    the GPU and centred in place; the kernel and its eigenvectors 0.31 GB each plus the
    eigh workspace (about 2 n² floats, 0.63 GB); ``Q∘Q`` and one scaled copy of the
    eigenvectors 0.31 GB each; ``Z = Qᵀ Y`` 0.44 GB; the residual / dual-coefficient
    buffer 0.44 GB; the coefficients 0.77 GB plus column blocks gathered in the refit (up
    to 2 x 0.44 GB). Peak about 4 GB, well within a 16 GB GPU; ``n_targets_batch`` shrinks
    the n x t buffers further. On the CPU X and Y are not overwritten: add their centred
    copies (1 GB).
    """

    def __init__(
        self,
        alphas=None,
        fit_intercept=True,
        device="auto",
        dtype="float32",
        cv="loo",
        granularity="target",
        target_groups=None,
        n_targets_batch=None,
        loo_prediction_stats=False,
        progress=False,
    ):
        self.alphas = alphas
        self.fit_intercept = fit_intercept
        self.device = device
        self.dtype = dtype
        self.cv = cv
        self.granularity = granularity
        self.target_groups = target_groups
        self.n_targets_batch = n_targets_batch
        self.loo_prediction_stats = loo_prediction_stats
        self.progress = progress

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.required = True
        return tags

    def _check_params(self):
        if self.dtype not in DTYPES:
            raise DataError(
                f"Unknown dtype {self.dtype!r}. Valid choices: {', '.join(map(repr, DTYPES))}."
            )
        if self.cv not in RIDGE_CV_SOLVERS:
            raise DataError(
                f"Unknown cv {self.cv!r}. Valid choices: "
                f"{', '.join(map(repr, RIDGE_CV_SOLVERS))}."
            )
        return get_ridge_backend(self.device)

    def fit(self, X, y):
        """Fit the model, choosing alpha per target by cross-validation.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
        y : array-like of shape (n_samples,) or (n_samples, n_targets)

        Returns
        -------
        self
        """
        backend = self._check_params()
        dtypes = (np.float32, np.float64)
        if _validate_data is not None:
            X, y = _validate_data(self, X, y, multi_output=True, y_numeric=True, dtype=dtypes)
        else:  # pragma: no cover - scikit-learn < 1.6
            X, y = check_X_y(X, y, multi_output=True, y_numeric=True, dtype=dtypes)
            self.n_features_in_ = X.shape[1]
        if X.shape[0] < 2:
            raise DataError(
                f"RidgeCV needs at least 2 samples for leave-one-out, got n_samples = {X.shape[0]}."
            )
        ravel = y.ndim == 1
        Y = y[:, None] if ravel else y
        alphas = default_alphas(X.shape[1]) if self.alphas is None else self.alphas
        alphas = _check_alphas(alphas)

        with _full_precision_matmul(backend):
            Xb = backend.asarray(X, dtype=self.dtype)
            Yb = backend.asarray(Y, dtype=self.dtype)
            result = RIDGE_CV_SOLVERS[self.cv](
                Xb,
                Yb,
                alphas,
                backend=backend,
                fit_intercept=bool(self.fit_intercept),
                granularity=self.granularity,
                target_groups=self.target_groups,
                n_targets_batch=self.n_targets_batch,
                loo_prediction_stats=bool(self.loo_prediction_stats),
                progress=self.progress,
                # Arrays moved to the GPU are private copies: centre them in place.
                overwrite_inputs=backend.name == "torch_cuda",
            )
            del Xb, Yb
        coef = np.asarray(backend.to_numpy(result["coef"]))
        intercept = np.asarray(backend.to_numpy(result["intercept"]))
        self.coef_ = coef[:, 0] if ravel else coef
        self.intercept_ = float(intercept[0]) if ravel else intercept
        self.alphas_ = result["alphas"]
        self.cv_scores_ = result["cv_scores"]
        self.alpha_grid_ = alphas
        self.route_ = result["route"]
        if self.loo_prediction_stats:
            self.loo_mean_ = np.asarray(backend.to_numpy(result["loo_mean"]))
            self.loo_std_ = np.asarray(backend.to_numpy(result["loo_std"]))
        _warn_grid_edge(alphas, result["alpha_index"])
        return self

    def _check_is_fitted(self):
        if not hasattr(self, "coef_"):
            raise RidgeNotFittedError(
                f"This {type(self).__name__} instance is not fitted yet; call fit(X, y) "
                "before predict()."
            )

    def predict(self, X):
        """Predict targets.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)

        Returns
        -------
        ndarray of shape (n_samples, n_targets), or (n_samples,) if fitted on 1-D ``y``
        """
        self._check_is_fitted()
        dtypes = (np.float32, np.float64)
        if _validate_data is not None:
            X = _validate_data(self, X, reset=False, dtype=dtypes)
        else:  # pragma: no cover
            X = check_array(X, dtype=dtypes)
        if X.shape[1] != self.n_features_in_:
            raise DataError(
                f"X has {X.shape[1]} features, but this RidgeCV was fitted with "
                f"{self.n_features_in_}."
            )
        backend = self._check_params()
        with _full_precision_matmul(backend):
            coef = backend.asarray(self.coef_, dtype=self.dtype)
            out = backend.matmul(backend.asarray(X, dtype=self.dtype), coef)
            out = np.asarray(backend.to_numpy(out))
        return out + self.intercept_


def _warn_grid_edge(alphas: np.ndarray, index: np.ndarray) -> None:
    if alphas.shape[0] < 2:
        return
    order = np.argsort(alphas)
    low = int(np.sum(index == order[0]))
    high = int(np.sum(index == order[-1]))
    if low or high:
        warnings.warn(
            f"{low} of {index.shape[0]} targets chose the smallest alpha ({alphas[order[0]]:.4g}) "
            f"and {high} the largest ({alphas[order[-1]]:.4g}); the best alpha may lie outside "
            "the grid: extend alphas on that side.",
            AlphaGridWarning,
            stacklevel=3,
        )


# --------------------------------------------------------------------------- decoder
from brainrecon.decoders.base import CliOption, Decoder  # noqa: E402  (after the array level on purpose)

RESCALES = ("none", "train", "test")
_WEIGHTS_FILE = "ridge_weights.npz"


class RidgeDecoder(Decoder):
    """Ridge regression from one subject's z-scored voxels to a target space.

    Voxels are z-scored with training statistics (ddof 1; constant voxels get scale 1),
    targets are flattened to ``(n, -1)``, and :class:`RidgeCV` chooses alpha per target
    (or per token, or globally) by exact leave-one-out, fitting an unpenalised intercept.

    Parameters
    ----------
    subject : int, optional
        Subject to fit; None: the training split's first subject.
    target : str, default "pixels"
        Target space (:func:`brainrecon.targets.get_target`): "pixels" or "ipadapter".
    target_options : dict, optional
        Keyword options of the target space, e.g. ``{"size": 32}`` for pixels.
    alphas : sequence of float, optional
        Alpha grid; None: ``n_voxels * 10 ** linspace(-2, 2, 9)`` (:func:`default_alphas`).
    cv : {"loo", "gcv"}, default "loo"
        Exact leave-one-out, or the generalised cross-validation approximation.
    granularity : {"target", "token", "global"}, default "target"
        One alpha per target dimension, per token (per index of the target's first
        axis: 16 IP-Adapter tokens of 768 dimensions; rows of a pixel image), or one alpha.
    rescale : {"train", "none", "test"}, default "train"
        Recalibration of each predicted dimension, which undoes ridge shrinkage (IP-Adapter
        conditioning strength depends on the scale of the tokens):

        * ``"train"``: an affine map per dimension that gives the training set's exact
          leave-one-out predictions the mean and standard deviation of the training
          targets. Uses training data only, so a test image's prediction does not depend
          on the other test images. The default for that reason.
        * ``"test"``: Brain-Diffuser's recalibration, z-scoring each dimension over the
          test predictions and mapping to the training targets' mean and standard
          deviation (transductive: needs the whole test batch; Brain-Diffuser's ``vdvae_regression.py``).
        * ``"none"``: raw ridge predictions.
    device : {"auto", "cpu", "cuda", "numpy"}, default "auto"
        Where the solver runs (:func:`get_ridge_backend`).
    dtype : {"float32", "float64"}, default "float32"
        Solver precision.
    nan_policy : {"error", "zero"}, default "error"
        Non-finite voxel values: raise, or replace by 0.

    Attributes
    ----------
    subjects_ : list of int
        The one fitted subject.
    n_voxels_ : dict
        Subject -> voxel count.
    alphas_ : ndarray of shape (n_target_dims,)
        Chosen alpha per flattened target dimension.
    target_shape_ : tuple of int
        Shape of one prediction.
    """

    name = "ridge"
    predicts = "target"
    summary = (
        "Closed-form ridge from z-scored voxels to a target space; alpha per target by "
        "exact leave-one-out (CPU or CUDA)."
    )
    main_params = ("target", "alphas", "granularity", "rescale", "device")
    cli_options = (CliOption("alphas", "--alphas", "floats", "comma-separated alpha grid, e.g. 1e3,1e4,1e5"),)

    def __init__(
        self,
        *,
        subject=None,
        target="pixels",
        target_options=None,
        alphas=None,
        cv="loo",
        granularity="target",
        rescale="train",
        device="auto",
        dtype="float32",
        nan_policy="error",
    ):
        self.subject = subject
        self.target = target
        self.target_options = target_options
        self.alphas = alphas
        self.cv = cv
        self.granularity = granularity
        self.rescale = rescale
        self.device = device
        self.dtype = dtype
        self.nan_policy = nan_policy

    # ------------------------------------------------------------------ fit / predict
    def _check_rescale(self) -> None:
        if self.rescale not in RESCALES:
            raise DataError(
                f"Unknown rescale {self.rescale!r}. Valid choices: "
                f"{', '.join(map(repr, RESCALES))}."
            )

    def fit(self, train) -> "RidgeDecoder":
        """Fit on one subject of a training split.

        Parameters
        ----------
        train : brainrecon.data.Split

        Returns
        -------
        self
        """
        from brainrecon.targets import get_target

        self._check_rescale()
        subject = train.subjects[0] if self.subject is None else int(self.subject)
        if subject not in train.subjects:
            raise DataError(
                f"Subject {subject} is not in the training data; available subjects: "
                f"{train.subjects}."
            )
        X = train.voxels(subject, nan_policy=self.nan_policy)
        target = get_target(self.target, **(self.target_options or {}))
        Y = np.asarray(target.load(train, subject), dtype=np.float32)
        if Y.shape[0] != X.shape[0]:
            raise DataError(
                f"Subject {subject}: {X.shape[0]} voxel rows but {Y.shape[0]} targets."
            )
        target_shape = tuple(int(d) for d in Y.shape[1:])
        Y = Y.reshape(Y.shape[0], -1)

        x_mean, x_scale = _column_mean_std(X, ddof=1)
        # Constant voxels carry no information; scale 1 keeps them at exactly 0.
        x_scale[~(x_scale > 0)] = 1.0
        Xz = X - x_mean.astype(np.float32)  # float32 throughout: no float64 copy of X
        Xz /= x_scale.astype(np.float32)
        del X

        model = RidgeCV(
            alphas=self.alphas,
            fit_intercept=True,
            device=self.device,
            dtype=self.dtype,
            cv=self.cv,
            granularity=self.granularity,
            target_groups=target_shape[0] if self.granularity == "token" else None,
            loo_prediction_stats=self.rescale == "train",
            progress=None,
        ).fit(Xz, Y)

        self.subjects_ = [subject]
        self.n_voxels_ = {subject: int(Xz.shape[1])}
        self.target_shape_ = target_shape
        self.coef_ = model.coef_.astype(np.float32, copy=False)
        self.intercept_ = np.asarray(model.intercept_, dtype=np.float32)
        self.x_mean_ = x_mean.astype(np.float32)
        self.x_scale_ = x_scale.astype(np.float32)
        self.alphas_ = model.alphas_
        self.alpha_grid_ = model.alpha_grid_
        self.cv_scores_ = model.cv_scores_
        y_mean, y_std = _column_mean_std(Y, ddof=0)
        self.y_mean_ = y_mean.astype(np.float32)
        self.y_std_ = y_std.astype(np.float32)
        if self.rescale == "train":
            self.scale_, self.shift_ = _affine_to(
                model.loo_mean_, model.loo_std_, self.y_mean_, self.y_std_
            )
        return self

    def predict(self, test) -> dict[int, np.ndarray]:
        """Predict targets for the fitted subject.

        Parameters
        ----------
        test : brainrecon.data.Split

        Returns
        -------
        dict
            ``subject -> float32 array of shape (n, *target_shape_)``, aligned with
            ``test.ids(subject)``.
        """
        self._check_rescale()
        out = {}
        for subject in self._predict_subjects(test):
            X = test.voxels(subject, nan_policy=self.nan_policy)
            self._check_voxels(X, subject)
            Xz = (X - self.x_mean_) / self.x_scale_
            pred = self._linear(Xz.astype(np.float32, copy=False))
            if self.rescale == "train":
                pred = pred * self.scale_ + self.shift_
            elif self.rescale == "test":
                scale, shift = _affine_to(
                    pred.mean(axis=0, dtype=np.float64),
                    pred.std(axis=0, dtype=np.float64),
                    self.y_mean_,
                    self.y_std_,
                )
                pred = pred * scale + shift
            out[subject] = pred.astype(np.float32, copy=False).reshape((-1,) + self.target_shape_)
        return out

    def _linear(self, Xz: np.ndarray) -> np.ndarray:
        backend = get_ridge_backend(self.device)
        with _full_precision_matmul(backend):
            out = backend.matmul(
                backend.asarray(Xz, dtype=self.dtype), backend.asarray(self.coef_, dtype=self.dtype)
            )
            out = np.asarray(backend.to_numpy(out), dtype=np.float32)
        return out + self.intercept_

    # ------------------------------------------------------------------ persistence
    def _save_weights(self, directory: Path) -> dict[str, Any]:
        from brainrecon.io import write_npz_atomic

        arrays = {
            "coef": self.coef_,
            "intercept": self.intercept_,
            "x_mean": self.x_mean_,
            "x_scale": self.x_scale_,
            "alphas": self.alphas_,
            "alpha_grid": self.alpha_grid_,
            "cv_scores": self.cv_scores_.astype(np.float32),
            "y_mean": self.y_mean_,
            "y_std": self.y_std_,
        }
        if hasattr(self, "scale_"):
            arrays["scale"] = self.scale_
            arrays["shift"] = self.shift_
        write_npz_atomic(Path(directory) / _WEIGHTS_FILE, **arrays)
        return {"weights": _WEIGHTS_FILE, "target_shape": list(self.target_shape_)}

    def _load_weights(self, directory: Path, state: dict[str, Any]) -> None:
        path = Path(directory) / state.get("weights", _WEIGHTS_FILE)
        if not path.is_file():
            raise DataError(f"{path} is missing: the saved ridge decoder is incomplete; refit it.")
        fix = "the saved ridge decoder is damaged: refit it"
        arrays = load_npz(path, fix=fix)
        self.target_shape_ = tuple(int(d) for d in state["target_shape"])
        n_vox = int(next(iter(self.n_voxels_.values())))
        n_out = int(np.prod(self.target_shape_))
        floats = ("float32", "float64")
        check_arrays(path, arrays, {
            "coef": ((n_vox, n_out), "float32"), "intercept": ((n_out,), "float32"),
            "x_mean": ((n_vox,), "float32"), "x_scale": ((n_vox,), "float32"),
            "alphas": ((None,), floats), "alpha_grid": ((None,), floats), "cv_scores": ((None, None), floats),
            "y_mean": ((n_out,), "float32"), "y_std": ((n_out,), "float32"),
            "scale": ((n_out,), "float32"), "shift": ((n_out,), "float32"),
        }, optional=("scale", "shift"),
            fix=f"{fix} (brainrecon.json says {n_vox} voxels and {n_out} target values)")
        if ("scale" in arrays) != ("shift" in arrays):
            raise DataError(f"{path} holds only one of 'scale' and 'shift'; {fix}.")
        self.coef_ = arrays["coef"]
        self.intercept_ = arrays["intercept"]
        self.x_mean_ = arrays["x_mean"]
        self.x_scale_ = arrays["x_scale"]
        self.alphas_ = arrays["alphas"]
        self.alpha_grid_ = arrays["alpha_grid"]
        self.cv_scores_ = arrays["cv_scores"].astype(np.float64)
        self.y_mean_ = arrays["y_mean"]
        self.y_std_ = arrays["y_std"]
        if "scale" in arrays:
            self.scale_ = arrays["scale"]
            self.shift_ = arrays["shift"]
        if self.rescale == "train" and not hasattr(self, "scale_"):
            raise DataError(
                f"{path} holds no rescaling statistics but rescale='train'; refit the decoder."
            )


def _column_mean_std(
    X: np.ndarray, ddof: int = 0, rows: int = 1024
) -> tuple[np.ndarray, np.ndarray]:
    """Per-column mean and standard deviation, accumulated in float64 over row blocks.

    Same values as ``X.mean(0)`` / ``X.std(0, ddof=ddof)`` in float64, without a float64
    copy of the whole of X (1.1 GB at NSD scale).
    """
    n = X.shape[0]
    mean = X.sum(axis=0, dtype=np.float64) / n
    sq = np.zeros_like(mean)
    for start in range(0, n, rows):
        block = X[start : start + rows] - mean
        sq += np.einsum("ij,ij->j", block, block)
    return mean, np.sqrt(sq / max(n - ddof, 1))


def _affine_to(mean, std, target_mean, target_std) -> tuple[np.ndarray, np.ndarray]:
    """Per-dimension ``scale, shift`` mapping (mean, std) to (target_mean, target_std).

    Dimensions whose predictions do not vary (std 0, e.g. a constant target) are left
    unchanged rather than divided by zero.
    """
    mean = np.asarray(mean, dtype=np.float64)
    std = np.asarray(std, dtype=np.float64)
    ok = std > 1e-12 * (np.abs(mean) + 1.0)
    scale = np.where(ok, np.asarray(target_std, np.float64) / np.where(ok, std, 1.0), 1.0)
    shift = np.where(ok, np.asarray(target_mean, np.float64) - scale * mean, 0.0)
    return scale.astype(np.float32), shift.astype(np.float32)
