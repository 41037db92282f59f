"""Models with random weights, built from config, for brainrecon's tests and benchmarks.

Nothing here is ever a real model: every weight is drawn from a seeded generator, so a test can
exercise the loading code of the real files (same folder layout, same file names, same key
names) without downloading anything, and a benchmark can time a network of the real size
without its weights. Each builder is deterministic given its seed; the tests' expected numbers
depend on the seeds and sizes below, so change them only together with those tests.

Tiny models (tests)
    :func:`build_tiny_weights` — an SD 1.5-style diffusers folder, a separate VAE folder and an
    ``h94/IP-Adapter``-style folder (``models/image_encoder/``, ``models/ip-adapter-plus_sd15.bin``
    and ``.safetensors``), from :func:`tiny_unet`, :func:`tiny_vae`, :func:`tiny_text_components`,
    :func:`tiny_image_encoder`, :func:`tiny_resampler_state` and :func:`tiny_ip_attention_state`;
    :func:`save_tiny_clip` — a CLIPModel folder with its tokenizer (the ``clip`` target space);
    :func:`save_tiny_metric_clip` — a CLIP folder standing in for the CLIP metric's network;
    :func:`tiny_versatile_components` — Versatile Diffusion's image UNet, flat text UNet, VAE and
    scheduler config; :func:`save_tiny_sd21_folder` — NeuroPictor's frozen SD 2.1-base in the
    diffusers layout (the components themselves are :func:`tiny_base_components`, which also
    serves ``base_model="tiny"`` of the decoder).
Full-size models (benchmarks)
    :func:`random_sd15_pipeline` and :func:`random_ipadapter_state` — SD 1.5 with IP-Adapter Plus
    at the released shapes (``smoke=True``: the same architecture at toy widths);
    :func:`random_full_size_components` — SD 2.1-base for NeuroPictor;
    :func:`write_random_metric_weights` — the five evaluation networks' weight files
    (:func:`random_swav_state` alone for SwAV's).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from brainrecon.decoders.neuropictor.model import (
    SD21_BASE,
    BaseComponents,
    place,
    sd21_base_unet_config,
    tiny_base_components,
    tiny_tokenizer,
)


# ---------------------------------------------------------------------------- IP-Adapter Plus sizes
@dataclass(frozen=True)
class ResamplerSizes:
    """The shapes of an IP-Adapter Plus image projection (tencent's Resampler)."""

    enc_hidden: int   # CLIP vision width
    latent_dim: int   # Resampler latent width
    heads: int        # attention heads of width dim_head
    dim_head: int
    num_queries: int  # tokens per image
    cross_dim: int    # UNet cross-attention width = token width
    depth: int = 4    # diffusers' own converter assumes depth 4 and feed-forward ratio 4
    ff_mult: int = 4


#: ``h94/IP-Adapter`` ``ip-adapter-plus_sd15``: ViT-H/14 (1280) in, 16 tokens of 768 out.
SD15_PLUS = ResamplerSizes(enc_hidden=1280, latent_dim=768, heads=12, dim_head=64, num_queries=16, cross_dim=768)

# The tests' sizes, chosen so that no two widths coincide (a transposed weight cannot load silently).
ENC_HIDDEN = 48      # CLIP vision width (ViT-H/14: 1280)
ENC_IMAGE = 28       # encoder input (ViT-H/14: 224); patch 7 -> 16 patches + CLS = 17 tokens
ENC_PATCH = 7
LATENT_DIM = 40      # Resampler latent width (SD 1.5 Plus: 768)
HEADS = 2            # Resampler heads of width 64 (SD 1.5 Plus: 12)
DIM_HEAD = 64
NUM_QUERIES = 4      # tokens per image (SD 1.5 Plus: 16)
CROSS_DIM = 32       # UNet cross-attention width = token width (SD 1.5: 768)
DEPTH = 4
FF_MULT = 4
TOKEN_SHAPE = (NUM_QUERIES, CROSS_DIM)
TINY_PLUS = ResamplerSizes(enc_hidden=ENC_HIDDEN, latent_dim=LATENT_DIM, heads=HEADS, dim_head=DIM_HEAD,
                           num_queries=NUM_QUERIES, cross_dim=CROSS_DIM, depth=DEPTH, ff_mult=FF_MULT)


# ---------------------------------------------------------------------------- IP-Adapter Plus weights
def resampler_state(sizes: ResamplerSizes = TINY_PLUS, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random Resampler weights of ``sizes`` under the tencent key names (the ``image_proj`` group).

    Matrices are scaled by their fan-in; the latents are of order 1 so that attention weights
    are far from uniform, and the LayerNorm affines are near (not at) the identity so that a
    swapped weight and bias would show.
    """
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=None):
        return torch.randn(*shape, generator=g) * (shape[-1] ** -0.5 if scale is None else scale)

    s = sizes
    inner = s.heads * s.dim_head
    sd = {
        "latents": r(1, s.num_queries, s.latent_dim, scale=1.0),
        "proj_in.weight": r(s.latent_dim, s.enc_hidden), "proj_in.bias": r(s.latent_dim, scale=0.1),
        "proj_out.weight": r(s.cross_dim, s.latent_dim), "proj_out.bias": r(s.cross_dim, scale=0.1),
        "norm_out.weight": 1 + r(s.cross_dim, scale=0.1), "norm_out.bias": r(s.cross_dim, scale=0.1),
    }
    for i in range(s.depth):
        p = f"layers.{i}."
        sd.update({
            p + "0.norm1.weight": 1 + r(s.latent_dim, scale=0.1), p + "0.norm1.bias": r(s.latent_dim, scale=0.1),
            p + "0.norm2.weight": 1 + r(s.latent_dim, scale=0.1), p + "0.norm2.bias": r(s.latent_dim, scale=0.1),
            p + "0.to_q.weight": r(inner, s.latent_dim, scale=0.5),
            p + "0.to_kv.weight": r(2 * inner, s.latent_dim, scale=0.5),
            p + "0.to_out.weight": r(s.latent_dim, inner),
            p + "1.0.weight": 1 + r(s.latent_dim, scale=0.1), p + "1.0.bias": r(s.latent_dim, scale=0.1),
            p + "1.1.weight": r(s.ff_mult * s.latent_dim, s.latent_dim),
            p + "1.3.weight": r(s.latent_dim, s.ff_mult * s.latent_dim),
        })
    return sd


def tiny_resampler_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random Resampler weights at the tests' sizes (:data:`TINY_PLUS`)."""
    return resampler_state(TINY_PLUS, seed)


def ip_attention_state(unet, token_dim: int, *, seed: int = 1, k_scale: float = 0.5,
                       v_scale: float = 2.0) -> dict[str, torch.Tensor]:
    """``{k}.to_k_ip.weight`` / ``{k}.to_v_ip.weight`` for every cross-attention processor k of ``unet``.

    k counts all attention processors in ``unet.attn_processors`` order, so cross-attention
    layers get the odd numbers 1, 3, 5, … as in the released checkpoints. The default scales
    (values larger than keys) make the image tokens visibly steer a tiny UNet.
    """
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, name in enumerate(unet.attn_processors):
        if name.endswith("attn2.processor"):
            hidden = unet.get_submodule(name[: -len(".processor")]).to_k.out_features
            sd[f"{k}.to_k_ip.weight"] = torch.randn(hidden, token_dim, generator=g) * k_scale
            sd[f"{k}.to_v_ip.weight"] = torch.randn(hidden, token_dim, generator=g) * v_scale
    return sd


def tiny_ip_attention_state(unet, seed: int = 1) -> dict[str, torch.Tensor]:
    """IP-Adapter attention weights for a tiny ``unet`` (tokens of :data:`CROSS_DIM`)."""
    return ip_attention_state(unet, CROSS_DIM, seed=seed)


def random_ipadapter_state(unet, sizes: ResamplerSizes = SD15_PLUS) -> dict[str, dict[str, torch.Tensor]]:
    """A random IP-Adapter Plus checkpoint for ``unet`` (``image_proj`` and ``ip_adapter`` groups),
    by default at the shapes of the released SD 1.5 one; attention weights scaled by fan-in."""
    scale = sizes.cross_dim ** -0.5
    return {"image_proj": resampler_state(sizes, seed=0),
            "ip_adapter": ip_attention_state(unet, sizes.cross_dim, seed=1, k_scale=scale, v_scale=scale)}


def save_ipadapter_checkpoint(state: dict, models: Path) -> None:
    """Write ``state`` as ``ip-adapter-plus_sd15.bin`` (torch) and ``.safetensors`` (flat
    ``group.key`` names) under ``models``, as ``h94/IP-Adapter`` ships it."""
    from safetensors.torch import save_file

    models.mkdir(parents=True, exist_ok=True)
    torch.save(state, models / "ip-adapter-plus_sd15.bin")
    flat = {f"{group}.{k}": v.contiguous() for group, sd in state.items() for k, v in sd.items()}
    save_file(flat, str(models / "ip-adapter-plus_sd15.safetensors"))


# ---------------------------------------------------------------------------- tiny SD 1.5
def sd15_scheduler():
    """SD 1.5's own scheduler config: PNDM with the scaled-linear betas."""
    from diffusers import PNDMScheduler

    return PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False)


def sd15_pipeline(unet, vae, text_encoder=None, tokenizer=None):
    """A StableDiffusionPipeline of these components with SD 1.5's scheduler and no safety checker."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=sd15_scheduler(), safety_checker=None, feature_extractor=None,
                                   image_encoder=None, requires_safety_checker=False)


def tiny_unet():
    """An SD 1.5-style UNet, widths (32, 64), cross-attention of :data:`CROSS_DIM` (seed 0)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=CROSS_DIM, attention_head_dim=8, norm_num_groups=8,
    )


