"""Reconstruct a run: its predictions turned into images, stored in the run.

The generators themselves are :class:`brainrecon.generate.ipadapter.IPAdapterGenerator` (IP-Adapter
tokens in, images out) and :class:`brainrecon.generate.versatile.VersatileGenerator` (CLIP image and
text states in); this module reads a run's predictions and writes its reconstructions
(``brainrecon reconstruct RUN [--recipe NAME]``).
"""

from __future__ import annotations

import os

import numpy as np

from brainrecon.errors import BrainreconError, DataError
from brainrecon.generate.ipadapter import DEFAULT_BASE_MODEL, IPAdapterGenerator
from brainrecon.io import jsonable
from brainrecon.targets.ipadapter import DEFAULT_REPO_ID

__all__ = ["RECON_DIR", "SETTINGS_FILE", "reconstruct_run", "run_negative_tokens"]

RECON_DIR = "reconstructions"
SETTINGS_FILE = "generation.json"


def reconstruct_run(run, *, recipe: str | None = None, steps: int | None = None, guidance_scale: float | None = None,
                    ip_adapter_scale: float | None = None, seed: int = 0, batch_size: int = 8,
                    base_model: str | None = None, vae: str | None = None, prompt: str | None = None,
                    negative_prompt: str | None = None, scheduler: str | None = None,
                    ipadapter_dir: str | os.PathLike | None = None, mix_ratio: float | None = None,
                    img2img_strength: float | None = None, lowlevel: str | os.PathLike | None = None,
                    device: str = "auto", dtype: str | None = None, height: int | None = None,
                    width: int | None = None, generator=None, progress: bool = True, resume: bool = True):
    """Turn a run's predictions into images, stored in the run.

    Runs of the ``ipadapter`` target go through Stable Diffusion 1.5 + IP-Adapter Plus
    (:class:`~brainrecon.generate.ipadapter.IPAdapterGenerator`); runs of the ``clip`` target through
    Versatile Diffusion's dual-guided UNet (:class:`~brainrecon.generate.versatile.VersatileGenerator`).

    Reads ``predictions.npy``; writes one PNG per test image under ``<run>/reconstructions/``
    (``NNNN-id<image id>.png``, in test order) as it goes, then ``reconstructions.npy`` (uint8
    (n_test, H, W, 3), aligned with ``test_ids.npy``) for the evaluation harness, and
    ``reconstructions/generation.json`` with every setting. Image ``i`` uses seed
    ``seed + test_ids[i]``. An interrupted call resumes: PNGs written with the same settings are
    reused (``resume=False`` regenerates them).

    Parameters
    ----------
    run : brainrecon.runs.Run or path-like
    recipe : str, optional
        A named generation recipe (:mod:`brainrecon.generate.recipes`: ``weadl`` for token runs,
        ``mindbridge`` or ``brainguard-released`` for CLIP runs); options given explicitly (not
        None) win over its values.
    steps, guidance_scale, ip_adapter_scale, prompt, negative_prompt, height, width, batch_size
        See :meth:`IPAdapterGenerator.generate` (defaults 50 steps, guidance 7.5, IP scale 1.0) and
        :meth:`VersatileGenerator.generate` (``mix_ratio``, ``img2img_strength``).
    lowlevel : path-like, optional
        CLIP runs: a run directory or ``.npy`` of low-level images in the run's test order to start
        img2img from (MindBridge's ``img_lowlevel``).
    seed : int
    base_model, vae, scheduler, device, dtype
        See the generator classes (``base_model`` default :data:`DEFAULT_BASE_MODEL` or
        ``shi-labs/versatile-diffusion``).
    ipadapter_dir : path-like, optional
        Default: the ``ipadapter_dir`` of the run's target options, else the hub.
    generator : IPAdapterGenerator or VersatileGenerator, optional
        A loaded generator to reuse (the weight options above are then ignored).

    Returns
    -------
    brainrecon.runs.Run
        The run, re-opened.
    """
    from PIL import Image

    from brainrecon.generate.recipes import GENERATOR_OF_TARGET, get_generation_recipe
    from brainrecon.io import atomic_path, read_json, write_json_atomic
    from brainrecon.runs import Run

    run = run if isinstance(run, Run) else Run.open(run)
    target = run.info.get("target")
    kind = GENERATOR_OF_TARGET.get(target)
    if kind is None:
        raise BrainreconError(
            f"Run {run.name!r} predicts {target or run.info.get('predicts')!r}, not IP-Adapter tokens or CLIP "
            f"states; `brainrecon reconstruct` is for runs fitted with --target ipadapter or --target clip."
        )
    explicit = {"steps": steps, "guidance_scale": guidance_scale, "ip_adapter_scale": ip_adapter_scale,
                "base_model": base_model, "vae": vae, "scheduler": scheduler, "mix_ratio": mix_ratio,
                "img2img_strength": img2img_strength}
    if recipe is not None:
        chosen = get_generation_recipe(recipe)
        if chosen.generator != kind:
            raise BrainreconError(
                f"Generation recipe {recipe!r} is for the {chosen.generator!r} generator; run {run.name!r} "
                f"({target!r} target) needs the {kind!r} one.", parameters=("recipe",))
        explicit = chosen.apply(explicit, none_is_unset=True)
    pred = run.predictions()
    if pred is None:
        raise BrainreconError(f"Run {run.name!r} has no predictions.npy; re-run `brainrecon fit`.")
    ids = run.test_ids()
    pred = np.asarray(pred, dtype=np.float32)
    if len(pred) != len(ids):
        raise DataError(f"Run {run.name!r}: {len(pred)} predictions for {len(ids)} test ids.")
    options = dict((run.info.get("params") or {}).get("target_options") or {})
    seeds = int(seed) + ids.astype(np.int64)
    common = {"seed": int(seed), "seeds": "seed + test image id", "height": height, "width": width,
              "recipe": recipe}
    if kind == "ipadapter":
        steps_ = int(explicit.get("steps") or 50)
        guidance = float(7.5 if explicit.get("guidance_scale") is None else explicit["guidance_scale"])
        ip_scale = float(1.0 if explicit.get("ip_adapter_scale") is None else explicit["ip_adapter_scale"])
        if generator is None:
            generator = IPAdapterGenerator(
                explicit.get("base_model") or DEFAULT_BASE_MODEL, vae=explicit.get("vae"),
                ipadapter_dir=ipadapter_dir if ipadapter_dir is not None else options.get("ipadapter_dir"),
                repo_id=options.get("repo_id", DEFAULT_REPO_ID), weight_name=options.get("weight_name"),
                revision=options.get("revision"), scheduler=explicit.get("scheduler") or "ddim", device=device,
                dtype=dtype, dim_head=options.get("dim_head", 64),
            )
        negative, negative_source = run_negative_tokens(run)
        settings = generator.settings(
            negative_tokens=negative_source or "the IP-Adapter weights' unconditional tokens",
            steps=steps_, guidance_scale=guidance, ip_adapter_scale=ip_scale,
            prompt=prompt, negative_prompt=negative_prompt,
            text="none (all-zero text embeddings)" if prompt is None else "encoded prompt",
            device=generator.device, **common,
        )

        def generate(rows, callback):
            generator.generate(pred[rows], seeds=seeds[rows], prompt=prompt, negative_prompt=negative_prompt,
                               uncond=negative, steps=steps_, guidance_scale=guidance, ip_adapter_scale=ip_scale,
                               batch_size=batch_size, height=height, width=width, progress=progress,
                               callback=callback)
    else:
        from brainrecon.generate.versatile import DEFAULT_VD_MODEL, VersatileGenerator

        if prompt is not None or negative_prompt is not None or explicit.get("ip_adapter_scale") is not None:
            raise BrainreconError("prompt, negative_prompt and ip_adapter_scale are IP-Adapter settings; a CLIP run "
                                  "is conditioned on its predicted text states.",
                                  parameters=("prompt", "negative_prompt", "ip_adapter_scale"))
        steps_ = int(explicit.get("steps") or 50)
        guidance = float(7.5 if explicit.get("guidance_scale") is None else explicit["guidance_scale"])
        mix = float(0.5 if explicit.get("mix_ratio") is None else explicit["mix_ratio"])
        strength = float(0.85 if explicit.get("img2img_strength") is None else explicit["img2img_strength"])
        if generator is None:
            generator = VersatileGenerator(explicit.get("base_model") or DEFAULT_VD_MODEL,
                                           scheduler=explicit.get("scheduler") or "unipc", device=device, dtype=dtype)
        low = None if lowlevel is None else _lowlevel_images(lowlevel, ids)
        settings = generator.settings(steps=steps_, guidance_scale=guidance, mix_ratio=mix,
                                      img2img_strength=strength if low is not None else None,
                                      lowlevel=None if lowlevel is None else str(lowlevel),
                                      device=generator.device, **common)

        def generate(rows, callback):
            generator.generate(pred[rows], seeds=seeds[rows], steps=steps_, guidance_scale=guidance, mix_ratio=mix,
                               lowlevel=None if low is None else low[rows], img2img_strength=strength,
                               batch_size=batch_size, height=height, width=width, progress=progress,
                               callback=callback)

    out_dir = run.path / RECON_DIR
    settings_path = out_dir / SETTINGS_FILE
    names = [f"{row:04d}-id{int(i)}.png" for row, i in enumerate(ids)]
    reuse = resume and settings_path.is_file() and read_json(settings_path) == jsonable(settings)
    out_dir.mkdir(parents=True, exist_ok=True)
    if not reuse:
        for name in names:
            (out_dir / name).unlink(missing_ok=True)
    write_json_atomic(settings_path, settings)
    todo = np.array([r for r, name in enumerate(names) if not (out_dir / name).is_file()], dtype=np.int64)

    def save_pngs(idx: np.ndarray, images: np.ndarray) -> None:
        for j, img in zip(idx, images):
            with atomic_path(out_dir / names[todo[j]]) as tmp:
                Image.fromarray(img).save(tmp, format="PNG")

    if len(todo):
        generate(todo, save_pngs)
    images = np.stack([np.asarray(Image.open(out_dir / name).convert("RGB")) for name in names])
    run.set_reconstructions(images)
    return Run.open(run.path)


