"""The leaderboard: runs ranked within groups of comparable runs.

Two runs are comparable when they were scored on the same images under the same
recipe: same dataset fingerprint (data and subject), same test ids and the same
metric variant. :func:`collect` reads every run directory under a root;
:func:`leaderboard` renders the groups as a terminal table, Markdown, CSV or one
self-contained HTML page (tables plus each run's reconstruction grid, embedded).

Published NSD results (:mod:`brainrecon.eval.published`) are shown as reference
rows under groups of NSD runs only, marked as published and cited; they take no
rank and never appear beside runs on synthetic data.

Each cell shows ``mean ± half-width`` of the run's 95 % bootstrap interval over test
images (from its ``metrics.json``). Within a group, every run is compared with the
group's best run on each metric by a paired sign-flip permutation test on the per-image
differences (``per_image.csv``, matched by test image id); a cell whose difference from
the best is not significant at ``alpha`` is marked ``≈`` (the best cell itself is the
reference). Runs evaluated before per-image scores existed show means only.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import html
import io
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from brainrecon.errors import DataError
from brainrecon.eval.harness import HIGHER_IS_BETTER, METRICS, PER_IMAGE_FILE, TWO_WAY_METRICS, EvalReport
from brainrecon.eval.published import PublishedRow, published_rows
from brainrecon.eval.stats import paired_comparison

__all__ = ["FORMATS", "LeaderboardEntry", "collect", "compare_to_best", "leaderboard", "rank_group"]

FORMATS = ("table", "markdown", "csv", "html")
NOT_SIGNIFICANT = "≈"
DEFAULT_ALPHA = 0.05
ARROW = {m: ("↑" if HIGHER_IS_BETTER[m] else "↓") for m in METRICS}


@dataclass
class LeaderboardEntry:
    """One run as the leaderboard sees it.

    Attributes
    ----------
    name, decoder : str
    path : Path
    subject : int or None
    data_name, data_kind : str
    is_nsd : bool
        Real NSD data (ids are NSD ids and the data is not synthetic).
    fingerprint : str
    n_test : int
    ids_sha256 : str
    variant : str or None
        None when the run has no (readable) ``metrics.json``.
    scores : dict of str to float
    unavailable : dict of str to str
    grid : Path or None
    note : str
    """

    name: str
    path: Path
    decoder: str
    subject: int | None
    data_name: str
    data_kind: str
    is_nsd: bool
    fingerprint: str
    n_test: int
    ids_sha256: str
    variant: str | None
    scores: dict[str, float] = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)
    grid: Path | None = None
    note: str = ""
    rank: int | None = None
    intervals: dict[str, tuple[float, float]] = field(default_factory=dict)
    per_image: dict[str, dict[int, float]] = field(default_factory=dict)
    # Filled by the paired comparisons: metric -> p-value against the group's best run.
    p_vs_best: dict[str, float] = field(default_factory=dict)

    @property
    def group_key(self) -> tuple:
        return (self.data_kind, self.fingerprint, self.n_test, self.ids_sha256, self.variant)

    @property
    def group_label(self) -> str:
        subj = f"subject {self.subject}" if self.subject is not None else "all subjects"
        variant = f"variant {self.variant}" if self.variant else "not evaluated"
        return f"{self.data_name} · {subj} · {self.n_test} test images · {variant}"


def _ids_hash(ids) -> str:
    return hashlib.sha256(np.asarray(ids, dtype=np.int64).tobytes()).hexdigest()


def collect(runs_dir: str | os.PathLike = "runs") -> list[LeaderboardEntry]:
    """Read every run directly under ``runs_dir``.

    Parameters
    ----------
    runs_dir : path-like

    Returns
    -------
    list of LeaderboardEntry
        Runs without ``metrics.json`` are included with ``variant=None`` and a note.
    """
    from brainrecon.runs import list_runs

    entries = []
    for run in list_runs(runs_dir):
        info = run.info
        data = info.get("data") or {}
        kind = str(data.get("kind", "unknown"))
        try:
            ids_sha = _ids_hash(np.sort(run.test_ids()))  # the set of test images, in any order
        except (OSError, ValueError):
            ids_sha = "unknown"
        entry = LeaderboardEntry(
            name=str(info.get("name", run.path.name)),
            path=run.path,
            decoder=str(info.get("decoder", "?")),
            subject=int(info["subject"]) if info.get("subject") is not None else None,
            data_name=str(info.get("data_name") or kind),
            data_kind=kind,
            is_nsd=bool(info.get("ids_are_nsd")) and kind != "synthetic",
            fingerprint=str(info.get("fingerprint", "")),
            n_test=int(info.get("n_test", 0)),
            ids_sha256=ids_sha,
            variant=None,
            grid=run.path / "grid.png" if (run.path / "grid.png").is_file() else None,
        )
        raw = None
        try:
            raw = run.metrics()
        except ValueError:
            entry.note = "metrics.json is not valid JSON; run `brainrecon evaluate`"
        if raw is not None:
            try:
                report = EvalReport.from_json(raw)
            except (DataError, KeyError, TypeError, ValueError):
                entry.note = "metrics.json is not a brainrecon report; run `brainrecon evaluate`"
            else:
                entry.variant = report.variant
                entry.scores = dict(report)
                entry.unavailable = dict(report.unavailable)
                entry.intervals = dict(report.intervals)
                if report.n_images != entry.n_test:
                    entry.n_test = report.n_images
                entry.per_image = _read_per_image(run.path / PER_IMAGE_FILE, entry, run.test_ids(), list(report))
                k = report.settings.get("network_images")
                if isinstance(k, int) and k < report.n_images and not entry.note:
                    entry.note = (f"network metrics scored on the first {k} of {report.n_images} test images; "
                                  f"`brainrecon evaluate {run.path}` scores them on all")
        elif not entry.note:
            entry.note = "not evaluated; run `brainrecon evaluate`"
        entries.append(entry)
    return entries


def _read_per_image(path: Path, entry: LeaderboardEntry, ids, metrics) -> dict[str, dict[int, float]]:
    """A run's per-image scores as metric -> {test id: score}, checked against the run's test
    ids and metric names; a damaged file becomes a note."""
    from brainrecon.eval.harness import scores_by_id

    if not path.exists():
        return {}
    try:
        return scores_by_id(path, expected_ids=ids, metrics=metrics)
    except DataError as exc:
        entry.note = str(exc)
        return {}


def compare_to_best(members: list[LeaderboardEntry], *, seed: int = 0, n_permutations: int = 10000) -> None:
    """Set each member's ``p_vs_best``: per metric, the paired sign-flip p-value of its per-image
    differences from the group's best run on that metric (images matched by test id)."""
    best = _best(members)
    for e in members:
        e.p_vs_best = {}
    for m, value in best.items():
        leader = next(e for e in members if _present(e, m) and e.scores[m] == value)
        ref = leader.per_image.get(m)
        if not ref:
            continue
        for e in members:
            mine = e.per_image.get(m)
            if e is leader or not mine or not _present(e, m):
                continue
            shared = [i for i in mine if i in ref]
            if not shared:
                continue
            a = np.array([mine[i] for i in shared])
            b = np.array([ref[i] for i in shared])
            e.p_vs_best[m] = paired_comparison(
                a, b, metric=m, higher_is_better=HIGHER_IS_BETTER[m], n_permutations=n_permutations,
                n_resamples=1, seed=seed,
            ).p_value