def tiny_vae(seed: int = 0):
    """An AutoencoderKL of widths (8, 16), 4 latent channels."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, sample_size=16,
    )


def letter_tokenizer(directory: Path, max_length: int = 77):
    """A CLIP tokenizer over a 54-entry vocabulary (start, end, each letter alone and word-final),
    its ``vocab.json`` and ``merges.txt`` written into ``directory``."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"), model_max_length=max_length)


def tiny_text_components(directory: Path):
    """A 2-layer CLIP text encoder and a :func:`letter_tokenizer` (files under ``directory``)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = letter_tokenizer(directory)
    torch.manual_seed(2)
    config = CLIPTextConfig(hidden_size=CROSS_DIM, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                            vocab_size=len(tokenizer), max_position_embeddings=77, projection_dim=CROSS_DIM,
                            bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return CLIPTextModel(config), tokenizer


def tiny_image_encoder():
    """A 3-layer CLIP vision encoder with projection (:data:`ENC_IMAGE` px, patch :data:`ENC_PATCH`)."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(3)
    config = CLIPVisionConfig(hidden_size=ENC_HIDDEN, intermediate_size=64, num_hidden_layers=3,
                              num_attention_heads=4, image_size=ENC_IMAGE, patch_size=ENC_PATCH, projection_dim=16)
    return CLIPVisionModelWithProjection(config).eval()


