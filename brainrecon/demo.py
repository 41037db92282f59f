"""``brainrecon demo``: every step of the flow on the built-in synthetic dataset.

Fits each demo decoder on the synthetic subjects, reconstructs the shared test images,
scores them with the evaluation harness (metrics whose network weights are not on this
machine are listed as unavailable), prints the leaderboard and writes a picture grid with
the ground truth beside each decoder's reconstructions.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable

from brainrecon.errors import BrainreconError

#: What the demo fits: (decoder, parameters, parameters in --quick mode).
DEMO_DECODERS: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    ("ridge", {}, {}),
    # A narrow BrainGuard for a short federation: about 40 s for four subjects on 2 CPU cores.
    ("brainguard", {"hidden": 128, "rounds": 10, "lr": 1e-3, "progress": True},
     {"hidden": 64, "rounds": 2, "dfl_num_pre_loss": 2}),
]

SYNTHETIC = {"seed": 0}
SYNTHETIC_QUICK = {"seed": 0, "n_train": 200, "n_test": 16, "image_size": 32, "surface_size": 32}


def run_demo(out: str | os.PathLike = "brainrecon-demo", *, overwrite: bool = False,
             quick: bool = False, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the demo into ``out``; return the leaderboard text and the grid path."""
    from brainrecon import workflows
    from brainrecon.data.synthetic import make_synthetic

    out = Path(out)
    runs_dir = out / "runs"
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise BrainreconError(
            f"{out} already holds an earlier demo; pass --overwrite to replace it or --out DIR."
        )
    ds = make_synthetic(**(SYNTHETIC_QUICK if quick else SYNTHETIC))
    log(f"synthetic dataset: subjects {ds.subjects}, "
        f"{ds.train.n_images(ds.subjects[0])} training images each, "
        f"{ds.test.n_images(ds.subjects[0])} shared test images")
    runs = []
    for decoder, params, quick_params in DEMO_DECODERS:
        t0 = time.perf_counter()
        p = dict(params)
        if quick:
            p.update(quick_params)
        fitted = workflows.fit(decoder, dataset=ds, subjects=ds.subjects, target="pixels",
                               out=runs_dir, overwrite=overwrite, params=p, log=log)
        log(f"{decoder}: {len(fitted)} run(s) in {time.perf_counter() - t0:.1f} s")
        runs.extend(fitted)

    from brainrecon.leaderboard import leaderboard
    from brainrecon.viz import compare_runs

    table = leaderboard(runs_dir, fmt="table")
    first = ds.subjects[0]
    grid = compare_runs([r.path for r in runs if r.subject == first], out / "grid.png")
    return {"leaderboard": table, "grid": Path(grid), "runs": runs}
