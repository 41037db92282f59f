"""Assembly of NeuroPictor: frozen SD 2.1-base components and the trainable fMRI network.

Frozen (loaded from ``stabilityai/stable-diffusion-2-1-base`` or a local directory in the
same diffusers layout, ``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``):

- :class:`~diffusers.UNet2DConditionModel` (865.9 M parameters), conditioned on the fMRI
  context and the ControlNet residuals;
- :class:`~diffusers.AutoencoderKL` (``scaling_factor`` 0.18215);
- :class:`~transformers.CLIPTextModel` + :class:`~transformers.CLIPTokenizer`: the empty-caption
  embedding (CFG) and the semantic-loss target.

Trainable (:class:`NeuroPictorNet`): the fMRI encoder, the high-level guiding network and the
ControlNet whose conditioning embedding is the fMRI feature transformation.

``base_model="tiny"`` builds small random frozen components in-process (seeded; for
tests without weights); ``"tiny-pixel"`` pairs a slightly larger tiny UNet with an exact
pixel-space autoencoder (:class:`PixelShuffleVAE`) so that a tiny model trained on the
synthetic data produces images that show what it learnt. The tests save the same tiny models
in the real layout (:func:`brainrecon.testing.tiny.save_tiny_sd21_folder`) to exercise the
loading path.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from brainrecon.decoders.neuropictor.control import FeatureTransform, build_controlnet
from brainrecon.decoders.neuropictor.encoder import FMRIAutoencoderHead, FMRIEncoder
from brainrecon.decoders.neuropictor.semantic import SemanticNetwork
from brainrecon.errors import WeightsNotFoundError

SD21_BASE = "stabilityai/stable-diffusion-2-1-base"
TINY = "tiny"
TINY_PIXEL = "tiny-pixel"
_SUBFOLDERS = {
    "unet": "config.json",
    "vae": "config.json",
    "text_encoder": "config.json",
    "tokenizer": None,
}


def sd21_base_unet_config() -> dict[str, Any]:
    """The SD 2.1-base UNet configuration (spec ``neuropictor.md`` §12.1), for building on meta."""
    return dict(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        cross_attention_dim=1024,
        attention_head_dim=(5, 10, 20, 20),
        use_linear_projection=True,
        norm_num_groups=32,
        flip_sin_to_cos=True,
        freq_shift=0,
    )


# ---------------------------------------------------------------------------- frozen components
@dataclass
class BaseComponents:
    """The frozen Stable Diffusion parts."""

    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    source: str

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def context_tokens(self) -> int:
        return int(self.tokenizer.model_max_length)

    @property
    def context_dim(self) -> int:
        return int(self.unet.config.cross_attention_dim)

    def freeze(self) -> "BaseComponents":
        for module in (self.unet, self.vae, self.text_encoder):
            module.requires_grad_(False)
            module.eval()
        return self


def place(module, device, dtype: torch.dtype):
    """Move a frozen module to ``device`` and cast it to ``dtype`` only when it differs.

    (diffusers warns on every ``.to(dtype=...)``, even a no-op one.)
    """
    current = next(module.parameters()).dtype
    if current != dtype:
        module.to(dtype=dtype)
    return module.to(device)


_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _is_local(base_model: str) -> bool:
    # An existing directory wins; otherwise "owner/name" is a hub repo id and anything else a path.
    return os.path.isdir(base_model) or not _REPO_ID.match(base_model)


def _missing_weights(base_model: str, what: str, cause: Exception | str) -> WeightsNotFoundError:
    if _is_local(base_model):
        return WeightsNotFoundError(
            f"Cannot load the Stable Diffusion {what} from the local directory {base_model!r}: "
            f"{cause}. The directory must have the diffusers layout of {SD21_BASE!r}: subfolders "
            f"unet/, vae/, text_encoder/ and tokenizer/ (download it with "
            f"`huggingface-cli download {SD21_BASE} --local-dir <dir>`)."
        )
    return WeightsNotFoundError(
        f"Cannot load the Stable Diffusion {what} of {base_model!r} from the Hugging Face hub or "
        f"its local cache ({type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}). "
        f"Download it once while online (`huggingface-cli download {base_model}`), or pass "
        f"base_model=<local dir> with subfolders unet/, vae/, text_encoder/ and tokenizer/."
    )


def load_base_components(base_model: str = SD21_BASE, *, seed: int = 0) -> BaseComponents:
    """Load the frozen UNet, VAE, text encoder and tokenizer (float32, on CPU, frozen).

    Parameters
    ----------
    base_model : str
        Hugging Face repo id (default ``stabilityai/stable-diffusion-2-1-base``), a local
        directory in the diffusers layout, ``"tiny"`` for small random components, or
        ``"tiny-pixel"`` for a tiny UNet on an exact pixel-space autoencoder.
    seed : int
        Seed of the ``"tiny"`` components.

    Raises
    ------
    WeightsNotFoundError
        When a component cannot be found locally or downloaded; the message names the
        component and where to put it.
    """
    if base_model in (TINY, TINY_PIXEL):
        with torch.random.fork_rng(devices=[]):
            if base_model == TINY:
                return tiny_base_components(seed=seed).freeze()
            return tiny_base_components(seed=seed, unet_channels=(32, 64), pixel_vae=True).freeze()
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    if _is_local(base_model):
        root = Path(base_model)
        if not root.is_dir():
            raise _missing_weights(base_model, "model", "the directory does not exist")
        for sub, required in _SUBFOLDERS.items():
            if not (root / sub).is_dir():
                raise _missing_weights(base_model, sub, f"the subfolder {sub}/ is missing")
            if required and not (root / sub / required).is_file():
                raise _missing_weights(base_model, sub, f"{sub}/{required} is missing")
    from brainrecon.hub import downloads_allowed, hub_offline_unless_allowed

    local = not downloads_allowed()  # downloads are opt-in (brainrecon.hub)
    loaders = {
        "unet": lambda: UNet2DConditionModel.from_pretrained(base_model, subfolder="unet", local_files_only=local),
        "vae": lambda: AutoencoderKL.from_pretrained(base_model, subfolder="vae", local_files_only=local),
        "text_encoder": lambda: CLIPTextModel.from_pretrained(base_model, subfolder="text_encoder",
                                                              local_files_only=local),
        "tokenizer": lambda: CLIPTokenizer.from_pretrained(base_model, subfolder="tokenizer", local_files_only=local),
    }
    parts = {}
    for name, load in loaders.items():
        try:
            with hub_offline_unless_allowed():
                parts[name] = load()
        except (OSError, ValueError, ConnectionError) as exc:  # hub errors derive from OSError
            raise _missing_weights(base_model, name, exc) from exc
    return BaseComponents(source=base_model, **parts).freeze()


def load_text_model(repo_or_dir: str):
    """Load a ``CLIPTextModel`` (the 24-layer semantic-loss target model) with a clear error."""
    from transformers import CLIPTextModel

    from brainrecon.hub import downloads_allowed, hub_offline_unless_allowed

    try:
        with hub_offline_unless_allowed():
            model = CLIPTextModel.from_pretrained(repo_or_dir, local_files_only=not downloads_allowed())
    except (OSError, ValueError, ConnectionError) as exc:
        raise WeightsNotFoundError(
            f"Cannot load the semantic-target text model {repo_or_dir!r} ({type(exc).__name__}). "
            f"Download it once while online (`huggingface-cli download {repo_or_dir}`), pass a "
            f"local directory as sem_text_model, or use sem_target='penultimate'."
        ) from exc
    model.requires_grad_(False)
    return model.eval()


# ---------------------------------------------------------------------------- tiny components
def _bytes_to_unicode() -> dict[int, str]:
    # The byte -> printable character table of byte-level BPE (GPT-2 / CLIP).
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1)
    )
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def tiny_tokenizer(max_length: int = 77):
    """A character-level CLIP tokenizer built locally (514 tokens, no merges, no download)."""
    from transformers import CLIPTokenizer

    vocab: dict[str, int] = {}
    for ch in _bytes_to_unicode().values():
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


class _Latent:
    def __init__(self, value: torch.Tensor):
        self.value = value

    def sample(self, generator=None) -> torch.Tensor:
        return self.value

    def mode(self) -> torch.Tensor:
        return self.value


class _Output:
    def __init__(self, **fields):
        self.__dict__.update(fields)


class PixelShuffleVAE(nn.Module):
    """An exact, weight-free stand-in for the VAE: space-to-depth by ``factor`` (3 -> 3 factor^2 channels).

    Used by ``base_model="tiny-pixel"``: with a random VAE a tiny model's images are
    meaningless, with this one they are the diffusion model's own output, so a tiny NeuroPictor
    trained for a minute on the synthetic data shows what it learnt.
    """

    def __init__(self, factor: int = 2, scaling_factor: float = 2.0):
        super().__init__()
        self.factor = factor
        self.config = _Output(block_out_channels=(1,) * (int(math.log2(factor)) + 1),
                              scaling_factor=scaling_factor, latent_channels=3 * factor * factor)
        # One (unused) parameter carries the module's device and dtype like a real VAE's.
        self.anchor = nn.Parameter(torch.zeros(()), requires_grad=False)

    def encode(self, images: torch.Tensor) -> _Output:
        return _Output(latent_dist=_Latent(F.pixel_unshuffle(images, self.factor)))

    def decode(self, latents: torch.Tensor) -> _Output:
        return _Output(sample=F.pixel_shuffle(latents, self.factor))


def tiny_base_components(*, seed: int = 0, context_dim: int = 32, unet_channels: tuple[int, int] = (8, 16),
                         pixel_vae: bool = False) -> BaseComponents:
    """Small random SD-like components: UNet (8, 16), VAE (8, 16) with 2x down-sampling, 2-layer text model.

    The same block types as SD 2.1-base (cross-attention down/up blocks, linear projections,
    4 latent channels), a fraction of the size. Deterministic given ``seed``. ``pixel_vae``
    replaces the random VAE by the exact :class:`PixelShuffleVAE` (12 latent channels).
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = tiny_tokenizer()
    latent_channels = 12 if pixel_vae else 4
    torch.manual_seed(seed)
    c0, c1 = unet_channels
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=latent_channels, out_channels=latent_channels,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(c0, c1), layers_per_block=1, cross_attention_dim=context_dim,
        attention_head_dim=(max(1, c0 // 4), max(1, c1 // 4)), use_linear_projection=True,
        norm_num_groups=4, flip_sin_to_cos=True, freq_shift=0,
    )
    torch.manual_seed(seed + 1)
    if pixel_vae:
        vae = PixelShuffleVAE()
    else:
        vae = AutoencoderKL(
            in_channels=3, out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
            block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4,
            sample_size=32, scaling_factor=0.18215,
        )
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=context_dim, intermediate_size=2 * context_dim,
        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, projection_dim=context_dim,
    ))
    return BaseComponents(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                          source=TINY)


