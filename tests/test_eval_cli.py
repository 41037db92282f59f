"""The evaluation commands: evaluate, leaderboard, compare, weights."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from brainrecon.cli import app
from brainrecon.runs import list_runs
from conftest import copy_runs

SMALL = "synthetic:n_train=120,n_test=12,image_size=32,surface_size=32"
runner = CliRunner()


def _flat(text: str) -> str:
    """Terminal output without rich's box drawing and line wrapping."""
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", text).split())


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, evaluated_ridge_runs):
    """A real ridge run written by `brainrecon fit`, scored by the harness at the end of the fit
    (subject 1's run of the session's `fit --decoder ridge --alphas 100,10000`, copied)."""
    return copy_runs(evaluated_ridge_runs[0], tmp_path_factory.mktemp("runs"), ["ridge-subj01-pixels"])


def test_fit_wrote_metrics_and_grid_through_the_harness(fitted):
    run = list_runs(fitted)[0]
    metrics = json.loads((run.path / "metrics.json").read_text())
    assert metrics["format"] == "brainrecon.eval.report/1"
    # No network weights offline; retrieval in the ridge's pixel target space needs none.
    assert set(metrics["metrics"]) == {"PixCorr", "SSIM", "ImageRet(target)", "BrainRet(target)"}
    assert metrics["settings"]["retrieval"]["target_space"] == "pixels (32, 32, 3)"
    assert "alexnet-owt-7be5be79.pth" in metrics["unavailable"]["AlexNet(2)"]
    assert Image.open(run.path / "grid.png").size[1] > 128