def _lowlevel_images(source, ids: np.ndarray) -> np.ndarray:
    """uint8 (n, H, W, 3) low-level images in the run's test order: a run's reconstructions or a .npy."""
    from pathlib import Path

    from brainrecon.runs import Run

    path = Path(source)
    if path.is_dir():
        other = Run.open(path)
        images = other.reconstructions()
        if images is None:
            raise BrainreconError(f"Run {other.name!r} (lowlevel) has no reconstructions.npy.", parameters=("lowlevel",))
        if not np.array_equal(other.test_ids(), ids):
            raise DataError(f"Run {other.name!r} (lowlevel) has other test images than this run.",
                            parameters=("lowlevel",))
    elif path.suffix == ".npy" and path.is_file():
        images = np.load(path, allow_pickle=False)
    else:
        raise BrainreconError(f"lowlevel={str(source)!r} is neither a run directory nor a .npy file.",
                              parameters=("lowlevel",))
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[0] != len(ids) or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise DataError(f"lowlevel images must be uint8 (n_test={len(ids)}, H, W, 3); got {images.dtype} "
                        f"{images.shape}.", parameters=("lowlevel",))
    return images


def run_negative_tokens(run) -> tuple[np.ndarray | None, str | None]:
    """The negative tokens a run's decoder carries (WeADL's ``unconditional_embeddings.pt``, kept by
    ``brainrecon import brainguard --negative-tokens``), and where they came from; (None, None) if none."""
    from safetensors import safe_open

    from brainrecon.io import read_json

    decoder_dir = run.path / "decoder"
    for path in sorted(decoder_dir.glob("subject-*.safetensors")):
        with safe_open(str(path), framework="numpy") as f:
            if "negative_tokens" in f.keys():  # noqa: SIM118 - a safetensors handle, not a dict
                config = read_json(decoder_dir / "brainrecon.json") if (decoder_dir / "brainrecon.json").is_file() else {}
                name = ((config.get("state") or {}).get("imported") or {}).get("negative_tokens", "negative_tokens")
                return np.asarray(f.get_tensor("negative_tokens"), dtype=np.float32), f"{name} (kept with the decoder)"
    return None, None
