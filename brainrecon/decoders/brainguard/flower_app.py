"""BrainGuard across real sites: a Flower (``flwr`` >= 1.42) ServerApp and ClientApp.

This is the same protocol as the in-process engine (:func:`~.federated.run_federation`),
split where the privacy boundary is:

* the **server** (:class:`BrainGuardFedAvg`, :data:`server_app`) sends the global shared
  tensors, receives each site's shared tensors and its sample count, refuses any upload that
  carries a subject-specific (``ridge.*``) tensor or anything else, and averages with
  :func:`~.federated.aggregate` weighted by the sample counts. Round 1 sends an empty
  record: there is no global model before the first round, so sites do not fuse;
* each **site** (:data:`client_app`) loads only its own subject's data, runs
  :func:`~.federated.site_round` (fusion by the Dynamic Fusion Learner, local training) and
  keeps its whole state — model, fusion weights, optimiser and schedule, random generators,
  the start-phase flag, its best-by-validation model and its round history — in its own
  state directory between rounds (a ClientApp is a fresh process for every message). After
  the last round it writes its own run (one subject, nothing about the others).

Flower runs with its deployment runtime (a SuperLink, one SuperNode per site, real processes;
no Ray). :func:`serve` and :func:`run_site` are ``brainrecon federate server`` and
``brainrecon federate site``; :func:`fit_on_flower` runs all of them on loopback as child
processes for ``brainrecon fit --engine flower``. Telemetry is off unless
``FLWR_TELEMETRY_ENABLED`` is set by the user.

Sites that drop out: the server samples every connected site each round and needs at least
``min_sites`` of them (default: all); a round with fewer replies fails the federation
rather than averaging a different population than the local engine would. A site that
crashes can be restarted with the same ``--state-dir``: it resumes from its last completed
round; a server restarted with ``--resume`` continues from its saved global model. A
directory holds one server or site at a time (a lock), and a restarted one first stops the
Flower processes its crashed predecessor left running (found by their ``FLWR_HOME``).
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from brainrecon.decoders.brainguard.federated import aggregate, site_round
from brainrecon.decoders.brainguard.model import is_private
from brainrecon.errors import BrainreconError
from brainrecon.io import jsonable, read_json, write_json_atomic

INSTALL_HINT = "pip install 'brainrecon[federated]'"
ARRAYS, METRICS, CONFIG = "arrays", "metrics", "config"
NUM_EXAMPLES = "num-examples"
SITE_STATE = "state-{:05d}.safetensors"  # the site's state after that many rounds
SITE_META = "state-{:05d}.json"
SERVER_GLOBAL = "global.safetensors"
SERVER_STATUS = "status.json"
APP_NAME = "brainrecon-brainguard"


def _require_flwr():
    try:
        import flwr
    except ImportError:
        raise BrainreconError(
            f"Federating across processes needs Flower (flwr >= 1.42): {INSTALL_HINT}"
        ) from None
    return flwr


def flower_env(base: Mapping[str, str] | None = None, flwr_home: str | os.PathLike | None = None) -> dict[str, str]:
    """The environment for Flower processes: telemetry off unless the user chose otherwise."""
    env = dict(os.environ if base is None else base)
    env.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if flwr_home is not None:
        env["FLWR_HOME"] = str(flwr_home)
    return env


# --------------------------------------------------------------------------- what may leave a site
def check_upload(arrays: Iterable[str], metrics: Iterable[str], *, site: str = "a site") -> None:
    """Refuse an upload that is not exactly shared tensors and a sample count.

    Raises
    ------
    BrainreconError
        Naming the private tensors (``ridge.*``) or the extra metric entries found.
    """
    private = [k for k in arrays if is_private(k)]
    if private:
        raise BrainreconError(
            f"Upload from {site} contains subject-specific tensor(s) {private}; the input layer "
            f"must stay at its site (retention tier). The upload was refused."
        )
    extra = sorted(set(metrics) - {NUM_EXAMPLES})
    if extra:
        raise BrainreconError(
            f"Upload from {site} carries metric(s) {extra}; a site sends only its shared tensors "
            f"and '{NUM_EXAMPLES}'. The upload was refused."
        )


def _strategy_base():
    _require_flwr()
    from flwr.serverapp.strategy import FedAvg

    return FedAvg


def make_strategy(min_sites: int, server_dir: str | os.PathLike | None = None, offset: int = 0,
                  rounds: int | None = None):
    """A :class:`BrainGuardFedAvg` needing ``min_sites`` sites per round.

    With ``server_dir`` it saves the global shared tensors and ``status.json`` after every
    round (round numbers continue after ``offset`` completed ones), so ``--resume`` works.
    """
    return _strategy_class()(min_sites=min_sites, server_dir=server_dir, offset=offset, rounds=rounds)


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

        def __init__(self, min_sites: int = 2, server_dir=None, offset: int = 0, rounds: int | None = None):
            super().__init__(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=int(min_sites),
                             min_available_nodes=int(min_sites), weighted_by_key=NUM_EXAMPLES)
            self.min_sites = int(min_sites)
            self.server_dir = None if server_dir is None else Path(server_dir)
            self.offset, self.rounds = int(offset), rounds
            self.round_ends: list[float] = []  # time.monotonic() after each round's average

        def aggregate_train(self, server_round, replies):
            replies = list(replies)
            failed = [m for m in replies if m.has_error()]
            valid = [m for m in replies if not m.has_error()]
            if len(valid) < self.min_sites:
                reasons = "; ".join(f"node {m.metadata.src_node_id}: {m.error.reason}" for m in failed)
                raise BrainreconError(
                    f"Round {server_round}: {len(valid)} of the required {self.min_sites} sites "
                    f"replied{f' ({reasons})' if reasons else ''}."
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


# --------------------------------------------------------------------------- the server app
def save_global(server_dir: Path, global_state: Mapping[str, torch.Tensor], *, rounds_completed: int,
                rounds: int | None, round_ends: Sequence[float] = (), finished: bool = False) -> None:
    """The server's only state: the global shared tensors and how many rounds made them."""
    tmp = server_dir / f".{SERVER_GLOBAL}.partial"
    save_file({k: v.detach().to("cpu").contiguous() for k, v in global_state.items()}, str(tmp))
    os.replace(tmp, server_dir / SERVER_GLOBAL)
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
    if bool(cfg.get("resume", False)) and status_path.is_file():
        status = read_json(status_path)
        offset = int(status["rounds_completed"])
        initial = ArrayRecord.from_torch_state_dict(load_file(str(server_dir / SERVER_GLOBAL)))
    strategy = make_strategy(min_sites, server_dir=server_dir, offset=offset, rounds=rounds)
    train_config = ConfigRecord({"num-rounds": rounds, "round-offset": offset, "sites": min_sites})
    started = time.monotonic()
    if offset < rounds:
        strategy.start(grid=grid, initial_arrays=initial, num_rounds=rounds - offset,
                       train_config=train_config, timeout=float(cfg.get("round-timeout", 3600)))
    ends = [started, *strategy.round_ends]
    write_json_atomic(status_path, {"rounds_completed": rounds, "rounds": rounds, "finished": True,
                                    "round_seconds": [b - a for a, b in itertools.pairwise(ends)]})


