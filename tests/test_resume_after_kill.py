"""SIGKILL part-way, resume, same result as an uninterrupted run (issue 16).

Each long job runs for real in a subprocess (``python -m brainrecon.cli`` through a small driver
that only slows one step down, so the kill lands part-way), is killed with SIGKILL once its first
checkpoint or cache entry is on disk, and is started again with its resume option. The finished
files are compared with those of an uninterrupted run: exactly, bit for bit (every job is
deterministic on the CPU with one thread, and the resumed work is split into the same batches).

Damaged training checkpoints on ``--resume``: an older intact one is used (and said), or one line
names the damaged file.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]

# The driver: apply the slow-downs / settings given as JSON, then run the CLI with the rest.
DRIVER = """
import importlib, json, sys, time
plan = json.loads(sys.argv[1])
def _resolve(spec):
    mod, _, attr = spec.partition(":")
    obj = importlib.import_module(mod)
    *owners, name = attr.split(".")
    for o in owners:
        obj = getattr(obj, o)
    return obj, name
def _slow(real, delay):
    def slow(*a, **k):
        time.sleep(delay)
        return real(*a, **k)
    return slow
for spec, delay in plan.get("slow", []):
    owner, name = _resolve(spec)
    setattr(owner, name, _slow(getattr(owner, name), delay))
for spec, value in plan.get("set", []):
    owner, name = _resolve(spec)
    setattr(owner, name, value)
sys.argv = ["brainrecon"] + sys.argv[2:]
from brainrecon.cli import main
main()
"""


@pytest.fixture
def procs():
    """Every subprocess started by a test; all are killed (SIGKILL, whole group) at its end."""
    started: list[subprocess.Popen] = []
    yield started
    for p in started:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait(10)


def _env(root: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HOME=str(root / "hf"), TORCH_HOME=str(root / "torch"),
        BRAINRECON_CACHE=str(root / "cache"), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]), NO_COLOR="1", COLUMNS="200",
    )
    return env


def start(procs, args, *, cwd: Path, env_root: Path, slow=(), settings=()) -> subprocess.Popen:
    cwd.mkdir(parents=True, exist_ok=True)
    plan = json.dumps({"slow": [list(s) for s in slow], "set": [list(s) for s in settings]})
    log_path = cwd / f"log-{len(procs)}.txt"
    with open(log_path, "w") as log:
        p = subprocess.Popen([sys.executable, "-c", DRIVER, plan, *map(str, args)], cwd=cwd, env=_env(env_root),
                             stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    p.log_path = log_path
    procs.append(p)
    return p


def finish(p: subprocess.Popen, timeout: float = 120) -> None:
    try:
        p.wait(timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{p.args[3:]} did not finish in {timeout} s:\n{p.log_path.read_text()[-3000:]}")
    assert p.returncode == 0, p.log_path.read_text()[-3000:]


def kill_when(p: subprocess.Popen, ready, timeout: float = 90) -> None:
    """SIGKILL ``p`` (its whole process group) as soon as ``ready()`` is true."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if ready():
                break
        except (OSError, ValueError, KeyError):  # a file being written, or not yet
            pass
        if p.poll() is not None:
            pytest.fail(f"the job ended (rc {p.returncode}) before it could be killed:\n"
                        f"{p.log_path.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"nothing appeared on disk in {timeout} s:\n{p.log_path.read_text()[-3000:]}")
        time.sleep(0.02)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait(10)
    assert p.returncode == -signal.SIGKILL


def assert_same_tree(a: Path, b: Path, *, skip=()) -> None:
    """Every file under ``a`` is under ``b`` with equal content (arrays and tensors exactly)."""
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file() and p.name not in skip)
    files_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file() and p.name not in skip)
    assert files_a == files_b
    for rel in files_a:
        fa, fb = a / rel, b / rel
        if rel.suffix == ".npy":
            xa, xb = np.load(fa), np.load(fb)
            assert xa.dtype == xb.dtype and xa.shape == xb.shape, rel
            np.testing.assert_array_equal(xa, xb, err_msg=str(rel))
        elif rel.suffix == ".safetensors":
            ta, tb = load_file(str(fa)), load_file(str(fb))
            assert ta.keys() == tb.keys(), rel
            for k in ta:
                assert torch.equal(ta[k], tb[k]), (rel, k)
        elif rel.suffix != ".json":  # JSON records hold paths and times
            assert fa.read_bytes() == fb.read_bytes(), rel


# --------------------------------------------------------------------------- BrainGuard
BG_DATA = "synthetic:n_train=60,n_test=6,image_size=32,surface_size=32"
BG_ARGS = ["fit", "--decoder", "brainguard", "--data", BG_DATA, "--subjects", "1", "2", "--rounds", "4",
           "--hidden", "16", "--batch-size", "30", "--device", "cpu", "--no-evaluate", "--out", "runs",
           "--checkpoint-dir", "ck", "-p", 'target_options={"size": 8}', "-p", "progress=false"]
