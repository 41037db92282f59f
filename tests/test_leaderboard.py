"""Leaderboard: grouping of comparable runs, ranking, published rows, formats."""

from __future__ import annotations

import csv
import io
import re

import numpy as np
import pytest
from PIL import Image

from brainrecon.errors import DataError
from brainrecon.eval import EvalReport
from brainrecon.eval.published import PUBLISHED, published_rows
from brainrecon.io import write_array_atomic, write_json_atomic
from brainrecon.leaderboard import collect, leaderboard, rank_group

SYNTH = {"kind": "synthetic", "seed": 0}
NSD = {"kind": "nsd", "root": "/data/nsd"}


def make_run(root, name, scores, *, data=SYNTH, subject=1, fingerprint="fp-synth-1", ids=range(10),
             variant="mindeye", nsd=False, grid=False, evaluated=True):
    path = root / name
    path.mkdir(parents=True)
    ids = np.asarray(list(ids), dtype=np.int64)
    write_array_atomic(path / "test_ids.npy", ids)
    write_json_atomic(path / "run.json", {
        "name": name, "decoder": name.split("-")[0], "params": {}, "subject": subject, "target": "pixels",
        "predicts": "target", "data": data, "data_name": "NSD" if nsd else "synthetic(seed=0)",
        "ids_are_nsd": nsd, "fingerprint": fingerprint, "n_test": len(ids),
    })
    if evaluated:
        EvalReport(scores, n_images=len(ids), variant=variant).save(path / "metrics.json")
    if grid:
        Image.new("RGB", (8, 8), (200, 10, 10)).save(path / "grid.png")
    return path


def full(pix, clip, eff, **more):
    base = {"PixCorr": pix, "SSIM": 0.3, "AlexNet(2)": 0.8, "AlexNet(5)": 0.85, "Inception": 0.7,
            "CLIP": clip, "EffNet-B": eff, "SwAV": 0.5}
    base.update(more)
    return base


@pytest.fixture()
def runs(tmp_path):
    root = tmp_path / "runs"
    # Three comparable synthetic runs.
    make_run(root, "ridge-a", full(0.30, 0.90, 0.60), grid=True)
    make_run(root, "brainguard-b", full(0.20, 0.95, 0.55))
    make_run(root, "neuropictor-c", full(0.10, 0.60, 0.90))
    # Same data, other metric variant -> its own group.
    make_run(root, "ridge-bd", full(0.5, 0.5, 0.5), variant="braindiffuser")
    # Other test set (different ids) -> its own group.
    make_run(root, "ridge-fewer", full(0.9, 0.99, 0.1), ids=range(5))
    # NSD runs.
    make_run(root, "ridge-nsd", full(0.25, 0.88, 0.70), data=NSD, fingerprint="fp-nsd-1", nsd=True)
    make_run(root, "brainguard-nsd", full(0.24, 0.93, 0.62), data=NSD, fingerprint="fp-nsd-1", nsd=True)
    # Not evaluated.
    make_run(root, "pending", {}, evaluated=False)
    return root


def test_collect_reads_runs(runs):
    entries = {e.name: e for e in collect(runs)}
    assert len(entries) == 8
    assert entries["ridge-a"].scores["CLIP"] == 0.90 and entries["ridge-a"].grid is not None
    assert entries["ridge-nsd"].is_nsd and not entries["ridge-a"].is_nsd
    assert entries["pending"].variant is None and "not evaluated" in entries["pending"].note
    assert entries["ridge-a"].group_key == entries["brainguard-b"].group_key
    assert entries["ridge-a"].group_key != entries["ridge-bd"].group_key
    assert entries["ridge-a"].group_key != entries["ridge-fewer"].group_key


def _mean_rank_loop(entries, higher):
    """Brute force: per metric, 1 + number of runs strictly better; then the mean."""
    out = {}
    for e in entries:
        ranks = []
        for m, up in higher.items():
            better = sum((o.scores[m] > e.scores[m]) if up else (o.scores[m] < e.scores[m]) for o in entries)
            ranks.append(1 + better)
        out[e.name] = np.mean(ranks)
    return out


def test_default_ranking_is_mean_rank_and_sort_respects_direction(runs):
    from brainrecon.eval import HIGHER_IS_BETTER, METRICS

    group = [e for e in collect(runs) if e.name in {"ridge-a", "brainguard-b", "neuropictor-c"}]
    expected = _mean_rank_loop(group, {m: HIGHER_IS_BETTER[m] for m in METRICS})  # the runs' eight metrics
    ordered = rank_group(group)
    assert [e.name for e in ordered] == sorted(expected, key=lambda n: (expected[n], n))
    assert [e.rank for e in ordered] == [1, 2, 3]
    by_eff = rank_group(group, sort="EffNet-B")  # lower is better
    assert [e.name for e in by_eff] == ["brainguard-b", "ridge-a", "neuropictor-c"]
    by_pix = rank_group(group, sort="PixCorr")
    assert [e.name for e in by_pix] == ["ridge-a", "brainguard-b", "neuropictor-c"]


def test_missing_metric_goes_last_for_that_sort(runs):
    group = [e for e in collect(runs) if e.name in {"ridge-a", "brainguard-b"}]
    del group[0].scores["CLIP"]
    ordered = rank_group(group, sort="CLIP")
    assert ordered[-1].name == group[0].name and ordered[-1].rank is None


