"""The BrainGuard server on Flower: the strategy, the ServerApp's body, and ``federate server``.

The server (:class:`BrainGuardFedAvg`, :func:`server_main`) sends the global shared tensors,
receives each site's shared tensors and its sample count, refuses any upload that carries a
subject-specific (``ridge.*``) tensor or anything else (:func:`~.records.check_upload`), and
averages with :func:`~brainrecon.decoders.brainguard.federated.aggregate` weighted by the
sample counts. Round 1 sends an empty record: there is no global model before the first round,
so sites do not fuse. After every round it saves the global shared tensors and ``status.json``
(its only state), so a server restarted with ``--resume`` continues from them.

:func:`serve` is ``brainrecon federate server``: a SuperLink, then ``flwr run`` of the app
folder :func:`write_app` writes (its components are :mod:`brainrecon.federation.app`).
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from brainrecon.decoders.brainguard.federated import aggregate
from brainrecon.errors import BrainreconError
from brainrecon.federation.bundle import APP_MODULE, app_files
from brainrecon.federation.link import FLEET_GATE_ENV, is_loopback
from brainrecon.federation.records import (
    ARRAYS,
    METRICS,
    NUM_EXAMPLES,
    SUBJECT,
    check_upload,
)
from brainrecon.federation.supervise import (
    DirectoryLock,
    flower_bin,
    flower_env,
    owner_only,
    raise_on_sigterm,
    require_flwr,
    restore_sigterm,
    start_process,
    stop_all,
    stop_flower_processes,
    toml_string,
    wait_for_port,
)
from brainrecon.io import jsonable, read_json, save_safetensors_atomic, write_json_atomic

SERVER_GLOBAL = "global.safetensors"
SERVER_STATUS = "status.json"
#: Where the Flower app folder :func:`write_app` writes points for its ServerApp and ClientApp.


class TooFewReplies(BrainreconError):
    """A round in which fewer sites than required replied (one dropped out, or is restarting)."""


def _strategy_base():
    require_flwr()
    from flwr.serverapp.strategy import FedAvg

    return FedAvg


def make_strategy(min_sites: int, server_dir: str | os.PathLike | None = None, offset: int = 0,
                  rounds: int | None = None, sites: dict | None = None, refused: dict | None = None):
    """A :class:`BrainGuardFedAvg` needing ``min_sites`` sites per round.

    With ``server_dir`` it saves the global shared tensors and ``status.json`` after every
    round (round numbers continue after ``offset`` completed ones), so ``--resume`` works.
    """
    return _strategy_class()(min_sites=min_sites, server_dir=server_dir, offset=offset, rounds=rounds,
                             sites=sites, refused=refused)


_STRATEGY = None


def _strategy_class():
    global _STRATEGY
    if _STRATEGY is not None:
        return _STRATEGY
    FedAvg = _strategy_base()
    from flwr.app import ArrayRecord, MetricRecord

    class BrainGuardFedAvg(FedAvg):
        """FedAvg over the shared tensors, weighted by ``num-examples``; refuses private keys.

        Every connected site trains each round (``min_sites`` of them at least); nothing is
        evaluated centrally (the global backbone needs a site's private layer).
        """

        def __init__(self, min_sites: int = 2, server_dir=None, offset: int = 0, rounds: int | None = None,
                     sites: dict | None = None, refused: dict | None = None):
            super().__init__(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=int(min_sites),
                             min_available_nodes=int(min_sites), weighted_by_key=NUM_EXAMPLES)
            self.min_sites = int(min_sites)
            self.server_dir = None if server_dir is None else Path(server_dir)
            self.offset, self.rounds = int(offset), rounds
            self.round_ends: list[float] = []  # time.monotonic() after each round's average
            # One site per subject: subject -> its node, and the nodes refused as second sites
            # (node -> subject); they get no more rounds. Shared across redone rounds.
            self.sites = {} if sites is None else sites
            self.refused = {} if refused is None else refused

        def configure_train(self, server_round, arrays, config, grid):
            messages = super().configure_train(server_round, arrays, config, grid)
            return [m for m in messages if m.metadata.dst_node_id not in self.refused]

        def _one_site_per_subject(self, server_round, valid):
            """The replies to average: a second site of a subject that has one is refused."""
            by_subject: dict = {}
            for m in valid:
                metrics = m.content.metric_records.get(METRICS)
                subject = None if metrics is None or SUBJECT not in metrics else int(metrics[SUBJECT])
                by_subject.setdefault(subject, []).append(m)
            kept = []
            for subject, replies in by_subject.items():
                if subject is None:
                    kept += replies
                    continue
                nodes = [m.metadata.src_node_id for m in replies]
                # The subject's known site if it replied (else a restarted one replaces it), else the first.
                site = self.sites.get(subject) if self.sites.get(subject) in nodes else nodes[0]
                self.sites[subject] = site
                kept += [m for m in replies if m.metadata.src_node_id == site]
                for node in nodes:
                    if node != site:
                        self.refused[node] = subject
                        print(f"brainrecon server: round {server_round}: refused node {node} as a second site of "
                              f"subject {subject} (node {site} is its site; a federation has one site per "
                              f"subject); it gets no more rounds: stop it.", flush=True)
            return kept

        def aggregate_train(self, server_round, replies):
            replies = list(replies)
            failed = [m for m in replies if m.has_error()]
            valid = self._one_site_per_subject(server_round, [m for m in replies if not m.has_error()])
            if len(valid) < self.min_sites:
                reasons = [f"node {m.metadata.src_node_id}: {m.error.reason}" for m in failed]
                reasons += [f"node {n}: a second site of subject {s}" for n, s in self.refused.items()]
                why = f" ({'; '.join(reasons)})" if reasons else ""
                raise TooFewReplies(
                    f"Round {server_round}: {len(valid)} of the required {self.min_sites} sites replied{why}."
                )
            states, counts = [], []
            for m in valid:
                site = f"node {m.metadata.src_node_id}"
                content = m.content
                unexpected = sorted(set(content.keys()) - {ARRAYS, METRICS})
                if unexpected:
                    raise BrainreconError(
                        f"Upload from {site} carries record(s) {unexpected}; only '{ARRAYS}' and "
                        f"'{METRICS}' may leave a site. The upload was refused."
                    )
                arrays, metrics = content.array_records[ARRAYS], content.metric_records[METRICS]
                check_upload(arrays.keys(), metrics.keys(), site=site)
                states.append({k: v.clone() for k, v in arrays.to_torch_state_dict().items()})
                counts.append(int(metrics[NUM_EXAMPLES]))
            global_state = aggregate(states, counts, device="cpu")
            self.round_ends.append(time.monotonic())
            if self.server_dir is not None:
                save_global(self.server_dir, global_state, rounds_completed=self.offset + int(server_round),
                            rounds=self.rounds, round_ends=self.round_ends)
            return (ArrayRecord.from_torch_state_dict(global_state),
                    MetricRecord({NUM_EXAMPLES: int(sum(counts)), "sites": len(counts)}))

    _STRATEGY = BrainGuardFedAvg
    return _STRATEGY


def save_global(server_dir: Path, global_state: Mapping[str, torch.Tensor], *, rounds_completed: int,
                rounds: int | None, round_ends: Sequence[float] = (), finished: bool = False) -> None:
    """The server's only state: the global shared tensors and how many rounds made them."""
    save_safetensors_atomic(global_state, server_dir / SERVER_GLOBAL)
    write_json_atomic(server_dir / SERVER_STATUS, {"rounds_completed": int(rounds_completed), "rounds": rounds,
                                                   "finished": finished})


def server_main(grid, context) -> None:
    """The ServerApp's body: run the rounds, save the global model after the last one."""
    from flwr.app import ArrayRecord, ConfigRecord

    cfg = context.run_config
    rounds, min_sites = int(cfg["num-rounds"]), int(cfg["min-sites"])
    server_dir = Path(str(cfg["server-dir"]))
    server_dir.mkdir(parents=True, exist_ok=True)
    offset, initial = 0, ArrayRecord()
    status_path = server_dir / SERVER_STATUS
    round_timeout = float(cfg.get("round-timeout", 3600))

    def saved():
        status = read_json(status_path)
        return int(status["rounds_completed"]), ArrayRecord.from_torch_state_dict(
            load_file(str(server_dir / SERVER_GLOBAL)))

    if bool(cfg.get("resume", False)) and status_path.is_file():
        offset, initial = saved()
    started = time.monotonic()
    round_ends: list[float] = []
    waiting_since = None
    sites: dict = {}  # subject -> node, kept over redone rounds
    refused: dict = {}  # second sites of a subject: node -> subject
    try:
        while offset < rounds:
            strategy = make_strategy(min_sites, server_dir=server_dir, offset=offset, rounds=rounds,
                                     sites=sites, refused=refused)
            train_config = ConfigRecord({"num-rounds": rounds, "round-offset": offset, "sites": min_sites})
            try:
                strategy.start(grid=grid, initial_arrays=initial, num_rounds=rounds - offset,
                               train_config=train_config, timeout=round_timeout)
                round_ends += strategy.round_ends
                break
            except TooFewReplies as exc:
                # A site dropped out (killed, restarting with its --state-dir): redo the round from
                # the last global model with the sites connected then, for up to --round-timeout.
                # A site that already did the round redoes it from its saved state: same upload.
                round_ends += strategy.round_ends
                done = int(read_json(status_path)["rounds_completed"]) if status_path.is_file() else 0
                if done > offset or waiting_since is None:
                    waiting_since = time.monotonic()
                if time.monotonic() - waiting_since > round_timeout:
                    raise
                print(f"{exc} Waiting up to {round_timeout:.0f} s for the site(s) to come back.", flush=True)
                time.sleep(5.0)
                if status_path.is_file() and done > 0:
                    offset, initial = saved()
    except BrainreconError as exc:
        # One line for `federate server` to show (the traceback stays in run.log).
        status = read_json(status_path) if status_path.is_file() else {"rounds_completed": offset}
        write_json_atomic(status_path, {**status, "finished": False, "error": str(exc)})
        raise
    ends = [started, *round_ends]
    write_json_atomic(status_path, {"rounds_completed": rounds, "rounds": rounds, "finished": True,
                                    "round_seconds": [b - a for a, b in itertools.pairwise(ends)]})


def write_app(directory: Path) -> Path:
    """A minimal Flower app folder whose ServerApp and ClientApp are those of :data:`APP_MODULE`."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, content in app_files().items():
        (directory / name).write_bytes(content)
    return directory


def server_transport(host: str, *, insecure: bool = False, ssl_certfile: str | None = None,
                     ssl_keyfile: str | None = None, ssl_ca_certfile: str | None = None,
                     enable_supernode_auth: bool = False, log=print) -> str:
    """``"tls"`` or ``"plain"``: closed by default.

    A server on loopback may run without credentials. Any other address needs TLS (all three
    certificate files) and SuperNode authentication, or an explicit ``insecure=True`` (a
    warning names the risk). Raises :class:`BrainreconError` otherwise.
    """
    files = [ssl_certfile, ssl_keyfile, ssl_ca_certfile]
    if any(files) and not all(files):
        raise BrainreconError("TLS needs all three of --ssl-certfile, --ssl-keyfile and --ssl-ca-certfile.")
    if insecure:
        if not is_loopback(host):
            log(f"WARNING: --insecure: the server on {host} accepts any site that reaches it, without "
                f"encryption or authentication; anyone on this network can join the federation, read the "
                f"global model and send it updates. Use TLS and --enable-supernode-auth across machines.")
        return "plain"
    if all(files):
        if not is_loopback(host) and not enable_supernode_auth:
            raise BrainreconError(
                f"--host {host} is reachable from other machines: add --enable-supernode-auth and register "
                f"each site's public key (--site-public-key), or pass --insecure to accept the risk.")
        return "tls"
    if not is_loopback(host):
        raise BrainreconError(
            f"--host {host} is reachable from other machines and no credentials were given: pass "
            f"--ssl-certfile, --ssl-keyfile, --ssl-ca-certfile and --enable-supernode-auth (see README, "
            f"'Two machines'), or --insecure to accept the risk; without them the server listens on 127.0.0.1 only.")
    if enable_supernode_auth:
        raise BrainreconError("--enable-supernode-auth needs TLS (--ssl-certfile, --ssl-keyfile, --ssl-ca-certfile).")
    return "plain"


@owner_only
def serve(*, params: Mapping[str, Any], rounds: int, min_sites: int, server_dir: str | os.PathLike,
          host: str = "127.0.0.1", port: int = 9092, resume: bool = False, insecure: bool = False,
          ssl_certfile: str | None = None, ssl_keyfile: str | None = None, ssl_ca_certfile: str | None = None,
          enable_supernode_auth: bool = False, site_public_keys: Sequence[str | os.PathLike] = (),
          round_timeout: float = 3600.0, recipe: str | None = None, ready: Any = None, log=print) -> Path:
    """``brainrecon federate server``: a SuperLink, then the BrainGuard run on it; stops both.

    Returns the server directory (``global.safetensors``: the last global shared tensors;
    ``status.json``). Nothing else is kept on the server.
    """
    tls = server_transport(host, insecure=insecure, ssl_certfile=ssl_certfile, ssl_keyfile=ssl_keyfile,
                           ssl_ca_certfile=ssl_ca_certfile, enable_supernode_auth=enable_supernode_auth, log=log)
    plain = tls == "plain"
    server_dir = Path(server_dir).resolve()
    server_dir.mkdir(parents=True, exist_ok=True)
    flwr_home = server_dir / "flwr-home"
    env = flower_env(flwr_home=flwr_home)
    flwr_home.mkdir(parents=True, exist_ok=True)
    connect = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    tls = "insecure = true" if plain else f"root-certificates = {toml_string(ssl_ca_certfile)}"
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "brainrecon"\n\n[superlink.brainrecon]\naddress = "{connect}:{port}"\n{tls}\n',
        encoding="utf-8")
    # Flower's SuperLink with its Control and Runtime APIs answering loopback only.
    args = [sys.executable, "-m", "brainrecon.federation.link", "--host", host, "--port", str(port),
            "--disable-runtime-dependency-installation"]  # Flower's in-memory state: no database on disk
    if plain:
        args.append("--insecure")
    else:
        for flag, value in (("--ssl-certfile", ssl_certfile), ("--ssl-keyfile", ssl_keyfile),
                            ("--ssl-ca-certfile", ssl_ca_certfile)):
            args += [flag, str(Path(value).resolve())]
    if enable_supernode_auth:
        args.append("--enable-supernode-auth")
    app = write_app(server_dir / "app")
    run_config = server_dir / "run-config.toml"
    run_config.write_text(
        f"num-rounds = {int(rounds)}\nmin-sites = {int(min_sites)}\n"
        f"params = {toml_string(json.dumps(jsonable(dict(params))))}\n"
        f"server-dir = {toml_string(server_dir)}\nresume = {'true' if resume else 'false'}\n"
        f"round-timeout = {float(round_timeout)}\nrecipe = {toml_string(recipe or '')}\n", encoding="utf-8")
    status = server_dir / SERVER_STATUS
    lock = DirectoryLock(server_dir, "brainrecon federate server")
    previous = raise_on_sigterm()
    superlink = None
    try:
        leftovers = stop_flower_processes(flwr_home)
        if leftovers:
            # A server of this directory that crashed left its detached SuperExec or ServerApp
            # running; they would reconnect to the new SuperLink and write into this directory.
            log(f"stopped {len(leftovers)} Flower process(es) an earlier server left running: pids {leftovers}")
        if status.exists() and not resume:
            status.unlink()
        elif status.exists() and "error" in read_json(status):  # the failure of an earlier attempt
            write_json_atomic(status, {k: v for k, v in read_json(status).items() if k != "error"})
        # The SuperLink keeps its state (the sites' uploads among it) in memory only; a database
        # an earlier brainrecon left here (with deleted uploads still in it) goes.
        for stale in server_dir.glob("superlink.db*"):
            stale.unlink()
        gate = flwr_home / "fleet-open"
        gate.unlink(missing_ok=True)
        superlink = start_process(args, env={**env, FLEET_GATE_ENV: str(gate)}, log=server_dir / "superlink.log",
                                  new_group=False)
        wait_for_port(connect, port, 60, superlink)
        for key in site_public_keys:
            # Only registered sites may join under --enable-supernode-auth (Flower's Control API,
            # reached on loopback).
            reg = subprocess.run([flower_bin("flwr"), "supernode", "register", str(Path(key).resolve()), "brainrecon"],
                                 env=env, cwd=server_dir, capture_output=True, text=True, timeout=120, check=False)
            if reg.returncode != 0:
                raise BrainreconError(f"Could not register site key {key}: {(reg.stdout + reg.stderr).strip()[-500:]}")
        gate.touch()  # sites may join now
        if ready is not None:
            ready()
        log(f"SuperLink listening on {host}:{port}; waiting for {min_sites} site(s)")
        run_log = server_dir / "run.log"
        run = start_process([flower_bin("flwr"), "run", str(app), "brainrecon", "--stream",
                             "--run-config", str(run_config)], env=env, log=run_log, new_group=False,
                            cwd=server_dir, append=False)
        try:
            returncode = run.wait()
        finally:
            stop_all([run])
        done = read_json(status) if status.is_file() else {}
        if done.get("error"):
            raise BrainreconError(f"The federated run failed: {done['error']}")
        if returncode != 0 or not done.get("finished"):
            tail = "\n".join(run_log.read_text(encoding="utf-8", errors="replace").splitlines()[-15:])
            raise BrainreconError(
                f"The federated run did not finish (flwr run exit code {returncode}; "
                f"{done.get('rounds_completed', 0)} of {rounds} rounds). Last lines:\n{tail}"
            )
    finally:
        if superlink is not None:
            stop_all([superlink])
        stop_flower_processes(flwr_home)
        restore_sigterm(previous)
        lock.release()
    return server_dir


__all__ = [
    "APP_MODULE",
    "SERVER_GLOBAL",
    "SERVER_STATUS",
    "TooFewReplies",
    "make_strategy",
    "save_global",
    "serve",
    "server_main",
    "server_transport",
    "write_app",
]
