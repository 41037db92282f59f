"""BrainGuard's synchronisation: the server's weighted average and the Dynamic Fusion Learner.

* :func:`aggregate` is the whole server: a FedAvg of the clients' uploads (state dicts of the
  shared tensors) weighted by :func:`aggregation_weights` (``n_s / Σ n``); it refuses an upload
  that holds a subject's private input layer, so it never sees anything subject-specific;
* :class:`DynamicFusionLearner` is the third tier a client applies to the global model it
  receives (adaptive tuning: ``θ_l + (θ_g - θ_l) ⊙ W`` with ``W`` learned on the client's own
  data, as the released ``utils/DFL.py`` does).

Split out of :mod:`~brainrecon.decoders.brainguard.federated`, which runs the rounds and
re-exports these names.
"""

from __future__ import annotations

from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
import torch

from brainrecon.decoders.brainguard.model import is_private
from brainrecon.errors import BrainreconError, DataError


def aggregation_weights(sample_counts: Sequence[int]) -> list[float]:
    """FedAvg weights ``n_s / Σ n`` of clients with ``sample_counts`` training samples."""
    counts = [int(c) for c in sample_counts]
    if not counts or any(c <= 0 for c in counts):
        raise DataError(f"Every client needs a positive sample count, got {counts}.")
    total = float(sum(counts))
    return [c / total for c in counts]


