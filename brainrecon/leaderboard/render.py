"""The leaderboard's groups as text: display rows and columns (published reference rows included),
cells with their marks, the notes under each group, the legend, and the four formats (terminal table,
Markdown, CSV, one self-contained HTML page)."""

from __future__ import annotations

import base64
import csv
import html
import io
import math
from dataclasses import dataclass

from brainrecon.eval.published import PublishedRow, published_rows
from brainrecon.eval.report import (
    ALL_METRICS,
    HIGHER_IS_BETTER,
    METRICS,
    PER_IMAGE_FILE,
    PERCENT_METRICS,
    RETRIEVAL_METRICS,
)
from brainrecon.eval.stats import (
    DEFAULT_PERMUTATIONS,
    MULTIPLICITY_METHOD,
    format_p_value,
)
from brainrecon.leaderboard.entries import LeaderboardEntry
from brainrecon.leaderboard.marks import (
    BEST,
    DEFAULT_ALPHA,
    DIFFERS,
    NOT_DISTINGUISHABLE,
    NOT_TESTED,
    _groups,
    cell_mark,
    compare_to_best,
)

ARROW = {m: ("↑" if HIGHER_IS_BETTER[m] else "↓") for m in ALL_METRICS}


def _fmt(metric: str, value: float | None, interval=None) -> str:
    """A number as the tables print it (``–``: none; ``NaN``: undefined)."""
    if value is None:
        return "–"
    if isinstance(value, float) and math.isnan(value):
        return "NaN"
    half = None
    if interval is not None and not any(math.isnan(x) for x in interval):
        half = (interval[1] - interval[0]) / 2
    if metric in PERCENT_METRICS:
        return f"{100 * value:.2f}" + (f" ± {100 * half:.2f}" if half is not None else "") + "%"
    return f"{value:.3f}" + (f" ± {half:.3f}" if half is not None else "")


def _value_text(e: LeaderboardEntry, metric: str) -> str:
    """A run's cell without its mark: the score, ``n/a`` (unavailable) or ``–`` (not scored)."""
    if metric in e.scores:
        return _fmt(metric, e.scores[metric], e.intervals.get(metric))
    if metric in e.unavailable:
        return "n/a"
    return "–"


_SUFFIX = {BEST: " (best)", NOT_DISTINGUISHABLE: f" {NOT_DISTINGUISHABLE}", NOT_TESTED: f" {NOT_TESTED}"}


def _cell(e: LeaderboardEntry, metric: str, alpha: float, mark_best: bool = True) -> str:
    mark = cell_mark(e, metric, alpha)
    if mark == BEST and not mark_best:
        return _value_text(e, metric)
    return _value_text(e, metric) + _SUFFIX.get(mark, "")


def _nan_reason(e: LeaderboardEntry, metric: str) -> str:
    values = e.per_image.get(metric)
    if values:
        k = sum(1 for v in values.values() if math.isnan(v))
        return (f"{k} of {len(values)} images have no score: an undefined correlation (e.g. of a constant "
                "image) or an image the metric was not scored on")
    return "its mean is undefined; per-image scores would say which images"


def _status(e: LeaderboardEntry, metric: str) -> str:
    """Why a run's cell is not a plain number, in words ("" when it is one)."""
    if metric in e.scores:
        return f"NaN: {_nan_reason(e, metric)}" if math.isnan(e.scores[metric]) else ""
    if metric in e.unavailable:
        return f"unavailable: {e.unavailable[metric]}"
    return "not scored"


def _tooltip(e: LeaderboardEntry, metric: str) -> str:
    status = _status(e, metric)
    if status and status != "not scored":
        return status
    if metric in e.not_tested:
        return f"not tested: {e.not_tested[metric]}"
    if metric in e.p_adjusted:
        pair = format_p_value(e.p_vs_best.get(metric, float("nan")), e.n_permutations, e.p_exact.get(metric, False))
        adj = format_p_value(e.p_adjusted[metric], e.n_permutations)
        return (f"against the group's best: p = {pair} (this pair), adjusted p = {adj} over the group's runs, "
                f"{e.n_compared.get(metric, 0)} images")
    return ""



