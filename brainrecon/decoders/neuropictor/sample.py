"""Sampling: DDIM with classifier-free guidance on the semantics only.

The loop (spec ``neuropictor.md`` §8 and §12.4), written out::

    F = encoder(surface_structure);  C = hlgn(encoder(surface_semantics));  U = E_text("")
    for t in DDIM timesteps (50, eta 0):
        x = [z, z];  ctx = [U, C];  hint = [F, F]        # the fMRI control is in BOTH branches
        down, mid = controlnet(x, t, ctx, hint, conditioning_scale=alpha)
        e_u, e_c = unet(x, t, ctx, down, mid)
        z = ddim.step(e_u + s * (e_c - e_u), t, z)
    image = vae.decode(z / 0.18215)

Only the semantic context is dropped in the unconditional branch, so guidance amplifies the
semantics while the low-level control acts on both. ``alpha = 0`` gives images from the
semantics alone; the swap experiment takes ``C`` from one fMRI and ``F`` from another.

Each image's initial noise comes from its own seed, so a reconstruction does not depend on
the batch it was computed in.
"""

from __future__ import annotations

import contextlib

from pathlib import Path

import numpy as np
import torch

# SD 2.1's training schedule; DDIM "leading" spacing with steps_offset 1 gives 981, 961, ..., 1,
# the discretisation of ldm's "uniform" DDIM used by the original code (spec §12.1).
SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                beta_schedule="scaled_linear", prediction_type="epsilon")
SAMPLE_PRECISION = ("auto", "fp16-autocast")  # the decoder's sample_precision choices
PIXEL_ROUNDING = ("round", "truncate")  # the decoder's pixel_rounding choices


def ddim_scheduler():
    """The inference scheduler (DDIM, spec §12.1)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(**SCHEDULE, clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                         timestep_spacing="leading")


def training_scheduler():
    """The training noise schedule (``add_noise``)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(**SCHEDULE)


def image_seeds(seed: int, image_ids) -> list[int]:
    """One noise seed per image, from the decoder seed and the image id."""
    return [int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(i) & 0xFFFFFFFFFFFF]).generate_state(1)[0])
            for i in image_ids]


def initial_latents(seeds: list[int], shape: tuple[int, int, int]) -> torch.Tensor:
    """``(len(seeds), *shape)`` standard normal latents, one CPU generator per seed (device-independent)."""
    out = torch.empty((len(seeds),) + tuple(shape))
    for i, s in enumerate(seeds):
        g = torch.Generator().manual_seed(int(s))
        out[i] = torch.randn(shape, generator=g)
    return out


def _autocast(device: torch.device, dtype: torch.dtype):
    if device.type == "cuda" and dtype in (torch.bfloat16, torch.float16):
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


def _autocast_for(device, weights_dtype: torch.dtype, autocast_dtype: torch.dtype | None):
    return _autocast(device, weights_dtype if autocast_dtype is None else autocast_dtype)


