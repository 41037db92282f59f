"""The ``brainrecon`` command line: thin commands over library functions.

Domain errors (:class:`~brainrecon.errors.BrainreconError`) print one red line and exit
with code 1; set ``BRAINRECON_DEBUG=1`` to see the traceback.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, List, Literal, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from typer.core import TyperCommand, TyperGroup

from brainrecon.decoders import available as available_decoders
from brainrecon.targets import available_targets
from brainrecon.errors import BrainreconError
from brainrecon.federate_cli import federate_app

console = Console(stderr=False, highlight=False)
err_console = Console(stderr=True, highlight=False)

METRIC_NAMES = ("PixCorr", "SSIM", "AlexNet(2)", "AlexNet(5)", "Inception", "CLIP", "EffNet-B", "SwAV")
# Typed choices as Literal annotations (typer turns them into click choices: help lists the
# values and a typo is refused with the valid list; works across typer versions).
Metric = Literal["PixCorr", "SSIM", "AlexNet(2)", "AlexNet(5)", "Inception", "CLIP", "EffNet-B", "SwAV"]
SortKey = Literal["rank", "PixCorr", "SSIM", "AlexNet(2)", "AlexNet(5)", "Inception", "CLIP", "EffNet-B", "SwAV",
                  "ImageRet(target)", "BrainRet(target)", "ImageRet(CLIP)", "BrainRet(CLIP)"]
Variant = Literal["mindeye", "braindiffuser"]
SsimMode = Literal["2d", "columnwise"]
BoardFormat = Literal["table", "markdown", "csv", "html"]
UrlFormat = Literal["list", "sh"]
NanPolicy = Literal["error", "zero"]
Engine = Literal["local", "flower"]
ZScore = Literal["none", "session"]
PrepFormat = Literal["brainrecon", "brain-diffuser"]


class _Group(TyperGroup):
    """Turns a domain error anywhere below into one red line and exit code 1."""

    def invoke(self, ctx):
        import warnings

        from brainrecon.errors import DamagedCacheWarning
        from brainrecon.runs import BrokenRunWarning

        def _show(message, category, *args, **kwargs):
            if issubclass(category, (BrokenRunWarning, DamagedCacheWarning)):
                err_console.print(f"[yellow]warning:[/yellow] {escape(str(message))}", soft_wrap=True)
            else:
                _default_showwarning(message, category, *args, **kwargs)

        _default_showwarning = warnings.showwarning
        warnings.showwarning = _show
        try:
            return super().invoke(ctx)
        except BrainreconError as exc:
            if os.environ.get("BRAINRECON_DEBUG"):
                raise
            err_console.print(f"[red]error:[/red] {escape(str(exc))}", soft_wrap=True)
            raise typer.Exit(1) from None
        except ImportError as exc:
            from brainrecon.extras import missing_extra_message

            message = missing_extra_message(exc)
            if message is None or os.environ.get("BRAINRECON_DEBUG"):
                raise
            err_console.print(f"[red]error:[/red] {escape(message)}", soft_wrap=True)
            raise typer.Exit(1) from None
        finally:
            warnings.showwarning = _default_showwarning


app = typer.Typer(
    cls=_Group,
    name="brainrecon",
    help="Reconstruct the images a person saw from their fMRI responses.",
    no_args_is_help=True,
    add_completion=True,  # --install-completion / --show-completion for bash, zsh, fish, PowerShell
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        from brainrecon import __version__

        console.print(f"brainrecon {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print brainrecon's version and exit."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars (same as TQDM_DISABLE=1)."),
) -> None:
    """Reconstruct the images a person saw from their fMRI responses."""
    if quiet:
        os.environ["TQDM_DISABLE"] = "1"


decoders_app = typer.Typer(help="List the registered decoders, or describe one.",
                           invoke_without_command=True)
data_app = typer.Typer(help="Inspect datasets.", no_args_is_help=True)
app.add_typer(decoders_app, name="decoders")
app.add_typer(data_app, name="data")
app.add_typer(federate_app, name="federate")

DataOpt = typer.Option(None, "--data", help="Prepared data directory or .h5 file (default: $BRAINRECON_DATA, else the built-in synthetic dataset: NSD's subjects 1-8, 1, 2, 5, 7 by default).")


def _registry_choice(names):
    """A typed choice read from a registry at use time (plugins installed later are accepted)."""
    import click

    class _RegistryChoice(click.Choice):
        @property
        def choices(self):
            return tuple(names())

        @choices.setter
        def choices(self, value):  # click's __init__ assigns the initial list; the registry wins
            pass

    return _RegistryChoice([], case_sensitive=True)


def _log(message: str) -> None:
    console.print(f"[dim]·[/dim] {message}")


def _parse_value(text: str) -> Any:
    import json

    try:
        return json.loads(text)
    except ValueError:
        return text


def _subjects_option(values: Optional[List[str]], extra: List[str]) -> List[int]:
    """Subject numbers however given: ``--subjects 1,2``, ``--subjects 1 2`` (the values after the
    first arrive in ``extra``) or ``--subject 1 --subject 2``, in that order, without repeats."""
    out: List[int] = []
    for value in [*(values or []), *extra]:
        for item in str(value).split(","):
            item = item.strip()
            if not item:
                continue
            try:
                number = int(item)
            except ValueError:
                raise BrainreconError(f"{item!r} is not a subject number; give subjects as --subjects 1,2 or "
                                      f"--subjects 1 2 or --subject 1 --subject 2.") from None
            if number not in out:
                out.append(number)
    return out


SUBJECTS_HELP = "--subjects 1,2 or --subjects 1 2 or --subject 1 --subject 2"


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
    target: str = typer.Option("pixels", "--target", "-t", help="Target space for token/pixel decoders: pixels | ipadapter."),
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


def _print_runs(runs) -> None:
    table = Table(title="runs")
    table.add_column("run")
    table.add_column("subject", justify="right")
    reports = [r.metrics() or {} for r in runs]
    shown = [m for m in METRIC_NAMES if any(report.get(m) is not None for report in reports)]
    for m in shown:
        table.add_column(m, justify="right")
    for r, report in zip(runs, reports):
        table.add_row(r.name, str(r.subject), *[_fmt(report.get(m)) for m in shown])
    console.print(table)


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


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
    from brainrecon.recipes import recipes_for

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


# --- evaluation commands (issue 3) ---
WeightsDirOpt = typer.Option(None, "--weights-dir", help="Folder with metric weight files, searched before the torch hub / Hugging Face caches (see `brainrecon weights`).")


@app.command("evaluate")
def evaluate_cmd(
    run: Path = typer.Argument(..., help="Run directory (with reconstructions.npy)."),
    variant: Variant = typer.Option("mindeye", "--variant", help="Preprocessing recipe: mindeye (writes metrics.json, per_image.csv) | braindiffuser (writes metrics-braindiffuser.json, per_image-braindiffuser.csv; the MindEye report stays)."),
    weights_dir: Optional[Path] = WeightsDirOpt,
    strict: bool = typer.Option(False, "--strict", help="Fail if any metric's weights are missing instead of reporting it unavailable."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N."),
    metric: Optional[List[str]] = typer.Option(None, "--metric", "-m", help="Only this metric (repeatable), e.g. -m PixCorr -m SSIM."),
    batch_size: int = typer.Option(32, "--batch-size", help="Images per network forward pass."),
    data: Optional[str] = typer.Option(None, "--data", help="Where the run's dataset is now, if it moved since the fit."),
    download: bool = typer.Option(False, "--download", help="Download missing metric weights (off by default; same as BRAINRECON_ALLOW_DOWNLOADS=1)."),
    ssim_mode: Optional[SsimMode] = typer.Option(None, "--ssim-mode", help="2d | columnwise (default: 2d for mindeye, columnwise for braindiffuser)."),
    blend: Optional[Path] = typer.Option(None, "--blend", help="MindEye2's enhanced evaluation: blend 25% of these images (a run directory or a .npy in the run's test order) into the reconstructions."),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="Ground-truth feature cache (default $BRAINRECON_CACHE/eval or ~/.cache/brainrecon/eval)."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Do not read or write the ground-truth feature cache."),
    bootstrap: int = typer.Option(2000, "--bootstrap", min=100, help="Bootstrap resamples for the 95% intervals."),
    seed: int = typer.Option(0, "--seed", help="Seed of the bootstrap."),
    sort_by: Optional[Metric] = typer.Option(None, "--sort-by", help="Also draw the worst (or --best) images by this metric, e.g. CLIP."),
    worst: Optional[int] = typer.Option(None, "--worst", min=1, help="With --sort-by: this many images, worst first (default 8)."),
    best: Optional[int] = typer.Option(None, "--best", min=1, help="With --sort-by: this many images, best first."),
    grid_images: int = typer.Option(8, "--grid-images", min=1, help="Test images shown in grid.png (the first ones in test order, each labelled with its id)."),
) -> None:
    """(Re)compute a run's metrics.json, per_image.csv and grid.png from its saved reconstructions.

    Each variant keeps its own report: --variant braindiffuser writes metrics-braindiffuser.json
    and per_image-braindiffuser.csv beside the MindEye ones.

    RUN may also be a folder of runs: each is evaluated in turn; a broken one is skipped with
    one warning line and the others go on.
    """
    import warnings

    from brainrecon.eval import evaluate_run
    from brainrecon.runs import RUN_FILE, BrokenRunWarning, list_runs

    if download:
        os.environ["BRAINRECON_ALLOW_DOWNLOADS"] = "1"
    _check_ranked_options(sort_by, worst, best)
    _check_sort_metric_is_scored(sort_by, metric, variant, weights_dir)  # before any work is done
    kwargs = dict(variant=variant, weights_dir=weights_dir, strict=strict, device=device, metrics=metric or None,
                  batch_size=batch_size, data_source=data, ssim_mode=ssim_mode, blend=blend,
                  cache_dir=False if no_cache else cache_dir, n_resamples=bootstrap, seed=seed, grid_rows=grid_images)
    if (run / RUN_FILE).exists() or not run.is_dir() or not any((p / RUN_FILE).exists() for p in run.iterdir()):
        targets = [run]  # one run (or not a run at all: evaluate_run says why)
    else:
        targets = [r.path for r in list_runs(run) if (r.path / "reconstructions.npy").exists()]
        if not targets:
            raise BrainreconError(f"{run} holds no run with reconstructions to evaluate.")
    done = 0
    for target in targets:
        try:
            report = evaluate_run(target, **kwargs)
        except BrainreconError as exc:
            if len(targets) == 1:
                raise
            warnings.warn(f"skipping broken run {target.name}: {exc}", BrokenRunWarning, stacklevel=1)
            continue
        _print_report(report, target)
        done += 1
        if sort_by:
            from brainrecon.viz import compare_runs

            which, k = ("best", best) if best else ("worst", worst or 8)
            suffix = "" if variant == "mindeye" else f"-{variant}"
            out = Path(target) / f"{which}-{_slug(sort_by)}{suffix}.png"
            compare_runs([target], out, max_rows=k, sort_by=sort_by, worst=which == "worst", data_source=data,
                         variant=variant)
            console.print(f"wrote {out} ({which} {k} by {sort_by})")
    if len(targets) > 1:
        console.print(f"evaluated {done} of {len(targets)} runs in {run}")
        if not done:
            raise BrainreconError(f"None of the {len(targets)} runs in {run} could be evaluated (see the warnings).")


def _print_report(report, run: Path) -> None:
    from brainrecon.eval.harness import PERCENT_METRICS, report_files

    table = Table(title=f"{report.settings.get('run', run.name)} · {report.n_images} images · variant {report.variant}")
    table.add_column("metric")
    table.add_column("score", justify="right")
    table.add_column("95% interval", justify="right")
    for m, v in report.items():
        lo, hi = report.intervals.get(m, (float("nan"), float("nan")))
        if m in PERCENT_METRICS:
            score, interval = f"{100 * v:.2f}%", f"[{100 * lo:.2f}, {100 * hi:.2f}]%"
        else:
            score, interval = f"{v:.4f}", f"[{lo:.4f}, {hi:.4f}]"
        table.add_row(f"{m} {'↑' if report.directions[m] == 'higher' else '↓'}", score, interval)
    console.print(table)
    _say_unavailable(report.unavailable)
    scores, per_image = report_files(report.variant)
    console.print(f"wrote {Path(run) / scores}, {Path(run) / per_image} and {Path(run) / 'grid.png'}",
                  markup=False, soft_wrap=True)


def _say_unavailable(unavailable) -> None:
    """One short line for every metric not scored (the reasons, per metric, are in the report)."""
    from brainrecon.eval.harness import unavailable_summary

    line = unavailable_summary(unavailable)
    if line:
        console.print(f"[yellow]{escape(line)}[/yellow]", highlight=False, soft_wrap=True)


def _check_ranked_options(sort_by: Optional[str], worst: Optional[int], best: Optional[int]) -> None:
    if sort_by is not None and sort_by not in METRIC_NAMES:
        raise BrainreconError(f"--sort-by {sort_by!r} is not a metric. Valid: {', '.join(METRIC_NAMES)}.")
    if (worst or best) and not sort_by:
        raise BrainreconError("--worst/--best choose images by a metric: add --sort-by METRIC (e.g. --sort-by CLIP).")
    if worst and best:
        raise BrainreconError("Give --worst or --best, not both.")


def _check_sort_metric_is_scored(sort_by: Optional[str], metrics: Optional[List[str]], variant: str,
                                 weights_dir: Optional[Path]) -> None:
    """``evaluate --sort-by M`` needs M scored: say so before evaluating (or writing) anything."""
    if sort_by is None:
        return
    if metrics and sort_by not in metrics:
        raise BrainreconError(f"--sort-by {sort_by} needs {sort_by} scored, but -m leaves it out: add -m {sort_by}.")
    from brainrecon.eval.weights import downloads_allowed, missing_weights

    missing = missing_weights([sort_by], variant, weights_dir)
    if missing and not downloads_allowed():
        wf = missing[sort_by]
        what = wf.url.removeprefix("https://huggingface.co/") if wf.source == "huggingface" else wf.filename
        raise BrainreconError(
            f"--sort-by {sort_by} needs the {sort_by} network's weights ({what}), which are "
            f"missing on this machine. Run `brainrecon weights` to see where to get them (`brainrecon weights "
            f"--download --only {sort_by}` fetches them), or add --download; then run this command again.")


def _slug(metric: str) -> str:
    return metric.replace("(", "").replace(")", "").replace("-", "").lower()


@app.command("push")
def push_cmd(
    run: Path = typer.Argument(..., help="Run directory to publish."),
    repo_id: str = typer.Argument(..., help="Hugging Face repository, owner/name."),
    private: bool = typer.Option(False, "--private", help="Create the repository as private."),
    dry_run: Optional[Path] = typer.Option(None, "--dry-run", help="Write the folder that would be uploaded here; upload nothing."),
) -> None:
    """Publish a run's decoder, scores, grid and a model card on the Hugging Face hub."""
    from brainrecon.publish import push

    where = push(run, repo_id, private=private, dry_run=dry_run)
    console.print(f"wrote {where} (nothing uploaded)" if dry_run is not None else f"pushed {run} to {where}",
                  soft_wrap=True)


