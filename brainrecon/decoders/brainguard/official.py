"""Released BrainGuard-family weights into brainrecon's network, strictly.

Two published layouts, both the ``state_dict()`` of the released ``BrainGuardModule`` (an empty
module given two attributes, ``ridge = RidgeRegression(V, h)`` and ``backbone = BrainNetwork(...)``):

``brainguard``
    Tian et al., BrainGuard (AAAI 2025): ``kunzhan/BrainGuard`` ``main.py`` / ``trainmodel/models.py``,
    checkpoints ``client{1,2,5,7}_best.pth`` (Hugging Face ``Zhibo2333/Brainguard``). Two branches:
    ``head_image`` → 257 × 768 and ``head_text`` → 77 × 768 (CLIP ViT-L/14 image and text states),
    h = 2048, projector width fixed at 2048 in the released class.
``weadl``
    The WeADL 16 × 768 IP-Adapter-token adaptation as deployed: ``IoanaGabor/bachelor-thesis``
    ``ai-server/vbd/reconstruction_service/{model.py,brain_guard_embedding_extractor.py}``, file
    ``model.pth`` of Hugging Face ``ig16/visual-brain-decoding-1``. One branch (``head_image`` →
    16 × 768), h = 1024, projector width h.

Key map (released → brainrecon; ``k`` a block, ``i`` a projector layer index 0/2/3/5/6/8)::

    ridge.linear.{weight,bias}                  ridge.{weight,bias}
    backbone.mlp.k.0.{weight,bias}  (Linear)    blocks.k.linear.{weight,bias}
    backbone.mlp.k.1.{weight,bias}  (LayerNorm) blocks.k.norm.{weight,bias}
    backbone.head_image.{weight,bias}           head.{weight,bias}
    backbone.head_text.{weight,bias}            head_text.{weight,bias}
    backbone.projector_image.i.*                projector.i.*
    backbone.projector_text.i.*                 projector_text.i.*

The released block is ``Sequential(Linear, LayerNorm, GELU, Dropout)`` with ``x = block(x) + x``
(``norm_type='ln'``, ``act_first=False``), brainrecon's :class:`~.model.ResidualBlock` computes
the same; the projectors are the same ``Sequential`` layout. Every key is mapped or on
:data:`IGNORED_KEYS` (empty: the released module holds no buffers); anything else, a missing key
or a shape that disagrees with the others is one error naming the keys.

Sizes come from the tensors: V and h from the ridge, the blocks from the ``mlp.k`` indices, the
token width from the projector's first LayerNorm, the projector width from its first Linear, the
token counts from the heads.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from brainrecon.decoders.brainguard.model import BrainGuardNet
from brainrecon.errors import BrainreconError
from brainrecon.io import torch_load_weights_only

LAYOUTS = ("brainguard", "weadl")
#: Keys of a released file brainrecon reads but does not use (none: the module has no buffers).
IGNORED_KEYS: tuple[str, ...] = ()
#: Wrappers a file may put around the state dict (``torch.save({"model": sd})`` and the like).
WRAPPERS = ("state_dict", "model_state_dict", "model")
_SHOWN = 12
_BLOCK = re.compile(r"^backbone\.mlp\.(\d+)\.([01])\.(weight|bias)$")
_PROJ = re.compile(r"^backbone\.projector_(image|text)\.(\d+)\.(weight|bias)$")
_PROJ_LAYERS = {0, 2, 3, 5, 6, 8}


class OfficialFileError(BrainreconError):
    """A released BrainGuard/WeADL file cannot be read or does not have the released layout."""


def _keys(keys) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:_SHOWN])
    return shown + (f" (and {len(keys) - _SHOWN} more)" if len(keys) > _SHOWN else "")


def map_key(key: str) -> str | None:
    """brainrecon's name for a released key, or None when the key is not part of the layout."""
    if key in ("ridge.linear.weight", "ridge.linear.bias"):
        return "ridge." + key.rsplit(".", 1)[1]
    m = _BLOCK.match(key)
    if m:
        return f"blocks.{m.group(1)}.{'linear' if m.group(2) == '0' else 'norm'}.{m.group(3)}"
    for branch, name in (("image", "head"), ("text", "head_text")):
        if key in (f"backbone.head_{branch}.weight", f"backbone.head_{branch}.bias"):
            return f"{name}.{key.rsplit('.', 1)[1]}"
    m = _PROJ.match(key)
    if m and int(m.group(2)) in _PROJ_LAYERS:
        return f"{'projector' if m.group(1) == 'image' else 'projector_text'}.{m.group(2)}.{m.group(3)}"
    return None