@dataclass
class _Row:
    kind: str  # "run" or "published"
    rank: str
    name: str
    decoder: str
    raw: dict[str, float | None]
    entry: LeaderboardEntry | None = None
    published: PublishedRow | None = None
    ref: int | None = None

    def cells(self, columns, alpha: float, mark_best: bool = True) -> list[str]:
        if self.entry is not None:
            return [_cell(self.entry, m, alpha, mark_best) for m in columns]
        return [_fmt(m, self.published.scores.get(m)) for m in columns]


def _columns(members, rows) -> list[str]:
    """The eight metrics, then each retrieval metric some run (or published row) of the group scored
    (a retrieval metric unavailable everywhere is only named in the group's notes)."""
    cols = list(METRICS)
    for m in RETRIEVAL_METRICS:
        if (any(m in e.scores for e in members)
                or any(r.published is not None and m in r.published.scores for r in rows)):
            cols.append(m)
    return cols


def _build(entries, sort, include_published, include_ablations, alpha=DEFAULT_ALPHA, seed=0,
           n_permutations=DEFAULT_PERMUTATIONS):
    """Groups with their display rows and columns, plus the citation list."""
    citations: list[str] = []
    out = []
    for label, members in _groups(entries, sort):
        compare_to_best(members, seed=seed, n_permutations=n_permutations)
        rows = [_Row("run", str(e.rank) if e.rank else "–", e.name, e.decoder,
                     {m: e.scores.get(m) for m in ALL_METRICS}, entry=e) for e in members]
        if include_published and members[0].is_nsd and members[0].variant is not None:
            for p in published_rows(members[0].subject, include_ablations):
                if p.citation not in citations:
                    citations.append(p.citation)
                ref = citations.index(p.citation) + 1
                rows.append(_Row("published", "pub", f"{p.method} (subj {p.subjects})", "published",
                                 {m: p.scores.get(m) for m in ALL_METRICS}, published=p, ref=ref))
        out.append((label, members, rows, _columns(members, rows)))
    return out, citations


def _headers(columns) -> list[str]:
    return ["#", "run", "decoder"] + [f"{m} {ARROW[m]}" for m in columns]


def _unavailable_notes(members, full: bool = False) -> list[str]:
    """One line per set of unavailable metrics, naming the runs it applies to ("all runs");
    ``full`` gives every reason in full instead of summarising missing weights."""
    by_set: dict[tuple, list[str]] = {}
    for e in members:
        if e.unavailable:
            reasons = set(e.unavailable.values())
            why = ("weights missing: see `brainrecon weights`"
                   if all("not found" in r for r in reasons) and not full else "; ".join(sorted(reasons)))
            by_set.setdefault((tuple(e.unavailable), why), []).append(e.name)
    notes = []
    for (metrics, why), names in by_set.items():
        who = "all runs" if len(names) == len(members) and len(names) > 1 else ", ".join(names)
        notes.append(f"  unavailable for {who}: {', '.join(metrics)} ({why})")
    return notes


def _group_notes(members, full: bool = False, unavailable: bool = True) -> list[str]:
    """What a reader must know about a group's cells: run notes, missing per-image scores,
    undefined (NaN) scores, unavailable metrics (unless ``unavailable`` is False); one line
    each, indented by two spaces."""
    notes = [f"  {e.name}: {e.note}" for e in members if e.note]
    untested = [e for e in members if e.not_tested]
    if untested and all(not e.per_image for e in members):
        notes.append(f"  no run of this group has per-image scores ({PER_IMAGE_FILE}), so nothing was tested "
                     f"({NOT_TESTED}); re-run `brainrecon evaluate RUN` on each")
        untested = []  # the per-run lines below would repeat it
    for e in untested:
        if not e.per_image and any(r == "no per-image scores" for r in e.not_tested.values()):
            notes.append(f"  {e.name}: no per-image scores ({PER_IMAGE_FILE}), so its cells are not tested "
                         f"({NOT_TESTED}); re-run `brainrecon evaluate {e.path}`")
    leaders: dict[str, list[str]] = {}
    for e in members if untested else []:
        if e.best_of and not e.per_image and any(
                o.not_tested.get(m, "").startswith("the group's best") for o in members for m in e.best_of):
            leaders[e.name] = [m for m in ALL_METRICS if m in e.best_of]
    for name, ms in leaders.items():
        path = next(e.path for e in members if e.name == name)
        notes.append(f"  the group's best run on {', '.join(ms)} ({name}) has no per-image scores ({PER_IMAGE_FILE}), "
                     f"so no run was tested against it ({NOT_TESTED}); re-run `brainrecon evaluate {path}`")
    for e in members:
        for m in ALL_METRICS:
            if m in e.scores and math.isnan(e.scores[m]):
                notes.append(f"  {e.name}: {m} is NaN ({_nan_reason(e, m)})")
    if unavailable:
        notes += _unavailable_notes(members, full=full)
    return notes


