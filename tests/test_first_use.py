"""Traps a newcomer met on first use (issue 20 §3), one test each, through the CLI where they met them."""

from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

from brainrecon.cli import app
from brainrecon.errors import DataError
from brainrecon.runs import Run
from conftest import copy_runs

SMALL = "synthetic:n_train=120,n_test=12,image_size=32,surface_size=32"
HEAVY = ("torch", "sklearn", "diffusers", "transformers")
runner = CliRunner()


def _flat(text: str) -> str:
    """Terminal output without rich's box drawing and line wrapping."""
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", text).split())


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(autouse=True)
def _no_weights(monkeypatch, tmp_path):
    """No metric weights anywhere (OpenAI's CLIP file is looked for under ~/.cache/clip too)."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("BRAINRECON_WEIGHTS", raising=False)
    monkeypatch.delenv("BRAINRECON_ALLOW_DOWNLOADS", raising=False)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, evaluated_ridge_runs):
    """Two ridge runs written (and scored, PixCorr and SSIM only: no weights) by `brainrecon fit`
    (a copy of the session's `fit --decoder ridge --subjects 1 2 --alphas 100,10000`)."""
    source, result = evaluated_ridge_runs
    return copy_runs(source, tmp_path_factory.mktemp("runs")), result


@pytest.fixture
def run_copy(fitted, tmp_path):
    """A private copy of subject 1's run, in a folder of its own."""
    root = tmp_path / "runs"
    shutil.copytree(fitted[0] / "ridge-subj01-pixels", root / "ridge-subj01-pixels")
    return root / "ridge-subj01-pixels"


# 1 ------------------------------------------------------------------------------------------
def test_sort_by_a_metric_without_weights_fails_before_evaluating_anything(run_copy):
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in run_copy.iterdir() if p.is_file()}
    result = runner.invoke(app, ["evaluate", str(run_copy), "--sort-by", "CLIP", "--worst", "8"])
    assert result.exit_code == 1
    text = _flat(result.output)
    assert "--sort-by CLIP" in text and "weights" in text and "missing" in text
    assert "brainrecon weights" in text
    assert "was not scored" not in text
    after = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in run_copy.iterdir() if p.is_file()}
    assert after == before  # nothing evaluated, nothing rewritten, no worst-clip.png
    # A metric left out by -m cannot be sorted by either, and that is said before any work too.
    result = runner.invoke(app, ["evaluate", str(run_copy), "-m", "PixCorr", "--sort-by", "SSIM"])
    assert result.exit_code == 1 and "-m SSIM" in _flat(result.output)


# 2 ------------------------------------------------------------------------------------------
def test_each_variant_keeps_its_own_report_and_the_leaderboard_picks_one(run_copy):
    from brainrecon.leaderboard import collect

    mindeye = (run_copy / "metrics.json").read_bytes()
    per_image = (run_copy / "per_image.csv").read_bytes()
    result = invoke("evaluate", run_copy, "--variant", "braindiffuser", "-m", "PixCorr", "-m", "SSIM")
    assert result.exit_code == 0, result.output
    assert (run_copy / "metrics.json").read_bytes() == mindeye
    assert (run_copy / "per_image.csv").read_bytes() == per_image
    assert "metrics-braindiffuser.json" in _flat(result.output)
    bd = json.loads((run_copy / "metrics-braindiffuser.json").read_text())
    assert bd["variant"] == "braindiffuser" and bd["settings"]["ssim_mode"] == "columnwise"
    assert (run_copy / "per_image-braindiffuser.csv").read_text().startswith("image_id,PixCorr,SSIM\n")

    run = Run.open(run_copy)
    assert run.metrics().variant == "mindeye"
    assert run.metrics("braindiffuser").variant == "braindiffuser"
    assert run.metrics("braindiffuser")["SSIM"] == bd["metrics"]["SSIM"]
    assert run.variants() == ["mindeye", "braindiffuser"]

    default, = collect(run_copy.parent)
    chosen, = collect(run_copy.parent, variant="braindiffuser")
    assert default.variant == "mindeye" and chosen.variant == "braindiffuser"
    assert chosen.scores["SSIM"] == bd["metrics"]["SSIM"] != default.scores["SSIM"]
    assert set(chosen.per_image) == {"PixCorr", "SSIM"}
    board = invoke("leaderboard", "--runs", run_copy.parent, "--variant", "braindiffuser", "--format", "csv")
    assert board.exit_code == 0, board.output
    header, row = list(csv.reader(board.output.splitlines()))[:2]
    cells = dict(zip(header, row))
    assert cells["variant"] == "braindiffuser" and float(cells["SSIM"]) == pytest.approx(bd["metrics"]["SSIM"])
    # A run never scored with the asked variant is listed as such, with the command that scores it.
    (run_copy / "metrics-braindiffuser.json").unlink()
    (run_copy / "per_image-braindiffuser.csv").unlink()
    entry, = collect(run_copy.parent, variant="braindiffuser")
    assert entry.variant is None and "--variant braindiffuser" in entry.note