# --------------------------------------------------------------------------- the site app
def site_config(context) -> dict[str, Any]:
    """The site's own settings: a JSON file named by the SuperNode's ``site-file`` node config."""
    path = context.node_config.get("site-file")
    if not path:
        raise BrainreconError("This SuperNode has no 'site-file' node config; start it with `brainrecon federate site`.")
    return read_json(Path(str(path)))


class Site:
    """One site between two messages: builds its client, restores and saves its state."""

    def __init__(self, settings: Mapping[str, Any], params: Mapping[str, Any]):
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
        self.decoder = BrainGuardDecoder(**decoder_params, subjects=[self.subject])
        self.config = self.decoder._train_config()
        self.dataset = load_dataset(settings["data"], subjects=[self.subject])
        self.target_shape, n_tokens, token_dim = self.decoder._target_layout()
        self.data = self.decoder._site_data(self.dataset.train, self.subject, self.target_shape)
        V = int(self.data.voxels.shape[1])
        model = self.decoder._initial_models(self.config, {self.subject: V}, n_tokens, token_dim)[self.subject]
        device = client_devices(self.decoder.device, 1)[0]
        self.client = Client(self.subject, self.data.voxels, self.data.targets, model, self.config, device,
                             self.data.val_voxels, self.data.val_targets)
        self.fingerprint = {
            "params": {k: jsonable(v) for k, v in decoder_params.items() if k not in ("device", "progress")},
            "data": self.dataset.fingerprint(self.subject),
        }
        self.rounds_completed, self.history = 0, []

    def saved_rounds(self) -> list[int]:
        """Round counts this site has a complete saved state for (the last two are kept)."""
        return sorted(int(p.name[6:11]) for p in self.state_dir.glob("state-[0-9]*.json"))

    def _restore_after(self, completed: int) -> None:
        """Load the state saved after ``completed`` rounds (0: the fresh initial state)."""
        if completed == 0:
            return
        meta_path = self.state_dir / SITE_META.format(completed)
        if not meta_path.is_file():
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

    def round(self, round_number: int, global_state: Mapping[str, torch.Tensor] | None
              ) -> tuple[dict[str, torch.Tensor], int]:
        """Run 1-based round ``round_number`` from the state after the previous round.

        A round the site already did (the server was restarted before averaging it) is redone
        from the state before it, which gives the same upload. Returns the upload and the
        sample count.
        """
        self._restore_after(round_number - 1)
        upload, record = site_round(self.client, global_state, self.config.local_iterations)
        self.history.append(jsonable({"round": round_number - 1,
                                      **{k: {str(self.subject): v} for k, v in record.items()}}))
        self.rounds_completed = round_number
        self._save()
        return upload, self.client.n_samples

    def _save(self) -> None:
        """Save the state after this round (the JSON last: it marks the state complete); keep
        the previous round's too, so a round can be redone."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        r = self.rounds_completed
        tensors, meta = self.client.checkpoint_state()
        tmp = self.state_dir / f".{SITE_STATE.format(r)}.partial"
        save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(tmp))
        os.replace(tmp, self.state_dir / SITE_STATE.format(r))
        write_json_atomic(self.state_dir / SITE_META.format(r), {
            "subject": self.subject, "rounds_completed": r,
            "fingerprint": self.fingerprint, "client": meta, "history": self.history,
        })
        for old in self.saved_rounds():
            if old < r - 1:
                (self.state_dir / SITE_META.format(old)).unlink(missing_ok=True)
                (self.state_dir / SITE_STATE.format(old)).unlink(missing_ok=True)

    def write_run(self, n_sites: int, replace: bool = False) -> Path:
        """The site's fitted decoder, predictions and reconstructions as one run (its subject only)."""
        from brainrecon.runs import default_run_name, write_run
        from brainrecon.workflows import evaluate_run_safely, make_reconstructions

        dec = self.decoder
        dec._set_fitted([self.client], {self.subject: self.data.stats}, self.target_shape, self.history,
                        rounds=self.config.rounds, n_sites=n_sites)
        pred = dec.predict(self.dataset.test)[self.subject]
        recon = make_reconstructions(dec, pred, self.dataset, self.subject)
        name = self.settings.get("run_name") or default_run_name(dec.name, self.subject, dec.target)
        run = write_run(self.settings["out"], name, decoder=dec, dataset=self.dataset,
                        subject=self.subject, predictions=pred, reconstructions=recon,
                        overwrite=bool(self.settings.get("overwrite")) or replace,
                        extra={"recipe": self.settings.get("recipe"), "engine": "flower"})
        if self.settings.get("evaluate") and recon is not None:
            evaluate_run_safely(run)
        return run.path


