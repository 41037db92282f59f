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

#: On a CPU with metric weights present, the six network metrics are scored for the first
#: subject's runs on this many test images (CLIP ViT-L/14 and Inception cost ~1-4 s per image
#: on 2 cores); PixCorr and SSIM always use every test image.
CPU_NETWORK_IMAGES = 8

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
                               out=runs_dir, overwrite=overwrite, params=p, log=log, evaluate=False)
        log(f"{decoder}: {len(fitted)} run(s) in {time.perf_counter() - t0:.1f} s")
        runs.extend(fitted)
    t0 = time.perf_counter()
    _score(runs, ds.subjects[0], log)
    log(f"scored {len(runs)} run(s) in {time.perf_counter() - t0:.1f} s")

    from brainrecon.leaderboard import leaderboard
    from brainrecon.workflows.figures import compare_runs

    table = leaderboard(runs_dir, fmt="table")
    first = ds.subjects[0]
    grid = compare_runs([r.path for r in runs if r.subject == first], out / "grid.png")
    return {"leaderboard": table, "grid": Path(grid), "runs": runs}


def _score(runs, first_subject: int, log: Callable[[str], None]) -> None:
    """Score the demo's runs, never downloading: everything on a GPU or when no network weights
    are present (those metrics are then listed unavailable); on a CPU with weights present, the
    network metrics for the first subject's runs on :data:`CPU_NETWORK_IMAGES` images."""
    from brainrecon.devices import resolve_device
    from brainrecon.eval.extractors import NETWORK_METRICS, network_weight_file
    from brainrecon.eval.report import CLIP_RETRIEVAL_METRICS, TARGET_RETRIEVAL_METRICS
    from brainrecon.eval.weights import find_weights
    from brainrecon.workflows import evaluate_run_safely, log_unavailable
    from brainrecon.workflows.evaluate import evaluate_run

    present = [name for name in NETWORK_METRICS if find_weights(network_weight_file(name, "mindeye"))]
    if not present or resolve_device("auto").type == "cuda":
        # What could not be scored (weights missing) is said once, for all runs.
        log_unavailable([evaluate_run_safely(run, log=log) for run in runs], log)
        return
    log(f"CPU with metric weights present: network metrics for subject {first_subject} on its first "
        f"{CPU_NETWORK_IMAGES} test images; PixCorr and SSIM on all (`brainrecon evaluate RUN` scores everything)")
    network_metrics = [m for ms in NETWORK_METRICS.values() for m in ms]
    for run in runs:
        if run.subject == first_subject:
            evaluate_run_safely(run, log=log, network_images=CPU_NETWORK_IMAGES)
            continue
        # Retrieval in the target space needs no network: scored for every subject.
        report = evaluate_run(run, metrics=["PixCorr", "SSIM", *TARGET_RETRIEVAL_METRICS], progress=False)
        report.unavailable.update({m: f"the CPU demo scores them for subject {first_subject} only; "
                                      "`brainrecon evaluate RUN` scores them here"
                                   for m in network_metrics + list(CLIP_RETRIEVAL_METRICS)})
        report.save(run.path / "metrics.json")

