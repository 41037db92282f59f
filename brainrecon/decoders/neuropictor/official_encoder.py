"""The fMRI encoder released with NeuroPictor (Huo et al., ECCV 2024), read strictly.

The released encoder, ``ckpt/fMRI2fMRI_UKB/checkpoint_120000.pth`` with its
``fMRI_AutoEncoder.yaml`` (fMRI-PTE, Qian et al. 2023), is a torch pickle whose ``'model'``
entry holds the autoencoder's state dict, keys possibly prefixed ``module.`` (DDP) and then
``transformer.``::

    patch_embed.proj.{weight,bias}   cls_token   pos_embed   blocks.{i}.{norm1,attn.qkv,attn.proj,
    norm2,mlp.fc1,mlp.fc2}.{weight,bias}   norm.{weight,bias}            <- the encoder NeuroPictor uses
    pred.*   mask_token   decoder_embed.*   decoder_pos_embed   decoder_blocks.*   decoder_norm.*
    decoder_pred.*                                                         <- autoencoder parts, ignored

The encoder's key names are timm's ``VisionTransformer`` names, which brainrecon's
:class:`~brainrecon.decoders.neuropictor.encoder.FMRIEncoder` shares. Sizes the tensors reveal
(width, depth, patch size, number of patches, input channels) are read from the file; the
number of attention heads and the dropout rate cannot be, and come from the yaml
(``Model.num_heads``, ``Model.drop_rate``) or default to the official 16 heads and no dropout.
Every LayerNorm of the official model is ``nn.LayerNorm(dim)``, eps 1e-5.

``torch.load(..., weights_only=True)`` is the only place brainrecon unpickles anything; files
that need more than tensors, containers, numbers, strings and ``argparse.Namespace`` (which
training scripts store as ``'args'``) are refused.

Split out of :mod:`brainrecon.decoders.neuropictor.official` (the NeuroPictor model files), which
re-exports these names.
"""

from __future__ import annotations

import argparse
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from brainrecon.decoders.neuropictor.encoder import LAYER_NORM_EPS, FMRIEncoder
from brainrecon.decoders.neuropictor.weights import load_state_dict_strict
from brainrecon.errors import BrainreconError, WeightsNotFoundError
from brainrecon.io import torch_load_weights_only as _load_pickle

#: Official heads (paper supplement: dim 1024, depth 24, 16 heads), used when no yaml is given.
OFFICIAL_HEADS = 16
#: Keys of the autoencoder file that NeuroPictor does not use (after the prefixes are stripped).
ENCODER_IGNORED = ("pred.weight", "pred.bias", "mask_token")
ENCODER_IGNORED_PREFIXES = ("decoder_",)
_BLOCK = re.compile(r"^blocks\.(\d+)\.")
_SHOWN = 12


class OfficialFileError(BrainreconError):
    """An official NeuroPictor file cannot be read or does not have the expected layout."""


def _key_list(keys) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:_SHOWN])
    return shown + (f" (and {len(keys) - _SHOWN} more)" if len(keys) > _SHOWN else "")


def torch_load_weights_only(path: str | os.PathLike, what: str, *, hint: str = "",
                            parameters: tuple[str, ...] = ()) -> Any:
    """:func:`brainrecon.io.torch_load_weights_only` for NeuroPictor's files (errors are
    :class:`OfficialFileError`; ``argparse.Namespace``, which the released files hold, is allowed)."""
    return _load_pickle(path, what, error=OfficialFileError, hint=hint, allowed=(argparse.Namespace,),
                        parameters=parameters)