def test_evaluate_command(fitted):
    run = list_runs(fitted)[0]
    (run.path / "metrics.json").unlink()
    result = invoke("evaluate", run.path, "-m", "PixCorr", "-m", "SSIM", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "PixCorr ↑" in result.output and "SSIM ↑" in result.output
    saved = json.loads((run.path / "metrics.json").read_text())
    assert set(saved["metrics"]) == {"PixCorr", "SSIM"} and saved["variant"] == "mindeye"

    result = invoke("evaluate", run.path, "-m", "PixCorr", "-m", "CLIP")
    assert result.exit_code == 0
    assert "CLIP not scored (weights missing)" in result.output and "`brainrecon weights`" in result.output
    assert "clip-vit-large-patch14" in json.loads((run.path / "metrics.json").read_text())["unavailable"]["CLIP"]


def test_evaluate_command_errors(fitted, tmp_path):
    run = list_runs(fitted)[0]
    result = invoke("evaluate", run.path, "--variant", "mindeye3")
    assert result.exit_code == 2
    text = _flat(result.output)
    assert "'mindeye3' is not one of 'mindeye', 'braindiffuser'" in text
    result = invoke("evaluate", run.path, "--strict", "-m", "SwAV", "--weights-dir", tmp_path)
    assert result.exit_code == 1
    assert "swav_800ep_pretrain.pth.tar not found" in result.output
    result = invoke("evaluate", tmp_path)
    assert result.exit_code == 1 and "is not a brainrecon run" in result.output


def test_leaderboard_command(fitted, tmp_path):
    result = invoke("leaderboard", "--runs", fitted, "--format", "markdown", "--sort", "PixCorr")
    assert result.exit_code == 0, result.output
    assert "| 1 | ridge-subj01-pixels |" in result.output
    assert "published" not in result.output  # synthetic data: no published rows
    out = tmp_path / "board.html"
    result = invoke("leaderboard", "--runs", fitted, "--format", "html", "--out", out)
    assert result.exit_code == 0
    assert out.read_text().count("data:image/png;base64,") == 1
    result = invoke("leaderboard", "--runs", fitted, "--format", "xml")
    assert result.exit_code == 2 and "'xml' is not one of" in _flat(result.output)


def test_compare_command(fitted, tmp_path):
    run = list_runs(fitted)[0]
    out = tmp_path / "cmp.png"
    result = invoke("compare", run.path, run.path, "--out", out, "--rows", 3, "--cell", 32)
    assert result.exit_code == 0, result.output
    img = np.asarray(Image.open(out))
    assert img.shape[1] > 3 * 32 and img.shape[0] > 3 * 32


def test_weights_command(tmp_path):
    (tmp_path / "inception_v3_google-0cc3c7bd.pth").write_bytes(b"x")
    result = invoke("weights", "--weights-dir", tmp_path)
    assert result.exit_code == 0
    text = result.output
    assert "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth" in text
    assert "https://dl.fbaipublicfiles.com/deepcluster/swav_800ep_pretrain.pth.tar" in text
    assert "present  inception_v3_google-0cc3c7bd.pth" in text
    assert "missing  efficientnet_b1-c27df63c.pth" in text
    assert "5 file(s) missing" in text


def test_evaluate_options_intervals_and_worst_images(fitted, tmp_path):
    run = list_runs(fitted)[0]
    result = invoke("evaluate", run.path, "-m", "PixCorr", "-m", "SSIM", "--ssim-mode", "columnwise",
                    "--cache-dir", tmp_path / "cache", "--bootstrap", 500, "--seed", 3,
                    "--sort-by", "SSIM", "--worst", 3)
    assert result.exit_code == 0, result.output
    assert "95% interval" in result.output and "worst 3 by SSIM" in result.output
    saved = json.loads((run.path / "metrics.json").read_text())
    assert saved["settings"]["ssim_mode"] == "columnwise"
    assert saved["bootstrap"]["n_resamples"] == 500 and saved["bootstrap"]["seed"] == 3
    lo, hi = saved["intervals"]["SSIM"]
    assert lo <= saved["metrics"]["SSIM"] <= hi
    rows = (run.path / "per_image.csv").read_text().splitlines()
    assert rows[0] == "image_id,PixCorr,SSIM" and len(rows) == 1 + saved["n_images"]
    ssim = {int(r.split(",")[0]): float(r.split(",")[2]) for r in rows[1:]}
    img = np.asarray(Image.open(run.path / "worst-ssim.png"))
    assert img.shape[0] > 3 * 64
    from brainrecon.workflows.figures import _ranked

    chosen, labels = _ranked(run, list(ssim), "SSIM", worst=True)
    assert chosen[:3] == sorted(ssim, key=ssim.get)[:3] and labels[0].startswith(f"{chosen[0]} SSIM ")

    # MindEye2's enhanced evaluation with the run itself as the blend: 0.75 r + 0.25 r = r.
    result = invoke("evaluate", run.path, "-m", "PixCorr", "--blend", run.path)
    assert result.exit_code == 0, result.output
    blended = json.loads((run.path / "metrics.json").read_text())
    assert blended["settings"]["blend"] is True and "run" in blended["settings"]["blend_source"]
    assert blended["metrics"]["PixCorr"] == pytest.approx(saved["metrics"]["PixCorr"], abs=1e-5)

    result = invoke("evaluate", run.path, "--worst", 3)
    assert result.exit_code == 1 and "add --sort-by METRIC" in result.output
    result = invoke("evaluate", run.path, "--sort-by", "clip")
    assert result.exit_code == 2 and "'clip' is not one of" in _flat(result.output)


def test_compare_stats_of_a_run_with_itself_is_never_significant(fitted):
    run = list_runs(fitted)[0]
    assert invoke("evaluate", run.path, "-m", "PixCorr", "-m", "SSIM").exit_code == 0
    result = invoke("compare", run.path, run.path, "--stats")
    assert result.exit_code == 0, result.output
    assert "PixCorr ↑" in result.output and "+0 [+0, +0]" in result.output
    assert " 1 " in result.output  # p = 1
    result = invoke("compare", run.path, "--stats")
    assert result.exit_code == 1 and "exactly two runs" in result.output
    result = invoke("compare", run.path, run.path)
    assert result.exit_code == 1 and "--out" in result.output