@app.command("leaderboard")
def leaderboard_cmd(
    runs: Path = typer.Option(Path("runs"), "--runs", help="Folder holding run directories."),
    fmt: BoardFormat = typer.Option("table", "--format", "-f", help="table | markdown | csv | html."),
    sort: Optional[SortKey] = typer.Option(None, "--sort", help="Metric to rank by (default: mean rank over metrics)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write to this file instead of printing."),
    published: bool = typer.Option(True, "--published/--no-published", help="Show published reference rows beside NSD runs."),
    alpha: float = typer.Option(0.05, "--alpha", help="Significance level of the paired comparison of each run with its group's best (cells not significantly different are marked ≈)."),
    variant: Variant = typer.Option("mindeye", "--variant", help="Which evaluation of each run to rank: mindeye (metrics.json) | braindiffuser (metrics-braindiffuser.json, from `evaluate --variant braindiffuser`)."),
) -> None:
    """Rank comparable runs (same data, subject, test images and metric variant), with intervals."""
    from brainrecon.io import atomic_path
    from brainrecon.leaderboard import leaderboard

    text = leaderboard(runs, sort=sort, fmt=fmt, include_published=published, alpha=alpha, variant=variant)
    if out is None:
        typer.echo(text, nl=False)  # plain echo: rich markup would eat the "[1]" citation marks
        return
    with atomic_path(out) as tmp:
        tmp.write_text(text, encoding="utf-8")
    console.print(f"wrote {out}")


