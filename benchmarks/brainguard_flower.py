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

With ``--fixed-cost`` it measures instead what every Flower message costs a site besides its
training, step by step in a fresh process as Flower 1.42 starts one ClientApp process per
message: process start, importing brainrecon and flwr, loading the subject's data, building the
model and client, restoring and saving the state, turning the upload into a Flower record.
``--nsd`` gives these the sizes of the published setting (NSD subject 1: 15,724 voxels, 8,859
training samples, IP-Adapter targets of 16 x 768, h = 2048, 4 blocks, AdamW state after a step)
with random data; Flower's own transport of the upload is not included.

Usage::

    python benchmarks/brainguard_flower.py [--n-train 300] [--hidden 64] [--rounds 3]
    python benchmarks/brainguard_flower.py --fixed-cost [--nsd]   # --nsd needs ~6 GB RAM
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _machine import describe_machine  # benchmarks/ is on sys.path when run as a script

STEPS = ("process start", "import brainrecon + flwr", "load data", "build model + client",
         "restore state", "save state", "upload to Flower record")


def worker(work: Path, voxels: int, samples: int, hidden: int) -> dict:
    started = time.monotonic()
    times = {}
    t = time.monotonic()
    import numpy as np
    import torch
    from flwr.app import ArrayRecord

    import brainrecon.federation.app  # noqa: F401  (what the ClientApp process imports)
    times["import brainrecon + flwr"] = time.monotonic() - t
    torch.set_num_threads(1)

    from safetensors.torch import load_file, save_file

    from brainrecon.decoders.brainguard.decoder import BrainGuardDecoder
    from brainrecon.decoders.brainguard.federated import Client

    t = time.monotonic()
    X = torch.from_numpy(np.load(work / "voxels.npy"))
    Y = torch.from_numpy(np.load(work / "targets.npy"))
    times["load data"] = time.monotonic() - t

    t = time.monotonic()
    decoder = BrainGuardDecoder.for_subjects([1], hidden=hidden, target="ipadapter", device="cpu", progress=False)
    config = decoder._train_config()
    _, n_tokens, token_dim = decoder._target_layout()
    model = decoder._initial_models(config, {1: voxels}, n_tokens, token_dim)[1]
    client = Client(1, X, Y, model, config, torch.device("cpu"))
    times["build model + client"] = time.monotonic() - t

    # One optimiser step, so the state holds AdamW's moments as after any round (not timed).
    out = client.model(X[:8])
    out.float().pow(2).mean().backward()
    client.optimizer.step()
    client.optimizer.zero_grad()
    tensors, meta = client.checkpoint_state()
    state_mb = sum(v.numel() * v.element_size() for v in tensors.values()) / 2**20
    path = work / "state.safetensors"

    t = time.monotonic()
    tensors, meta = client.checkpoint_state()
    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(path))
    times["save state"] = time.monotonic() - t

    t = time.monotonic()
    client.restore(load_file(str(path)), meta)
    times["restore state"] = time.monotonic() - t

    t = time.monotonic()
    upload = client.upload()
    record = ArrayRecord.from_torch_state_dict(upload)
    upload_mb = sum(v.numel() * v.element_size() for v in upload.values()) / 2**20
    back = record.to_torch_state_dict()
    times["upload to Flower record"] = time.monotonic() - t
    assert back.keys() == upload.keys()
    return {"times": times, "state_mb": state_mb, "upload_mb": upload_mb,
            "inside": time.monotonic() - started}


def fixed_cost(args) -> None:
    """The fixed cost of one message at a site, step by step, in a fresh process."""
    voxels, samples, hidden = (15724, 8859, 2048) if args.nsd else (2000, 1000, 256)
    os.environ["OMP_NUM_THREADS"] = "1"
    if args.worker:
        print(json.dumps(worker(Path(args.worker), voxels, samples, hidden)))
        return
    import numpy as np

    with tempfile.TemporaryDirectory(prefix="bench-flower-fixed-") as d:
        work = Path(d)
        rng = np.random.default_rng(0)
        np.save(work / "voxels.npy", rng.standard_normal((samples, voxels), dtype=np.float32))
        np.save(work / "targets.npy", rng.standard_normal((samples, 16, 768), dtype=np.float32))
        t = time.monotonic()
        done = subprocess.run([sys.executable, __file__, "--fixed-cost", "--worker", str(work), *(["--nsd"] if args.nsd else [])],
                              capture_output=True, text=True, check=True)
        total = time.monotonic() - t
    result = json.loads(done.stdout.strip().splitlines()[-1])
    times = {"process start": total - result["inside"], **result["times"]}
    print(f"machine: {describe_machine('cpu')}")
    print(f"{voxels} voxels x {samples} samples, IP-Adapter 16x768, h = {hidden}, 4 blocks, 1 thread; "
          f"state {result['state_mb']:.0f} MB, upload {result['upload_mb']:.0f} MB")
    print("| step (every message) | s |")
    print("|---|---:|")
    for step in STEPS:
        print(f"| {step} | {times[step]:.2f} |")
    print(f"| total | {sum(times[s] for s in STEPS):.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-train", type=int, default=300)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--fixed-cost", action="store_true", help="The fixed cost of one message at a site.")
    parser.add_argument("--nsd", action="store_true", help="With --fixed-cost: the published sizes.")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.fixed_cost:
        fixed_cost(args)
        return
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