# 3 ------------------------------------------------------------------------------------------
def test_synthetic_subjects_are_nsds_eight():
    from brainrecon.data.synthetic import make_synthetic

    ds = make_synthetic(subjects=(3, 8), n_train=8, n_test=4, image_size=32, surface_size=16)
    assert ds.subjects == [3, 8]
    with pytest.raises(DataError, match=r"subject 9.*1, 2, 3, 4, 5, 6, 7, 8") as info:
        make_synthetic(subjects=(1, 9), n_train=8, n_test=4, image_size=32, surface_size=16)
    assert "--" not in str(info.value)  # no CLI flag that does not exist
    extra = make_synthetic(subjects=(9,), n_voxels={9: 300}, n_train=8, n_test=4, image_size=32, surface_size=16)
    assert extra.train.voxels(9).shape[1] == 300
    result = runner.invoke(app, ["fit", "--decoder", "ridge", "--data", SMALL, "--subjects", "9"])
    assert result.exit_code == 1
    assert "1, 2, 3, 4, 5, 6, 7, 8" in _flat(result.output)


# 4 ------------------------------------------------------------------------------------------
def test_subjects_are_accepted_comma_separated_spaced_or_repeated(tmp_path):
    spellings = (["--subjects", "1,2"], ["--subjects", "1", "2"], ["--subject", "1", "--subject", "2"], ["-s", "1,2"])
    for args in spellings:
        result = runner.invoke(app, ["fit", "--decoder", "ridge", "--data", SMALL, *args, "--out",
                                     str(tmp_path / "x"), "--alphas", "100", "--no-evaluate", "--overwrite"])
        assert result.exit_code == 0, result.output
        assert sorted(p.name for p in (tmp_path / "x").iterdir()) == ["ridge-subj01-pixels", "ridge-subj02-pixels"]
    from brainrecon.cli import _subjects_option

    assert _subjects_option(["1,2", "5"], ["7"]) == [1, 2, 5, 7]
    assert _subjects_option(["1, 2,"], []) == [1, 2]
    with pytest.raises(Exception, match="'x' is not a subject number"):
        _subjects_option(["1,x"], [])
    # every command that takes several subjects parses them the same way
    for command in (["embed"], ["import", "neuropictor"]):
        result = runner.invoke(app, [*command, "--help"])
        assert "1,2" in _flat(result.output), command


# 5 ------------------------------------------------------------------------------------------
def _help_texts():
    import click
    import typer

    def walk(cmd, path):
        ctx = click.Context(cmd, info_name=path[-1])
        yield " ".join(path), cmd.help or ""
        for p in cmd.get_params(ctx):
            yield f"{' '.join(path)} {p.name}", getattr(p, "help", None) or ""
        for name, sub in getattr(cmd, "commands", {}).items():
            yield from walk(sub, [*path, name])

    yield from walk(typer.main.get_command(app), ["brainrecon"])


def test_help_texts_keep_their_square_brackets():
    from rich.text import Text

    for where, text in _help_texts():
        assert Text.from_markup(text).plain == text.replace("\\[", "["), where
    for command in (["fit", "--help"], ["federate", "--help"]):
        result = runner.invoke(app, command, env={"COLUMNS": "250"})  # no column cut short
        assert "brainrecon[federated]" in _flat(result.output), command


# 6 ------------------------------------------------------------------------------------------
def test_predict_names_every_file_it_writes(fitted, tmp_path):
    out, _ = fitted
    result = invoke("predict", out / "ridge-subj01-pixels", "--out", tmp_path / "pred.npy")
    assert result.exit_code == 0, result.output
    text = _flat(result.output)
    assert str(tmp_path / "pred.npy") in text and str(tmp_path / "pred_ids.npy") in text
    assert np.load(tmp_path / "pred_ids.npy").tolist() == list(range(12))


# 7 ------------------------------------------------------------------------------------------
def test_weights_lists_clip_under_the_name_it_is_written_as(tmp_path):
    from brainrecon import fetch
    from brainrecon.eval import weights_status

    for weights_dir in (None, tmp_path / "w"):
        clip = next(r for r in weights_status(weights_dir) if r["metrics"] == "CLIP")
        dests = {str(i.dest) for i in fetch.plan(to=weights_dir, only="CLIP")}
        assert clip["status"] == "missing" and clip["path"] in dests
        assert clip["path"].endswith(clip["file"].rsplit("/", 1)[-1])  # model.safetensors both
    result = invoke("weights")
    lines = result.output.splitlines()
    at = next(i for i, line in enumerate(lines) if "clip-vit-large-patch14/model.safetensors" in line)
    assert lines[at + 1].split("goes to:")[1].strip().endswith("model.safetensors")
    assert "ViT-L-14.pt" not in lines[at + 1]


