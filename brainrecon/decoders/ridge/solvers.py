"""Ridge solvers with exact, efficient leave-one-out (or GCV) selection of alpha per target:
plain functions of backend arrays, kept in :data:`RIDGE_CV_SOLVERS` (himalaya style; the
estimator in :mod:`brainrecon.decoders.ridge.estimator` only stores parameters and calls them).

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

The same code runs on the numpy, torch (CPU) and torch_cuda backends of himalaya
(:mod:`brainrecon.decoders.ridge.backends`).
"""

from __future__ import annotations

from numbers import Integral
from typing import Any, Callable

import numpy as np

from brainrecon.decoders.ridge.backends import _eigh, _index, _is_torch, _mul_into
from brainrecon.errors import DataError
from brainrecon.progress import bar_disabled

GRANULARITIES = ("target", "token", "global")
ROUTES = ("auto", "dual", "primal")
# Cap on the per-batch buffer of leave-one-out residuals (n x n_targets_batch) when
# n_targets_batch is None; NSD scale (n = 8859, t = 12288, float32: 435 MB) runs unbatched.
_AUTO_BATCH_BYTES = 1 << 30


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
