"""Fitting and predicting: ``brainrecon fit`` (with each decoder's own options), ``predict``, ``demo``."""

from __future__ import annotations

from pathlib import Path
from typing import Any, List, Optional

import typer
from typer.core import TyperCommand

from brainrecon.decoders import available as available_decoders
from brainrecon.errors import BrainreconError
from brainrecon.targets import available_targets
from brainrecon.cli.common import (
    SUBJECTS_HELP, DataOpt, Engine, NanPolicy, _log, _parse_value, _print_runs,
    _registry_choice, _subjects_option, app, console,
)


# ---------------------------------------------------------------------------- fit / predict
class _FitCommand(TyperCommand):
    """``fit`` with each registered decoder's own options (``Decoder.cli_options``), shown in
    a help panel per decoder; their values reach the command through ``ctx.meta``."""

    def _decoder_params(self, ctx) -> list:
        if "decoder_params" not in ctx.meta:
            ctx.meta["decoder_params"] = _decoder_cli_params({p.name for p in self.params})
        return [p for p, _ in ctx.meta["decoder_params"]]

    def get_params(self, ctx):
        params = super().get_params(ctx)
        for param in params:  # choices read from the registries when used (plugins included)
            if param.name == "decoder":
                param.type = _registry_choice(available_decoders)
            elif param.name == "target":
                param.type = _registry_choice(available_targets)
        return params[:-1] + self._decoder_params(ctx) + params[-1:]  # --help stays last

    def invoke(self, ctx):
        self._decoder_params(ctx)
        given = {}
        for param, owners in ctx.meta["decoder_params"]:
            value = ctx.params.pop(param.name, None)
            if value is not None:
                given[param.name] = (param.opts[0], value, owners)
        ctx.meta["decoder_options"] = given
        return super().invoke(ctx)


def _decoder_cli_params(taken: set[str]) -> list:
    """click options for every decoder's ``cli_options``: (option, {decoder: CliOption})."""
    import click

    from brainrecon.decoders import available, decoder_cli_options

    types = {"int": click.INT, "float": click.FLOAT, "str": click.STRING, "path": click.STRING,
             "floats": click.STRING}
    by_flag: dict[str, dict] = {}
    for name in available():
        try:
            options = decoder_cli_options(name)  # built-ins' without importing them (fit --help stays fast)
        except BrainreconError:
            continue  # a broken plugin: `brainrecon decoders` reports it
        for opt in options:
            by_flag.setdefault(opt.flag, {})[name] = opt
    out = []
    for flag, owners in by_flag.items():
        dest = "decoder_opt_" + flag.lstrip("-").replace("-", "_")
        if dest in taken:
            continue
        first = next(iter(owners.values()))
        kind = click.Choice(list(first.choices)) if first.choices else types.get(first.kind, click.STRING)
        names = " / ".join(owners)
        option = click.Option([flag, dest], type=kind, default=None, help=f"{names}: {first.help}.", show_choices=True)
        option.rich_help_panel = f"{names} options"  # read by typer's help formatter (any typer version)
        out.append((option, owners))
    return out


def _decoder_option_values(ctx, decoder: str) -> dict[str, Any]:
    """The decoder parameters given through decoder options; an option of another decoder is an error."""
    values = {}
    for flag, value, owners in (ctx.meta.get("decoder_options") or {}).values():
        if decoder not in owners:
            raise BrainreconError(f"{flag} is an option of {', '.join(owners)}, not of {decoder!r}; "
                                  f"see `brainrecon fit --help`, or pass --param name=value.")
        opt = owners[decoder]
        if opt.kind == "floats":
            try:
                value = [float(v) for v in str(value).split(",") if v.strip()]
            except ValueError:
                raise BrainreconError(f"{flag} expects comma-separated numbers, got {value!r}.") from None
        values[opt.param] = value
    return values