def _html_unavailable(groups) -> list[str]:
    """One list item per distinct reason a metric is unavailable, across the page: the metrics
    and runs it applies to, and the full reason (file, places searched, the fix) folded below."""
    entries = [e for g in groups for e in g[1]]
    by_reason: dict[str, tuple[dict, dict]] = {}
    for e in entries:
        for m, why in e.unavailable.items():
            metrics, names = by_reason.setdefault(why, ({}, {}))
            metrics[m] = names[e.name] = None
    items = []
    for why, (metrics, names) in by_reason.items():
        who = ("all runs" if len(names) == len(entries) and len(entries) > 1
               else ", ".join(names) if len(names) <= 3 else f"{len(names)} runs")
        short = "weights missing: see `brainrecon weights`" if "not found" in why else why
        items.append(f"<li><details><summary>unavailable for {html.escape(who)}: "
                     f"{html.escape(', '.join(metrics))} ({html.escape(short)})</summary>"
                     f"{html.escape(why)}</details></li>")
    return items


def _legend(groups, alpha: float) -> list[str]:
    """What every sign in the tables means (only the signs that appear)."""
    entries = [e for g in groups for e in g[1]]
    lines = []
    if any(e.intervals for e in entries):
        lines.append("± half-width of the 95 % bootstrap interval over test images (two-way and retrieval scores: an "
                     "approximation, each image's distractors being the other images).")
    if any(e.best_of for e in entries):
        lines.append("(best) the group's best run on that metric (bold in Markdown and HTML): the run every other "
                     "run of the group is compared with, on the test images both were scored on.")
    if any(e.p_adjusted for e in entries):
        lines.append(f"{NOT_DISTINGUISHABLE} not distinguishable from the group's best at alpha = {alpha:g}, adjusted "
                     f"for comparing every run with a best chosen after looking: {MULTIPLICITY_METHOD}; the chance "
                     "that any run is marked different when all are equal is at most alpha. It is not evidence "
                     "that they are equal. A tested cell without a mark differs from the best at that level.")
    if any(e.not_tested for e in entries):
        lines.append(f"{NOT_TESTED} not tested: the run, or the group's best run, has no per-image scores "
                     f"({PER_IMAGE_FILE}); re-run `brainrecon evaluate RUN`. A missing test is not a difference.")
    if any(m in e.unavailable or (m in e.scores and math.isnan(e.scores[m])) for e in entries for m in ALL_METRICS):
        lines.append("n/a unavailable (why: under the group); NaN undefined for some image (why: under the group); "
                     "– not scored.")
    if any(m in e.scores for e in entries for m in RETRIEVAL_METRICS):
        lines.append("ImageRet: for each prediction, is its own image the most similar of min(300, N) candidates; "
                     "BrainRet: for each image, is its own prediction (MindEye's 300-way top-1, exact mean over "
                     "random candidate sets). (target): in the decoder's target space; (CLIP): CLIP embeddings of "
                     "reconstructions and ground truth.")
    return lines


