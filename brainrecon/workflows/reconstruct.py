"""Reconstruct a run: its predicted IP-Adapter tokens turned into images, stored in the run.

The generator itself is :class:`brainrecon.generate.ipadapter.IPAdapterGenerator` (tokens in,
images out); this module reads a run's predictions and writes its reconstructions
(``brainrecon reconstruct RUN``).
"""

from __future__ import annotations

import os

import numpy as np

from brainrecon.errors import BrainreconError, DataError
from brainrecon.generate.ipadapter import DEFAULT_BASE_MODEL, IPAdapterGenerator
from brainrecon.io import jsonable
from brainrecon.targets.ipadapter import DEFAULT_REPO_ID

__all__ = ["RECON_DIR", "SETTINGS_FILE", "reconstruct_run"]

RECON_DIR = "reconstructions"
SETTINGS_FILE = "generation.json"


def reconstruct_run(run, *, steps: int = 50, guidance_scale: float = 7.5, ip_adapter_scale: float = 1.0,
                    seed: int = 0, batch_size: int = 8, base_model: str | None = None, vae: str | None = None,
                    prompt: str | None = None, negative_prompt: str | None = None, scheduler: str = "ddim",
                    ipadapter_dir: str | os.PathLike | None = None, device: str = "auto", dtype: str | None = None,
                    height: int | None = None, width: int | None = None, generator: IPAdapterGenerator | None = None,
                    progress: bool = True, resume: bool = True):
    """Turn a run's predicted IP-Adapter tokens into images, stored in the run.

    Reads ``predictions.npy`` (n_test, 16, 768); writes one PNG per test image under
    ``<run>/reconstructions/`` (``NNNN-id<image id>.png``, in test order) as it goes, then
    ``reconstructions.npy`` (uint8 (n_test, H, W, 3), aligned with ``test_ids.npy``) for the
    evaluation harness, and ``reconstructions/generation.json`` with every setting. Image
    ``i`` uses seed ``seed + test_ids[i]``. An interrupted call resumes: PNGs written with the
    same settings are reused (``resume=False`` regenerates them).

    Parameters
    ----------
    run : brainrecon.runs.Run or path-like
    steps, guidance_scale, ip_adapter_scale, prompt, negative_prompt, height, width, batch_size
        See :meth:`IPAdapterGenerator.generate`.
    seed : int
    base_model, vae, scheduler, device, dtype
        See :class:`IPAdapterGenerator` (``base_model`` default :data:`DEFAULT_BASE_MODEL`).
    ipadapter_dir : path-like, optional
        Default: the ``ipadapter_dir`` of the run's target options, else the hub.
    generator : IPAdapterGenerator, optional
        A loaded generator to reuse (the weight options above are then ignored).

    Returns
    -------
    brainrecon.runs.Run
        The run, re-opened.
    """
    from PIL import Image

    from brainrecon.io import atomic_path, read_json, write_json_atomic
    from brainrecon.runs import Run

    run = run if isinstance(run, Run) else Run.open(run)
    target = run.info.get("target")
    if target != "ipadapter":
        raise BrainreconError(
            f"Run {run.name!r} predicts {target or run.info.get('predicts')!r}, not IP-Adapter tokens; "
            f"`brainrecon reconstruct` is for runs fitted with --target ipadapter."
        )
    pred = run.predictions()
    if pred is None:
        raise BrainreconError(f"Run {run.name!r} has no predictions.npy; re-run `brainrecon fit`.")
    ids = run.test_ids()
    pred = np.asarray(pred, dtype=np.float32)
    if len(pred) != len(ids):
        raise DataError(f"Run {run.name!r}: {len(pred)} predictions for {len(ids)} test ids.")
    options = dict((run.info.get("params") or {}).get("target_options") or {})
    if generator is None:
        generator = IPAdapterGenerator(
            base_model or DEFAULT_BASE_MODEL, vae=vae,
            ipadapter_dir=ipadapter_dir if ipadapter_dir is not None else options.get("ipadapter_dir"),
            repo_id=options.get("repo_id", DEFAULT_REPO_ID), weight_name=options.get("weight_name"),
            revision=options.get("revision"), scheduler=scheduler, device=device, dtype=dtype,
            dim_head=options.get("dim_head", 64),
        )
    seeds = int(seed) + ids.astype(np.int64)
    settings = generator.settings(
        steps=int(steps), guidance_scale=float(guidance_scale), ip_adapter_scale=float(ip_adapter_scale),
        seed=int(seed), seeds="seed + test image id", prompt=prompt, negative_prompt=negative_prompt,
        text="none (all-zero text embeddings)" if prompt is None else "encoded prompt",
        height=height, width=width, device=generator.device,
    )
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
        generator.generate(pred[todo], seeds=seeds[todo], prompt=prompt, negative_prompt=negative_prompt,
                           steps=steps, guidance_scale=guidance_scale, ip_adapter_scale=ip_adapter_scale,
                           batch_size=batch_size, height=height, width=width, progress=progress,
                           callback=save_pngs)
    images = np.stack([np.asarray(Image.open(out_dir / name).convert("RGB")) for name in names])
    run.set_reconstructions(images)
    return Run.open(run.path)