@app.command("compare")
def compare_cmd(
    runs: List[Path] = typer.Argument(..., help="Run directories to show side by side."),
    out: Optional[Path] = typer.Option(None, "--out", help="PNG file to write (required unless only --stats)."),
    rows: int = typer.Option(8, "--rows", help="Number of test images (rows)."),
    cell: int = typer.Option(128, "--cell", help="Cell size in pixels."),
    stats: bool = typer.Option(False, "--stats", help="Print, per metric, both means, the paired difference with its 95% interval and p-value, and how many images each run wins (two runs)."),
    sort_by: Optional[Metric] = typer.Option(None, "--sort-by", help="Show the images the first run does worst (or --best) on by this metric."),
    worst: Optional[int] = typer.Option(None, "--worst", min=1, help="With --sort-by: this many images, worst first (default --rows)."),
    best: Optional[int] = typer.Option(None, "--best", min=1, help="With --sort-by: this many images, best first."),
    seed: int = typer.Option(0, "--seed", help="Seed of the bootstrap and permutation test."),
) -> None:
    """Draw ground truth beside several runs' reconstructions; --stats compares two runs statistically.

    A folder of runs stands for every run in it; a broken one is skipped with one warning line.
    """
    from brainrecon.viz import compare_runs

    _check_ranked_options(sort_by, worst, best)
    runs = _expand_runs(runs)
    if stats:
        _print_paired_stats(runs, seed)
    if out is None:
        if not stats:
            raise BrainreconError("compare needs --out FILE.png for the picture (or --stats for the numbers).")
        return
    path = compare_runs(runs, out, max_rows=best or worst or rows, cell_size=cell, sort_by=sort_by,
                        worst=best is None)
    console.print(f"wrote {path}")


