"""The ``brainrecon`` command line: thin commands over library functions.

Domain errors (:class:`~brainrecon.errors.BrainreconError`) print one red line and exit
with code 1; set ``BRAINRECON_DEBUG=1`` to see the traceback.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, List, Optional

import typer
from rich.console import Console
from rich.table import Table
from typer.core import TyperGroup

from brainrecon.errors import BrainreconError

console = Console(stderr=False, highlight=False)
err_console = Console(stderr=True, highlight=False)

METRIC_NAMES = ("PixCorr", "SSIM", "AlexNet(2)", "AlexNet(5)", "Inception", "CLIP", "EffNet-B", "SwAV")


class _Group(TyperGroup):
    """Turns a domain error anywhere below into one red line and exit code 1."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except BrainreconError as exc:
            if os.environ.get("BRAINRECON_DEBUG"):
                raise
            err_console.print(f"[red]error:[/red] {exc}", soft_wrap=True)
            raise typer.Exit(1) from None


app = typer.Typer(
    cls=_Group,
    name="brainrecon",
    help="Reconstruct the images a person saw from their fMRI responses.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
decoders_app = typer.Typer(help="List the registered decoders, or describe one.",
                           invoke_without_command=True)
data_app = typer.Typer(help="Inspect datasets.", no_args_is_help=True)
app.add_typer(decoders_app, name="decoders")
app.add_typer(data_app, name="data")

DataOpt = typer.Option(None, "--data", help="Prepared data directory or .h5 file (default: $BRAINRECON_DATA, else the built-in synthetic dataset).")


def _log(message: str) -> None:
    console.print(f"[dim]·[/dim] {message}")


def _parse_value(text: str) -> Any:
    import json

    try:
        return json.loads(text)
    except ValueError:
        return text


def _extra_subjects(ctx: typer.Context) -> list[int]:
    """``--subjects 1 2 5 7``: typer takes the first value, the rest arrive as extra args."""
    extra = []
    for arg in ctx.args:
        try:
            extra.append(int(arg))
        except ValueError:
            raise BrainreconError(f"Unexpected argument {arg!r}.") from None
    return extra


# ---------------------------------------------------------------------------- fit / predict
@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": False})
def fit(
    ctx: typer.Context,
    decoder: str = typer.Option(..., "--decoder", "-d", help="Decoder name; see `brainrecon decoders`."),
    data: Optional[str] = DataOpt,
    subjects: Optional[List[int]] = typer.Option(None, "--subjects", "--subject", "-s", help="Subject(s): --subjects 1 2 5 7."),
    target: str = typer.Option("pixels", "--target", "-t", help="Target space for token/pixel decoders: pixels | ipadapter."),
    out: Path = typer.Option(Path("runs"), "--out", help="Directory that receives the run directories."),
    name: Optional[str] = typer.Option(None, "--name", help="Run name (default <decoder>-subjXX-<target>)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing runs of the same name."),
    evaluate: bool = typer.Option(True, "--evaluate/--no-evaluate", help="Score the reconstructions."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed (decoders that use one)."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu | cuda | auto."),
    nan_policy: Optional[str] = typer.Option(None, "--nan-policy", help="error | zero: what to do with NaN voxels."),
    alphas: Optional[str] = typer.Option(None, "--alphas", help="ridge: comma-separated alpha grid."),
    rounds: Optional[int] = typer.Option(None, "--rounds", help="brainguard: federated rounds."),
    local_iterations: Optional[int] = typer.Option(None, "--local-iterations", help="brainguard: local epochs per round."),
    sync_layers: Optional[int] = typer.Option(None, "--sync-layers", help="brainguard: parameter tensors adaptively tuned."),
    hidden: Optional[int] = typer.Option(None, "--hidden", help="brainguard: hidden width."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Training batch size."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted training from its last checkpoint."),
    checkpoint_dir: Optional[Path] = typer.Option(None, "--checkpoint-dir", help="Where training checkpoints go."),
    stage: Optional[str] = typer.Option(None, "--stage", help="neuropictor: encoder | pretrain | finetune | cfg."),
    init_from: Optional[Path] = typer.Option(None, "--init-from", help="neuropictor: saved decoder (run/decoder) of the previous stage."),
    param: Optional[List[str]] = typer.Option(None, "--param", "-p", help="Any decoder parameter as key=value (JSON values)."),
) -> None:
    """Fit a decoder, predict the test split, reconstruct, score, and write runs."""
    from brainrecon import workflows

    subjects = list(subjects or []) + _extra_subjects(ctx)
    params: dict[str, Any] = {}
    named = {
        "seed": seed, "device": device, "nan_policy": nan_policy, "rounds": rounds,
        "local_iterations": local_iterations, "sync_layers": sync_layers, "hidden": hidden,
        "batch_size": batch_size, "stage": stage,
        "checkpoint_dir": str(checkpoint_dir) if checkpoint_dir else None,
        "init_from": str(init_from) if init_from else None,
    }
    params.update({k: v for k, v in named.items() if v is not None})
    if resume:
        params["resume"] = True
    if alphas:
        params["alphas"] = [float(a) for a in alphas.split(",")]
    for item in param or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise BrainreconError(f"--param expects key=value, got {item!r}.")
        params[key.replace("-", "_")] = _parse_value(value)
    runs = workflows.fit(
        decoder, data=data, subjects=subjects or None, target=target, out=out, name=name,
        overwrite=overwrite, params=params, evaluate=evaluate, log=_log,
    )
    _print_runs(runs)


def _print_runs(runs) -> None:
    table = Table(title="runs")
    table.add_column("run")
    table.add_column("subject", justify="right")
    shown = [m for m in METRIC_NAMES if any((r.metrics() or {}).get("metrics", r.metrics() or {}).get(m) is not None for r in runs)]
    for m in shown:
        table.add_column(m, justify="right")
    for r in runs:
        metrics = r.metrics() or {}
        values = metrics.get("metrics", metrics)
        table.add_row(r.name, str(r.subject), *[_fmt(values.get(m)) for m in shown])
    console.print(table)


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


@app.command()
def predict(
    run: Path = typer.Argument(..., help="Run directory."),
    data: Optional[str] = DataOpt,
    out: Path = typer.Option(..., "--out", help="Output .npy file."),
    overwrite: bool = typer.Option(False, "--overwrite"),
) -> None:
    """Predict a dataset's test split with a run's decoder."""
    from brainrecon import workflows

    path = workflows.predict(run, data=data, out=out, overwrite=overwrite)
    console.print(f"wrote {path}")


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


# ---------------------------------------------------------------------------- demo
@app.command()
def demo(
    out: Path = typer.Option(Path("brainrecon-demo"), "--out", help="Directory for the demo's runs and pictures."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an earlier demo in --out."),
    quick: bool = typer.Option(False, "--quick", help="Smaller data and fewer epochs (for tests)."),
) -> None:
    """Fit the decoders on the built-in synthetic dataset, score them, rank them, draw a grid."""
    from brainrecon.demo import run_demo

    result = run_demo(out, overwrite=overwrite, quick=quick, log=_log)
    console.print(result["leaderboard"])
    console.print(f"picture grid: {result['grid']}")


# --- evaluation commands (issue 3) ---

# --- IP-Adapter commands (issue 4) ---

# --- NSD preparation commands (issue 7) ---

# --- NeuroPictor commands (issue 6) ---


def main() -> None:
    """Console entry point (``brainrecon``)."""
    app()


if __name__ == "__main__":
    main()
