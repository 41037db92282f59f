"""The ``clip`` target space: CLIP ViT-L/14 image and caption hidden states.

What the released BrainGuard (Tian et al., AAAI 2025; ``kunzhan/BrainGuard`` ``utils/utils.py``
``Clipper("ViT-L/14", hidden_state=True, norm_embs=True)``) and MindBridge
(``littlepure2333/MindBridge`` ``src/models.py`` ``Clipper``, the same class) regress, and what
Versatile Diffusion's dual-guided UNet reads as context:

- **image**, 257 × 768: the image resized so its shorter side is 224 (bicubic), centre-cropped
  to 224 × 224, normalised with :data:`CLIP_MEAN` / :data:`CLIP_STD`; CLIP ViT-L/14's vision
  transformer ``last_hidden_state`` (257 × 1024) → ``post_layernorm`` → ``visual_projection``
  (257 × 768); every token divided by the L2 norm of token 0 (the class token);
- **text**, 77 × 768: the caption tokenised to 77 (padded, truncated), the text transformer's
  ``last_hidden_state`` → ``text_projection`` (77 × 768); every token divided by the L2 norm of
  the pooled, projected ``text_embeds``.

One target is both stacked on the token axis, image first: shape (257 + 77, 768). The two-branch
BrainGuard decoder (``branches=[257, 77]``, recipe ``brainguard-paper``) predicts the groups with
separate heads; :class:`brainrecon.generate.versatile.VersatileGenerator` turns them into images.

Choices where the released code leaves it open (written down here and in the docs):

- **caption**: the released training loops pick caption ``repeat_index = batch index % 3`` of the
  image's COCO captions, so one image is paired with different captions in different batches.
  A cached target must be a function of the image; brainrecon uses caption ``caption_index``
  (default 0, the first) of the dataset's captions for every image.
- **resize**: ``torchvision.transforms.Resize(224, bicubic, antialias=None)`` on tensors in the
  released code; here the same bicubic resize of a float tensor (``torch.nn.functional.interpolate``
  without antialiasing), so the numbers follow the released pipeline rather than Pillow's.

Weights: ``openai/clip-vit-large-patch14`` (a local copy with ``model=DIR``, else the Hugging Face
cache; downloads only when allowed, see :mod:`brainrecon.hub`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from brainrecon.errors import BrainreconError, DataError, WeightsNotFoundError
from brainrecon.targets import TargetSpace
from brainrecon.targets.clip import CLIP_MEAN, CLIP_STD

#: The CLIP model of BrainGuard / MindBridge / Versatile Diffusion.
DEFAULT_CLIP_MODEL = "openai/clip-vit-large-patch14"
#: Token counts of the ViT-L/14 image states and the text states, and their width.
IMAGE_TOKENS, TEXT_TOKENS, CLIP_DIM = 257, 77, 768


def _load_clip(model: str, device: str):
    """(CLIP model, tokenizer) from a folder or the hub.

    The whole ``CLIPModel`` (its vision and text towers and both projections), which is what
    ``CLIPVisionModelWithProjection`` and ``CLIPTextModelWithProjection`` of the released Clipper
    read from the same checkpoint.
    """
    from transformers import CLIPModel, CLIPTokenizer

    from brainrecon.hub import (
        downloads_allowed,
        hf_hub_cache,
        hub_offline_unless_allowed,
    )

    path = Path(model).expanduser()
    fix = (f"To fix: `huggingface-cli download {DEFAULT_CLIP_MODEL} --include '*.json' '*.txt' 'model.safetensors' "
           f"--local-dir DIR` and pass DIR as the target option model (target_options={{'model': DIR}}).")
    kwargs: dict[str, Any] = {}
    if path.exists():
        source, kwargs = str(path), {"local_files_only": True}
    else:
        source, kwargs = model, {"cache_dir": str(hf_hub_cache())}
        if not downloads_allowed():
            kwargs["local_files_only"] = True
    try:
        with hub_offline_unless_allowed():
            model = CLIPModel.from_pretrained(source, **kwargs)
            tokenizer = CLIPTokenizer.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise WeightsNotFoundError(f"Cannot load the CLIP model {model!r} ({first}). {fix}",
                                   parameters=("target_options",)) from exc
    return model.to(device).eval(), tokenizer


def clip_resize(images: np.ndarray, size: int = 224):
    """uint8 (n, H, W, 3) -> float tensor (n, 3, size, size): the released ``Clipper.preprocess``.

    Shorter side to ``size`` (bicubic, no antialiasing, as ``transforms.Resize(..., antialias=None)``
    on tensors), centre crop, CLIP normalisation.
    """
    import torch
    import torch.nn.functional as F

    # torch.as_tensor copies read-only arrays (memory-mapped images) instead of warning.
    x = torch.as_tensor(np.array(images, dtype=np.float32)).permute(0, 3, 1, 2) / 255.0
    h, w = x.shape[-2:]
    scale = size / min(h, w)
    new = (max(size, round(h * scale)), max(size, round(w * scale)))
    x = F.interpolate(x, size=new, mode="bicubic", align_corners=False)
    top, left = (new[0] - size) // 2, (new[1] - size) // 2
    x = x[..., top:top + size, left:left + size]
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std


class ClipTarget(TargetSpace):
    """The ``clip`` target space: CLIP ViT-L/14 image (257 × 768) and caption (77 × 768) states.

    See the module docstring for the exact computation and its sources.

    Parameters
    ----------
    model : str
        Local folder or hub id of a CLIP model (default ``openai/clip-vit-large-patch14``).
    caption_index : int
        Which of each image's captions gives the text states (default 0, the first).
    image_tokens, text_tokens, dim : int
        Shape of the target (257, 77, 768 for ViT-L/14); checked against the model when it runs.
    device : str
        "auto" (CUDA when available), "cpu", "cuda".
    batch_size : int
    """

    name = "clip"
    cache_dtype = "float32"

    def __init__(self, model: str | os.PathLike = DEFAULT_CLIP_MODEL, caption_index: int = 0,
                 image_tokens: int = IMAGE_TOKENS, text_tokens: int = TEXT_TOKENS, dim: int = CLIP_DIM,
                 device: str = "auto", batch_size: int = 32):
        for label, value in (("caption_index", caption_index), ("image_tokens", image_tokens),
                             ("text_tokens", text_tokens), ("dim", dim), ("batch_size", batch_size)):
            if isinstance(value, bool) or int(value) < (0 if label == "caption_index" else 1):
                raise DataError(f"clip target: {label} must be a {'non-negative' if label == 'caption_index' else 'positive'} "
                                f"integer, got {value!r}.")
        self.model = str(model)
        self.caption_index = int(caption_index)
        self.image_tokens, self.text_tokens, self.dim = int(image_tokens), int(text_tokens), int(dim)
        self.device = device
        self.batch_size = int(batch_size)
        self._models = None

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.image_tokens + self.text_tokens, self.dim)

    def config(self) -> dict[str, Any]:
        model = self.model
        if Path(model).expanduser().exists():
            model = str(Path(model).expanduser().resolve())
        return {"name": self.name, "model": model, "caption_index": self.caption_index,
                "shape": [self.image_tokens, self.text_tokens, self.dim],
                "normalisation": "image / |token 0|; text / |pooled text_embeds| (Clipper, norm_embs=True)"}

    # -------------------------------------------------------------- computing
    def _loaded(self):
        if self._models is None:
            from brainrecon.targets.ipadapter_weights import resolve_device

            self._device = resolve_device(self.device)
            self._models = _load_clip(self.model, self._device)
        return self._models

    def embed_images(self, images: np.ndarray) -> np.ndarray:
        """float32 (n, image_tokens, dim): token-0-normalised projected image states of uint8 images."""
        import torch

        model, _ = self._loaded()
        size = int(model.config.vision_config.image_size)
        out = []
        with torch.no_grad():
            for start in range(0, len(images), self.batch_size):
                x = clip_resize(images[start:start + self.batch_size], size).to(self._device, model.dtype)
                states = model.vision_model(pixel_values=x).last_hidden_state
                states = model.visual_projection(model.vision_model.post_layernorm(states))
                states = states / states[:, :1].norm(dim=-1, keepdim=True)
                out.append(states.float().cpu().numpy())
        result = np.concatenate(out)
        if result.shape[1:] != (self.image_tokens, self.dim):
            raise DataError(f"The CLIP model {self.model!r} gives image states of shape {result.shape[1:]}, "
                            f"not the target's {(self.image_tokens, self.dim)}; set image_tokens/dim to match.")
        return result

    def embed_texts(self, captions) -> np.ndarray:
        """float32 (n, text_tokens, dim): projected caption states divided by the pooled embedding's norm."""
        import torch

        model, tokenizer = self._loaded()
        captions = [str(c) for c in captions]
        out = []
        with torch.no_grad():
            for start in range(0, len(captions), self.batch_size):
                ids = tokenizer(captions[start:start + self.batch_size], padding="max_length",
                                max_length=self.text_tokens, truncation=True, return_tensors="pt").input_ids
                res = model.text_model(input_ids=ids.to(self._device))
                states = model.text_projection(res.last_hidden_state)
                pooled = model.text_projection(res.pooler_output)  # CLIPTextModelWithProjection's text_embeds
                states = states / pooled.norm(dim=-1)[:, None, None]
                out.append(states.float().cpu().numpy())
        result = np.concatenate(out)
        if result.shape[1:] != (self.text_tokens, self.dim):
            raise DataError(f"The CLIP model {self.model!r} gives text states of shape {result.shape[1:]}, "
                            f"not the target's {(self.text_tokens, self.dim)}.")
        return result

    def compute_pairs(self, images: np.ndarray, captions) -> np.ndarray:
        """Targets (n, image_tokens + text_tokens, dim) of images and their captions."""
        if len(captions) != len(images):
            raise DataError(f"{len(images)} images but {len(captions)} captions.")
        return np.concatenate([self.embed_images(images), self.embed_texts(captions)], axis=1).astype(np.float32)

    def compute(self, images: np.ndarray) -> np.ndarray:
        raise BrainreconError("The clip target pairs each image with a caption: use compute_pairs(images, "
                              "captions), or load(split, subject), which reads the dataset's captions.")

    def _compute_rows(self, split, subject: int, rows: np.ndarray) -> np.ndarray:
        captions = split.captions(subject)
        if captions is None:
            raise DataError(
                f"The clip target needs captions (its text states), and subject {subject}'s "
                f"{split.name} split has none; use data with captions (the NSD stimuli's COCO captions).")
        captions = np.asarray(captions, dtype=object)
        if captions.ndim == 1:
            captions = captions[:, None]
        if self.caption_index >= captions.shape[1]:
            raise DataError(f"caption_index={self.caption_index} but the data has {captions.shape[1]} caption(s) "
                            f"per image.", parameters=("target_options",))
        return self.compute_pairs(split.images(subject, rows), captions[rows, self.caption_index])


__all__ = ["CLIP_DIM", "DEFAULT_CLIP_MODEL", "IMAGE_TOKENS", "TEXT_TOKENS",
           "ClipTarget", "clip_resize"]
