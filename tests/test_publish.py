"""Publishing a run (model card, the dry-run folder) and loading it back through hf:// from a
pre-populated hub cache, never the network."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

from brainrecon.cli import app
from brainrecon.decoders import load_decoder
from brainrecon.errors import BrainreconError
from brainrecon.runs import Run, list_runs

SMALL = "synthetic:n_train=120,n_test=12,image_size=32,surface_size=32"
runner = CliRunner()


@pytest.fixture(scope="module")
def fitted_run(tmp_path_factory, evaluated_ridge_runs):
    """Subject 1's run of the session's `fit --decoder ridge --alphas 100,10000`, copied."""
    from conftest import copy_runs

    return list_runs(copy_runs(evaluated_ridge_runs[0], tmp_path_factory.mktemp("runs"), ["ridge-subj01-pixels"]))[0]


def test_model_card_and_dry_run_folder(fitted_run, tmp_path):
    result = runner.invoke(app, ["push", str(fitted_run.path), "lab/ridge-subj01", "--dry-run", str(tmp_path / "up")])
    assert result.exit_code == 0, result.output
    assert "nothing uploaded" in result.output
    up = tmp_path / "up"
    names = sorted(p.name for p in up.iterdir())
    assert names == ["README.md", "decoder", "grid.png", "metrics.json", "per_image.csv", "run.json", "test_ids.npy"]
    assert (up / "decoder" / "brainrecon.json").is_file()
    card = (up / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: brainrecon\n")
    assert "A **ridge** decoder" in card and "subject 1" in card
    assert "| PixCorr | " in card and "[" in card.split("| PixCorr | ")[1].splitlines()[0]  # with its interval
    assert "fingerprint" in card and "himalaya" in card and "| alphas |" in card
    assert 'load_decoder("hf://lab/ridge-subj01")' in card
    again = runner.invoke(app, ["push", str(fitted_run.path), "lab/ridge-subj01", "--dry-run", str(up)])
    assert again.exit_code == 1 and "is not empty" in again.output


def _populate_hub_cache(hf_home, repo_id, folder, commit="0123456789abcdef0123456789abcdef01234567"):
    repo = hf_home / "hub" / ("models--" + repo_id.replace("/", "--"))
    shutil.copytree(folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    return repo / "snapshots" / commit


@pytest.mark.numerics
def test_hf_address_loads_from_the_hub_cache_offline(fitted_run, tmp_path, monkeypatch, small_data):
    from brainrecon.publish import stage

    folder = stage(fitted_run, tmp_path / "up")
    hf_home = tmp_path / "hf"
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    snap = _populate_hub_cache(hf_home, "lab/ridge-subj01", folder)

    decoder = load_decoder("hf://lab/ridge-subj01")
    local = load_decoder(fitted_run.path / "decoder")
    a, b = decoder.predict(small_data.test)[1], local.predict(small_data.test)[1]
    np.testing.assert_array_equal(a, b)
    assert Run.open("hf://lab/ridge-subj01").path == snap
    assert load_decoder("hf://lab/ridge-subj01@main").predict(small_data.test)[1].shape == a.shape

    out = tmp_path / "pred.npy"
    result = runner.invoke(app, ["predict", "hf://lab/ridge-subj01", "--data", SMALL, "--out", str(out)])
    assert result.exit_code == 0, result.output
    # Exact by construction: the same process runs the same products on the same data (a synthetic
    # subject is the same bit for bit whichever subjects are loaded).
    np.testing.assert_array_equal(np.load(out), a)

    with pytest.raises(BrainreconError, match="not in the Hugging Face cache"):
        load_decoder("hf://lab/never-published")
    with pytest.raises(BrainreconError, match="not a hub address"):
        load_decoder("hf://just-a-name")