# ---------------------------------------------------------------------------- trainable network
class NeuroPictorNet(nn.Module):
    """The trainable part: fMRI encoder, high-level guiding network, ControlNet (+ feature transformation).

    One module so that ``accelerate`` wraps (and, on several GPUs, synchronises) all of it.
    """

    def __init__(self, fmri_encoder: FMRIEncoder, semantic: SemanticNetwork, controlnet):
        super().__init__()
        self.fmri_encoder = fmri_encoder
        self.semantic = semantic
        self.controlnet = controlnet

    @property
    def feature_transform(self) -> FeatureTransform:
        return self.controlnet.controlnet_cond_embedding

    def forward(self, surfaces: torch.Tensor, noisy_latents: torch.Tensor, timesteps: torch.Tensor,
                *, use_aux: bool, drop_mask: torch.Tensor | None = None,
                empty_context: torch.Tensor | None = None, control_scale: float = 1.0):
        """One training forward pass of the trainable part.

        Parameters
        ----------
        surfaces : torch.Tensor
            ``(B, S, S)`` surface maps.
        noisy_latents : torch.Tensor
            ``(B, 4, s, s)``.
        timesteps : torch.Tensor
            ``(B,)`` int64.
        use_aux : bool
            Add the auxiliary semantic branch.
        drop_mask : torch.Tensor, optional
            ``(B,)`` bool; where true, the context is replaced by ``empty_context`` ``(L, E)``
            (CFG dropout; the fMRI control is kept).

        Returns
        -------
        down : list of torch.Tensor
            The ControlNet's down residuals (12 at full size), already times ``control_scale``.
        mid : torch.Tensor
            The mid residual.
        context : torch.Tensor
            ``(B, L, E)`` cross-attention context (after CFG dropout).
        context_main : torch.Tensor
            ``(B, L, E)`` the semantic main branch (semantic-loss prediction).
        """
        tokens = self.fmri_encoder(surfaces)
        context, context_main = self.semantic(tokens, use_aux=use_aux)
        if drop_mask is not None:
            empty = empty_context.to(context.dtype).unsqueeze(0).expand_as(context)
            context = torch.where(drop_mask.view(-1, 1, 1), empty, context)
        down, mid = self.controlnet(
            noisy_latents, timesteps, encoder_hidden_states=context, controlnet_cond=tokens,
            conditioning_scale=control_scale, return_dict=False,
        )
        return list(down), mid, context, context_main


