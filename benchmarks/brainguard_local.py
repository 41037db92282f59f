"""The local BrainGuard fit of this checkout against the code of an earlier commit, in one run.

The same command (``workflows.fit("brainguard", ...)`` on the synthetic subjects 1 and 2,
pixel targets) runs in fresh processes, alternating between a temporary ``git worktree`` of
``--baseline`` and this checkout, ``--repeats`` times each, so that load on a shared machine
falls on both alike. Each process prints its wall and CPU seconds for the fit alone (data and
imports excluded); the table gives the medians and the ratio this/baseline.

Usage::

    python benchmarks/brainguard_local.py                           # baseline d27227e, h=256, 3 rounds
    python benchmarks/brainguard_local.py --hidden 2048 --rounds 1 --baseline d27227e
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
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


def run_once(tree: Path, hidden: int, rounds: int) -> dict:
    env = dict(os.environ, PYTHONPATH=str(tree), TQDM_DISABLE="1", PYTHONWARNINGS="ignore")
    result = subprocess.run([sys.executable, "-c", CHILD, str(hidden), str(rounds)], cwd=tree, env=env,
                            capture_output=True, text=True, timeout=3600)
    if result.returncode != 0:
        raise SystemExit(f"the fit in {tree} failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", default="d27227e", help="git commit to compare with (default: %(default)s, "
                        "2026-11-23, before the December BrainGuard changes)")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "baseline"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(base), args.baseline],
                       check=True)
        try:
            times: dict[str, list[dict]] = {"baseline": [], "this": []}
            for i in range(args.repeats):
                for name, tree in (("baseline", base), ("this", ROOT)):
                    t = run_once(tree, args.hidden, args.rounds)
                    times[name].append(t)
                    print(f"  repeat {i + 1} {name:8s} wall {t['wall']:6.1f} s  cpu {t['cpu']:6.1f} s", flush=True)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base)], check=False)

    print(f"\n{describe_machine()}")
    print(f"BrainGuard local fit, synthetic subjects 1 and 2, pixels, hidden {args.hidden}, {args.rounds} round(s); "
          f"median of {args.repeats}, alternating\n")
    print("| code | wall s | CPU s |")
    print("|---|---|---|")
    med = {k: {m: statistics.median(t[m] for t in v) for m in ("wall", "cpu")} for k, v in times.items()}
    print(f"| {args.baseline} (baseline) | {med['baseline']['wall']:.1f} | {med['baseline']['cpu']:.1f} |")
    print(f"| this checkout | {med['this']['wall']:.1f} | {med['this']['cpu']:.1f} |")
    print(f"| ratio this/baseline | {med['this']['wall'] / med['baseline']['wall']:.2f} | "
          f"{med['this']['cpu'] / med['baseline']['cpu']:.2f} |")


if __name__ == "__main__":
    main()
