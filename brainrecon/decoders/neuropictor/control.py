"""The low-level manipulation network: the fMRI feature transformation inside a ControlNet.

The feature transformation maps the encoder tokens ``F`` ``(B, T, D)`` to a feature map the
size of the UNet's ``conv_in`` output (320 x 64 x 64 at full size; spec ``neuropictor.md``
§4.1)::

    T(F) = reshape_(B,C,s,s)(ZeroConv1d(C->C, k3)(SiLU(Linear_D->s*s(Conv1d(2T->C)(Conv1d(T->2T)(F))))))

The zero convolution's 3-tap kernel runs along the flattened ``s*s`` axis (row-major, so it
crosses row boundaries, as in the original).

It replaces ``controlnet_cond_embedding`` of a diffusers :class:`~diffusers.ControlNetModel`
made from the UNet with :meth:`~diffusers.ControlNetModel.from_unet`. diffusers' ControlNet
then computes exactly NeuroPictor's control path: ``conv_in(z_t) + T(F)``, the copied down
blocks and mid block with the fMRI context, and 13 zero-initialised 1 x 1 convolutions whose
outputs are multiplied by ``conditioning_scale`` (spec §12.2). ``controlnet_cond`` is passed
straight to the embedding, so the token tensor ``F`` goes in as is.

``ControlNetModel.save_pretrained`` knows nothing of the replaced module, so the ControlNet
is saved without it (``controlnet/config.json`` + ``controlnet/diffusion_pytorch_model.safetensors``)
and the feature transformation separately (``feature_transform.safetensors``); loading
rebuilds the ControlNet from its config, re-attaches the module and loads both with strict
key checking (spec §12.5).
"""

from __future__ import annotations

import functools
import inspect
import types
import typing
from pathlib import Path

import torch
from torch import nn

from brainrecon.decoders.neuropictor.weights import (
    SAVED_FIX,
    StateDictMismatchError,
    empty_init,
    load_safetensors_strict,
    save_safetensors_atomic,
)
from brainrecon.errors import BrainreconError, WeightsNotFoundError
from brainrecon.io import read_json, write_json_atomic

CONTROLNET_DIR = "controlnet"
CONTROLNET_WEIGHTS = "diffusion_pytorch_model.safetensors"
FEATURE_TRANSFORM_FILE = "feature_transform.safetensors"
_EMBEDDING = "controlnet_cond_embedding."


