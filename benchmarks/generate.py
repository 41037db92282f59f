"""Images per second of the IP-Adapter Plus generator (tokens -> 512×512 images).

What is timed is :meth:`brainrecon.generate.IPAdapterGenerator.generate` on a full-size
Stable Diffusion 1.5 UNet (859,520,964 parameters) and VAE with **random weights** (same
shapes, so the same cost as the real ones), IP-Adapter Plus attention installed from a
random checkpoint of the real shapes (19,169,280 + 29,918,208 parameters; both from
:mod:`brainrecon.testing.tiny`), the projection bypassed, DDIM, guidance 7.5 (two UNet passes per step), no text tokens.

Rows
----
GPU (CUDA, fp16, SDPA): 512×512, 50 steps, batch 1 / 8 / 16 — one warm-up batch, then one
timed batch (three for batch 1); images/s and peak GPU memory.
CPU (fp32): one UNet step at batch 1 (UNet batch 2 with guidance) at 512×512 and one VAE
decode; "50 steps + decode" is an *estimate* computed from those two numbers, not a run.

Usage::

    python benchmarks/generate.py              # GPU rows when CUDA is visible, CPU rows
    python benchmarks/generate.py --cpu-only
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np
import torch


def build_generator(device: str, tiny: bool = False):
    """The generator on a random SD 1.5 + IP-Adapter Plus of the released shapes
    (``tiny``: the same architecture at toy widths, for smoke runs)."""
    from brainrecon.generate import IPAdapterGenerator
    from brainrecon.testing.tiny import random_ipadapter_state, random_sd15_pipeline

    dtype = torch.float16 if device == "cuda" else torch.float32
    pipe = random_sd15_pipeline(device, dtype, smoke=tiny)
    state = random_ipadapter_state(pipe.unet)
    n_unet = sum(p.numel() for p in pipe.unet.parameters())
    n_ip = sum(v.numel() for v in state["ip_adapter"].values())
    n_proj = sum(v.numel() for v in state["image_proj"].values())
    uncond = np.random.default_rng(0).normal(size=(16, 768)).astype(np.float32)
    gen = IPAdapterGenerator.from_pipeline(pipe, state, device=device, uncond=uncond)
    return gen, {"unet_params": n_unet, "ip_params": n_ip, "projection_params": n_proj}


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def gpu_rows(batches=(1, 8, 16), steps: int = 50) -> list[list[str]]:
    gen, _ = build_generator("cuda")
    rows = []
    for b in batches:
        tokens = np.random.default_rng(b).normal(size=(b, 16, 768)).astype(np.float32)
        gen.generate(tokens, steps=2, batch_size=b, progress=False)  # warm-up (kernels, allocator)
        torch.cuda.reset_peak_memory_stats()
        repeats = 3 if b == 1 else 1
        sync("cuda")
        t0 = time.perf_counter()
        for _ in range(repeats):
            gen.generate(tokens, steps=steps, batch_size=b, progress=False)
        sync("cuda")
        sec = (time.perf_counter() - t0) / repeats
        peak = torch.cuda.max_memory_allocated() / 2**30
        rows.append([f"GPU {torch.cuda.get_device_name()}, fp16", f"generate 512×512, {steps} DDIM steps, CFG",
                     str(b), f"{sec:.2f}", f"{b / sec:.2f}", f"{peak:.1f} GiB"])
    return rows


def cpu_rows() -> list[list[str]]:
    gen, counts = build_generator("cpu")
    pipe = gen.load()
    unet, vae = pipe.unet, pipe.vae
    text = torch.zeros(2, 1, 768)
    ip = torch.randn(2, 1, 16, 768)
    x = torch.randn(2, 4, 64, 64)
    with torch.inference_mode():
        unet(x, 500, encoder_hidden_states=text, added_cond_kwargs={"image_embeds": [ip]})  # warm-up
        t0 = time.perf_counter()
        unet(x, 500, encoder_hidden_states=text, added_cond_kwargs={"image_embeds": [ip]})
        step = time.perf_counter() - t0
        t0 = time.perf_counter()
        vae.decode(x[:1] / vae.config.scaling_factor)
        decode = time.perf_counter() - t0
    label = f"CPU ({torch.get_num_threads()} threads), fp32"
    est = 50 * step + decode
    print(f"parameters: UNet {counts['unet_params']:,}, IP-Adapter attention {counts['ip_params']:,}, "
          f"projection (bypassed) {counts['projection_params']:,}")
    return [
        [label, "one UNet step, 512×512 (UNet batch 2 = CFG)", "1", f"{step:.2f}", "–", "–"],
        [label, "VAE decode 512×512", "1", f"{decode:.2f}", "–", "–"],
        [label, "estimate: 50 steps + decode (computed, not run)", "1", f"≈ {est:.0f}", f"≈ {1 / est:.4f}", "–"],
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-only", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import diffusers

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}; torch {torch.__version__}, diffusers {diffusers.__version__}")
    header = ["device", "what", "batch", "s / batch", "images / s", "peak GPU memory"]
    rows: list[list[str]] = []
    if not args.cpu_only and torch.cuda.is_available():
        rows += gpu_rows()
    else:
        for b in (1, 8, 16):
            rows.append(["GPU", "generate 512×512, 50 DDIM steps, CFG", str(b), "skipped: no CUDA device", "–", "–"])
    rows += cpu_rows()
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