BG_DECODER = "brainrecon.decoders.brainguard.decoder:save_checkpoint"
BG_CHECKPOINT = "brainrecon.decoders.brainguard.checkpoint"


def _rounds_done(ck: Path) -> int:
    return json.loads((ck / "latest.json").read_text())["rounds_completed"]


@pytest.mark.parametrize("moment", ["mid-round", "mid-checkpoint-write"])
def test_brainguard_fit_killed_and_resumed(procs, tmp_path, moment):
    ref = start(procs, BG_ARGS, cwd=tmp_path / "ref", env_root=tmp_path)
    if moment == "mid-round":
        # Each round waits 0.6 s before its checkpoint: killed during round 2's work.
        job = start(procs, BG_ARGS, cwd=tmp_path / "job", env_root=tmp_path, slow=[(BG_DECODER, 0.6)])
        kill_when(job, lambda: (tmp_path / "job/ck/latest.json").is_file())
    else:
        # The checkpoint JSON is written slowly: killed while round 2's checkpoint is half on disk.
        job = start(procs, BG_ARGS, cwd=tmp_path / "job", env_root=tmp_path,
                    slow=[(f"{BG_CHECKPOINT}:write_json_atomic", 0.6)])
        kill_when(job, lambda: (tmp_path / "job/ck/.round-00002.partial").is_dir()
                  and any((tmp_path / "job/ck/.round-00002.partial").glob("*.safetensors")))
    ck = tmp_path / "job" / "ck"
    assert 1 <= _rounds_done(ck) < 4
    assert not (tmp_path / "job" / "runs").exists()
    resumed = start(procs, BG_ARGS + ["--resume"], cwd=tmp_path / "job", env_root=tmp_path)
    finish(resumed)
    finish(ref)
    assert _rounds_done(ck) == 4
    assert_same_tree(tmp_path / "ref" / "runs", tmp_path / "job" / "runs")
    assert_same_tree(tmp_path / "ref" / "ck", ck)


def _tiny_brainguard(**kw):
    from brainrecon.decoders.brainguard import BrainGuardDecoder

    return BrainGuardDecoder(**{"subjects": [1, 2], "hidden": 16, "n_blocks": 2, "rounds": 3, "batch_size": 30,
                                "device": "cpu", "progress": False, "target_options": {"size": 8}, **kw})


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def test_brainguard_damaged_checkpoint_falls_back_or_names_the_file(tmp_path):
    from typer.testing import CliRunner

    from brainrecon.cli import app
    from brainrecon.data.synthetic import make_synthetic
    from brainrecon.errors import BrainreconError

    data = make_synthetic(seed=0, subjects=(1, 2), n_train=60, n_test=6, image_size=32, surface_size=32)
    ck = tmp_path / "ck"
    full = _tiny_brainguard(checkpoint_dir=str(ck), checkpoint_keep=2).fit(data.train)
    assert sorted(p.name for p in ck.glob("round-*")) == ["round-00002", "round-00003"]
    _truncate(ck / "round-00003" / "client-1.safetensors")
    with pytest.warns(UserWarning, match=r"Skipping damaged checkpoint round-00003.*client-1\.safetensors is damaged"):
        resumed = _tiny_brainguard(checkpoint_dir=str(ck), checkpoint_keep=2, resume=True).fit(data.train)
    assert resumed.history_ == full.history_  # round 3 trained again, from round 2
    pa, pb = full.predict(data.test), resumed.predict(data.test)
    for s in pa:
        np.testing.assert_array_equal(pa[s], pb[s])
    # A damaged latest.json only points: the round directories are found without it.
    (ck / "latest.json").write_text("{")
    again = _tiny_brainguard(checkpoint_dir=str(ck), checkpoint_keep=2, resume=True).fit(data.train)
    np.testing.assert_array_equal(again.predict(data.test)[1], pa[1])

    # Nothing intact left: one BrainreconError naming the file; on the CLI one line, exit 1.
    for p in ck.glob("round-*/global.safetensors"):
        p.write_bytes(b"")
    with pytest.raises(BrainreconError, match=r"no intact checkpoint.*global\.safetensors is (empty|damaged)"), \
            pytest.warns(UserWarning):
        _tiny_brainguard(checkpoint_dir=str(ck), checkpoint_keep=2, resume=True).fit(data.train)
    result = CliRunner().invoke(app, ["fit", "--decoder", "brainguard", "--data", BG_DATA, "--subjects", "1", "2",
                                      "--rounds", "3", "--hidden", "16", "--batch-size", "30", "--device", "cpu",
                                      "--no-evaluate", "--out", str(tmp_path / "runs"), "--checkpoint-dir", str(ck),
                                      "--resume", "-p", "n_blocks=2", "-p", "checkpoint_keep=2",
                                      "-p", 'target_options={"size": 8}', "-p", "progress=false"])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and "global.safetensors" in result.output
    errors = [line for line in result.output.splitlines() if "Cannot resume" in line]
    assert len(errors) == 1


