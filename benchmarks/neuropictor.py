"""NeuroPictor: training step time and peak GPU memory, and inference speed, at full size.

Full size = the official architecture at 512 x 512 (fMRI encoder 302.6 M, ControlNet 363.1 M,
semantic network and feature transformation 7.0 M trainable; frozen SD 2.1-base UNet, VAE and
23-layer text encoder), with **random weights** of the real shapes
(:func:`brainrecon.testing.tiny.random_full_size_components`), so the cost is
that of the real model without downloading it. Data: random 256 x 256 surface maps, random
512 x 512 images and one caption each.

Training rows: stage ``finetune`` (the heaviest: auxiliary branch and semantic loss on), the
library's own ``fit`` (AdamW, bf16 autocast, frozen modules in bf16 outside the optimiser),
batch 1 / 4 / 8 / 16, with and without gradient checkpointing; 2 warm-up steps, then the mean
of 5 timed steps. Peak memory is ``torch.cuda.max_memory_allocated`` during training. Every row
runs in a fresh process so that its peak is its own; a row that runs out of memory says so.

Inference row: images per second of ``reconstruct`` at 50 DDIM steps with guidance 5.0 (two
UNet + ControlNet passes per step), batch 4, after a warm-up call.

Without CUDA the GPU rows print "skipped: no CUDA device"; ``--cpu`` adds a tiny-model CPU
measurement (labelled, not comparable with the full-size rows).

    python benchmarks/neuropictor.py
    python benchmarks/neuropictor.py --cpu
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from _machine import describe_machine  # noqa: E402 - benchmarks/ is on sys.path when run as a script

BATCHES = (1, 4, 8, 16)
WARMUP, TIMED = 2, 5
TINY = dict(surface_size=16, patch_size=4, encoder_dim=32, encoder_depth=2, encoder_heads=4,
            bottleneck_dim=16, decoder_dim=16, decoder_depth=1, decoder_heads=2, semantic_hidden=8,
            image_size=32, base_model="tiny")


def _fake_data(n: int, surface: int, image: int, seed: int = 0):
    import numpy as np

    from brainrecon.data import from_arrays

    rng = np.random.default_rng(seed)
    arrays = {
        "train_voxels": rng.standard_normal((n, 8), dtype=np.float32),
        "test_voxels": rng.standard_normal((4, 8), dtype=np.float32),
        "train_surfaces": rng.standard_normal((n, surface, surface), dtype=np.float32),
        "test_surfaces": rng.standard_normal((4, surface, surface), dtype=np.float32),
        "train_images": rng.integers(0, 256, (n, image, image, 3), dtype=np.uint8),
        "test_images": rng.integers(0, 256, (4, image, image, 3), dtype=np.uint8),
        "train_captions": np.array([["a photo of a cat on a table"]] * n),
        "test_captions": np.array([["a photo of a cat on a table"]] * 4),
    }
    return from_arrays({1: arrays}, name="benchmark")


def _decoder(full: bool, device: str, **params):
    import torch

    from brainrecon.decoders.neuropictor import NeuroPictorDecoder
    from brainrecon.testing.tiny import random_full_size_components

    sizes = {} if full else dict(TINY)
    decoder = NeuroPictorDecoder(stage="finetune", device=device, progress=False, **sizes, **params)
    if full:
        # Random weights of the real shapes stand in for stabilityai/stable-diffusion-2-1-base.
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        decoder._base_cache = random_full_size_components(device=device, dtype=dtype)
    return decoder


def train_row(full: bool, device: str, batch: int, checkpointing: bool) -> dict:
    import numpy as np
    import torch

    surface, image = (256, 512) if full else (16, 32)
    data = _fake_data(batch * (WARMUP + TIMED), surface, image)
    decoder = _decoder(full, device, batch_size=batch, steps=WARMUP + TIMED,
                       gradient_checkpointing=checkpointing)
    try:
        decoder.fit(data.train)
    except torch.cuda.OutOfMemoryError:
        return {"oom": True}
    stats = decoder.train_stats_
    step = float(np.mean(stats["step_seconds"][WARMUP:]))
    return {"step_s": step, "samples_per_s": batch / step,
            "peak_gb": stats.get("peak_memory_bytes", 0) / 2**30}


def inference_row(full: bool, device: str, batch: int = 4, steps: int = 50) -> dict:
    import time

    import torch

    surface, image = (256, 512) if full else (16, 32)
    data = _fake_data(batch, surface, image)
    decoder = _decoder(full, device, batch_size=1, steps=1, predict_batch_size=batch,
                       num_inference_steps=steps, guidance_scale=5.0)
    decoder.fit(data.train)
    surfaces = data.train.surfaces(1)[:batch]
    decoder.reconstruct(surfaces, num_inference_steps=2)  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
    tic = time.perf_counter()
    decoder.reconstruct(surfaces)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - tic
    return {"images_per_s": batch / seconds, "seconds": seconds}


def _subprocess(kind: str, **spec) -> dict:
    cmd = [sys.executable, __file__, "--row", json.dumps({"kind": kind, **spec})]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
    return {"error": tail[0][:120]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu", action="store_true", help="also measure a tiny model on the CPU")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for --cpu rows")
    parser.add_argument("--row", help=argparse.SUPPRESS)
    args = parser.parse_args()
    import torch

    if args.row:
        spec = json.loads(args.row)
        torch.set_num_threads(spec.pop("threads", torch.get_num_threads()))
        fn = train_row if spec.pop("kind") == "train" else inference_row
        print(json.dumps(fn(**spec)))
        return

    cuda = torch.cuda.is_available()
    print(f"## NeuroPictor benchmark — {describe_machine('cuda' if cuda else 'cpu')}\n")
    print("Training, full size (512 x 512, stage finetune, bf16, AdamW), mean of 5 steps after 2 warm-up:\n")
    print("| batch | grad. checkpointing | s / step | samples / s | peak GPU memory (GiB) |")
    print("|---:|:---:|---:|---:|---:|")
    for ckpt in (True, False):
        for b in BATCHES:
            if not cuda:
                print(f"| {b} | {'on' if ckpt else 'off'} | skipped: no CUDA device | | |")
                continue
            r = _subprocess("train", full=True, device="cuda", batch=b, checkpointing=ckpt)
            if r.get("oom"):
                print(f"| {b} | {'on' if ckpt else 'off'} | out of memory | | |")
            elif "error" in r:
                print(f"| {b} | {'on' if ckpt else 'off'} | error: {r['error']} | | |")
            else:
                print(f"| {b} | {'on' if ckpt else 'off'} | {r['step_s']:.3f} | {r['samples_per_s']:.2f} | {r['peak_gb']:.1f} |")
    print("\nInference, full size: DDIM 50 steps, guidance 5.0 (control in both branches), batch 4:\n")
    print("| device | images / s | s per batch of 4 |")
    print("|---|---:|---:|")
    if cuda:
        r = _subprocess("inference", full=True, device="cuda")
        if "error" in r:
            print(f"| cuda | error: {r['error']} | |")
        else:
            print(f"| cuda | {r['images_per_s']:.3f} | {r['seconds']:.2f} |")
    else:
        print("| cuda | skipped: no CUDA device | |")
    if args.cpu:
        print(f"\nTiny model on the CPU ({args.threads} thread(s); UNet (8, 16), 32 x 32 images, 16 x 16 maps) — "
              "a smoke measurement, not comparable with the rows above:\n")
        print("| what | batch | result |")
        print("|---|---:|---|")
        for b in (1, 4):
            r = _subprocess("train", full=False, device="cpu", batch=b, checkpointing=False, threads=args.threads)
            text = f"{r['step_s'] * 1000:.0f} ms / step" if "step_s" in r else r.get("error", "?")
            print(f"| training step (tiny, CPU) | {b} | {text} |")
        r = _subprocess("inference", full=False, device="cpu", threads=args.threads)
        text = f"{r['images_per_s']:.2f} images / s" if "images_per_s" in r else r.get("error", "?")
        print(f"| inference, 50 DDIM steps, guidance 5 (tiny, CPU) | 4 | {text} |")


if __name__ == "__main__":
    main()
