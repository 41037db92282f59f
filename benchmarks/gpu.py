"""Every GPU figure of brainrecon from one short, prepared run.

    python benchmarks/gpu.py --out DIR            # on one CUDA GPU, < 8 minutes on an H100/H200
    python benchmarks/gpu.py --smoke --out DIR    # the same code at toy sizes on the CPU (CI)

Sections (each in its own child process with its own time budget; one that overruns is
stopped and reported as skipped, one that fails is printed and the next one runs):

- ``ridge``: brainrecon's RidgeCV at NSD size (n=8,859, p=15,724, t=12,288, 10 alphas) against
  the floor measured in the same run (Gram, one eigh, the per-alpha GEMMs) and himalaya's
  KernelRidgeCV on the same device (benchmarks/ridge.py's code);
- ``eval``: all eight metrics on 982 images at 512², full-size networks with random weights,
  without and with the ground-truth feature cache (smoke: PixCorr and SSIM on 8 images);
- ``generate``: SD 1.5 UNet + IP-Adapter Plus attention + VAE at 512², 50 DDIM steps with
  guidance, batch 1 / 8 / 16: images/s and peak memory (smoke: toy widths, 3 steps);
- ``neuropictor``: training step time and peak memory at batch 1 / 4 / 8 with gradient
  checkpointing on and off (bf16), sampling throughput, and the "batch >= 4 in < 24 GB" answer;
- ``brainguard``: one full-size round (NSD voxel counts, h=2048, 8,859 samples): time and peak memory.

Prints a markdown table (device, torch and CUDA versions) and writes every figure to
``DIR/gpu.json``. How to run it on the lent device machine: benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

#: seconds per section on the GPU (sum 450 s, under the 8-minute goal) and in smoke mode
BUDGETS = {"ridge": 90, "eval": 120, "generate": 90, "neuropictor": 100, "brainguard": 50}
SMOKE_BUDGETS = {"ridge": 40, "eval": 40, "generate": 40, "neuropictor": 60, "brainguard": 40}


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _peak_gib(device: str) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None


def _reset_peak(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()


# ---------------------------------------------------------------------------- sections
def section_ridge(device: str, smoke: bool) -> dict:
    import ridge as rb

    n, p, t = (300, 400, 256) if smoke else (8859, 15724, 12288)
    X, Y = rb.make_data(n, p, t)
    alphas = rb.alpha_grid(p)
    out = {"n": n, "p": p, "t": t, "n_alphas": int(len(alphas))}
    for method in ("floor", "brainrecon", "himalaya"):
        try:
            info, _ = rb.run_method(method, X, Y, alphas, device)
            out[f"{method}_s"] = info["seconds"]
        except ImportError as exc:
            out[f"{method}_s"] = None
            out[f"{method}_error"] = f"not installed: {exc}"
    if out.get("floor_s") and out.get("brainrecon_s"):
        out["brainrecon_over_floor"] = out["brainrecon_s"] / out["floor_s"]
    return out


def section_eval(device: str, smoke: bool) -> dict:
    import eval as eb
    import numpy as np
    import torch

    from brainrecon.eval import evaluate

    n, size = (8, 32) if smoke else (982, 512)
    nets = {} if smoke else eb.random_networks(torch.device(device))
    metrics = ["PixCorr", "SSIM"] if smoke else None
    rng = np.random.default_rng(0)
    gt = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    rec = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    ids = np.arange(n)
    import tempfile

    cache = Path(tempfile.mkdtemp(prefix="brainrecon-gpu-bench-cache-"))  # cold first, then warm
    out = {"n": n, "size": size, "metrics": "PixCorr, SSIM" if smoke else "all eight"}
    _reset_peak(device)
    for label, cache_dir in (("no_cache", False), ("cold_cache", cache), ("warm_cache", cache)):
        _sync(device)
        t0 = time.perf_counter()
        evaluate(gt, rec, metrics=metrics, device=device, extractors=nets, batch_size=64 if device == "cuda" else 8,
                 cache_dir=cache_dir, gt_ids=ids, progress=False)
        _sync(device)
        out[f"{label}_s"] = time.perf_counter() - t0
    out["peak_gib"] = _peak_gib(device)
    return out


def section_generate(device: str, smoke: bool) -> dict:
    import generate as gb
    import numpy as np

    gen, sizes = gb.build_generator(device, tiny=smoke)
    steps = 3 if smoke else 50
    out = {"steps": steps, **sizes}
    for b in (1, 2) if smoke else (1, 8, 16):
        tokens = np.random.default_rng(b).normal(size=(b, 16, 768)).astype(np.float32)
        gen.generate(tokens, steps=2, batch_size=b, progress=False)  # warm-up
        _reset_peak(device)
        _sync(device)
        t0 = time.perf_counter()
        gen.generate(tokens, steps=steps, batch_size=b, progress=False)
        _sync(device)
        sec = time.perf_counter() - t0
        out[f"batch{b}_s"] = sec
        out[f"batch{b}_images_per_s"] = b / sec
        out[f"batch{b}_peak_gib"] = _peak_gib(device)
    return out


def section_neuropictor(device: str, smoke: bool) -> dict:
    import neuropictor as nb

    full = not smoke
    out = {}
    for batch in (1, 2) if smoke else (1, 4, 8):
        for ckpt in (True, False):
            row = nb.train_row(full, device, batch, ckpt)
            key = f"train_b{batch}_{'ckpt' if ckpt else 'nockpt'}"
            for k, v in row.items():
                out[f"{key}_{k}"] = v
    row = nb.inference_row(full, device, batch=2 if smoke else 4, steps=3 if smoke else 50)
    out.update({f"sample_{k}": v for k, v in row.items()})
    if device == "cuda":
        peaks = [out.get(f"train_b{b}_{c}_peak_gb") for b in (4, 8) for c in ("ckpt", "nockpt")]
        fits = [p for p in peaks if p is not None and p < 24]
        out["batch4_under_24GB"] = bool(fits)
        out["batch4_best_peak_gb"] = min(p for p in peaks if p is not None) if any(p is not None for p in peaks) else None
    return out


def section_brainguard(device: str, smoke: bool) -> dict:
    import brainguard as gb

    spec = (dict(voxels=(120, 100), n=64, hidden=32, device=device) if smoke
            else dict(gb.ROWS["full, 1 GPU"], device=device))
    row = gb.run_row(spec, threads=2 if smoke else 8)
    return {"voxels": list(spec["voxels"]), "n": spec["n"], "hidden": spec["hidden"],
            "round_s": row["seconds"], "peak_gib": row["peak_gib"], "peak_kind": row["peak_kind"],
            "params_subject1": row["params_subject1"]}


SECTIONS = {
    "ridge": section_ridge,
    "eval": section_eval,
    "generate": section_generate,
    "neuropictor": section_neuropictor,
    "brainguard": section_brainguard,
}


# ---------------------------------------------------------------------------- driver
def _child(name: str, device: str, smoke: bool, result: Path) -> None:
    import torch

    if device == "cpu":
        torch.set_num_threads(min(2, os.cpu_count() or 1))
    figures = SECTIONS[name](device, smoke)
    result.write_text(json.dumps(figures, default=float))


def _run_section(name: str, device: str, smoke: bool, out: Path, budget: float) -> dict:
    result = out / f".{name}.json"
    result.unlink(missing_ok=True)
    cmd = [sys.executable, __file__, "--child", name, "--device", device, "--out", str(out)]
    if smoke:
        cmd.append("--smoke")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        log, _ = proc.communicate(timeout=budget)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return {"status": f"skipped: over its {budget:.0f} s budget", "wall_s": time.perf_counter() - t0}
    wall = time.perf_counter() - t0
    if proc.returncode != 0 or not result.is_file():
        tail = [line for line in log.strip().splitlines() if line.strip()][-3:]
        print(f"[{name}] failed (exit {proc.returncode}):\n  " + "\n  ".join(tail), flush=True)
        return {"status": f"failed: {tail[-1][:160] if tail else 'no output'}", "wall_s": wall}
    figures = json.loads(result.read_text())
    result.unlink()
    return {"status": "ok", "wall_s": wall, **figures}


def _fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.3g}"
    if isinstance(v, list):
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    return str(v)


def _environment(device: str) -> dict:
    import torch

    env = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": sys.version.split()[0]}
    if device == "cuda":
        env["device"] = torch.cuda.get_device_name()
    else:
        from _machine import cpu_name

        env["device"] = f"CPU {cpu_name()}"
    return env


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("gpu-bench"), help="folder for gpu.json")
    parser.add_argument("--smoke", action="store_true", help="toy sizes on the CPU (CI)")
    parser.add_argument("--device", default=None, help="cuda (default) or cpu (--smoke default)")
    parser.add_argument("--only", nargs="*", choices=sorted(SECTIONS), default=None)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    device = args.device or ("cpu" if args.smoke else "cuda")
    args.out.mkdir(parents=True, exist_ok=True)
    if args.child:
        _child(args.child, device, args.smoke, args.out / f".{args.child}.json")
        return 0
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("error: no CUDA device; run with --smoke on a CPU", file=sys.stderr)
            return 1
    budgets = SMOKE_BUDGETS if args.smoke else BUDGETS
    env = _environment(device)
    report = {"environment": env, "smoke": args.smoke, "sections": {}}
    t_all = time.perf_counter()
    for name in args.only or SECTIONS:
        print(f"[{name}] running (budget {budgets[name]} s)", flush=True)
        report["sections"][name] = res = _run_section(name, device, args.smoke, args.out, budgets[name])
        print(f"[{name}] {res['status']} in {res['wall_s']:.1f} s", flush=True)
        (args.out / "gpu.json").write_text(json.dumps(report, indent=2, default=float))
    report["total_s"] = time.perf_counter() - t_all
    (args.out / "gpu.json").write_text(json.dumps(report, indent=2, default=float))

    print(f"\n## brainrecon GPU figures{' (smoke, toy sizes)' if args.smoke else ''}\n")
    print(f"device: {env['device']}; torch {env['torch']}, CUDA {env['cuda']}, Python {env['python']}; "
          f"total {report['total_s']:.1f} s\n")
    print("| section | figure | value |\n|---|---|---|")
    for name, res in report["sections"].items():
        for k, v in res.items():
            print(f"| {name} | {k} | {_fmt(v)} |")
    print(f"\nwrote {args.out / 'gpu.json'}")
    failed = [n for n, r in report["sections"].items() if r["status"] != "ok"]
    # In smoke mode every section must work, so the script cannot rot unnoticed.
    return 1 if (args.smoke and failed) else 0


if __name__ == "__main__":
    sys.exit(main())