# --------------------------------------------------------------------------- NeuroPictor
NP_SIZES = dict(surface_size=16, patch_size=4, encoder_dim=32, encoder_depth=2, encoder_heads=4, bottleneck_dim=16,
                decoder_dim=16, decoder_depth=1, decoder_heads=2, semantic_hidden=8, image_size=32)
NP_PARAMS = dict(NP_SIZES, base_model="tiny", batch_size=2, num_inference_steps=2, progress=False,
                 gradient_checkpointing=False, stage="pretrain", seed=3, lr=1e-3)
NP_ARGS = ["fit", "--decoder", "neuropictor", "--data", "synthetic:n_train=8,n_test=2,image_size=32,surface_size=16",
           "--subjects", "1", "--device", "cpu", "--no-evaluate", "--out", "runs", "--checkpoint-dir", "ck",
           *[a for k, v in NP_PARAMS.items() for a in ("-p", f"{k}={json.dumps(v)}")],
           "-p", "steps=4", "-p", "checkpoint_every=1"]


def test_neuropictor_fit_killed_and_resumed(procs, tmp_path):
    from brainrecon.decoders.neuropictor.train import list_checkpoints

    ref = start(procs, NP_ARGS, cwd=tmp_path / "ref", env_root=tmp_path)
    job = start(procs, NP_ARGS, cwd=tmp_path / "job", env_root=tmp_path,
                slow=[("brainrecon.decoders.neuropictor.train:save_checkpoint", 0.8)])
    kill_when(job, lambda: bool(list_checkpoints(tmp_path / "job" / "ck")))
    done = [int(p.name.split("_")[1]) for p in list_checkpoints(tmp_path / "job" / "ck")]
    assert done and max(done) < 4
    resumed = start(procs, NP_ARGS + ["--resume"], cwd=tmp_path / "job", env_root=tmp_path)
    finish(resumed, 180)
    finish(ref, 180)
    assert "Resuming pretrain from" in resumed.log_path.read_text()
    assert_same_tree(tmp_path / "ref" / "runs", tmp_path / "job" / "runs")
    assert_same_tree(tmp_path / "ref" / "ck", tmp_path / "job" / "ck")


def test_neuropictor_damaged_checkpoint_falls_back_or_names_the_file(tmp_path, capsys):
    from brainrecon.data.synthetic import make_synthetic
    from brainrecon.decoders.neuropictor import NeuroPictorDecoder
    from brainrecon.errors import BrainreconError

    data = make_synthetic(seed=0, subjects=(1,), n_train=8, n_test=2, image_size=32, surface_size=16)
    params = {**NP_PARAMS, "device": "cpu", "subjects": [1], "steps": 3, "checkpoint_every": 1,
              "checkpoint_dir": str(tmp_path / "ck")}
    full = NeuroPictorDecoder(**params).fit(data.train)
    kept = sorted(p.name for p in (tmp_path / "ck").glob("step_*"))
    assert kept == ["step_00000002", "step_00000003"]
    _truncate(tmp_path / "ck" / "step_00000003" / "optimizer.safetensors")
    capsys.readouterr()
    resumed = NeuroPictorDecoder(**params, resume=True).fit(data.train)
    out = capsys.readouterr().out
    assert "Skipping damaged checkpoint step_00000003" in out and "step_00000003/optimizer.safetensors is damaged" in out
    assert "Resuming pretrain from" in out and "step_00000002 (step 2)" in out
    assert resumed.losses_ == full.losses_
    a, b = full.net_.state_dict(), resumed.net_.state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    for p in (tmp_path / "ck").glob("step_*/trainer.json"):
        p.write_text("{")
    with pytest.raises(BrainreconError, match=r"no intact checkpoint.*trainer\.json is not valid JSON"):
        NeuroPictorDecoder(**params, resume=True).fit(data.train)


# --------------------------------------------------------------------------- prepare-nsd
@pytest.fixture(scope="module")
def release(tmp_path_factory):
    from test_nsd_prepare import build_release

    root = tmp_path_factory.mktemp("nsd")
    build_release(root)
    return root


NSD = "brainrecon.data.nsd.prepare"


