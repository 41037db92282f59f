"""A BrainGuard site on Flower: its state between rounds, the ClientApp's handler, ``federate site``.

Each site loads only its own subject's data, runs
:func:`~brainrecon.decoders.brainguard.federated.site_round` (fusion by the Dynamic Fusion
Learner, local training) and keeps its whole state — model, fusion weights, optimiser and
schedule, random generators, the start-phase flag, its best-by-validation model and its round
history — in its own state directory between rounds (a ClientApp is a fresh process for every
message). After the last round it writes its own run (one subject, nothing about the others)
with the one run writer, :func:`brainrecon.workflows.write.write_subject_runs`.

A site that crashes can be restarted with the same ``--state-dir``: it resumes from its last
completed round.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from brainrecon.decoders.brainguard.federated import site_round
from brainrecon.errors import BrainreconError
from brainrecon.federation.records import ARRAYS, CONFIG, METRICS, NUM_EXAMPLES
from brainrecon.federation.supervise import (
    DirectoryLock,
    flower_bin,
    flower_env,
    free_port,
    raise_on_sigterm,
    restore_sigterm,
    stop_all,
    stop_flower_processes,
    toml_string,
)
from brainrecon.io import jsonable, read_json, write_json_atomic

SITE_STATE = "state-{:05d}.safetensors"  # the site's state after that many rounds
SITE_META = "state-{:05d}.json"


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
        from brainrecon.runs import default_run_name
        from brainrecon.workflows.write import write_subject_runs

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
    lock = DirectoryLock(state_dir, f"brainrecon federate site (subject {int(subject)})")
    settings = {"subject": int(subject), "data": str(data), "state_dir": str(state_dir),
                "out": str(Path(out).resolve()), "run_name": run_name, "overwrite": bool(overwrite),
                "evaluate": bool(evaluate), "recipe": recipe, "device": device, "threads": threads}
    write_json_atomic(state_dir / "site.json", settings)
    flwr_home = state_dir / "flwr-home"
    flwr_home.mkdir(parents=True, exist_ok=True)
    args = [flower_bin("flower-supernode"), "--superlink", server,
            "--port", str(port or free_port()),
            "--node-config", f"site-file={toml_string(state_dir / 'site.json')}"]
    if insecure:
        args.append("--insecure")
    if root_certificates:
        args += ["--root-certificates", str(root_certificates)]
    if auth_private_key:
        args += ["--auth-supernode-private-key", str(auth_private_key)]
    previous = raise_on_sigterm()
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
        restore_sigterm(previous)
        lock.release()


__all__ = ["SITE_META", "SITE_STATE", "Site", "run_site", "site_config", "site_train"]
