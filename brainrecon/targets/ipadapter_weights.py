"""Where the IP-Adapter Plus weights are, and reading them: the lookup of the checkpoint and
its CLIP image encoder (:class:`IPAdapterWeights`: a local directory, the Hugging Face hub
cache, or a download when downloads are allowed), and the checkpoint reader and converter
that build diffusers' image projection from it. The target space that uses them is
:mod:`brainrecon.targets.ipadapter`.

Looked for, in order, in a local copy of the ``h94/IP-Adapter`` repository
(``ipadapter_dir``; ``--ipadapter-dir``), else in the Hugging Face hub cache, else downloaded
from the hub when downloads are allowed::

    <ipadapter_dir>/models/ip-adapter-plus_sd15.safetensors   (or .bin)
    <ipadapter_dir>/models/image_encoder/config.json
    <ipadapter_dir>/models/image_encoder/model.safetensors    (or pytorch_model.bin)

(the files may also sit directly in ``<ipadapter_dir>``, without ``models/``).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from brainrecon.devices import resolve_device as _resolve_torch_device
from brainrecon.errors import BrainreconError, DataError, WeightsNotFoundError
from brainrecon.hub import downloads_allowed, hf_hub_cache
from brainrecon.targets.cache import default_cache_root

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = [
    "ADAPTER_SUBFOLDER",
    "DEFAULT_REPO_ID",
    "DEFAULT_WEIGHT_NAMES",
    "ENCODER_SUBFOLDER",
    "ENCODER_WEIGHT_NAMES",
    "UNCOND_FILENAME",
    "IPAdapterWeights",
    "load_image_projection",
    "projection_from_state_dict",
    "read_ipadapter_checkpoint",
    "resolve_device",
    "resolve_dtype",
]

DEFAULT_REPO_ID = "h94/IP-Adapter"
ADAPTER_SUBFOLDER = "models"
ENCODER_SUBFOLDER = "models/image_encoder"
#: Tried in this order when no weight name is given (same weights; safetensors needs no pickle).
DEFAULT_WEIGHT_NAMES = ("ip-adapter-plus_sd15.safetensors", "ip-adapter-plus_sd15.bin")
ENCODER_WEIGHT_NAMES = ("model.safetensors", "pytorch_model.bin")
UNCOND_FILENAME = "uncond_tokens.safetensors"


# ---------------------------------------------------------------------------- devices
def resolve_device(device: str | None = "auto") -> str:
    """``"auto"`` -> ``"cuda"`` when a CUDA device is visible, else ``"cpu"`` (as a string)."""
    return str(_resolve_torch_device(device))


def resolve_dtype(dtype: Any, device: str) -> "torch.dtype":
    """None -> fp16 on CUDA, fp32 elsewhere; strings ``"float16"``, ``"bfloat16"``, ``"float32"``."""
    import torch

    if dtype is None:
        return torch.float16 if device.startswith("cuda") else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float32": torch.float32, "fp32": torch.float32, "float": torch.float32}
    if str(dtype) not in names:
        raise BrainreconError(f"Unknown dtype {dtype!r}; valid: 'float16', 'bfloat16', 'float32'.")
    return names[str(dtype)]


# ---------------------------------------------------------------------------- checkpoint
def read_ipadapter_checkpoint(path: str | os.PathLike) -> dict[str, dict[str, "torch.Tensor"]]:
    """Read an IP-Adapter checkpoint into ``{"image_proj": {...}, "ip_adapter": {...}}``.

    Parameters
    ----------
    path : path-like
        ``.safetensors`` (keys prefixed ``image_proj.`` / ``ip_adapter.``) or ``.bin`` (a
        torch file holding a dict with ``image_proj`` and ``ip_adapter``; read with
        ``weights_only=True``, so no code in it runs).

    Returns
    -------
    dict
        Two state dicts of CPU tensors.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise WeightsNotFoundError(f"IP-Adapter checkpoint {path} does not exist.")
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        out: dict[str, dict[str, torch.Tensor]] = {"image_proj": {}, "ip_adapter": {}}
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for key in f.keys():
                group, _, rest = key.partition(".")
                if group in out and rest:
                    out[group][rest] = f.get_tensor(key)
    else:
        try:
            raw = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unreadable file gets one message
            raise DataError(f"Cannot read IP-Adapter checkpoint {path}: {exc}") from exc
        if not isinstance(raw, dict):
            raise DataError(f"{path} holds a {type(raw).__name__}, not an IP-Adapter state dict.")
        out = {k: dict(raw[k]) for k in ("image_proj", "ip_adapter") if isinstance(raw.get(k), dict)}
    if not out.get("image_proj") or not out.get("ip_adapter"):
        raise DataError(
            f"{path} is not an IP-Adapter checkpoint: it needs 'image_proj' and 'ip_adapter' weights "
            f"(found groups: {sorted(k for k, v in out.items() if v)})."
        )
    if "latents" not in out["image_proj"]:
        raise DataError(
            f"{path} is not an IP-Adapter *Plus* checkpoint (its image projection has no 'latents'); "
            f"brainrecon's target is ip-adapter-plus_sd15 (16 tokens), not the 4-token ip-adapter_sd15."
        )
    return out


