"""What every command module shares: the app, its error handling, consoles, typed choices and
the options and helpers several commands use."""

from __future__ import annotations

import os
from typing import Any, List, Literal, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from typer.core import TyperGroup

from brainrecon.errors import BrainreconError
from brainrecon.eval.names import ALL_METRICS, METRICS

console = Console(stderr=False, highlight=False)


err_console = Console(stderr=True, highlight=False)


METRIC_NAMES = METRICS


# Typed choices as Literal annotations (typer turns them into click choices: help lists the
# values and a typo is refused with the valid list; works across typer versions).
Metric = Literal[METRICS]


SortKey = Literal[("rank", *ALL_METRICS)]


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
            text = str(message) + _flags_note(self, ctx, getattr(message, "parameters", ()))
            if issubclass(category, (BrokenRunWarning, DamagedCacheWarning)):
                err_console.print(f"[yellow]warning:[/yellow] {escape(text)}", soft_wrap=True)
            else:
                _default_showwarning(text, category, *args, **kwargs)

        _default_showwarning = warnings.showwarning
        warnings.showwarning = _show
        try:
            return super().invoke(ctx)
        except BrainreconError as exc:
            if os.environ.get("BRAINRECON_DEBUG"):
                raise
            message = str(exc) + _flags_note(self, ctx, getattr(exc, "parameters", ()))
            err_console.print(f"[red]error:[/red] {escape(message)}", soft_wrap=True)
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


#: Library parameters the command line spells differently: the data's location is ``source`` in
#: ``load_dataset`` and ``Run.dataset``, ``data_source`` in ``evaluate_run``; an HDF5 images
#: file's dataset is ``key`` in ``embed_images_file``.
_OPTION_OF_PARAMETER = {"source": "data", "data_source": "data", "key": "images_key"}


def _flags_note(group, ctx, parameters) -> str:
    """`` (command line: --flag, ...)`` for the library parameters an error or warning names."""
    flags = list(dict.fromkeys(f for f in (_flag_of(group, ctx, name) for name in parameters) if f))
    return f" (command line: {', '.join(flags)})" if flags else ""


def _flag_of(group, ctx, parameter: str) -> str | None:
    """The command-line flag that sets library parameter ``parameter`` in the command that ran:
    its own option (``nan_policy`` -> ``--nan-policy``), a decoder's option (``init_from`` ->
    ``--init-from``), the option of a parameter the command line spells differently
    (:data:`_OPTION_OF_PARAMETER`), else, for a decoder parameter in a command that takes any
    as ``--param``, ``--param name=...``. None where the command has no way to set it."""
    import click

    def options(command, names):
        params = list(getattr(command, "params", ()))
        extra = getattr(command, "_decoder_params", None)
        if callable(extra):
            try:
                params += extra(click.Context(command))
            except Exception:  # noqa: BLE001 - a listing problem must not hide the error itself
                pass
        for p in params:
            if isinstance(p, click.Option) and p.name in names:
                return next((o for o in p.opts if o.startswith("--")), p.opts[0])
        for sub in getattr(command, "commands", {}).values():  # a group: `brainrecon import neuropictor`
            found = options(sub, names)
            if found:
                return found
        return None

    def takes_any_param(command) -> bool:
        return any(isinstance(p, click.Option) and "--param" in p.opts for p in getattr(command, "params", ()))

    def is_decoder_parameter(name: str) -> bool:
        from brainrecon.decoders import available, get_decoder_class

        for decoder in available():
            try:
                if name in get_decoder_class(decoder)._param_names():
                    return True
            except Exception:  # noqa: BLE001 - a broken plugin must not hide the error itself
                continue
        return False

    # Only the command that ran: another command's option of the same name would be wrong advice.
    command = group.commands.get(ctx.invoked_subcommand or "") or group
    found = options(command, (parameter, f"decoder_opt_{parameter}"))
    if found is None and parameter in _OPTION_OF_PARAMETER:
        found = options(command, (_OPTION_OF_PARAMETER[parameter],))
    if found is None and takes_any_param(command) and is_decoder_parameter(parameter):
        found = f"--param {parameter}=..."
    return found


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


# --- evaluation commands (issue 3) ---
WeightsDirOpt = typer.Option(None, "--weights-dir", help="Folder with metric weight files, searched before the torch hub / Hugging Face caches (see `brainrecon weights`).")


def _check_ranked_options(sort_by: Optional[str], worst: Optional[int], best: Optional[int]) -> None:
    if sort_by is not None and sort_by not in METRIC_NAMES:
        raise BrainreconError(f"--sort-by {sort_by!r} is not a metric. Valid: {', '.join(METRIC_NAMES)}.")
    if (worst or best) and not sort_by:
        raise BrainreconError("--worst/--best choose images by a metric: add --sort-by METRIC (e.g. --sort-by CLIP).")
    if worst and best:
        raise BrainreconError("Give --worst or --best, not both.")


def _slug(metric: str) -> str:
    return metric.replace("(", "").replace(")", "").replace("-", "").lower()


# --- IP-Adapter commands (issue 4) ---
IPAdapterDirOpt = typer.Option(None, "--ipadapter-dir", help="Local copy of h94/IP-Adapter (models/ip-adapter-plus_sd15.*, models/image_encoder/); default: the Hugging Face hub.")


def main() -> None:
    """Console entry point (``brainrecon``)."""
    app()