def build_tiny_weights(root: Path) -> dict:
    """Write tiny random weights in the real layouts under ``root``.

    Returns
    -------
    dict
        ``ipadapter`` (an ``h94/IP-Adapter``-like folder), ``sd`` (a diffusers SD 1.5-like
        folder), ``vae`` (a separate AutoencoderKL folder), ``state`` (the checkpoint dict).
    """
    root = Path(root)
    unet = tiny_unet()
    text_encoder, tokenizer = tiny_text_components(root / "tok")
    sd15_pipeline(unet, tiny_vae(0), text_encoder, tokenizer).save_pretrained(root / "sd")
    tiny_vae(5).save_pretrained(root / "vae")

    models = root / "ipadapter" / "models"
    tiny_image_encoder().save_pretrained(models / "image_encoder")
    state = {"image_proj": tiny_resampler_state(), "ip_adapter": tiny_ip_attention_state(unet)}
    save_ipadapter_checkpoint(state, models)
    return {"ipadapter": root / "ipadapter", "sd": root / "sd", "vae": root / "vae", "state": state}


# ---------------------------------------------------------------------------- full-size SD 1.5 (benchmarks)
def random_sd15_pipeline(device: str = "cpu", dtype: torch.dtype = torch.float32, smoke: bool = False):
    """A full-size SD 1.5 pipeline (UNet 859,520,964 parameters) with random weights, built directly
    on ``device``, no text encoder (``smoke``: the same architecture at toy widths, for smoke runs).
    Token width 768 in both cases."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    unet_width = (32, 64) if smoke else (320, 640, 1280, 1280)
    vae_width = (32, 32) if smoke else (128, 256, 512, 512)
    n_down = len(unet_width)
    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(
            sample_size=16 if smoke else 64, in_channels=4, out_channels=4,
            layers_per_block=1 if smoke else 2, block_out_channels=unet_width,
            down_block_types=("CrossAttnDownBlock2D",) * (n_down - 1) + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n_down - 1),
            cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
        ).to(dtype)
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1 if smoke else 2,
            sample_size=32 if smoke else 512, block_out_channels=vae_width,
            down_block_types=("DownEncoderBlock2D",) * len(vae_width),
            up_block_types=("UpDecoderBlock2D",) * len(vae_width), scaling_factor=0.18215,
            norm_num_groups=32,
        ).to(dtype)
    return sd15_pipeline(unet, vae)


# ---------------------------------------------------------------------------- CLIP (the clip target)
def save_tiny_clip(directory: Path, text_tokens: int = 8, dim: int = 16) -> Path:
    """A CLIPModel (vision: 28 px, patch 14 -> 4 patches + class token; widths 24; projection
    ``dim``) and a :func:`letter_tokenizer` of ``text_tokens``, saved into ``directory``."""
    from transformers import CLIPConfig, CLIPModel

    directory = Path(directory)
    tokenizer = letter_tokenizer(directory, max_length=text_tokens)
    tokenizer.save_pretrained(directory)
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config={"hidden_size": 24, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                     "vocab_size": len(tokenizer), "max_position_embeddings": text_tokens, "bos_token_id": 0,
                     "eos_token_id": 1, "pad_token_id": 1},
        vision_config={"hidden_size": 24, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                       "image_size": 28, "patch_size": 14},
        projection_dim=dim)
    CLIPModel(config).save_pretrained(directory)
    return directory


def save_tiny_metric_clip(directory: Path, seed: int = 0) -> Path:
    """A tiny CLIPModel at the CLIP metric's 224-px input (patch 56, widths 16), saved into
    ``directory`` (name it ``clip-vit-large-patch14`` under a weights folder to stand in for the
    metric's network); another seed gives other weights in a file of the same size."""
    from transformers import CLIPConfig, CLIPModel

    cfg = CLIPConfig(
        text_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                     "vocab_size": 100, "max_position_embeddings": 8},
        vision_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                       "num_attention_heads": 2, "image_size": 224, "patch_size": 56},
        projection_dim=12,
    )
    torch.manual_seed(seed)
    CLIPModel(cfg).eval().save_pretrained(directory)
    return Path(directory)


