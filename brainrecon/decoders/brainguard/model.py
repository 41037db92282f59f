"""The BrainGuard network, its loss, and the output-scale calibration.

Network (released ``trainmodel/models.py``; the WeADL fork's single image-token branch)::

    ridge      Linear(V -> h)                       per subject, never leaves its client
    blocks[k]  x + Dropout(GELU(LayerNorm(Linear(h, h)(x))))     k = 0 .. n_blocks-1
    head       Linear(h -> n_tokens * d), viewed as (n_tokens, d)
    projector  per token: LN(d) GELU Linear(d, p) LN(p) GELU Linear(p, p) LN(p) GELU Linear(p, d)

(p, the projector width, is h unless ``projector_hidden`` says otherwise: the released
two-branch code fixes it at 2048, the WeADL fork uses h.)

The module order fixes the order of the parameter tensors, which is what the federated
synchronisation tiers are defined on: ``ridge`` (2 tensors), each block (4), ``head`` (2),
``projector`` (12).

Two branches (the released BrainGuard, ``branches=(257, 77)``): the target's tokens are split
into an image group and a text group, each with its own head and projector, as in the
released ``BrainNetwork`` (``head_image``/``head_text``, ``projector_image``/``projector_text``).
Here the image branch keeps the names ``head``/``projector`` and the text branch is
``head_text``/``projector_text``; the module order is ridge, blocks, ``head``,
``head_text``, ``projector``, ``projector_text`` — the released order, so tensor ``k`` here is
tensor ``k`` there (46 tensors; the released ``-p 24`` fuses both projectors). The output is
the two groups concatenated on the token axis, image first: (B, 257 + 77, 768).

A target of shape ``(a, *rest)`` is treated as ``a`` tokens of ``prod(rest)`` values
(``(16, 768)`` IP-Adapter tokens stay as they are; ``(32, 32, 3)`` pixels become 32 image
rows of 96 values); a 1-D target ``(d,)`` is one token.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from brainrecon.errors import DataError

CALIBRATIONS = ("token", "norm", "none")


def token_shape(target_shape: tuple[int, ...]) -> tuple[int, int]:
    """(n_tokens, token_dim) for a per-sample target shape (see the module docstring)."""
    shape = tuple(int(s) for s in target_shape)
    if len(shape) == 0:
        raise DataError("A target needs at least one dimension, got a scalar target shape ().")
    if len(shape) == 1:
        return 1, shape[0]
    return shape[0], int(np.prod(shape[1:]))


class GeneratorDropout(nn.Module):
    """Dropout whose mask comes from an explicit :class:`torch.Generator`.

    ``nn.Dropout`` draws from the device's global generator, which clients running on
    one device (or in threads) would share; a per-client generator makes every client's
    training reproducible on its own and lets a checkpoint store its exact state.
    """

    def __init__(self, p: float):
        super().__init__()
        self.p = float(p)
        self.generator: torch.Generator | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = torch.rand(x.shape, generator=self.generator, device=x.device, dtype=x.dtype)
        return x * (keep >= self.p).to(x.dtype) / (1.0 - self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class ResidualBlock(nn.Module):
    """``x + Dropout(GELU(LayerNorm(Linear(x))))``."""

    def __init__(self, hidden: int, dropout: float):
        super().__init__()
        self.linear = nn.Linear(hidden, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.dropout = GeneratorDropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.dropout(F.gelu(self.norm(self.linear(x))))


class BrainGuardNet(nn.Module):
    """One subject's decoder: voxels (B, V) -> tokens (B, n_tokens, token_dim).

    Parameters
    ----------
    n_voxels : int
        Input width V of the subject-specific ``ridge`` layer.
    hidden : int
        Width h of the ridge output, the residual blocks and the projector.
    n_blocks : int
        Number of residual blocks.
    n_tokens, token_dim : int
        Output shape per sample.
    dropout : float
        Dropout probability inside the residual blocks.
    branches : sequence of int, optional
        Token counts of the separately headed groups (see the module docstring): None or
        ``(n_tokens,)`` for one branch, ``(image, text)`` for two.
    projector_hidden : int, optional
        Width of the projector's hidden layers (default ``hidden``).
    """

    def __init__(self, n_voxels: int, hidden: int, n_blocks: int, n_tokens: int, token_dim: int,
                 dropout: float, *, branches: tuple[int, ...] | None = None, projector_hidden: int | None = None):
        super().__init__()
        self.n_tokens = int(n_tokens)
        self.token_dim = int(token_dim)
        self.branches = check_branches(branches, self.n_tokens)
        h = int(hidden)
        p = h if projector_hidden is None else int(projector_hidden)
        self.ridge = nn.Linear(int(n_voxels), h)
        self.blocks = nn.ModuleList(ResidualBlock(h, dropout) for _ in range(int(n_blocks)))
        d = self.token_dim
        self.head = nn.Linear(h, self.branches[0] * d)
        if len(self.branches) == 2:
            self.head_text = nn.Linear(h, self.branches[1] * d)
        self.projector = _projector(d, p)
        if len(self.branches) == 2:
            self.projector_text = _projector(d, p)

    def forward(self, voxels: torch.Tensor) -> torch.Tensor:
        x = self.ridge(voxels)
        for block in self.blocks:
            x = block(x)
        b, d = x.shape[0], self.token_dim
        image = self.projector(self.head(x).view(b, self.branches[0], d))
        if len(self.branches) == 1:
            return image
        text = self.projector_text(self.head_text(x).view(b, self.branches[1], d))
        return torch.cat([image, text], dim=1)

    def set_generator(self, generator: torch.Generator | None) -> None:
        """Draw every dropout mask from ``generator``."""
        for module in self.modules():
            if isinstance(module, GeneratorDropout):
                module.generator = generator

    # ------------------------------------------------------------------ tensor layout
    def layer_units(self) -> list[list[str]]:
        """Names of the parameter tensors of each shared layer unit, in module order.

        The units are ``[block 0, ..., block n-1, head, projector]``; the ridge layer is
        not a shared unit. With two branches the heads form one unit and the projectors
        another (``sync_layers=1`` then fuses both projectors: the released ``-p 24``).
        """
        units: list[list[str]] = []
        for k, block in enumerate(self.blocks):
            units.append([f"blocks.{k}.{n}" for n, _ in block.named_parameters()])
        heads = ["head"] + (["head_text"] if len(self.branches) == 2 else [])
        projectors = ["projector"] + (["projector_text"] if len(self.branches) == 2 else [])
        units.append([f"{m}.{n}" for m in heads for n, _ in getattr(self, m).named_parameters()])
        units.append([f"{m}.{n}" for m in projectors for n, _ in getattr(self, m).named_parameters()])
        return units

    def shared_names(self) -> list[str]:
        """Names of every parameter tensor except the subject's ridge layer, in order."""
        return [n for n, _ in self.named_parameters() if not is_private(n)]


