"""Listing and describing decoders, and summarising datasets: ``brainrecon decoders``, ``brainrecon data``."""

from __future__ import annotations

from typing import Optional

import typer
from rich.table import Table

from brainrecon.cli.common import (
    DataOpt, app, console,
)


decoders_app = typer.Typer(help="List the registered decoders, or describe one.",
                           invoke_without_command=True)


data_app = typer.Typer(help="Inspect datasets.", no_args_is_help=True)


app.add_typer(decoders_app, name="decoders")


app.add_typer(data_app, name="data")


# ---------------------------------------------------------------------------- decoders / data
@decoders_app.callback()
def decoders(ctx: typer.Context) -> None:
    """List the registered decoders: what each predicts and its main parameters."""
    if ctx.invoked_subcommand is not None:
        return
    from brainrecon.decoders import describe

    table = Table(title="decoders")
    for col in ("name", "predicts", "summary", "main parameters (defaults)"):
        table.add_column(col)
    for row in describe():
        params = ", ".join(f"{k}={v!r}" for k, v in row["params"].items())
        table.add_row(row["name"], row["predicts"], row["summary"], params)
    console.print(table)


@decoders_app.command("describe")
def decoders_describe(name: str = typer.Argument(..., help="Decoder name, or a saved decoder (directory with brainrecon.json, or a run).")) -> None:
    """Describe one decoder in detail (parameters; NeuroPictor: component sizes), or a saved one (its settings; imported: what was assumed)."""
    from pathlib import Path as _Path

    from brainrecon.decoders import get_decoder_class

    saved = _Path(name)
    if (saved / "decoder" / "brainrecon.json").is_file():
        saved = saved / "decoder"
    if (saved / "brainrecon.json").is_file():
        _describe_saved(saved)
        return
    cls = get_decoder_class(name)
    console.print(f"[bold]{name}[/bold] — {cls.summary}")
    console.print(f"predicts: {cls.predicts}; multi-subject: {cls.multi_subject}")
    table = Table(title="parameters")
    table.add_column("parameter")
    table.add_column("default")
    for k, v in cls.default_params().items():
        table.add_row(k, repr(v))
    console.print(table)
    from brainrecon.decoders import recipes_for

    for recipe in recipes_for(name).values():
        rtable = Table(title=f"recipe {recipe.name} — {recipe.summary}".rstrip(" —"),
                       caption=f"source: {recipe.source}")
        rtable.add_column("parameter")
        rtable.add_column("value")
        rtable.add_column("note")
        for k, v in recipe.values.items():
            rtable.add_row(k, repr(v), recipe.notes.get(k, ""))
        console.print(rtable)
    extra = getattr(cls, "describe_text", None)
    if callable(extra):
        console.print(extra())


def _describe_saved(directory) -> None:
    """A saved decoder's configuration, read from its brainrecon.json (no weights are loaded)."""
    from brainrecon.io import read_json

    config = read_json(directory / "brainrecon.json", required=("decoder",))
    state = config.get("state") or {}
    console.print(f"[bold]saved {config['decoder']} decoder[/bold] at {directory}", highlight=False)
    console.print(f"subjects: {config.get('subjects')}; voxels: {config.get('n_voxels')}", highlight=False)
    table = Table(title="parameters")
    table.add_column("parameter")
    table.add_column("value")
    for k, v in (config.get("params") or {}).items():
        table.add_row(k, repr(v))
    console.print(table)
    imported = state.get("imported") or {}
    if imported:
        console.print(f"imported from {imported.get('file')} (layout {imported.get('layout')})", highlight=False)
        if imported.get("encoder_settings"):
            from brainrecon.decoders.neuropictor.official import encoder_settings_line

            console.print("  " + encoder_settings_line(imported["encoder_settings"]), markup=False, highlight=False)
        for line in imported.get("inferred") or ():
            console.print(f"  {line}", markup=False, highlight=False)
        for key, value in imported.items():
            if key not in ("file", "layout", "encoder_settings", "inferred"):
                console.print(f"  {key}: {value}", markup=False, highlight=False)


@data_app.command("info")
def data_info(data: Optional[str] = DataOpt) -> None:
    """Summarise a dataset per subject: source, voxels, images / single trials / repetitions per
    split, the validation split, the test set and its convention, the source's normalisation."""
    from brainrecon.data import load_dataset

    ds = load_dataset(data)
    info = ds.info()
    console.print(f"[bold]{info['name']}[/bold]  ({info['spec'].get('kind')}; NSD ids: {info['ids_are_nsd']})")
    console.print(f"normalisation: {info['normalisation']}")
    report = getattr(ds, "source_report", {})
    for s, row in info["subjects"].items():
        image = "×".join(map(str, row["image_shape"] or ())) or "none"
        console.print(f"[bold]subject {s}[/bold]: {row['n_voxels']} voxels; images {image}; captions "
                      f"{'yes' if row['captions'] else 'no'}; surfaces {'yes' if row['surfaces'] else 'no'}; "
                      f"fingerprint {row['fingerprint']}")
        for split, n in (("train", row["n_train"]), ("test", row["n_test"])):
            console.print(f"  {split}: {n} images; {_trials_text(row['trials'][split])}"
                          + (f"; test set: {row['test_convention']}" if split == "test" else ""))
        origin = ("the source's validation split" if row["validation"] == "source" else row["validation"])
        console.print(f"  validation: {row['n_validation']} training images ({origin})")
        notes = report.get(str(s))
        if notes:
            read = ", ".join(f"{k} {v}" for k, v in notes["samples"].items())
            console.print(f"  samples read: {read}; duplicates dropped: {notes['duplicates_dropped']}"
                          f" ({notes['duplicates_disagreeing']} disagreeing on their trials)")


def _trials_text(summary) -> str:
    if summary is None:
        return "no single trials (averages only)"
    reps = ", ".join(f"{k}×: {v}" for k, v in summary["repetitions"].items())
    return f"{summary['n_trials']} single trials (images seen {reps})"


@data_app.command("verify")
def data_verify(
    first: str = typer.Argument(..., help="First source (any --data value)."),
    second: str = typer.Argument(..., help="Second source (any --data value)."),
    subject: int = typer.Option(1, "--subject", help="Subject to compare."),
    max_images: int = typer.Option(64, "--max-images", help="Test images whose pixels are compared."),
) -> None:
    """Compare two sources of one subject: test ids and convention, voxel counts, per-voxel
    correlation of averaged betas over shared images, image equality after resizing."""
    from brainrecon.data import load_dataset
    from brainrecon.data.verify import verify_sources

    report = verify_sources(load_dataset(first, subjects=[subject]), load_dataset(second, subjects=[subject]),
                            subject, max_images=max_images)
    console.print(report.text(), markup=False, highlight=False)
    if not report.ok:
        raise typer.Exit(2)
