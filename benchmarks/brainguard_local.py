"""The local BrainGuard fit of this checkout against the code of an earlier commit, in one run.

The same command (``workflows.fit("brainguard", ...)`` on the synthetic subjects 1 and 2,
pixel targets) runs in fresh processes, alternating between a temporary ``git worktree`` of
``--baseline`` and this checkout, ``--repeats`` times each, so that load on a shared machine
falls on both alike. Each process prints its wall and CPU seconds for the fit alone (data and
imports excluded); the table gives the medians and the ratio this/baseline.

With ``--command`` each process runs the whole command instead, as issue 25 timed it:
``brainrecon fit --decoder brainguard --subjects 1 2 --rounds R --hidden H`` on the synthetic
dataset (data, fit, predictions, run writing and scoring; a fresh cache each time), timed from
outside (wall, and the child's user + system CPU). ``--baseline`` may be given several times.

Usage::

    python benchmarks/brainguard_local.py                           # baseline d27227e, h=256, 3 rounds
    python benchmarks/brainguard_local.py --hidden 2048 --rounds 1 --baseline d27227e
    python benchmarks/brainguard_local.py --command --baseline d27227e --baseline 84013d4
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import describe_machine  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

#: Runs inside the code tree on PYTHONPATH; prints one JSON line.
CHILD = r"""
import json, sys, tempfile, time
from brainrecon.data.synthetic import make_synthetic
from brainrecon import workflows
hidden, rounds = int(sys.argv[1]), int(sys.argv[2])
ds = make_synthetic(seed=0)
with tempfile.TemporaryDirectory() as out:
    w0, c0 = time.perf_counter(), time.process_time()
    workflows.fit("brainguard", dataset=ds, subjects=[1, 2], target="pixels", out=out,
                  params={"hidden": hidden, "rounds": rounds, "progress": False}, evaluate=False,
                  log=lambda *a: None)
    print(json.dumps({"wall": time.perf_counter() - w0, "cpu": time.process_time() - c0}))
"""


#: The whole command line, as issue 25 timed it (the CLI module moved from cli.py to cli/ on the way;
#: ``from brainrecon.cli import app`` works in both).
COMMAND = "from brainrecon.cli import app; app(prog_name='brainrecon')"


def run_once(tree: Path, hidden: int, rounds: int, command: bool = False) -> dict:
    env = dict(os.environ, PYTHONPATH=str(tree), TQDM_DISABLE="1", PYTHONWARNINGS="ignore")
    if not command:
        result = subprocess.run([sys.executable, "-c", CHILD, str(hidden), str(rounds)], cwd=tree, env=env,
                                capture_output=True, text=True, timeout=3600)
        if result.returncode != 0:
            raise SystemExit(f"the fit in {tree} failed:\n{result.stderr[-2000:]}")
        return json.loads(result.stdout.strip().splitlines()[-1])
    with tempfile.TemporaryDirectory() as cache, tempfile.TemporaryDirectory() as out:
        env.update(BRAINRECON_CACHE=cache, HF_HUB_OFFLINE="1")
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        w0 = time.perf_counter()
        result = subprocess.run([sys.executable, "-c", COMMAND, "fit", "--decoder", "brainguard", "--subjects", "1",
                                 "2", "--rounds", str(rounds), "--hidden", str(hidden), "--out", out],
                                cwd=tree, env=env, capture_output=True, text=True, timeout=3600)
        wall = time.perf_counter() - w0
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if result.returncode != 0:
        raise SystemExit(f"the command in {tree} failed:\n{result.stderr[-2000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall": wall, "cpu": cpu}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", action="append", help="git commit to compare with, repeatable (default: "
                        "d27227e, 2026-11-23, before the December BrainGuard changes)")
    parser.add_argument("--command", action="store_true", help="time the whole `brainrecon fit` command, "
                        "not the fit alone")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    baselines = args.baseline or ["d27227e"]
    with tempfile.TemporaryDirectory() as tmp:
        trees = {}
        for commit in baselines:
            trees[commit] = Path(tmp) / commit
            subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(trees[commit]), commit],
                           check=True)
        trees["this"] = ROOT
        try:
            times: dict[str, list[dict]] = {name: [] for name in trees}
            for i in range(args.repeats):
                for name, tree in trees.items():
                    t = run_once(tree, args.hidden, args.rounds, args.command)
                    times[name].append(t)
                    print(f"  repeat {i + 1} {name:8s} wall {t['wall']:6.1f} s  cpu {t['cpu']:6.1f} s", flush=True)
        finally:
            for commit in baselines:
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(trees[commit])],
                               check=False)

    print(f"\n{describe_machine()}")
    what = "whole `brainrecon fit` command" if args.command else "BrainGuard local fit"
    print(f"{what}, synthetic subjects 1 and 2, pixels, hidden {args.hidden}, {args.rounds} round(s); "
          f"median of {args.repeats}, alternating\n")
    print("| code | wall s | CPU s | this/code wall | this/code CPU |")
    print("|---|---|---|---|---|")
    med = {k: {m: statistics.median(t[m] for t in v) for m in ("wall", "cpu")} for k, v in times.items()}
    for name in trees:
        label = "this checkout" if name == "this" else f"{name} (baseline)"
        print(f"| {label} | {med[name]['wall']:.1f} | {med[name]['cpu']:.1f} | "
              f"{med['this']['wall'] / med[name]['wall']:.2f} | {med['this']['cpu'] / med[name]['cpu']:.2f} |")

if __name__ == "__main__":
    main()