# ---------------------------------------------------------------------------- yaml
def read_encoder_config(config: str | os.PathLike | Mapping | None) -> dict[str, Any]:
    """The settings of ``fMRI_AutoEncoder.yaml`` (path or already-parsed mapping), flattened.

    Returns a dict with any of ``patch_size``, ``image_size`` (from ``Data``), ``embed_dim``,
    ``encoder_depth``, ``num_heads``, ``drop_rate``, ``in_chans`` (from ``Model``) and
    ``source`` (the file, for messages). Missing keys are simply absent.
    """
    if config is None:
        return {}
    source = "the given config"
    if not isinstance(config, Mapping):
        import yaml

        path = Path(config)
        if not path.is_file():
            raise WeightsNotFoundError(f"The encoder config file {path} does not exist.")
        with open(path, encoding="utf-8") as f:
            config = yaml.safe_load(f) or {}
        source = str(path)
        if not isinstance(config, Mapping):
            raise OfficialFileError(f"{path} is not a yaml mapping (expected sections Data: and Model:).")
    data = config.get("Data") or {}
    model = config.get("Model") or {}
    if not data and not model:
        raise OfficialFileError(
            f"{source} has neither a 'Data' nor a 'Model' section; pass the fMRI_AutoEncoder.yaml "
            f"released with checkpoint_120000.pth."
        )
    out: dict[str, Any] = {"source": source}
    for section, keys in ((data, ("patch_size", "image_size")),
                          (model, ("embed_dim", "encoder_depth", "num_heads", "drop_rate", "in_chans",
                                   "decoder_embed_dim", "decoder_depth"))):
        for key in keys:
            if section.get(key) is not None:
                out[key] = section[key]
    return out


# ---------------------------------------------------------------------------- encoder
@dataclass
class EncoderSpec:
    """What an official encoder state dict and its yaml say about the encoder."""

    surface_size: int
    patch_size: int
    dim: int
    depth: int
    in_chans: int
    heads: int = OFFICIAL_HEADS
    eps: float = LAYER_NORM_EPS
    drop: float = 0.0
    attn_drop: float = 0.0
    drop_path: float = 0.0
    ignored: list[str] = field(default_factory=list)

    def build(self) -> FMRIEncoder:
        return FMRIEncoder(surface_size=self.surface_size, patch_size=self.patch_size, dim=self.dim,
                           depth=self.depth, heads=self.heads, in_chans=self.in_chans, eps=self.eps,
                           drop=self.drop, attn_drop=self.attn_drop, drop_path=self.drop_path)


def _strip(key: str, prefix: str) -> str:
    return key.removeprefix(prefix)


def encoder_state_from_file(obj: Any, source: str) -> dict[str, torch.Tensor]:
    """The autoencoder's tensors of a loaded ``checkpoint_120000.pth``, prefixes ``module.``/``transformer.`` stripped."""
    state = obj.get("model", obj) if isinstance(obj, Mapping) else None
    if not isinstance(state, Mapping) or not state:
        raise OfficialFileError(
            f"{source} holds no state dict: expected a dict with a 'model' entry (the released "
            f"checkpoint_120000.pth) or a plain dict of tensors."
        )
    not_tensors = [k for k, v in state.items() if not torch.is_tensor(v)]
    if not_tensors:
        raise OfficialFileError(f"{source}: entries that are not tensors: {_key_list(map(str, not_tensors))}.")
    out = {}
    for key, value in state.items():
        key = _strip(str(key), "module.")
        if not key.startswith("transformer."):
            raise OfficialFileError(
                f"{source}: key {key!r} is not under 'transformer.' as in the released fMRI "
                f"autoencoder (checkpoint_120000.pth); is this the right file?"
            )
        out[key[len("transformer."):]] = value
    return out


def _is_ignored(key: str) -> bool:
    return key in ENCODER_IGNORED or key.startswith(ENCODER_IGNORED_PREFIXES)