def _layer_indices(state: dict[str, Any]) -> list[int]:
    idx = {int(k.split(".")[1]) for k in state if k.startswith("layers.")}
    return sorted(idx)


def projection_from_state_dict(image_proj: dict[str, "torch.Tensor"], dim_head: int = 64):
    """Build diffusers' ``IPAdapterPlusImageProjection`` from a Resampler state dict.

    Sizes are read from the weights: input width (``proj_in``), latent width and number of
    queries (``latents``), output width (``proj_out``), depth (number of ``layers.i``), heads
    (rows of ``to_q`` / ``dim_head``) and the feed-forward ratio. Keys are renamed to
    diffusers' layout (``norm1`` -> ``ln0``, ``norm2`` -> ``ln1``, ``to_kv`` split into
    ``to_k`` / ``to_v``, ``to_out`` -> ``attn.to_out.0``, feed-forward ``1.0`` / ``1.1`` /
    ``1.3`` -> ``ff.0`` / ``ff.1.net.0.proj`` / ``ff.1.net.2``) and loaded strictly.

    Parameters
    ----------
    image_proj : dict of str to Tensor
        The ``image_proj`` part of an IP-Adapter Plus checkpoint (tencent key names).
    dim_head : int
        Width of one attention head (64 in every released IP-Adapter Plus model).

    Returns
    -------
    torch.nn.Module
        Maps (B, n_patches, embed_dim) to (B, num_queries, output_dim), float32, eval mode.
    """
    from diffusers.models.embeddings import IPAdapterPlusImageProjection

    sd = image_proj
    try:
        hidden, embed = sd["proj_in.weight"].shape
        num_queries = sd["latents"].shape[1]
        output = sd["proj_out.weight"].shape[0]
        layers = _layer_indices(sd)
        inner = sd["layers.0.0.to_q.weight"].shape[0]
        ff_inner = sd["layers.0.1.1.weight"].shape[0]
    except KeyError as exc:
        raise DataError(f"IP-Adapter Plus image projection weights lack {exc.args[0]!r}.") from None
    if layers != list(range(len(layers))) or inner % dim_head or ff_inner % hidden:
        raise DataError(
            f"Unexpected IP-Adapter Plus projection shapes: layers {layers}, attention width {inner} "
            f"(dim_head {dim_head}), feed-forward width {ff_inner} for latent width {hidden}."
        )
    module = IPAdapterPlusImageProjection(
        embed_dims=int(embed), output_dims=int(output), hidden_dims=int(hidden), depth=len(layers),
        dim_head=int(dim_head), heads=int(inner // dim_head), num_queries=int(num_queries),
        ffn_ratio=ff_inner // hidden,
    )
    converted: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if not key.startswith("layers."):
            converted[key] = value
            continue
        _, i, sub, rest = key.split(".", 3)
        p = f"layers.{i}."
        if sub == "0":
            if rest == "to_kv.weight":
                k, v = value.chunk(2, dim=0)
                converted[p + "attn.to_k.weight"] = k
                converted[p + "attn.to_v.weight"] = v
                continue
            mapping = {"norm1": "ln0", "norm2": "ln1", "to_q": "attn.to_q", "to_out": "attn.to_out.0"}
            name, _, param = rest.partition(".")
            if name not in mapping:
                raise DataError(f"Unexpected key {key!r} in the IP-Adapter Plus image projection.")
            converted[p + mapping[name] + "." + param] = value
        else:
            mapping = {"0": "ff.0", "1": "ff.1.net.0.proj", "3": "ff.1.net.2"}
            name, _, param = rest.partition(".")
            if name not in mapping:
                raise DataError(f"Unexpected key {key!r} in the IP-Adapter Plus image projection.")
            converted[p + mapping[name] + "." + param] = value
    try:
        module.load_state_dict({k: v.float() for k, v in converted.items()}, strict=True)
    except RuntimeError as exc:
        raise DataError(f"IP-Adapter Plus projection weights do not fit the Resampler: {exc}") from exc
    return module.float().eval()


def load_image_projection(path: str | os.PathLike, dim_head: int = 64):
    """The IP-Adapter Plus image projection (Resampler) of a checkpoint file, as a module.

    Parameters
    ----------
    path : path-like
        ``ip-adapter-plus_sd15.bin`` or ``.safetensors``.
    dim_head : int
        Attention head width (64 for released models).

    Returns
    -------
    torch.nn.Module
        Maps CLIP hidden states of shape (B, 257, 1280) to tokens of shape (B, 16, 768) for
        the SD 1.5 Plus model; computes what the reference Resampler computes with the same
        weights (float32, eval mode, on the CPU).
    """
    return projection_from_state_dict(read_ipadapter_checkpoint(path)["image_proj"], dim_head=dim_head)


# ---------------------------------------------------------------------------- weights
@dataclass(frozen=True)
class IPAdapterWeights:
    """Where the IP-Adapter Plus checkpoint and its image encoder are.

    Parameters
    ----------
    repo_id : str
        Hugging Face repository (default ``h94/IP-Adapter``), used when ``local_dir`` is None.
    local_dir : path-like, optional
        A local copy of that repository (``models/...`` inside it, or the files directly).
        With a local directory nothing is downloaded.
    weight_name : str, optional
        Checkpoint file name; default ``ip-adapter-plus_sd15.safetensors``, then ``.bin``.
    revision : str, optional
        Hub revision (a commit hash pins the weights).
    """

    repo_id: str = DEFAULT_REPO_ID
    local_dir: str | None = None
    weight_name: str | None = None
    revision: str | None = None

    def __post_init__(self):
        if self.local_dir is not None:
            object.__setattr__(self, "local_dir", str(Path(self.local_dir).expanduser().resolve()))

    @property
    def weight_names(self) -> tuple[str, ...]:
        return (self.weight_name,) if self.weight_name else DEFAULT_WEIGHT_NAMES

    @property
    def source(self) -> str:
        """The local directory, or the repo id (with its revision)."""
        if self.local_dir is not None:
            return self.local_dir
        return self.repo_id + (f"@{self.revision}" if self.revision else "")

    # -------------------------------------------------------------- where files are looked for
    def _adapter_candidates(self) -> list[Path]:
        root = Path(self.local_dir)
        return [folder / name for name in self.weight_names for folder in (root / ADAPTER_SUBFOLDER, root)]

    def _missing(self, what: str, tried: Sequence[str], reason: str) -> WeightsNotFoundError:
        files = " ".join(
            [f"{ADAPTER_SUBFOLDER}/{self.weight_names[0]}", f"{ENCODER_SUBFOLDER}/config.json",
             f"{ENCODER_SUBFOLDER}/{ENCODER_WEIGHT_NAMES[0]}"]
        )
        return WeightsNotFoundError(
            f"IP-Adapter weights not found: {what} ({reason}). Looked in: {'; '.join(map(str, tried))}. "
            f"To fix: `huggingface-cli download {self.repo_id} {files} --local-dir DIR` and pass "
            f"DIR as ipadapter_dir, or fetch them with "
            f"`brainrecon weights --download --with ipadapter` (downloads are opt-in: BRAINRECON_ALLOW_DOWNLOADS=1).",
            parameters=("ipadapter_dir",)
        )

    def _hub_file(self, filename: str, subfolder: str, tried: list[str]) -> Path | None:
        """A file of the repo from the hub cache (never the network), or None."""
        from huggingface_hub import hf_hub_download

        cache = hf_hub_cache()
        tried.append(f"{cache}/models--{self.repo_id.replace('/', '--')}/.../{subfolder}/{filename}")
        try:
            return Path(hf_hub_download(self.repo_id, filename, subfolder=subfolder, revision=self.revision,
                                        cache_dir=str(cache), local_files_only=True))
        except Exception:  # noqa: BLE001 - not cached (or a broken cache entry): try the next place
            return None

    def _download(self, filename: str, subfolder: str, what: str, tried: list[str]) -> Path:
        from huggingface_hub import hf_hub_download

        if not downloads_allowed():
            raise self._missing(what, tried, "offline: downloads are disabled")
        try:
            return Path(hf_hub_download(self.repo_id, filename, subfolder=subfolder, revision=self.revision,
                                        cache_dir=str(hf_hub_cache())))
        except Exception as exc:  # noqa: BLE001 - any network failure becomes one actionable message
            raise self._missing(what, tried, f"download failed: {exc}") from exc

    def adapter_file(self, download: bool = True) -> Path:
        """Path of the checkpoint (``ip-adapter-plus_sd15.safetensors`` or ``.bin``)."""
        tried: list[str] = []
        if self.local_dir is not None:
            for p in self._adapter_candidates():
                tried.append(str(p))
                if p.is_file():
                    return p
            raise self._missing(f"checkpoint {' or '.join(self.weight_names)}", tried, "not in ipadapter_dir")
        for name in self.weight_names:
            found = self._hub_file(name, ADAPTER_SUBFOLDER, tried)
            if found is not None:
                return found
        if not download:
            raise self._missing(f"checkpoint {' or '.join(self.weight_names)}", tried, "not downloaded")
        return self._download(self.weight_names[0], ADAPTER_SUBFOLDER, f"checkpoint {self.weight_names[0]}", tried)

    def encoder_dir(self, download: bool = True) -> Path:
        """A folder holding the image encoder's ``config.json`` and weights."""
        tried: list[str] = []
        what = f"image encoder ({ENCODER_SUBFOLDER}/config.json + {' or '.join(ENCODER_WEIGHT_NAMES)})"
        if self.local_dir is not None:
            root = Path(self.local_dir)
            for folder in (root / ENCODER_SUBFOLDER, root / "image_encoder"):
                tried.append(str(folder))
                if (folder / "config.json").is_file() and any((folder / n).is_file() for n in ENCODER_WEIGHT_NAMES):
                    return folder
            raise self._missing(what, tried, "not in ipadapter_dir")
        config = self._hub_file("config.json", ENCODER_SUBFOLDER, tried)
        if config is not None:
            for name in ENCODER_WEIGHT_NAMES:
                if self._hub_file(name, ENCODER_SUBFOLDER, tried) is not None:
                    return config.parent
        if not download:
            raise self._missing(what, tried, "not downloaded")
        config = self._download("config.json", ENCODER_SUBFOLDER, what, tried)
        self._download(ENCODER_WEIGHT_NAMES[0], ENCODER_SUBFOLDER, what, tried)
        return config.parent

    def token_shape(self) -> tuple[int, int] | None:
        """(num_queries, output_dim) of the checkpoint when it is present locally, else None."""
        try:
            path = self.adapter_file(download=False)
        except WeightsNotFoundError:
            return None
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt", device="cpu") as f:
                keys = set(f.keys())
                if {"image_proj.latents", "image_proj.proj_out.weight"} <= keys:
                    return (int(f.get_slice("image_proj.latents").get_shape()[1]),
                            int(f.get_slice("image_proj.proj_out.weight").get_shape()[0]))
        sd = read_ipadapter_checkpoint(path)["image_proj"]
        return (int(sd["latents"].shape[1]), int(sd["proj_out.weight"].shape[0]))

    def check(self) -> None:
        """Raise :class:`WeightsNotFoundError` unless both files can be found (or fetched)."""
        self.adapter_file()
        self.encoder_dir()

    def key(self) -> str:
        """A short hash identifying the exact files (path, size, modification time)."""
        parts = []
        enc = self.encoder_dir()
        enc_file = next(enc / n for n in ENCODER_WEIGHT_NAMES if (enc / n).is_file())
        for p in (self.adapter_file(), enc_file):
            real = Path(os.path.realpath(p))
            st = real.stat()
            parts.append([str(real), st.st_size, st.st_mtime_ns])
        return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]

    # -------------------------------------------------------------- loading
    def state_dict(self) -> dict[str, dict[str, "torch.Tensor"]]:
        """``{"image_proj": ..., "ip_adapter": ...}`` of the checkpoint."""
        return read_ipadapter_checkpoint(self.adapter_file())

    def image_encoder(self, device: str = "cpu", dtype=None):
        """The CLIP vision model (``CLIPVisionModelWithProjection``), eval mode, on ``device``."""
        from transformers import CLIPVisionModelWithProjection

        folder = self.encoder_dir()
        torch_dtype = resolve_dtype(dtype, device)
        kwargs: dict[str, Any] = {"local_files_only": True, _dtype_kwarg(): torch_dtype}
        if device.startswith("cuda"):
            kwargs["attn_implementation"] = "sdpa"
        try:
            model = CLIPVisionModelWithProjection.from_pretrained(str(folder), **kwargs)
        except OSError as exc:
            raise WeightsNotFoundError(f"Cannot load the IP-Adapter image encoder from {folder}: {exc}") from exc
        return model.to(device).eval()

    def uncond_path(self) -> Path:
        return default_cache_root() / "ipadapter" / self.key() / UNCOND_FILENAME


def _dtype_kwarg() -> str:
    # transformers renamed ``torch_dtype`` to ``dtype`` in 4.56.
    import transformers
    from packaging.version import Version

    return "dtype" if Version(transformers.__version__) >= Version("4.56.0") else "torch_dtype"
