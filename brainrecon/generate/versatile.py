"""Images from CLIP image and text states: Versatile Diffusion's dual-guided UNet.

What the released BrainGuard code (``kunzhan/BrainGuard`` ``utils/utils.py`` ``reconstruction()``) and
MindBridge (``littlepure2333/MindBridge`` ``src/recon.py``, ``src/utils.py``) do with predicted
``clip`` targets (:mod:`brainrecon.targets.clip_states`), on diffusers' Versatile Diffusion components
(``shi-labs/versatile-diffusion``: ``image_unet``, ``text_unet``, ``vae``, ``scheduler``; in diffusers
0.42.1 under ``diffusers.pipelines.deprecated.versatile_diffusion``):

1. every ``Transformer2DModel`` of the image UNet becomes a ``DualTransformer2DModel`` holding the image
   UNet's transformer (index 0) and the text UNet's (index 1) — diffusers'
   ``VersatileDiffusionDualGuidedPipeline._convert_to_dual_attention``, called here on the loaded UNets;
2. each dual transformer reads ``condition_lengths = [77, 257]`` tokens (text first, then image) with
   ``transformer_index_for_condition = [1, 0]`` and mixes the two outputs with ``mix_ratio`` (the
   weight of the text transformer's output; 0.5 in MindBridge and BrainGuard);
3. the predicted states are re-normalised, each sample divided by the norm of its token 0 (image and
   text alike, as the released function does), and the context is ``cat[text, image]`` (334 tokens);
4. classifier-free guidance with an all-zero unconditional context: ``ε = ε_u + g (ε_c − ε_u)``;
5. the latents start from noise, or (img2img) from a low-level image: VAE-encoded — after CLIP's
   mean/std normalisation, as the released function feeds it (``clip_extractor.normalize``) — scaled,
   and noised to the timestep at ``t_start = steps − int(steps · img2img_strength)``; denoising then
   runs from ``t_start``;
6. decoding: ``(vae.decode(latents / scaling_factor) / 2 + 0.5).clamp(0, 1)``.

Not reproduced: the released function draws ``recons_per_sample`` images and keeps the one whose CLIP
embedding is closest to the **ground-truth** image's — a selection that uses the answer, which an
honest reconstruction cannot do. brainrecon draws one image per test stimulus (seeded by the stimulus
id). Each image's starting noise comes from its own CPU generator, so it does not depend on the batch.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from brainrecon.errors import BrainreconError, DataError, WeightsNotFoundError
from brainrecon.hub import downloads_allowed, hf_hub_cache, hub_offline_unless_allowed
from brainrecon.progress import bar_disabled
from brainrecon.targets.clip import CLIP_MEAN, CLIP_STD
from brainrecon.targets.ipadapter_weights import resolve_device, resolve_dtype

__all__ = ["DEFAULT_VD_MODEL", "VersatileGenerator", "make_dual"]

DEFAULT_VD_MODEL = "shi-labs/versatile-diffusion"
_SUBFOLDERS = ("image_unet", "text_unet", "vae", "scheduler")


def make_dual(image_unet, text_unet) -> int:
    """Turn ``image_unet``'s transformers into dual ones with ``text_unet``'s (in place); returns their count.

    diffusers' own conversion (``VersatileDiffusionDualGuidedPipeline._convert_to_dual_attention``),
    applied to the two UNets without building the whole pipeline (whose CLIP encoders are not needed).
    """
    from diffusers.models import DualTransformer2DModel
    from diffusers.pipelines.deprecated.versatile_diffusion import (
        VersatileDiffusionDualGuidedPipeline,
    )

    if not any(isinstance(m, DualTransformer2DModel) for m in image_unet.modules()):
        VersatileDiffusionDualGuidedPipeline._convert_to_dual_attention(
            SimpleNamespace(image_unet=image_unet, text_unet=text_unet))
    dual = _dual_class()
    count = 0
    for module in image_unet.modules():
        if isinstance(module, DualTransformer2DModel):
            module.__class__ = dual
            count += 1
    return count


def _dual_class():
    """``DualTransformer2DModel`` that accepts the ``encoder_attention_mask`` keyword.

    diffusers 0.42.1's ``CrossAttnDownBlock2D``/``UNetMidBlock2DCrossAttn``/``CrossAttnUpBlock2D`` pass
    ``encoder_attention_mask=`` to their attention modules, which ``DualTransformer2DModel.forward``
    (deprecated, unchanged) does not take: the dual-guided UNet fails with a ``TypeError`` there. The
    mask is always None here (the context has no padding mask), so it is dropped; anything else is refused.
    """
    global _DUAL
    if _DUAL is None:
        from diffusers.models import DualTransformer2DModel

        class DualTransformerAcceptingMask(DualTransformer2DModel):
            def forward(self, hidden_states, encoder_hidden_states, timestep=None, attention_mask=None,
                        cross_attention_kwargs=None, return_dict: bool = True, encoder_attention_mask=None):
                if encoder_attention_mask is not None:
                    raise BrainreconError("The dual-guided UNet does not take an encoder attention mask.")
                return super().forward(hidden_states, encoder_hidden_states, timestep=timestep,
                                       attention_mask=attention_mask, cross_attention_kwargs=cross_attention_kwargs,
                                       return_dict=return_dict)

        _DUAL = DualTransformerAcceptingMask
    return _DUAL


_DUAL = None


class VersatileGenerator:
    """Versatile Diffusion dual-guided generation from predicted CLIP image and text states.

    Parameters
    ----------
    model : str or path
        Local folder or hub id of Versatile Diffusion (``image_unet/``, ``text_unet/``, ``vae/``,
        ``scheduler/``); default ``shi-labs/versatile-diffusion``.
    scheduler : str
        A name of :data:`brainrecon.generate.ipadapter.SCHEDULERS` (default ``"unipc"``, MindBridge's).
    device, dtype : str
        ``"auto"`` (CUDA when available); fp16 on CUDA, fp32 on the CPU by default.
    image_tokens : int
        Image tokens at the front of each prediction (257; the text's 77 follow).

    Notes
    -----
    Weights load on the first :meth:`generate` (or :meth:`load`).
    """

    def __init__(self, model: str | os.PathLike = DEFAULT_VD_MODEL, *, scheduler: str = "unipc",
                 device: str = "auto", dtype: str | None = None, image_tokens: int = 257):
        from brainrecon.generate.ipadapter import SCHEDULERS

        if scheduler not in SCHEDULERS:
            raise BrainreconError(f"Unknown scheduler {scheduler!r}. Available schedulers: "
                                  f"{', '.join(map(repr, SCHEDULERS))}.", parameters=("scheduler",))
        self.model = str(model)
        self.scheduler_name = scheduler
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.image_tokens = int(image_tokens)
        self._parts = None

    # -------------------------------------------------------------- loading
    def load(self):
        """(image_unet with dual transformers, vae, scheduler), loaded once."""
        if self._parts is not None:
            return self._parts
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from diffusers.pipelines.deprecated.versatile_diffusion.modeling_text_unet import (
            UNetFlatConditionModel,
        )

        fix = (f"To fix: `huggingface-cli download {DEFAULT_VD_MODEL} --include 'image_unet/*' 'text_unet/*' 'vae/*' "
               f"'scheduler/*' --local-dir DIR` and pass DIR as base_model.")
        path = Path(self.model).expanduser()
        if path.exists():
            source, kwargs = str(path), {"local_files_only": True}
        else:
            source, kwargs = self.model, {"cache_dir": str(hf_hub_cache())}
            if not downloads_allowed():
                kwargs["local_files_only"] = True
        from brainrecon.generate.ipadapter import _diffusers_dtype_kwarg

        dtype_kw = {_diffusers_dtype_kwarg(): self.dtype}
        try:
            with hub_offline_unless_allowed():
                image_unet = UNet2DConditionModel.from_pretrained(source, subfolder="image_unet", **kwargs, **dtype_kw)
                text_unet = UNetFlatConditionModel.from_pretrained(source, subfolder="text_unet", **kwargs, **dtype_kw)
                vae = AutoencoderKL.from_pretrained(source, subfolder="vae", **kwargs, **dtype_kw)
                from diffusers import DDIMScheduler

                scheduler_config = DDIMScheduler.load_config(source, subfolder="scheduler", **kwargs)
        except (OSError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            hint = "" if downloads_allowed() or path.exists() else \
                " (downloads are disabled: `brainrecon weights --download --with versatile-diffusion`)"
            raise WeightsNotFoundError(f"Cannot load Versatile Diffusion from {self.model!r} ({first}){hint}. {fix}",
                                       parameters=("base_model",)) from exc
        return self._install(image_unet, text_unet, vae, scheduler_config)

    @classmethod
    def from_components(cls, image_unet, text_unet, vae, scheduler_config: dict, *, scheduler: str = "unipc",
                        device: str = "cpu", dtype: str | None = None, image_tokens: int = 257) -> VersatileGenerator:
        """A generator around components already in memory (``text_unet`` donates its transformers)."""
        gen = cls(model="<in memory>", scheduler=scheduler, device=device, dtype=dtype, image_tokens=image_tokens)
        gen._install(image_unet.to(gen.dtype), text_unet.to(gen.dtype), vae.to(gen.dtype), dict(scheduler_config))
        return gen

    def _install(self, image_unet, text_unet, vae, scheduler_config: dict):
        from brainrecon.generate.ipadapter import make_scheduler

        n = make_dual(image_unet, text_unet)
        if n == 0:
            raise DataError(f"The image UNet of {self.model} has no cross-attention transformers to make dual.")
        del text_unet  # its transformers now live in the image UNet
        scheduler = make_scheduler(self.scheduler_name, scheduler_config)
        self._parts = (image_unet.to(self.device).eval(), vae.to(self.device).eval(), scheduler)
        return self._parts

    def set_dual(self, mix_ratio: float, text_tokens: int, image_tokens: int) -> None:
        """Mix ratio and condition lengths of every dual transformer (text first, then image)."""
        from diffusers.models import DualTransformer2DModel

        unet, _, _ = self.load()
        for module in unet.modules():
            if isinstance(module, DualTransformer2DModel):
                module.mix_ratio = float(mix_ratio)
                module.condition_lengths = [int(text_tokens), int(image_tokens)]
                module.transformer_index_for_condition = [1, 0]

    # -------------------------------------------------------------- generation
    def generate(self, states: np.ndarray, *, seeds: int | Sequence[int] = 0, steps: int = 50,
                 guidance_scale: float = 7.5, mix_ratio: float = 0.5, lowlevel: np.ndarray | None = None,
                 img2img_strength: float = 0.85, batch_size: int = 4, height: int | None = None,
                 width: int | None = None, progress: bool = True,
                 callback: Callable[[np.ndarray, np.ndarray], None] | None = None) -> np.ndarray:
        """Images from predicted CLIP states.

        Parameters
        ----------
        states : array of shape (n, image_tokens + text_tokens, dim)
            Image states first (the ``clip`` target's layout).
        seeds : int or sequence of int
            One seed per image (an int ``s`` means ``s, s + 1, …``).
        steps, guidance_scale, mix_ratio
            Denoising steps, classifier-free guidance (≤ 1 disables it), text/image mix ratio (0: image
            states only, 1: text states only).
        lowlevel : uint8 array of shape (n, H, W, 3), optional
            Low-level images to start from (img2img); ``img2img_strength`` is the share of the
            denoising run from them (1: none of the image survives; the released default 0.85).
        batch_size, height, width, progress, callback
            As :meth:`IPAdapterGenerator.generate <brainrecon.generate.ipadapter.IPAdapterGenerator.generate>`.

        Returns
        -------
        uint8 array of shape (n, height, width, 3)
        """
        import torch
        from tqdm.auto import tqdm

        unet, vae, _ = self.load()
        states = np.asarray(states, dtype=np.float32)
        cross = int(unet.config.cross_attention_dim)
        if states.ndim != 3 or states.shape[2] != cross or states.shape[1] <= self.image_tokens:
            raise DataError(f"CLIP states must have shape (n, {self.image_tokens} + text tokens, {cross}) for this "
                            f"model; got {states.shape}.")
        if not np.all(np.isfinite(states)):
            raise DataError(f"{int((~np.isfinite(states)).sum())} predicted values are NaN or infinite.")
        n = len(states)
        seed_arr = int(seeds) + np.arange(n, dtype=np.int64) if np.ndim(seeds) == 0 else np.asarray(seeds, np.int64)
        if seed_arr.shape != (n,):
            raise DataError(f"Got {seed_arr.shape[0]} seeds for {n} images; pass one seed per image or an int.")
        for label, value in (("steps", steps), ("batch_size", batch_size)):
            if int(value) < 1:
                raise DataError(f"{label} must be a positive integer, got {value!r}.", parameters=(label,))
        if not 0.0 <= float(mix_ratio) <= 1.0:
            raise DataError(f"mix_ratio must be in [0, 1], got {mix_ratio!r}.", parameters=("mix_ratio",))
        if lowlevel is not None:
            lowlevel = np.asarray(lowlevel)
            if lowlevel.shape[0] != n or lowlevel.ndim != 4 or lowlevel.shape[-1] != 3:
                raise DataError(f"lowlevel must be (n={n}, H, W, 3) uint8 images; got {lowlevel.shape}.",
                                parameters=("lowlevel",))
            if not 0.0 < float(img2img_strength) <= 1.0:
                raise DataError(f"img2img_strength must be in (0, 1], got {img2img_strength!r}.",
                                parameters=("img2img_strength",))
        text_tokens = states.shape[1] - self.image_tokens
        self.set_dual(mix_ratio, text_tokens, self.image_tokens)
        scale = 2 ** (len(vae.config.block_out_channels) - 1)
        height = int(height or unet.config.sample_size * scale)
        width = int(width or unet.config.sample_size * scale)
        if height % scale or width % scale:
            raise DataError(f"height and width must be multiples of {scale}; got {height}x{width}.")
        out = np.empty((n, height, width, 3), dtype=np.uint8)
        bar = tqdm(total=n, desc="generating images", unit="img", disable=bar_disabled(progress))
        for start in range(0, n, int(batch_size)):
            idx = np.arange(start, min(n, start + int(batch_size)))
            gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seed_arr[idx]]
            images = self._denoise(states[idx], gens, int(steps), float(guidance_scale), height, width,
                                   None if lowlevel is None else lowlevel[idx], float(img2img_strength), progress)
            out[idx] = images
            if callback is not None:
                callback(idx, images)
            bar.update(len(idx))
        bar.close()
        return out

    def context(self, states: np.ndarray):
        """The conditional context cat[text, image] (B, text + image tokens, dim), each part divided by the
        norm of its token 0 (the released ``reconstruction()``; +1e-6 as there)."""
        import torch

        x = torch.from_numpy(np.ascontiguousarray(states)).to(self.device, torch.float32)
        image, text = x[:, :self.image_tokens], x[:, self.image_tokens:]
        image = image / (image[:, :1].norm(dim=-1, keepdim=True) + 1e-6)
        text = text / (text[:, :1].norm(dim=-1, keepdim=True) + 1e-6)
        return torch.cat([text, image], dim=1).to(self.dtype)

    def _denoise(self, states, generators, steps, guidance_scale, height, width, lowlevel, strength, progress):
        import torch
        import torch.nn.functional as F
        from tqdm.auto import tqdm

        unet, vae, scheduler = self._parts
        b = len(states)
        do_cfg = guidance_scale > 1.0
        cond = self.context(states)
        context = torch.cat([torch.zeros_like(cond), cond]) if do_cfg else cond
        scale = 2 ** (len(vae.config.block_out_channels) - 1)
        shape = (b, unet.config.in_channels, height // scale, width // scale)
        with torch.inference_mode():
            scheduler.set_timesteps(steps, device=self.device)
            timesteps = scheduler.timesteps
            noise = torch.stack([torch.randn(shape[1:], generator=g) for g in generators]).to(self.device, self.dtype)
            if lowlevel is None:
                latents = noise * scheduler.init_noise_sigma
            else:
                t_start = max(steps - min(int(steps * strength), steps), 0)
                timesteps = timesteps[t_start:]
                x = torch.from_numpy(np.ascontiguousarray(lowlevel)).permute(0, 3, 1, 2).float() / 255.0
                x = F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False)
                mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
                std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
                x = ((x - mean) / std).to(self.device, self.dtype)
                dist = vae.encode(x).latent_dist
                # one generator per image for the posterior sample too
                eps = torch.stack([torch.randn(dist.mean.shape[1:], generator=g) for g in generators]).to(
                    self.device, self.dtype)
                init = (dist.mean + dist.std * eps) * vae.config.scaling_factor
                latents = scheduler.add_noise(init, noise, timesteps[:1].repeat(b))
            for t in tqdm(timesteps, desc="denoising", leave=False, disable=bar_disabled(progress)):
                x = torch.cat([latents] * 2) if do_cfg else latents
                x = scheduler.scale_model_input(x, t)
                eps = unet(x, t, encoder_hidden_states=context, return_dict=False)[0]
                if do_cfg:
                    eps_uncond, eps_cond = eps.chunk(2)
                    eps = eps_uncond + guidance_scale * (eps_cond - eps_uncond)
                latents = scheduler.step(eps, t, latents, return_dict=False)[0]
            image = vae.decode(latents / vae.config.scaling_factor, return_dict=False)[0]
            image = (image.float() / 2 + 0.5).clamp(0, 1)
        return np.clip(np.rint(image.permute(0, 2, 3, 1).cpu().numpy() * 255), 0, 255).astype(np.uint8)

    def settings(self, **call: Any) -> dict[str, Any]:
        """A JSON-able record of what produced the images (stored with every run)."""
        return {
            "generator": "versatile-diffusion-dual-guided",
            "base_model": self.model,
            "scheduler": self.scheduler_name,
            "dtype": str(self.dtype).replace("torch.", ""),
            "context": "cat[text / |text token 0|, image / |image token 0|]; unconditional: zeros",
            "selection": "one sample per image (no ground-truth best-of-N)",
            **call,
        }
