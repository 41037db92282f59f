"""Ridge with alpha per target: brainrecon vs himalaya vs scikit-learn, and the floor.

One synthetic regression problem and one 10-alpha grid for

* brainrecon ``RidgeCV`` (exact leave-one-out, alpha per target) on ``--device``, and on
  the numpy backend for reference (CPU runs);
* himalaya ``KernelRidgeCV`` (linear kernel, 5-fold CV, alpha per target, torch backend),
  timed with ``get_primal_coef()`` so that both produce primal weights;
* scikit-learn ``RidgeCV(alpha_per_target=True)`` (exact leave-one-out, float64 inside);
* the floor: the operations exact leave-one-out cannot avoid, timed in the same run on the
  same machine: the Gram matrix ``X Xᵀ``, one eigendecomposition, one n x n by n x t
  product per alpha plus two more (rotating the targets, the refit), and ``Xᵀ C``.
  On the CPU each operation is timed with torch and with numpy/SciPy and the faster
  counts, so the floor is the lowest seen.

Every method runs in a fresh subprocess on the same saved inputs, so its peak memory is
its own: on the CPU the growth of the peak resident set size (``ru_maxrss``) over the
process after the inputs are loaded; on CUDA ``torch.cuda.max_memory_allocated`` (device
memory only).

Usage::

    python benchmarks/ridge.py --size small --repeat 3
    python benchmarks/ridge.py --size medium --repeat 2 --once sklearn
    python benchmarks/ridge.py --size nsd --device cuda --skip sklearn
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

SIZES = {
    "small": (2000, 4000, 4096),
    "medium": (3000, 6000, 12288),
    "nsd": (8859, 15724, 12288),
}
METHODS = ("floor", "brainrecon", "brainrecon-numpy", "himalaya", "sklearn")
N_ALPHAS = 10


def alpha_grid(p: int) -> np.ndarray:
    """10 alphas from 0.01 p to 100 p (z-scored X: mean kernel eigenvalue about p)."""
    return p * np.logspace(-2, 2, N_ALPHAS)


def make_data(n: int, p: int, t: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """z-scored X (n, p) and Y (n, t), float32; a rank-64 signal whose strength varies by
    target, so that targets prefer different alphas."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, p), dtype=np.float32)
    X -= X.mean(0)
    X /= X.std(0, ddof=1)
    rank = 64
    A = rng.standard_normal((p, rank), dtype=np.float32) / np.float32(np.sqrt(p))
    B = rng.standard_normal((rank, t), dtype=np.float32)
    B *= (10.0 ** rng.uniform(-2.0, 0.5, t)).astype(np.float32)
    Y = (X @ A) @ B
    Y += rng.standard_normal((n, t), dtype=np.float32)
    return X, Y