# ---------------------------------------------------------------------------- Versatile Diffusion
def tiny_versatile_components(seed: int = 0, cross_attention_dim: int = 16):
    """An image UNet, a flat text UNet of the same layout (whose transformers join the image UNet's),
    a VAE and a scheduler config, as in ``shi-labs/versatile-diffusion`` but tiny.

    Returns ``(image_unet, text_unet, vae, scheduler_config)``, the arguments of
    :meth:`brainrecon.generate.versatile.VersatileGenerator.from_components`.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.pipelines.deprecated.versatile_diffusion.modeling_text_unet import (
        UNetFlatConditionModel,
    )

    torch.manual_seed(seed)
    common = {"sample_size": 8, "in_channels": 4, "out_channels": 4, "layers_per_block": 1,
              "block_out_channels": (32, 32), "cross_attention_dim": cross_attention_dim, "attention_head_dim": 8,
              "norm_num_groups": 8}
    image_unet = UNet2DConditionModel(down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                      up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), **common).eval()
    text_unet = UNetFlatConditionModel(down_block_types=("CrossAttnDownBlockFlat", "DownBlockFlat"),
                                       up_block_types=("UpBlockFlat", "CrossAttnUpBlockFlat"),
                                       mid_block_type="UNetMidBlockFlatCrossAttn", **common).eval()
    with torch.no_grad():  # make the cross-attention matter
        for unet in (image_unet, text_unet):
            for name, p in unet.named_parameters():
                if "attn2.to_v" in name or "attn2.to_out" in name:
                    p.mul_(4)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(8, 8),
                        latent_channels=4, norm_num_groups=4, sample_size=16).eval()
    scheduler = {"_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
                 "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "skip_prk_steps": True,
                 "set_alpha_to_one": False, "steps_offset": 1}
    return image_unet, text_unet, vae, scheduler


# ---------------------------------------------------------------------------- SD 2.1-base (NeuroPictor)
def save_base_components(components: BaseComponents, directory) -> Path:
    """Write ``components`` in the diffusers layout of ``stabilityai/stable-diffusion-2-1-base``
    (``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``)."""
    directory = Path(directory)
    components.unet.save_pretrained(directory / "unet")
    components.vae.save_pretrained(directory / "vae")
    components.text_encoder.save_pretrained(directory / "text_encoder")
    components.tokenizer.save_pretrained(directory / "tokenizer")
    return directory


def save_tiny_sd21_folder(directory, seed: int = 0) -> Path:
    """The tiny SD 2.1-like components of :func:`tiny_base_components` (the decoder's
    ``base_model="tiny"``) saved as a local ``base_model`` folder, so that the loading path of the
    real weights is what runs."""
    return save_base_components(tiny_base_components(seed=seed), directory)


def random_full_size_components(*, seed: int = 0, device="cpu", dtype=torch.float32) -> BaseComponents:
    """SD 2.1-base-shaped UNet, VAE and 23-layer text encoder with random weights (benchmarks).

    The architectures of ``stabilityai/stable-diffusion-2-1-base`` (UNet 865,910,724
    parameters, VAE 83,653,863, text encoder 340,387,840), so compute and memory are those of
    the real model, without downloading it. The tokenizer is the local tiny one (its ids are
    valid inputs of the 49,408-token embedding).
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = tiny_tokenizer()
    torch.manual_seed(seed)
    with torch.device(device):
        unet = UNet2DConditionModel(**sd21_base_unet_config())
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
            layers_per_block=2, latent_channels=4, norm_num_groups=32, sample_size=512,
            scaling_factor=0.18215,
        )
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
            num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu", projection_dim=512,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ))
    base = BaseComponents(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                          source=SD21_BASE).freeze()
    for module in (unet, vae, text_encoder):
        place(module, device, dtype)
    return base


