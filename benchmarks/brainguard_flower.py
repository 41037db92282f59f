"""Seconds per BrainGuard round: Flower's deployment runtime against the in-process engine.

Same data, sizes and seeds for both engines: two synthetic subjects, CPU, one thread per
site. The local engine runs both clients in this process; the Flower engine runs
``brainrecon federate server`` (SuperLink + ServerApp) and one ``brainrecon federate site``
(SuperNode) per subject on 127.0.0.1, and every round each site's ClientApp is a fresh
process that loads its subject's data, restores its state from disk, trains, saves and
uploads. Rounds are timed one by one because they differ (round 1: training only; round 2:
the fusion learner's start phase; round 3: the steady state); the Flower times are the
server's (from sending the round's messages to the average), the local ones from the
in-process loop. One run each, printed as measured.

Usage::

    python benchmarks/brainguard_flower.py [--n-train 300] [--hidden 64] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from _machine import describe_machine  # benchmarks/ is on sys.path when run as a script


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-train", type=int, default=300)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ.setdefault("TQDM_DISABLE", "1")
    import torch

    torch.set_num_threads(1)
    from brainrecon import workflows
    from brainrecon.decoders.brainguard import decoder as decoder_module

    data = f"synthetic:n_train={args.n_train},n_test=10,image_size=32,surface_size=32"
    params = {"hidden": args.hidden, "rounds": args.rounds, "batch_size": 50, "device": "cpu",
              "progress": False, "target_options": {"size": 16}}
    work = Path(tempfile.mkdtemp(prefix="bench-flower-"))

    local_rounds: list[float] = []
    real_run = decoder_module.run_federation

    def timed_run(clients, **kwargs):
        inner = kwargs.pop("on_round_end")
        last = [time.monotonic()]

        def on_round_end(r, state, record):
            now = time.monotonic()
            local_rounds.append(now - last[0])
            inner(r, state, record)
            last[0] = time.monotonic()

        return real_run(clients, on_round_end=on_round_end, **kwargs)

    decoder_module.run_federation = timed_run
    t0 = time.monotonic()
    workflows.fit("brainguard", data=data, subjects=[1, 2], out=work / "local", params=params, evaluate=False)
    local_total = time.monotonic() - t0
    decoder_module.run_federation = real_run

    t0 = time.monotonic()
    workflows.fit("brainguard", data=data, subjects=[1, 2], out=work / "flower", evaluate=False,
                  params={**params, "checkpoint_dir": str(work / "flower-state")}, engine="flower")
    flower_total = time.monotonic() - t0
    status = json.loads((work / "flower-state" / "server" / "status.json").read_text())
    flower_rounds = status["round_seconds"]

    print(f"machine: {describe_machine('cpu')}")
    print(f"2 subjects x {args.n_train} samples, hidden {args.hidden}, pixels 16x16, batch 50, "
          f"{args.rounds} rounds, 1 thread per site")
    print("| round | local s | Flower s | Flower / local |")
    print("|---:|---:|---:|---:|")
    for k, (a, b) in enumerate(zip(local_rounds, flower_rounds), start=1):
        print(f"| {k} | {a:.2f} | {b:.2f} | {b / a:.1f} |")
    print(f"| fit end to end | {local_total:.1f} | {flower_total:.1f} | {flower_total / local_total:.1f} |")


if __name__ == "__main__":
    main()
