"""The compute backends of the ridge solver: himalaya's numpy, torch (CPU) and torch_cuda
backend modules, imported directly so that himalaya's global backend is never changed, and
the few operations the solver needs beyond them (in-place products, a robust eigh, full
float32 precision on CUDA)."""

from __future__ import annotations

import contextlib
import importlib
import math
import warnings

import numpy as np

from brainrecon.errors import DataError

DEVICES = ("auto", "cpu", "cuda", "numpy", "torch", "torch_cuda")


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