def _projector(d: int, p: int) -> nn.Sequential:
    return nn.Sequential(
        nn.LayerNorm(d), nn.GELU(), nn.Linear(d, p),
        nn.LayerNorm(p), nn.GELU(), nn.Linear(p, p),
        nn.LayerNorm(p), nn.GELU(), nn.Linear(p, d),
    )


def check_branches(branches, n_tokens: int) -> tuple[int, ...]:
    """``branches`` as a tuple of token counts that sum to ``n_tokens`` (one or two groups)."""
    if branches is None:
        return (int(n_tokens),)
    try:
        out = tuple(int(b) for b in branches)
    except (TypeError, ValueError):
        raise DataError(f"branches must be a list of token counts, e.g. [257, 77]; got {branches!r}.") from None
    if not 1 <= len(out) <= 2 or any(b < 1 for b in out) or sum(out) != int(n_tokens):
        raise DataError(
            f"branches={list(out)} must be one or two positive token counts adding up to the target's "
            f"{n_tokens} tokens (the released BrainGuard on the clip target: [257, 77])."
        )
    return out


def is_private(name: str) -> bool:
    """Whether a parameter belongs to the subject-specific input layer (never shared)."""
    return name.startswith("ridge.")


def split_tiers(model: BrainGuardNet, sync_layers: int, sync_tensors: int | None = None
                ) -> tuple[list[str], list[str], list[str]]:
    """The three synchronisation tiers as lists of parameter names.

    Parameters
    ----------
    sync_layers : int
        Number of trailing layer units (of ``[block 0 .. block n-1, head, projector]``)
        whose tensors are adaptively fused; the remaining shared units are overwritten by
        the global model. 0 means plain overwrite of every shared tensor.
    sync_tensors : int or None
        When given, the number of trailing parameter *tensors* fused adaptively instead
        (the original code's ``layer_idx``; 24 in its scripts); overrides ``sync_layers``.

    Returns
    -------
    retained, aligned, adaptive : list of str
    """
    retained = [n for n, _ in model.named_parameters() if is_private(n)]
    shared = model.shared_names()
    units = model.layer_units()
    if sync_tensors is not None:
        p = int(sync_tensors)
        if not 0 <= p <= len(shared):
            raise DataError(
                f"sync_tensors={sync_tensors} must be between 0 and {len(shared)} (the number "
                f"of shared parameter tensors of this network)."
            )
    else:
        k = int(sync_layers)
        if not 0 <= k <= len(units):
            raise DataError(
                f"sync_layers={sync_layers} must be between 0 and {len(units)} (the shared "
                f"layer units: {len(units) - 2} blocks, the head and the projector)."
            )
        p = sum(len(u) for u in units[len(units) - k:]) if k else 0
    aligned = shared[: len(shared) - p]
    adaptive = shared[len(shared) - p:]
    return retained, aligned, adaptive


