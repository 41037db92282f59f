"""Leaderboard marks a statistician can sign: multiplicity, missing per-image scores, one p-value
per pair, groups of runs scored on the same metrics, NaN versus unavailable, the HTML page.

Issue 23 (and the issue-20 trap of a "re-run evaluate" hint shown when per-image scores exist).
"""

from __future__ import annotations

import csv
import io
import re

import numpy as np
import pytest
from typer.testing import CliRunner

from brainrecon.eval import EvalReport
from brainrecon.eval.stats import bootstrap_interval, paired_comparison
from brainrecon.io import write_array_atomic, write_json_atomic

ALPHA = 0.05
runner = CliRunner()


def _entry(name, per_image_ssim, ids):
    from brainrecon.leaderboard import LeaderboardEntry

    v = np.asarray(per_image_ssim, dtype=np.float64)
    e = LeaderboardEntry(name=name, path=None, decoder="ridge", subject=1, data_name="synthetic",
                         data_kind="synthetic", is_nsd=False, fingerprint="fp", n_test=len(ids),
                         ids_sha256="h", variant="mindeye")
    e.scores = {"SSIM": float(v.mean())}
    e.per_image = {"SSIM": {int(i): float(x) for i, x in zip(ids, v)}}
    return e


def _write_run(root, name, per_image, ids, *, unavailable=None, settings=None, write_per_image=True):
    path = root / name
    path.mkdir(parents=True)
    ids = np.asarray(ids, dtype=np.int64)
    write_array_atomic(path / "test_ids.npy", ids)
    write_json_atomic(path / "run.json", {
        "name": name, "decoder": name.split("-")[0], "params": {}, "subject": 1, "target": "pixels",
        "predicts": "target", "data": {"kind": "synthetic", "seed": 0}, "data_name": "synthetic(seed=0)",
        "ids_are_nsd": False, "fingerprint": "fp", "n_test": len(ids),
    })
    report = EvalReport({m: float(np.mean(v)) for m, v in per_image.items()}, n_images=len(ids),
                        variant="mindeye", per_image=per_image if write_per_image else None, ids=ids,
                        unavailable=unavailable, settings=settings,
                        intervals={m: bootstrap_interval(v) for m, v in per_image.items()})
    report.save(path / "metrics.json")
    return path


def _rows(text):
    return {r["name"]: r for r in csv.DictReader(io.StringIO(text))}


# ---------------------------------------------------------------------------- 1. multiplicity


def test_chance_of_any_false_mark_with_k_equal_runs_stays_below_alpha():
    """K runs of equal quality (N = 100): the chance that some run is marked as different from the
    group's best, chosen post hoc, stays <= alpha per metric. Unadjusted sign-flip tests against
    the best give ~25 % (K = 5) and ~56 % (K = 10)."""
    from brainrecon.leaderboard import cell_mark, compare_to_best

    rng = np.random.default_rng(23)
    n, trials = 100, 250
    ids = np.arange(n)
    rates = {}
    for k in (5, 10):
        false_marks = unadjusted = 0
        for t in range(trials):
            base = rng.uniform(0.3, 0.7, n)
            members = [_entry(f"r{j}", base + rng.normal(0, 0.05, n), ids) for j in range(k)]
            compare_to_best(members, seed=t, n_permutations=99)
            marks = [cell_mark(e, "SSIM", ALPHA) for e in members]
            assert marks.count("best") == 1
            false_marks += "differs" in marks
            unadjusted += any(e.p_vs_best.get("SSIM", 1) < ALPHA for e in members)
        rates[k] = false_marks / trials
        # alpha plus three binomial standard errors of the estimate (deterministic: seeded).
        assert rates[k] <= ALPHA + 3 * np.sqrt(ALPHA * (1 - ALPHA) / trials), (k, rates[k])
        assert unadjusted / trials > {5: 0.15, 10: 0.3}[k], (k, unadjusted)  # what the unadjusted marks did
    pooled = 2 * trials
    assert np.mean(list(rates.values())) <= ALPHA + 2 * np.sqrt(ALPHA * (1 - ALPHA) / pooled), rates


