"""run.json records what made the run; `brainrecon --version` and `--quiet`."""

import os

from typer.testing import CliRunner

from brainrecon import __version__
from brainrecon.cli import app


def test_run_records_provenance(tmp_path):
    from brainrecon import workflows

    run = workflows.fit("ridge", data="synthetic:n_train=60,n_test=6,image_size=32,surface_size=32",
                        subjects=[1], out=tmp_path, params={"device": "cpu", "alphas": [1.0, 10.0]},
                        evaluate=False)[0]
    prov = run.info["provenance"]
    assert prov["versions"]["brainrecon"] == __version__
    assert prov["versions"]["numpy"]
    assert prov["device"] == "cpu"
    assert isinstance(prov["command"], list)
    assert prov["git_commit"] is None or len(prov["git_commit"].split("+")[0]) == 40


def test_version_flag():
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"brainrecon {__version__}"


def test_quiet_turns_progress_bars_off(monkeypatch):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    result = CliRunner().invoke(app, ["--quiet", "decoders"])
    assert result.exit_code == 0, result.output
    assert os.environ.get("TQDM_DISABLE") == "1"


def test_progress_bars_obey_tqdm_disable(monkeypatch):
    from brainrecon.progress import bar_disabled

    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    assert bar_disabled(False) is True
    assert bar_disabled(True) is None  # tqdm: on for a terminal, off otherwise
    monkeypatch.setenv("TQDM_DISABLE", "1")
    assert bar_disabled(True) is True