class FMRIAutoencoder(nn.Module):
    """Encoder + bottleneck decoder, trained in stage ``"encoder"``."""

    def __init__(self, fmri_encoder: FMRIEncoder, head: FMRIAutoencoderHead):
        super().__init__()
        self.fmri_encoder = fmri_encoder
        self.head = head

    def forward(self, surfaces: torch.Tensor) -> torch.Tensor:
        """``(B, S, S)`` -> reconstructed ``(B, S, S)``."""
        return self.head(self.fmri_encoder(surfaces))


# ---------------------------------------------------------------------------- sizes and counts
@dataclass(frozen=True)
class Sizes:
    """Every architecture size of the trainable part (defaults: the official full size)."""

    surface_size: int = 256
    patch_size: int = 16
    encoder_dim: int = 1024
    encoder_depth: int = 24
    encoder_heads: int = 16
    bottleneck_dim: int = 2048
    decoder_dim: int = 512
    decoder_depth: int = 8
    decoder_heads: int = 16
    semantic_hidden: int = 128

    @property
    def n_tokens(self) -> int:
        return 1 + (self.surface_size // self.patch_size) ** 2

    def encoder(self, **options) -> FMRIEncoder:
        """The fMRI encoder; ``options``: ``eps``, ``drop``, ``attn_drop``, ``drop_path``."""
        return FMRIEncoder(surface_size=self.surface_size, patch_size=self.patch_size,
                           dim=self.encoder_dim, depth=self.encoder_depth, heads=self.encoder_heads,
                           **options)

    def autoencoder_head(self, **options) -> FMRIAutoencoderHead:
        return FMRIAutoencoderHead(
            surface_size=self.surface_size, patch_size=self.patch_size, encoder_dim=self.encoder_dim,
            bottleneck=self.bottleneck_dim, dim=self.decoder_dim, depth=self.decoder_depth,
            heads=self.decoder_heads, **options,
        )

    def semantic(self, context_tokens: int, context_dim: int) -> SemanticNetwork:
        return SemanticNetwork(n_tokens=self.n_tokens, dim=self.encoder_dim,
                               context_tokens=context_tokens, context_dim=context_dim,
                               hidden=self.semantic_hidden)

    def feature_transform(self, channels: int, latent_size: int) -> FeatureTransform:
        return FeatureTransform(n_tokens=self.n_tokens, dim=self.encoder_dim, channels=channels,
                                size=latent_size)


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def component_parameter_counts(image_size: int = 512, **sizes: int) -> dict[str, int]:
    """Parameter count of each full-size component, built on the meta device (no memory, no weights).

    Parameters
    ----------
    image_size : int
        Image side (512); sets the latent side of the feature transformation.
    **sizes
        Overrides of :class:`Sizes` fields (defaults: the official architecture).

    Returns
    -------
    dict
        ``fmri_encoder`` (trainable encoder parameters: patch embedding, CLS token, blocks,
        final LayerNorm; 302,575,616), ``semantic`` (2,207,074), ``feature_transform``
        (4,803,332), ``controlnet`` (without its conditioning embedding; 363,141,760),
        ``unet`` (865,910,724).
    """
    from diffusers import UNet2DConditionModel

    s = Sizes(**sizes)
    config = sd21_base_unet_config()
    with torch.device("meta"):
        encoder = s.encoder()
        semantic = s.semantic(77, config["cross_attention_dim"])
        transform = s.feature_transform(config["block_out_channels"][0], image_size // 8)
        unet = UNet2DConditionModel(**config)
        controlnet = build_controlnet(unet, transform, copy_weights=False)
    return {
        "fmri_encoder": _count(encoder),
        "semantic": _count(semantic),
        "feature_transform": _count(transform),
        "controlnet": _count(controlnet) - _count(transform),
        "unet": _count(unet),
    }


def describe_text() -> str:
    """The text of ``brainrecon decoders describe neuropictor``: components and their sizes."""
    counts = component_parameter_counts()
    trainable = counts["fmri_encoder"] + counts["semantic"] + counts["feature_transform"] + counts["controlnet"]
    rows = [
        ("fmri_encoder", "ViT autoencoder encoder, 1x256x256 -> 257x1024 (trainable)"),
        ("semantic", "high-level guiding network, 257x1024 -> 77x1024 (trainable)"),
        ("feature_transform", "low-level feature transformation, 257x1024 -> 320x64x64 (trainable)"),
        ("controlnet", "ControlNet from the SD 2.1-base UNet, 13 residuals (trainable)"),
        ("unet", "SD 2.1-base UNet (frozen)"),
    ]
    lines = ["NeuroPictor (Huo et al., ECCV 2024) on diffusers; full-size parameter counts:"]
    for key, what in rows:
        lines.append(f"  {key:<18} {counts[key]:>13,}  {what}")
    lines.append(f"  {'trainable total':<18} {trainable:>13,}")
    lines.append(
        "Stages: encoder (surface autoencoder) -> pretrain (subjects 1-8) -> finetune (one "
        "subject, semantic loss 0.1, auxiliary branch) -> cfg (5% empty-caption dropout, lr 1e-5)."
    )
    lines.append(
        "Sampling: DDIM 50 steps, eta 0, guidance 5.0 with the fMRI control in both branches; "
        "control_scale 0..1."
    )
    lines.append(
        "Released models: brainrecon import neuropictor --checkpoint sub01/epoch_015.pth "
        "--encoder-config fMRI_AutoEncoder.yaml --out DIR; the UK-Biobank encoder alone: "
        "--param encoder_init=checkpoint_120000.pth."
    )
    return "\n".join(lines)


def read_saved_config(directory: str | os.PathLike) -> dict:
    """``brainrecon.json`` of a saved decoder directory."""
    path = Path(directory) / "brainrecon.json"
    if not path.is_file():
        raise WeightsNotFoundError(
            f"{directory} is not a saved NeuroPictor decoder: {path.name} is missing. Pass the "
            f"directory written by a previous stage's save() (or `brainrecon fit`)."
        )
    with open(path, encoding="utf-8") as f:
        return json.load(f)


__all__ = [
    "BaseComponents", "FMRIAutoencoder", "NeuroPictorNet", "SD21_BASE", "Sizes", "TINY",
    "component_parameter_counts", "describe_text", "load_base_components",
    "sd21_base_unet_config", "tiny_base_components", "tiny_tokenizer",
]
