"""Reading the files released with NeuroPictor (Huo et al., ECCV 2024).

Two kinds of file: the UK-Biobank fMRI encoder (:func:`load_official_encoder`, read by
:mod:`.official_encoder`, whose names this module re-exports) and the NeuroPictor models
themselves, epoch files and ``control_sd21_ini.ckpt`` (:func:`convert_official_checkpoint`).

This module only converts: it reads a file's tensors and maps them, strictly, onto brainrecon's
modules, as diffusers' ``loaders/single_file_utils.py`` does. The decoder's loader method
:meth:`NeuroPictorDecoder.from_official <brainrecon.decoders.neuropictor.decoder.NeuroPictorDecoder.from_official>`
assembles a fitted decoder from what it returns; saving that decoder or writing runs with it
is application work (:mod:`brainrecon.workflows.importers`, CLI ``brainrecon import neuropictor``).

**The epoch files** (``torch.save(self.state_dict())`` of the official Lightning module) hold
every part under its attribute name: ``model.diffusion_model.*`` (ldm UNet), ``first_stage_model.*``
(VAE), ``control_model.*`` (the cldm ControlNet copy, with the feature transformation under
``control_model.fmri_mapper.*``), ``fmri_encoder.transformer.*``, ``cond_stage.*`` (the high-level
guiding network), ``cond_stage_model.*`` (OpenCLIP text tower) and the DDPM buffers. UNet, VAE and
ControlNet go through diffusers' converters (``diffusers.loaders.single_file_utils``), checked to
consume every tensor they are given and to produce every weight of the target module; the fMRI
parts are mapped by hand (:data:`MAPPER_KEYS`, :data:`HLGN_KEYS`). What is not imported is on one
list (:data:`IGNORED_PREFIXES`, :data:`IGNORED_KEYS`); any other key is an error that lists it.
The UNet and VAE are frozen in NeuroPictor, so they must equal the ``base_model`` the decoder runs
on (they are not stored again).

``torch.load(..., weights_only=True)`` is the only place brainrecon unpickles anything; files
that need more than tensors, containers, numbers, strings and ``argparse.Namespace`` (which
training scripts store as ``'args'``) are refused.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from brainrecon.decoders.neuropictor.official_encoder import (  # noqa: F401 - re-exported: the encoder file is read there
    _BLOCK,
    ENCODER_IGNORED,
    ENCODER_IGNORED_PREFIXES,
    OFFICIAL_HEADS,
    EncoderSpec,
    OfficialFileError,
    _key_list,
    autoencoder_head_from_state,
    encoder_from_state,
    encoder_settings_line,
    encoder_state_from_file,
    infer_encoder_spec,
    load_official_encoder,
    read_encoder_config,
    split_encoder_state,
    torch_load_weights_only,
)
from brainrecon.decoders.neuropictor.weights import load_state_dict_strict


def _looks_like_encoder_file(path: str | os.PathLike) -> bool:
    """A file named like the released fMRI autoencoder (``fMRI2fMRI_UKB/checkpoint_120000.pth``)."""
    p = Path(path)
    return bool(re.fullmatch(r"checkpoint[_-]?\d+\.pth", p.name)) or "fMRI2fMRI" in p.as_posix()


_ENCODER_HINT = ("This looks like the released fMRI autoencoder (fMRI2fMRI_UKB/checkpoint_120000.pth): pass it as "
                 "encoder, beside an epoch file or control_sd21_ini.ckpt as the checkpoint.")



# ============================================================================ NeuroPictor epoch files
#: Key prefixes of an official epoch file (``torch.save(self.state_dict())`` of the Lightning
#: module, ``cldm_fmri_surf.py``) and what brainrecon does with them.
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CONTROL_PREFIX = "control_model."
MAPPER_PREFIX = "control_model.fmri_mapper."
ENCODER_PREFIX = "fmri_encoder.transformer."
HLGN_PREFIX = "cond_stage."
#: The one ignore list: prefixes and keys of an official file that are deliberately not imported.
IGNORED_PREFIXES = {
    "control_model.input_hint_block.": "the ControlNet's image-hint encoder, built but never used by NeuroPictor",
    "cond_stage_model.": "the OpenCLIP ViT-H-14 text tower: brainrecon encodes the empty caption with "
                         "base_model's text encoder and takes the last-layer target from sem_text_model",
    "model_ema.": "EMA weights (use_ema is False in every official yaml)",
    "loss_fn_alex.": "LPIPS network of the training-time validation",
    "eff_model.": "EfficientNet of the training-time validation",
    "inception_model.": "Inception network of the training-time validation",
}
#: DDPM schedule buffers of ldm's ``LatentDiffusion`` (brainrecon's schedulers compute them).
IGNORED_KEYS = (
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
    "posterior_mean_coef1", "posterior_mean_coef2", "lvlb_weights", "logvar", "scale_factor", "cond_ids",
)
#: Official feature transformation (``FMRIToControlModel``) -> brainrecon ``FeatureTransform``.
MAPPER_KEYS = {"channel_mapper.0": "token_mix1", "channel_mapper.1": "token_mix2",
               "dim_mapper.0": "linear", "out": "zero_conv"}
#: Official high-level guiding network (``FMRIToSemanticModel``) -> brainrecon ``SemanticNetwork``.
HLGN_KEYS = {"channel_mapper.0": "main.token_mix1", "channel_mapper.1": "main.token_mix2",
             "dim_mapper": "main.linear", "norm": "main.norm",
             "extra_clip.0": "aux.token_mix1", "extra_clip.1": "aux.token_mix2",
             "extra_clip.2": "aux.linear", "extra_clip.3": "aux.norm", "extra_clip_out": "aux_zero"}
_FROZEN_TOLERANCE = 1e-3


def _rename(state: Mapping[str, torch.Tensor], table: Mapping[str, str], source: str, what: str
            ) -> dict[str, torch.Tensor]:
    out, unknown = {}, []
    for key, value in state.items():
        module, _, leaf = key.rpartition(".")
        if module in table and leaf in ("weight", "bias"):
            out[f"{table[module]}.{leaf}"] = value
        else:
            unknown.append(key)
    if unknown:
        raise OfficialFileError(f"{source}: unknown {what} key(s): {_key_list(unknown)}.")
    return out


def _storages(tensors) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in tensors if torch.is_tensor(t)}


def _convert_strict(convert, state: dict[str, torch.Tensor], target_keys, source: str, what: str,
                    *, drop_prefix: str | None = None) -> dict[str, torch.Tensor]:
    """Run a diffusers converter and check it consumed every input tensor and produced every target key.

    diffusers' converters skip keys they do not know; here a source tensor whose storage is in
    none of the outputs is an error, as is a target key that was not produced.
    """
    out = convert(state)
    if drop_prefix:
        out = {k: v for k, v in out.items() if not k.startswith(drop_prefix)}
    produced = {k: v for k, v in out.items() if v is not None}
    used = _storages(produced.values())
    unconsumed = [k for k, v in state.items() if v.untyped_storage().data_ptr() not in used]
    missing = sorted(set(target_keys) - set(produced))
    extra = sorted(set(produced) - set(target_keys))
    problems = []
    if unconsumed:
        problems.append(f"file keys the converter did not map: {_key_list(unconsumed)}")
    if missing:
        problems.append(f"missing {what} weights: {_key_list(missing)}")
    if extra:
        problems.append(f"converted keys the {what} does not have: {_key_list(extra)}")
    if problems:
        raise OfficialFileError(
            f"Cannot import the {what} of {source}: " + "; ".join(problems)
            + ". The file does not have the layout of the released NeuroPictor models, or base_model "
              "is not the Stable Diffusion 2.1-base it was built on."
        )
    return produced


@dataclass
class ImportReport:
    """What the import of an official file found, mapped, ignored and checked."""

    source: str
    counts: dict[str, int] = field(default_factory=dict)
    ignored: dict[str, int] = field(default_factory=dict)
    fresh: list[str] = field(default_factory=list)
    frozen_max_diff: dict[str, float] = field(default_factory=dict)
    checks: dict[str, float] = field(default_factory=dict)
    #: The fMRI encoder's settings the tensors do not fix: heads, LayerNorm eps, dropout, and where
    #: they came from (None: assumed, the official values).
    encoder: dict[str, Any] = field(default_factory=dict)
    #: What was inferred rather than given (subjects, stage), as sentences.
    inferred: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = [f"imported {self.source}"]
        if self.encoder:
            out.append("  " + encoder_settings_line(self.encoder))
        out += [f"  {line}" for line in self.inferred]
        out += [f"  {k:<22} {v:>6} tensors" for k, v in self.counts.items()]
        out += [f"  ignored {k:<14} {v:>6} tensors" for k, v in self.ignored.items()]
        out += [f"  initialised fresh: {name}" for name in self.fresh]
        out += [f"  {k} equals base_model's within {v:.2e}" for k, v in self.frozen_max_diff.items()]
        out += [f"  check {k:<40} {v:.3e}" for k, v in self.checks.items()]
        return out



def absolute_or_hub(name: str | os.PathLike) -> str:
    """A local path made absolute (so a saved decoder works from any directory); a hub id unchanged."""
    path = Path(name).expanduser()
    return str(path.resolve()) if path.exists() else str(name)


def subjects_from_folder(source: str | os.PathLike) -> tuple[list[int], str]:
    """Subjects of a released epoch file from its own folder's name, and a sentence saying so.

    Only the folder the file is in counts (``finetune_single_sub/sub01/epoch_015.pth`` -> [1]);
    names further up the path are not read, so a multi-subject file kept under ``.../sub1/...``
    is not taken for subject 1. No ``subNN`` folder: all eight subjects.
    """
    folder = Path(source).parent.name
    found = re.fullmatch(r"sub(?:j)?[_-]?0*([1-8])", folder)
    if found:
        return [int(found.group(1))], f"subjects [{int(found.group(1))}] (inferred from the folder name {folder!r}; pass subjects to override)"
    return list(range(1, 9)), (f"subjects 1-8 (the folder name {folder!r} names no single subject; pass subjects "
                               f"for a single-subject file)")


def split_official_checkpoint(state: Mapping[str, torch.Tensor], source: str) -> dict[str, dict]:
    """Sort an epoch file's keys by part; anything neither mapped nor ignored is an error listing it."""
    parts: dict[str, dict] = {name: {} for name in ("unet", "vae", "controlnet", "mapper", "encoder", "hlgn")}
    ignored: dict[str, dict] = {}
    unknown = []
    for key, value in state.items():
        if not torch.is_tensor(value):
            unknown.append(f"{key} (not a tensor)")
            continue
        prefix = next((p for p in IGNORED_PREFIXES if key.startswith(p)), None)
        if prefix is not None:
            ignored.setdefault(prefix.rstrip("."), {})[key] = value
        elif key in IGNORED_KEYS:
            ignored.setdefault("ddpm buffers", {})[key] = value
        elif key.startswith(MAPPER_PREFIX):
            parts["mapper"][key[len(MAPPER_PREFIX):]] = value
        elif key.startswith(CONTROL_PREFIX):
            parts["controlnet"][key[len(CONTROL_PREFIX):]] = value
        elif key.startswith(UNET_PREFIX):
            parts["unet"][key] = value
        elif key.startswith(VAE_PREFIX):
            parts["vae"][key] = value
        elif key.startswith(ENCODER_PREFIX):
            parts["encoder"][key[len(ENCODER_PREFIX):]] = value
        elif key.startswith(HLGN_PREFIX):
            parts["hlgn"][key[len(HLGN_PREFIX):]] = value
        else:
            unknown.append(key)
    if unknown:
        raise OfficialFileError(
            f"{source} has {len(unknown)} key(s) that are neither mapped nor on the ignore list: "
            f"{_key_list(unknown)}. Mapped prefixes: {UNET_PREFIX}, {VAE_PREFIX}, {CONTROL_PREFIX}, "
            f"{ENCODER_PREFIX}, {HLGN_PREFIX}; ignored: {', '.join(IGNORED_PREFIXES)} and the DDPM buffers."
        )
    parts["ignored"] = ignored
    return parts