@app.command(cls=_FitCommand, context_settings={"allow_extra_args": True, "ignore_unknown_options": False})
def fit(
    ctx: typer.Context,
    decoder: str = typer.Option(..., "--decoder", "-d", help=f"Decoder: {' | '.join(available_decoders())} (see `brainrecon decoders`)."),
    data: Optional[str] = DataOpt,
    subjects: Optional[List[str]] = typer.Option(None, "--subjects", "--subject", "-s", help=f"Subject(s): {SUBJECTS_HELP} (default: the data's first subject; multi-subject decoders: all; the synthetic data has NSD's subjects 1-8, by default 1, 2, 5, 7)."),
    target: Optional[str] = typer.Option(None, "--target", "-t", help="Target space for token/pixel decoders: pixels | ipadapter | clip (default: the recipe's, or with brainguard --init-from the saved decoder's, else pixels)."),
    out: Path = typer.Option(Path("runs"), "--out", help="Directory that receives the run directories."),
    name: Optional[str] = typer.Option(None, "--name", help="Run name (default <decoder>-subjXX-<target>)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing runs of the same name."),
    evaluate: bool = typer.Option(True, "--evaluate/--no-evaluate", help="Score the reconstructions."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed of the fit (default: the decoder's own, 0 for the built-ins); recorded in run.json."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu | cuda | auto."),
    nan_policy: Optional[NanPolicy] = typer.Option(None, "--nan-policy", help="error | zero: what to do with NaN voxels."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Training batch size."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted training from its last checkpoint."),
    checkpoint_dir: Optional[Path] = typer.Option(None, "--checkpoint-dir", help="Where training checkpoints go."),
    ipadapter_dir: Optional[Path] = typer.Option(None, "--ipadapter-dir", help="--target ipadapter: local copy of h94/IP-Adapter (default: the Hugging Face hub)."),
    param: Optional[List[str]] = typer.Option(None, "--param", "-p", help="Any decoder parameter as key=value (JSON values)."),
    recipe: Optional[str] = typer.Option(None, "--recipe", help="A named, cited preset of the decoder's parameters (see `brainrecon decoders describe DECODER`); explicit options win."),
    # Help texts are rich markup: a literal "[" is written "\\[" (else "[federated]" vanishes).
    engine: Engine = typer.Option("local", "--engine", help="brainguard: local (in-process, default) | flower (a SuperLink and one SuperNode per subject on 127.0.0.1; needs brainrecon\\[federated])."),
) -> None:
    """Fit a decoder, predict the test split, reconstruct, score, and write runs."""
    from brainrecon import workflows

    subjects = _subjects_option(subjects, ctx.args)
    params: dict[str, Any] = {}
    named = {
        "seed": seed, "device": device, "nan_policy": nan_policy, "batch_size": batch_size,
        "checkpoint_dir": str(checkpoint_dir) if checkpoint_dir else None,
    }
    params.update({k: v for k, v in named.items() if v is not None})
    if resume:
        params["resume"] = True
    params.update(_decoder_option_values(ctx, decoder))
    for item in param or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise BrainreconError(f"--param expects key=value, got {item!r}.")
        params[key.replace("-", "_")] = _parse_value(value)
    if ipadapter_dir is not None:
        if target != "ipadapter":
            raise BrainreconError("--ipadapter-dir is for --target ipadapter.")
        params["target_options"] = {**params.get("target_options", {}), "ipadapter_dir": str(ipadapter_dir)}
    runs = workflows.fit(
        decoder, data=data, subjects=subjects or None, target=target, out=out, name=name,
        overwrite=overwrite, params=params, recipe=recipe, evaluate=evaluate, log=_log, engine=engine,
    )
    _print_runs(runs)


@app.command()
def predict(
    run: str = typer.Argument(..., help="Run directory, or hf://owner/name[@revision] of a published run."),
    data: Optional[str] = DataOpt,
    out: Path = typer.Option(..., "--out", help="Output .npy file; the test image ids go beside it (pred.npy -> pred_ids.npy)."),
    overwrite: bool = typer.Option(False, "--overwrite"),
) -> None:
    """Predict a dataset's test split with a run's decoder."""
    from brainrecon import workflows

    path = workflows.predict(run, data=data, out=out, overwrite=overwrite)
    console.print(f"wrote {path} (predictions) and {workflows.prediction_ids_path(path)} (their test image ids, "
                  "same order)", markup=False, soft_wrap=True)


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
    typer.echo(result["leaderboard"], nl=False)  # plain text: a wide table must not be re-wrapped
    console.print(f"picture grid: {result['grid']}")
