"""Ridge regression with exact, efficient leave-one-out selection of alpha per target.

Split as himalaya splits its ridge package:

* :mod:`~brainrecon.decoders.ridge.backends`: the numpy / torch / CUDA backends
  (:func:`get_ridge_backend`);
* :mod:`~brainrecon.decoders.ridge.solvers`: the solvers, plain functions of backend arrays
  (:data:`RIDGE_CV_SOLVERS`, :func:`solve_ridge_loo`, :func:`solve_ridge_gcv`);
* :mod:`~brainrecon.decoders.ridge.estimator`: :class:`RidgeCV`, the scikit-learn style
  estimator (``fit(X, Y)`` / ``predict(X)``) that delegates to a solver;
* :mod:`~brainrecon.decoders.ridge.decoder`: :class:`RidgeDecoder`, the registered ``ridge``
  decoder (one subject's z-scored voxels to a target space, with rescaling of predictions).
"""

from __future__ import annotations

from brainrecon.decoders.ridge.backends import get_ridge_backend
from brainrecon.decoders.ridge.decoder import RidgeDecoder
from brainrecon.decoders.ridge.estimator import AlphaGridWarning, RidgeCV, RidgeNotFittedError, default_alphas
from brainrecon.decoders.ridge.solvers import RIDGE_CV_SOLVERS, solve_ridge_gcv, solve_ridge_loo

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

# The public home of these classes is this package (what the registry names, what users
# import); the submodule they are written in is an implementation detail.
for _cls in (AlphaGridWarning, RidgeCV, RidgeDecoder, RidgeNotFittedError):
    _cls.__module__ = __name__
del _cls
