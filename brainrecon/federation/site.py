"""A BrainGuard site on Flower: its state between rounds, the ClientApp's handler, ``federate site``.

Each site loads only its own subject's data, runs
:func:`~brainrecon.decoders.brainguard.federated.site_round` (fusion by the Dynamic Fusion
Learner, local training) and keeps its whole state — model, fusion weights, optimiser and
schedule, random generators, the start-phase flag, its best-by-validation model and its round
history — in its own state directory after every round. After the last round it writes its own
run (one subject, nothing about the others) with the one run writer,
:func:`brainrecon.workflows.write.write_subject_runs`.

Flower 1.42 starts a fresh ClientApp process for every message. Under ``brainrecon federate
site`` that process does not train: it hands the received arrays over an owner-only local
channel (:mod:`.channel`) to the site worker (:mod:`.worker`), a process that ``federate site``
starts beside its SuperNode and that keeps the :class:`Site` — data, model, optimiser — in
memory between rounds, saving its state after replying. Without a worker (Flower's own
``flwr run`` flow, a worker that exited) the ClientApp process does the round itself, as a
fresh :class:`Site` restored from the state directory: same numbers, higher fixed cost.

A site that crashes can be restarted with the same ``--state-dir``: it resumes from its last
completed round (a round whose reply left before its state was saved is redone from the state
before it and the global model it received, which the worker saves while it trains).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from brainrecon.errors import BrainreconError
from brainrecon.federation import channel
from brainrecon.federation.records import ARRAYS, CONFIG, METRICS, NUM_EXAMPLES, SUBJECT
from brainrecon.federation.supervise import (
    ADMITTED_ENV,
    DirectoryLock,
    flower_env,
    free_port,
    owner_only,
    raise_on_sigterm,
    require_flwr,
    restore_sigterm,
    start_worker,
    stop_all,
    stop_flower_processes,
    toml_string,
)
from brainrecon.io import jsonable, read_json, save_safetensors_atomic, write_json_atomic

if TYPE_CHECKING:  # the ClientApp process of a site with a worker never imports torch
    import torch

SITE_STATE = "state-{:05d}.safetensors"  # the site's state after that many rounds
SITE_META = "state-{:05d}.json"
SITE_INPUT = "input-{:05d}.safetensors"  # the global model received for that round (worker only)
SITE_FINISHED = "finished.json"  # the run the site wrote after the last round


def site_config(context) -> dict[str, Any]:
    """The site's own settings: a JSON file named by the SuperNode's ``site-file`` node config."""
    path = context.node_config.get("site-file")
    if not path:
        raise BrainreconError("This SuperNode has no 'site-file' node config; start it with `brainrecon federate site`.")
    return read_json(Path(str(path)))


class Site:
    """One site: its data, client and state; restores and saves it between rounds.

    The ClientApp builds one per message (and restores it from the state directory); the site
    worker keeps one across messages, so a round continues from the state in memory.
    """

    def __init__(self, settings: Mapping[str, Any], params: Mapping[str, Any]):
        import torch

        from brainrecon.data import load_dataset
        from brainrecon.decoders.brainguard.decoder import BrainGuardDecoder
        from brainrecon.decoders.brainguard.federated import Client, client_devices

        self.settings = dict(settings)
        self.subject = int(settings["subject"])
        self.state_dir = Path(settings["state_dir"])
        if settings.get("threads"):
            torch.set_num_threads(int(settings["threads"]))
        decoder_params = {k: v for k, v in params.items() if k not in ("subjects", "checkpoint_dir", "resume")}
        if settings.get("device"):
            decoder_params["device"] = settings["device"]
        self.decoder = BrainGuardDecoder.for_subjects([self.subject], **decoder_params)
        self.config = self.decoder._train_config()
        self.dataset = load_dataset(settings["data"], subjects=[self.subject])
        self.target_shape, n_tokens, token_dim = self.decoder._target_layout()
        self.data = self.decoder._site_data(self.dataset.train, self.subject, self.target_shape)
        V = int(self.data.voxels.shape[-1])
        model = self.decoder._initial_models(self.config, {self.subject: V}, n_tokens, token_dim)[self.subject]
        device = client_devices(self.decoder.device, 1)[0]
        self.client = Client(self.subject, self.data.voxels, self.data.targets, model, self.config, device,
                             self.data.val_voxels, self.data.val_targets)
        self.fingerprint = {
            "params": {k: jsonable(v) for k, v in decoder_params.items() if k not in ("device", "progress")},
            "data": self.dataset.fingerprint(self.subject),
        }
        self._init_state()

    def _init_state(self) -> None:
        #: Rounds the client's state in memory has done (0: the fresh initial state).
        self.rounds_completed, self.history = 0, []
        self._saving: threading.Thread | None = None
        self._keeping: threading.Thread | None = None
        self._save_error: BaseException | None = None

    def saved_rounds(self) -> list[int]:
        """Round counts this site has a complete saved state for (the last two are kept)."""
        return sorted(int(p.name[6:11]) for p in self.state_dir.glob("state-[0-9]*.json"))

    def _restore_after(self, completed: int) -> None:
        """Load the state saved after ``completed`` rounds (0: the fresh initial state).

        A round whose state is missing but whose received global model is saved (the site
        replied, then stopped before its state was on disk) is redone from the state before it.
        """
        from safetensors.torch import load_file

        if completed == 0:
            return
        meta_path = self.state_dir / SITE_META.format(completed)
        if not meta_path.is_file():
            received = self.state_dir / SITE_INPUT.format(completed)
            before = completed - 1
            if received.is_file() and (before == 0 or (self.state_dir / SITE_META.format(before)).is_file()):
                self._restore_after(before)
                self._step(completed, load_file(str(received)) or None)
                self._save(self._snapshot())
                return
            raise BrainreconError(
                f"Site {self.subject} was asked for round {completed + 1} but has no saved state after "
                f"round {completed} (it has: {self.saved_rounds() or 'none'}) in {self.state_dir}; resume "
                f"the server from its last round (--resume), or start this site with a fresh --state-dir."
            )
        meta = read_json(meta_path)
        if meta["fingerprint"] != jsonable(self.fingerprint):
            raise BrainreconError(
                f"{self.state_dir} holds the state of another federation (other settings or data); "
                f"give this site a fresh --state-dir."
            )
        self.client.restore(load_file(str(self.state_dir / SITE_STATE.format(completed))), meta["client"])
        self.rounds_completed, self.history = int(meta["rounds_completed"]), list(meta["history"])

    def _train(self, global_state: Mapping[str, torch.Tensor] | None):
        """The site's part of one round: fuse, train, upload (``site_round``)."""
        from brainrecon.decoders.brainguard.federated import site_round

        return site_round(self.client, global_state, self.config.local_iterations)

    def _step(self, round_number: int, global_state: Mapping[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
        upload, record = self._train(global_state)
        self.history.append(jsonable({"round": round_number - 1,
                                      **{k: {str(self.subject): v} for k, v in record.items()}}))
        self.rounds_completed = round_number
        return upload

    def round(self, round_number: int, global_state: Mapping[str, torch.Tensor] | None, *,
              background: bool = False) -> tuple[dict[str, torch.Tensor], int]:
        """Run 1-based round ``round_number`` from the state after the previous round.

        The state in memory is used when it is that state (the worker's case), else the saved
        one is loaded (a fresh site: the ClientApp's case). A round the site already did (the
        server was restarted before averaging it) is redone from the state before it, which
        gives the same upload. Returns the upload and the sample count.

        With ``background``, the global model received is saved while the site trains, and the
        state after the round is saved in a thread once the upload is returned:
        :meth:`wait_saved` waits for it (the next round does so first).
        """
        self.wait_saved()
        if self.rounds_completed != round_number - 1:
            if self.rounds_completed != 0:
                raise RuntimeError(f"site state after round {self.rounds_completed} cannot start round {round_number}")
            self._restore_after(round_number - 1)
        keeper = None
        if background:
            received = self.state_dir / SITE_INPUT.format(round_number)
            keeper = threading.Thread(target=save_safetensors_atomic, args=(dict(global_state or {}), received),
                                      name="site-input-save", daemon=True)
            keeper.start()
        self._keeping = keeper  # the save of the received global model, running while the site trains
        upload = self._step(round_number, global_state)
        snapshot = self._snapshot()
        if keeper is None:
            self._save(snapshot)
        else:
            keeper.join()  # the reply leaves only once this round can be redone after a crash
            self._saving = threading.Thread(target=self._save_in_thread, args=(snapshot,),
                                            name="site-state-save", daemon=True)
            self._saving.start()
        return upload, self.client.n_samples

    def _snapshot(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        # The tensors are the live ones: nothing changes them until the save is done (the next
        # round and the run writer wait for it).
        tensors, meta = self.client.checkpoint_state()
        return tensors, {"subject": self.subject, "rounds_completed": self.rounds_completed,
                         "fingerprint": self.fingerprint, "client": meta, "history": list(self.history)}

    def _save_in_thread(self, snapshot) -> None:
        try:
            self._save(snapshot)
        except BaseException as exc:  # noqa: BLE001 - reported by wait_saved
            self._save_error = exc

    def wait_saved(self) -> None:
        """Wait for the state save of the last round, if one runs; raise its error, if any."""
        if self._saving is not None:
            self._saving.join()
            self._saving = None
        if self._save_error is not None:
            error, self._save_error = self._save_error, None
            raise BrainreconError(f"Site {self.subject} could not save its state in {self.state_dir}: {error}")

    def _save(self, snapshot) -> None:
        """Save a state (the JSON last: it marks the state complete); keep the previous round's
        too, so a round can be redone."""
        tensors, meta = snapshot
        self.state_dir.mkdir(parents=True, exist_ok=True)
        r = int(meta["rounds_completed"])
        save_safetensors_atomic(tensors, self.state_dir / SITE_STATE.format(r))
        write_json_atomic(self.state_dir / SITE_META.format(r), meta)
        for old in self.saved_rounds():
            if old < r - 1:
                (self.state_dir / SITE_META.format(old)).unlink(missing_ok=True)
                (self.state_dir / SITE_STATE.format(old)).unlink(missing_ok=True)
        for received in self.state_dir.glob("input-[0-9]*.safetensors"):
            if int(received.name[6:11]) <= r:  # that round's state is on disk now
                received.unlink(missing_ok=True)

    def answer(self, round_number: int, rounds: int, sites: int,
               global_state: Mapping[str, torch.Tensor] | None, *, background: bool = False
               ) -> tuple[dict[str, torch.Tensor], int]:
        """One message: round ``round_number``; after the last one, the site's run and
        ``finished.json`` (which tells ``federate site`` that this site is done)."""
        self.wait_saved()
        redo = round_number in self.saved_rounds()
        upload, n_samples = self.round(round_number, global_state, background=background)
        if round_number == rounds:
            self.wait_saved()
            path = self.write_run(sites, replace=redo)
            write_json_atomic(self.state_dir / SITE_FINISHED, {"run": str(path), "rounds": rounds})
        return upload, n_samples

    def write_run(self, n_sites: int, replace: bool = False) -> Path:
        """The site's fitted decoder, predictions and reconstructions as one run (its subject only)."""
        from brainrecon.runs import default_run_name
        from brainrecon.workflows.write import write_subject_runs

        self.wait_saved()
        dec = self.decoder
        dec._set_fitted([self.client], {self.subject: self.data.stats}, self.target_shape, self.history,
                        rounds=self.config.rounds, n_sites=n_sites)
        name = self.settings.get("run_name") or default_run_name(dec.name, self.subject, dec.target)
        # The site's dataset holds its own subject only (loaded so): recorded as it is.
        (run,) = write_subject_runs({self.subject: dec}, self.dataset, out=self.settings["out"],
                                    names={self.subject: name},
                                    overwrite=bool(self.settings.get("overwrite")) or replace,
                                    extra={"recipe": self.settings.get("recipe"), "engine": "flower"},
                                    evaluate=bool(self.settings.get("evaluate")))
        return run.path


def site_train(msg, context):
    """The ClientApp's train handler: one round at this site; replies shared tensors + count.

    Under ``federate site`` the round runs in the site worker (the arrays cross the local
    channel as Flower serialised them; this process imports no torch); without a worker, here.
    """
    from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict

    settings = site_config(context)
    config = msg.content.config_records[CONFIG]
    round_number = int(config["server-round"]) + int(config.get("round-offset", 0))
    rounds, sites = int(config["num-rounds"]), int(config.get("sites", 1))
    received = msg.content.array_records[ARRAYS]
    # The recipe the server used reaches the site's run (a site's own --recipe-name wins).
    settings["recipe"] = settings.get("recipe") or str(context.run_config.get("recipe", "")) or None
    reply = None
    if settings.get("worker"):
        try:
            reply = channel.call(settings["state_dir"], {
                "op": "round", "params": str(context.run_config["params"]), "recipe": settings["recipe"],
                "round": round_number, "rounds": rounds, "sites": sites,
                "arrays": [[k, a.stype] for k, a in received.items()]}, [a.data for a in received.values()])
        except channel.WorkerUnavailable as exc:
            print(f"brainrecon site: {exc}; this round runs in the ClientApp process.", file=sys.stderr, flush=True)
    if reply is not None:
        header, blobs = reply
        arrays = ArrayRecord()
        for (name, dtype, shape), blob in zip(header["arrays"], blobs, strict=True):
            arrays[name] = Array(dtype=dtype, shape=tuple(shape), stype="numpy.ndarray", data=blob)
        n_samples, subject = int(header["num_examples"]), int(header["subject"])
    else:
        import torch  # noqa: F401  (Flower's to_torch_state_dict needs it imported)

        global_state = None if len(received) == 0 else {
            k: v.clone() for k, v in received.to_torch_state_dict().items()}
        site = Site(settings, json.loads(str(context.run_config["params"])))
        upload, n_samples = site.answer(round_number, rounds, sites, global_state)
        arrays, subject = ArrayRecord.from_torch_state_dict(upload), site.subject
    content = RecordDict({ARRAYS: arrays, METRICS: MetricRecord({NUM_EXAMPLES: n_samples, SUBJECT: subject})})
    return Message(content=content, reply_to=msg)


def site_transport(server: str, *, insecure: bool = False, root_certificates: str | None = None,
                   auth_private_key: str | None = None) -> bool:
    """True for a plain connection. Closed by default: a server that is not on loopback needs
    TLS (``root_certificates``) and a SuperNode key (``auth_private_key``), or ``insecure``."""
    from brainrecon.federation.link import is_loopback

    host, sep, port = server.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise BrainreconError(f"--server must be HOST:PORT, got {server!r}.")
    if insecure:
        if not is_loopback(host):
            print(f"WARNING: --insecure: this site talks to {host} without encryption or authentication; "
                  f"whoever answers there (or listens on the way) receives its shared tensors.", file=sys.stderr)
        return True
    if root_certificates:
        if not is_loopback(host) and not auth_private_key:
            raise BrainreconError(f"--server {server} is another machine: give this site's --auth-private-key "
                                  f"(its public key registered at the server), or --insecure to accept the risk.")
        return False
    if not is_loopback(host):
        raise BrainreconError(
            f"--server {server} is another machine and no credentials were given: pass --root-certificates "
            f"and --auth-private-key (see README, 'Two machines'), or --insecure to accept the risk.")
    if auth_private_key:
        raise BrainreconError("--auth-private-key needs TLS: give --root-certificates too.")
    return True


def check_site_input(subject: int, data: str, state_dir: Path) -> None:
    """Refuse, in one line and before connecting, a subject the data lacks, data that cannot be
    read, or a state directory that holds another subject's site."""
    from brainrecon.data import load_dataset

    previous = state_dir / "site.json"
    if previous.is_file():
        try:
            before = int(read_json(previous)["subject"])
        except (BrainreconError, OSError, KeyError, TypeError, ValueError):  # unreadable: rewritten below
            before = None
        if before is not None and before != subject:
            raise BrainreconError(f"--state-dir {state_dir} holds the site of subject {before}, not {subject}; "
                                  f"give subject {subject} its own --state-dir.")
    try:
        dataset = load_dataset(data, subjects=[subject])
        dataset.n_voxels(subject)
    except BrainreconError as exc:
        raise BrainreconError(f"This site cannot use --data {data!r} for subject {subject}: {exc}") from None
    except (OSError, KeyError, ValueError) as exc:
        raise BrainreconError(f"This site cannot use --data {data!r} for subject {subject}: "
                              f"{type(exc).__name__}: {exc}") from None


def _supervise_node(process, finished: Path, host: str, port: int, tick=None) -> int | None:
    """Wait for the SuperNode ``process``: None once the federation has ended for this site
    (its last round done and the server no longer answering), else the SuperNode's exit code.
    ``tick`` is called every second (``federate site`` restarts its worker there)."""
    gone = 0
    while process.poll() is None:
        time.sleep(1.0)
        if tick is not None:
            tick()
        if not finished.is_file():
            continue
        # The last round is done and its reply on its way; the federation has ended when
        # the server stops answering (it stops once it has every site's last reply).
        gone = 0 if _answers(host, port) else gone + 1
        if gone >= 3:
            return None
    return process.returncode


def _answers(host: str, port: int) -> bool:
    """Whether something accepts connections on ``host:port``."""
    import socket

    try:
        with socket.create_connection((host, port), timeout=2.0):
            return True
    except OSError:
        return False


@owner_only
def run_site(*, subject: int, data: str, server: str, state_dir: str | os.PathLike, out: str | os.PathLike,
             run_name: str | None = None, overwrite: bool = False, evaluate: bool = True, recipe: str | None = None,
             device: str | None = None, threads: int | None = None, insecure: bool = False,
             root_certificates: str | None = None, auth_private_key: str | None = None,
             port: int | None = None, worker: bool = True) -> int:
    """``brainrecon federate site``: a SuperNode for one subject's site; runs until stopped.

    Everything the site needs (data location, state and output directories) is written to
    ``state_dir/site.json`` and named to the SuperNode by its ``site-file`` node config. With
    ``worker`` (the default) a site worker (:mod:`.worker`) keeps the site in memory between
    rounds; without, every ClientApp process rebuilds it from ``state_dir``.
    Returns the SuperNode's exit code.
    """
    plain = site_transport(server, insecure=insecure, root_certificates=root_certificates,
                           auth_private_key=auth_private_key)
    state_dir = Path(state_dir).resolve()
    check_site_input(int(subject), str(data), state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    lock = DirectoryLock(state_dir, f"brainrecon federate site (subject {int(subject)})")
    settings = {"subject": int(subject), "data": str(data), "state_dir": str(state_dir),
                "out": str(Path(out).resolve()), "run_name": run_name, "overwrite": bool(overwrite),
                "evaluate": bool(evaluate), "recipe": recipe, "device": device, "threads": threads,
                "worker": bool(worker)}
    write_json_atomic(state_dir / "site.json", settings)
    flwr_home = state_dir / "flwr-home"
    flwr_home.mkdir(parents=True, exist_ok=True)
    # Flower's SuperNode, refusing every app but brainrecon's (brainrecon.federation.node).
    require_flwr()
    args = [sys.executable, "-m", "brainrecon.federation.node", "--superlink", server,
            "--port", str(port or free_port()),
            "--node-config", f"site-file={toml_string(state_dir / 'site.json')}"]
    if plain:
        args.append("--insecure")
    else:
        args += ["--root-certificates", str(Path(root_certificates).resolve())]
    if auth_private_key:
        args += ["--auth-supernode-private-key", str(Path(auth_private_key).resolve())]
    finished = state_dir / SITE_FINISHED
    finished.unlink(missing_ok=True)
    admitted = flwr_home / "admitted"
    env = flower_env(flwr_home=flwr_home)
    env[ADMITTED_ENV] = str(admitted)
    host, _, server_port = server.rpartition(":")
    previous = raise_on_sigterm()
    process = None
    # The site worker keeps this site in memory between Flower's per-message ClientApp processes
    # (brainrecon.federation.worker). It shares the directory lock, so a restarted site waits
    # for a worker its crashed predecessor left. Not in the SuperNode's FLWR_HOME: stopping the
    # SuperNode's leftovers leaves it running.
    worker_env = {k: v for k, v in env.items() if k not in ("FLWR_HOME", ADMITTED_ENV)}
    workers = []

    def keep_worker() -> None:
        if workers and workers[-1] is not None and workers[-1].poll() is not None:
            print(f"the site worker exited (code {workers[-1].returncode}); starting it again", file=sys.stderr,
                  flush=True)
            workers.append(start_worker(state_dir / "site.json", worker_env, keep_fds=(lock.file.fileno(),)))

    try:
        stop_flower_processes(flwr_home)  # what a crashed SuperNode of this site left running
        if worker:
            workers.append(start_worker(state_dir / "site.json", worker_env, keep_fds=(lock.file.fileno(),)))
        while True:
            admitted.unlink(missing_ok=True)
            process = subprocess.Popen(args, env=env)
            process.own_group = False
            code = _supervise_node(process, finished, host.strip("[]"), int(server_port), keep_worker)
            if code is None:
                print(f"federation finished; this site wrote its run to {read_json(finished)['run']}", flush=True)
                return 0
            if finished.is_file() or (code != 0 and admitted.is_file()):
                return code
            # Flower's SuperNode stops when the SuperLink answers 401 for it: with code 0 once
            # it was admitted, 305 ("failed to activate") before.
            if not admitted.is_file():
                print(f"The server at {server} did not admit this site (Flower exit code {code}): with TLS, "
                      f"--root-certificates must be the CA that signed the server's certificate; with SuperNode "
                      f"authentication, this site's public key must be registered at the server "
                      f"(its --site-public-key).", file=sys.stderr, flush=True)
                return 1
            # It had been admitted: the server restarted (with --resume) and no longer knows it.
            print("the server no longer knows this site (restarted?); connecting again", flush=True)
            stop_flower_processes(flwr_home, settle=3.0)  # its SuperNode has exited: they follow it
            time.sleep(2.0)
    finally:
        stop_all([w for w in workers if w is not None] + ([process] if process is not None else []))
        stop_flower_processes(flwr_home, settle=3.0)  # the SuperNode is gone: they follow it
        restore_sigterm(previous)
        lock.release()


__all__ = ["SITE_FINISHED", "SITE_META", "SITE_STATE", "Site", "check_site_input", "run_site", "site_config", "site_train",
           "site_transport"]