def _expand_runs(paths: List[Path]) -> List[Path]:
    """Run directories as given, with each folder of runs replaced by its readable runs."""
    from brainrecon.runs import RUN_FILE, list_runs

    out: List[Path] = []
    for p in paths:
        if (p / RUN_FILE).exists() or not p.is_dir():
            out.append(p)
        else:
            found = [r.path for r in list_runs(p)]
            if not found:
                raise BrainreconError(f"{p} is neither a run nor a folder holding readable runs.")
            out.extend(found)
    return out


def _print_paired_stats(runs: List[Path], seed: int) -> None:
    from brainrecon.eval.harness import ALL_METRICS, HIGHER_IS_BETTER, PERCENT_METRICS, run_scores_by_id
    from brainrecon.eval.stats import (
        DEFAULT_PERMUTATIONS,
        DEFAULT_RESAMPLES,
        EXACT_MAX_IMAGES,
        format_p_value,
        paired_comparison_by_id,
    )
    from brainrecon.runs import Run

    if len(runs) != 2:
        raise BrainreconError(f"--stats compares exactly two runs; got {len(runs)}.")
    opened = [Run.open(r) for r in runs]
    scores = [run_scores_by_id(run) for run in opened]
    unavailable = [dict(getattr(run.metrics(), "unavailable", None) or {}) for run in opened]
    a, b = opened
    table = Table(title=f"A = {a.name}   B = {b.name}   (paired over shared test images)")
    for col in ("metric", "A", "B", "A − B [95% CI]", "p", "N", "wins A / B / ties"):
        table.add_column(col, justify="left" if col == "metric" else "right")
    notes = []
    compared = 0
    for m in ALL_METRICS:
        have = [m in scores[0], m in scores[1]]
        if not all(have):
            if any(have) or m in unavailable[0] or m in unavailable[1]:
                why = [f"unavailable in {side} ({un[m]})" if m in un else f"not scored in {side}"
                       for side, ok, un in (("A", have[0], unavailable[0]), ("B", have[1], unavailable[1])) if not ok]
                notes.append(f"{m}: {', '.join(why)}; not compared")
            continue
        try:
            c = paired_comparison_by_id(scores[0][m], scores[1][m], metric=m, higher_is_better=HIGHER_IS_BETTER[m],
                                        seed=seed)
        except ValueError:
            notes.append(f"{m}: no test image has a score in both runs; not compared")
            continue
        compared += 1
        total = len(set(scores[0][m]) | set(scores[1][m]))
        if total > c.n_images:
            d = c.dropped
            why = [text for count, text in ((d.get("a", 0), "without a score in A (NaN)"),
                                            (d.get("b", 0), "without a score in B (NaN)"),
                                            (d.get("only_a", 0), "scored only in A"),
                                            (d.get("only_b", 0), "scored only in B")) if count
                   for text in [f"{count} {text}"]]
            notes.append(f"{m}: {total - c.n_images} of {total} images dropped ({', '.join(why)})")
        k, unit = (100, "%") if m in PERCENT_METRICS else (1, "")
        table.add_row(
            f"{m} {'↑' if HIGHER_IS_BETTER[m] else '↓'}", f"{k * c.mean_a:.4g}{unit}", f"{k * c.mean_b:.4g}{unit}",
            f"{k * c.diff:+.4g} [{k * c.diff_lo:+.4g}, {k * c.diff_hi:+.4g}]{unit}",
            format_p_value(c.p_value, c.n_permutations, c.exact), str(c.n_images),
            f"{c.wins_a} / {c.wins_b} / {c.ties}",
        )
    if not compared:
        raise BrainreconError(f"Runs {a.name!r} and {b.name!r} share no scored test image on any metric.")
    console.print(table)
    for note in notes:
        console.print(note, highlight=False, soft_wrap=True)
    console.print(f"p: two-sided paired sign-flip permutation test on the per-image differences, images in id order "
                  f"({DEFAULT_PERMUTATIONS} random sign patterns, or all of them up to {EXACT_MAX_IMAGES} images; "
                  f"'< 1/{DEFAULT_PERMUTATIONS + 1}' is the floor): for the same pair and --seed, the leaderboard's "
                  f"p_vs_best. Not adjusted for testing several metrics. N: images compared (NaN: no score for that "
                  f"image, e.g. a constant image or one outside a network_images subset). Interval: paired bootstrap "
                  f"over images ({DEFAULT_RESAMPLES} resamples). Two-way and retrieval scores: per-image fractions "
                  "treated as independent.", highlight=False, soft_wrap=True)


