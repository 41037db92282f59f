"""Tolerances for equalities that cross processes, engines, launchers or BLAS code paths.

Two float32 evaluations of the same sum of ``K`` terms taken in different orders (another BLAS
kernel or thread count, another process's memory alignment, another reduction tree) differ by
at most about ``2 K eps Σ|x_i|`` (Higham, *Accuracy and Stability of Numerical Algorithms*,
§4.2), with ``eps = 2**-23``. The tests bound ``Σ|x_i|`` by the largest magnitude of the
compared tensor (its entries are sums of the same terms), so a tolerance is
``2 * K * eps * max|reference|``, with ``K`` the longest reduction in the computation,
stated where the helper is used. Equalities that hold by construction (same process, same
operations in the same order) stay exact instead.
"""

from __future__ import annotations

import numpy as np

EPS32 = float(np.finfo(np.float32).eps)  # 2**-23


def f32_atol(reference, terms: int) -> float:
    """Absolute tolerance for two float32 evaluations of a computation whose longest sum has
    ``terms`` terms, compared with ``reference`` (array or tensor); see the module docstring."""
    if hasattr(reference, "detach"):
        reference = reference.detach().cpu().numpy()
    scale = float(np.max(np.abs(np.asarray(reference, dtype=np.float64)), initial=0.0))
    return 2.0 * int(terms) * EPS32 * max(scale, np.finfo(np.float32).tiny)
