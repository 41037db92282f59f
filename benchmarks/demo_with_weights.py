"""Time ``brainrecon demo`` with every metric weight present (random weights of the real sizes).

The five metric networks (AlexNet, Inception v3, CLIP ViT-L/14, EfficientNet-B1, SwAV ResNet-50)
are built with random weights at their real sizes
(:func:`brainrecon.testing.tiny.write_random_metric_weights`) and saved under their real file names into a
temporary weights directory (the torchvision files' SHA-256 name check is switched off for this
process only, since random files cannot match it), then the demo runs exactly as a user's would,
with ``BRAINRECON_WEIGHTS`` pointing there. Nothing is downloaded.

    python benchmarks/demo_with_weights.py [--quick] [--keep DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from _machine import describe_machine  # noqa: E402 - benchmarks/ is on sys.path when run as a script


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="the demo's --quick mode")
    p.add_argument("--keep", type=Path, default=None, help="keep the weights and demo output here")
    args = p.parse_args(argv)
    from brainrecon.eval import weights as W
    from brainrecon.testing.tiny import write_random_metric_weights

    for key, wf in list(W.WEIGHT_FILES.items()):
        W.WEIGHT_FILES[key] = dataclasses.replace(wf, sha256_prefix=None)
    root = Path(args.keep or tempfile.mkdtemp(prefix="brainrecon-demo-bench-"))
    weights = root / "weights"
    weights.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    sizes = write_random_metric_weights(weights)
    print(f"machine: {describe_machine(torch.device('cpu'))}; 1-min load average {os.getloadavg()[0]:.1f}")
    print(f"wrote random-weight files of the real sizes in {time.perf_counter() - t0:.0f} s: "
          + ", ".join(f"{k} {v / 2**20:.0f} MB" for k, v in sizes.items()))
    os.environ["BRAINRECON_WEIGHTS"] = str(weights)
    os.environ["BRAINRECON_CACHE"] = str(root / "cache")
    from brainrecon.demo import run_demo

    t0 = time.perf_counter()
    result = run_demo(root / "demo", overwrite=True, quick=args.quick, log=lambda m: print(f"· {m}"))
    wall = time.perf_counter() - t0
    print(result["leaderboard"])
    print(f"DEMO with all metric weights present: {wall:.1f} s wall, peak RSS "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10:.0f} MB, "
          f"1-min load average after {os.getloadavg()[0]:.1f}")
    if args.keep is None:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
