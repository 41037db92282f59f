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
def decoders_describe(name: str = typer.Argument(..., help="Decoder name.")) -> None:
    """Describe one decoder in detail (parameters; NeuroPictor: component sizes)."""
    from brainrecon.decoders import get_decoder_class

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


@data_app.command("info")
def data_info(data: Optional[str] = DataOpt) -> None:
    """Summarise a dataset: subjects, counts, voxels, image size, fingerprints."""
    from brainrecon.data import load_dataset

    ds = load_dataset(data)
    info = ds.info()
    console.print(f"[bold]{info['name']}[/bold]  ({info['spec'].get('kind')}; NSD ids: {info['ids_are_nsd']})")
    table = Table()
    for col in ("subject", "train", "test", "voxels", "image", "captions", "surfaces", "fingerprint"):
        table.add_column(col)
    for s, row in info["subjects"].items():
        table.add_row(str(s), str(row["n_train"]), str(row["n_test"]), str(row["n_voxels"]),
                      "×".join(map(str, row["image_shape"] or ())) or "–",
                      "yes" if row["captions"] else "no", "yes" if row["surfaces"] else "no",
                      row["fingerprint"])
    console.print(table)