def decay_groups(model: nn.Module, weight_decay: float, *, layernorm: bool = False) -> list[dict]:
    """AdamW parameter groups: weight decay on Linear weights (and LayerNorm weights).

    The released code meant to exempt biases and LayerNorm parameters, but its exemption
    list (``bias``, ``LayerNorm.bias``, ``LayerNorm.weight``) is matched against module
    names that never contain ``LayerNorm``, so every bias is exempt and every LayerNorm
    weight is decayed (official ``clients/client.py``, ``set_opt_grouped_parameters``; the
    WeADL fork copies it). ``layernorm=False`` (default) exempts by tensor rank, which
    catches both biases and LayerNorm weights as intended; ``layernorm=True`` reproduces
    the released behaviour: everything except biases is decayed.
    """
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if layernorm:
            exempt = name.endswith("bias")
        else:
            exempt = param.ndim < 2
        (no_decay if exempt else decay).append(param)
    return [
        {"params": decay, "weight_decay": float(weight_decay)},
        {"params": no_decay, "weight_decay": 0.0},
    ]


# --------------------------------------------------------------------------- loss
def soft_clip_loss(pred_unit: torch.Tensor, target_unit: torch.Tensor, tau: float) -> torch.Tensor:
    """SoftCLIP between unit-norm predictions and targets of shape (B, D).

    With ``S = p tᵀ / tau`` and soft labels ``Q = softmax_rows(t tᵀ / tau)``::

        loss = ½ [ -mean_i Σ_j Q_ij log softmax_rows(S)_ij - mean_i Σ_j Q_ij log softmax_rows(Sᵀ)_ij ]
    """
    logits = pred_unit @ target_unit.T / tau
    soft = torch.softmax(target_unit @ target_unit.T / tau, dim=-1)
    forward = -(soft * torch.log_softmax(logits, dim=-1)).sum(-1).mean()
    backward = -(soft * torch.log_softmax(logits.T, dim=-1)).sum(-1).mean()
    return 0.5 * (forward + backward)


def brainguard_loss(pred: torch.Tensor, target: torch.Tensor, *, mse_weight: float,
                    softclip_tau: float, softclip_weight: float,
                    branches: tuple[int, ...] | None = None) -> torch.Tensor:
    """``mse_weight · mean((p̂ - t̂)²) + softclip_weight · SoftCLIP(p̂, t̂)``, summed over branches.

    ``p̂`` and ``t̂`` are the flattened predictions and targets, each sample divided by its
    L2 norm; both terms are therefore blind to the scale of each predicted sample (which
    :func:`fit_calibration` restores). With ``branches`` (token counts of consecutive token
    groups) the loss is computed on each group separately and summed, as the released code
    does for its image and text outputs (``clients/client.py``: ``2·MSE_img + SoftCLIP_img +
    SoftCLIP_txt + 2·MSE_txt`` with MSE scaled by 10⁴).

    Parameters
    ----------
    pred, target : tensors of shape (B, n_tokens, token_dim)
    """
    if branches is not None and len(branches) > 1:
        total, start = None, 0
        for count in branches:
            part = brainguard_loss(pred[:, start:start + count], target[:, start:start + count],
                                   mse_weight=mse_weight, softclip_tau=softclip_tau,
                                   softclip_weight=softclip_weight)
            total = part if total is None else total + part
            start += count
        return total
    p = F.normalize(pred.flatten(1), dim=1)
    t = F.normalize(target.flatten(1), dim=1)
    loss = mse_weight * (p - t).pow(2).mean()
    if softclip_weight:
        loss = loss + softclip_weight * soft_clip_loss(p, t, softclip_tau)
    return loss


