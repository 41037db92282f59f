"""The scikit-learn style ridge estimator (:class:`RidgeCV`, ``fit(X, Y)`` / ``predict(X)``):
it validates its parameters and arrays and delegates to a solver of
:data:`~brainrecon.decoders.ridge.solvers.RIDGE_CV_SOLVERS`."""

from __future__ import annotations

import warnings

import numpy as np
from sklearn.base import BaseEstimator, MultiOutputMixin, RegressorMixin
from sklearn.exceptions import NotFittedError as _SklearnNotFittedError

from brainrecon.decoders.ridge.backends import _full_precision_matmul, get_ridge_backend
from brainrecon.decoders.ridge.solvers import RIDGE_CV_SOLVERS, _check_alphas
from brainrecon.errors import DataError, NotFittedError

try:  # scikit-learn >= 1.6
    from sklearn.utils.validation import validate_data as _validate_data
except ImportError:  # pragma: no cover - older scikit-learn
    _validate_data = None
from sklearn.utils.validation import check_array, check_X_y

DTYPES = ("float32", "float64")


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