# ---------------------------------------------------------------------------- evaluation networks
def random_swav_state(seed: int | None = None) -> dict[str, torch.Tensor]:
    """A random ResNet-50 trunk under the key names of SwAV's ``swav_800ep_pretrain.pth.tar``
    (``module.`` prefix, no ``fc``); ``seed`` None draws from torch's current random state."""
    import torchvision

    if seed is not None:
        torch.manual_seed(seed)
    swav = torchvision.models.resnet50(weights=None)
    return {f"module.{k}": v for k, v in swav.state_dict().items() if not k.startswith("fc.")}


def write_random_metric_weights(directory: Path) -> dict[str, int]:
    """The five metric networks (AlexNet, Inception v3, EfficientNet-B1, SwAV ResNet-50, CLIP ViT-L/14)
    with random weights at their real sizes, saved under the file names
    :mod:`brainrecon.eval.weights` looks for. Returns file -> bytes. Their SHA-256 prefixes cannot
    match the real files'; a benchmark switches that check off for its own process."""
    import torchvision
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from brainrecon.eval.extractors import CLIP_VIT_L14
    from brainrecon.eval.weights import CLIP_LOCAL_DIRNAME, WEIGHT_FILES

    directory = Path(directory)
    torch.manual_seed(0)
    models = {
        "alexnet": torchvision.models.alexnet(weights=None),
        "inception": torchvision.models.inception_v3(weights=None, aux_logits=True, init_weights=False),
        "effnet_v2": torchvision.models.efficientnet_b1(weights=None),
    }
    sizes = {}
    for key, model in models.items():
        path = directory / WEIGHT_FILES[key].filename
        torch.save(model.state_dict(), path)
        sizes[path.name] = path.stat().st_size
    path = directory / WEIGHT_FILES["swav"].filename
    torch.save(random_swav_state(), path)
    sizes[path.name] = path.stat().st_size
    clip_dir = directory / CLIP_LOCAL_DIRNAME
    CLIPVisionModelWithProjection(CLIPVisionConfig(**CLIP_VIT_L14)).save_pretrained(clip_dir)
    sizes[f"{CLIP_LOCAL_DIRNAME}/model.safetensors"] = (clip_dir / "model.safetensors").stat().st_size
    return sizes


__all__ = [
    "CROSS_DIM",
    "DEPTH",
    "DIM_HEAD",
    "ENC_HIDDEN",
    "ENC_IMAGE",
    "ENC_PATCH",
    "FF_MULT",
    "HEADS",
    "LATENT_DIM",
    "NUM_QUERIES",
    "SD15_PLUS",
    "TINY_PLUS",
    "TOKEN_SHAPE",
    "ResamplerSizes",
    "build_tiny_weights",
    "ip_attention_state",
    "letter_tokenizer",
    "random_full_size_components",
    "random_ipadapter_state",
    "random_sd15_pipeline",
    "random_swav_state",
    "resampler_state",
    "save_base_components",
    "save_ipadapter_checkpoint",
    "save_tiny_clip",
    "save_tiny_metric_clip",
    "save_tiny_sd21_folder",
    "sd15_pipeline",
    "sd15_scheduler",
    "tiny_base_components",
    "tiny_image_encoder",
    "tiny_ip_attention_state",
    "tiny_resampler_state",
    "tiny_text_components",
    "tiny_unet",
    "tiny_vae",
    "tiny_versatile_components",
    "write_random_metric_weights",
]
