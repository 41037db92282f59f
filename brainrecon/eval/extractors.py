"""Feature networks for the six network-based metrics, built from local weight files.

A :class:`FeatureNetwork` wraps one ``torch.nn.Module`` and the metrics it serves:
AlexNet gives both ``AlexNet(2)`` (``features.4``) and ``AlexNet(5)``
(``features.11``) in one forward pass; Inception v3, EfficientNet-B1 and the SwAV
ResNet-50 give their ``avgpool`` output; CLIP ViT-L/14 gives its 768-d projected
image embedding. Calling a network on a preprocessed batch returns
``{metric: float32 tensor of shape (batch, n_features)}`` (feature maps flattened,
never pooled further).

The harness does the resizing and normalisation; a network only maps pixels to
features. Tests replace these networks with tiny random ones through the
``extractors`` argument of :func:`brainrecon.eval.evaluate`.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Callable, Mapping

import torch
from torch import nn

from brainrecon.errors import WeightsNotFoundError
from brainrecon.eval.weights import OPENAI_CLIP_FILENAME, WEIGHT_FILES, WeightFile, file_digest, resolve_weights

__all__ = [
    "NETWORK_METRICS",
    "FeatureNetwork",
    "build_network",
    "network_weight_file",
    "wrap_extractor",
]

# Which metrics each standard network serves (one forward pass per network).
NETWORK_METRICS: dict[str, tuple[str, ...]] = {
    "alexnet": ("AlexNet(2)", "AlexNet(5)"),
    "inception": ("Inception",),
    "clip": ("CLIP",),
    "effnet": ("EffNet-B",),
    "swav": ("SwAV",),
}

# ViT-L/14 as in openai/clip-vit-large-patch14, for building it without any download.
CLIP_VIT_L14 = dict(
    hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
    image_size=224, patch_size=14, projection_dim=768, hidden_act="quick_gelu", layer_norm_eps=1e-5,
)


class FeatureNetwork:
    """A feature network and the metrics it computes.

    Parameters
    ----------
    name : str
        ``"alexnet"``, ``"inception"``, ``"clip"``, ``"effnet"``, ``"swav"``, or
        ``"injected:<metric>"`` for a user-supplied extractor.
    metrics : tuple of str
        Metric names produced by one call.
    module : callable
        Maps a float32 batch of shape (B, 3, S, S) to ``{metric: tensor (B, ...)}``.
    cache_key : str or None
        Identifies the weights exactly; ground-truth features are cached on disk only
        when it is set (random or injected networks are never cached).
    source : str
        Human-readable origin of the weights, recorded in the report.
    """

    def __init__(self, name: str, metrics: tuple[str, ...], module: Callable, cache_key: str | None, source: str):
        self.name = name
        self.metrics = tuple(metrics)
        self.module = module
        self.cache_key = cache_key
        self.source = source

    def to(self, device) -> "FeatureNetwork":
        if isinstance(self.module, nn.Module):
            self.module = self.module.to(device).eval()
        return self

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.module(x)
        if not isinstance(out, Mapping):
            if len(self.metrics) != 1:
                raise TypeError(f"network {self.name} must return a dict with keys {self.metrics}")
            out = {self.metrics[0]: out}
        return {m: out[m].reshape(out[m].shape[0], -1).float() for m in self.metrics}

    def __repr__(self) -> str:
        return f"FeatureNetwork({self.name!r}, metrics={self.metrics}, source={self.source!r})"


class _SingleOutput(nn.Module):
    """Adapts a user's ``callable(x) -> tensor`` to the ``{metric: tensor}`` protocol."""

    def __init__(self, fn: Callable, metric: str):
        super().__init__()
        self.fn = fn
        self.metric = metric

    def forward(self, x):
        return {self.metric: self.fn(x)}


def wrap_extractor(metric: str, extractor) -> FeatureNetwork:
    """Turn an injected extractor into a :class:`FeatureNetwork` for one metric.

    Parameters
    ----------
    metric : str
        The metric it replaces.
    extractor : FeatureNetwork, nn.Module or callable
        ``extractor(x)`` with x of shape (B, 3, S, S) returns a tensor of shape (B, ...).
        An optional ``cache_key`` attribute enables ground-truth feature caching.

    Returns
    -------
    FeatureNetwork
    """
    if isinstance(extractor, FeatureNetwork):
        return extractor
    if isinstance(extractor, nn.Module):
        extractor.eval()
    return FeatureNetwork(
        f"injected:{metric}",
        (metric,),
        _SingleOutput(extractor, metric) if isinstance(extractor, nn.Module) else (lambda x: {metric: extractor(x)}),
        getattr(extractor, "cache_key", None),
        f"injected {type(extractor).__name__}",
    )


