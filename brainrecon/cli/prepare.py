"""Preparing NSD: ``brainrecon prepare-nsd``, ``prepare-surfaces``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from brainrecon.cli.common import (
    PrepFormat, ZScore, app, console,
)


# --- NSD preparation commands (issue 7) ---
@app.command("prepare-nsd")
def prepare_nsd_command(
    nsd_root: Path = typer.Option(..., "--nsd-root", help="NSD root: the folder holding nsddata/, nsddata_betas/, nsddata_stimuli/."),
    subject: int = typer.Option(..., "--subject", "--subjects", "-s", help="Subject 1..8."),
    out: Path = typer.Option(..., "--out", help="Output directory."),
    sessions: Optional[str] = typer.Option(None, "--sessions", help="First K sessions, or 'all' (default: all; the first 37 with --test-set 982)."),
    test_set: Optional[int] = typer.Option(None, "--test-set", help="982 (shared images of sessions 1-37) or 1000 (all shared images shown; default)."),
    zscore: ZScore = typer.Option("none", "--zscore", help="none (raw NSD units, x300) | session (per-session, per-voxel z-score before averaging)."),
    captions: Optional[Path] = typer.Option(None, "--captions", help="COCO_73k_annots_curated.npy (73000 x 5 captions)."),
    format: PrepFormat = typer.Option("brainrecon", "--format", help="brainrecon | brain-diffuser (Brain-Diffuser's file names)."),
    beta_version: str = typer.Option("betas_fithrf_GLMdenoise_RR", "--beta-version", help="GLM folder of the betas."),
    ncsnr_threshold: Optional[float] = typer.Option(None, "--ncsnr-threshold", help="Keep nsdgeneral voxels with noise-ceiling SNR above this (the beta version's ncsnr.nii.gz), as MindEye2's preparation; recorded in the fingerprint."),
    keep_repetitions: bool = typer.Option(False, "--keep-repetitions", help="Also write every single trial (brainrecon format), for decoders that train on single trials."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace this subject's prepared files."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars."),
) -> None:
    """Prepare one NSD subject from the raw release (averaged betas, images, ids, captions); resumable."""
    from brainrecon.data.nsd import prepare_nsd

    r = prepare_nsd(nsd_root, subject, out, sessions=sessions, test_set=test_set, zscore=zscore,
                    captions=captions, format=format, beta_version=beta_version, overwrite=overwrite,
                    progress=progress, ncsnr_threshold=ncsnr_threshold, keep_repetitions=keep_repetitions)
    console.print(
        f"subject {r['subject']}: {r['n_train']} train / {r['n_test']} test images, {r['n_voxels']} voxels, "
        f"{r['n_sessions']} sessions ({r['format']} format) -> {r['out']}"
    )
    console.print(f"peak memory (process max RSS): {r['peak_memory_mb']:.0f} MB")


@app.command("prepare-surfaces")
def prepare_surfaces_command(
    source: Path = typer.Option(..., "--source", help="NeuroPictor's NSD folder (fmri_npy/) or NSD_full_brain folder (fmri/0N_norm.h5)."),
    subject: int = typer.Option(..., "--subject", "--subjects", "-s", help="Subject 1..8."),
    out: Path = typer.Option(..., "--out", help="brainrecon data directory (from prepare-nsd), or a new one for surfaces only."),
    duplicates: str = typer.Option("neuropictor", "--duplicates", help="neuropictor (train: last sample, test: first) | first | last | mean."),
    missing: str = typer.Option("error", "--missing", help="error | zero: rows whose image has no map."),
    test_ids: Optional[Path] = typer.Option(None, "--test-ids", help="Surfaces-only: test ids (.npy of 0-based ids, or nsd_expdesign.mat)."),
    vc_roi: Optional[Path] = typer.Option(None, "--vc-roi", help="vc_roi.npz (default: looked for next to the maps)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing surface maps of this subject."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars."),
) -> None:
    """Add NeuroPictor's released 2-D surface maps of one subject, matched by image id."""
    from brainrecon.data.surfaces import prepare_surfaces

    r = prepare_surfaces(source, subject, out, duplicates=duplicates, missing=missing, test_ids=test_ids,
                         vc_roi=vc_roi, overwrite=overwrite, progress=progress)
    gaps = sum(r["missing"].values())
    console.print(
        f"subject {r['subject']}: {r['n_train']} train / {r['n_test']} test surface maps ({r['mode']}, "
        f"{r['reader']} maps{f', {gaps} zero-filled' if gaps else ''}) -> {r['out']}"
    )