def test_max_statistic_is_the_sign_flip_test_for_two_runs_and_exact_for_tiny_families():
    import itertools

    from brainrecon.eval.stats import max_statistic_p_values

    rng = np.random.default_rng(9)
    x = rng.normal(size=(40, 2))
    x[:, 1] += 0.3
    assert max_statistic_p_values(x, reference=1).p_adjusted[0] == paired_comparison(x[:, 0], x[:, 1]).p_value
    y = rng.normal(size=(4, 3))  # K = 3 runs, N = 4 images: all 6**4 = 1296 relabellings
    exact = max_statistic_p_values(y, reference=0, n_permutations=2000)
    perms = list(itertools.permutations(range(3)))
    ranges = []
    for combo in itertools.product(perms, repeat=4):
        means = np.array([[y[i, combo[i][j]] for j in range(3)] for i in range(4)]).mean(axis=0)
        ranges.append(means.max() - means.min())
    means = y.mean(axis=0)
    for j in (1, 2):
        assert exact.exact and exact.p_adjusted[j] == pytest.approx(
            np.mean(np.array(ranges) >= abs(means[0] - means[j]) - 1e-12), abs=1e-12)
    sampled = max_statistic_p_values(y, reference=0, n_permutations=999)
    assert not sampled.exact and np.allclose(sampled.p_adjusted[1:], exact.p_adjusted[1:], atol=0.05)


def test_a_clearly_worse_run_is_still_marked_after_adjustment():
    from brainrecon.leaderboard import cell_mark, compare_to_best

    rng = np.random.default_rng(5)
    n, ids = 120, np.arange(120)
    base = rng.uniform(0.3, 0.7, n)
    members = [_entry("best", base + 0.05 + rng.normal(0, 0.01, n), ids),
               _entry("same", base + 0.05 + rng.normal(0, 0.01, n), ids),
               _entry("worse", base + rng.normal(0, 0.01, n), ids)]
    compare_to_best(members)
    marks = {e.name: cell_mark(e, "SSIM", ALPHA) for e in members}
    assert sorted(marks.values()) == ["best", "differs", "n.s."] and marks["worse"] == "differs"
    worse = members[2]
    assert worse.p_adjusted["SSIM"] >= worse.p_vs_best["SSIM"]  # adjustment never makes p smaller


# ---------------------------------------------------------------------------- 1. one p-value per pair


def test_one_pair_one_seed_one_p_value_whatever_the_bootstrap_and_the_row_order():
    rng = np.random.default_rng(11)
    a = rng.uniform(size=150)
    b = a + rng.normal(0.004, 0.03, 150)
    p = paired_comparison(a, b, seed=0).p_value
    assert paired_comparison(a, b, seed=0, n_resamples=1).p_value == p  # the leaderboard draws no bootstrap
    assert paired_comparison(b, a, seed=0).p_value == p  # A - B or B - A: the same test


def test_leaderboard_csv_and_compare_stats_print_the_same_p(tmp_path):
    from brainrecon.cli import app
    from brainrecon.leaderboard import leaderboard

    rng = np.random.default_rng(3)
    n = 140
    ids = np.arange(500, 500 + n)
    base = {m: rng.uniform(0.3, 0.7, n) for m in ("PixCorr", "SSIM")}
    close = {m: v + rng.normal(-0.006, 0.03, n) for m, v in base.items()}  # p near 0.05
    root = tmp_path / "runs"
    order = rng.permutation(n)  # one run's rows stored in another order: images matched by id
    _write_run(root, "ridge-a", base, ids)
    _write_run(root, "brainguard-b", {m: v[order] for m, v in close.items()}, ids[order])
    rows = _rows(leaderboard(root, fmt="csv"))
    loser = "brainguard-b" if rows["brainguard-b"]["SSIM p_vs_best"] else "ridge-a"
    p_board = float(rows[loser]["SSIM p_vs_best"])
    assert 0.005 < p_board < 0.5
    result = runner.invoke(app, ["compare", str(root / "ridge-a"), str(root / "brainguard-b"), "--stats"],
                           catch_exceptions=False)
    assert result.exit_code == 0, result.output
    line = next(ln for ln in result.output.splitlines() if "SSIM" in ln)
    assert f"{p_board:.4g}" in line, (p_board, line)


def test_p_at_the_resampling_floor_prints_as_a_bound_and_small_n_is_exact():
    from brainrecon.eval.stats import format_p_value

    rng = np.random.default_rng(0)
    a = rng.uniform(0.4, 0.6, 200)
    c = paired_comparison(a + 0.2, a, n_permutations=999)
    assert c.p_value == 1 / 1000 and format_p_value(c.p_value, c.n_permutations, c.exact) == "< 1/1000"
    # N <= 13: every one of the 2^N sign patterns, so no seed matters.
    d = rng.normal(0.3, 1, 10)
    flips = np.array([[1 if (s >> i) & 1 else -1 for i in range(10)] for s in range(2 ** 10)])
    exact = np.mean(np.abs((flips * d).mean(axis=1)) >= abs(d.mean()) - 1e-12)
    for seed in (0, 1):
        c = paired_comparison(d, np.zeros(10), seed=seed)
        assert c.exact and c.p_value == pytest.approx(exact, abs=1e-15)
    assert format_p_value(exact, 10000, True) == f"{exact:.4g}"