class _NodeFeatures(nn.Module):
    """Outputs of named nodes of a torchvision model, keyed by metric name."""

    def __init__(self, model: nn.Module, nodes: dict[str, str]):
        super().__init__()
        from torchvision.models.feature_extraction import create_feature_extractor

        with warnings.catch_warnings():
            # Inception's eval graph is a subsequence of its train graph; harmless here.
            warnings.filterwarnings("ignore", message=".*subsequence.*", category=UserWarning)
            self.body = create_feature_extractor(model.eval(), return_nodes=nodes)

    def forward(self, x):
        return self.body(x)


class _ClipImageEmbeds(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return {"CLIP": self.model(pixel_values=x).image_embeds}


def network_weight_file(name: str, variant: str) -> WeightFile:
    """The weight file a standard network uses in a variant.

    Parameters
    ----------
    name : {"alexnet", "inception", "clip", "effnet", "swav"}
    variant : {"mindeye", "braindiffuser"}
        Only EfficientNet-B1 differs: ImageNet V2 weights for MindEye, V1 for Brain-Diffuser.

    Returns
    -------
    WeightFile
    """
    if name == "effnet":
        return WEIGHT_FILES["effnet_v2" if variant == "mindeye" else "effnet_v1"]
    return WEIGHT_FILES[name]


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    # weights_only: tensors and containers only, no arbitrary code from a .pth file.
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    return obj


def _load_exact(model: nn.Module, state: dict, path) -> None:
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise WeightsNotFoundError(
            f"{path} does not fit the expected architecture ({str(exc).splitlines()[0]}). "
            "Check that it is the file named in `brainrecon weights`."
        ) from exc


def _swav_backbone_state(state: dict) -> dict:
    """The ResNet-50 part of a SwAV checkpoint: drop the DataParallel prefix and SwAV's heads."""
    out = {}
    for k, v in state.items():
        k = k[len("module."):] if k.startswith("module.") else k
        if k.startswith(("projection_head.", "prototypes.")):
            continue
        out[k] = v
    return out


def _build_torchvision(name: str, variant: str, path: Path | None) -> nn.Module:
    import torchvision.models as tvm

    if name == "alexnet":
        model = tvm.alexnet(weights=None)
        nodes = {"features.4": "AlexNet(2)", "features.11": "AlexNet(5)"}
    elif name == "inception":
        # As torchvision does for IMAGENET1K_V1: aux head present (so the file loads
        # exactly) and transform_input=True (the Google weights expect (x-0.5)/0.5).
        model = tvm.inception_v3(weights=None, aux_logits=True, transform_input=True, init_weights=path is None)
        nodes = {"avgpool": "Inception"}
    elif name == "effnet":
        model = tvm.efficientnet_b1(weights=None)
        nodes = {"avgpool": "EffNet-B"}
    elif name == "swav":
        model = tvm.resnet50(weights=None)
        model.fc = nn.Identity()  # SwAV ships no classifier; the metric reads avgpool
        nodes = {"avgpool": "SwAV"}
    else:
        raise ValueError(f"unknown torchvision network {name!r}")
    if path is not None:
        state = _read_state_dict(path)
        if name == "swav":
            state = _swav_backbone_state(state)
        _load_exact(model, state, path)
    if name == "inception":
        model.aux_logits = False
        model.AuxLogits = None
    return _NodeFeatures(model, nodes)


def _load_clip(where, local_only: bool) -> nn.Module:
    import transformers
    from transformers import AutoConfig, CLIPConfig, CLIPVisionModelWithProjection

    verbosity = transformers.logging.get_verbosity()
    # The repo holds the whole CLIP model; its text-tower keys are expected leftovers,
    # so silence the per-key report (a size mismatch still raises).
    transformers.logging.set_verbosity_error()
    from brainrecon.hub import hub_offline_unless_allowed

    try:
        with hub_offline_unless_allowed():
            cfg = AutoConfig.from_pretrained(where, local_files_only=local_only)
        if isinstance(cfg, CLIPConfig):
            vision_cfg = cfg.vision_config
            vision_cfg.projection_dim = cfg.projection_dim
        else:
            vision_cfg = cfg
        with hub_offline_unless_allowed():
            model = CLIPVisionModelWithProjection.from_pretrained(
                where, config=vision_cfg, local_files_only=local_only, dtype=torch.float32
            )
    finally:
        transformers.logging.set_verbosity(verbosity)
    return model.eval()




def _read_openai_clip_state(path: Path) -> dict[str, torch.Tensor]:
    """The state dict of OpenAI's CLIP file: a TorchScript archive as ``clip.load`` fetches it
    (read with ``torch.jit.load``, which restores tensors and TorchScript code but runs none),
    or a plain state dict (read with ``weights_only=True``)."""
    try:
        return dict(torch.jit.load(str(path), map_location="cpu").state_dict())
    except RuntimeError:
        pass
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - unpickling errors of many kinds
        raise WeightsNotFoundError(
            f"{path} is neither a TorchScript CLIP archive nor a plain state dict ({exc}). "
            f"Use OpenAI's {OPENAI_CLIP_FILENAME} as `clip.load('ViT-L/14')` downloads it."
        ) from exc
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise WeightsNotFoundError(f"{path} does not hold a CLIP state dict.")
    return obj


def _openai_clip_to_hf(state: Mapping[str, torch.Tensor], path) -> tuple[dict, dict[str, torch.Tensor]]:
    """Map OpenAI CLIP's image tower onto ``CLIPVisionModelWithProjection``: its config (every
    size read from the tensors; heads = width / 64 and QuickGELU, as OpenAI's ``build_model``)
    and its state dict. The text tower is not needed for the metric and is left out."""
    v = {k[len("visual."):]: t for k, t in state.items() if k.startswith("visual.")}
    need = ("conv1.weight", "class_embedding", "positional_embedding", "ln_pre.weight", "ln_post.weight", "proj")
    missing = [k for k in need if k not in v]
    if missing:
        raise WeightsNotFoundError(
            f"{path} has no OpenAI CLIP image tower (missing visual.{missing[0]}); "
            f"use OpenAI's {OPENAI_CLIP_FILENAME} or the Hugging Face folder."
        )
    width, _, patch, _ = v["conv1.weight"].shape
    n_pos = v["positional_embedding"].shape[0]
    grid = int(round((n_pos - 1) ** 0.5))
    if grid * grid + 1 != n_pos:
        raise WeightsNotFoundError(f"{path}: visual.positional_embedding has {n_pos} rows, not a square grid + 1.")
    layers = 1 + max(int(k.split(".")[2]) for k in v if k.startswith("transformer.resblocks."))
    config = dict(
        hidden_size=int(width), intermediate_size=int(v["transformer.resblocks.0.mlp.c_fc.weight"].shape[0]),
        num_hidden_layers=layers, num_attention_heads=int(width) // 64 or 1, image_size=int(patch * grid),
        patch_size=int(patch), projection_dim=int(v["proj"].shape[1]), hidden_act="quick_gelu", layer_norm_eps=1e-5,
    )
    f32 = {k: t.to(torch.float32) for k, t in v.items()}  # OpenAI stores fp16
    out = {
        "vision_model.embeddings.class_embedding": f32["class_embedding"],
        "vision_model.embeddings.patch_embedding.weight": f32["conv1.weight"],
        "vision_model.embeddings.position_embedding.weight": f32["positional_embedding"],
        "vision_model.pre_layrnorm.weight": f32["ln_pre.weight"],
        "vision_model.pre_layrnorm.bias": f32["ln_pre.bias"],
        "vision_model.post_layernorm.weight": f32["ln_post.weight"],
        "vision_model.post_layernorm.bias": f32["ln_post.bias"],
        "visual_projection.weight": f32["proj"].T.contiguous(),
    }
    pairs = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
             "attn.out_proj": "self_attn.out_proj"}
    for i in range(layers):
        src, dst = f"transformer.resblocks.{i}.", f"vision_model.encoder.layers.{i}."
        for a, b in pairs.items():
            for p in ("weight", "bias"):
                out[f"{dst}{b}.{p}"] = f32[f"{src}{a}.{p}"]
        for p in ("weight", "bias"):
            for name, part in zip(("q_proj", "k_proj", "v_proj"), f32[f"{src}attn.in_proj_{p}"].chunk(3, dim=0)):
                out[f"{dst}self_attn.{name}.{p}"] = part.contiguous()
    return config, out