def infer_encoder_spec(state: Mapping[str, torch.Tensor], config: Mapping[str, Any] | None = None,
                       source: str = "the file") -> EncoderSpec:
    """Sizes from the tensor shapes; heads and dropout from ``config`` (see :func:`read_encoder_config`).

    Raises :class:`OfficialFileError` when a tensor needed to infer a size is missing, when the
    MLP is not 4 x wide (the only ratio brainrecon builds), or when the config contradicts a
    size read from the tensors (the message names both values).
    """
    config = dict(config or {})
    needed = ("patch_embed.proj.weight", "pos_embed", "cls_token", "norm.weight")
    missing = [k for k in needed if k not in state]
    if missing:
        raise OfficialFileError(f"{source} lacks the encoder tensor(s) {_key_list(missing)}.")
    dim, in_chans, p, p2 = state["patch_embed.proj.weight"].shape
    if p != p2:
        raise OfficialFileError(f"{source}: non-square patches {p}x{p2} are not supported.")
    tokens = state["pos_embed"].shape[1]
    grid = math.isqrt(tokens - 1)
    if grid * grid != tokens - 1:
        raise OfficialFileError(
            f"{source}: pos_embed has {tokens} rows, not 1 + a square number of patches."
        )
    depth = 1 + max((int(m.group(1)) for m in map(_BLOCK.match, state) if m), default=-1)
    if depth and tuple(state["blocks.0.mlp.fc1.weight"].shape) != (4 * dim, dim):
        raise OfficialFileError(
            f"{source}: blocks.0.mlp.fc1 has shape {tuple(state['blocks.0.mlp.fc1.weight'].shape)}, "
            f"not ({4 * dim}, {dim}) (MLP ratio 4, the official value)."
        )
    found = {"patch_size": int(p), "image_size": int(grid * p), "embed_dim": int(dim),
             "encoder_depth": int(depth), "in_chans": int(in_chans)}
    where = config.get("source", "the config")
    clashes = []
    for key, value in found.items():
        if key not in config:
            continue
        given = config[key]
        if key == "image_size":
            sides = list(given) if isinstance(given, (list, tuple)) else [given, given]
            if [int(s) for s in sides] != [value, value]:
                clashes.append(f"Data.image_size={list(sides)} in {where} but the tensors give {value}x{value} "
                               f"(pos_embed {tokens} tokens x patch {p})")
        elif int(given) != value:
            section = "Data" if key == "patch_size" else "Model"
            clashes.append(f"{section}.{key}={given} in {where} but the tensors give {value}")
    if clashes:
        raise OfficialFileError(
            f"The encoder config contradicts {source}: " + "; ".join(clashes)
            + ". Pass the fMRI_AutoEncoder.yaml that belongs to this checkpoint (or none)."
        )
    heads = int(config.get("num_heads", OFFICIAL_HEADS))
    if dim % heads:
        raise OfficialFileError(
            f"{source}: width {dim} is not divisible by {heads} heads"
            + (f" (Model.num_heads in {where})" if "num_heads" in config else " (the official default)")
            + "; pass the fMRI_AutoEncoder.yaml that belongs to this checkpoint."
        )
    rate = float(config.get("drop_rate", 0.0))
    return EncoderSpec(surface_size=int(grid * p), patch_size=int(p), dim=int(dim), depth=int(depth),
                       in_chans=int(in_chans), heads=heads, drop=rate, attn_drop=rate, drop_path=rate)