# 8 ------------------------------------------------------------------------------------------
def test_missing_weights_are_said_once_short_with_the_command_to_fix_them(fitted, run_copy):
    _, fit_result = fitted
    assert _flat(fit_result.output).count("not scored") == 1  # two runs scored, said once
    result = invoke("evaluate", run_copy, "--device", "cpu")
    assert result.exit_code == 0, result.output
    said = [line for line in result.output.splitlines() if "not scored" in line or "unavailable" in line]
    assert len(said) == 1 and len(said[0]) <= 100, said
    saved = json.loads((run_copy / "metrics.json").read_text())
    no_weights = [m for m, why in saved["unavailable"].items() if "not found" in why]
    assert {"AlexNet(2)", "AlexNet(5)", "Inception", "CLIP", "EffNet-B", "SwAV"} <= set(no_weights)
    assert f"{len(no_weights)} metrics not scored (weights missing)" in said[0] and "`brainrecon weights`" in said[0]
    # the per-metric reasons stay in the report
    assert "alexnet-owt-7be5be79.pth" in saved["unavailable"]["AlexNet(5)"]
    result = invoke("evaluate", run_copy, "-m", "PixCorr", "-m", "CLIP")
    assert "CLIP not scored (weights missing)" in _flat(result.output)


# 9 ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("args", [["decoders"], ["--help"], ["fit", "--help"]])
def test_listing_decoders_and_help_do_not_import_the_heavy_stack(args):
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from brainrecon.cli import app\n"
        f"result = CliRunner().invoke(app, {args!r}, terminal_width=200)\n"
        "assert result.exit_code == 0, result.output\n"
        "print(result.output)\n"
        f"print('HEAVY', sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "HEAVY []"
    if args == ["decoders"]:
        for name in ("ridge", "brainguard", "neuropictor"):
            assert name in done.stdout
    if args == ["fit", "--help"]:
        assert "--alphas" in done.stdout and "--rounds" in done.stdout and "--stage" in done.stdout


def test_the_decoder_listing_says_what_the_classes_say():
    """The built-ins' listing is kept without importing them; it must not drift from the classes."""
    import brainrecon.decoders as D

    for name in sorted(D.DECODERS.builtin_paths):
        cls = D.get_decoder_class(name)
        info = D._BUILTIN_INFO[name]
        defaults = cls.default_params()
        assert info == {
            "predicts": cls.predicts, "multi_subject": cls.multi_subject, "summary": cls.summary,
            "params": {p: defaults.get(p) for p in cls.main_params}, "cli_options": tuple(cls.cli_options),
        }, name


# 10 -----------------------------------------------------------------------------------------
def test_the_run_metrics_example_of_the_workflows_docstring(tmp_path):
    from brainrecon import workflows
    from brainrecon.eval import EvalReport

    assert 'runs[0].metrics()["PixCorr"]' in workflows.__doc__
    runs = workflows.fit("ridge", data=SMALL, target="pixels", subjects=[1], out=tmp_path,
                         params={"alphas": [100.0]})
    report = runs[0].metrics()
    assert isinstance(report, EvalReport)
    saved = json.loads((runs[0].path / "metrics.json").read_text())
    assert runs[0].metrics()["PixCorr"] == saved["metrics"]["PixCorr"]
    assert report.intervals["PixCorr"][0] <= report["PixCorr"] <= report.intervals["PixCorr"][1]
    assert "CLIP" in report.unavailable and "CLIP" not in report
    assert EvalReport.from_json(report) is report  # callers that re-parsed the dict keep working


# 11 -----------------------------------------------------------------------------------------
def test_run_json_records_the_seed_actually_used(tmp_path):
    from brainrecon import workflows
    from brainrecon.decoders.brainguard import BrainGuardDecoder

    ridge, = workflows.fit("ridge", data=SMALL, subjects=[1], out=tmp_path, params={"alphas": [100.0]},
                           evaluate=False)
    assert ridge.info["provenance"]["seed"] == 0  # no --seed: the default seed, not null
    assert workflows.DEFAULT_SEED == 0
    result = runner.invoke(app, ["fit", "--decoder", "ridge", "--data", SMALL, "--subject", "1", "--seed", "5",
                                 "--alphas", "100", "--out", str(tmp_path), "--name", "seeded", "--no-evaluate"])
    assert result.exit_code == 0, result.output
    assert Run.open(tmp_path / "seeded").info["provenance"]["seed"] == 5
    assert BrainGuardDecoder.default_params()["seed"] == 0
    bg, = workflows.fit("brainguard", data=SMALL, subjects=[1], out=tmp_path, evaluate=False,
                        params={"hidden": 8, "rounds": 1, "seed": 3, "device": "cpu"})
    assert bg.info["provenance"]["seed"] == 3 == bg.info["params"]["seed"]