def _check_sort(sort: str | None) -> str | None:
    if sort is None or sort == "rank":
        return None
    if sort not in METRICS:
        raise DataError(
            f"Unknown sort key {sort!r}. Valid: 'rank' (mean rank over metrics), "
            f"{', '.join(map(repr, METRICS))}."
        )
    return sort


def _present(entry: LeaderboardEntry, metric: str) -> bool:
    v = entry.scores.get(metric)
    return v is not None and not math.isnan(v)


def rank_group(entries: list[LeaderboardEntry], sort: str | None = None) -> list[LeaderboardEntry]:
    """Order one group of comparable runs and set their ``rank``.

    Parameters
    ----------
    entries : list of LeaderboardEntry
        Runs of one group.
    sort : str, optional
        A metric name (ranked in its own direction); default: mean over metrics of each
        run's rank on that metric (ties share the better rank), lower is better.

    Returns
    -------
    list of LeaderboardEntry
        Best first; runs with nothing to rank on come last without a rank.
    """
    sort = _check_sort(sort)

    def metric_key(e: LeaderboardEntry, m: str) -> float:
        v = e.scores[m]
        return -v if HIGHER_IS_BETTER[m] else v

    if sort is not None:
        have = [e for e in entries if _present(e, sort)]
        rest = [e for e in entries if not _present(e, sort)]
        have.sort(key=lambda e: metric_key(e, sort))
    else:
        mean_rank: dict[int, float] = {}
        for e in entries:
            ranks = []
            for m in METRICS:
                if not _present(e, m):
                    continue
                others = [o for o in entries if _present(o, m)]
                ranks.append(1 + sum(metric_key(o, m) < metric_key(e, m) for o in others))
            if ranks:
                mean_rank[id(e)] = sum(ranks) / len(ranks)
        have = sorted((e for e in entries if id(e) in mean_rank), key=lambda e: (mean_rank[id(e)], e.name))
        rest = [e for e in entries if id(e) not in mean_rank]
    for i, e in enumerate(have, start=1):
        e.rank = i
    for e in rest:
        e.rank = None
    return have + rest