def _render_table(groups, citations, alpha=DEFAULT_ALPHA) -> str:
    lines = []
    for label, members, rows, cols in groups:
        body = [[r.rank, r.name + (f" [{r.ref}]" if r.ref else ""), r.decoder] + r.cells(cols, alpha) for r in rows]
        head = _headers(cols)
        widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
        lines.append(label)
        lines.append("  ".join(h.ljust(w) for h, w in zip(head, widths)))
        lines.append("  ".join("-" * w for w in widths))
        for cells in body:
            lines.append("  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip())
        lines.extend(_group_notes(members))
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
    for label, members, rows, cols in groups:
        lines.append(f"### {label}")
        lines.append("")
        lines.append("| " + " | ".join(_headers(cols)) + " |")
        lines.append("|" + "---|" * len(_headers(cols)))
        for r in rows:
            cells = r.cells(cols, alpha, mark_best=False)
            if r.entry is not None:
                cells = [f"**{c}**" if cell_mark(r.entry, m, alpha) == BEST else c for m, c in zip(cols, cells)]
            name = r.name.replace("|", "\\|")
            if r.kind == "published":
                name = f"*{name}* [{r.ref}]"
            lines.append("| " + " | ".join([r.rank, name, r.decoder] + cells) + " |")
        notes = _group_notes(members)
        if notes:
            lines.append("")
            lines.extend(f"- {n.strip()}" for n in notes)
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
    parts = ("lo", "hi", "status", "p_vs_best", "p_adjusted", "mark", "n_compared")
    stats_cols = [f"{m} {part}" for m in ALL_METRICS for part in parts]
    w.writerow(["group", "rank", "kind", "name", "decoder", "subject", "data", "n_test", "variant", *ALL_METRICS,
                "citation", "path", *stats_cols, "alpha", "permutations", "multiplicity"])
    for label, members, rows, cols in groups:
        for r in rows:
            raw = [_num(r.raw[m]) for m in ALL_METRICS]
            if r.entry is not None:
                e = r.entry
                extra = []
                for m in ALL_METRICS:
                    lo, hi = e.intervals.get(m, (None, None))
                    n = e.n_compared.get(m)
                    extra += [_num(lo), _num(hi), _status(e, m), _num(e.p_vs_best.get(m)),
                              _num(e.p_adjusted.get(m)), cell_mark(e, m, alpha), "" if n is None else str(n)]
                w.writerow([label, e.rank or "", "run", e.name, e.decoder, e.subject, e.data_name, e.n_test,
                            e.variant or "", *raw, "", str(e.path), *extra, alpha, e.n_permutations,
                            MULTIPLICITY_METHOD])
            else:
                p = r.published
                extra = []
                for m in ALL_METRICS:
                    extra += ["", "", "" if m in p.scores else "not reported", "", "", "", ""]
                w.writerow([label, "", "published", p.method, "", p.subjects, "NSD", p.n_images or "", "",
                            *raw, p.citation, "", *extra, "", "", ""])
    return buf.getvalue()


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em;color:#222}
table{border-collapse:collapse;margin:0.5em 0 1.5em;font-size:0.9em}
th,td{border-bottom:1px solid #ddd;padding:4px 8px;text-align:right}
th{white-space:normal;vertical-align:bottom;max-width:7.5em}
th:nth-child(-n+3),td:nth-child(-n+3){text-align:left}
td:nth-child(2){white-space:normal;min-width:12em;max-width:20em}
tr.published td{color:#666;font-style:italic;background:#f6f6f6}
td.best{font-weight:bold}
td.ns{background:#eef5ff}
td.nt{background:#fff4e0}
td.unavailable,td.nan{color:#a33}
.legend{color:#444;font-size:0.9em;border-left:3px solid #ccd;padding:0.3em 1em;margin:1em 0 1.5em;max-width:70em}
.legend li{margin:0.2em 0}
figure{display:inline-block;margin:0 1.5em 1.5em 0;vertical-align:top}
figure img{max-width:100%;border:1px solid #ddd}
figcaption{font-size:0.85em;color:#444;max-width:40em}
.note{color:#a33}
"""


def _render_html(groups, citations, title: str, alpha=DEFAULT_ALPHA) -> str:
    esc = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{esc(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{esc(title)}</h1>",
        "<p>Runs are ranked only against runs scored on the same data, subject, test images, metric variant, "
        "metrics, network subset and retrieval target space. ↑ higher is better, ↓ lower is better. "
        "Two-way identification and retrieval in %.</p>",
    ]
    legend = _legend(groups, alpha)
    missing = _html_unavailable(groups)
    reasons = [(label, _group_notes(members, unavailable=False)) for label, members, _, _ in groups]
    reasons = [(label, notes) for label, notes in reasons if notes]
    if legend or missing or reasons:
        parts.append('<div class="legend"><strong>How to read this page</strong><ul>')
        parts.extend(f"<li>{esc(x)}</li>" for x in legend)
        parts.append("</ul>")
        if missing or reasons:
            parts.append("<strong>Why some cells show n/a, NaN or n.t.</strong><ul>")
            parts.extend(missing)
            for label, notes in reasons:
                parts.append(f"<li>{esc(label)}<ul>" + "".join(f"<li>{esc(n.strip())}</li>" for n in notes)
                             + "</ul></li>")
            parts.append("</ul>")
        parts.append("</div>")
    for label, members, rows, cols in groups:
        parts.append(f"<h2>{esc(label)}</h2><table><thead><tr>")
        parts.extend(f"<th>{esc(h).replace('(', '<wbr>(')}</th>" for h in _headers(cols))  # headers may wrap
        parts.append("</tr></thead><tbody>")
        for r in rows:
            cls = ' class="published"' if r.kind == "published" else ""
            name = esc(r.name) + (f' <sup><a href="#ref{r.ref}">[{r.ref}]</a></sup>' if r.ref else "")
            cells = [f"<td>{esc(r.rank)}</td>", f"<td>{name}</td>", f"<td>{esc(r.decoder)}</td>"]
            for m, c in zip(cols, r.cells(cols, alpha, mark_best=False)):
                if r.entry is None:
                    cells.append(f"<td>{esc(c)}</td>")
                    continue
                mark = cell_mark(r.entry, m, alpha)
                status = _status(r.entry, m)
                klass = {BEST: "best", NOT_DISTINGUISHABLE: "ns", NOT_TESTED: "nt", DIFFERS: "differs"}.get(mark, "")
                if status.startswith("NaN"):
                    klass = (klass + " nan").strip()
                elif status.startswith("unavailable"):
                    klass = (klass + " unavailable").strip()
                tip = _tooltip(r.entry, m)
                attrs = (f' class="{klass}"' if klass else "") + (f' title="{esc(tip)}"' if tip else "")
                # On a narrow page the half-width and the mark may go to the next lines.
                cells.append(f"<td{attrs}>{esc(c).replace(' ± ', ' ±&nbsp;')}</td>")
            parts.append(f"<tr{cls}>" + "".join(cells) + "</tr>")
        parts.append("</tbody></table>")
        for note in _group_notes(members):
            parts.append(f'<p class="note">{esc(note.strip())}</p>')
        for e in members:
            if e.grid is not None:
                data = base64.b64encode(e.grid.read_bytes()).decode("ascii")
                if e.grid_ids:
                    shown = (f"test images {', '.join(map(str, e.grid_ids))} ({len(e.grid_ids)} of {e.n_test}), "
                             "the first in the run's test order, one per row: ground truth left, reconstruction right")
                else:
                    shown = "the first test images in the run's test order (ids not recorded: re-run evaluate)"
                parts.append(
                    f'<figure><img alt="reconstructions of {esc(e.name)}" src="data:image/png;base64,{data}">'
                    f"<figcaption><strong>{esc(e.name)}</strong> ({esc(e.decoder)}): {esc(shown)}</figcaption></figure>"
                )
    if citations:
        parts.append("<h2>Published reference rows</h2><p>As printed in their sources; they mix test sets, "
                     "preprocessing variants and library versions, and take no rank.</p><ol>")
        parts.extend(f'<li id="ref{i}">{esc(c)}</li>' for i, c in enumerate(citations, start=1))
        parts.append("</ol>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