def site_train(msg, context):
    """The ClientApp's train handler: one round at this site; replies shared tensors + count."""
    from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

    settings = site_config(context)
    params = json.loads(str(context.run_config["params"]))
    config = msg.content.config_records[CONFIG]
    round_number = int(config["server-round"]) + int(config.get("round-offset", 0))
    rounds = int(config["num-rounds"])
    received = msg.content.array_records[ARRAYS]
    global_state = None if len(received) == 0 else {
        k: v.clone() for k, v in received.to_torch_state_dict().items()}
    site = Site(settings, params)
    redo = round_number in site.saved_rounds()
    upload, n_samples = site.round(round_number, global_state)
    if round_number == rounds:
        site.write_run(int(config.get("sites", 1)), replace=redo)
    content = RecordDict({ARRAYS: ArrayRecord.from_torch_state_dict(upload),
                          METRICS: MetricRecord({NUM_EXAMPLES: int(n_samples)})})
    return Message(content=content, reply_to=msg)


def _build_apps():
    try:
        from flwr.clientapp import ClientApp
        from flwr.serverapp import ServerApp
    except ImportError:
        return None, None
    server, client = ServerApp(), ClientApp()
    server.main()(server_main)
    client.train()(site_train)
    return server, client


server_app, client_app = _build_apps()


