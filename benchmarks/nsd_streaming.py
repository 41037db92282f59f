"""Streaming a MindEye2 subject: open time, load times and peak memory against what is kept.

Writes a random MindEye2 download in the published layout (``betas_all_subj01_fp32_renorm.hdf5``,
``wds/subj01/{train,new_test,test}/*.tar``, ``coco_images_224_float16.hdf5``; see
:func:`brainrecon.data.miniature.write_mindeye2`) and measures, each step in a fresh process so
that its peak resident set size (``VmHWM``) is its own:

* ``open``: ``load_dataset`` (reads every behaviour row of the shards, no betas, no images);
* ``averages``: the training split's per-image averages (streams every training trial of the
  betas HDF5 once, in row order) — what ridge and evaluation use;
* ``trials``: every training single trial as one float32 array (what ``ridge --param
  trials=single`` fits on);
* ``images``: 256 training images (lazy reads of the float16 image HDF5).

"kept" is the size of what the step returns; a streaming reader's peak grows by about that
much over the interpreter's baseline (``open``).

Usage::

    python benchmarks/nsd_streaming.py                       # small (default)
    python benchmarks/nsd_streaming.py --size full --keep /big/disk/me2   # 40 sessions x 15,724 voxels (1.9 GB betas)

``--size full`` writes about 1.9 GB of betas and 224-px images for 10,000 images (about 3 GB).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _machine import describe_machine  # noqa: E402

# n_voxels, train images, shared images, sessions, image side
SIZES = {
    "small": (2000, 900, 100, 4, 64),
    "medium": (15724, 2000, 200, 10, 112),
    "full": (15724, 9000, 1000, 40, 224),
}


def _peak_rss_mb() -> float:
    """This process's peak resident set size. VmHWM belongs to the address space made by exec, so
    unlike ``ru_maxrss`` it does not carry the parent's peak over (the parent wrote the data)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _step(root: str, step: str) -> dict:
    import numpy as np

    from brainrecon.data import load_dataset

    t0 = time.perf_counter()
    ds = load_dataset(root)
    t_open = time.perf_counter() - t0
    kept = 0
    t0 = time.perf_counter()
    if step == "averages":
        arr = ds.train.voxels(1)
        kept = arr.nbytes
    elif step == "trials":
        arr, rows = ds.train.trial_voxels(1)
        kept = arr.nbytes + rows.nbytes
    elif step == "images":
        arr = ds.train.images(1, np.arange(256))
        kept = arr.nbytes
    seconds = time.perf_counter() - t0 if step != "open" else t_open
    info = ds.info()["subjects"][1]
    return {"step": step, "seconds": seconds, "open_seconds": t_open, "kept_mb": kept / 2 ** 20,
            "peak_rss_mb": _peak_rss_mb(),
            "n_trials": info["trials"]["train"]["n_trials"], "n_images": info["n_train"],
            "n_voxels": info["n_voxels"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--keep", type=Path, default=None,
                        help="write the data here and keep it (default: a temporary folder, removed after)")
    parser.add_argument("--step", help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.step:
        print(json.dumps(_step(args.root, args.step)))
        return 0

    from brainrecon.data.miniature import write_mindeye2

    V, n_train, n_shared, sessions, side = SIZES[args.size]
    tmp = None
    if args.keep is None:
        tmp = tempfile.TemporaryDirectory(prefix="nsd-streaming-")
        root = Path(tmp.name)
    else:
        root = args.keep
    try:
        if not (root / "betas_all_subj01_fp32_renorm.hdf5").exists():
            t0 = time.perf_counter()
            write_mindeye2(root, subjects=(1,), n_voxels=V, n_images=n_train, n_shared=n_shared,
                           n_sessions=sessions, image_size=side)
            print(f"wrote {args.size} MindEye2 data in {time.perf_counter() - t0:.1f} s "
                  f"({sum(p.stat().st_size for p in root.rglob('*') if p.is_file()) / 2 ** 30:.2f} GiB)")
        rows = []
        for step in ("open", "averages", "trials", "images"):
            out = subprocess.run([sys.executable, __file__, "--step", step, "--root", str(root)],
                                 capture_output=True, text=True, check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        base = rows[0]["peak_rss_mb"]
        print(f"machine: {describe_machine('cpu')}")
        print(f"size {args.size}: {rows[0]['n_trials']} training trials of {rows[0]['n_images']} images, "
              f"{rows[0]['n_voxels']} voxels, {side}-px images")
        print("| step | seconds | kept (MB) | peak RSS (MB) | peak over open (MB) |")
        print("|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['step']} | {r['seconds']:.2f} | {r['kept_mb']:.0f} | {r['peak_rss_mb']:.0f} | "
                  f"{r['peak_rss_mb'] - base:.0f} |")
    finally:
        if tmp is not None:
            tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