@pytest.mark.parametrize("moment", ["staging-sessions", "copying-images", "after-swap"])
def test_prepare_nsd_killed_and_resumed(procs, tmp_path, release, moment):
    def args(out):
        return ["prepare-nsd", "--nsd-root", release, "--subject", "1", "--out", out, "--sessions", "3",
                "--captions", release / "COCO_73k_annots_curated.npy", "--no-progress"]

    ref = start(procs, args(tmp_path / "ref" / "nsd"), cwd=tmp_path / "ref", env_root=tmp_path)
    out = tmp_path / "job" / "nsd"
    partial = out / ".prepare-nsd-subj01.partial"

    def state():
        return json.loads((partial / "state.json").read_text())

    if moment == "staging-sessions":
        job = start(procs, args(out), cwd=tmp_path / "job", env_root=tmp_path,
                    slow=[(f"{NSD}:read_session_betas", 0.5)])
        kill_when(job, lambda: len(state()["sessions"]) >= 1)
        assert len(state()["sessions"]) < 3
    elif moment == "copying-images":
        job = start(procs, args(out), cwd=tmp_path / "job", env_root=tmp_path,
                    slow=[(f"{NSD}:_read_image", 0.05)], settings=[(f"{NSD}:IMAGE_CHECKPOINT", 4)])
        kill_when(job, lambda: state()["images"]["train"]["done"] >= 4)
        assert state()["images"]["train"]["done"] < 24
    else:
        # Killed after the finished subject folder was swapped in, before the manifest names it.
        job = start(procs, args(out), cwd=tmp_path / "job", env_root=tmp_path,
                    slow=[(f"{NSD}:_update_manifest", 5.0)])
        kill_when(job, lambda: (out / "subj01").is_dir())
        assert not (out / "brainrecon-data.json").exists()
    assert not (out / "brainrecon-data.json").exists()
    resumed = start(procs, args(out), cwd=tmp_path / "job", env_root=tmp_path)  # the same command resumes
    finish(resumed)
    finish(ref)
    assert not partial.exists()
    assert_same_tree(tmp_path / "ref" / "nsd", out)
    manifest_a = json.loads((tmp_path / "ref" / "nsd" / "brainrecon-data.json").read_text())
    manifest_b = json.loads((out / "brainrecon-data.json").read_text())
    assert manifest_a == manifest_b


# --------------------------------------------------------------------------- embed
def test_embed_killed_and_resumed(procs, tmp_path, tiny_weights):
    images = np.random.default_rng(4).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    np.save(tmp_path / "images.npy", images)

    def args(out):
        return ["embed", "--images", tmp_path / "images.npy", "--out", out, "--ipadapter-dir",
                tiny_weights["ipadapter"], "--device", "cpu", "--batch-size", "2"]

    ref = start(procs, args(tmp_path / "ref" / "tokens"), cwd=tmp_path / "ref", env_root=tmp_path)
    out = tmp_path / "job" / "tokens"
    job = start(procs, args(out), cwd=tmp_path / "job", env_root=tmp_path,
                slow=[("brainrecon.targets.ipadapter:IPAdapterTarget.compute", 0.5)])

    def filled():
        return int(np.load(out / "filled.npy").sum())

    kill_when(job, lambda: filled() >= 2)
    assert 2 <= filled() < 8
    resumed = start(procs, args(out), cwd=tmp_path / "job", env_root=tmp_path)  # the same command resumes
    finish(resumed)
    finish(ref)
    assert filled() == 8
    assert_same_tree(tmp_path / "ref" / "tokens", out)


# --------------------------------------------------------------------------- reconstruct
def test_reconstruct_killed_and_resumed(procs, tmp_path, tiny_weights):
    from test_generate import make_run

    make_run(tmp_path / "ref" / "run", n=5)
    shutil.copytree(tmp_path / "ref" / "run", tmp_path / "job" / "run")

    def args(run):
        return ["reconstruct", run, "--base-model", tiny_weights["sd"], "--ipadapter-dir", tiny_weights["ipadapter"],
                "--steps", "3", "--seed", "100", "--batch-size", "1", "--device", "cpu"]

    ref = start(procs, args(tmp_path / "ref" / "run"), cwd=tmp_path / "ref", env_root=tmp_path)
    run = tmp_path / "job" / "run"
    job = start(procs, args(run), cwd=tmp_path / "job", env_root=tmp_path,
                slow=[("brainrecon.io:atomic_path", 0.4)])
    kill_when(job, lambda: any((run / "reconstructions").glob("*.png")))
    assert len(list((run / "reconstructions").glob("*.png"))) < 5
    assert not (run / "reconstructions.npy").exists()
    resumed = start(procs, args(run), cwd=tmp_path / "job", env_root=tmp_path)  # --resume is the default
    finish(resumed)
    finish(ref)
    assert_same_tree(tmp_path / "ref" / "run", run)
