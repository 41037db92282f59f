"""Importing published models: ``brainrecon import neuropictor`` and ``brainrecon import brainguard``."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from brainrecon.cli.common import (
    SUBJECTS_HELP, _log, _print_runs,
    _subjects_option, app, console,
)


# --- NeuroPictor import (issue 10) ---
import_app = typer.Typer(help="Convert published models into saved brainrecon decoders.", no_args_is_help=True)


app.add_typer(import_app, name="import")


@import_app.command("neuropictor", context_settings={"allow_extra_args": True, "ignore_unknown_options": False})
def import_neuropictor_command(
    ctx: typer.Context,
    checkpoint: Path = typer.Option(..., "--checkpoint", help="Official file: finetune_single_sub/sub0N/epoch_015.pth, pretrain_multi_sub/sub_all_womask/epoch_080.pth or SD21/control_sd21_ini.ckpt."),
    out: Path = typer.Option(..., "--out", help="Directory that receives the saved decoder (brainrecon.json + safetensors)."),
    encoder: Optional[Path] = typer.Option(None, "--encoder", help="fMRI2fMRI_UKB/checkpoint_120000.pth, for a file without an fMRI encoder (control_sd21_ini.ckpt)."),
    encoder_config: Optional[Path] = typer.Option(None, "--encoder-config", help="fMRI2fMRI_UKB/fMRI_AutoEncoder.yaml (heads, dropout; sizes are checked against the tensors)."),
    base_model: Optional[str] = typer.Option(None, "--base-model", help="The frozen SD 2.1-base: local diffusers folder or repo id (default stabilityai/stable-diffusion-2-1-base)."),
    subjects: Optional[List[str]] = typer.Option(None, "--subjects", "--subject", "-s", help=f"Subject(s) the model decodes: {SUBJECTS_HELP} (default: subNN in the path, else 1-8)."),
    check: bool = typer.Option(False, "--check", help="Print, on one fixed input, the differences between the converted modules and the file's own tensors."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace --out (and the runs)."),
    data: Optional[str] = typer.Option(None, "--data", help="Also reconstruct this dataset's test split and write runs (for evaluate / neuropictor-sample)."),
    runs: Path = typer.Option(Path("runs"), "--runs", help="With --data: folder of the runs."),
    name: Optional[str] = typer.Option(None, "--name", help="With --data: run name (default neuropictor-official-subjNN)."),
    evaluate: bool = typer.Option(False, "--evaluate/--no-evaluate", help="With --data: score the runs."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu | cuda | auto (reconstruction with --data)."),
) -> None:
    """Import a released NeuroPictor model (strict: every key mapped or explicitly ignored)."""
    from brainrecon.decoders import load_decoder
    from brainrecon.workflows.importers import import_neuropictor, write_runs

    path, report = import_neuropictor(checkpoint, out, overwrite=overwrite, encoder=encoder,
                                      encoder_config=encoder_config, base_model=base_model,
                                      subjects=_subjects_option(subjects, ctx.args) or None, check=check,
                                      params={"device": device} if device else None)
    for line in report.lines():
        console.print(line, markup=False, highlight=False)
    console.print(f"wrote {path}")
    if data is not None:
        written = write_runs(load_decoder(path), data=data, out=runs, name=name, overwrite=overwrite,
                             evaluate=evaluate, log=_log)
        _print_runs(written)


@import_app.command("brainguard")
def import_brainguard_command(
    checkpoint: Path = typer.Option(..., "--checkpoint", help="BrainGuard's client1_best.pth (Zhibo2333/Brainguard; subjects 1, 2, 5, 7) or WeADL's model.pth (ig16/visual-brain-decoding-1)."),
    out: Path = typer.Option(..., "--out", help="Directory that receives the saved decoder (brainrecon.json + safetensors)."),
    subject: Optional[int] = typer.Option(None, "--subject", "-s", help="Subject the file decodes (default: the one whose voxel count equals the file's input width; checked either way)."),
    layout: Optional[str] = typer.Option(None, "--layout", help="brainguard (two branches, CLIP image + text states) | weadl (16x768 IP-Adapter tokens); default: detected from the keys."),
    negative_tokens: Optional[Path] = typer.Option(None, "--negative-tokens", help="WeADL's unconditional_embeddings.pt: the negative tokens `brainrecon reconstruct` uses for this model's runs."),
    ipadapter_dir: Optional[Path] = typer.Option(None, "--ipadapter-dir", help="Local h94/IP-Adapter copy for the WeADL model's target (recorded for reconstruct and fit --init-from)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace --out (and the runs)."),
    data: Optional[str] = typer.Option(None, "--data", help="Check the voxel count against this dataset, predict its test split and write runs (for reconstruct / evaluate)."),
    runs: Path = typer.Option(Path("runs"), "--runs", help="With --data: folder of the runs."),
    name: Optional[str] = typer.Option(None, "--name", help="With --data: run name (default brainguard-official-subjNN / weadl-official-subjNN)."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu | cuda | auto (prediction with --data)."),
) -> None:
    """Import a released BrainGuard or WeADL model (strict: every key mapped, voxel count checked)."""
    from brainrecon.workflows.importers import import_brainguard, write_runs

    path, report, decoder = import_brainguard(
        checkpoint, out, subject=subject, layout=layout, negative_tokens=negative_tokens, data=data,
        target_options={"ipadapter_dir": str(ipadapter_dir.resolve())} if ipadapter_dir else None,
        params={"device": device} if device else None, overwrite=overwrite)
    for line in report.lines():
        console.print(line, markup=False, highlight=False)
    console.print(f"wrote {path}")
    if data is not None:
        written = write_runs(decoder, data=data, out=runs, name=name, overwrite=overwrite, log=_log)
        _print_runs(written)
        console.print(f"turn the predictions into images with: brainrecon reconstruct {written[0].path}"
                      + (" --recipe weadl" if report.layout == "weadl" else " --recipe mindbridge"))
