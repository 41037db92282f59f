"""Images from target tokens and NeuroPictor's figures: ``brainrecon embed``, ``reconstruct``, ``neuropictor-sample``."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from brainrecon.errors import BrainreconError
from brainrecon.cli.common import (
    SUBJECTS_HELP, DataOpt, IPAdapterDirOpt, _log, _print_runs,
    _subjects_option, app, console,
)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": False})
def embed(
    ctx: typer.Context,
    data: Optional[str] = DataOpt,
    images: Optional[Path] = typer.Option(None, "--images", help="Embed every image of a .npy or HDF5 stimulus file (NSD's nsd_stimuli.hdf5; row index = image id) instead of a dataset."),
    images_key: Optional[str] = typer.Option(None, "--images-key", help="HDF5 dataset holding the images (default imgBrick)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Token cache directory; default: where `fit --target ipadapter` looks for this dataset. Required with --images."),
    subjects: Optional[List[str]] = typer.Option(None, "--subjects", "--subject", "-s", help=f"Subject(s) to embed: {SUBJECTS_HELP}; default: all."),
    ipadapter_dir: Optional[Path] = IPAdapterDirOpt,
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda (fp16 on CUDA)."),
    batch_size: int = typer.Option(32, "--batch-size", help="Images per encoder call."),
) -> None:
    """Compute IP-Adapter Plus tokens (16×768) of every image once, into a resumable cache."""
    from brainrecon.targets.ipadapter import embed_dataset, embed_images_file

    options = {"ipadapter_dir": str(ipadapter_dir) if ipadapter_dir else None, "device": device,
               "batch_size": batch_size}
    if images is not None:
        if out is None:
            raise BrainreconError("--images needs --out: the directory that receives the token cache.")
        path = embed_images_file(images, out, key=images_key, **options)
    else:
        path = embed_dataset(data, out=out, subjects=_subjects_option(subjects, ctx.args) or None, **options)
    console.print(f"IP-Adapter tokens cached in {path}")


@app.command()
def reconstruct(
    run: Path = typer.Argument(..., help="Run directory of a decoder fitted with --target ipadapter or --target clip."),
    recipe: Optional[str] = typer.Option(None, "--recipe", help="Cited generation settings: weadl (token runs); mindbridge | brainguard-released (CLIP runs). Explicit options win."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Denoising steps (default 50)."),
    guidance_scale: Optional[float] = typer.Option(None, "--guidance-scale", help="Classifier-free guidance scale (default 7.5)."),
    ip_adapter_scale: Optional[float] = typer.Option(None, "--ip-adapter-scale", help="Token runs: weight of the image-token attention (default 1.0)."),
    mix_ratio: Optional[float] = typer.Option(None, "--mix-ratio", help="CLIP runs: Versatile Diffusion's text/image mix ratio (default 0.5; 0 = image only)."),
    img2img_strength: Optional[float] = typer.Option(None, "--img2img-strength", help="CLIP runs with --lowlevel: share of the denoising done from the noised low-level image (default 0.85)."),
    lowlevel: Optional[Path] = typer.Option(None, "--lowlevel", help="CLIP runs: a run (its reconstructions) or .npy of low-level images in the test order, for img2img."),
    seed: int = typer.Option(0, "--seed", help="Image i uses seed + its test image id."),
    batch_size: int = typer.Option(8, "--batch-size", help="Images per denoising batch."),
    base_model: Optional[str] = typer.Option(None, "--base-model", help="Diffusers folder or repo id (default stable-diffusion-v1-5/stable-diffusion-v1-5; CLIP runs shi-labs/versatile-diffusion)."),
    vae: Optional[str] = typer.Option(None, "--vae", help="Token runs: separate VAE folder or repo id (e.g. stabilityai/sd-vae-ft-mse)."),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="Token runs: text prompt; unset = no text, image tokens only (WeADL). --prompt '' encodes the empty prompt."),
    negative_prompt: Optional[str] = typer.Option(None, "--negative-prompt", help="Negative text prompt (with --prompt)."),
    scheduler: Optional[str] = typer.Option(None, "--scheduler", help="ddim | pndm | euler | euler-ancestral | dpm++ | unipc (default ddim; CLIP runs unipc)."),
    ipadapter_dir: Optional[Path] = IPAdapterDirOpt,
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda (fp16 + SDPA on CUDA)."),
    resume: bool = typer.Option(True, "--resume/--no-resume", help="Reuse PNGs already made with the same settings."),
    evaluate: bool = typer.Option(False, "--evaluate/--no-evaluate", help="Score the images right away."),
) -> None:
    """Turn a run's predictions into images: IP-Adapter tokens through SD 1.5 + IP-Adapter Plus, CLIP states through Versatile Diffusion."""
    from brainrecon.workflows.reconstruct import reconstruct_run

    result = reconstruct_run(
        run, recipe=recipe, steps=steps, guidance_scale=guidance_scale, ip_adapter_scale=ip_adapter_scale,
        mix_ratio=mix_ratio, img2img_strength=img2img_strength, lowlevel=lowlevel, seed=seed,
        batch_size=batch_size, base_model=base_model, vae=vae, prompt=prompt, negative_prompt=negative_prompt,
        scheduler=scheduler, ipadapter_dir=str(ipadapter_dir) if ipadapter_dir else None, device=device,
        resume=resume,
    )
    console.print(f"wrote {result.info.get('n_test', '')} reconstructions to {result.path / 'reconstructions'} "
                  f"and {result.path / 'reconstructions.npy'}")
    if evaluate:
        from brainrecon.workflows import evaluate_run_safely, log_unavailable

        log_unavailable([evaluate_run_safely(result, log=_log)], _log)
        _print_runs([result.__class__.open(result.path)])
    else:
        console.print(f"score them with: brainrecon evaluate {run}")


# --- NeuroPictor commands (issue 6) ---
@app.command("neuropictor-sample")
def neuropictor_sample(
    run: Path = typer.Argument(..., help="Run directory of a NeuroPictor decoder."),
    swap_semantics: Optional[List[str]] = typer.Option(None, "--swap-semantics", help="A:B test-image positions: semantics from A, structure from B (repeatable)."),
    control_sweep: Optional[str] = typer.Option(None, "--control-sweep", help="Control scales, e.g. 0,0.25,0.5,0.75,1 (one grid column each)."),
    indices: str = typer.Option("0,1,2,3", "--indices", help="Test-image positions of the sweep rows."),
    out_dir: Optional[Path] = typer.Option(None, "--out-dir", help="Where the PNGs go (default: the run directory)."),
    data: Optional[str] = DataOpt,
) -> None:
    """NeuroPictor's manipulation figures: semantics swap (Fig. 2/7) and control-scale sweep (Fig. 1/6)."""
    from brainrecon.workflows.figures import parse_floats, parse_pairs, run_figures

    written = run_figures(
        run, swap_pairs=parse_pairs(swap_semantics or []),
        scales=parse_floats(control_sweep) if control_sweep else None,
        indices=[int(i) for i in parse_floats(indices, "--indices")], out_dir=out_dir, data=data,
    )
    for path in written.values():
        console.print(f"wrote {path}")
