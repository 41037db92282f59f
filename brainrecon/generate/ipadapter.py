"""Images from IP-Adapter Plus tokens: Stable Diffusion 1.5 with decoupled cross-attention.

The predicted tokens (n, 16, 768) are what IP-Adapter Plus's image projection (Resampler)
outputs. diffusers' ``ip_adapter_image_embeds`` for Plus models are the projection's *input*
(CLIP hidden states) and the projection runs inside the UNet on every step, so the generator
replaces ``unet.encoder_hid_proj.image_projection_layers[0]`` by an identity and feeds
``[cat(uncond, predicted)[:, None]]`` of shape (2B, 1, 16, 768) — the same numbers the UNet
would see after the real projection.

Text conditioning
-----------------
``prompt=None`` (the default, "empty prompt") gives the UNet **no text**: all-zero text
embeddings of length 1 for both guidance branches. SD 1.5's cross-attention key/value
projections have no bias, so the text attention term is exactly zero and the image is
conditioned on the 16 image tokens alone — what WeADL does with the published ridge and
BrainGuard decoders. No text encoder or tokenizer is
loaded. ``prompt="..."`` (``""`` included) encodes text with the base model's CLIP text
encoder as in IP-Adapter's training ("Option A"); the negative branch uses
``negative_prompt`` (default ``""``).

Defaults follow the IP-Adapter Plus demo: DDIM (``clip_sample=False``,
``set_alpha_to_one=False``, ``steps_offset=1``), guidance 7.5, IP-Adapter scale 1.0; 50 steps
(WeADL used 100). Each image's starting noise comes from its own CPU generator seeded with
``seed + image id`` (:func:`brainrecon.workflows.reconstruct.reconstruct_run`), so an image
does not depend on the batch it was generated in, on the device, or on which decoder's tokens
are used.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from brainrecon.errors import BrainreconError, DataError, WeightsNotFoundError
from brainrecon.hub import downloads_allowed, hf_hub_cache
from brainrecon.progress import bar_disabled
from brainrecon.targets.ipadapter import uncond_tokens
from brainrecon.targets.ipadapter_weights import DEFAULT_REPO_ID, IPAdapterWeights, resolve_device, resolve_dtype

__all__ = [
    "DEFAULT_BASE_MODEL",
    "SCHEDULERS",
    "IPAdapterGenerator",
    "make_scheduler",
]

#: runwayml/stable-diffusion-v1-5 was removed from the hub in 2024; this is the maintained copy.
DEFAULT_BASE_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
_MIRRORS = {"runwayml/stable-diffusion-v1-5": DEFAULT_BASE_MODEL}
#: The base of the IP-Adapter Plus demo and of WeADL, with its separate VAE.
REALISTIC_VISION = ("SG161222/Realistic_Vision_V4.0_noVAE", "stabilityai/sd-vae-ft-mse")

SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "pndm": "PNDMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler-ancestral": "EulerAncestralDiscreteScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
    "unipc": "UniPCMultistepScheduler",
}


def make_scheduler(name: str, base_config: dict[str, Any]):
    """A scheduler ``name`` (see :data:`SCHEDULERS`) with the base model's noise schedule.

    ``"ddim"`` uses the IP-Adapter demo's settings (``clip_sample=False``,
    ``set_alpha_to_one=False``, ``steps_offset=1``).
    """
    import diffusers

    if name not in SCHEDULERS:
        raise BrainreconError(
            f"Unknown scheduler {name!r}. Available schedulers: {', '.join(map(repr, SCHEDULERS))}."
        )
    cls = getattr(diffusers, SCHEDULERS[name])
    overrides: dict[str, Any] = {}
    if name == "ddim":
        overrides = {"clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1}
    return cls.from_config(dict(base_config), **overrides)


def _from_pretrained(cls, name: str, what: str, fix: str, *, parameter: str, **kwargs):
    """``cls.from_pretrained`` from a local folder or the hub cache; download only when allowed.
    ``fix`` says how to get the files and pass them as ``parameter``."""
    path = Path(name).expanduser()
    if path.exists():
        try:
            return cls.from_pretrained(str(path), local_files_only=True, **kwargs)
        except (OSError, ValueError) as exc:
            raise WeightsNotFoundError(f"Cannot load the {what} from {path}: {exc} {fix}",
                                       parameters=(parameter,)) from exc
    candidates = [name] + ([_MIRRORS[name]] if name in _MIRRORS else [])
    errors = []
    from brainrecon.hub import hub_offline_unless_allowed

    for repo in candidates:
        try:
            with hub_offline_unless_allowed():  # local_files_only alone still lets huggingface_hub call out
                return cls.from_pretrained(repo, local_files_only=True, cache_dir=str(hf_hub_cache()), **kwargs)
        except (OSError, ValueError) as exc:
            errors.append(f"{repo}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
    if not downloads_allowed():
        raise WeightsNotFoundError(
            f"The {what} {name!r} is not in the Hugging Face cache ({hf_hub_cache()}) and downloads are "
            f"disabled (opt-in: `brainrecon weights --download --with sd15` or BRAINRECON_ALLOW_DOWNLOADS=1) [{'; '.join(errors)}]. {fix}",
            parameters=(parameter,)
        )
    repo = candidates[-1]
    try:
        return cls.from_pretrained(repo, cache_dir=str(hf_hub_cache()), **kwargs)
    except (OSError, ValueError) as exc:
        raise WeightsNotFoundError(f"Cannot download the {what} {repo!r}: {exc} {fix}",
                                   parameters=(parameter,)) from exc


class IPAdapterGenerator:
    """Stable Diffusion 1.5 (or a fine-tune) + IP-Adapter Plus, fed post-projection tokens.

    Parameters
    ----------
    base_model : str or path
        diffusers folder or hub repo id of an SD 1.5-family model (``unet/``, ``vae/``,
        ``scheduler/``; ``text_encoder/`` and ``tokenizer/`` only for text prompts). Default
        :data:`DEFAULT_BASE_MODEL`; the IP-Adapter authors' demo uses
        ``SG161222/Realistic_Vision_V4.0_noVAE`` with ``vae="stabilityai/sd-vae-ft-mse"``.
    vae : str or path, optional
        A separate ``AutoencoderKL`` (folder with ``config.json``, or a repo id).
    ipadapter_dir, repo_id, weight_name, revision
        Where the IP-Adapter Plus checkpoint is (see
        :class:`~brainrecon.targets.ipadapter_weights.IPAdapterWeights`).
    scheduler : str
        One of :data:`SCHEDULERS` (default ``"ddim"``).
    device : str
        ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``.
    dtype : str, optional
        Default fp16 on CUDA (SDPA attention), fp32 on the CPU.
    dim_head : int
        Attention head width of the projection (64), for the unconditional tokens.

    Notes
    -----
    Weights load on the first :meth:`generate` (or :meth:`load`).
    """

    def __init__(self, base_model: str | os.PathLike = DEFAULT_BASE_MODEL, *, vae: str | os.PathLike | None = None,
                 ipadapter_dir: str | os.PathLike | None = None, repo_id: str = DEFAULT_REPO_ID,
                 weight_name: str | None = None, revision: str | None = None, scheduler: str = "ddim",
                 device: str = "auto", dtype: str | None = None, dim_head: int = 64):
        if scheduler not in SCHEDULERS:
            raise BrainreconError(
                f"Unknown scheduler {scheduler!r}. Available schedulers: {', '.join(map(repr, SCHEDULERS))}."
            )
        self.base_model = str(base_model)
        self.vae = None if vae is None else str(vae)
        local = None if ipadapter_dir is None else str(ipadapter_dir)
        self.weights = IPAdapterWeights(repo_id=repo_id, local_dir=local,
                                        weight_name=weight_name, revision=revision)
        self.scheduler = scheduler
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.dim_head = int(dim_head)
        self._pipe = None
        self._uncond = None
        self._text_loaded = False
        self.token_shape: tuple[int, int] | None = None

    # -------------------------------------------------------------- loading
    def _base_fix(self) -> str:
        return (
            f"To fix: `huggingface-cli download {DEFAULT_BASE_MODEL} --include 'model_index.json' 'unet/*' "
            f"'vae/*' 'scheduler/*' 'text_encoder/*' 'tokenizer/*' --exclude '*.bin' '*fp16*' '*.ckpt' "
            f"--local-dir DIR` (the excluded files duplicate the weights) and pass DIR as base_model."
        )

    def load(self):
        """Load the pipeline (base model, optional VAE, IP-Adapter Plus); returns it."""
        if self._pipe is not None:
            return self._pipe
        from diffusers import AutoencoderKL, StableDiffusionPipeline

        state = self.weights.state_dict()  # fail early, before the large base model loads
        kwargs: dict[str, Any] = {
            "safety_checker": None, "feature_extractor": None, "image_encoder": None,
            "requires_safety_checker": False, "text_encoder": None, "tokenizer": None,
            _diffusers_dtype_kwarg(): self.dtype,
        }
        if self.vae is not None:
            vae_path = Path(self.vae).expanduser()
            sub = {"subfolder": "vae"} if (vae_path / "vae" / "config.json").is_file() and not (
                vae_path / "config.json").is_file() else {}
            kwargs["vae"] = _from_pretrained(
                AutoencoderKL, self.vae, "VAE",
                f"To fix: `huggingface-cli download {REALISTIC_VISION[1]} --local-dir DIR` and pass DIR as vae.",
                parameter="vae", **{_diffusers_dtype_kwarg(): self.dtype}, **sub)
        pipe = _from_pretrained(StableDiffusionPipeline, self.base_model, "Stable Diffusion base model",
                                self._base_fix(), parameter="base_model", **kwargs)
        return self._install(pipe, state)

    @classmethod
    def from_pipeline(cls, pipe, ipadapter_state: dict, *, scheduler: str = "ddim", device: str = "auto",
                      dtype: str | None = None, uncond: np.ndarray | None = None) -> "IPAdapterGenerator":
        """A generator around a ``StableDiffusionPipeline`` already in memory.

        Parameters
        ----------
        pipe : diffusers.StableDiffusionPipeline
            Without IP-Adapter; it is modified in place (IP-Adapter attention, projection bypass).
        ipadapter_state : dict
            ``{"image_proj": ..., "ip_adapter": ...}`` (:func:`read_ipadapter_checkpoint`).
        uncond : array of shape (num_tokens, token_dim), optional
            Unconditional tokens; without them :meth:`generate` needs ``uncond=`` or weights
            on disk to compute them.
        """
        gen = cls(base_model="<in memory>", scheduler=scheduler, device=device, dtype=dtype)
        gen._install(pipe.to(dtype=gen.dtype), ipadapter_state)
        if uncond is not None:
            gen._uncond = np.asarray(uncond, dtype=np.float32)
        return gen

    def _install(self, pipe, state: dict):
        """Scheduler, IP-Adapter attention and the projection bypass on ``pipe``; keeps it."""
        import torch

        pipe.scheduler = make_scheduler(self.scheduler, pipe.scheduler.config)
        # A state dict (not a path) so diffusers loads no image encoder and touches no network.
        pipe.load_ip_adapter(state, subfolder=None, weight_name=None, image_encoder_folder=None)
        # Predicted tokens are post-projection: bypass the Resampler that runs inside the UNet.
        pipe.unet.encoder_hid_proj.image_projection_layers[0] = torch.nn.Identity()
        # torch >= 2 attention processors (plain and IP-Adapter) run SDPA: flash / memory-efficient on CUDA.
        pipe.to(self.device)
        pipe.set_progress_bar_config(disable=True)
        self.token_shape = (int(state["image_proj"]["latents"].shape[1]),
                            int(state["image_proj"]["proj_out.weight"].shape[0]))
        cross = int(pipe.unet.config.cross_attention_dim)
        if self.token_shape[1] != cross:
            raise DataError(
                f"The IP-Adapter checkpoint makes {self.token_shape[1]}-wide tokens but the base model "
                f"{self.base_model} has cross-attention width {cross}; use an SD 1.5-family base model."
            )
        self._pipe = pipe
        return pipe

    def _load_text(self) -> None:
        if self._text_loaded:
            return
        from transformers import CLIPTextModel, CLIPTokenizer

        pipe = self.load()
        if getattr(pipe, "text_encoder", None) is not None and getattr(pipe, "tokenizer", None) is not None:
            self._text_loaded = True  # a pipeline handed over with its text components (from_pipeline)
            return
        fix = (f"Text prompts need the base model's text_encoder/ and tokenizer/ folders. {self._base_fix()} "
               f"Or leave the prompt unset to condition on the image tokens alone.")
        text_encoder = _from_pretrained(CLIPTextModel, self.base_model, "text encoder", fix, parameter="base_model",
                                        subfolder="text_encoder", **{_dtype_kwarg(): self.dtype})
        tokenizer = _from_pretrained(CLIPTokenizer, self.base_model, "tokenizer", fix, parameter="base_model",
                                     subfolder="tokenizer")
        pipe.register_modules(text_encoder=text_encoder.to(self.device).eval(), tokenizer=tokenizer)
        self._text_loaded = True

    def uncond_tokens(self) -> np.ndarray:
        """Unconditional tokens (num_tokens, token_dim), float32; cached with the weights."""
        if self._uncond is None:
            self._uncond = uncond_tokens(self.weights, device=self.device, dim_head=self.dim_head)
        return self._uncond

    def _text_embeddings(self, prompt: str | None, negative_prompt: str | None, do_cfg: bool):
        import torch

        pipe = self.load()
        if negative_prompt is not None and prompt is None:
            raise BrainreconError("negative_prompt needs a prompt; set prompt='' for an empty one.")
        if prompt is None:
            for name, module in pipe.unet.named_modules():
                if name.endswith("attn2") and (module.to_k.bias is not None or module.to_v.bias is not None):
                    raise BrainreconError(
                        f"The base model's cross-attention {name} has key/value biases, so zero text "
                        f"embeddings are not 'no text'; pass a prompt (e.g. prompt='').", parameters=("prompt",)
                    )
            zeros = torch.zeros(1, 1, pipe.unet.config.cross_attention_dim, device=self.device, dtype=self.dtype)
            return zeros, zeros
        self._load_text()
        pos, neg = pipe.encode_prompt(prompt, self.device, 1, do_cfg, negative_prompt or "")
        return pos, (neg if neg is not None else pos)

    # -------------------------------------------------------------- generation
    def generate(self, tokens: np.ndarray, *, seeds: int | Sequence[int] = 0, uncond: np.ndarray | None = None,
                 prompt: str | None = None, negative_prompt: str | None = None, steps: int = 50,
                 guidance_scale: float = 7.5, ip_adapter_scale: float = 1.0, batch_size: int = 8,
                 height: int | None = None, width: int | None = None, progress: bool = True,
                 callback: Callable[[np.ndarray, np.ndarray], None] | None = None) -> np.ndarray:
        """Images from post-projection IP-Adapter tokens.

        Parameters
        ----------
        tokens : array of shape (n, 16, 768)
            Predicted (or true) tokens.
        seeds : int or sequence of int
            One seed per image (an int ``s`` means ``s, s + 1, …``); image ``i``'s initial noise
            comes from a CPU generator seeded with ``seeds[i]``.
        uncond : array of shape (16, 768), optional
            Negative-branch tokens; default the weights' unconditional tokens.
        prompt, negative_prompt : str, optional
            See the module docstring; None = no text.
        steps : int
        guidance_scale : float
            Classifier-free guidance (≤ 1 disables the negative branch).
        ip_adapter_scale : float
            Weight of the image-token attention (0 gives the base model's own output).
        batch_size : int
        height, width : int, optional
            Default: the UNet's sample size × the VAE's scale factor (512 for SD 1.5).
        progress : bool
        callback : callable, optional
            ``callback(indices, images)`` after each batch (indices into ``tokens``).

        Returns
        -------
        uint8 array of shape (n, height, width, 3)
        """
        import torch
        from tqdm.auto import tqdm

        pipe = self.load()
        tokens = np.asarray(tokens, dtype=np.float32)
        if tokens.ndim != 3 or tokens.shape[1:] != self.token_shape:
            raise DataError(
                f"Tokens must have shape (n, {self.token_shape[0]}, {self.token_shape[1]}) for this "
                f"IP-Adapter checkpoint; got {tokens.shape}."
            )
        if not np.all(np.isfinite(tokens)):
            raise DataError(f"{int((~np.isfinite(tokens)).sum())} token values are NaN or infinite.")
        n = len(tokens)
        if n == 0:
            raise DataError("No tokens to generate images from (n = 0).")
        if np.ndim(seeds) == 0:
            seed_arr = int(seeds) + np.arange(n, dtype=np.int64)
        else:
            seed_arr = np.asarray(seeds, dtype=np.int64)
        if seed_arr.shape != (n,):
            raise DataError(f"Got {seed_arr.shape[0]} seeds for {n} images; pass one seed per image or an int.")
        for label, value in (("steps", steps), ("batch_size", batch_size)):
            if int(value) < 1:
                raise DataError(f"{label} must be a positive integer, got {value!r}.")
        do_cfg = guidance_scale > 1.0
        un_t = None
        if do_cfg:
            un = self.uncond_tokens() if uncond is None else np.asarray(uncond, dtype=np.float32)
            if un.shape != self.token_shape:
                raise DataError(f"uncond must have shape {self.token_shape}, got {un.shape}.")
            un_t = torch.from_numpy(un).to(self.device, self.dtype)[None]
        text_pos, text_neg = self._text_embeddings(prompt, negative_prompt, do_cfg)
        pipe.set_ip_adapter_scale(float(ip_adapter_scale))
        height = int(height or pipe.unet.config.sample_size * pipe.vae_scale_factor)
        width = int(width or pipe.unet.config.sample_size * pipe.vae_scale_factor)
        out = np.empty((n, height, width, 3), dtype=np.uint8)
        bar = tqdm(total=n, desc="generating images", unit="img", disable=bar_disabled(progress))
        for start in range(0, n, int(batch_size)):
            idx = np.arange(start, min(n, start + int(batch_size)))
            b = len(idx)
            pred = torch.from_numpy(tokens[idx]).to(self.device, self.dtype)
            images = self._denoise(
                pred, None if un_t is None else un_t.expand(b, -1, -1), text_pos.expand(b, -1, -1),
                text_neg.expand(b, -1, -1), [torch.Generator("cpu").manual_seed(int(s)) for s in seed_arr[idx]],
                int(steps), float(guidance_scale), height, width, progress)
            out[idx] = images
            if callback is not None:
                callback(idx, images)
            bar.update(b)
        bar.close()
        return out

    def _denoise(self, pred, uncond, text_pos, text_neg, generators, steps: int, guidance_scale: float,
                 height: int, width: int, progress: bool) -> np.ndarray:
        """One batch through the denoising loop; uint8 (B, height, width, 3).

        Written out rather than calling ``StableDiffusionPipeline.__call__``: the pipeline tiles
        ``ip_adapter_image_embeds`` by the batch size (one image prompt shared by every prompt),
        so B different token sets in one batch would be mixed (diffusers 0.42.1).
        """
        import inspect

        import torch
        from diffusers.utils.torch_utils import randn_tensor
        from tqdm.auto import tqdm

        pipe = self._pipe
        unet, vae, scheduler = pipe.unet, pipe.vae, pipe.scheduler
        do_cfg = uncond is not None
        b = pred.shape[0]
        if height % pipe.vae_scale_factor or width % pipe.vae_scale_factor:
            raise DataError(f"height and width must be multiples of {pipe.vae_scale_factor}; got {height}×{width}.")
        with torch.inference_mode():
            scheduler.set_timesteps(steps, device=self.device)
            shape = (b, unet.config.in_channels, height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)
            # CPU generators, one per image: the same noise on any device and in any batch.
            latents = randn_tensor(shape, generator=generators, device=torch.device(self.device), dtype=self.dtype)
            latents = latents * scheduler.init_noise_sigma
            step_params = set(inspect.signature(scheduler.step).parameters)
            step_kwargs = {k: v for k, v in (("eta", 0.0), ("generator", generators)) if k in step_params}
            # Negative half first, as the guidance below expects.
            text = torch.cat([text_neg, text_pos]) if do_cfg else text_pos
            ip = (torch.cat([uncond, pred]) if do_cfg else pred)[:, None]  # (2B or B, 1, T, D)
            for t in tqdm(scheduler.timesteps, desc="denoising", leave=False, disable=bar_disabled(progress)):
                x = torch.cat([latents] * 2) if do_cfg else latents
                x = scheduler.scale_model_input(x, t)
                eps = unet(x, t, encoder_hidden_states=text, added_cond_kwargs={"image_embeds": [ip]},
                           return_dict=False)[0]
                if do_cfg:
                    eps_uncond, eps_cond = eps.chunk(2)
                    eps = eps_uncond + guidance_scale * (eps_cond - eps_uncond)
                latents = scheduler.step(eps, t, latents, **step_kwargs, return_dict=False)[0]
            image = vae.decode(latents / vae.config.scaling_factor, return_dict=False)[0]
            image = pipe.image_processor.postprocess(image, output_type="np")
        return np.clip(np.rint(np.asarray(image, dtype=np.float32) * 255), 0, 255).astype(np.uint8)

    def settings(self, **call: Any) -> dict[str, Any]:
        """A JSON-able record of what produced the images (stored with every run)."""
        return {
            "generator": "sd15-ipadapter-plus",
            "base_model": self.base_model,
            "vae": self.vae,
            "ipadapter": self.weights.source,
            "ipadapter_checkpoint": self.weights.weight_name or "ip-adapter-plus_sd15 (.safetensors, else .bin)",
            "scheduler": self.scheduler,
            "dtype": str(self.dtype).replace("torch.", ""),
            "token_rescaling": None,
            **call,
        }


def _dtype_kwarg() -> str:
    from brainrecon.targets.ipadapter_weights import _dtype_kwarg as kw

    return kw()


def _diffusers_dtype_kwarg() -> str:
    # diffusers deprecates ``torch_dtype`` for ``dtype`` from the release that added this helper.
    from diffusers.utils import deprecation_utils

    return "dtype" if hasattr(deprecation_utils, "_resolve_dtype") else "torch_dtype"