@app.command("weights")
def weights_cmd(
    weights_dir: Optional[Path] = WeightsDirOpt,
    download: bool = typer.Option(False, "--download", help="Fetch every missing file (resumable, verified) into --to, $BRAINRECON_WEIGHTS or the torch hub / Hugging Face caches."),
    to: Optional[Path] = typer.Option(None, "--to", help="Folder to fetch or import into (then pass it as --weights-dir)."),
    only: Optional[str] = typer.Option(None, "--only", help="Comma-separated metrics or keys, e.g. CLIP,SwAV."),
    with_: Optional[str] = typer.Option(None, "--with", help="Also the generation weights: ipadapter,sd15,sd21."),
    mirror: Optional[str] = typer.Option(None, "--mirror", help="Base URL of a mirror with the same file names (or $BRAINRECON_MIRROR)."),
    print_urls: bool = typer.Option(False, "--print-urls", help="Print the downloads instead of fetching them."),
    fmt: UrlFormat = typer.Option("list", "--format", help="For --print-urls: list | sh."),
    from_dir: Optional[Path] = typer.Option(None, "--from", help="Import files fetched elsewhere from this folder (verified)."),
) -> None:
    """List the metric networks' weight files: present or missing, where, and where to get them."""
    from brainrecon.eval import weights_status

    if download or print_urls or from_dir is not None:
        from brainrecon import fetch

        items = fetch.plan(to=to or weights_dir, only=only, with_=with_, mirror=mirror)
        if print_urls:
            typer.echo(fetch.print_urls(items, fmt), nl=False)
        elif from_dir is not None:
            fetch.import_from(items, from_dir, log=typer.echo)
        else:
            fetch.fetch_all(items, log=typer.echo)
        return
    rows = weights_status(weights_dir)
    # One block per file rather than a table: paths and URLs must stay copyable on narrow terminals.
    for r in rows:
        status = "[green]present[/green]" if r["status"] == "present" else "[red]missing[/red]"
        console.print(f"{status}  [bold]{r['file']}[/bold]  ({r['metrics']}; {r['note']})", soft_wrap=True)
        console.print(f"    {'found at' if r['status'] == 'present' else 'goes to'}: {r['path']}", soft_wrap=True, markup=False)
        console.print(f"    source:  {r['url']}", soft_wrap=True, markup=False)
    missing = sum(r["status"] == "missing" for r in rows)
    if missing:
        console.print(f"{missing} file(s) missing: `brainrecon weights --download` fetches them (or download them "
                      "from the URLs above into a folder and pass --weights-dir / set BRAINRECON_WEIGHTS).")