def split_encoder_state(state: Mapping[str, torch.Tensor], encoder: FMRIEncoder, source: str
                        ) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Encoder tensors and the ignored keys; any other key is an error that lists them."""
    expected = set(encoder.state_dict())
    kept, ignored, unknown = {}, [], []
    for key, value in state.items():
        if key in expected:
            kept[key] = value
        elif _is_ignored(key):
            ignored.append(key)
        else:
            unknown.append(key)
    if unknown:
        raise OfficialFileError(
            f"{source} has {len(unknown)} key(s) that are neither part of the fMRI encoder nor on "
            f"the ignore list ({', '.join(ENCODER_IGNORED)}, decoder_*): {_key_list(unknown)}. "
            f"This is not the fMRI autoencoder layout NeuroPictor released."
        )
    return kept, sorted(ignored)


def encoder_from_state(state: Mapping[str, torch.Tensor], config=None, *, source: str = "the file",
                       eps: float | None = None, drop: float | None = None,
                       attn_drop: float | None = None, drop_path: float | None = None) -> FMRIEncoder:
    """Build and strictly load a :class:`FMRIEncoder` from an official-layout encoder state dict.

    ``state`` has the prefixes already stripped (``patch_embed.proj.weight``, ...). ``config``
    is the yaml (path or mapping). Keyword overrides replace the eps and dropout rates.
    """
    spec = infer_encoder_spec(state, read_encoder_config(config), source)
    if eps is not None:
        spec.eps = float(eps)
    for name, value in (("drop", drop), ("attn_drop", attn_drop), ("drop_path", drop_path)):
        if value is not None:
            setattr(spec, name, float(value))
    encoder = spec.build()
    kept, ignored = split_encoder_state(state, encoder, source)
    load_state_dict_strict(encoder, {k: v.float() for k, v in kept.items()}, "fMRI encoder", source=source)
    encoder.official_spec = spec
    spec.ignored = ignored
    return encoder


def autoencoder_head_from_state(state: Mapping[str, torch.Tensor], spec: EncoderSpec, config=None, *,
                                source: str = "the file", **options):
    """The autoencoder's bottleneck and decoder (``pred``, ``mask_token``, ``decoder_*``) of the file.

    brainrecon's :class:`~brainrecon.decoders.neuropictor.encoder.FMRIAutoencoderHead` has the
    official key names. Sizes come from the tensors (bottleneck from ``pred``, width from
    ``decoder_embed``, depth from ``decoder_blocks``), heads from the yaml as for the encoder
    (one ``num_heads`` for both in the official model); ``Model.decoder_embed_dim`` and
    ``Model.decoder_depth`` must agree with the tensors. ``options``: eps and the three rates.
    """
    from brainrecon.decoders.neuropictor.encoder import FMRIAutoencoderHead

    head_keys = {k: v for k, v in state.items() if _is_ignored(k)}
    needed = ("pred.weight", "decoder_embed.weight", "mask_token", "decoder_pred.weight")
    missing = [k for k in needed if k not in head_keys]
    if missing:
        raise OfficialFileError(f"{source} lacks the autoencoder tensor(s) {_key_list(missing)}.")
    bottleneck = int(head_keys["pred.weight"].shape[0])
    dim = int(head_keys["decoder_embed.weight"].shape[0])
    depth = 1 + max((int(k.split(".")[1]) for k in head_keys if k.startswith("decoder_blocks.")), default=-1)
    cfg = read_encoder_config(config)
    where = cfg.get("source", "the config")
    clashes = [f"Model.{key}={cfg[key]} in {where} but the tensors give {value}"
               for key, value in (("decoder_embed_dim", dim), ("decoder_depth", depth))
               if key in cfg and int(cfg[key]) != value]
    if clashes:
        raise OfficialFileError(f"The encoder config contradicts {source}: " + "; ".join(clashes) + ".")
    if dim % spec.heads:
        raise OfficialFileError(f"{source}: decoder width {dim} is not divisible by {spec.heads} heads.")
    opts = {"eps": spec.eps, "drop": spec.drop, "attn_drop": spec.attn_drop, "drop_path": spec.drop_path,
            **{k: float(v) for k, v in options.items() if v is not None}}
    head = FMRIAutoencoderHead(surface_size=spec.surface_size, patch_size=spec.patch_size, encoder_dim=spec.dim,
                               bottleneck=bottleneck, dim=dim, depth=depth, heads=spec.heads,
                               in_chans=spec.in_chans, **opts)
    load_state_dict_strict(head, {k: v.float() for k, v in head_keys.items()}, "fMRI autoencoder head",
                           source=source)
    return head


def load_official_encoder(path: str | os.PathLike, config: str | os.PathLike | Mapping | None = None, *,
                          eps: float | None = None, drop: float | None = None,
                          attn_drop: float | None = None, drop_path: float | None = None) -> FMRIEncoder:
    """The fMRI encoder of the released UK-Biobank autoencoder, with its weights.

    Parameters
    ----------
    path : path
        ``checkpoint_120000.pth`` (``fMRI2fMRI_UKB``), or any file of the same layout: a dict
        whose ``'model'`` entry holds ``[module.]transformer.*`` tensors.
    config : path or mapping, optional
        ``fMRI_AutoEncoder.yaml``. Gives the heads (``Model.num_heads``) and the dropout rate
        (``Model.drop_rate``, used for dropout, attention dropout and drop-path as the official
        model does); its sizes must agree with the tensors. Without it: 16 heads, no dropout.
    eps, drop, attn_drop, drop_path : float, optional
        Override the LayerNorm eps (default 1e-5, the official value) and the three rates.

    Returns
    -------
    FMRIEncoder
        In float32 and eval mode; maps ``(B, S, S)`` surface maps to tokens of shape
        ``(B, 1 + N, D)`` after the final LayerNorm (257 x 1024 for the released file).
        ``encoder.official_spec`` records what was read and which keys were ignored.

    Raises
    ------
    OfficialFileError
        For a file that needs more than ``weights_only`` unpickling, unknown keys (listed),
        missing tensors, or a yaml contradicting the tensors (both values named).
    """
    source = str(path)
    obj = torch_load_weights_only(path, "fMRI encoder")
    state = encoder_state_from_file(obj, source)
    encoder = encoder_from_state(state, config, source=source, eps=eps, drop=drop,
                                 attn_drop=attn_drop, drop_path=drop_path)
    return encoder.eval()


def encoder_settings_line(settings: Mapping[str, Any]) -> str:
    """One line on the fMRI encoder's heads, eps and dropout and whether they were assumed."""
    values = (f"fMRI encoder: {settings.get('heads')} heads, LayerNorm eps {settings.get('eps'):g}, "
              f"dropout {settings.get('dropout'):g}")
    if settings.get("from"):
        return f"{values} (from {settings['from']})"
    return (f"{values} — ASSUMED (no encoder_config: the official values; the tensors do not fix the "
            f"head count, and check cannot tell a wrong one: pass the fMRI_AutoEncoder.yaml it was trained with)")


