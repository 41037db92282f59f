"""Federated training of BrainGuard decoders: clients, server, Dynamic Fusion Learner.

The pieces, and what each one may see:

* a :class:`Client` holds one subject's voxels, targets and model (including the
  subject's ``ridge`` input layer, its voxel standardisation and its optimiser);
* the server is a plain function, :func:`aggregate`, of the clients' *uploads* — state
  dicts of the shared parameter tensors — and their sample counts; it never receives data,
  and it refuses any upload that contains the subject-specific input layer;
* a client merges the global model into its own with three tiers (the released ``utils/DFL.py``):
  **retention** (the ridge layer is never touched), **global alignment** (middle tensors are
  overwritten), **adaptive tuning** (the last tensors become ``θ_l + (θ_g - θ_l) ⊙ W`` with
  ``W`` learned by the :class:`DynamicFusionLearner`);
* :func:`run_federation` runs the rounds and calls back after each one (checkpoints).

The server's average and the Dynamic Fusion Learner live in
:mod:`~brainrecon.decoders.brainguard.fusion`; the checkpoint format in
:mod:`~brainrecon.decoders.brainguard.checkpoint` (both re-exported here).

One round: every client fuses the previous round's global model into its own (skipped in
round 0, when there is none yet), trains ``local_iterations`` epochs on its own data, and
uploads its shared tensors; the server averages them weighted by the clients' sample counts.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from brainrecon.decoders.brainguard.checkpoint import (  # noqa: F401 - re-exported: the format lives there
    CHECKPOINT_FORMAT,
    LATEST,
    _cpu_contiguous,
    checkpoint_candidates,
    load_checkpoint,
    prune_rounds,
    read_latest,
    save_checkpoint,
)
from brainrecon.decoders.brainguard.fusion import (  # noqa: F401 - re-exported: the server and tests import them here
    DynamicFusionLearner,
    aggregate,
    aggregation_weights,
)
from brainrecon.decoders.brainguard.model import (
    BrainGuardNet,
    brainguard_loss,
    decay_groups,
    is_private,
    split_tiers,
)
from brainrecon.devices import resolve_device
from brainrecon.progress import bar_disabled

EMA_MODES = ("none", "standard", "inverted")


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a federated training run (besides data and devices)."""

    hidden: int = 2048
    n_blocks: int = 4
    dropout: float = 0.15
    rounds: int = 600
    local_iterations: int = 1
    sync_layers: int = 4
    sync_tensors: int | None = None
    batch_size: int = 50
    lr: float = 3e-4
    weight_decay: float = 1e-2
    mse_weight: float = 2e4
    softclip_tau: float = 0.05
    softclip_weight: float = 1.0
    dfl_eta: float = 1.0
    dfl_grad_scale: float = 1000.0
    dfl_threshold: float = 50.0
    dfl_num_pre_loss: int = 10
    dfl_max_epochs: int = 100
    ema: str = "none"
    ema_decay: float = 0.999
    warmup_epochs: float = 2.0
    decay_layernorm: bool = False
    seed: int = 0
    branches: tuple[int, ...] | None = None
    projector_hidden: int | None = None

    def loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return brainguard_loss(pred, target, mse_weight=self.mse_weight,
                               softclip_tau=self.softclip_tau, softclip_weight=self.softclip_weight,
                               branches=self.branches)

    def build(self, n_voxels: int, n_tokens: int, token_dim: int, dropout: float | None = None) -> BrainGuardNet:
        """The network this configuration trains, for a subject with ``n_voxels`` voxels."""
        return BrainGuardNet(int(n_voxels), self.hidden, self.n_blocks, n_tokens, token_dim,
                             self.dropout if dropout is None else dropout,
                             branches=self.branches, projector_hidden=self.projector_hidden)

    def steps_per_epoch(self, n_samples: int) -> int:
        return -(-int(n_samples) // int(self.batch_size))


# --------------------------------------------------------------------------- server
class Client:
    """One subject: its data, its model, its optimiser, its fusion weights.

    Parameters
    ----------
    subject : int
    voxels : tensor of shape (n, V) or (n, R, V)
        Standardised training voxels (stays on the client): one averaged row per image, or each
        image's ``R`` single trials (``Split.trial_stack``). With trials, the client trains as the
        released ``clients/client.py`` does — every sample of batch ``b`` of an epoch uses
        repetition ``b % R`` (``voxel[:, train_i % 3]``) — and the Dynamic Fusion Learner sees the
        averages (the mean over the R rows), as the released ``utils/DFL.py`` does.
    targets : tensor of shape (n, n_tokens, token_dim)
    model : BrainGuardNet
        Already initialised (shared layers from the common initialisation).
    config : TrainConfig
    device : torch.device
    val_voxels, val_targets : tensors or None
        A validation set held out of the client's training data. When given, the client
        scores its model after every local epoch (mean cosine similarity of the flattened
        prediction and target, the released ``client.py``'s criterion) and keeps the best
        state (:attr:`best_state`).
    """

    def __init__(self, subject: int, voxels: torch.Tensor, targets: torch.Tensor,
                 model: BrainGuardNet, config: TrainConfig, device: torch.device,
                 val_voxels: torch.Tensor | None = None, val_targets: torch.Tensor | None = None):
        self.subject = int(subject)
        self.config = config
        self.device = torch.device(device)
        self.voxels = voxels.to(self.device)
        self.targets = targets.to(self.device)
        self.n_samples = int(voxels.shape[0])
        #: Per-image averages (what the fusion learner and calibration see).
        self.average_voxels = self.voxels.mean(dim=1) if self.voxels.ndim == 3 else self.voxels
        #: The repetition index each batch of the last training epoch used (None: averages).
        self.repetitions_used: list[int | None] = []
        self.val_voxels = None if val_voxels is None else val_voxels.to(self.device)
        self.val_targets = None if val_targets is None else val_targets.to(self.device)
        self.best_score: float | None = None
        self.best_state: dict[str, torch.Tensor] | None = None
        self.last_score: float | None = None
        self.model = model.to(self.device)
        self.retained, self.aligned, self.adaptive = split_tiers(
            self.model, config.sync_layers, config.sync_tensors)
        seeds = np.random.SeedSequence([int(config.seed), self.subject, 2]).generate_state(2)
        self.shuffle_generator = torch.Generator(device="cpu").manual_seed(int(seeds[0]))
        self.dropout_generator = torch.Generator(device=self.device).manual_seed(int(seeds[1]))
        self.model.set_generator(self.dropout_generator)
        self.optimizer = torch.optim.AdamW(
            decay_groups(self.model, config.weight_decay, layernorm=config.decay_layernorm),
            lr=config.lr, betas=(0.9, 0.9999), eps=1e-8)
        total = config.rounds * config.local_iterations * config.steps_per_epoch(self.n_samples)
        # Warm-up measured in local epochs: the released schedule's pct_start is
        # 2 / (rounds * local_steps), two epochs whatever the number of local epochs per
        # round. Never less than one step, never more than OneCycle's own default share.
        epochs = config.rounds * config.local_iterations
        pct = min(0.3, max(float(config.warmup_epochs) / epochs, 1.0 / total))
        self.scheduler = torch.optim.lr_scheduler.OneCycleLR(
            self.optimizer, max_lr=config.lr, total_steps=total, pct_start=pct,
            final_div_factor=1000.0)
        self.dfl = DynamicFusionLearner(eta=config.dfl_eta, grad_scale=config.dfl_grad_scale,
                                        threshold=config.dfl_threshold,
                                        num_pre_loss=config.dfl_num_pre_loss,
                                        max_start_epochs=config.dfl_max_epochs)
        self.ema: dict[str, torch.Tensor] | None = None
        if config.ema != "none":
            self.ema = {n: p.detach().clone() for n, p in self.model.named_parameters() if not is_private(n)}

    # -------------------------------------------------------------- data
    def batches(self) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        """One epoch of shuffled ``(averaged voxels, targets)`` batches on the client's device."""
        order = torch.randperm(self.n_samples, generator=self.shuffle_generator)
        for start in range(0, self.n_samples, self.config.batch_size):
            idx = order[start:start + self.config.batch_size].to(self.device)
            yield self.average_voxels[idx], self.targets[idx]

    def training_batches(self) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        """One training epoch: like :meth:`batches`, but with single trials each batch ``b`` takes
        every sample's repetition ``b % R`` (the released rule); recorded in ``repetitions_used``."""
        self.repetitions_used = []
        order = torch.randperm(self.n_samples, generator=self.shuffle_generator)
        for b, start in enumerate(range(0, self.n_samples, self.config.batch_size)):
            idx = order[start:start + self.config.batch_size].to(self.device)
            if self.voxels.ndim == 3:
                rep = b % int(self.voxels.shape[1])
                self.repetitions_used.append(rep)
                yield self.voxels[idx, rep], self.targets[idx]
            else:
                self.repetitions_used.append(None)
                yield self.voxels[idx], self.targets[idx]

    # -------------------------------------------------------------- one round
    def receive(self, global_state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        """Merge the global model into the local one (the three tiers)."""
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for n in self.aligned:
                params[n].copy_(global_state[n].to(params[n].device))
        losses = self.dfl.fuse(self.model, global_state, self.adaptive, self.batches, self.config.loss)
        if self.config.ema == "standard":
            # A standard EMA carried across the fusion would upload mostly the previous
            # round's weights (about 84 % after one 178-step epoch at d = 0.999): restart it
            # from the fused model.
            self.ema = {n: p.detach().clone() for n, p in self.model.named_parameters()
                        if not is_private(n)}
        return {"dfl_epochs": len(losses), "dfl_loss": losses[-1] if losses else None}

    def train(self, epochs: int) -> float:
        """Train every local tensor (ridge included) for ``epochs`` epochs; mean batch loss."""
        self.model.train()
        total, count = 0.0, 0
        decay = self.config.ema_decay
        for _ in range(int(epochs)):
            for inputs, targets in self.training_batches():
                self.optimizer.zero_grad(set_to_none=True)
                loss = self.config.loss(self.model(inputs), targets)
                loss.backward()
                if self.config.ema == "inverted":
                    # The released code's order and weighting (``clients/client.py``): before the step,
                    # ema <- decay * param + (1 - decay) * ema, i.e. about one step behind.
                    self._update_ema(decay, 1.0 - decay, param_weight_first=True)
                self.optimizer.step()
                self.scheduler.step()
                if self.config.ema == "standard":
                    self._update_ema(decay, 1.0 - decay, param_weight_first=False)
                total += float(loss.detach())
                count += 1
            if self.val_voxels is not None:
                self.validate()
        return total / max(count, 1)

    def _score(self, tensors: Mapping[str, torch.Tensor] | None = None) -> float:
        """Mean cosine similarity on the held-out set, of the model or of ``tensors`` in it."""
        was_training = self.model.training
        self.model.eval()
        sims = []
        with torch.no_grad():
            for start in range(0, self.val_voxels.shape[0], self.config.batch_size):
                batch = self.val_voxels[start:start + self.config.batch_size]
                pred = self.model(batch) if tensors is None else \
                    torch.func.functional_call(self.model, dict(tensors), (batch,))
                target = self.val_targets[start:start + self.config.batch_size]
                if self.config.branches is not None and len(self.config.branches) > 1:
                    # The released client keeps its best model by the image branch's similarity.
                    pred, target = pred[:, :self.config.branches[0]], target[:, :self.config.branches[0]]
                sims.append(torch.nn.functional.cosine_similarity(pred.flatten(1), target.flatten(1), dim=1))
        self.model.train(was_training)
        return float(torch.cat(sims).mean())

    def validate_global(self, global_state: Mapping[str, torch.Tensor]) -> float:
        """Score the global backbone behind this subject's own input layer (the released
        ``eval_global_model``): the site's ridge, every shared tensor from ``global_state``."""
        params = dict(self.model.named_parameters())
        tensors = {n: (p.detach() if is_private(n) else global_state[n].to(p.device, p.dtype))
                   for n, p in params.items()}
        return self._score(tensors)

    def validate(self) -> float:
        """Score the model on the held-out set; remember the best state. Returns the score."""
        score = self._score()
        self.last_score = score
        if self.best_score is None or score > self.best_score:
            self.best_score = score
            self.best_state = {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}
        return score

    def _update_ema(self, a: float, b: float, *, param_weight_first: bool) -> None:
        with torch.no_grad():
            for n, p in self.model.named_parameters():
                if is_private(n):
                    continue
                e = self.ema[n]
                if param_weight_first:
                    e.mul_(b).add_(p.detach(), alpha=a)
                else:
                    e.mul_(a).add_(p.detach(), alpha=b)

    def upload(self) -> dict[str, torch.Tensor]:
        """The shared tensors sent to the server (the EMA copy when ``ema`` is on).

        The subject-specific ridge layer is never part of it.
        """
        source = self.ema if self.ema is not None else {
            n: p for n, p in self.model.named_parameters() if not is_private(n)}
        return {n: t.detach().clone() for n, t in source.items()}

    # -------------------------------------------------------------- checkpoint
    def checkpoint_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Tensors and JSON-able metadata that restore this client exactly."""
        tensors = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        opt_tensors, opt_meta = _flatten_optimizer(self.optimizer.state_dict())
        tensors.update(opt_tensors)
        if self.dfl.weights is not None:
            tensors.update({f"fusion.{k}": v for k, v in self.dfl.weights.items()})
        if self.ema is not None:
            tensors.update({f"ema.{k}": v for k, v in self.ema.items()})
        if self.best_state is not None:
            tensors.update({f"best.{k}": v for k, v in self.best_state.items()})
        tensors["rng.shuffle"] = self.shuffle_generator.get_state()
        tensors["rng.dropout"] = self.dropout_generator.get_state()
        meta = {
            "subject": self.subject,
            "n_samples": self.n_samples,
            "optimizer": opt_meta,
            "scheduler": self.scheduler.state_dict(),
            "dfl_start_phase": self.dfl.start_phase,
            "has_fusion_weights": self.dfl.weights is not None,
            "best_score": self.best_score,
        }
        return tensors, meta

    def restore(self, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> None:
        """Inverse of :meth:`checkpoint_state`."""
        model_state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
        self.model.load_state_dict(model_state, strict=True)
        self.optimizer.load_state_dict(_unflatten_optimizer(tensors, meta["optimizer"]))
        self.scheduler.load_state_dict(dict(meta["scheduler"]))
        if meta["has_fusion_weights"]:
            self.dfl.weights = {k[len("fusion."):]: v.to(self.device).clone()
                                for k, v in tensors.items() if k.startswith("fusion.")}
        self.dfl.start_phase = bool(meta["dfl_start_phase"])
        if self.ema is not None:
            self.ema = {k[len("ema."):]: v.to(self.device).clone()
                        for k, v in tensors.items() if k.startswith("ema.")}
        self.best_score = meta.get("best_score")
        best = {k[len("best."):]: v.clone() for k, v in tensors.items() if k.startswith("best.")}
        self.best_state = best or None
        self.shuffle_generator.set_state(tensors["rng.shuffle"].clone())
        self.dropout_generator.set_state(tensors["rng.dropout"].clone())

    def final_model(self) -> BrainGuardNet:
        """The model this site keeps: the best by validation when it validates, else the last."""
        if self.best_state is not None:
            self.model.load_state_dict(self.best_state, strict=True)
        return self.model


def site_round(client: Client, global_state: Mapping[str, torch.Tensor] | None,
               local_iterations: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """One site's part of a round: fuse the global model (none in round 0), train, upload.

    Both engines call this: the in-process loop (:func:`run_federation`) and the Flower
    ClientApp (:mod:`brainrecon.federation.app`, a layer above, which calls down into this module).

    Returns
    -------
    upload : dict str -> tensor
        The shared tensors for the server (never the subject's ridge layer).
    record : dict
        What happened at the site (``global_val``: the received global backbone's validation
        score behind the site's ridge; ``dfl_epochs``, ``loss``, ``val``); it stays at the site.
    """
    record: dict[str, Any] = {}
    if global_state is not None:
        if client.val_voxels is not None:
            # The previous round's global model, evaluated where the private layer is.
            record["global_val"] = client.validate_global(global_state)
        record["dfl_epochs"] = client.receive(global_state)["dfl_epochs"]
    record["loss"] = float(client.train(local_iterations))
    if client.val_voxels is not None:
        record["val"] = client.last_score
    return client.upload(), record


def _flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, entry in state["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{idx}.{key}"] = value
            else:
                scalars.setdefault(str(idx), {})[key] = value
    groups = [dict(g) for g in state["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars,
                     "indices": [int(i) for i in state["state"]]}


def _unflatten_optimizer(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> dict:
    state: dict[int, dict[str, Any]] = {int(i): {} for i in meta["indices"]}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, idx, name = key.split(".", 2)
            state[int(idx)][name] = value.clone()
    for idx, entry in meta["scalars"].items():
        state[int(idx)].update(entry)
    groups = []
    for g in meta["param_groups"]:
        g = dict(g)
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    return {"state": state, "param_groups": groups}


# --------------------------------------------------------------------------- devices
def client_devices(device: str, n_clients: int) -> list[torch.device]:
    """One device per client: spread over all GPUs when ``device`` is ``"auto"``/``"cuda"``.

    ``"auto"`` is CUDA when available, else the CPU. With several GPUs, client ``k`` goes
    to GPU ``k % n_gpus``; a specific device (``"cuda:1"``, ``"cpu"``) holds every client.
    """
    dev = resolve_device(device)
    if str(dev) == "cuda":  # "auto" or "cuda" without an index: spread over the GPUs
        n_gpus = torch.cuda.device_count()
        return [torch.device("cuda", k % n_gpus) for k in range(n_clients)]
    return [dev] * n_clients


def _for_each(clients: Sequence[Client], fn: Callable[[Client], Any]) -> list[Any]:
    """``fn`` on every client: in threads when they sit on distinct GPUs, else in order."""
    devices = {c.device for c in clients}
    if len(devices) > 1 and all(d.type == "cuda" for d in devices):
        with ThreadPoolExecutor(max_workers=len(devices)) as pool:
            # One worker per device would still let two clients of one GPU overlap; group
            # clients by device and run each group in order on its own thread.
            groups: dict[torch.device, list[int]] = {}
            for k, c in enumerate(clients):
                groups.setdefault(c.device, []).append(k)
            results: list[Any] = [None] * len(clients)

            def run_group(indices: list[int]) -> None:
                for k in indices:
                    with torch.cuda.device(clients[k].device):
                        results[k] = fn(clients[k])

            for future in [pool.submit(run_group, idx) for idx in groups.values()]:
                future.result()
            return results
    return [fn(c) for c in clients]


# --------------------------------------------------------------------------- the loop
def run_federation(clients: Sequence[Client], *, rounds: int, local_iterations: int,
                   start_round: int = 0, global_state: dict[str, torch.Tensor] | None = None,
                   server_device: torch.device | str | None = None,
                   on_round_end: Callable[[int, dict[str, torch.Tensor], dict], None] | None = None,
                   progress: bool = True) -> dict[str, torch.Tensor] | None:
    """Run rounds ``start_round .. rounds-1`` of federated training.

    Parameters
    ----------
    clients : sequence of Client
    rounds, local_iterations : int
        Total number of rounds; local epochs per round.
    start_round : int
        Number of rounds already completed (resume).
    global_state : dict or None
        The global shared tensors after round ``start_round - 1`` (None at the start).
    server_device : optional
        Where the server averages (default: the first client's device).
    on_round_end : callable, optional
        ``on_round_end(round_index, global_state, record)`` after each round (checkpoints).

    Returns
    -------
    dict or None
        The final global shared tensors.
    """
    counts = [c.n_samples for c in clients]
    bar = tqdm(range(start_round, rounds), desc="BrainGuard rounds", unit="round",
               initial=start_round, total=rounds, disable=bar_disabled(progress), leave=False)
    for r in bar:
        record: dict[str, Any] = {"round": r}
        results = _for_each(clients, lambda c, g=global_state: site_round(c, g, local_iterations))
        for key in ("global_val", "dfl_epochs", "loss", "val"):
            values = {c.subject: rec[key] for c, (_, rec) in zip(clients, results) if key in rec}
            if values:
                record[key] = values
        uploads = [upload for upload, _ in results]
        del results
        global_state = aggregate(uploads, counts, device=server_device or clients[0].device)
        del uploads
        bar.set_postfix(loss=f"{np.mean(list(record['loss'].values())):.4g}")
        if on_round_end is not None:
            on_round_end(r, global_state, record)
    bar.close()
    return global_state


__all__ = [
    "CHECKPOINT_FORMAT",
    "EMA_MODES",
    "Client",
    "DynamicFusionLearner",
    "TrainConfig",
    "aggregate",
    "aggregation_weights",
    "checkpoint_candidates",
    "client_devices",
    "load_checkpoint",
    "prune_rounds",
    "read_latest",
    "run_federation",
    "save_checkpoint",
    "site_round",
]