# ---------------------------------------------------------------------------- 1. missing evidence


@pytest.fixture()
def three(tmp_path):
    rng = np.random.default_rng(1)
    n = 80
    ids = np.arange(n)
    base = {m: rng.uniform(0.3, 0.7, n) for m in ("PixCorr", "SSIM")}
    root = tmp_path / "runs"
    _write_run(root, "ridge-best", {m: v + 0.1 for m, v in base.items()}, ids)
    _write_run(root, "brainguard-mid", {m: v + 0.05 for m, v in base.items()}, ids)
    _write_run(root, "neuropictor-low", base, ids)
    return root


def test_a_run_without_per_image_scores_is_marked_not_tested_with_a_note(three):
    from brainrecon.leaderboard import leaderboard

    (three / "neuropictor-low" / "per_image.csv").unlink()
    table = leaderboard(three)
    low = next(ln for ln in table.splitlines() if ln.split()[1:2] == ["neuropictor-low"])
    mid = next(ln for ln in table.splitlines() if ln.split()[1:2] == ["brainguard-mid"])
    assert low.count("n.t.") == 2 and "n.t." not in mid
    assert "n.t. not tested" in table and "re-run `brainrecon evaluate" in table
    assert "neuropictor-low: no per-image scores" in table
    rows = _rows(leaderboard(three, fmt="csv"))
    assert rows["neuropictor-low"]["SSIM mark"] == "n.t." and rows["brainguard-mid"]["SSIM mark"] == "differs"


def test_without_the_best_runs_per_image_scores_nobody_is_tested(three):
    from brainrecon.leaderboard import leaderboard

    (three / "ridge-best" / "per_image.csv").unlink()
    rows = _rows(leaderboard(three, fmt="csv"))
    assert rows["ridge-best"]["SSIM mark"] == "best"
    assert rows["brainguard-mid"]["SSIM mark"] == rows["neuropictor-low"]["SSIM mark"] == "n.t."
    assert "the group's best run on" in leaderboard(three)


def test_marks_are_worded_and_the_terminal_table_marks_the_best_cell(three):
    from brainrecon.leaderboard import leaderboard

    table = leaderboard(three)
    assert "≈" not in table
    best = next(ln for ln in table.splitlines() if ln.split()[1:2] == ["ridge-best"])
    assert best.count("(best)") == 2
    assert "n.s. not distinguishable from the group's best at alpha = 0.05" in table.replace("\n", " ")
    assert "Westfall" in table and "not evidence that they are equal" in table


def test_single_runs_with_per_image_scores_are_not_told_to_re_run_evaluate(tmp_path):
    """Issue 20: the hint appeared whenever no group had two runs."""
    from brainrecon.leaderboard import leaderboard

    rng = np.random.default_rng(2)
    root = tmp_path / "runs"
    _write_run(root, "ridge-a", {"SSIM": rng.uniform(size=20)}, np.arange(20))
    _write_run(root, "ridge-other-ids", {"SSIM": rng.uniform(size=12)}, np.arange(100, 112))
    for fmt in ("table", "markdown", "html"):
        assert "re-run `brainrecon evaluate" not in leaderboard(root, fmt=fmt), fmt


# ---------------------------------------------------------------------------- 1. groups


def test_runs_scored_on_other_metrics_or_a_network_subset_are_not_ranked_together(tmp_path):
    from brainrecon.leaderboard import collect, leaderboard

    rng = np.random.default_rng(4)
    n = 10
    ids = np.arange(n)
    eight = ("PixCorr", "SSIM", "AlexNet(2)", "AlexNet(5)", "Inception", "CLIP", "EffNet-B", "SwAV")
    root = tmp_path / "runs"
    _write_run(root, "ridge-all", {m: rng.uniform(0.2, 0.4, n) for m in eight}, ids)
    _write_run(root, "brainguard-all", {m: rng.uniform(0.2, 0.4, n) for m in eight}, ids)
    # Only PixCorr and SSIM, both higher: it used to be ranked #1 above the others.
    _write_run(root, "neuropictor-two", {m: rng.uniform(0.8, 0.9, n) for m in ("PixCorr", "SSIM")}, ids)
    # All eight, but the network metrics on the first 4 images only.
    sub = {m: rng.uniform(0.2, 0.4, n) for m in eight}
    for m in eight[2:]:
        sub[m][4:] = np.nan
    _write_run(root, "ridge-subset", sub, ids, settings={"network_images": 4})
    entries = {e.name: e for e in collect(root)}
    assert entries["ridge-all"].group_key == entries["brainguard-all"].group_key
    assert entries["neuropictor-two"].group_key != entries["ridge-all"].group_key
    assert entries["ridge-subset"].group_key != entries["ridge-all"].group_key
    table = leaderboard(root)
    block = next(b for b in table.split("\n\n") if "ridge-all" in b)
    assert "neuropictor-two" not in block and "ridge-subset" not in block
    two = next(b for b in table.split("\n\n") if "neuropictor-two" in b)
    assert "2 of 8 metrics" in two.splitlines()[0]
    assert "network metrics on the first 4" in next(b for b in table.split("\n\n") if "ridge-subset" in b)