def encoder_for_sizes(path: str | os.PathLike, config, sizes, options: Mapping[str, float]
                      ) -> tuple[FMRIEncoder, dict[str, torch.Tensor]]:
    """The encoder of a decoder's ``encoder_init`` file, checked against the decoder's ``sizes``.

    ``config`` is the decoder's ``encoder_config``; ``options`` its eps and dropout rates.
    Returns the encoder and the file's (prefix-stripped) state dict.
    """
    obj = torch_load_weights_only(path, "fMRI encoder (encoder_init)")
    state = encoder_state_from_file(obj, str(path))
    spec = infer_encoder_spec(state, read_encoder_config(config), str(path))
    found = {"surface_size": spec.surface_size, "patch_size": spec.patch_size,
             "encoder_dim": spec.dim, "encoder_depth": spec.depth, "encoder_heads": spec.heads}
    diff = [f"{k}={v}" for k, v in found.items() if getattr(sizes, k) != v]
    if diff or spec.in_chans != 1:
        what = ", ".join(f"{k}={getattr(sizes, k)}" for k in found)
        raise BrainreconError(
            f"encoder_init={path!r} holds an encoder with "
            f"{', '.join(f'{k}={v}' for k, v in found.items())}, in_chans={spec.in_chans}"
            + ("" if config else " (heads: the official 16, no encoder_config given)")
            + f", but this decoder has {what}. Build the decoder with "
            + (", ".join(diff) if diff else "the same sizes") + " (single-channel surface maps)."
        )
    encoder = encoder_from_state(state, config, source=str(path), **options)
    return encoder, state


def head_for_sizes(path: str | os.PathLike, config, encoder: FMRIEncoder, state: Mapping[str, torch.Tensor],
                   sizes, options: Mapping[str, float]):
    """The released autoencoder's bottleneck and decoder (of ``encoder_init``), checked against ``sizes``."""
    head = autoencoder_head_from_state(state, encoder.official_spec, config, source=str(path), **options)
    found = {"bottleneck_dim": head.pred.out_features, "decoder_dim": head.decoder_embed.out_features,
             "decoder_depth": len(head.decoder_blocks), "decoder_heads": encoder.official_spec.heads}
    diff = [f"{k}={v}" for k, v in found.items() if getattr(sizes, k) != v]
    if diff:
        raise BrainreconError(
            f"encoder_init={path!r} holds an autoencoder decoder with "
            f"{', '.join(f'{k}={v}' for k, v in found.items())}, but this decoder has "
            f"{', '.join(f'{k}={getattr(sizes, k)}' for k in found)}. Build the decoder with {', '.join(diff)}."
        )
    return head
