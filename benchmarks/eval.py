"""Time the evaluation harness: all eight metrics, full-size networks, NSD-sized test set.

The networks are the real architectures (AlexNet, Inception v3, CLIP ViT-L/14,
EfficientNet-B1, ResNet-50) with random weights, so the cost is that of real
weights without downloading them. Ground truth and reconstructions are random
uint8 images at 512 x 512; no ground-truth cache (both sets go through every
network, as in a first evaluation on a new test set).

On a CUDA device the whole 982-image set is measured. On a CPU the networks would
take about an hour, so by default a smaller N is measured end to end and the
per-image stages are extrapolated linearly to 982 (clearly labelled); the
identification scoring, whose cost grows with N^2, is measured at the full N on
random features of the true sizes.

    python benchmarks/eval.py                 # CPU: measure N=16, extrapolate to 982
    python benchmarks/eval.py --device cuda   # GPU: measure N=982
    python benchmarks/eval.py --stats-only    # statistics' cost and peak memory at N=982 (~2 min)
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

from brainrecon.eval import evaluate
from brainrecon.eval import metrics as M
from brainrecon.eval.extractors import build_network
from _machine import describe_machine  # noqa: E402 - benchmarks/ is on sys.path when run as a script

# Feature sizes of the MindEye variant (AlexNet features.4 / features.11, avgpool, CLIP embeds).
FEATURE_DIMS = {"AlexNet(2)": 192 * 31 * 31, "AlexNet(5)": 256 * 15 * 15, "Inception": 2048, "CLIP": 768,
                "EffNet-B": 1280, "SwAV": 2048}


def random_networks(device: torch.device) -> dict:
    nets = {}
    for name in ("alexnet", "inception", "clip", "effnet", "swav"):
        net = build_network(name, "mindeye", random_init=True).to(device)
        for m in net.metrics:
            nets[m] = net
    return nets


def run(n: int, size: int, device: torch.device, batch_size: int, nets: dict, seed: int = 0):
    """Evaluate n random image pairs; ``nets`` empty -> PixCorr and SSIM only."""
    rng = np.random.default_rng(seed)
    gt = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    rec = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    metrics = None if nets else ["PixCorr", "SSIM"]
    t0 = time.perf_counter()
    report = evaluate(gt, rec, metrics=metrics, device=str(device), extractors=nets, batch_size=batch_size,
                      cache_dir=False, progress=True)
    return time.perf_counter() - t0, report


def scoring_at(n: int, device: torch.device) -> dict[str, float]:
    """Seconds to score two-way identification / correlation distance at N on float32 features."""
    out = {}
    rng = np.random.default_rng(1)
    for m, d in FEATURE_DIMS.items():
        fg = torch.from_numpy(rng.standard_normal((n, d), dtype=np.float32)).to(device)
        fr = torch.from_numpy(rng.standard_normal((n, d), dtype=np.float32)).to(device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        if m in ("EffNet-B", "SwAV"):
            M.correlation_distance(fg, fr)
        else:
            M.two_way_identification(fg, fr)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        out[m] = time.perf_counter() - t0
        del fg, fr
    return out


class _StandIn(torch.nn.Module):
    """Features of a metric's true size without a forward pass (a seeded random projection of a
    pooled input), for measuring the memory of a whole N = 982 evaluation in seconds."""

    def __init__(self, dim: int, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("proj", torch.randn(3 * 4 * 4, dim, generator=g))

    def forward(self, x):
        pooled = torch.nn.functional.adaptive_avg_pool2d(x, 4).flatten(1)
        return pooled @ self.proj


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def memory_child(n: int, size: int, batch: int) -> None:
    """Run in a fresh process: peak memory of a full evaluation at N (networks' weights built,
    forward passes replaced by stand-ins of the true output sizes)."""
    base = _peak_rss_mb()
    stand_ins = {m: _StandIn(d, i) for i, (m, d) in enumerate(FEATURE_DIMS.items())}
    rng = np.random.default_rng(0)
    gt = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    rec = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    images = _peak_rss_mb()
    t0 = time.perf_counter()
    report = evaluate(gt, rec, device="cpu", extractors=stand_ins, batch_size=batch, cache_dir=False, progress=False)
    wall = time.perf_counter() - t0
    peak = _peak_rss_mb()
    del gt, rec, report
    nets = random_networks(torch.device("cpu"))
    weights = sum(p.numel() * p.element_size() for net in {id(v): v for v in nets.values()}.values()
                  for p in net.module.parameters()) / 2**20
    print(f"MEMORY python+torch {base:.0f} MB; + images (2 x {n} x {size}^2 x 3 uint8) {images:.0f} MB; "
          f"evaluate() at N={n} with stand-in forward passes: peak {peak:.0f} MB ({peak - images:.0f} MB above "
          f"the images) in {wall:.1f} s; the five networks' fp32 weights add {weights:.0f} MB")


def stats_cost(n: int) -> dict[str, float]:
    """Seconds for the statistics at N: 8 bootstrap intervals, and 8 paired comparisons."""
    from brainrecon.eval.stats import bootstrap_interval, paired_comparison

    rng = np.random.default_rng(0)
    a = [rng.uniform(size=n) for _ in range(8)]
    b = [v + rng.normal(0, 0.05, n) for v in a]
    t0 = time.perf_counter()
    for v in a:
        bootstrap_interval(v)
    t1 = time.perf_counter()
    for va, vb in zip(a, b):
        paired_comparison(va, vb)
    t2 = time.perf_counter()
    return {"8 bootstrap intervals (2000 resamples)": t1 - t0,
            "8 paired comparisons (2000 resamples + 10000 sign flips)": t2 - t1}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    p.add_argument("--n", type=int, default=982, help="test-set size to report (default 982)")
    p.add_argument("--size", type=int, default=512, help="image side in pixels (default 512)")
    p.add_argument("--measure-n", type=int, default=None,
                   help="images actually run through the networks (default: N on CUDA, 16 on CPU)")
    p.add_argument("--batch-size", type=int, default=None, help="default 64 on CUDA, 8 on CPU")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--skip-full-low-level", action="store_true",
                   help="CPU: extrapolate PixCorr/SSIM too instead of measuring them at the full N")
    p.add_argument("--stats-only", action="store_true",
                   help="only the statistics' cost and the peak memory of a full evaluation at N (CPU, ~2 min)")
    p.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        memory_child(args.n, args.size, args.batch_size or 8)
        return 0
    if args.stats_only:
        import subprocess

        print(f"machine: {describe_machine(torch.device('cpu'))}")
        for k, v in stats_cost(args.n).items():
            print(f"STATS N={args.n}: {k}: {v:.2f} s")
        cmd = [sys.executable, __file__, "--memory-child", "--n", str(args.n), "--size", str(args.size)]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        subprocess.run(cmd, check=True)
        return 0
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("cuda: skipped: no CUDA device")
        return 0
    cuda = device.type == "cuda"
    measure_n = args.measure_n or (args.n if cuda else 16)
    batch = args.batch_size or (64 if cuda else 8)
    print(f"machine: {describe_machine(device)}")
    if cuda:
        print(f"device: {torch.cuda.get_device_name(device)}")
    print(f"images: {args.size}x{args.size} uint8, ground truth + reconstructions, all eight metrics, "
          f"variant mindeye, no ground-truth cache, batch {batch}")

    t0 = time.perf_counter()
    nets = random_networks(device)
    build_s = time.perf_counter() - t0
    # Warm-up (CUDA context, kernel selection, first-call allocations), not timed.
    run(min(batch, measure_n) if cuda else 2, args.size, device, batch, nets, seed=99)
    load_before = os.getloadavg()[0]

    cpu0 = time.process_time()
    total, report = run(measure_n, args.size, device, batch, nets)
    cpu_s = time.process_time() - cpu0
    t = report.timings
    per_image = {k: v for k, v in t.items() if k not in ("scores", "total")}
    print()
    print(f"building the five random-initialised networks: {build_s:.1f} s (not included below)")
    print(f"measured: N={measure_n} in {total:.2f} s wall ({total / measure_n:.3f} s per image pair); "
          f"1-min load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after "
          f"(other processes share the CPUs when it exceeds the CPU count); "
          f"CPU time of this process {cpu_s:.1f} s")
    print(f"{'stage':34s} {'measured N=' + str(measure_n):>18s}")
    for k, v in t.items():
        print(f"{k:34s} {v:17.2f}s")
    if measure_n != args.n:
        low_s, low = run(args.n, args.size, device, batch, {}, seed=2) if not args.skip_full_low_level else (None, None)
        if low is not None:
            print()
            print(f"PixCorr + SSIM alone at N={args.n} (measured): {low_s:.1f} s wall "
                  f"(load + resize {low.timings.get('load + resize', 0):.1f} s, "
                  f"PixCorr + SSIM {low.timings.get('PixCorr + SSIM', 0):.1f} s)")
        score_full = scoring_at(args.n, device)
        print()
        print(f"scoring at N={args.n} on random features of the true sizes (measured):")
        for m, s in score_full.items():
            print(f"  {m:12s} {s:7.2f} s")
        nets_only = sum(v for k, v in per_image.items() if k.startswith("network")) * args.n / measure_n
        if low_s is None:
            low_s = sum(v for k, v in per_image.items() if not k.startswith("network")) * args.n / measure_n
        est = nets_only + low_s + sum(score_full.values())
        print()
        print(f"EXTRAPOLATION to N={args.n}: network forward passes x {args.n}/{measure_n} = {nets_only:.0f} s, "
              f"plus loading/resizing/PixCorr/SSIM {low_s:.0f} s and scoring {sum(score_full.values()):.0f} s "
              f"-> about {est:.0f} s ({est / 60:.1f} min) for all eight metrics")
    return 0


if __name__ == "__main__":
    sys.exit(main())
