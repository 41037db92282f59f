"""Scoring and comparing: ``brainrecon evaluate``, ``leaderboard``, ``compare``, ``push``, ``weights``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from brainrecon.errors import BrainreconError
from brainrecon.cli.common import (
    BoardFormat, Metric, SortKey, SsimMode,
    UrlFormat, Variant, WeightsDirOpt, _check_ranked_options, _slug, app, console, escape,
)


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
    from brainrecon.workflows.evaluate import evaluate_runs

    if download:
        os.environ["BRAINRECON_ALLOW_DOWNLOADS"] = "1"
    _check_ranked_options(sort_by, worst, best)
    _check_sort_metric_is_scored(sort_by, metric, variant, weights_dir)  # before any work is done
    kwargs = dict(variant=variant, weights_dir=weights_dir, strict=strict, device=device, metrics=metric or None,
                  batch_size=batch_size, data_source=data, ssim_mode=ssim_mode, blend=blend,
                  cache_dir=False if no_cache else cache_dir, n_resamples=bootstrap, seed=seed, grid_rows=grid_images)

    def show(target: Path, report) -> None:
        _print_report(report, target)
        if sort_by:
            from brainrecon.workflows.figures import compare_runs

            which, k = ("best", best) if best else ("worst", worst or 8)
            suffix = "" if variant == "mindeye" else f"-{variant}"
            out = Path(target) / f"{which}-{_slug(sort_by)}{suffix}.png"
            compare_runs([target], out, max_rows=k, sort_by=sort_by, worst=which == "worst", data_source=data,
                         variant=variant)
            console.print(f"wrote {out} ({which} {k} by {sort_by})")

    done, total = evaluate_runs(run, on_report=show, **kwargs)
    if total > 1:
        console.print(f"evaluated {done} of {total} runs in {run}")


def _print_report(report, run: Path) -> None:
    from brainrecon.eval.report import PERCENT_METRICS, report_files

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
    from brainrecon.eval.report import unavailable_summary

    line = unavailable_summary(unavailable)
    if line:
        console.print(f"[yellow]{escape(line)}[/yellow]", highlight=False, soft_wrap=True)


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
    from brainrecon.runs import expand_runs
    from brainrecon.workflows.figures import compare_runs

    _check_ranked_options(sort_by, worst, best)
    runs = expand_runs(runs)
    if stats:
        _print_paired_stats(runs, seed)
    if out is None:
        if not stats:
            raise BrainreconError("compare needs --out FILE.png for the picture (or --stats for the numbers).")
        return
    path = compare_runs(runs, out, max_rows=best or worst or rows, cell_size=cell, sort_by=sort_by,
                        worst=best is None)
    console.print(f"wrote {path}")


def _print_paired_stats(runs: List[Path], seed: int) -> None:
    from brainrecon.eval.report import HIGHER_IS_BETTER, PERCENT_METRICS
    from brainrecon.eval.stats import DEFAULT_PERMUTATIONS, DEFAULT_RESAMPLES, EXACT_MAX_IMAGES, format_p_value
    from brainrecon.workflows.compare import paired_stats

    if len(runs) != 2:
        raise BrainreconError(f"--stats compares exactly two runs; got {len(runs)}.")
    result = paired_stats(runs[0], runs[1], seed=seed)
    table = Table(title=f"A = {result.a.name}   B = {result.b.name}   (paired over shared test images)")
    for col in ("metric", "A", "B", "A − B [95% CI]", "p", "N", "wins A / B / ties"):
        table.add_column(col, justify="left" if col == "metric" else "right")
    for row in result.rows:
        m, c = row.metric, row.comparison
        k, unit = (100, "%") if m in PERCENT_METRICS else (1, "")
        table.add_row(
            f"{m} {'↑' if HIGHER_IS_BETTER[m] else '↓'}", f"{k * c.mean_a:.4g}{unit}", f"{k * c.mean_b:.4g}{unit}",
            f"{k * c.diff:+.4g} [{k * c.diff_lo:+.4g}, {k * c.diff_hi:+.4g}]{unit}",
            format_p_value(c.p_value, c.n_permutations, c.exact), str(c.n_images),
            f"{c.wins_a} / {c.wins_b} / {c.ties}",
        )
    console.print(table)
    for note in result.notes:
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
    with_: Optional[str] = typer.Option(None, "--with", help="Also these Hugging Face repositories: ipadapter, sd15, sd21, versatile-diffusion, clip-vit-l, realistic-vision, sd-vae-ft-mse (generators, the clip target), weadl (WeADL's published model)."),
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