def aggregate(states: Sequence[Mapping[str, torch.Tensor]], sample_counts: Sequence[int],
              device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
    """The server step: average the clients' uploaded shared tensors.

    This is the only place where information from several subjects meets, and it only ever
    sees parameters: each element of ``states`` must be a mapping of parameter names to
    tensors, with the same names in every upload and no subject-specific (``ridge.*``)
    tensor among them.

    Parameters
    ----------
    states : sequence of dict str -> tensor
        One upload per client (:meth:`Client.upload`).
    sample_counts : sequence of int
        Training samples per client; the weights are ``n_s / Σ n``.
    device : optional
        Where the global tensors are computed (default: the first upload's device).

    Returns
    -------
    dict str -> tensor
        The global shared tensors, ``Σ_s w_s θ_s``.
    """
    if isinstance(states, Mapping) or not isinstance(states, Sequence):
        raise TypeError(
            f"aggregate() takes a sequence of client state dicts (parameter name -> tensor), "
            f"got {type(states).__name__}."
        )
    if len(states) != len(sample_counts):
        raise DataError(f"{len(states)} uploads but {len(sample_counts)} sample counts.")
    if not states:
        raise DataError("aggregate() needs at least one client upload.")
    for k, state in enumerate(states):
        if not isinstance(state, Mapping):
            raise TypeError(
                f"Upload {k} is a {type(state).__name__}; the server only accepts state dicts "
                f"(parameter name -> tensor), never data."
            )
        bad = [name for name, value in state.items() if not isinstance(value, torch.Tensor)]
        if bad:
            raise TypeError(f"Upload {k} has non-tensor entries {bad[:3]}; only parameters may be sent.")
        private = [name for name in state if is_private(name)]
        if private:
            raise BrainreconError(
                f"Upload {k} contains the subject-specific input layer ({private}); it must "
                f"stay on its client (retention tier)."
            )
    names = list(states[0])
    for k, state in enumerate(states[1:], start=1):
        if list(state) != names:
            raise DataError(f"Upload {k} has different parameter names than upload 0.")
    weights = aggregation_weights(sample_counts)
    if device is None:
        device = states[0][names[0]].device if names else "cpu"
    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name in names:
            acc = torch.zeros_like(states[0][name], device=device)
            for w, state in zip(weights, states):
                acc.add_(state[name].to(device), alpha=w)
            out[name] = acc
    return out


# --------------------------------------------------------------------------- fusion
class DynamicFusionLearner:
    """Learns the element-wise fusion weights ``W`` of the adaptive tier (FedALA's ALA as BrainGuard uses it).

    For the adaptive tensors, with local ``θ_l`` and global ``θ_g``, every batch of the
    client's training data does::

        θ_t = θ_l + (θ_g - θ_l) ⊙ W
        g   = ∂ loss(θ_t) / ∂ θ_t                    (all other tensors frozen)
        W   = clip(W - eta · (grad_scale · g) ⊙ (θ_g - θ_l), 0, 1)

    ``W`` starts at 1 and persists across rounds. The first call ("start phase") repeats
    epochs until more than ``num_pre_loss`` epoch losses (the last batch's loss of each
    epoch) are recorded and the standard deviation of the last ``num_pre_loss`` is below
    ``threshold`` (at most ``max_start_epochs`` epochs); later calls run one epoch.

    How the released rule really behaves: with BrainGuard's loss (2·10⁴·MSE of unit vectors
    plus SoftCLIP) a batch loss stays below about 50, so the standard deviation of ten of
    them is at most about 25, always below the threshold of 50: the check passes the first
    time it is made, and the start phase is always exactly
    ``num_pre_loss + 1`` = 11 epochs. It is not a convergence test at these loss scales.
    The start phase is also chaotic (a 1e-7 relative perturbation moves most of ``W`` by more
    than 1e-3), so two runs agree element by element only on the same hardware, library
    versions and thread count.
    Dropout is off while ``W`` is learned, so the fusion gradient is not noisier than the
    data make it. A call where global and local tensors are identical does nothing.
    """

    def __init__(self, *, eta: float = 1.0, grad_scale: float = 1000.0, threshold: float = 50.0,
                 num_pre_loss: int = 10, max_start_epochs: int = 100):
        self.eta = float(eta)
        self.grad_scale = float(grad_scale)
        self.threshold = float(threshold)
        self.num_pre_loss = int(num_pre_loss)
        self.max_start_epochs = int(max_start_epochs)
        self.weights: dict[str, torch.Tensor] | None = None
        self.start_phase = True

    def fuse(self, model: torch.nn.Module, global_state: Mapping[str, torch.Tensor],
             adaptive: Sequence[str], batches: Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]],
             loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> list[float]:
        """Learn ``W`` and write the fused adaptive tensors into ``model``.

        Parameters
        ----------
        model : torch.nn.Module
            The local model; only the tensors named in ``adaptive`` are changed.
        global_state : dict str -> tensor
            Global values of (at least) the ``adaptive`` tensors.
        adaptive : sequence of str
            Names of the adaptively fused parameter tensors.
        batches : callable
            Returns an iterable of ``(inputs, targets)`` batches (one epoch).
        loss_fn : callable
            ``loss_fn(model(inputs), targets) -> scalar``.

        Returns
        -------
        list of float
            The recorded epoch losses (one per epoch run).
        """
        adaptive = list(adaptive)
        if not adaptive:
            self.start_phase = False
            return []
        params = dict(model.named_parameters())
        local = {n: params[n].detach() for n in adaptive}
        diff = {n: global_state[n].to(local[n].device, local[n].dtype) - local[n] for n in adaptive}
        if all(not bool(d.any()) for d in diff.values()):
            # Nothing to blend (a single client gets its own weights back): skip, as FedALA
            # skips when the global and local models coincide; the start phase stays pending.
            return []
        if self.weights is None:
            self.weights = {n: torch.ones_like(local[n]) for n in adaptive}
        missing = [n for n in adaptive if n not in self.weights]
        if missing:
            raise DataError(f"Fusion weights are missing for {missing}; the adaptive tier changed.")
        with torch.no_grad():
            fused = {n: (local[n] + diff[n] * self.weights[n]).requires_grad_(True) for n in adaptive}
        frozen = {n: p.detach() for n, p in params.items() if n not in fused}
        tensors = {**frozen, **fused, **dict(model.named_buffers())}
        order = [fused[n] for n in adaptive]
        was_training = model.training
        model.eval()
        losses: list[float] = []
        try:
            while True:
                last = None
                for inputs, targets in batches():
                    loss = loss_fn(torch.func.functional_call(model, tensors, (inputs,)), targets)
                    grads = torch.autograd.grad(loss, order)
                    with torch.no_grad():
                        for n, g in zip(adaptive, grads):
                            w = self.weights[n]
                            w.sub_(self.eta * (self.grad_scale * g) * diff[n]).clamp_(0.0, 1.0)
                            fused[n].copy_(local[n] + diff[n] * w)
                    last = loss.detach()
                if last is not None:
                    losses.append(float(last))
                if not self.start_phase:
                    break
                if len(losses) > self.num_pre_loss and \
                        float(np.std(losses[-self.num_pre_loss:])) < self.threshold:
                    break
                if len(losses) >= self.max_start_epochs or last is None:
                    break
        finally:
            model.train(was_training)
        with torch.no_grad():
            for n in adaptive:
                params[n].copy_(fused[n])
        self.start_phase = False
        return losses


# --------------------------------------------------------------------------- client


__all__ = ["DynamicFusionLearner", "aggregate", "aggregation_weights"]