# --- IP-Adapter commands (issue 4) ---
IPAdapterDirOpt = typer.Option(None, "--ipadapter-dir", help="Local copy of h94/IP-Adapter (models/ip-adapter-plus_sd15.*, models/image_encoder/); default: the Hugging Face hub.")


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
    run: Path = typer.Argument(..., help="Run directory of a decoder fitted with --target ipadapter."),
    steps: int = typer.Option(50, "--steps", help="Denoising steps."),
    guidance_scale: float = typer.Option(7.5, "--guidance-scale", help="Classifier-free guidance scale."),
    ip_adapter_scale: float = typer.Option(1.0, "--ip-adapter-scale", help="Weight of the image-token attention."),
    seed: int = typer.Option(0, "--seed", help="Image i uses seed + its test image id."),
    batch_size: int = typer.Option(8, "--batch-size", help="Images per denoising batch."),
    base_model: Optional[str] = typer.Option(None, "--base-model", help="SD 1.5-family diffusers folder or repo id (default stable-diffusion-v1-5/stable-diffusion-v1-5)."),
    vae: Optional[str] = typer.Option(None, "--vae", help="Separate VAE folder or repo id (e.g. stabilityai/sd-vae-ft-mse)."),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="Text prompt; unset = no text, image tokens only (WeADL). --prompt '' encodes the empty prompt."),
    negative_prompt: Optional[str] = typer.Option(None, "--negative-prompt", help="Negative text prompt (with --prompt)."),
    scheduler: str = typer.Option("ddim", "--scheduler", help="ddim | pndm | euler | euler-ancestral | dpm++ | unipc."),
    ipadapter_dir: Optional[Path] = IPAdapterDirOpt,
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda (fp16 + SDPA on CUDA)."),
    resume: bool = typer.Option(True, "--resume/--no-resume", help="Reuse PNGs already made with the same settings."),
    evaluate: bool = typer.Option(False, "--evaluate/--no-evaluate", help="Score the images right away."),
) -> None:
    """Turn a run's predicted IP-Adapter tokens into images (Stable Diffusion 1.5 + IP-Adapter Plus)."""
    from brainrecon.generate.ipadapter import reconstruct_run

    result = reconstruct_run(
        run, steps=steps, guidance_scale=guidance_scale, ip_adapter_scale=ip_adapter_scale, seed=seed,
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
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace this subject's prepared files."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars."),
) -> None:
    """Prepare one NSD subject from the raw release (averaged betas, images, ids, captions); resumable."""
    from brainrecon.data.nsd import prepare_nsd

    r = prepare_nsd(nsd_root, subject, out, sessions=sessions, test_set=test_set, zscore=zscore,
                    captions=captions, format=format, beta_version=beta_version, overwrite=overwrite,
                    progress=progress, ncsnr_threshold=ncsnr_threshold)
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
    from brainrecon.decoders.neuropictor.figures import parse_floats, parse_pairs, run_figures

    written = run_figures(
        run, swap_pairs=parse_pairs(swap_semantics or []),
        scales=parse_floats(control_sweep) if control_sweep else None,
        indices=[int(i) for i in parse_floats(indices, "--indices")], out_dir=out_dir, data=data,
    )
    for path in written.values():
        console.print(f"wrote {path}")


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
    from brainrecon.decoders.neuropictor.official import import_neuropictor, write_runs

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


def main() -> None:
    """Console entry point (``brainrecon``)."""
    app()


if __name__ == "__main__":
    main()