def _groups(entries: list[LeaderboardEntry], sort: str | None) -> list[tuple[str, list[LeaderboardEntry]]]:
    by_key: dict[tuple, list[LeaderboardEntry]] = {}
    for e in entries:
        by_key.setdefault(e.group_key, []).append(e)
    groups = []
    # NSD groups first, then other data; unevaluated groups last.
    for key in sorted(by_key, key=lambda k: (k[4] is None, not by_key[k][0].is_nsd, by_key[k][0].group_label)):
        members = rank_group(by_key[key], sort)
        groups.append((members[0].group_label, members))
    return groups


def _fmt(metric: str, value: float | None, interval=None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    half = None
    if interval is not None and not any(math.isnan(x) for x in interval):
        half = (interval[1] - interval[0]) / 2
    if metric in TWO_WAY_METRICS:
        return f"{100 * value:.2f}" + (f" ± {100 * half:.2f}" if half is not None else "") + "%"
    return f"{value:.3f}" + (f" ± {half:.3f}" if half is not None else "")


def _cell(e: LeaderboardEntry, metric: str, alpha: float) -> str:
    text = _fmt(metric, e.scores.get(metric), e.intervals.get(metric))
    return text + (f" {NOT_SIGNIFICANT}" if _not_significant(e, metric, alpha) else "")


def _not_significant(e: LeaderboardEntry, metric: str, alpha: float) -> bool:
    p = e.p_vs_best.get(metric)
    return p is not None and p >= alpha


def _best(members: list[LeaderboardEntry]) -> dict[str, float]:
    best = {}
    for m in METRICS:
        vals = [e.scores[m] for e in members if _present(e, m)]
        if len(vals) > 1:
            best[m] = max(vals) if HIGHER_IS_BETTER[m] else min(vals)
    return best


@dataclass
class _Row:
    kind: str  # "run" or "published"
    rank: str
    name: str
    decoder: str
    cells: list[str]
    raw: dict[str, float | None]
    entry: LeaderboardEntry | None = None
    published: PublishedRow | None = None
    ref: int | None = None


def _build(entries, sort, include_published, include_ablations, alpha=DEFAULT_ALPHA):
    """Groups with their display rows, plus the citation list."""
    citations: list[str] = []
    out = []
    for label, members in _groups(entries, sort):
        compare_to_best(members)
        rows = []
        for e in members:
            rows.append(_Row("run", str(e.rank) if e.rank else "–", e.name, e.decoder,
                             [_cell(e, m, alpha) for m in METRICS],
                             {m: e.scores.get(m) for m in METRICS}, entry=e))
        if include_published and members[0].is_nsd and members[0].variant is not None:
            for p in published_rows(members[0].subject, include_ablations):
                if p.citation not in citations:
                    citations.append(p.citation)
                ref = citations.index(p.citation) + 1
                rows.append(_Row("published", "pub", f"{p.method} (subj {p.subjects})", "published",
                                 [_fmt(m, p.scores.get(m)) for m in METRICS],
                                 {m: p.scores.get(m) for m in METRICS}, published=p, ref=ref))
        out.append((label, members, rows))
    return out, citations


def _headers() -> list[str]:
    return ["#", "run", "decoder"] + [f"{m} {ARROW[m]}" for m in METRICS]


def _unavailable_notes(members) -> list[str]:
    """One line per set of unavailable metrics, naming the runs it applies to ("all runs")."""
    by_set: dict[tuple, list[str]] = {}
    for e in members:
        if e.unavailable:
            reasons = set(e.unavailable.values())
            why = ("weights missing: see `brainrecon weights`" if all("not found" in r for r in reasons)
                   else "; ".join(sorted(reasons)))
            by_set.setdefault((tuple(e.unavailable), why), []).append(e.name)
    notes = []
    for (metrics, why), names in by_set.items():
        who = "all runs" if len(names) == len(members) and len(names) > 1 else ", ".join(names)
        notes.append(f"  unavailable for {who}: {', '.join(metrics)} ({why})")
    return notes


def _legend(groups, alpha: float) -> list[str]:
    """How to read ± and ≈, when any cell shows them."""
    entries = [e for _, members, _ in groups for e in members]
    lines = []
    if any(e.intervals for e in entries):
        lines.append("± half-width of the 95 % bootstrap interval over test images (two-way scores: an "
                     "approximation, each image's distractors being the other images).")
    if any(e.p_vs_best for e in entries):
        lines.append(f"{NOT_SIGNIFICANT} not significantly different from the group's best run on that metric "
                     f"(paired sign-flip test on per-image scores, alpha = {alpha:g}).")
    elif len(entries) > 1 and any(e.scores for e in entries):
        lines.append("No per-image scores: re-run `brainrecon evaluate RUN` for significance marks.")
    return lines


def _render_table(groups, citations, alpha=DEFAULT_ALPHA) -> str:
    lines = []
    for label, members, rows in groups:
        body = [[r.rank, r.name + (f" [{r.ref}]" if r.ref else ""), r.decoder] + r.cells for r in rows]
        head = _headers()
        widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
        lines.append(label)
        lines.append("  ".join(h.ljust(w) for h, w in zip(head, widths)))
        lines.append("  ".join("-" * w for w in widths))
        for cells in body:
            lines.append("  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip())
        notes = [f"  {e.name}: {e.note}" for e in members if e.note]
        notes += _unavailable_notes(members)
        lines.extend(notes)
        lines.append("")
    lines.extend(_legend(groups, alpha))
    lines.extend(_citation_lines(citations))
    return "\n".join(lines).rstrip() + "\n"


def _citation_lines(citations) -> list[str]:
    if not citations:
        return []
    lines = ["Published reference rows (\"pub\") are as printed in their sources; they mix test sets, "
             "preprocessing variants and library versions, and take no rank:"]
    lines += [f"[{i}] {c}" for i, c in enumerate(citations, start=1)]
    return lines


def _render_markdown(groups, citations, alpha=DEFAULT_ALPHA) -> str:
    lines = []
    for label, members, rows in groups:
        best = _best(members)
        lines.append(f"### {label}")
        lines.append("")
        lines.append("| " + " | ".join(_headers()) + " |")
        lines.append("|" + "---|" * len(_headers()))
        for r in rows:
            cells = []
            for m, c in zip(METRICS, r.cells):
                v = r.raw[m]
                cells.append(f"**{c}**" if r.kind == "run" and m in best and v == best[m] else c)
            name = r.name.replace("|", "\\|")
            if r.kind == "published":
                name = f"*{name}* [{r.ref}]"
            lines.append("| " + " | ".join([r.rank, name, r.decoder] + cells) + " |")
        for e in members:
            if e.note:
                lines.append(f"\n{e.name}: {e.note}")
        lines.append("")
    legend = _legend(groups, alpha)
    if legend:
        lines.extend(legend)
        lines.append("")
    lines.extend(_citation_lines(citations))
    return "\n".join(lines).rstrip() + "\n"


def _num(v) -> str:
    return "" if v is None or math.isnan(v) else repr(float(v))


def _render_csv(groups, citations, alpha=DEFAULT_ALPHA) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    stats_cols = [f"{m} {part}" for m in METRICS for part in ("lo", "hi", "p_vs_best", "not_significant")]
    w.writerow(["group", "rank", "kind", "name", "decoder", "subject", "data", "n_test", "variant", *METRICS,
                "citation", "path", *stats_cols, "alpha"])
    for label, members, rows in groups:
        for r in rows:
            raw = [_num(r.raw[m]) for m in METRICS]
            if r.entry is not None:
                e = r.entry
                extra = []
                for m in METRICS:
                    lo, hi = e.intervals.get(m, (None, None))
                    p = e.p_vs_best.get(m)
                    extra += [_num(lo), _num(hi), _num(p), "" if p is None else str(p >= alpha).lower()]
                w.writerow([label, e.rank or "", "run", e.name, e.decoder, e.subject, e.data_name, e.n_test,
                            e.variant or "", *raw, "", str(e.path), *extra, alpha])
            else:
                p = r.published
                w.writerow([label, "", "published", p.method, "", p.subjects, "NSD", p.n_images or "", "",
                            *raw, p.citation, "", *([""] * len(stats_cols)), ""])
    return buf.getvalue()


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em;color:#222}
table{border-collapse:collapse;margin:0.5em 0 1.5em}
th,td{border-bottom:1px solid #ddd;padding:4px 10px;text-align:right;white-space:nowrap}
th:nth-child(-n+3),td:nth-child(-n+3){text-align:left}
tr.published td{color:#666;font-style:italic;background:#f6f6f6}
td.best{font-weight:bold}
td.ns{background:#eef5ff}
.legend{color:#555;font-size:0.9em}
figure{display:inline-block;margin:0 1.5em 1.5em 0;vertical-align:top}
figure img{max-width:100%;border:1px solid #ddd}
.note{color:#a33}
"""


def _render_html(groups, citations, title: str, alpha=DEFAULT_ALPHA) -> str:
    esc = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{esc(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{esc(title)}</h1>",
        "<p>Runs are ranked only against runs scored on the same data, subject, test images and metric "
        "variant. ↑ higher is better, ↓ lower is better. Two-way identification in %.</p>",
    ]
    for label, members, rows in groups:
        best = _best(members)
        parts.append(f"<h2>{esc(label)}</h2><table><thead><tr>")
        parts.extend(f"<th>{esc(h)}</th>" for h in _headers())
        parts.append("</tr></thead><tbody>")
        for r in rows:
            cls = ' class="published"' if r.kind == "published" else ""
            name = esc(r.name) + (f' <sup><a href="#ref{r.ref}">[{r.ref}]</a></sup>' if r.ref else "")
            cells = [f"<td>{esc(r.rank)}</td>", f"<td>{name}</td>", f"<td>{esc(r.decoder)}</td>"]
            for m, c in zip(METRICS, r.cells):
                is_best = r.kind == "run" and m in best and r.raw[m] == best[m]
                ns = r.entry is not None and _not_significant(r.entry, m, alpha)
                klass = " ".join(k for k, on in (("best", is_best), ("ns", ns)) if on)
                title_attr = ""
                if r.entry is not None and m in r.entry.p_vs_best:
                    title_attr = f' title="p = {r.entry.p_vs_best[m]:.3g} against the best run"'
                cells.append(f'<td class="{klass}"{title_attr}>{esc(c)}</td>' if klass or title_attr
                             else f"<td>{esc(c)}</td>")
            parts.append(f"<tr{cls}>" + "".join(cells) + "</tr>")
        parts.append("</tbody></table>")
        for e in members:
            if e.note:
                parts.append(f'<p class="note">{esc(e.name)}: {esc(e.note)}</p>')
        for e in members:
            if e.grid is not None:
                data = base64.b64encode(e.grid.read_bytes()).decode("ascii")
                parts.append(
                    f'<figure><img alt="reconstructions of {esc(e.name)}" src="data:image/png;base64,{data}">'
                    f"<figcaption>{esc(e.name)} ({esc(e.decoder)})</figcaption></figure>"
                )
    legend = _legend(groups, alpha)
    if legend:
        parts.append('<p class="legend">' + "<br>".join(esc(x) for x in legend) + "</p>")
    if citations:
        parts.append("<h2>Published reference rows</h2><p>As printed in their sources; they mix test sets, "
                     "preprocessing variants and library versions, and take no rank.</p><ol>")
        parts.extend(f'<li id="ref{i}">{esc(c)}</li>' for i, c in enumerate(citations, start=1))
        parts.append("</ol>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def leaderboard(
    runs_dir: str | os.PathLike = "runs",
    sort: str | None = None,
    fmt: str = "table",
    *,
    include_published: bool = True,
    include_ablations: bool = False,
    title: str = "brainrecon leaderboard",
    entries: list[LeaderboardEntry] | None = None,
    alpha: float = DEFAULT_ALPHA,
) -> str:
    """Render the runs under ``runs_dir`` as ranked groups of comparable runs.

    Parameters
    ----------
    runs_dir : path-like
        Folder holding run directories.
    sort : str, optional
        ``"rank"`` / None (mean rank over the metrics) or a metric name.
    fmt : {"table", "markdown", "csv", "html"}
        ``html`` is one self-contained page with each run's grid embedded.
    include_published : bool
        Show published reference rows under groups of evaluated NSD runs (never under
        synthetic or other non-NSD data). False hides them.
    include_ablations : bool
        Also list NeuroPictor's published ablation rows.
    title : str
        HTML page title.
    entries : list of LeaderboardEntry, optional
        Use these instead of reading ``runs_dir``.
    alpha : float
        Significance level of the paired comparisons with each group's best run.

    Returns
    -------
    str
    """
    if fmt not in FORMATS:
        raise DataError(f"Unknown format {fmt!r}. Valid formats: {', '.join(map(repr, FORMATS))}.")
    _check_sort(sort)
    if entries is None:
        entries = collect(runs_dir)
    if not entries and fmt != "csv":
        msg = f"No runs under {Path(runs_dir)}. Fit one with `brainrecon fit` or `brainrecon demo`."
        return f"<!DOCTYPE html><html><body><p>{html.escape(msg)}</p></body></html>\n" if fmt == "html" else msg + "\n"
    if not 0 < alpha < 1:
        raise DataError(f"alpha must be between 0 and 1 (e.g. 0.05), got {alpha}.")
    groups, citations = _build(entries, sort, include_published, include_ablations, alpha)
    if fmt == "table":
        return _render_table(groups, citations, alpha)
    if fmt == "markdown":
        return _render_markdown(groups, citations, alpha)
    if fmt == "csv":
        return _render_csv(groups, citations, alpha)
    return _render_html(groups, citations, title, alpha)