# --------------------------------------------------------------------------- workers
def _sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def _floor_torch(X, Y, alphas, device):
    import torch

    dev = "cuda" if device == "cuda" else "cpu"
    Xt = torch.as_tensor(X, device=dev)
    Yt = torch.as_tensor(Y, device=dev)
    n, t = Y.shape
    times = {}
    _sync(device)
    t0 = time.perf_counter()
    K = Xt @ Xt.T
    _sync(device)
    times["gram"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    s, V = torch.linalg.eigh(K)
    _sync(device)
    times["eigh"] = time.perf_counter() - t0
    del K
    out = torch.empty((n, t), device=dev)
    t0 = time.perf_counter()
    Z = V.T @ Yt
    for _ in range(len(alphas) + 1):
        torch.matmul(V, Z, out=out)
    _sync(device)
    times["products"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    B = Xt.T @ out
    _sync(device)
    times["primal"] = time.perf_counter() - t0
    del B
    return times


def _floor_numpy(X, Y, alphas):
    import scipy.linalg

    n, t = Y.shape
    times = {}
    t0 = time.perf_counter()
    K = X @ X.T
    times["gram"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    s, V = scipy.linalg.eigh(K, driver="evd", check_finite=False)
    times["eigh"] = time.perf_counter() - t0
    V = np.ascontiguousarray(V)
    out = np.empty((n, t), dtype=np.float32)
    t0 = time.perf_counter()
    Z = V.T @ Y
    for _ in range(len(alphas) + 1):
        np.matmul(V, Z, out=out)
    times["products"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    B = X.T @ out
    times["primal"] = time.perf_counter() - t0
    del B
    return times


def run_method(method: str, X, Y, alphas, device: str) -> tuple[dict, np.ndarray | None]:
    """Time one method; returns (info, chosen alpha per target or None)."""
    if method == "floor":
        parts = {"torch": _floor_torch(X, Y, alphas, device)}
        if device == "cpu":
            parts["numpy"] = _floor_numpy(X, Y, alphas)
        best = {k: min(p[k] for p in parts.values()) for k in parts["torch"]}
        return {"seconds": sum(best.values()), "parts": best,
                "by_backend": {b: sum(v.values()) for b, v in parts.items()}}, None
    if method.startswith("brainrecon"):
        from brainrecon.decoders.ridge import AlphaGridWarning, RidgeCV

        dev = "numpy" if method == "brainrecon-numpy" else device
        model = RidgeCV(alphas=alphas, device=dev, dtype="float32")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", AlphaGridWarning)
            _sync(device)
            t0 = time.perf_counter()
            model.fit(X, Y)
            _sync(device)
        return {"seconds": time.perf_counter() - t0}, model.alphas_
    if method == "himalaya":
        from himalaya.backend import get_backend, set_backend
        from himalaya.kernel_ridge import KernelRidgeCV

        previous = get_backend().name
        set_backend("torch_cuda" if device == "cuda" else "torch")
        try:
            n, t = Y.shape
            solver_params = {"local_alpha": True}
            if n * t > 50_000_000:  # NSD scale: the memory-saving settings
                solver_params.update(n_targets_batch=4096, n_alphas_batch=5, n_targets_batch_refit=4096)
            model = KernelRidgeCV(alphas=alphas, kernel="linear", fit_intercept=True, cv=5,
                                  solver_params=solver_params)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                _sync(device)
                t0 = time.perf_counter()
                model.fit(X, Y)
                model.get_primal_coef()
                _sync(device)
                seconds = time.perf_counter() - t0
            chosen = np.asarray(get_backend().to_numpy(model.best_alphas_), dtype=np.float64)
        finally:
            set_backend(previous)
        return {"seconds": seconds}, chosen
    if method == "sklearn":
        from sklearn.linear_model import RidgeCV as SklearnRidgeCV

        model = SklearnRidgeCV(alphas=alphas, alpha_per_target=True, fit_intercept=True)
        t0 = time.perf_counter()
        model.fit(X, Y)
        return {"seconds": time.perf_counter() - t0}, np.asarray(model.alpha_, dtype=np.float64)
    raise ValueError(method)


def worker(method: str, data: Path, device: str) -> None:
    # Import every library first, so that the memory baseline includes them.
    import himalaya.kernel_ridge  # noqa: F401
    import scipy.linalg  # noqa: F401
    import sklearn.linear_model  # noqa: F401
    import torch  # noqa: F401

    import brainrecon.decoders.ridge  # noqa: F401

    X = np.load(data / "X.npy")
    Y = np.load(data / "Y.npy")
    alphas = np.load(data / "alphas.npy")
    if device == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats()
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    info, chosen = run_method(method, X, Y, alphas, device)
    if device == "cuda" and method != "sklearn":
        import torch

        info["peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    else:
        info["peak_mb"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
    if chosen is not None:
        np.save(data / f"alphas_{method}.npy", chosen)
    print("RESULT " + json.dumps(info))


# --------------------------------------------------------------------------- driver
def _describe_machine(device: str) -> str:
    import torch

    cpu = f"{os.cpu_count()} CPU cores, torch {torch.__version__} ({torch.get_num_threads()} threads)"
    if device == "cuda":
        return f"{torch.cuda.get_device_name()} ; {cpu}"
    return cpu


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--skip", nargs="*", default=[], choices=METHODS[1:],
                        help="methods to leave out (e.g. sklearn at medium/nsd)")
    parser.add_argument("--once", nargs="*", default=[], choices=METHODS[1:],
                        help="methods to run in the first round only (slow peers)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeat", type=int, default=1,
                        help="rounds over all methods; the best round of each is reported")
    parser.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        worker(args.worker, args.data, args.device)
        return 0

    n, p, t = SIZES[args.size]
    methods = [m for m in METHODS if m not in args.skip]
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print(f"size {args.size} (n={n}, p={p}, t={t}), device cuda: skipped: no CUDA device")
            return 0
        methods = [m for m in methods if m != "brainrecon-numpy"]

    print(f"ridge benchmark: size {args.size} (n={n}, p={p}, t={t}), {N_ALPHAS} alphas "
          f"(p * logspace(-2, 2)), float32 inputs, device {args.device}, {args.repeat} round(s)")
    print(f"machine: {_describe_machine(args.device)}; load average at start {_load()}")
    results = {}
    with tempfile.TemporaryDirectory(prefix="ridge-bench-") as tmp:
        data = Path(tmp)
        t0 = time.perf_counter()
        X, Y = make_data(n, p, t, args.seed)
        np.save(data / "X.npy", X)
        np.save(data / "Y.npy", Y)
        np.save(data / "alphas.npy", alpha_grid(p))
        del X, Y
        print(f"data generated in {time.perf_counter() - t0:.1f} s; inputs X {n * p * 4 / 2**20:.0f} MB, "
              f"Y {n * t * 4 / 2**20:.0f} MB")
        # Rounds interleave the methods, so that a burst of load from elsewhere on a shared
        # machine hits all of them alike; each method's best round is reported.
        failed = set()
        for round_ in range(args.repeat):
            for method in methods:
                if method in failed or (round_ > 0 and method in args.once):
                    continue
                cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", method,
                       "--data", str(data), "--device", args.device]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
                if proc.returncode or not lines:
                    print(f"{method}: failed (exit {proc.returncode})\n{proc.stderr[-2000:]}")
                    failed.add(method)
                    continue
                info = json.loads(lines[-1][len("RESULT "):])
                info["rounds"] = results.get(method, {}).get("rounds", []) + [info["seconds"]]
                if method not in results or info["seconds"] < results[method]["seconds"]:
                    results[method] = info
                else:
                    results[method]["rounds"] = info["rounds"]
                results[method]["peak_mb"] = max(info["peak_mb"], results[method]["peak_mb"])
                print(f"  round {round_ + 1}, {method}: {info['seconds']:.2f} s", flush=True)
        chosen = {m: np.load(data / f"alphas_{m}.npy") for m in methods
                  if (data / f"alphas_{m}.npy").exists()}

    print(f"load average at end {_load()}")
    _print_table(results, chosen, args.device)
    return 0


def _load() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:  # pragma: no cover - not available on this platform
        return "n/a"


def _print_table(results: dict, chosen: dict, device: str) -> None:
    floor = results.get("floor", {}).get("seconds")
    ours = results.get("brainrecon", {}).get("seconds")
    mem_kind = "peak GPU MB" if device == "cuda" else "peak RSS MB"
    print()
    # Exact LOO reference for the agreement column: scikit-learn if it ran, else brainrecon.
    ref = "sklearn" if "sklearn" in chosen else "brainrecon"
    print(f"| method | best s | rounds s | x floor | brainrecon speed-up | {mem_kind} | same alpha as {ref} |")
    print("|---|---:|---|---:|---:|---:|---:|")
    labels = {
        "floor": "floor (Gram, eigh, 12 n×n×t products, Xᵀ C)",
        "brainrecon": f"brainrecon RidgeCV ({'cuda' if device == 'cuda' else 'torch CPU'}, exact LOO)",
        "brainrecon-numpy": "brainrecon RidgeCV (numpy/SciPy, exact LOO)",
        "himalaya": f"himalaya KernelRidgeCV ({'torch_cuda' if device == 'cuda' else 'torch'}, 5-fold)",
        "sklearn": "scikit-learn RidgeCV (alpha_per_target, float64)",
    }
    for method, info in results.items():
        sec = info["seconds"]
        ratio = f"{sec / floor:.2f}" if floor else "-"
        speed = f"{sec / ours:.2f}x" if ours and method not in ("floor", "brainrecon") else "-"
        agree = "-"
        if method in chosen and ref in chosen and method != ref:
            # himalaya returns float32 alphas: compare to float32 precision.
            agree = f"{100 * np.mean(np.isclose(chosen[method], chosen[ref], rtol=1e-6)):.1f}%"
        mem = f"{info['peak_mb']:.0f}" if info.get("peak_mb") is not None else "-"
        rounds = " / ".join(f"{r:.2f}" for r in info.get("rounds", [sec]))
        print(f"| {labels[method]} | {sec:.2f} | {rounds} | {ratio} | {speed} | {mem} | {agree} |")
    if "floor" in results:
        parts = results["floor"]["parts"]
        detail = ", ".join(f"{k} {v:.2f} s" for k, v in parts.items())
        backends = ", ".join(f"{b} {v:.2f} s" for b, v in results["floor"]["by_backend"].items())
        print(f"\nfloor parts (fastest backend per operation): {detail}; totals by backend: {backends}")


if __name__ == "__main__":
    sys.exit(main())
