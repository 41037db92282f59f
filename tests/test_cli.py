"""The CLI and the workflow functions behind it, on small synthetic data."""

import re

import numpy as np
import pytest
from typer.testing import CliRunner

from brainrecon.cli import app
from brainrecon.runs import Run, list_runs

SMALL = "synthetic:n_train=120,n_test=12,image_size=32,surface_size=32"
runner = CliRunner()


def _flat(text: str) -> str:
    """Terminal output without rich's box drawing and line wrapping."""
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", text).split())


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def ridge_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    result = invoke("fit", "--decoder", "ridge", "--data", SMALL, "--subjects", 1, 2,
                    "--out", out, "--alphas", "100,1000,10000")
    assert result.exit_code == 0, result.output
    return out, result


def test_fit_writes_complete_runs(ridge_runs):
    out, result = ridge_runs
    runs = list_runs(out)
    assert [r.name for r in runs] == ["ridge-subj01-pixels", "ridge-subj02-pixels"]
    r = runs[0]
    assert r.info["decoder"] == "ridge" and r.info["subject"] == 1 and r.info["target"] == "pixels"
    assert r.info["data"]["kind"] == "synthetic" and r.info["n_test"] == 12
    assert r.predictions().shape == (12, 32, 32, 3)
    assert r.reconstructions().shape == (12, 32, 32, 3) and r.reconstructions().dtype == np.uint8
    np.testing.assert_array_equal(r.test_ids(), np.arange(12))
    metrics = r.metrics()
    assert metrics is not None
    assert (r.path / "grid.png").is_file()
    assert "ridge-subj01-pixels" in result.output
    # the decoder saved in the run predicts what the run recorded
    decoder = r.load_decoder()
    pred = decoder.predict(r.dataset().test)[1]
    np.testing.assert_allclose(pred, r.predictions(), rtol=1e-5, atol=1e-6)


def test_existing_run_is_refused_without_overwrite(ridge_runs):
    out, _ = ridge_runs
    before = (out / "ridge-subj01-pixels" / "run.json").read_text()
    result = runner.invoke(app, ["fit", "--decoder", "ridge", "--data", SMALL, "--subject", "1",
                                 "--out", str(out), "--alphas", "100"])
    assert result.exit_code == 1
    assert "already exists" in result.output and "--overwrite" in result.output
    assert (out / "ridge-subj01-pixels" / "run.json").read_text() == before


def test_predict_command(ridge_runs, tmp_path):
    out, _ = ridge_runs
    target = tmp_path / "pred.npy"
    result = invoke("predict", out / "ridge-subj01-pixels", "--out", target)
    assert result.exit_code == 0, result.output
    np.testing.assert_allclose(np.load(target), Run.open(out / "ridge-subj01-pixels").predictions(),
                               rtol=1e-5, atol=1e-6)
    assert np.load(tmp_path / "pred_ids.npy").tolist() == list(range(12))
    again = runner.invoke(app, ["predict", str(out / "ridge-subj01-pixels"), "--out", str(target)])
    assert again.exit_code == 1 and "already exists" in again.output


def test_unknown_decoder_is_refused_with_the_valid_names():
    result = runner.invoke(app, ["fit", "--decoder", "rige"])
    assert result.exit_code == 2  # a typed choice: click's usage error
    text = _flat(result.output)
    assert "'rige' is not one of" in text and "'brainguard'" in text and "'ridge'" in text
    assert "Traceback" not in result.output


def test_typed_choices_show_in_help_and_refuse_typos():
    for args, shown in ((["evaluate", "--help"], "[mindeye|braindiffuser]"),
                        (["leaderboard", "--help"], "[table|markdown|csv|html]")):
        result = runner.invoke(app, args, env={"COLUMNS": "250"})
        assert shown in result.output
    result = runner.invoke(app, ["fit", "--decoder", "ridge", "--target", "pixel"])
    assert result.exit_code == 2 and "'pixel' is not one of" in _flat(result.output)


def test_missing_data_directory(tmp_path):
    result = runner.invoke(app, ["data", "info", "--data", str(tmp_path / "nope")])
    assert result.exit_code == 1
    assert "Data not found" in result.output and "Places tried" in result.output


def test_debug_variable_shows_traceback(monkeypatch, tmp_path):
    monkeypatch.setenv("BRAINRECON_DEBUG", "1")
    result = runner.invoke(app, ["data", "info", "--data", str(tmp_path / "nope")])
    assert result.exit_code != 0
    assert "Data not found" in str(result.exception)


def test_nan_voxels_error_and_zero_policy(tmp_path):
    import h5py

    rng = np.random.default_rng(0)
    path = tmp_path / "d.h5"
    with h5py.File(path, "w") as f:
        g = f.create_group("subj01")
        X = rng.normal(size=(30, 20)).astype(np.float32)
        X[2, 3] = np.nan
        g["train_voxels"] = X
        g["test_voxels"] = rng.normal(size=(4, 20)).astype(np.float32)
        g["train_images"] = rng.integers(0, 255, (30, 8, 8, 3), dtype=np.uint8)
        g["test_images"] = rng.integers(0, 255, (4, 8, 8, 3), dtype=np.uint8)
    result = runner.invoke(app, ["fit", "--decoder", "ridge", "--data", str(path), "--out", str(tmp_path / "r"),
                                 "--param", "target_options={\"size\": 4}", "--no-evaluate"])
    assert result.exit_code == 1
    assert "1 voxel values are NaN or infinite" in result.output and "nan_policy='zero'" in result.output
    assert "(command line: --nan-policy)" in result.output
    ok = runner.invoke(app, ["fit", "--decoder", "ridge", "--data", str(path), "--out", str(tmp_path / "r"),
                             "--nan-policy", "zero", "--param", "target_options={\"size\": 4}", "--no-evaluate"])
    assert ok.exit_code == 0, ok.output


def test_decoders_and_data_info():
    result = invoke("decoders")
    assert result.exit_code == 0
    for name in ("ridge", "brainguard", "neuropictor"):
        assert name in result.output
    info = invoke("data", "info", "--data", SMALL)
    assert info.exit_code == 0 and "1600" in info.output


def test_shell_completion_script_is_available():
    import subprocess
    import sys
    from pathlib import Path

    exe = Path(sys.executable).parent / "brainrecon"
    if not exe.is_file():
        pytest.skip("the brainrecon console script is not installed in this environment")
    result = subprocess.run([str(exe), "--show-completion", "bash"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "_brainrecon_completion" in result.stdout