# --------------------------------------------------------------------------- output scale
def fit_calibration(train_pred: np.ndarray, train_target: np.ndarray, kind: str = "token") -> dict[str, np.ndarray]:
    """Statistics that bring raw predictions to the scale of the training targets.

    The loss only sees each predicted sample's direction, so the raw outputs have arbitrary
    per-sample norms (the released code does not rescale). Both steps are fitted on the training
    set only (the client's own data; the statistics never leave it):

    1. ``"norm"``: each sample is rescaled to unit L2 norm times the mean L2 norm of the
       training targets;
    2. ``"token"`` (after step 1): per token position ``k`` the predictions are centred on
       their per-element training mean, scaled by one factor per token so that their
       spread (root mean square over samples and the token's values) equals the targets',
       and shifted to the targets' per-element mean. Calibrated training predictions thus
       have exactly the training targets' per-token mean vectors and spreads.

    Parameters
    ----------
    train_pred, train_target : arrays of shape (n, n_tokens, token_dim)
        Raw predictions of the training inputs (model in evaluation mode) and targets.
    kind : {"token", "norm", "none"}

    Returns
    -------
    dict of arrays
        ``target_norm`` (shape (1,)), and for ``"token"``: ``pred_mean``, ``target_mean``
        (n_tokens, token_dim), ``scale`` (n_tokens,).
    """
    if kind not in CALIBRATIONS:
        raise DataError(
            f"Unknown calibration {kind!r}. Valid choices: {', '.join(map(repr, CALIBRATIONS))}."
        )
    pred = np.asarray(train_pred, dtype=np.float64)
    target = np.asarray(train_target, dtype=np.float64)
    if kind == "none":
        return {}
    stats = {"target_norm": np.linalg.norm(target.reshape(len(target), -1), axis=1).mean().reshape(1)}
    if kind == "norm":
        return stats
    unit = _rescale(pred, float(stats["target_norm"][0]))
    pred_mean = unit.mean(axis=0)
    target_mean = target.mean(axis=0)
    pred_spread = np.sqrt(((unit - pred_mean) ** 2).mean(axis=(0, 2)))
    target_spread = np.sqrt(((target - target_mean) ** 2).mean(axis=(0, 2)))
    # A token the model predicts as a constant has nothing to stretch: keep its mean.
    scale = np.divide(target_spread, pred_spread, out=np.zeros_like(target_spread),
                      where=pred_spread > 1e-12 * max(float(target_spread.max()), 1e-30))
    stats.update(pred_mean=pred_mean, target_mean=target_mean, scale=scale)
    return {k: np.asarray(v, dtype=np.float64) for k, v in stats.items()}


def apply_calibration(pred: np.ndarray, stats: dict[str, np.ndarray], kind: str = "token") -> np.ndarray:
    """Apply :func:`fit_calibration`'s statistics to raw predictions (n, n_tokens, token_dim).

    Returns
    -------
    float32 array of the same shape
    """
    if kind == "none" or not stats:
        return np.asarray(pred, dtype=np.float32)
    norm = float(np.asarray(stats["target_norm"]).reshape(-1)[0])
    out = _rescale(np.asarray(pred, dtype=np.float64), norm)
    if kind == "token":
        out = (out - stats["pred_mean"]) * stats["scale"][None, :, None] + stats["target_mean"]
    return out.astype(np.float32)


def _rescale(pred: np.ndarray, norm: float) -> np.ndarray:
    flat = pred.reshape(len(pred), -1)
    lengths = np.linalg.norm(flat, axis=1)
    lengths = np.where(lengths > 0, lengths, 1.0)
    return (flat * (norm / lengths)[:, None]).reshape(pred.shape)


def count_parameters(model: nn.Module) -> int:
    return int(sum(math.prod(p.shape) for p in model.parameters()))