# ---------------------------------------------------------------------------- 1. NaN and unavailable


def test_nan_and_unavailable_print_differently_with_their_reasons_in_every_format(tmp_path):
    from brainrecon.leaderboard import leaderboard

    rng = np.random.default_rng(6)
    n = 12
    ids = np.arange(n)
    root = tmp_path / "runs"
    why = "weights clip not found: clip-vit-large-patch14 (searched ~/.cache/huggingface)"
    _write_run(root, "ridge-a", {"PixCorr": rng.uniform(size=n), "SSIM": rng.uniform(size=n)}, ids,
               unavailable={"CLIP": why})
    nan_ssim = rng.uniform(size=n)
    nan_ssim[3] = np.nan
    _write_run(root, "brainguard-b", {"PixCorr": rng.uniform(size=n), "SSIM": nan_ssim}, ids,
               unavailable={"CLIP": why})
    table = leaderboard(root)
    b = next(ln for ln in table.splitlines() if ln.split()[1:2] == ["brainguard-b"])
    assert "NaN" in b and "n/a" in b
    assert "brainguard-b: SSIM is NaN (1 of 12 images have no score" in table
    assert "unavailable for all runs: CLIP (weights missing" in table
    md = leaderboard(root, fmt="markdown")
    assert "NaN" in md and "n/a" in md and "SSIM is NaN" in md and "weights missing" in md
    rows = _rows(leaderboard(root, fmt="csv"))
    assert rows["brainguard-b"]["SSIM status"].startswith("NaN: 1 of 12 images")
    assert rows["ridge-a"]["CLIP status"].startswith("unavailable: weights clip not found")
    assert rows["ridge-a"]["SSIM status"] == ""
    page = leaderboard(root, fmt="html")
    assert "SSIM is NaN" in page and "weights clip not found" in page


def test_compare_stats_prints_n_per_metric_and_why_images_were_dropped(tmp_path):
    from brainrecon.cli import app

    rng = np.random.default_rng(7)
    n = 30
    ids = np.arange(n)
    root = tmp_path / "runs"
    a = {"PixCorr": rng.uniform(size=n), "SSIM": rng.uniform(size=n)}
    b = {"PixCorr": rng.uniform(size=n), "SSIM": rng.uniform(size=n)}
    a["SSIM"][[0, 5]] = np.nan
    b["SSIM"][7] = np.nan
    _write_run(root, "ridge-a", a, ids, unavailable={"CLIP": "weights clip not found"})
    _write_run(root, "ridge-b", b, ids)
    result = runner.invoke(app, ["compare", str(root / "ridge-a"), str(root / "ridge-b"), "--stats"],
                           catch_exceptions=False)
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert re.search(r"SSIM ↑ .* 27 ", text) and re.search(r"PixCorr ↑ .* 30 ", text)
    assert "SSIM: 3 of 30 images dropped (2 without a score in A (NaN), 1 without a score in B (NaN))" in text
    assert "CLIP: unavailable in A (weights clip not found)" in text


# ---------------------------------------------------------------------------- 3. the page


def test_html_opens_with_the_legend_and_reasons_and_names_the_grid_images(tmp_path):
    from PIL import Image

    from brainrecon.leaderboard import leaderboard

    rng = np.random.default_rng(8)
    n = 10
    ids = np.arange(40, 40 + n)
    root = tmp_path / "runs"
    for name in ("ridge-a", "brainguard-b"):
        path = _write_run(root, name, {"SSIM": rng.uniform(size=n)}, ids, unavailable={"CLIP": "weights missing"},
                          settings={"grid_ids": [40, 41, 42]})
        Image.new("RGB", (8, 8)).save(path / "grid.png")
    page = leaderboard(root, fmt="html")
    legend, first_table, first_grid = page.find('class="legend"'), page.find("<table"), page.find("<figure")
    assert -1 < legend < first_table < first_grid
    assert page.find("unavailable for all runs: CLIP") < first_table
    assert "test images 40, 41, 42 (3 of 10)" in page