def test_table_groups_arrows_and_published_rows_only_beside_nsd(runs):
    text = leaderboard(runs)
    blocks = text.split("\n\n")
    synth = next(b for b in blocks if "ridge-a" in b)
    nsd = next(b for b in blocks if "ridge-nsd" in b)
    assert "PixCorr ↑" in synth and "EffNet-B ↓" in synth and "SwAV ↓" in synth
    assert "pub" not in synth and "NeuroPictor" not in synth
    assert "ridge-bd" not in synth and "ridge-fewer" not in synth
    assert "NeuroPictor" in nsd and "MindEye2" in nsd
    # Published rows never take a rank: both NSD runs ranked 1 and 2.
    nsd_ranks = [line.split()[0] for line in nsd.splitlines() if "-nsd" in line]
    assert sorted(nsd_ranks) == ["1", "2"]
    assert re.search(r"\[\d+\] NeuroPictor \(Huo et al\., ECCV 2024\), Table 1", text)
    assert "93.30%" in nsd  # NeuroPictor CLIP, printed as a percentage
    assert "NeuroPictor" not in leaderboard(runs, include_published=False)


def test_markdown_marks_best_and_published(runs):
    md = leaderboard(runs, fmt="markdown")
    synth = md.split("### ")[[i for i, s in enumerate(md.split("### ")) if "ridge-a" in s][0]]
    assert "**0.300**" in synth  # best PixCorr among the three
    assert "**95.00%**" in synth  # best CLIP
    assert "**0.550**" in synth  # best (lowest) EffNet-B
    assert "*NeuroPictor (subj avg 1,2,5,7)* [" in md


def test_csv_is_machine_readable(runs):
    rows = list(csv.DictReader(io.StringIO(leaderboard(runs, fmt="csv"))))
    runs_rows = [r for r in rows if r["kind"] == "run"]
    pub_rows = [r for r in rows if r["kind"] == "published"]
    assert len(runs_rows) == 8
    assert float(next(r for r in runs_rows if r["name"] == "ridge-a")["CLIP"]) == 0.90
    assert pub_rows and all(r["citation"] for r in pub_rows)
    assert {r["group"] for r in pub_rows} == {next(r for r in runs_rows if r["name"] == "ridge-nsd")["group"]}
    np_row = next(r for r in pub_rows if r["name"] == "NeuroPictor")
    assert float(np_row["AlexNet(2)"]) == pytest.approx(0.965)


def test_html_is_self_contained_with_grids(runs):
    page = leaderboard(runs, fmt="html")
    assert page.startswith("<!DOCTYPE html>")
    assert page.count("data:image/png;base64,") == 1  # only ridge-a has a grid
    assert 'class="published"' in page
    assert not re.search(r'(src|href)="https?://', page)
    assert "ECCV 2024" in page


def test_bad_format_and_sort(runs):
    with pytest.raises(DataError, match=r"Unknown format 'pdf'\. Valid formats: 'table', 'markdown', 'csv', 'html'"):
        leaderboard(runs, fmt="pdf")
    with pytest.raises(DataError, match=r"Unknown sort key 'clip'\. Valid: 'rank'.*'CLIP'"):
        leaderboard(runs, sort="clip")


def test_empty_runs_dir(tmp_path):
    assert "No runs under" in leaderboard(tmp_path / "nothing")


def test_published_rows_are_cited_and_filtered():
    assert all(r.citation and re.search(r"\b20\d\d\b", r.citation) for r in PUBLISHED)  # paper and year
    subj2 = published_rows(subject=2)
    assert all(r.subjects in {"2"} or r.subjects.startswith("avg") for r in subj2)
    assert not any("ablation" == r.kind for r in subj2)
    np_row = next(r for r in PUBLISHED if r.method == "NeuroPictor")
    assert np_row.scores == pytest.approx({"PixCorr": .229, "SSIM": .375, "AlexNet(2)": .965, "AlexNet(5)": .984,
                                           "Inception": .945, "CLIP": .933, "EffNet-B": .639, "SwAV": .350})
    cap = next(r for r in PUBLISHED if r.method.startswith("Brain-Cap"))
    assert "EffNet-B" not in cap.scores


def test_unavailable_metrics_are_summarised_once_per_group():
    from types import SimpleNamespace

    from brainrecon.leaderboard import _unavailable_notes

    missing = {"CLIP": "weights clip not found (offline)", "SwAV": "weights swav not found (offline)"}
    members = [SimpleNamespace(name="a", unavailable=missing), SimpleNamespace(name="b", unavailable=missing),
               SimpleNamespace(name="c", unavailable={})]
    assert _unavailable_notes(members) == [
        "  unavailable for a, b: CLIP, SwAV (weights missing: see `brainrecon weights`)"]
    assert _unavailable_notes(members[:2]) == [
        "  unavailable for all runs: CLIP, SwAV (weights missing: see `brainrecon weights`)"]
    other = {"CLIP": "not scored in this demo"}
    assert _unavailable_notes([SimpleNamespace(name="d", unavailable=other)]) == [
        "  unavailable for d: CLIP (not scored in this demo)"]
