"""Damaged files of a finished run give one clear BrainreconError, never a traceback or a
silent wrong answer; a broken run among good ones is skipped with a warning."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

from brainrecon.errors import BrainreconError
from brainrecon.runs import BrokenRunWarning, Run, list_runs


@pytest.fixture(scope="module")
def ridge_run(tmp_path_factory):
    from brainrecon import workflows

    out = tmp_path_factory.mktemp("runs")
    runs = workflows.fit("ridge", data="synthetic:n_train=80,n_test=8,image_size=32,surface_size=32", subjects=[1],
                         out=out, params={"device": "cpu", "alphas": [1.0, 100.0]}, evaluate=False)
    return runs[0].path


@pytest.fixture
def run_copy(ridge_run, tmp_path):
    dst = tmp_path / "runs" / ridge_run.name
    shutil.copytree(ridge_run, dst)
    return dst


def _truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


CASES = {
    "decoder npz truncated": lambda r: _truncate(next((r / "decoder").glob("*.npz"))),
    "decoder npz emptied": lambda r: next((r / "decoder").glob("*.npz")).write_bytes(b""),
    "decoder json truncated": lambda r: _truncate(r / "decoder" / "brainrecon.json"),
    "decoder json not json": lambda r: (r / "decoder" / "brainrecon.json").write_text("hello"),
    "decoder json is a directory": lambda r: ((r / "decoder" / "brainrecon.json").unlink(),
                                              (r / "decoder" / "brainrecon.json").mkdir()),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_damaged_decoder_is_a_clear_error(run_copy, case):
    CASES[case](run_copy)
    with pytest.raises(BrainreconError, match=str(run_copy / "decoder")):
        Run.open(run_copy).load_decoder()


def test_wrong_shaped_ridge_weights_are_refused(run_copy):
    npz = next((run_copy / "decoder").glob("*.npz"))
    with np.load(npz) as f:
        arrays = {k: f[k] for k in f.files}
    arrays["coef"] = arrays["coef"][:-1]
    np.savez(npz, **arrays)
    with pytest.raises(BrainreconError, match=r"'coef' is float32 \(1599, 3072\), expected float32 \(1600, 3072\)"):
        Run.open(run_copy).load_decoder()


@pytest.mark.parametrize("name, cut, found, expected", [
    ("alpha_grid", lambda a: a[:1], r"float64 \(1,\)", r"float64 \(2,\)"),
    ("alphas", lambda a: a[:-1], r"float64 \(3071,\)", r"float64 \(3072,\)"),
    ("cv_scores", lambda a: a[:1], r"float32 \(1, 3072\)", r"float32 \(2, 3072\)"),
    ("alpha_grid", lambda a: a.astype(np.float32), r"float32 \(2,\)", r"float64 \(2,\)"),
])
def test_every_saved_ridge_array_is_checked_against_the_config(run_copy, name, cut, found, expected):
    # The fixture's brainrecon.json says alphas=[1.0, 100.0]: a grid of 2, scored for 3072 targets.
    npz = next((run_copy / "decoder").glob("*.npz"))
    with np.load(npz) as f:
        arrays = {k: f[k] for k in f.files}
    arrays[name] = cut(arrays[name])
    np.savez(npz, **arrays)
    with pytest.raises(BrainreconError, match=f"'{name}' is {found}, expected {expected}.*2 alphas"):
        Run.open(run_copy).load_decoder()


def test_run_json_missing_fields(run_copy):
    info = json.loads((run_copy / "run.json").read_text())
    del info["data"]
    (run_copy / "run.json").write_text(json.dumps(info))
    with pytest.raises(BrainreconError, match="missing field 'data'"):
        Run.open(run_copy).dataset()
    del info["subject"]
    (run_copy / "run.json").write_text(json.dumps(info))
    with pytest.raises(BrainreconError, match="missing field.*'subject'"):
        Run.open(run_copy)


@pytest.mark.parametrize("keep", [0.0, 0.1, 0.5, 0.9])
def test_truncated_arrays(run_copy, keep):
    _truncate(run_copy / "reconstructions.npy", keep)
    with pytest.raises(BrainreconError, match="reconstructions.npy"):
        Run.open(run_copy).reconstructions()


def test_test_ids_holding_strings(run_copy):
    np.save(run_copy / "test_ids.npy", np.array(["a", "b"]))
    with pytest.raises(BrainreconError, match="test_ids.npy holds <U1 values"):
        Run.open(run_copy).test_ids()


def test_predictions_of_wrong_length(run_copy):
    pred = np.load(run_copy / "predictions.npy")
    np.save(run_copy / "predictions.npy", pred[:-1])
    with pytest.raises(BrainreconError, match="expected 8 rows"):
        Run.open(run_copy).predictions()


def test_broken_run_is_skipped_among_good_ones(run_copy):
    root = run_copy.parent
    good = root / "good"
    shutil.copytree(run_copy, good)
    (run_copy / "run.json").write_text("{")
    with pytest.warns(BrokenRunWarning, match=f"skipping broken run {run_copy.name}"):
        runs = list_runs(root)
    assert [r.name for r in runs] == [Run.open(good).name]
    assert runs[0].test_ids().shape == (8,)


def test_cli_prints_one_red_line_and_exits_1(run_copy, tmp_path):
    from brainrecon.cli import app

    _truncate(next((run_copy / "decoder").glob("*.npz")))
    result = CliRunner().invoke(app, ["predict", str(run_copy), "--out", str(tmp_path / "p.npy")])
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    assert "damaged or truncated" in result.output


def test_leaderboard_cli_warns_in_one_line_and_ranks_the_rest(run_copy):
    from brainrecon.cli import app

    root = run_copy.parent
    shutil.copytree(run_copy, root / "good")
    (run_copy / "run.json").write_text("{")
    result = CliRunner().invoke(app, ["leaderboard", "--runs", str(root)])
    assert result.exit_code == 0, result.output
    assert f"warning: skipping broken run {run_copy.name}" in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize("damage", ["truncated values", "garbage cache.json", "missing filled", "wrong shape"])
def test_damaged_target_cache_is_recomputed_with_a_warning(tmp_path, damage):
    from brainrecon.targets.cache import DamagedCacheWarning, IdKeyedCache

    ids = np.arange(10, 30)
    compute = lambda batch: np.stack([np.full((3, 4), float(i)) for i in batch]).astype(np.float32)  # noqa: E731
    IdKeyedCache(tmp_path / "c", (3, 4)).get_or_compute(ids, compute, progress=False)
    d = tmp_path / "c"
    if damage == "truncated values":
        (d / "values.npy").write_bytes((d / "values.npy").read_bytes()[:100])
    elif damage == "garbage cache.json":
        (d / "cache.json").write_text("{not json")
    elif damage == "missing filled":
        (d / "filled.npy").unlink()
    else:
        np.save(d / "values.npy", np.zeros((20, 5), dtype=np.float32))
    calls = []

    def counting(batch):
        calls.append(len(batch))
        return compute(batch)

    with pytest.warns(DamagedCacheWarning, match="is damaged .* recomputed"):
        got = IdKeyedCache(tmp_path / "c", (3, 4)).get_or_compute(ids, counting, progress=False)
    np.testing.assert_array_equal(got, compute(ids))
    assert sum(calls) == len(ids)  # everything recomputed, nothing trusted
    np.testing.assert_array_equal(IdKeyedCache(tmp_path / "c", (3, 4)).get(ids), compute(ids))


@pytest.mark.slow
def test_fit_killed_between_writing_its_runs_resumes_without_overwrite(tmp_path):
    """A BrainGuard fit of two subjects is cut after writing subject 1's run (the state a
    SIGKILL there leaves: run 1 complete, run 2 absent, checkpoint finished). The same command
    with --resume keeps run 1, writes run 2, and both equal an uninterrupted fit's; a run
    written with other parameters is still refused."""
    import torch

    from brainrecon import workflows

    data = "synthetic:n_train=80,n_test=8,image_size=32,surface_size=32"
    params = {"device": "cpu", "hidden": 16, "n_blocks": 2, "rounds": 2, "batch_size": 40, "progress": False}
    whole = workflows.fit("brainguard", data=data, subjects=[1, 2], out=tmp_path / "whole", params=params,
                          evaluate=False)
    ck = {**params, "checkpoint_dir": str(tmp_path / "ck")}
    first = workflows.fit("brainguard", data=data, subjects=[1, 2], out=tmp_path / "cut", params=ck, evaluate=False)
    shutil.rmtree(first[1].path)
    logged = []
    again = workflows.fit("brainguard", data=data, subjects=[1, 2], out=tmp_path / "cut",
                          params={**ck, "resume": True}, evaluate=False, log=logged.append)
    assert any(line.startswith("kept run") and first[0].name in line for line in logged)
    for a, b in zip(whole, again):
        s = a.subject
        for k, v in a.load_decoder().models_[s].state_dict().items():
            torch.testing.assert_close(b.load_decoder().models_[s].state_dict()[k], v, rtol=0, atol=0)
    with pytest.raises(BrainreconError, match="already exists"):
        workflows.fit("brainguard", data=data, subjects=[1, 2], out=tmp_path / "cut",
                      params={**ck, "resume": True, "lr": 1e-2}, evaluate=False)


def test_a_swap_cut_between_its_renames_restores_the_previous_version(run_copy):
    """`--overwrite` renames the old run aside, then the new one in: killed between the two,
    the run is missing and `.NAME.old` holds the previous version; readers restore it."""
    old = run_copy.with_name(f".{run_copy.name}.old")
    run_copy.rename(old)
    with pytest.warns(RuntimeWarning, match="previous version was restored"):
        runs = list_runs(run_copy.parent)
    assert [r.path for r in runs] == [run_copy] and not old.exists()
    run_copy.rename(old)
    with pytest.warns(RuntimeWarning, match="previous version was restored"):
        assert Run.open(run_copy).test_ids().shape == (8,)


def test_evaluate_and_compare_over_a_folder_skip_the_broken_run(run_copy, tmp_path, monkeypatch):
    from brainrecon.cli import app

    monkeypatch.setenv("BRAINRECON_CACHE", str(tmp_path / "cache"))
    root = run_copy.parent
    shutil.copytree(run_copy, root / "good")
    _truncate(run_copy / "reconstructions.npy")
    result = CliRunner().invoke(app, ["evaluate", str(root), "-m", "PixCorr"])
    assert result.exit_code == 0, result.output
    assert f"warning: skipping broken run {run_copy.name}" in result.output and "reconstructions.npy" in result.output
    assert "evaluated 1 of 2 runs" in result.output and "Traceback" not in result.output
    assert (root / "good" / "metrics.json").is_file() and not (run_copy / "metrics.json").exists()
    (run_copy / "run.json").write_text("{")
    result = CliRunner().invoke(app, ["compare", str(root), "--out", str(tmp_path / "c.png"), "--rows", "2"])
    assert result.exit_code == 0, result.output
    assert f"warning: skipping broken run {run_copy.name}" in result.output and (tmp_path / "c.png").is_file()
    shutil.rmtree(root / "good")
    result = CliRunner().invoke(app, ["evaluate", str(root)])
    assert result.exit_code == 1 and "error:" in result.output and "Traceback" not in result.output