def detect_layout(state: Mapping[str, Any]) -> str:
    """``"brainguard"`` (a text branch) or ``"weadl"`` (image tokens only), from the keys."""
    return "brainguard" if "backbone.head_text.weight" in state else "weadl"


@dataclass
class Architecture:
    """The sizes a released file's tensors imply."""

    n_voxels: int
    hidden: int
    n_blocks: int
    token_dim: int
    projector_hidden: int
    branches: tuple[int, ...]

    def build(self) -> BrainGuardNet:
        return BrainGuardNet(self.n_voxels, self.hidden, self.n_blocks, sum(self.branches), self.token_dim, 0.0,
                             branches=self.branches, projector_hidden=self.projector_hidden)


@dataclass
class ImportReport:
    """What the import of a released file found, mapped, ignored and checked."""

    source: str
    layout: str
    architecture: Architecture
    subject: int
    subject_inferred: bool
    n_tensors: int
    n_parameters: int
    ignored: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        a = self.architecture
        branches = " + ".join(f"{n}x{a.token_dim}" for n in a.branches)
        how = "inferred from the voxel count" if self.subject_inferred else "as given"
        out = [f"imported {self.source} (layout {self.layout})",
               f"  subject {self.subject} ({how}), {a.n_voxels} voxels",
               f"  hidden {a.hidden}, {a.n_blocks} blocks, projector width {a.projector_hidden}, tokens {branches}",
               f"  {self.n_tensors} tensors mapped, {self.n_parameters:,} parameters"]
        out += [f"  ignored {k}" for k in self.ignored]
        out += [f"  {n}" for n in self.notes]
        return out


