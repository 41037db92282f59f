"""Seconds per federated round and peak memory of BrainGuard training.

Four clients on random data (voxels N(0, 1), 16×768 targets), the library's own
:class:`~brainrecon.decoders.brainguard.federated.Client` and
:func:`~brainrecon.decoders.brainguard.federated.run_federation`, three rounds, timed one
by one because they differ:

- round 1: local training only (no global model yet);
- round 2: the Dynamic Fusion Learner's start phase (at least ``dfl_num_pre_loss + 1`` = 11
  epochs over each client's data) + training;
- round 3: the steady state of every later round (one fusion epoch + one training epoch).

Rows: the full published size (NSD voxel counts of subjects 1, 2, 5, 7, h = 2048, 8,859
samples each) on a CUDA device when there is one, and a reduced size on the CPU. Each
row runs in a fresh process so that its peak memory is its own.

Usage::

    python benchmarks/brainguard.py            # every row
    python benchmarks/brainguard.py --cpu-only
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from _machine import cpu_name  # noqa: E402 - benchmarks/ is on sys.path when run as a script

NSD_VOXELS = (15724, 14278, 13039, 12682)

ROWS = {
    "full, 1 GPU": dict(voxels=NSD_VOXELS, n=8859, hidden=2048, device="cuda"),
    "reduced, 1 GPU": dict(voxels=tuple(v // 10 for v in NSD_VOXELS), n=1000, hidden=256, device="cuda"),
    "reduced, CPU": dict(voxels=tuple(v // 10 for v in NSD_VOXELS), n=1000, hidden=256, device="cpu"),
    "small, CPU": dict(voxels=tuple(v // 10 for v in NSD_VOXELS), n=500, hidden=64, device="cpu"),
}


def run_row(spec: dict, threads: int) -> dict:
    import torch

    from brainrecon.decoders.brainguard.federated import Client, TrainConfig, run_federation
    from brainrecon.decoders.brainguard.model import BrainGuardNet, count_parameters

    torch.set_num_threads(threads)
    device = torch.device(spec["device"])
    config = TrainConfig(hidden=spec["hidden"], rounds=3, batch_size=50)
    torch.manual_seed(0)
    template = BrainGuardNet(1, config.hidden, config.n_blocks, 16, 768, config.dropout)
    clients = []
    for k, V in enumerate(spec["voxels"]):
        model = BrainGuardNet(V, config.hidden, config.n_blocks, 16, 768, config.dropout)
        shared = {n: p for n, p in template.state_dict().items() if not n.startswith("ridge.")}
        model.load_state_dict({**shared, **{n: p for n, p in model.state_dict().items()
                                            if n.startswith("ridge.")}}, strict=True)
        g = torch.Generator().manual_seed(k)
        X = torch.randn(spec["n"], V, generator=g)
        Y = torch.randn(spec["n"], 16, 768, generator=g)
        clients.append(Client(k + 1, X, Y, model, config, device))
    params = count_parameters(clients[0].model)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    start = [time.perf_counter()]

    def on_round_end(r, state, record):
        if device.type == "cuda":
            torch.cuda.synchronize()
        now = time.perf_counter()
        times.append(now - start[0])
        start[0] = now

    run_federation(clients, rounds=3, local_iterations=1, on_round_end=on_round_end, progress=False)
    out = {"seconds": times, "params_subject1": params}
    if device.type == "cuda":
        out["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        out["peak_kind"] = "GPU allocated"
    else:
        out["peak_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        out["peak_kind"] = "process RSS"
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-only", action="store_true")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: on a shared 2-core machine a second thread was 3x slower)")
    parser.add_argument("--row", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.row:
        print(json.dumps(run_row(ROWS[args.row], args.threads)))
        return

    import torch

    cuda = torch.cuda.is_available()
    gpu = torch.cuda.get_device_name(0) if cuda else "none"
    print(f"torch {torch.__version__}; CPU: {cpu_name()} ({args.threads} threads); GPU: {gpu}")
    print("4 clients, 16x768 targets, batch 50, n_blocks 4; times in seconds per round.")
    header = ("row", "V (subj 1..4)", "n/subject", "h", "params subj 1", "round 1 (train)",
              "round 2 (DFL start)", "round 3 (steady)", "peak memory")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for name, spec in ROWS.items():
        vox = "/".join(str(v) for v in spec["voxels"])
        lead = f"| {name} | {vox} | {spec['n']} | {spec['hidden']} |"
        if spec["device"] == "cuda" and (args.cpu_only or not cuda):
            print(f"{lead} skipped: no CUDA device |  |  |  |  |")
            continue
        proc = subprocess.run([sys.executable, __file__, "--row", name, "--threads", str(args.threads)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"{lead} failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr else proc.returncode} |  |  |  |  |")
            continue
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        t = res["seconds"]
        print(f"{lead} {res['params_subject1'] / 1e6:.1f} M | {t[0]:.2f} | {t[1]:.2f} | {t[2]:.2f} | "
              f"{res['peak_gib']:.2f} GiB ({res['peak_kind']}) |")


if __name__ == "__main__":
    main()