def _max_diff(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> float:
    return max((float((a[k].float() - b[k].float().to(a[k].device)).abs().max()) for k in a if a[k].numel()),
               default=0.0)


@dataclass
class OfficialModel:
    """What :func:`convert_official_checkpoint` makes of an official NeuroPictor file.

    ``net`` is the assembled :class:`~brainrecon.decoders.neuropictor.model.NeuroPictorNet`
    (fMRI encoder, guiding network, ControlNet with the feature transformation), in eval mode;
    ``base`` the frozen components of ``base_model`` the file's UNet and VAE were checked
    against; ``state`` the file's state dict (for :func:`check_import`).
    """

    source: str
    state: Mapping[str, torch.Tensor]
    net: Any
    base: Any
    base_model: str
    spec: EncoderSpec
    geometry: dict[str, Any]
    semantic_hidden: int
    aux_active: bool
    report: ImportReport


def convert_official_checkpoint(checkpoint: str | os.PathLike, *, encoder: str | os.PathLike | None = None,
                                encoder_config: str | os.PathLike | Mapping | None = None,
                                base_model: str | None = None, seed: int = 0) -> OfficialModel:
    """Convert an official NeuroPictor file into brainrecon's modules, strictly.

    Parameters
    ----------
    checkpoint : path
        An epoch file (``finetune_single_sub/sub01/epoch_015.pth``,
        ``pretrain_multi_sub/sub_all_womask/epoch_080.pth``) or the initial
        ``control_sd21_ini.ckpt`` (no fMRI parts: the fMRI encoder must then come from
        ``encoder``, the guiding network and feature transformation start fresh).
    encoder, encoder_config : path, optional
        ``checkpoint_120000.pth`` and ``fMRI_AutoEncoder.yaml``, for files without an fMRI
        encoder; ``encoder_config`` also gives the heads of an epoch file's encoder.
    base_model : str, optional
        The frozen SD 2.1-base (repo id or local diffusers folder; default the hub copy). The
        file's UNet and VAE, converted with diffusers' ``convert_ldm_unet_checkpoint`` /
        ``convert_ldm_vae_checkpoint``, must equal it (NeuroPictor never trains them).
    seed : int
        Seeds the modules that start fresh (a file without them).

    Returns
    -------
    OfficialModel
        The modules, their geometry and the :class:`ImportReport` (what was mapped, ignored,
        initialised fresh, and how far the frozen parts are from ``base_model``'s).

    Raises
    ------
    OfficialFileError
        For a key neither mapped nor on the ignore list, a tensor a converter did not consume,
        a missing weight, or frozen parts that differ from ``base_model``'s.
    """
    from diffusers.loaders import single_file_utils as sfu

    from brainrecon.decoders.neuropictor import control, model

    source = str(checkpoint)
    looks_like_encoder = _looks_like_encoder_file(checkpoint)
    obj = torch_load_weights_only(checkpoint, "NeuroPictor checkpoint", hint=_ENCODER_HINT if looks_like_encoder else "",
                                  parameters=("encoder",) if looks_like_encoder else ())
    inner = obj.get("model") if isinstance(obj, Mapping) else None
    if isinstance(inner, Mapping) and inner and all(
            str(k).removeprefix("module.").startswith("transformer.") for k in inner):
        raise OfficialFileError(
            f"{source} is the fMRI autoencoder (its 'model' holds only transformer.* tensors), not a NeuroPictor "
            f"checkpoint: pass it as encoder, with control_sd21_ini.ckpt or an epoch file as the checkpoint.",
            parameters=("encoder",))
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]  # a Lightning checkpoint
    if not isinstance(obj, Mapping):
        raise OfficialFileError(f"{source} does not hold a state dict (got {type(obj).__name__}).")
    parts = split_official_checkpoint(obj, source)
    report = ImportReport(source=source, ignored={k: len(v) for k, v in parts["ignored"].items()})
    if not parts["controlnet"]:
        raise OfficialFileError(f"{source} has no ControlNet (control_model.*); it is not a NeuroPictor or "
                                f"ControlNet-SD2.1 checkpoint.")

    # fMRI encoder: the file's own (trained in every stage) or the released UK-Biobank one.
    if parts["encoder"] and encoder is not None:
        raise OfficialFileError(
            f"{source} holds its own (fine-tuned) fMRI encoder; encoder is for files without one "
            f"(control_sd21_ini.ckpt). Leave encoder out.", parameters=("encoder",)
        )
    if parts["encoder"]:
        fmri = encoder_from_state(parts["encoder"], encoder_config, source=f"{source} (fmri_encoder)")
    elif encoder is not None:
        fmri = load_official_encoder(encoder, encoder_config)
    else:
        raise OfficialFileError(
            f"{source} has no fMRI encoder (fmri_encoder.*); pass the released one: "
            f"encoder=checkpoint_120000.pth, encoder_config=fMRI_AutoEncoder.yaml.",
            parameters=("encoder", "encoder_config")
        )
    spec = fmri.official_spec
    report.counts["fmri_encoder"] = len(parts["encoder"]) or len(fmri.state_dict())
    report.encoder = {"heads": spec.heads, "eps": spec.eps, "dropout": spec.drop,
                      "from": (str(encoder_config) if encoder_config is not None and not isinstance(encoder_config, Mapping)
                               else "the given config" if encoder_config is not None else None)}

    base_model = model.SD21_BASE if base_model is None else absolute_or_hub(base_model)
    base = model.load_base_components(base_model, seed=seed)
    unet_config = dict(base.unet.config)
    # Frozen parts: convert with diffusers and require equality with base_model's.
    for name, prefix, module, convert in (
        ("unet", UNET_PREFIX, base.unet, lambda s: sfu.convert_ldm_unet_checkpoint(s, unet_config)),
        ("vae", VAE_PREFIX, base.vae, lambda s: sfu.convert_ldm_vae_checkpoint(s, dict(base.vae.config))),
    ):
        if not parts[name]:
            report.fresh.append(f"{name}: not in the file, base_model's is used")
            continue
        target = module.state_dict()
        converted = _convert_strict(convert, parts[name], target.keys(), source, name)
        diff = _max_diff({k: converted[k].reshape(target[k].shape) for k in target}, target)
        if diff > _FROZEN_TOLERANCE:
            raise OfficialFileError(
                f"The {name} of {source} differs from base_model={base_model!r} by up to {diff:.3g}; "
                f"NeuroPictor keeps it frozen, so base_model must be the Stable Diffusion 2.1-base the "
                f"file was built on (pass it as base_model).", parameters=("base_model",)
            )
        report.frozen_max_diff[name] = diff
        report.counts[name] = len(parts[name])

    geometry = {
        "latent_size": None, "latent_channels": int(base.unet.config.in_channels),
        "channels": int(base.unet.config.block_out_channels[0]),
        "context_tokens": base.context_tokens, "context_dim": base.context_dim,
    }
    n_tokens = 1 + (spec.surface_size // spec.patch_size) ** 2

    # Feature transformation.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if parts["mapper"]:
            mapped = _rename(parts["mapper"], MAPPER_KEYS, source, "feature-transformation")
            size = math.isqrt(int(mapped["linear.weight"].shape[0]))
            transform = control.FeatureTransform(n_tokens=n_tokens, dim=spec.dim,
                                                 channels=int(mapped["token_mix2.weight"].shape[0]), size=size)
            load_state_dict_strict(transform, mapped, "feature transformation", source=source)
            report.counts["feature_transform"] = len(parts["mapper"])
        else:
            size = int(base.unet.config.sample_size)
            transform = control.FeatureTransform(n_tokens=n_tokens, dim=spec.dim, channels=geometry["channels"],
                                                 size=size)
            report.fresh.append("feature transformation (zero output, as at the start of pre-training)")
        geometry["latent_size"] = size
        # High-level guiding network.
        if parts["hlgn"]:
            mapped = _rename(parts["hlgn"], HLGN_KEYS, source, "guiding-network")
            hidden = int(mapped["main.token_mix1.weight"].shape[0])
            semantic = model.SemanticNetwork(n_tokens=n_tokens, dim=spec.dim,
                                             context_tokens=geometry["context_tokens"],
                                             context_dim=geometry["context_dim"], hidden=hidden)
            load_state_dict_strict(semantic, mapped, "high-level guiding network", source=source)
            report.counts["semantic"] = len(parts["hlgn"])
        else:
            hidden = max(1, n_tokens // 2)
            semantic = model.SemanticNetwork(n_tokens=n_tokens, dim=spec.dim,
                                             context_tokens=geometry["context_tokens"],
                                             context_dim=geometry["context_dim"], hidden=hidden)
            report.fresh.append("high-level guiding network (random, auxiliary branch zero)")
    # The auxiliary branch is trained only by the fine-tuning class; a pre-trained file leaves its
    # zero convolution exactly zero.
    aux_active = bool(torch.count_nonzero(semantic.aux_zero.weight) or torch.count_nonzero(semantic.aux_zero.bias))

    # ControlNet: diffusers' converter, then drop the embedding it derives from input_hint_block.
    controlnet = control.build_controlnet(base.unet, transform, copy_weights=False)
    target = control.controlnet_state_without_embedding(controlnet)
    converted = _convert_strict(lambda s: sfu.convert_controlnet_checkpoint(s, unet_config), parts["controlnet"],
                                target.keys(), source, "ControlNet", drop_prefix="controlnet_cond_embedding.")
    load_state_dict_strict(controlnet, {k: converted[k].reshape(target[k].shape).float() for k in target},
                           "ControlNet", source=source, ignore_prefix="controlnet_cond_embedding.")
    report.counts["controlnet"] = len(parts["controlnet"])
    net = model.NeuroPictorNet(fmri.eval(), semantic, controlnet.float()).eval()
    return OfficialModel(source=source, state=obj, net=net, base=base, base_model=base_model, spec=spec,
                         geometry=geometry, semantic_hidden=hidden, aux_active=aux_active, report=report)


# ---------------------------------------------------------------------------- --check
def _functional_tokens(state: Mapping[str, torch.Tensor], x: torch.Tensor, heads: int, eps: float) -> torch.Tensor:
    """The official encoder computed straight from the file's tensors (timm's ViT computation)."""
    import torch.nn.functional as F

    w = state["patch_embed.proj.weight"].float()
    h = F.conv2d(x, w, state["patch_embed.proj.bias"].float(), stride=w.shape[-1]).flatten(2).transpose(1, 2)
    pos = state["pos_embed"].float()
    h = torch.cat([(state["cls_token"].float() + pos[:, :1]).expand(len(x), -1, -1), h + pos[:, 1:]], 1)
    depth = 1 + max(int(m.group(1)) for m in map(_BLOCK.match, state) if m)
    dim = h.shape[-1]
    for i in range(depth):
        p = {k[len(f"blocks.{i}."):]: v.float() for k, v in state.items() if k.startswith(f"blocks.{i}.")}
        y = F.layer_norm(h, (dim,), p["norm1.weight"], p["norm1.bias"], eps)
        B, N, _ = y.shape
        qkv = F.linear(y, p["attn.qkv.weight"], p["attn.qkv.bias"]).reshape(B, N, 3, heads, dim // heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        att = (q @ k.transpose(-2, -1) / math.sqrt(dim // heads)).softmax(-1)
        h = h + F.linear((att @ v).transpose(1, 2).reshape(B, N, dim), p["attn.proj.weight"], p["attn.proj.bias"])
        y = F.layer_norm(h, (dim,), p["norm2.weight"], p["norm2.bias"], eps)
        h = h + F.linear(F.gelu(F.linear(y, p["mlp.fc1.weight"], p["mlp.fc1.bias"])),
                         p["mlp.fc2.weight"], p["mlp.fc2.bias"])
    return F.layer_norm(h, (dim,), state["norm.weight"].float(), state["norm.bias"].float(), eps)


def check_import(decoder, state: Mapping[str, torch.Tensor], seed: int = 0) -> dict[str, float]:
    """Max |difference| on one fixed input between the imported modules and the file's tensors used directly.

    The encoder, guiding network and feature transformation are recomputed with plain torch
    functions on the file's tensors (official key names); the frozen UNet converted from the
    file is compared with base_model's on the ε of one denoising step with the imported
    ControlNet's residuals; the residuals' largest magnitude is reported beside them.
    """
    import torch.nn.functional as F

    net, base = decoder.net_, decoder._base()
    g = torch.Generator().manual_seed(seed)
    s = decoder.surface_size
    x = torch.randn(2, 1, s, s, generator=g)
    out: dict[str, float] = {}
    with torch.no_grad():
        tokens = net.fmri_encoder(x[:, 0])
        enc = {k[len(ENCODER_PREFIX):]: v for k, v in state.items() if k.startswith(ENCODER_PREFIX)}
        if enc:
            ref = _functional_tokens(enc, x, decoder.encoder_heads, decoder.encoder_eps)
            out["fmri encoder tokens"] = float((tokens - ref).abs().max())
        hl = {k[len(HLGN_PREFIX):]: v.float() for k, v in state.items() if k.startswith(HLGN_PREFIX)}
        context, main = net.semantic(tokens, use_aux=decoder.aux_active_)
        if hl:
            m = F.conv1d(F.conv1d(tokens, hl["channel_mapper.0.weight"], hl["channel_mapper.0.bias"]),
                         hl["channel_mapper.1.weight"], hl["channel_mapper.1.bias"])
            ref_main = F.layer_norm(F.linear(m, hl["dim_mapper.weight"], hl["dim_mapper.bias"]),
                                    (main.shape[-1],), hl["norm.weight"], hl["norm.bias"])
            a = F.conv1d(F.conv1d(tokens, hl["extra_clip.0.weight"], hl["extra_clip.0.bias"]),
                         hl["extra_clip.1.weight"], hl["extra_clip.1.bias"])
            a = F.layer_norm(F.linear(a, hl["extra_clip.2.weight"], hl["extra_clip.2.bias"]),
                             (main.shape[-1],), hl["extra_clip.3.weight"], hl["extra_clip.3.bias"])
            ref_ctx = ref_main + F.conv1d(a, hl["extra_clip_out.weight"], hl["extra_clip_out.bias"], padding=1)
            out["guiding network context"] = float((context - ref_ctx).abs().max())
            out["guiding network main branch"] = float((main - ref_main).abs().max())
        mp = {k[len(MAPPER_PREFIX):]: v.float() for k, v in state.items() if k.startswith(MAPPER_PREFIX)}
        if mp:
            h = F.conv1d(F.conv1d(tokens, mp["channel_mapper.0.weight"], mp["channel_mapper.0.bias"]),
                         mp["channel_mapper.1.weight"], mp["channel_mapper.1.bias"])
            h = F.conv1d(F.silu(F.linear(h, mp["dim_mapper.0.weight"], mp["dim_mapper.0.bias"])),
                         mp["out.weight"], mp["out.bias"], padding=1)
            got = net.feature_transform(tokens)
            out["feature transformation"] = float((got - h.reshape(got.shape)).abs().max())
        unet = base.unet
        dtype = next(unet.parameters()).dtype
        z = torch.randn(2, int(unet.config.in_channels), decoder.geometry_["latent_size"],
                        decoder.geometry_["latent_size"], generator=g)
        t = torch.tensor([500, 20])
        down, mid = net.controlnet(z, t, encoder_hidden_states=context, controlnet_cond=tokens,
                                   conditioning_scale=1.0, return_dict=False)
        out["ControlNet residuals (largest |value|)"] = float(max(d.abs().max() for d in [*down, mid]))
        eps = unet(z.to(dtype), t, encoder_hidden_states=context.to(dtype),
                   down_block_additional_residuals=[d.to(dtype) for d in down],
                   mid_block_additional_residual=mid.to(dtype)).sample.float()
        unet_state = {k: v for k, v in state.items() if k.startswith(UNET_PREFIX)}
        if unet_state:
            from diffusers import UNet2DConditionModel
            from diffusers.loaders import single_file_utils as sfu

            converted = sfu.convert_ldm_unet_checkpoint(unet_state, dict(unet.config))
            file_unet = UNet2DConditionModel.from_config(unet.config)
            file_unet.load_state_dict(converted, strict=True)
            file_unet.eval()
            eps_file = file_unet(z, t, encoder_hidden_states=context, down_block_additional_residuals=down,
                                 mid_block_additional_residual=mid).sample.float()
            out["eps: file UNet vs base_model UNet"] = float((eps - eps_file).abs().max())
        out["eps (largest |value|)"] = float(eps.abs().max())
    return out


__all__ = ["EncoderSpec", "ImportReport", "OfficialFileError", "OfficialModel", "autoencoder_head_from_state",
           "check_import", "convert_official_checkpoint", "encoder_from_state", "infer_encoder_spec",
           "load_official_encoder", "read_encoder_config", "split_official_checkpoint", "torch_load_weights_only"]