def read_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The released state dict of ``path`` (``torch.load(weights_only=True)``; one wrapper level allowed)."""
    source = str(path)
    obj = torch_load_weights_only(path, "BrainGuard checkpoint", error=OfficialFileError)
    if isinstance(obj, Mapping) and not any(k in obj for k in ("ridge.linear.weight",)):
        for wrapper in WRAPPERS:
            if isinstance(obj.get(wrapper), Mapping) and len(obj) == 1:
                obj = obj[wrapper]
                break
    if not isinstance(obj, Mapping) or not obj:
        raise OfficialFileError(f"{source} does not hold a state dict of tensors (got {type(obj).__name__}); "
                                f"expected the released BrainGuardModule's state_dict().")
    not_tensors = [str(k) for k, v in obj.items() if not torch.is_tensor(v)]
    if not_tensors:
        raise OfficialFileError(f"{source}: entries that are not tensors: {_keys(not_tensors)}; expected the "
                                f"released BrainGuardModule's state_dict().")
    return {str(k): v for k, v in obj.items()}


def infer_architecture(state: Mapping[str, torch.Tensor], layout: str, source: str) -> Architecture:
    """Sizes from the tensors; a missing anchor tensor is an error naming it."""
    anchors = ["ridge.linear.weight", "backbone.head_image.weight", "backbone.projector_image.0.weight",
               "backbone.projector_image.2.weight"]
    if layout == "brainguard":
        anchors.append("backbone.head_text.weight")
    missing = [k for k in anchors if k not in state]
    if missing:
        raise OfficialFileError(f"{source}: missing key(s) {_keys(missing)} of the released {layout!r} layout.")
    hidden, n_voxels = (int(s) for s in state["ridge.linear.weight"].shape)
    token_dim = int(state["backbone.projector_image.0.weight"].shape[0])
    projector_hidden = int(state["backbone.projector_image.2.weight"].shape[0])
    blocks = {int(m.group(1)) for k in state if (m := _BLOCK.match(k))}
    n_blocks = max(blocks) + 1 if blocks else 0
    branches = []
    for key in ("backbone.head_image.weight",) + (("backbone.head_text.weight",) if layout == "brainguard" else ()):
        rows = int(state[key].shape[0])
        if rows % token_dim:
            raise OfficialFileError(f"{source}: {key} has {rows} outputs, not a multiple of the token width "
                                    f"{token_dim} (backbone.projector_image.0.weight).")
        branches.append(rows // token_dim)
    return Architecture(n_voxels=n_voxels, hidden=hidden, n_blocks=n_blocks, token_dim=token_dim,
                        projector_hidden=projector_hidden, branches=tuple(branches))


def convert_state(state: Mapping[str, torch.Tensor], *, layout: str | None = None, source: str = "the file"
                  ) -> tuple[BrainGuardNet, Architecture, str, list[str]]:
    """The released tensors in a :class:`BrainGuardNet`, strictly.

    Returns
    -------
    net, architecture, layout, ignored keys
    """
    found = detect_layout(state)
    if layout is None:
        layout = found
    elif layout not in LAYOUTS:
        raise OfficialFileError(f"Unknown layout {layout!r}; valid: {', '.join(map(repr, LAYOUTS))}.",
                                parameters=("layout",))
    elif layout != found:
        what = "has a text branch (backbone.head_text.*)" if found == "brainguard" else \
            "has no text branch (backbone.head_text.* missing)"
        raise OfficialFileError(f"{source} {what}, so it is the {found!r} layout, not {layout!r}; leave layout "
                                f"unset to detect it.", parameters=("layout",))
    arch = infer_architecture(state, layout, source)
    mapped, unknown, ignored = {}, [], []
    for key, value in state.items():
        if key in IGNORED_KEYS:
            ignored.append(key)
            continue
        name = map_key(key)
        if name is None or (layout == "weadl" and name.startswith(("head_text.", "projector_text."))):
            unknown.append(key)
        else:
            mapped[name] = value
    with torch.device("meta"):
        net = arch.build()
    expected = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    missing = sorted(set(expected) - set(mapped))
    problems = []
    if unknown:
        problems.append(f"unknown key(s) {_keys(unknown)}")
    if missing:
        back = {v: k for k, v in ((k, map_key(k)) for k in _official_names(net)) if v}
        problems.append(f"missing key(s) {_keys(back.get(k, k) for k in missing)}")
    wrong = [f"{k} {tuple(mapped[k].shape)} (expected {expected[k]})" for k in sorted(set(expected) & set(mapped))
             if tuple(mapped[k].shape) != expected[k]]
    if wrong:
        problems.append(f"shape(s) that disagree with the ridge/head/projector sizes: {_keys(wrong)}")
    if problems:
        raise OfficialFileError(
            f"Cannot import {source} as the released {layout!r} layout: " + "; ".join(problems) + ".")
    net = net.to_empty(device="cpu")
    net.load_state_dict({k: v.detach().to(torch.float32) for k, v in mapped.items()}, strict=True)
    net.eval()
    return net, arch, layout, ignored


def _official_names(net: BrainGuardNet) -> list[str]:
    """The released key of every tensor of ``net`` (the inverse of :func:`map_key`)."""
    out = ["ridge.linear.weight", "ridge.linear.bias"]
    for k in range(len(net.blocks)):
        out += [f"backbone.mlp.{k}.{i}.{p}" for i in (0, 1) for p in ("weight", "bias")]
    branches = ("image", "text") if len(net.branches) == 2 else ("image",)
    out += [f"backbone.head_{b}.{p}" for b in branches for p in ("weight", "bias")]
    out += [f"backbone.projector_{b}.{i}.{p}" for b in branches for i in sorted(_PROJ_LAYERS)
            for p in ("weight", "bias")]
    return out


def infer_subject(n_voxels: int, counts: Mapping[int, int], subject: int | None, source: str,
                  where: str) -> tuple[int, bool]:
    """The subject a ridge of ``n_voxels`` inputs belongs to, checked against ``counts``.

    ``where`` names the table (the data's subjects, or NSD's nsdgeneral counts). Returns
    (subject, inferred).
    """
    if subject is not None:
        s = int(subject)
        if s not in counts:
            raise OfficialFileError(f"Subject {s} is not among {where} ({sorted(counts)}).", parameters=("subject",))
        if int(counts[s]) != int(n_voxels):
            raise OfficialFileError(
                f"{source} reads {n_voxels} voxels (ridge.linear.weight), but subject {s} has {counts[s]} in "
                f"{where}; the file belongs to another subject or another voxel selection "
                f"(subjects with {n_voxels} voxels: {[k for k, v in counts.items() if int(v) == int(n_voxels)] or 'none'}).",
                parameters=("subject",))
        return s, False
    matches = [k for k, v in counts.items() if int(v) == int(n_voxels)]
    if len(matches) != 1:
        raise OfficialFileError(
            f"{source} reads {n_voxels} voxels (ridge.linear.weight), which "
            f"{'matches no subject' if not matches else f'matches subjects {matches}'} of {where}; pass subject=N.",
            parameters=("subject",))
    return int(matches[0]), True


def read_negative_tokens(path: str | os.PathLike, shape: tuple[int, int]) -> torch.Tensor:
    """WeADL's ``unconditional_embeddings.pt``: the negative tokens of the deployed generator.

    The deployed server passes the file's tensor as ``negative_prompt_embeds`` beside predicted
    ``prompt_embeds`` of shape (1, 16, 768), so the tensor is (1, 16, 768) (or (16, 768)).
    Returns float32 of ``shape``.
    """
    obj = torch_load_weights_only(path, "WeADL unconditional embeddings", error=OfficialFileError)
    if isinstance(obj, Mapping) and len(obj) == 1 and torch.is_tensor(next(iter(obj.values()))):
        obj = next(iter(obj.values()))
    if not torch.is_tensor(obj):
        raise OfficialFileError(f"{path} does not hold a tensor (got {type(obj).__name__}); expected the "
                                f"(1, {shape[0]}, {shape[1]}) negative tokens of unconditional_embeddings.pt.")
    t = obj.detach().to(torch.float32)
    while t.ndim > 2 and t.shape[0] == 1:
        t = t[0]
    if tuple(t.shape) != tuple(shape):
        raise OfficialFileError(f"{path} holds a tensor of shape {tuple(obj.shape)}; the model's tokens are "
                                f"{shape[0]}x{shape[1]}, so the negative tokens must be (1, {shape[0]}, {shape[1]}).")
    if not torch.isfinite(t).all():
        raise OfficialFileError(f"{path} holds NaN or infinite values.")
    return t.contiguous()


def official_state(net: BrainGuardNet) -> dict[str, torch.Tensor]:
    """``net``'s tensors under the released key names (the inverse conversion, for checks and export)."""
    state = net.state_dict()
    out = {}
    for key in _official_names(net):
        out[key] = state[map_key(key)].detach().clone()
    return out


__all__ = ["IGNORED_KEYS", "LAYOUTS", "Architecture", "ImportReport", "OfficialFileError", "convert_state",
           "detect_layout", "infer_architecture", "infer_subject", "map_key", "official_state",
           "read_negative_tokens", "read_state"]