# --------------------------------------------------------------------------- processes
def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_for_port(host: str, port: int, timeout: float, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise BrainreconError(f"{process.args[0]} exited with code {process.returncode} before listening on {port}.")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(0.5)
            try:
                s.connect((host, port))
                return
            except OSError:
                pass
        time.sleep(0.2)
    raise BrainreconError(f"Nothing listens on {host}:{port} after {timeout:.0f} s.")


def flower_processes(flwr_home: str | os.PathLike) -> list[int]:
    """Live processes (not zombies, not this one) started with ``FLWR_HOME=flwr_home``.

    Every process of one ``federate server`` or ``federate site`` inherits that variable,
    including the ones Flower detaches into sessions of their own (the SuperLink's SuperExec
    and the ServerApps it launches), which a stop of our process group cannot reach and which
    outlive a crash of their parent wherever orphans are not reaped (their parent check then
    sees a zombie as alive). Linux only (``/proc``); elsewhere an empty list.
    """
    wanted = f"FLWR_HOME={Path(flwr_home).resolve()}".encode()
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        pid = int(entry.name)
        if pid == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if wanted in environ.split(b"\0") and stat[stat.rindex(")") + 2:].split()[0] != "Z":
            found.append(pid)
    return sorted(found)


def stop_flower_processes(flwr_home: str | os.PathLike, *, grace: float = 5.0) -> list[int]:
    """Stop every process :func:`flower_processes` finds: SIGTERM, then SIGKILL after ``grace`` s.

    Returns the pids that were found.
    """
    pids = flower_processes(flwr_home)
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + wait
        while flower_processes(flwr_home) and time.monotonic() < deadline:
            time.sleep(0.1)
        if not flower_processes(flwr_home):
            break
    return pids


class _DirectoryLock:
    """An exclusive ``flock`` on ``directory/.lock``: one server (or site) per directory.

    The kernel drops the lock when its holder dies, so a crashed server never blocks its restart.
    """

    def __init__(self, directory: Path, what: str):
        import fcntl

        self.path = directory / ".lock"
        self.file = open(self.path, "a+", encoding="utf-8")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.file.seek(0)
            holder = self.file.read().strip() or "unknown"
            self.file.close()
            raise BrainreconError(
                f"Another {what} is running in {directory} (pid {holder}); stop it first, or use "
                f"another directory."
            ) from None
        self.file.seek(0)
        self.file.truncate()
        self.file.write(str(os.getpid()))
        self.file.flush()

    def release(self) -> None:
        self.file.close()


def start_process(args: Sequence[str], *, env: Mapping[str, str], log: Path,
                  new_group: bool = True, cwd: str | os.PathLike | None = None,
                  append: bool = True) -> subprocess.Popen:
    """Start ``args`` with its output in ``log``.

    ``new_group=True`` (the processes :func:`fit_on_flower` starts) puts it in a process group
    of its own, whose id is its pid: :func:`stop_process` then stops it and everything it
    started. ``new_group=False`` (a SuperLink or SuperNode under ``federate server`` /
    ``federate site``) keeps it in the caller's group, so a Ctrl-C at the terminal or a stop of
    the caller's group reaches it too.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab" if append else "wb") as out:
        process = subprocess.Popen(list(args), env=dict(env), stdout=out, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=new_group, cwd=cwd)
    process.own_group = new_group
    return process


def stop_process(process: subprocess.Popen, timeout: float = 10.0) -> None:
    """Stop a process started by :func:`start_process`, by its id (and its group's, if its own)."""
    if process.poll() is None:
        # SIGTERM first: brainrecon's own commands turn it into a clean shutdown that stops
        # the Flower processes they started.
        try:
            process.terminate()
        except ProcessLookupError:
            pass
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
    if getattr(process, "own_group", False):
        # Whatever is left in the group we created (ClientApp processes, ...): the group id is
        # the leader's pid. The SuperLink's SuperExec has a session of its own; `serve` stops
        # it by its FLWR_HOME (stop_flower_processes).
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    if process.poll() is None:
        process.wait(timeout=timeout)


def stop_all(processes: Sequence[subprocess.Popen]) -> None:
    """Stop every process, last started first; a second Ctrl-C does not cut this short."""
    for process in reversed(list(processes)):
        while True:
            try:
                stop_process(process)
                break
            except KeyboardInterrupt:
                continue


def _pause(seconds: float) -> None:
    time.sleep(seconds)


def _flower_bin(name: str) -> str:
    _require_flwr()
    candidate = Path(sys.executable).with_name(name)
    return str(candidate) if candidate.exists() else name


def write_app(directory: Path) -> Path:
    """A minimal Flower app directory pointing at this module's ServerApp and ClientApp."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "pyproject.toml").write_text(f"""[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "{APP_NAME}"
version = "1.0.0"
description = "BrainGuard federated decoders (brainrecon)"
dependencies = []

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "brainrecon"

[tool.flwr.app.components]
serverapp = "brainrecon.decoders.brainguard.flower_app:server_app"
clientapp = "brainrecon.decoders.brainguard.flower_app:client_app"

[tool.flwr.app.config]
num-rounds = 1
min-sites = 1
params = "{{}}"
server-dir = ""
resume = false
round-timeout = 3600.0
""", encoding="utf-8")
    (directory / "README.md").write_text("BrainGuard on Flower, generated by `brainrecon federate server`.\n",
                                         encoding="utf-8")
    return directory


def _toml_string(value: str) -> str:
    return json.dumps(str(value))  # a JSON string literal is a valid TOML basic string


def serve(*, params: Mapping[str, Any], rounds: int, min_sites: int, server_dir: str | os.PathLike,
          host: str = "0.0.0.0", port: int = 9092, resume: bool = False, insecure: bool = True,
          ssl_certfile: str | None = None, ssl_keyfile: str | None = None, ssl_ca_certfile: str | None = None,
          enable_supernode_auth: bool = False, round_timeout: float = 3600.0,
          ready: Any = None, log=print) -> Path:
    """``brainrecon federate server``: a SuperLink, then the BrainGuard run on it; stops both.

    Returns the server directory (``global.safetensors``: the last global shared tensors;
    ``status.json``). Nothing else is kept on the server.
    """
    server_dir = Path(server_dir).resolve()
    server_dir.mkdir(parents=True, exist_ok=True)
    flwr_home = server_dir / "flwr-home"
    env = flower_env(flwr_home=flwr_home)
    flwr_home.mkdir(parents=True, exist_ok=True)
    connect = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    tls = ""
    if insecure:
        tls = "insecure = true"
    elif ssl_ca_certfile:
        tls = f"root-certificates = {_toml_string(ssl_ca_certfile)}"
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "brainrecon"\n\n[superlink.brainrecon]\naddress = "{connect}:{port}"\n{tls}\n',
        encoding="utf-8")
    args = [_flower_bin("flower-superlink"), "--host", host, "--port", str(port),
            "--disable-runtime-dependency-installation", "--database", str(server_dir / "superlink.db")]
    if insecure:
        args.append("--insecure")
    for flag, value in (("--ssl-certfile", ssl_certfile), ("--ssl-keyfile", ssl_keyfile),
                        ("--ssl-ca-certfile", ssl_ca_certfile)):
        if value:
            args += [flag, str(value)]
    if enable_supernode_auth:
        args.append("--enable-supernode-auth")
    app = write_app(server_dir / "app")
    run_config = server_dir / "run-config.toml"
    run_config.write_text(
        f"num-rounds = {int(rounds)}\nmin-sites = {int(min_sites)}\n"
        f"params = {_toml_string(json.dumps(jsonable(dict(params))))}\n"
        f"server-dir = {_toml_string(server_dir)}\nresume = {'true' if resume else 'false'}\n"
        f"round-timeout = {float(round_timeout)}\n", encoding="utf-8")
    status = server_dir / SERVER_STATUS
    lock = _DirectoryLock(server_dir, "brainrecon federate server")
    previous = _raise_on_sigterm()
    superlink = None
    try:
        leftovers = stop_flower_processes(flwr_home)
        if leftovers:
            # A server of this directory that crashed left its detached SuperExec or ServerApp
            # running; they would reconnect to the new SuperLink and write into this directory.
            log(f"stopped {len(leftovers)} Flower process(es) an earlier server left running: pids {leftovers}")
        if status.exists() and not resume:
            status.unlink()
        superlink = start_process(args, env=env, log=server_dir / "superlink.log", new_group=False)
        _wait_for_port(connect, port, 60, superlink)
        if ready is not None:
            ready()
        log(f"SuperLink listening on {host}:{port}; waiting for {min_sites} site(s)")
        run_log = server_dir / "run.log"
        run = start_process([_flower_bin("flwr"), "run", str(app), "brainrecon", "--stream",
                             "--run-config", str(run_config)], env=env, log=run_log, new_group=False,
                            cwd=server_dir, append=False)
        try:
            returncode = run.wait()
        finally:
            stop_all([run])
        done = read_json(status) if status.is_file() else {}
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
        _restore_sigterm(previous)
        lock.release()
    return server_dir


def _raise_on_sigterm():
    """Turn SIGTERM into KeyboardInterrupt so ``finally`` blocks stop our children."""
    if not _main_thread():
        return None

    def _interrupt(signum, frame):
        raise KeyboardInterrupt

    return signal.signal(signal.SIGTERM, _interrupt)


def _restore_sigterm(previous) -> None:
    if previous is not None:
        signal.signal(signal.SIGTERM, previous)


def run_site(*, subject: int, data: str, server: str, state_dir: str | os.PathLike, out: str | os.PathLike,
             run_name: str | None = None, overwrite: bool = False, evaluate: bool = True, recipe: str | None = None,
             device: str | None = None, threads: int | None = None, insecure: bool = True,
             root_certificates: str | None = None, auth_private_key: str | None = None,
             port: int | None = None) -> int:
    """``brainrecon federate site``: a SuperNode for one subject's site; runs until stopped.

    Everything the site needs (data location, state and output directories) is written to
    ``state_dir/site.json`` and named to the SuperNode by its ``site-file`` node config.
    Returns the SuperNode's exit code.
    """
    state_dir = Path(state_dir).resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    lock = _DirectoryLock(state_dir, f"brainrecon federate site (subject {int(subject)})")
    settings = {"subject": int(subject), "data": str(data), "state_dir": str(state_dir),
                "out": str(Path(out).resolve()), "run_name": run_name, "overwrite": bool(overwrite),
                "evaluate": bool(evaluate), "recipe": recipe, "device": device, "threads": threads}
    write_json_atomic(state_dir / "site.json", settings)
    flwr_home = state_dir / "flwr-home"
    flwr_home.mkdir(parents=True, exist_ok=True)
    args = [_flower_bin("flower-supernode"), "--superlink", server,
            "--port", str(port or free_port()),
            "--node-config", f"site-file={_toml_string(state_dir / 'site.json')}"]
    if insecure:
        args.append("--insecure")
    if root_certificates:
        args += ["--root-certificates", str(root_certificates)]
    if auth_private_key:
        args += ["--auth-supernode-private-key", str(auth_private_key)]
    previous = _raise_on_sigterm()
    process = None
    try:
        stop_flower_processes(flwr_home)  # what a crashed SuperNode of this site left running
        process = subprocess.Popen(args, env=flower_env(flwr_home=flwr_home))
        process.own_group = False
        return process.wait()
    finally:
        if process is not None:
            stop_all([process])
        stop_flower_processes(flwr_home)
        _restore_sigterm(previous)
        lock.release()


# --------------------------------------------------------------------------- one machine
def fit_on_flower(params: Mapping[str, Any], *, data: str, subjects: Sequence[int], out: str | os.PathLike,
                  names: Mapping[int, str], overwrite: bool = False, recipe: str | None = None,
                  state_dir: str | os.PathLike | None = None, timeout: float = 3600.0,
                  log=print) -> list[Path]:
    """Run a BrainGuard federation on loopback: ``federate server`` and one ``federate site``
    per subject as child processes; every one is stopped (by process id) on success,
    failure or Ctrl-C. Returns the run directories the sites wrote.
    """
    _require_flwr()
    subjects = [int(s) for s in subjects]
    keep_state = state_dir is not None
    root = Path(state_dir) if keep_state else Path(tempfile.mkdtemp(prefix="brainrecon-flower-"))
    root = root.resolve()
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    rounds = int(params.get("rounds", 600))
    cli = [sys.executable, "-m", "brainrecon.cli"]
    server_args = cli + ["federate", "server", "--rounds", str(rounds), "--sites", str(len(subjects)),
                         "--host", "127.0.0.1", "--port", str(port), "--server-dir", str(root / "server"),
                         "--params", json.dumps(jsonable(dict(params)))]
    if params.get("resume"):
        # Continue from the server's saved global model and each site's saved state.
        server_args.append("--resume")
    env = flower_env()
    env.setdefault("TQDM_DISABLE", "1")
    processes: list[subprocess.Popen] = []

    previous = _raise_on_sigterm()
    try:
        server = start_process(server_args, env=env, log=root / "server.log")
        processes.append(server)
        _wait_for_port("127.0.0.1", port, 120, server)
        for s in subjects:
            site_args = cli + ["federate", "site", "--subject", str(s), "--data", str(data),
                               "--server", f"127.0.0.1:{port}", "--state-dir", str(root / f"site-{s}"),
                               "--out", str(out), "--name", names[s], "--no-evaluate"]
            if overwrite:
                site_args.append("--overwrite")
            if recipe:
                site_args += ["--recipe-name", recipe]
            processes.append(start_process(site_args, env=env, log=root / f"site-{s}.log"))
        log(f"federation on 127.0.0.1:{port}: server pid {server.pid}, site pids "
            f"{[p.pid for p in processes[1:]]}")
        deadline = time.monotonic() + timeout
        while server.poll() is None:
            for p, s in zip(processes[1:], subjects):
                if p.poll() is not None:
                    raise BrainreconError(f"Site {s} stopped (exit code {p.returncode}); see {root / f'site-{s}.log'}.")
            if time.monotonic() > deadline:
                raise BrainreconError(f"The federation did not finish within {timeout:.0f} s.")
            _pause(0.5)
        if server.returncode != 0:
            tail = "\n".join((root / "server.log").read_text(errors="replace").splitlines()[-20:])
            raise BrainreconError(f"The federation failed (server exit code {server.returncode}):\n{tail}")
    finally:
        stop_all(processes)
        # Anything a server or site killed after its grace period could not stop itself.
        for home in [root / "server", *(root / f"site-{s}" for s in subjects)]:
            stop_flower_processes(home / "flwr-home")
        _restore_sigterm(previous)
    paths = [Path(out) / names[s] for s in subjects]
    missing = [str(p) for p in paths if not p.is_dir()]
    if missing:
        raise BrainreconError(f"The federation finished but site run(s) {missing} are missing; see {root}.")
    if not keep_state:
        shutil.rmtree(root, ignore_errors=True)
    return paths


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


__all__ = [
    "check_upload",
    "client_app",
    "fit_on_flower",
    "flower_env",
    "flower_processes",
    "make_strategy",
    "run_site",
    "serve",
    "server_app",
    "site_train",
    "stop_flower_processes",
]
