"""IP-Adapter Plus (SD 1.5) image-prompt tokens as a target space.

A stimulus image becomes 16 tokens of width 768: the CLIP ViT-H/14 image encoder's
penultimate hidden states (257 × 1280, ``hidden_states[-2]``) go through the IP-Adapter Plus
image projection (a Perceiver "Resampler"), whose output Stable Diffusion 1.5 reads through
IP-Adapter's decoupled cross-attention (Ye et al. 2023, tencent-ailab/IP-Adapter). Decoders regress these
tokens; :mod:`brainrecon.generate` turns predicted tokens back into images.

Weights
-------
The checkpoint and its image encoder come from a local copy of ``h94/IP-Adapter``
(``ipadapter_dir``; ``--ipadapter-dir``), else the Hugging Face hub: where they are looked
for, and how they are read, is :mod:`brainrecon.targets.ipadapter_weights`.

Caches
------
Tokens are stored in fp16 in an :class:`~brainrecon.targets.cache.IdKeyedCache` keyed by
image id (73k × 16 × 768 × 2 bytes = 1.8 GB for all NSD stimuli), memory-mapped and
resumable. The unconditional tokens (the projection of the encoder's output for an all-zero
normalised image, i.e. a mean-grey image) are computed once per pair of weight files and
kept in ``$BRAINRECON_CACHE/ipadapter/<weights key>/uncond_tokens.safetensors``; a copy is
written next to every token cache that :func:`embed_dataset` / :func:`embed_images` fills.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from brainrecon.errors import BrainreconError, DataError
from brainrecon.io import atomic_path
from brainrecon.progress import bar_disabled
from brainrecon.targets import TargetSpace
from brainrecon.targets.cache import IdKeyedCache
from brainrecon.targets.clip import CLIP_MEAN, CLIP_STD
# The weight lookup and checkpoint reading live in ipadapter_weights; the names are kept here too.
from brainrecon.targets.ipadapter_weights import (
    DEFAULT_REPO_ID,
    DEFAULT_WEIGHT_NAMES,
    ENCODER_SUBFOLDER,
    UNCOND_FILENAME,
    IPAdapterWeights,
    load_image_projection,
    projection_from_state_dict,
    read_ipadapter_checkpoint,
    resolve_device,
    resolve_dtype,
)

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = [
    "DEFAULT_REPO_ID",
    "DEFAULT_WEIGHT_NAMES",
    "IPAdapterEmbedder",
    "IPAdapterTarget",
    "IPAdapterWeights",
    "clip_preprocess",
    "embed_dataset",
    "embed_images",
    "embed_images_file",
    "load_image_projection",
    "projection_from_state_dict",
    "read_ipadapter_checkpoint",
    "resolve_device",
    "uncond_tokens",
]


# ---------------------------------------------------------------------------- preprocessing
def clip_preprocess(images: np.ndarray, size: int = 224) -> np.ndarray:
    """IP-Adapter's image preprocessing (``CLIPImageProcessor`` defaults), with Pillow.

    Resize the shorter side to ``size`` (bicubic, Pillow), centre-crop ``size`` × ``size``,
    scale to [0, 1] and normalise with CLIP's mean and standard deviation.

    Parameters
    ----------
    images : uint8 array of shape (n, H, W, 3)
    size : int
        The encoder's input size (224 for ViT-H/14).

    Returns
    -------
    float32 array of shape (n, 3, size, size)
    """
    from PIL import Image

    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise DataError(f"Images must have shape (n, H, W, 3), got {images.shape}.")
    mean = np.asarray(CLIP_MEAN, dtype=np.float32)
    std = np.asarray(CLIP_STD, dtype=np.float32)
    out = np.empty((len(images), 3, size, size), dtype=np.float32)
    for i, img in enumerate(images):
        pil = Image.fromarray(np.ascontiguousarray(img, dtype=np.uint8))
        w, h = pil.size
        # Shorter side to `size`, the longer one scaled and truncated (transformers' rule).
        if w <= h:
            new_w, new_h = size, int(size * h / w)
        else:
            new_w, new_h = int(size * w / h), size
        if (new_w, new_h) != (w, h):
            pil = pil.resize((new_w, new_h), Image.Resampling.BICUBIC, reducing_gap=None)
        arr = np.asarray(pil)
        top, left = (new_h - size) // 2, (new_w - size) // 2
        arr = arr[top : top + size, left : left + size].astype(np.float32) * np.float32(1 / 255)
        out[i] = ((arr - mean) / std).transpose(2, 0, 1)
    return out


# ---------------------------------------------------------------------------- embedding
class IPAdapterEmbedder:
    """Image encoder + Plus projection on one device: images -> (n, 16, 768) tokens.

    Parameters
    ----------
    weights : IPAdapterWeights
    device : str
        ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``.
    dtype : str or torch.dtype, optional
        Default fp16 on CUDA (as the IP-Adapter code runs the encoder), fp32 on the CPU.
    dim_head : int
        Attention head width of the projection.
    """

    def __init__(self, weights: IPAdapterWeights, device: str = "auto", dtype=None, dim_head: int = 64):
        import torch

        self.weights = weights
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.projection = load_image_projection(weights.adapter_file(), dim_head=dim_head).to(
            self.device, self.dtype)
        self.encoder = weights.image_encoder(self.device, self.dtype)
        self.image_size = int(self.encoder.config.image_size)
        hidden = int(self.encoder.config.hidden_size)
        expected = int(self.projection.proj_in.in_features)
        if hidden != expected:
            raise DataError(
                f"The image encoder at {weights.encoder_dir()} has width {hidden} but the IP-Adapter "
                f"projection expects {expected}; they come from different models."
            )
        self._torch = torch

    @property
    def token_shape(self) -> tuple[int, int]:
        return (int(self.projection.latents.shape[1]), int(self.projection.proj_out.out_features))

    def tokens_from_pixels(self, pixel_values: "torch.Tensor") -> "torch.Tensor":
        """Normalised pixels (B, 3, S, S) -> tokens (B, num_queries, output_dim), float32."""
        torch = self._torch
        with torch.inference_mode():
            x = pixel_values.to(self.device, self.dtype)
            hidden = self.encoder(pixel_values=x, output_hidden_states=True).hidden_states[-2]
            return self.projection(hidden).float()

    def embed(self, images: np.ndarray, batch_size: int = 32, progress: bool = False) -> np.ndarray:
        """Tokens of uint8 images (n, H, W, 3) -> float32 (n, num_queries, output_dim)."""
        from tqdm.auto import tqdm

        torch = self._torch
        n = len(images)
        out = np.empty((n,) + self.token_shape, dtype=np.float32)
        for start in tqdm(range(0, n, batch_size), desc="IP-Adapter tokens", disable=bar_disabled(progress), leave=False):
            block = np.asarray(images[start : start + batch_size])
            pixels = torch.from_numpy(clip_preprocess(block, self.image_size))
            out[start : start + len(block)] = self.tokens_from_pixels(pixels).cpu().numpy()
        return out

    def uncond(self) -> np.ndarray:
        """Unconditional tokens: the projection for an all-zero normalised image, (T, D) float32."""
        torch = self._torch
        zeros = torch.zeros(1, 3, self.image_size, self.image_size)
        return self.tokens_from_pixels(zeros)[0].cpu().numpy()


def uncond_tokens(weights: IPAdapterWeights, embedder: IPAdapterEmbedder | None = None,
                  device: str = "auto", dtype=None, dim_head: int = 64) -> np.ndarray:
    """The unconditional tokens of ``weights``, float32 (num_queries, output_dim).

    Read from ``$BRAINRECON_CACHE/ipadapter/<weights key>/uncond_tokens.safetensors`` when
    present; computed (with ``embedder`` or a new one) and stored otherwise.
    """
    from safetensors.numpy import load_file

    path = weights.uncond_path()
    if path.is_file():
        return load_file(str(path))["uncond_tokens"].astype(np.float32)
    if embedder is None:
        embedder = IPAdapterEmbedder(weights, device=device, dtype=dtype, dim_head=dim_head)
    tokens = embedder.uncond().astype(np.float32)
    _save_uncond(path, tokens, weights, embedder)
    return tokens


def _save_uncond(path: Path, tokens: np.ndarray, weights: IPAdapterWeights, embedder) -> None:
    from safetensors.numpy import save_file

    meta = {"source": weights.source, "checkpoint": str(weights.adapter_file()),
            "encoder": str(weights.encoder_dir()), "dtype": str(getattr(embedder, "dtype", "")),
            "definition": "projection(encoder(zeros normalised pixels).hidden_states[-2])"}
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file({"uncond_tokens": np.ascontiguousarray(tokens, dtype=np.float32)}, str(tmp), metadata=meta)


# ---------------------------------------------------------------------------- target space
class IPAdapterTarget(TargetSpace):
    """IP-Adapter Plus (SD 1.5) image-prompt tokens, shape (16, 768), cached in fp16.

    Parameters
    ----------
    ipadapter_dir : path-like, optional
        Local copy of ``h94/IP-Adapter`` (see the module docstring); default: the hub.
    repo_id, weight_name, revision
        Hub repository, checkpoint file name, revision (see :class:`IPAdapterWeights`).
    device : str
        Where the encoder runs: ``"auto"`` (CUDA when available, fp16), ``"cpu"`` (fp32).
    dtype : str, optional
        Override the encoder's dtype.
    batch_size : int
        Images per encoder call.
    cache_dir : path-like, optional
        One token cache for every dataset (e.g. filled by ``brainrecon embed --out DIR``
        for all 73k NSD images); default: next to the prepared data, or under
        ``$BRAINRECON_CACHE``.
    num_tokens, token_dim : int, optional
        Shape of one image's target. Default: read from the checkpoint when it is present
        locally, else 16 × 768 (IP-Adapter Plus SD 1.5). Checked against the weights when
        tokens are computed.
    dim_head : int
        Attention head width of the projection (64).
    """

    name = "ipadapter"
    cache_dtype = "float16"

    def __init__(self, ipadapter_dir: str | os.PathLike | None = None, repo_id: str = DEFAULT_REPO_ID,
                 weight_name: str | None = None, revision: str | None = None, device: str = "auto",
                 dtype: str | None = None, batch_size: int = 32, cache_dir: str | os.PathLike | None = None,
                 num_tokens: int | None = None, token_dim: int | None = None, dim_head: int = 64):
        for label, value in (("batch_size", batch_size), ("num_tokens", num_tokens),
                             ("token_dim", token_dim), ("dim_head", dim_head)):
            if value is not None and int(value) < 1:
                raise DataError(f"IPAdapterTarget {label} must be a positive integer, got {value!r}.")
        local = None if ipadapter_dir is None else str(ipadapter_dir)
        self.weights = IPAdapterWeights(repo_id=repo_id, local_dir=local,
                                        weight_name=weight_name, revision=revision)
        self.device = device
        self.dtype = dtype
        self.batch_size = int(batch_size)
        self.cache_root = None if cache_dir is None else Path(cache_dir).expanduser()
        self.num_tokens = None if num_tokens is None else int(num_tokens)
        self.token_dim = None if token_dim is None else int(token_dim)
        self.dim_head = int(dim_head)
        self._embedder: IPAdapterEmbedder | None = None
        self._shape: tuple[int, int] | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        if self._shape is None:
            found = None
            if self.num_tokens is None or self.token_dim is None:
                found = self.weights.token_shape()
            default = found or (16, 768)
            self._shape = (self.num_tokens or default[0], self.token_dim or default[1])
        return self._shape

    def config(self) -> dict[str, Any]:
        # Identifies the values, not where the weight files sit: tokens cached with
        # `embed --ipadapter-dir DIR` are found by a later fit that uses the hub default, and a
        # complete cache is read without any weights present.
        return {"name": self.name, "checkpoint": Path(self.weights.weight_names[0]).stem,
                "encoder": ENCODER_SUBFOLDER,
                "feature": "clip_vision.hidden_states[-2] -> ip-adapter-plus projection",
                "preprocess": "pil-bicubic-shortest-edge+center-crop+clip-norm", "version": 1}

    def cache_dir(self, split) -> Path:
        if self.cache_root is not None:
            return self.cache_root
        return super().cache_dir(split)

    def embedder(self) -> IPAdapterEmbedder:
        """The encoder and projection (loaded on first use)."""
        if self._embedder is None:
            self._embedder = IPAdapterEmbedder(self.weights, device=self.device, dtype=self.dtype,
                                               dim_head=self.dim_head)
            if self._embedder.token_shape != self.shape:
                raise DataError(
                    f"The IP-Adapter weights at {self.weights.source} make tokens of shape "
                    f"{self._embedder.token_shape}, but this target expects {self.shape}; pass "
                    f"num_tokens={self._embedder.token_shape[0]}, token_dim={self._embedder.token_shape[1]}."
                )
        return self._embedder

    def compute(self, images: np.ndarray) -> np.ndarray:
        """Tokens of uint8 images (n, H, W, 3) -> float32 (n, num_tokens, token_dim)."""
        return self.embedder().embed(images, batch_size=self.batch_size)

    def uncond_tokens(self) -> np.ndarray:
        """Unconditional tokens, float32 (num_tokens, token_dim) (cached with the weights)."""
        emb = self._embedder
        if emb is None and not self.weights.uncond_path().is_file():
            emb = self.embedder()
        return uncond_tokens(self.weights, embedder=emb)

    def to_images(self, predictions: np.ndarray, image_size: int | None = None, **kwargs: Any) -> np.ndarray:
        raise BrainreconError(
            "IP-Adapter tokens become images through Stable Diffusion 1.5 with IP-Adapter Plus "
            "(brainrecon.generate), a separate, GPU-heavy step."
        )

    # -------------------------------------------------------------- filling caches
    def fill(self, split, subject: int, progress: bool = True) -> Path:
        """Compute and store the tokens of ``split``'s images for ``subject`` that are not cached.

        Returns
        -------
        Path
            The cache directory.
        """
        ids = split.ids(subject)
        row_of = {int(i): r for r, i in enumerate(ids)}

        def compute(batch_ids: np.ndarray) -> np.ndarray:
            return self.compute(split.images(subject, np.array([row_of[int(i)] for i in batch_ids])))

        directory = self.cache_dir(split)
        cache = self._cache(directory)
        if len(cache.missing(np.unique(ids))):
            self.weights.check()  # a clear error before any cache file is created
        # One encoder batch per cache write: a killed run loses at most one batch of work.
        cache.fill(np.unique(ids), compute, batch_size=self.batch_size, progress=progress,
                   desc=f"IP-Adapter tokens, subject {subject} {split.name}")
        return directory

    def load(self, split, subject: int, progress: bool = True) -> np.ndarray:
        """Tokens of ``split``'s images for ``subject``, float32 (n, num_tokens, token_dim).

        Read from the cache; missing ones are computed first (which needs the weights).
        """
        directory = self.fill(split, subject, progress=progress)
        return self._cache(directory).get(split.ids(subject)).astype(np.float32)

    def _cache(self, directory: Path) -> IdKeyedCache:
        return IdKeyedCache(directory, self.shape, self.cache_dtype, self.config())

    def write_uncond(self, directory: Path) -> Path:
        """Copy the unconditional tokens next to a token cache (``uncond_tokens.safetensors``)."""
        tokens = self.uncond_tokens()
        path = Path(directory) / UNCOND_FILENAME
        _save_uncond(path, tokens, self.weights, self._embedder)
        return path


# ---------------------------------------------------------------------------- whole datasets
def embed_dataset(data=None, *, out: str | os.PathLike | None = None, subjects: Sequence[int] | None = None,
                  splits: Sequence[str] = ("train", "test"), progress: bool = True,
                  **target_options: Any) -> Path:
    """Compute the IP-Adapter tokens of every image of a dataset once, into the id-keyed cache.

    Parameters
    ----------
    data : Dataset, path-like or None
        A :class:`~brainrecon.data.Dataset`, or a source for :func:`brainrecon.data.load_dataset`.
    out : path-like, optional
        Cache directory; default: where :meth:`IPAdapterTarget.load` looks for this dataset
        (so a later ``brainrecon fit --target ipadapter`` finds the tokens).
    subjects : sequence of int, optional
        Default: all subjects. Images shared between subjects (NSD's test set) are computed once.
    splits : sequence of str
    progress : bool
    **target_options
        Passed to :class:`IPAdapterTarget` (``ipadapter_dir``, ``device``, ``batch_size``…).

    Returns
    -------
    Path
        The cache directory (also holding ``uncond_tokens.safetensors``).
    """
    from brainrecon.data import Dataset, load_dataset

    ds = data if isinstance(data, Dataset) else load_dataset(data, subjects=subjects)
    target = IPAdapterTarget(cache_dir=out, **target_options)
    directory = None
    for subject in (subjects or ds.subjects):
        for split_name in splits:
            split = getattr(ds, split_name, None)
            if split is None or split_name not in ("train", "test"):
                raise DataError(f"Unknown split {split_name!r}; valid splits: 'train', 'test'.")
            directory = target.fill(split, subject, progress=progress)
    if directory is None:
        raise DataError("Nothing to embed: no subjects or splits selected.")
    target.write_uncond(directory)
    return directory


def embed_images(images, ids=None, out: str | os.PathLike = None, *, progress: bool = True,
                 **target_options: Any) -> Path:
    """Compute the IP-Adapter tokens of an image array into an id-keyed cache at ``out``.

    Parameters
    ----------
    images : array-like of shape (n, H, W, 3), uint8
        May be lazy (memmap, HDF5 dataset): it is read one batch at a time.
    ids : int array of shape (n,), optional
        One id per row (default: the row index, i.e. the 0-based NSD 73k id for the NSD
        stimulus file). Must be unique.
    out : path-like
        Cache directory (created, or resumed when it exists).
    **target_options
        Passed to :class:`IPAdapterTarget`.

    Returns
    -------
    Path
        ``out``.
    """
    if out is None:
        raise DataError("embed_images needs an output cache directory (out=...).")
    shape = np.shape(images)
    if len(shape) != 4 or shape[-1] != 3:
        raise DataError(f"Images must have shape (n, H, W, 3), got {shape}.")
    n = shape[0]
    ids = np.arange(n, dtype=np.int64) if ids is None else np.asarray(ids, dtype=np.int64)
    if ids.shape != (n,) or len(np.unique(ids)) != n:
        raise DataError(f"ids must be {n} unique integers (one per image), got shape {ids.shape}.")
    target = IPAdapterTarget(cache_dir=out, **target_options)
    row_of = {int(i): r for r, i in enumerate(ids)}

    def compute(batch_ids: np.ndarray) -> np.ndarray:
        rows = np.array([row_of[int(i)] for i in batch_ids])
        order = np.argsort(rows, kind="stable")
        block = np.empty((len(rows),) + tuple(shape[1:]), dtype=np.uint8)
        # Read rows in increasing order (HDF5 needs it), then restore the requested order.
        block[order] = _as_uint8(images[rows[order]])
        return target.compute(block)

    directory = Path(out)
    cache = target._cache(directory)
    if len(cache.missing(ids)):
        target.weights.check()  # a clear error before any cache file is created
    cache.fill(ids, compute, batch_size=target.batch_size, progress=progress, desc="IP-Adapter tokens")
    target.write_uncond(directory)
    return directory


def _as_uint8(block) -> np.ndarray:
    arr = np.asarray(block)
    return arr if arr.dtype == np.uint8 else np.clip(np.rint(arr), 0, 255).astype(np.uint8)


def embed_images_file(path: str | os.PathLike, out: str | os.PathLike, *, key: str | None = None,
                      progress: bool = True, **target_options: Any) -> Path:
    """Embed every image of a ``.npy`` or HDF5 file (row index = id) into the cache at ``out``.

    Parameters
    ----------
    path : path-like
        ``.npy`` of shape (n, H, W, 3), or ``.h5`` / ``.hdf5`` (NSD's ``nsd_stimuli.hdf5``,
        dataset ``imgBrick`` of shape (73000, 425, 425, 3)).
    key : str, optional
        HDF5 dataset name; default ``imgBrick``, else the file's only 4-D dataset.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"Images file {path} does not exist.")
    if path.suffix == ".npy":
        return embed_images(np.load(path, mmap_mode="r"), None, out, progress=progress, **target_options)
    if path.suffix not in (".h5", ".hdf5"):
        raise DataError(f"Unsupported images file {path.name}: use .npy or .h5/.hdf5.")
    import h5py

    with h5py.File(path, "r") as f:
        if key is None:
            candidates = [k for k in f if isinstance(f[k], h5py.Dataset) and f[k].ndim == 4]
            key = "imgBrick" if "imgBrick" in f else (candidates[0] if len(candidates) == 1 else None)
            if key is None:
                raise DataError(f"{path} has no 'imgBrick' dataset and {len(candidates)} 4-D datasets "
                                f"({candidates}); name one with key='<dataset>'.", parameters=("key",))
        if key not in f:
            raise DataError(f"{path} has no dataset {key!r}; datasets: {sorted(f)}.")
        return embed_images(f[key], None, out, progress=progress, **target_options)