def _load_openai_clip(path: Path) -> nn.Module:
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    config, state = _openai_clip_to_hf(_read_openai_clip_state(path), path)
    model = CLIPVisionModelWithProjection(CLIPVisionConfig(**config))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise WeightsNotFoundError(
            f"{path} does not map exactly onto CLIP's image tower (missing {missing[:3]}, unexpected "
            f"{unexpected[:3]}); use OpenAI's {OPENAI_CLIP_FILENAME}."
        )
    return model.eval()


def _random_clip(config: dict | None = None) -> nn.Module:
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    return CLIPVisionModelWithProjection(CLIPVisionConfig(**(config or CLIP_VIT_L14))).eval()


def _clip_cache_key(path) -> str:
    """Identity of a CLIP folder's weights: content hashes of its config and of the weight
    file ``from_pretrained`` loads (safetensors first, as transformers does)."""
    path = Path(path)
    weights = next(p for p in (path / "model.safetensors", path / "pytorch_model.bin") if p.exists())
    return f"clip:config-sha256:{file_digest(path / 'config.json')}:{weights.name}-sha256:{file_digest(weights)}"


def _file_cache_key(path, filename: str) -> str:
    """Identity of a single weight file: its name, its content hash and torchvision's version
    (the architecture that reads it)."""
    import torchvision

    return f"{filename}:sha256:{file_digest(path)}:torchvision-{torchvision.__version__}"


