"""Seconds per BrainGuard round: Flower's deployment runtime against the in-process engine.

Same data, sizes and seeds for both engines: two synthetic subjects, CPU, one thread per
site. The local engine runs both clients in this process; the Flower engine runs
``brainrecon federate server`` (SuperLink + ServerApp) and one ``brainrecon federate site``
(SuperNode) per subject on 127.0.0.1, twice: "before", every round each site's ClientApp is a
fresh process that loads its subject's data, restores its state from disk, trains, saves and
uploads (``federate site --no-worker``); "after", the ClientApp process hands the message to the
site worker, which keeps the site in memory (the default). Rounds are timed one by one because
they differ (round 1: training only; round 2: the fusion learner's start phase; round 3: the
steady state); the Flower times are the server's (from sending the round's messages to the
average), the local ones from the in-process loop. One run each, printed as measured.

With ``--fixed-cost`` it measures instead what every Flower message costs a site besides its
training, step by step, before and after, each message in a fresh process as Flower 1.42 starts
one ClientApp process per message. Before: process start, importing brainrecon and flwr,
loading the subject's data, building the model and client, restoring and saving the state,
turning the upload into a Flower record. After: process start, importing the ClientApp's thin
handler (no torch) and flwr, and the hand-over to a site worker that holds the site (the
global model in, the upload back as Flower's npy bytes); the worker's round does no training,
and the state save it does after the reply is timed beside the path.
``--nsd`` gives these the sizes of the published setting (NSD subject 1: 15,724 voxels, 8,859
training samples, IP-Adapter targets of 16 x 768, h = 2048, 4 blocks, AdamW state after a step)
with random data; Flower's own transport of the messages (SuperLink, SuperNode, the
``flwr-clientapp`` runtime) is not included.

Usage::

    python benchmarks/brainguard_flower.py [--n-train 300] [--hidden 64] [--rounds 3]
    python benchmarks/brainguard_flower.py --fixed-cost [--nsd] [--messages 4]   # --nsd needs ~6 GB RAM
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _machine import describe_machine  # benchmarks/ is on sys.path when run as a script

STEPS = ("process start", "import brainrecon + flwr", "load data", "build model + client",
         "restore state", "save state", "upload to Flower record", "hand-over to the site worker")


def _client_from_arrays(work: Path, voxels: int, hidden: int):
    """The site's client at the benchmark's sizes from the random arrays in ``work``, with AdamW's
    moments after one step (as after any round); step times in ``times``."""
    import numpy as np
    import torch

    from brainrecon.decoders.brainguard.decoder import BrainGuardDecoder
    from brainrecon.decoders.brainguard.federated import Client

    times = {}
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

    out = client.model(X[:8])  # not timed: one optimiser step, so the state holds AdamW's moments
    out.float().pow(2).mean().backward()
    client.optimizer.step()
    client.optimizer.zero_grad()
    return decoder, config, client, times


def before_worker(work: Path, voxels: int, samples: int, hidden: int) -> dict:
    """Before: what the ClientApp process of every message did itself."""
    started = time.monotonic()
    times = {}
    t = time.monotonic()
    import torch
    from flwr.app import ArrayRecord

    import brainrecon.federation.app
    import brainrecon.federation.site  # noqa: F401  (and, to train, the site: torch, safetensors)
    times["import brainrecon + flwr"] = time.monotonic() - t
    torch.set_num_threads(1)

    from safetensors.torch import load_file, save_file

    _, _, client, built = _client_from_arrays(work, voxels, hidden)
    times.update(built)
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


def _bench_site_class(voxels: int, hidden: int):
    """A :class:`~brainrecon.federation.site.Site` built from the benchmark's random arrays whose
    round does no training (upload = its shared tensors): what is left is the fixed cost."""
    from brainrecon.federation.site import SITE_META, Site

    class BenchSite(Site):
        def __init__(self, settings, params):
            self.settings = dict(settings)
            self.subject = 1
            self.state_dir = Path(settings["state_dir"])
            self.decoder, self.config, self.client, self.built = _client_from_arrays(
                Path(settings["data"]), voxels, hidden)
            self.fingerprint = {"params": dict(params), "data": "random arrays"}
            self._init_state()
            self.log = self.state_dir / "bench-times.jsonl"

        def _train(self, global_state):
            # Training (minutes at this size) outlasts the save of the received global model,
            # which runs beside it: waited for here and timed, so it is not counted in the reply.
            t = time.monotonic()
            if self._keeping is not None:
                self._keeping.join()
            with open(self.log, "a") as f:
                f.write(json.dumps({"input save": time.monotonic() - t}) + "\n")
            return self.client.upload(), {}

        def _save(self, snapshot):
            t = time.monotonic()
            super()._save(snapshot)
            assert (self.state_dir / SITE_META.format(snapshot[1]["rounds_completed"])).is_file()
            with open(self.log, "a") as f:
                f.write(json.dumps({"save state": time.monotonic() - t, **self.built}) + "\n")

        def round(self, round_number, global_state, *, background=False):
            t = time.monotonic()
            result = super().round(round_number, global_state, background=background)
            with open(self.log, "a") as f:
                f.write(json.dumps({"round": round_number, "worker round": time.monotonic() - t}) + "\n")
            return result

    return BenchSite


def handler_process(work: Path, round_number: int, rounds: int) -> dict:
    """After: the ClientApp process of one message, handing it to the site worker."""
    started = time.monotonic()
    t = time.monotonic()
    from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from brainrecon.federation.app import client_app  # noqa: F401  (what the ClientApp process imports)
    from brainrecon.federation.site import site_train
    import_s = time.monotonic() - t
    for name in ("_run_id", "_node_id", "_task_id"):  # set by Flower in its own processes
        setattr(TaskIdentity, name, 1)
    # The message as Flower's runtime hands it over (not timed: Flower's transport).
    received = ArrayRecord()
    index = work / "global.json"
    if round_number > 1:
        for k, (name, dtype, shape) in enumerate(json.loads(index.read_text())):
            received[name] = Array(dtype=dtype, shape=tuple(shape), stype="numpy.ndarray",
                                   data=(work / f"global-{k}.npy").read_bytes())
    msg = Message(content=RecordDict({"arrays": received, "config": ConfigRecord(
        {"server-round": round_number, "num-rounds": rounds, "sites": 2})}), dst_node_id=1, message_type="train")
    context = Context(run_id=1, node_id=1, node_config={"site-file": str(work / "state" / "site.json")},
                      state=RecordDict(), run_config={"params": json.dumps({"bench": 1}), "recipe": ""})
    t = time.monotonic()
    reply = site_train(msg, context)
    handler_s = time.monotonic() - t
    inside = time.monotonic() - started
    arrays = reply.content.array_records["arrays"]
    index.write_text(json.dumps([[k, a.dtype, list(a.shape)] for k, a in arrays.items()]))
    for k, a in enumerate(arrays.values()):
        (work / f"global-{k}.npy").write_bytes(a.data)
    return {"import": import_s, "handler": handler_s, "inside": inside,
            "upload_mb": sum(len(a.data) for a in arrays.values()) / 2**20}


def fixed_cost(args) -> None:
    """The fixed cost of one message at a site, before (all in the ClientApp process) and after
    (a thin ClientApp process handing over to the site worker)."""
    voxels, samples, hidden = (15724, 8859, 2048) if args.nsd else (2000, 1000, 256)
    os.environ["OMP_NUM_THREADS"] = "1"
    size = ["--nsd"] if args.nsd else []
    if args.worker:
        print(json.dumps(before_worker(Path(args.worker), voxels, samples, hidden)))
        return
    if args.serve_worker:
        import torch

        torch.set_num_threads(1)
        from brainrecon.federation.worker import serve

        serve(args.serve_worker, parent=os.getppid(), make_site=_bench_site_class(voxels, hidden))
        return
    if args.handler:
        print(json.dumps(handler_process(Path(args.handler), args.round, args.messages)))
        return
    import numpy as np

    from brainrecon.federation.site import SITE_META
    from brainrecon.federation.supervise import stop_process

    with tempfile.TemporaryDirectory(prefix="bench-flower-fixed-") as d:
        work = Path(d)
        rng = np.random.default_rng(0)
        np.save(work / "voxels.npy", rng.standard_normal((samples, voxels), dtype=np.float32))
        np.save(work / "targets.npy", rng.standard_normal((samples, 16, 768), dtype=np.float32))
        runs = []
        for _ in range(max(1, args.messages - 1)):  # as many as the steady messages after, medians
            t = time.monotonic()
            done = subprocess.run([sys.executable, __file__, "--fixed-cost", "--worker", str(work), *size],
                                  capture_output=True, text=True, check=True)
            total = time.monotonic() - t
            result = json.loads(done.stdout.strip().splitlines()[-1])
            runs.append({"process start": total - result["inside"], **result["times"]})
        before = {step: float(np.median([run[step] for run in runs])) for step in runs[0]}

        # After: the site worker, then one fresh ClientApp process per message.
        state = work / "state"
        state.mkdir(mode=0o700)
        (state / "site.json").write_text(json.dumps({"subject": 1, "data": str(work), "state_dir": str(state),
                                                     "out": str(work / "runs"), "worker": True}))
        t = time.monotonic()
        served = subprocess.Popen([sys.executable, __file__, "--fixed-cost", "--serve-worker",
                                   str(state / "site.json"), *size])
        while not (state / "worker.token").is_file():
            if served.poll() is not None:
                raise SystemExit(f"the site worker exited with code {served.returncode}")
            time.sleep(0.05)
        worker_start = time.monotonic() - t
        messages = []
        try:
            for r in range(1, args.messages + 1):
                t = time.monotonic()
                done = subprocess.run([sys.executable, __file__, "--fixed-cost", "--handler", str(work),
                                       "--round", str(r), "--messages", str(args.messages + 1), *size],
                                      capture_output=True, text=True, check=True)
                total = time.monotonic() - t
                messages.append({**json.loads(done.stdout.strip().splitlines()[-1]), "total": total})
                # The state save runs in the worker after the reply; the next message (after the
                # server's aggregation) waits for it. Waited for here, timed by the worker.
                while not (state / SITE_META.format(r)).is_file():
                    time.sleep(0.02)
                time.sleep(0.2)
        finally:
            stop_process(served)
        logs = [json.loads(line) for line in (state / "bench-times.jsonl").read_text().splitlines()]
    saves = [e["save state"] for e in logs if "save state" in e]
    inputs = [e["input save"] for e in logs if "input save" in e]
    built = next(e for e in logs if "save state" in e)
    steady = list(zip(messages, inputs))[1:]  # message 1 also builds the site in the worker, once per site

    def median(values):
        return float(np.median(values))

    after = {"process start": median([m["total"] - m["inside"] for m, _ in steady]),
             "import brainrecon + flwr": median([m["import"] for m, _ in steady]),
             "load data": 0.0, "build model + client": 0.0, "restore state": 0.0, "save state": 0.0,
             "upload to Flower record": None,  # done by the worker: in the hand-over
             "hand-over to the site worker": median([m["handler"] - i for m, i in steady])}
    print(f"machine: {describe_machine('cpu')}")
    print(f"{voxels} voxels x {samples} samples, IP-Adapter 16x768, h = {hidden}, 4 blocks, 1 thread; "
          f"state {result['state_mb']:.0f} MB, upload {result['upload_mb']:.0f} MB")
    print("| step (every message) | before s | after s |")
    print("|---|---:|---:|")
    for step in STEPS:
        b = f"{before[step]:.2f}" if step in before else "-"
        a = "-" if after[step] is None else f"{after[step]:.2f}"
        print(f"| {step} | {b} | {a} |")
    print(f"| total | {sum(before.values()):.2f} | {sum(v for v in after.values() if v is not None):.2f} |")
    print(f"before: median of {len(runs)} fresh processes; after: median of messages 2-{len(messages)}, each a fresh process; the hand-over is the ClientApp "
          f"handler (global model to the worker, upload back as Flower's npy bytes, reply record). "
          f"Message 1: {messages[0]['total']:.2f} s, as the worker builds the site once (load data "
          f"{built['load data']:.2f} s, build model + client {built['build model + client']:.2f} s; "
          f"worker start {worker_start:.2f} s).")
    print(f"Beside the message's path: the worker saves the state after the reply ({median(saves):.2f} s, "
          f"median; the next message waits for it) and the received global model while it trains "
          f"({median(inputs[1:]):.2f} s).")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-train", type=int, default=300)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--fixed-cost", action="store_true", help="The fixed cost of one message at a site.")
    parser.add_argument("--nsd", action="store_true", help="With --fixed-cost: the published sizes.")
    parser.add_argument("--messages", type=int, default=4, help="With --fixed-cost: messages timed after.")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--serve-worker", help=argparse.SUPPRESS)
    parser.add_argument("--handler", help=argparse.SUPPRESS)
    parser.add_argument("--round", type=int, help=argparse.SUPPRESS)
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

    from brainrecon.federation import loopback

    real_flower = loopback.fit_on_flower
    flower = {}
    for label, site_worker in (("before", False), ("after", True)):
        loopback.fit_on_flower = functools.partial(real_flower, site_worker=site_worker)
        t0 = time.monotonic()
        try:
            workflows.fit("brainguard", data=data, subjects=[1, 2], out=work / f"flower-{label}", evaluate=False,
                          params={**params, "checkpoint_dir": str(work / f"flower-{label}-state")}, engine="flower")
        finally:
            loopback.fit_on_flower = real_flower
        total = time.monotonic() - t0
        status = json.loads((work / f"flower-{label}-state" / "server" / "status.json").read_text())
        flower[label] = (status["round_seconds"], total)

    print(f"machine: {describe_machine('cpu')}")
    print(f"2 subjects x {args.n_train} samples, hidden {args.hidden}, pixels 16x16, batch 50, "
          f"{args.rounds} rounds, 1 thread per site")
    print("| round | local s | Flower before s | Flower after s | after / local |")
    print("|---:|---:|---:|---:|---:|")
    (before_rounds, before_total), (after_rounds, after_total) = flower["before"], flower["after"]
    for k, (a, b, c) in enumerate(zip(local_rounds, before_rounds, after_rounds), start=1):
        print(f"| {k} | {a:.2f} | {b:.2f} | {c:.2f} | {c / a:.1f} |")
    print(f"| fit end to end | {local_total:.1f} | {before_total:.1f} | {after_total:.1f} | "
          f"{after_total / local_total:.1f} |")
    print("before: every message in a fresh ClientApp process that rebuilds the site (federate site --no-worker); "
          "after: the site worker keeps it between messages (the default).")
    shutil.rmtree(work, ignore_errors=True)

if __name__ == "__main__":
    main()
