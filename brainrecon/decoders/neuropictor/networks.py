"""The networks a NeuroPictor decoder trains and holds: built from its parameters, saved, loaded.

:func:`build_trainable` makes the trainable network of a stage — fresh, continued from a saved
decoder of an earlier stage (``init_from``) or from the released fMRI autoencoder
(``encoder_init``) — after checking that the sizes agree; :func:`save_networks` and
:func:`load_networks` write and read the safetensors files of a saved decoder (its
``brainrecon.json`` is written by :class:`~brainrecon.decoders.base.Decoder`). ``params`` is
the decoder's parameter mapping (``get_params()``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from brainrecon.decoders.neuropictor import control, model, official_encoder
from brainrecon.decoders.neuropictor.encoder import (
    LAYER_NORM_EPS,
    LEGACY_LAYER_NORM_EPS,
)
from brainrecon.decoders.neuropictor.weights import (
    SAVED_FIX,
    empty_init,
    load_safetensors_strict,
    load_state_dict_strict,
    read_safetensors,
    save_safetensors_atomic,
)
from brainrecon.errors import BrainreconError
from brainrecon.io import check_arrays

SIZE_PARAMS = tuple(model.Sizes.__dataclass_fields__)
ENCODER_SIZES = ("surface_size", "patch_size", "encoder_dim", "encoder_depth", "encoder_heads")
HEAD_SIZES = ("bottleneck_dim", "decoder_dim", "decoder_depth", "decoder_heads")

ENCODER_FILE = "fmri_encoder.safetensors"
HEAD_FILE = "fmri_autoencoder_head.safetensors"
SEMANTIC_FILE = "semantic.safetensors"
EMPTY_CONTEXT_FILE = "empty_context.safetensors"
# Layout of a saved NeuroPictor decoder (``state["layout"]`` in brainrecon.json). 1 (no field):
# encoder LayerNorm eps 1e-6; 2: eps taken from the ``encoder_eps`` parameter (default 1e-5).
LAYOUT = 2


# ---------------------------------------------------------------------------- sizes and options
def default_semantic_hidden(sizes: Mapping) -> int:
    """The official hidden width of the guiding network: encoder tokens // 2 (128 at 257)."""
    surface, patch = sizes.get("surface_size", 256), sizes.get("patch_size", 16)
    try:
        return max(1, (1 + (int(surface) // int(patch)) ** 2) // 2)
    except (TypeError, ValueError, ZeroDivisionError):
        return 128  # invalid sizes are reported by the size check


def sizes(params: Mapping[str, Any]) -> model.Sizes:
    """The network sizes of ``params``, checked (positive, divisible as the modules need)."""
    values = {k: params[k] for k in SIZE_PARAMS}
    if values["semantic_hidden"] is None:
        values["semantic_hidden"] = default_semantic_hidden(values)
    for k, v in values.items():
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
            raise BrainreconError(f"{k} must be a positive integer, got {v!r}.")
    if params["surface_size"] % params["patch_size"]:
        raise BrainreconError(
            f"surface_size {params['surface_size']} is not a multiple of patch_size {params['patch_size']}; "
            f"choose a patch_size that divides it."
        )
    for dim, heads, what in ((params["encoder_dim"], params["encoder_heads"], "encoder"),
                             (params["decoder_dim"], params["decoder_heads"], "decoder")):
        if dim % heads or dim % 4:
            raise BrainreconError(
                f"{what}_dim {dim} must be a multiple of 4 and of {what}_heads {heads}."
            )
    return model.Sizes(**{k: int(v) for k, v in values.items()})


def encoder_options(params: Mapping[str, Any], training: bool) -> dict[str, float]:
    """LayerNorm eps and (in training) the dropout rates of the fMRI encoder."""
    eps = float(params["encoder_eps"])
    if not eps > 0:
        raise BrainreconError(f"encoder_eps must be positive, got {params['encoder_eps']!r}.")
    if not training:  # dropout is inactive in eval mode; the yaml need not exist here
        return {"eps": eps}
    drop = params["encoder_drop"]
    if drop is None:
        drop = official_encoder.read_encoder_config(params["encoder_config"]).get("drop_rate", 0.0)
    rates = {"drop": drop,
             "attn_drop": drop if params["encoder_attn_drop"] is None else params["encoder_attn_drop"],
             "drop_path": drop if params["encoder_drop_path"] is None else params["encoder_drop_path"]}
    for name, rate in rates.items():
        if not 0.0 <= float(rate) < 1.0:
            raise BrainreconError(f"The encoder's {name} rate must be in [0, 1), got {rate!r}.")
    return {"eps": eps, **{k: float(v) for k, v in rates.items()}}


def geometry(base: model.BaseComponents, image_size: int) -> dict[str, int]:
    """Latent size and channels, ControlNet channels and context shape on ``base`` at ``image_size``."""
    factor = base.vae_scale_factor
    down = 2 ** (len(base.unet.config.block_out_channels) - 1)
    if image_size % (factor * down):
        raise BrainreconError(
            f"image_size {image_size} must be a multiple of {factor * down} (VAE factor "
            f"{factor} x UNet down-sampling {down}); e.g. 512."
        )
    return {
        "latent_size": image_size // factor,
        "latent_channels": int(base.unet.config.in_channels),
        "channels": int(base.unet.config.block_out_channels[0]),
        "context_tokens": base.context_tokens,
        "context_dim": base.context_dim,
    }


# ---------------------------------------------------------------------------- init_from
def init_config(init_from: str | None, name: str) -> dict | None:
    """``brainrecon.json`` of the saved decoder ``init_from`` (None without one); it must be ``name``'s."""
    if init_from is None:
        return None
    cfg = model.read_saved_config(init_from)
    if cfg.get("decoder") != name:
        raise BrainreconError(
            f"init_from={init_from!r} holds a {cfg.get('decoder')!r} decoder, not a NeuroPictor one."
        )
    return cfg


def saved_encoder_eps(config: dict) -> float:
    """The encoder LayerNorm eps a saved decoder was trained with (1e-6 before layout 2)."""
    if int(config.get("state", {}).get("layout", 1)) < 2:
        return LEGACY_LAYER_NORM_EPS
    return float(config.get("params", {}).get("encoder_eps", LAYER_NORM_EPS))


def check_init_sizes(params: Mapping[str, Any], init_cfg: dict, names: Sequence[str]) -> None:
    """The sizes ``names`` of ``params`` equal those ``init_from`` was trained with."""
    saved = dict(init_cfg.get("params", {}))
    mine = {k: params[k] for k in names}
    if "semantic_hidden" in mine:  # compare the widths actually built
        if saved.get("semantic_hidden") is None:
            saved["semantic_hidden"] = default_semantic_hidden(saved)
        mine["semantic_hidden"] = sizes(params).semantic_hidden
    diff = [f"{k}={saved.get(k)!r} there vs {v!r} here" for k, v in mine.items() if saved.get(k) != v]
    if diff:
        raise BrainreconError(
            f"init_from={params['init_from']!r} was trained with other sizes ({'; '.join(diff)}); "
            f"build this decoder with the same sizes."
        )


# ---------------------------------------------------------------------------- building
def build_trainable(params: Mapping[str, Any], stage: str, init_cfg: dict | None, base
                    ) -> tuple[torch.nn.Module, dict]:
    """Fresh or ``init_from``-initialised trainable network for ``stage``; also returns geometry."""
    checked = sizes(params)
    init_stage = (init_cfg or {}).get("state", {}).get("stage")
    init_dir = Path(params["init_from"]) if params["init_from"] else None
    with torch.random.fork_rng(devices=[]):  # seeded initialisation without touching the caller's RNG
        torch.manual_seed(int(params["seed"]))
        return _build_trainable_seeded(params, stage, init_cfg, base, checked, init_stage, init_dir)


def _build_trainable_seeded(params, stage, init_cfg, base, sizes, init_stage, init_dir):
    options = encoder_options(params, training=True)
    encoder_init = params["encoder_init"]
    if encoder_init is not None:
        if init_cfg is not None:
            raise BrainreconError(
                "Give either init_from (a saved brainrecon decoder) or encoder_init (the released "
                "fMRI encoder file), not both: init_from already holds an fMRI encoder."
            )
        encoder, official_state = official_encoder.encoder_for_sizes(
            encoder_init, params["encoder_config"], sizes, options)
    else:
        encoder = sizes.encoder(**options)
    if init_cfg is not None:
        check_init_sizes(params, init_cfg, ENCODER_SIZES)
        saved_eps = saved_encoder_eps(init_cfg)
        if saved_eps != float(params["encoder_eps"]):
            raise BrainreconError(
                f"init_from={params['init_from']!r} was trained with encoder LayerNorm eps {saved_eps:g}, "
                f"this decoder has encoder_eps={params['encoder_eps']!r}. Pass encoder_eps={saved_eps:g} "
                f"to continue with the value it was trained with, or refit the earlier stage.",
                parameters=("encoder_eps",)
            )
        load_state_dict_strict(encoder, read_safetensors(init_dir / ENCODER_FILE, "fMRI encoder"),
                               "fMRI encoder", source=str(init_dir / ENCODER_FILE))
    if stage == "encoder" and encoder_init is not None:
        # Continue the released autoencoder (e.g. on NSD surfaces): its decoder comes along.
        head = official_encoder.head_for_sizes(encoder_init, params["encoder_config"], encoder, official_state,
                                               sizes, options)
        return model.FMRIAutoencoder(encoder, head), {}
    if stage == "encoder":
        head = sizes.autoencoder_head(**options)
        if init_stage == "encoder":
            check_init_sizes(params, init_cfg, HEAD_SIZES)
            load_state_dict_strict(head, read_safetensors(init_dir / HEAD_FILE, "autoencoder head"),
                                   "autoencoder head", source=str(init_dir / HEAD_FILE))
        return model.FMRIAutoencoder(encoder, head), {}
    shape = geometry(base, params["image_size"])
    if init_cfg is not None and init_stage != "encoder":
        check_init_sizes(params, init_cfg, ("semantic_hidden", "image_size"))
        saved = init_cfg["state"].get("geometry", {})
        if saved != shape:
            raise BrainreconError(
                f"init_from={params['init_from']!r} was trained on a base model of another shape "
                f"({saved}) than base_model={params['base_model']!r} ({shape}); use the same base_model."
            )
        net = load_diffusion_parts(init_dir, sizes, init_cfg["state"], {}, encoder=encoder)
        return net, shape
    semantic = sizes.semantic(shape["context_tokens"], shape["context_dim"])
    transform = sizes.feature_transform(shape["channels"], shape["latent_size"])
    controlnet = control.build_controlnet(base.unet, transform)
    return model.NeuroPictorNet(encoder, semantic, controlnet), shape


# ---------------------------------------------------------------------------- saved files
def save_networks(net, stage: str, empty_context: torch.Tensor | None, directory: Path) -> None:
    """The safetensors files of a fitted decoder: encoder, then the head (stage ``"encoder"``) or
    the guiding network, ControlNet and empty-caption context."""
    save_safetensors_atomic(net.fmri_encoder.state_dict(), directory / ENCODER_FILE)
    if stage == "encoder":
        save_safetensors_atomic(net.head.state_dict(), directory / HEAD_FILE)
        return
    save_safetensors_atomic(net.semantic.state_dict(), directory / SEMANTIC_FILE)
    control.save_controlnet(net.controlnet, directory)
    save_safetensors_atomic({"empty_context": empty_context}, directory / EMPTY_CONTEXT_FILE)


def load_networks(directory: Path, sizes: model.Sizes, state: dict[str, Any], options: dict
                  ) -> tuple[torch.nn.Module, torch.Tensor | None]:
    """The network (in eval mode) and empty-caption context of a saved decoder of ``state["stage"]``."""
    if state["stage"] == "encoder":
        encoder = empty_init(lambda: sizes.encoder(**options))
        head = empty_init(lambda: sizes.autoencoder_head(**options))
        load_safetensors_strict(encoder, directory / ENCODER_FILE, "fMRI encoder", assign=True)
        load_safetensors_strict(head, directory / HEAD_FILE, "autoencoder head", assign=True)
        return model.FMRIAutoencoder(encoder, head).eval(), None
    net = load_diffusion_parts(directory, sizes, state, options).eval()
    path = directory / EMPTY_CONTEXT_FILE
    empty = read_safetensors(path, "empty-caption context")
    shape = state.get("geometry", {})
    check_arrays(path, empty, {"empty_context": ((shape.get("context_tokens"), shape.get("context_dim")),
                                                 "float32")},
                 fix=f"{SAVED_FIX} (brainrecon.json says {shape.get('context_tokens')} x "
                     f"{shape.get('context_dim')} context tokens)")
    return net, empty["empty_context"]


def load_diffusion_parts(directory: Path, sizes: model.Sizes, state: dict, encoder_options: dict,
                         encoder: torch.nn.Module | None = None) -> model.NeuroPictorNet:
    """Semantic network, ControlNet and feature transformation (and encoder) of a saved diffusion stage."""
    geometry = state["geometry"]
    if encoder is None:
        encoder = empty_init(lambda: sizes.encoder(**encoder_options))
        load_safetensors_strict(encoder, directory / ENCODER_FILE, "fMRI encoder", assign=True)
    semantic = empty_init(lambda: sizes.semantic(geometry["context_tokens"], geometry["context_dim"]))
    load_safetensors_strict(semantic, directory / SEMANTIC_FILE, "semantic network", assign=True)
    transform = empty_init(lambda: sizes.feature_transform(geometry["channels"], geometry["latent_size"]))
    controlnet = control.load_controlnet(directory, transform)
    return model.NeuroPictorNet(encoder, semantic, controlnet)