def build_network(
    name: str,
    variant: str = "mindeye",
    *,
    weights_dir=None,
    allow_download: bool | None = None,
    random_init: bool = False,
) -> FeatureNetwork:
    """Build one standard feature network.

    Parameters
    ----------
    name : {"alexnet", "inception", "clip", "effnet", "swav"}
    variant : {"mindeye", "braindiffuser"}
        Chooses the EfficientNet-B1 weights.
    weights_dir : path-like, optional
        Searched before the caches (see :mod:`brainrecon.eval.weights`).
    allow_download : bool, optional
        Default: :func:`brainrecon.eval.weights.downloads_allowed`.
    random_init : bool
        Full-size network with random weights and no file access (benchmarks, tests);
        never cached.

    Returns
    -------
    FeatureNetwork

    Raises
    ------
    WeightsNotFoundError
        When the weights are neither local nor downloadable; the message names the
        file, the places searched and the URL.
    """
    if name not in NETWORK_METRICS:
        raise ValueError(f"Unknown network {name!r}. Valid: {', '.join(map(repr, NETWORK_METRICS))}.")
    metrics = NETWORK_METRICS[name]
    wf = network_weight_file(name, variant)
    if random_init:
        module = _random_clip() if name == "clip" else _build_torchvision(name, variant, None)
        if name == "clip":
            module = _ClipImageEmbeds(module)
        return FeatureNetwork(name, metrics, module, None, "random initialisation")
    where = resolve_weights(wf, weights_dir, allow_download)
    if name == "clip" and isinstance(where, Path) and where.is_file():
        model = _load_openai_clip(where)
        key = f"clip-openai:{where.name}-sha256:{file_digest(where)}"
        return FeatureNetwork(name, metrics, _ClipImageEmbeds(model), key, f"{where} (OpenAI TorchScript, as fp32)")
    if name == "clip":
        local = not isinstance(where, str)
        try:
            model = _load_clip(where, local_only=local)
        except OSError as exc:  # transformers' "couldn't connect" / missing file
            if local:
                raise WeightsNotFoundError(f"Could not load CLIP from {where}: {exc}") from exc
            from brainrecon.eval.weights import _missing_error

            raise _missing_error(wf, weights_dir, f"download failed: {exc}") from exc
        if not local:
            from brainrecon.eval.weights import find_weights

            where = find_weights(wf) or where
        key = _clip_cache_key(where) if not isinstance(where, str) else None
        return FeatureNetwork(name, metrics, _ClipImageEmbeds(model), key, str(where))
    module = _build_torchvision(name, variant, Path(where))
    return FeatureNetwork(name, metrics, module, _file_cache_key(where, wf.filename), str(where))