@torch.no_grad()
def denoise(*, unet, controlnet, tokens: torch.Tensor, context: torch.Tensor,
            empty_context: torch.Tensor, latents: torch.Tensor, control_scale: float = 1.0,
            guidance_scale: float = 5.0, num_inference_steps: int = 50,
            use_control: bool = True, autocast_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Run the DDIM loop.

    Parameters
    ----------
    unet, controlnet
        The frozen UNet and the trained ControlNet (with the feature transformation).
    tokens : torch.Tensor
        ``(B, T, D)`` encoder tokens of the structure fMRI (the control hint).
    context : torch.Tensor
        ``(B, L, E)`` semantic context.
    empty_context : torch.Tensor
        ``(L, E)`` embedding of the empty caption (the unconditional context).
    latents : torch.Tensor
        ``(B, 4, s, s)`` initial noise.
    control_scale : float
        ``alpha``, multiplies all 13 residuals.
    guidance_scale : float
        ``s``; 1 disables the unconditional branch.
    use_control : bool
        False runs the UNet without any ControlNet (reference for tests and ablations).
    autocast_dtype : torch.dtype, optional
        Autocast dtype on CUDA (default: the UNet's weight dtype); ``torch.float16`` over
        float32 weights is the official sampling precision.

    Returns
    -------
    torch.Tensor
        ``(B, 4, s, s)`` denoised latents (float32).
    """
    scheduler = ddim_scheduler()
    scheduler.set_timesteps(num_inference_steps)
    device = latents.device
    dtype = next(unet.parameters()).dtype
    guided = guidance_scale != 1.0
    if guided:
        uncond = empty_context.to(context.dtype).unsqueeze(0).expand_as(context)
        ctx = torch.cat([uncond, context])
        hint = torch.cat([tokens, tokens])
    else:
        ctx, hint = context, tokens
    latents = latents.float()
    with _autocast_for(device, dtype, autocast_dtype):
        for t in scheduler.timesteps:
            x = torch.cat([latents, latents]) if guided else latents
            x_in = scheduler.scale_model_input(x, t)
            kwargs = {}
            if use_control:
                down, mid = controlnet(x_in, t, encoder_hidden_states=ctx, controlnet_cond=hint,
                                       conditioning_scale=float(control_scale), return_dict=False)
                kwargs = dict(down_block_additional_residuals=[d.to(dtype) for d in down],
                              mid_block_additional_residual=mid.to(dtype))
            eps = unet(x_in.to(dtype), t, encoder_hidden_states=ctx.to(dtype), **kwargs).sample.float()
            if guided:
                e_u, e_c = eps.chunk(2)
                eps = e_u + guidance_scale * (e_c - e_u)
            latents = scheduler.step(eps, t, latents, eta=0.0).prev_sample
    return latents


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor, autocast_dtype: torch.dtype | None = None,
                   rounding: str = "round") -> np.ndarray:
    """VAE-decode ``(B, 4, s, s)`` latents to uint8 images ``(B, H, W, 3)``.

    ``rounding="truncate"`` quantises as the official ``reconstruction.py`` writes its PNGs
    (``(255 * x).astype(np.uint8)``); ``"round"`` to the nearest level.
    """
    dtype = next(vae.parameters()).dtype
    with _autocast_for(latents.device, dtype, autocast_dtype):
        images = vae.decode(latents.to(dtype) / vae.config.scaling_factor).sample.float()
    images = ((images + 1) / 2).clamp(0, 1)
    scaled = images.permute(0, 2, 3, 1).cpu().numpy() * 255
    return (np.floor(scaled) if rounding == "truncate" else scaled.round()).astype(np.uint8)



def reconstruct_images(net, base, structure: np.ndarray, semantics: np.ndarray, seeds: list[int], *,
                       geometry: dict, use_aux: bool, empty_context: torch.Tensor, device: torch.device,
                       image_size: int, batch_size: int, control_scale: float, guidance_scale: float,
                       num_inference_steps: int, autocast_dtype: torch.dtype | None,
                       rounding: str) -> np.ndarray:
    """Images from surface maps, ``batch_size`` at a time: structure (the ControlNet hint) from
    ``structure``, the semantic context from ``semantics``, each image's noise from its seed.

    ``net`` (a :class:`~brainrecon.decoders.neuropictor.model.NeuroPictorNet`) and ``base``'s
    UNet and VAE are already on ``device``, in the precision to sample in.

    Returns
    -------
    uint8 array of shape (len(structure), image_size, image_size, 3)
    """
    shape = (geometry["latent_channels"], geometry["latent_size"], geometry["latent_size"])
    out = np.empty((len(structure), image_size, image_size, 3), dtype=np.uint8)
    bs = int(batch_size)
    with torch.no_grad():
        for start in range(0, len(structure), bs):
            sl = slice(start, start + bs)
            tokens = net.fmri_encoder(torch.from_numpy(np.asarray(structure[sl], np.float32)).to(device))
            sem_tokens = net.fmri_encoder(torch.from_numpy(np.asarray(semantics[sl], np.float32)).to(device))
            context, _ = net.semantic(sem_tokens, use_aux=use_aux)
            latents = denoise(
                unet=base.unet, controlnet=net.controlnet, tokens=tokens, context=context,
                empty_context=empty_context.to(device), latents=initial_latents(seeds[sl], shape).to(device),
                control_scale=control_scale, guidance_scale=guidance_scale, num_inference_steps=num_inference_steps,
                autocast_dtype=autocast_dtype,
            )
            out[sl] = decode_latents(base.vae, latents, autocast_dtype=autocast_dtype, rounding=rounding)
    return out


def maps_to_images(maps: np.ndarray) -> np.ndarray:
    """Surface maps ``(n, S, S)`` as grey uint8 images ``(n, S, S, 3)`` (1st-99th percentile stretched)."""
    lo, hi = np.percentile(maps, [1, 99])
    gray = np.clip((maps - lo) / max(hi - lo, 1e-6), 0, 1)
    return np.repeat((gray[..., None] * 255).round().astype(np.uint8), 3, axis=-1)

def grid_image(images: np.ndarray, pad: int = 2) -> np.ndarray:
    """Tile uint8 ``(rows, cols, H, W, 3)`` images into one ``(rows*(H+pad)+pad, cols*(W+pad)+pad, 3)`` picture."""
    images = np.asarray(images, dtype=np.uint8)
    rows, cols, h, w, _ = images.shape
    canvas = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for r in range(rows):
        for c in range(cols):
            y, x = pad + r * (h + pad), pad + c * (w + pad)
            canvas[y:y + h, x:x + w] = images[r, c]
    return canvas


def save_grid(images: np.ndarray, path) -> Path:
    """Write :func:`grid_image` of ``(rows, cols, H, W, 3)`` images as a PNG, atomically."""
    from PIL import Image

    from brainrecon.io import atomic_path

    path = Path(path)
    with atomic_path(path) as tmp:
        Image.fromarray(grid_image(images)).save(tmp, format="PNG")
    return path