class FeatureTransform(nn.Module):
    """fMRI tokens ``(B, T, D)`` -> control features ``(B, channels, size, size)``.

    Parameters
    ----------
    n_tokens : int
        Encoder tokens ``T`` (257).
    dim : int
        Encoder width ``D`` (1024).
    channels : int
        Output channels, the UNet's first block width (320).
    size : int
        Output side, the latent side (64 for 512-pixel images).
    """

    def __init__(self, *, n_tokens: int = 257, dim: int = 1024, channels: int = 320, size: int = 64):
        super().__init__()
        self.channels = channels
        self.size = size
        self.token_mix1 = nn.Conv1d(n_tokens, 2 * n_tokens, kernel_size=1)
        self.token_mix2 = nn.Conv1d(2 * n_tokens, channels, kernel_size=1)
        self.linear = nn.Linear(dim, size * size)
        self.act = nn.SiLU()
        self.zero_conv = nn.Conv1d(channels, channels, kernel_size=3, padding=1)
        nn.init.zeros_(self.zero_conv.weight)
        nn.init.zeros_(self.zero_conv.bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.act(self.linear(self.token_mix2(self.token_mix1(tokens))))
        x = self.zero_conv(x)
        return x.reshape(x.shape[0], self.channels, self.size, self.size)


def build_controlnet(unet, feature_transform: FeatureTransform, *, copy_weights: bool = True):
    """A ControlNet made from ``unet`` whose conditioning embedding is ``feature_transform``.

    Parameters
    ----------
    unet : diffusers.UNet2DConditionModel
        Source of the configuration and (``copy_weights``) of the initial weights of
        ``conv_in``, the time embedding, the down blocks and the mid block.
    feature_transform : FeatureTransform
        Becomes ``controlnet.controlnet_cond_embedding``.

    Returns
    -------
    diffusers.ControlNetModel
        In float32, with zero-initialised ``controlnet_down_blocks`` / ``controlnet_mid_block``.
    """
    from diffusers import ControlNetModel

    controlnet = ControlNetModel.from_unet(
        unet,
        controlnet_conditioning_channel_order="rgb",
        load_weights_from_unet=copy_weights,
        # The default image-hint embedding is discarded; keep its throw-away copy small.
        conditioning_embedding_out_channels=(16,),
    )
    controlnet.controlnet_cond_embedding = feature_transform
    return controlnet.float()


def controlnet_from_config(config: dict, feature_transform: FeatureTransform):
    """Rebuild a (randomly initialised) ControlNet from a saved config and attach ``feature_transform``."""
    from diffusers import ControlNetModel

    controlnet = ControlNetModel.from_config(config)
    controlnet.controlnet_cond_embedding = feature_transform
    return controlnet


def controlnet_state_without_embedding(controlnet) -> dict[str, torch.Tensor]:
    """The ControlNet's state dict without the (separately saved) conditioning embedding."""
    return {k: v for k, v in controlnet.state_dict().items() if not k.startswith(_EMBEDDING)}


def save_controlnet(controlnet, directory: Path) -> None:
    """Write ``controlnet/`` (config + weights without the embedding) and ``feature_transform.safetensors``."""
    directory = Path(directory)
    cn_dir = directory / CONTROLNET_DIR
    cn_dir.mkdir(parents=True, exist_ok=True)
    config = {k: v for k, v in dict(controlnet.config).items() if not k.startswith("_")}
    config["_class_name"] = type(controlnet).__name__
    import diffusers

    config["_diffusers_version"] = diffusers.__version__  # which constructor arguments it has
    write_json_atomic(cn_dir / "config.json", config)
    save_safetensors_atomic(controlnet_state_without_embedding(controlnet), cn_dir / CONTROLNET_WEIGHTS)
    save_safetensors_atomic(controlnet.controlnet_cond_embedding.state_dict(),
                            directory / FEATURE_TRANSFORM_FILE)


def _json_kinds(annotation) -> tuple[type, ...]:
    """The JSON value kinds (after a round trip) of a parameter annotated ``annotation``; ()
    when unknown (not checked)."""
    if isinstance(annotation, str):
        return ()
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        parts = [_json_kinds(a) for a in typing.get_args(annotation)]
        return () if any(not p for p in parts) else tuple(dict.fromkeys(k for p in parts for k in p))
    if annotation in (tuple, list) or origin in (tuple, list):
        return (list,)
    if annotation is type(None) or annotation is None:
        return (type(None),)
    if annotation is float:
        return (float, int)
    if annotation in (int, str, bool):
        return (annotation,)
    return ()


@functools.lru_cache(maxsize=1)
def _config_kinds() -> dict[str, tuple[type, ...]]:
    """Every ControlNet constructor argument a saved ``config.json`` must hold, with its kinds:
    a missing or null one would silently build another network (diffusers' defaults are SD's)."""
    from diffusers import ControlNetModel

    params = list(inspect.signature(ControlNetModel.__init__).parameters.values())[1:]
    return {p.name: _json_kinds(p.annotation) for p in params
            if p.kind is p.POSITIONAL_OR_KEYWORD or p.kind is p.KEYWORD_ONLY}


def load_controlnet(directory: Path, feature_transform: FeatureTransform):
    """Inverse of :func:`save_controlnet` with strict key checking of both files.

    ``feature_transform`` may be built with :func:`~brainrecon.decoders.neuropictor.weights.empty_init`;
    the ControlNet itself is built that way (no random initialisation of 364 M parameters).
    """
    directory = Path(directory)
    cn_dir = directory / CONTROLNET_DIR
    config_path = cn_dir / "config.json"
    if not config_path.is_file():
        raise WeightsNotFoundError(
            f"{config_path} is missing; {directory} is not a complete saved NeuroPictor decoder."
        )
    fix = SAVED_FIX
    import diffusers

    config = read_json(config_path, types={k: v for k, v in _config_kinds().items() if v}, fix=fix)
    if isinstance(config, dict) and config.get("_diffusers_version", diffusers.__version__) == diffusers.__version__:
        # Written with this diffusers (or before the version was recorded): every constructor
        # argument was saved, so a missing one is damage. A file from another diffusers version
        # may lack arguments added since; those take diffusers' defaults, as its own loader does.
        config = read_json(config_path, required=_config_kinds(),
                           types={k: v for k, v in _config_kinds().items() if v}, fix=fix)
    config.pop("_class_name", None)
    config.pop("_diffusers_version", None)
    load_safetensors_strict(feature_transform, directory / FEATURE_TRANSFORM_FILE,
                            "feature transformation", assign=True)
    try:
        controlnet = empty_init(lambda: controlnet_from_config(config, feature_transform))
    except Exception as exc:  # noqa: BLE001 - diffusers rejects a bad config with many kinds of error
        raise BrainreconError(f"{config_path} does not describe a ControlNet ({type(exc).__name__}: {exc}); "
                              f"{fix}.") from None
    try:
        load_safetensors_strict(controlnet, cn_dir / CONTROLNET_WEIGHTS, "ControlNet",
                                ignore_prefix=_EMBEDDING, assign=True)
    except StateDictMismatchError as exc:
        raise StateDictMismatchError(f"{exc} (the ControlNet is built from {config_path}: one of the two "
                                     f"files is damaged)") from None
    return controlnet.float()
