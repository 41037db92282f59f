"""BrainGuard on Flower: what leaves a site, what the server refuses, same numbers as the local engine.

The end-to-end test starts real processes (``brainrecon federate server`` with a SuperLink,
one ``brainrecon federate site`` with a SuperNode per subject) on 127.0.0.1 only, bounded by
a timeout, and checks that every process it started is gone afterwards.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

flwr = pytest.importorskip("flwr", reason="needs the federated extra (pip install 'brainrecon[federated]')")

from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.supercore.task_identity import TaskIdentity

from brainrecon import workflows
from brainrecon.decoders.brainguard import (
    BrainGuardNet,
    federated,
)
from brainrecon.errors import BrainreconError
from brainrecon.federation import loopback, server, site, supervise
from brainrecon.runs import Run

pytestmark = pytest.mark.slow

DATA = "synthetic:n_train=60,n_test=6,image_size=32,surface_size=32"
FEDERATE = [sys.executable, "-m", "brainrecon.cli", "federate"]
PARAMS = {"hidden": 16, "n_blocks": 2, "rounds": 2, "batch_size": 30, "lr": 1e-3, "device": "cpu",
          "progress": False, "target_options": {"size": 8}, "dfl_num_pre_loss": 2}


@pytest.fixture
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def task_identity(monkeypatch):
    # Messages are normally built inside a Flower process, which sets these.
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 1)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


def _instruction(arrays: ArrayRecord, server_round: int, rounds: int = 2, node: int = 7) -> Message:
    config = ConfigRecord({"server-round": server_round, "num-rounds": rounds, "sites": 2})
    return Message(content=RecordDict({"arrays": arrays, "config": config}), dst_node_id=node,
                   message_type="train")


def _site_context(tmp_path: Path, subject: int) -> Context:
    state = tmp_path / f"site-{subject}"
    state.mkdir()
    settings = {"subject": subject, "data": DATA, "state_dir": str(state), "out": str(tmp_path / "runs"),
                "run_name": None, "evaluate": False}
    (state / "site.json").write_text(json.dumps(settings))
    return Context(run_id=1, node_id=7, node_config={"site-file": str(state / "site.json")},
                   state=RecordDict(), run_config={"params": json.dumps({**PARAMS, "target": "pixels"}),
                                                   "recipe": "weadl"})


def _walk(value, keys: set, numbers: list):
    if isinstance(value, dict):
        for k, v in value.items():
            keys.add(str(k))
            _walk(v, keys, numbers)
    elif isinstance(value, (list, tuple)):
        for v in value:
            _walk(v, keys, numbers)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        numbers.append(value)


def assert_run_is_private(path: Path, subject: int, other: int, other_voxels: int) -> None:
    """Nothing in a saved run names the other subject or its voxel count."""
    keys: set = set()
    for file in path.rglob("*.json"):
        content = json.loads(file.read_text())
        numbers: list = []
        _walk(content, keys, numbers)
        assert other_voxels not in numbers, (file, other_voxels)
        text = file.read_text()
        assert f"subj{other:02d}" not in text, file
        for field in ("subjects",):
            for found in _find(content, field):
                assert found == [subject], (file, field, found)
    assert str(other) not in keys, (path, sorted(keys))
    for file in path.rglob("*.safetensors"):
        assert all(not k.startswith("subject-") for k in load_file(str(file))), file
    assert sorted(p.name for p in (path / "decoder").glob("subject-*")) == [f"subject-{subject}.safetensors"]


def _find(value, field):
    if isinstance(value, dict):
        for k, v in value.items():
            if k == field:
                yield v
            yield from _find(v, field)
    elif isinstance(value, list):
        for v in value:
            yield from _find(v, field)


# --------------------------------------------------------------------------- what a site sends
def test_site_upload_is_shared_tensors_and_sample_count(tmp_path, task_identity, one_thread):
    context = _site_context(tmp_path, 2)
    reply = site.site_train(_instruction(ArrayRecord(), 1), context)
    assert set(reply.content.keys()) == {"arrays", "metrics"}
    arrays, metrics = reply.content.array_records["arrays"], reply.content.metric_records["metrics"]
    shared = BrainGuardNet(5, 16, 2, 8, 24, 0.0).shared_names()
    assert list(arrays.keys()) == shared and not any(k.startswith("ridge.") for k in arrays)
    assert dict(metrics) == {"num-examples": 60, "subject": 2}
    # The site's state stayed on its disk: model (ridge included), optimiser, RNG, flags.
    state = load_file(str(tmp_path / "site-2" / site.SITE_STATE.format(1)))
    assert "model.ridge.weight" in state and "rng.shuffle" in state
    meta = json.loads((tmp_path / "site-2" / site.SITE_META.format(1)).read_text())
    assert meta["rounds_completed"] == 1 and meta["client"]["dfl_start_phase"] is True

    # Round 2 (the last) fuses a global model (here: the upload shifted, as if averaged with
    # another site's), trains, uploads again and writes the site's own run.
    shifted = ArrayRecord.from_torch_state_dict({k: v + 0.01 for k, v in arrays.to_torch_state_dict().items()})
    reply2 = site.site_train(_instruction(shifted, 2), context)
    assert dict(reply2.content.metric_records["metrics"]) == {"num-examples": 60, "subject": 2}
    meta = json.loads((tmp_path / "site-2" / site.SITE_META.format(2)).read_text())
    assert meta["rounds_completed"] == 2 and meta["client"]["dfl_start_phase"] is False
    run = tmp_path / "runs" / "brainguard-subj02-pixels"
    assert Run.open(run).info["engine"] == "flower"
    assert Run.open(run).info["recipe"] == "weadl"  # the server's recipe reaches the site's run
    assert_run_is_private(run, 2, 1, workflows.load_dataset(DATA, subjects=[1]).n_voxels(1))
    # A server restarted before averaging round 2 asks for it again: the site redoes it from its
    # state after round 1 and sends the same upload (it keeps the last two states).
    again = site.site_train(_instruction(shifted, 2), Context(
        run_id=2, node_id=7, node_config=context.node_config, state=RecordDict(), run_config=context.run_config))
    first, second = (r.content.array_records["arrays"].to_torch_state_dict() for r in (reply2, again))
    for k in first:
        torch.testing.assert_close(first[k], second[k], rtol=0, atol=0)
    # Asked for a round it has no state for: refused with what it has.
    with pytest.raises(BrainreconError, match=r"no saved state after round 4 \(it has: \[1, 2\]\)"):
        site.site_train(_instruction(arrays, 5, rounds=6), context)


def _reply(arrays: dict, metrics: dict, node: int = 7) -> Message:
    instruction = _instruction(ArrayRecord(), 1, node=node)
    content = RecordDict({"arrays": ArrayRecord.from_torch_state_dict(arrays), "metrics": MetricRecord(metrics)})
    return Message(content=content, reply_to=instruction)


def test_server_refuses_private_keys_and_extra_metrics(task_identity):
    strategy = server.make_strategy(2)
    ok = {"head.weight": torch.ones(2, 2)}
    with pytest.raises(BrainreconError, match=r"subject-specific tensor\(s\) \['ridge.weight'\]"):
        strategy.aggregate_train(1, [_reply(ok, {"num-examples": 3}),
                                     _reply({**ok, "ridge.weight": torch.ones(2, 2)}, {"num-examples": 5})])
    with pytest.raises(BrainreconError, match=r"carries metric\(s\) \['loss'\]"):
        strategy.aggregate_train(1, [_reply(ok, {"num-examples": 3, "loss": 0.5}), _reply(ok, {"num-examples": 5})])
    with pytest.raises(BrainreconError, match="1 of the required 2 sites replied"):
        strategy.aggregate_train(1, [_reply(ok, {"num-examples": 3})])
    # One site per subject: a second site of subject 1 is refused (its upload not averaged, no
    # more rounds for it), and a round short of sites without it waits (TooFewReplies).
    with pytest.raises(server.TooFewReplies, match=r"1 of the required 2 sites replied \(node 8: a second site of subject 1\)"):
        strategy.aggregate_train(1, [_reply(ok, {"num-examples": 3, "subject": 1}, node=7),
                                     _reply(ok, {"num-examples": 3, "subject": 1}, node=8)])
    assert strategy.sites == {1: 7} and strategy.refused == {8: 1}
    arrays, metrics = strategy.aggregate_train(2, [
        _reply({"head.weight": torch.full((2, 2), 9.0)}, {"num-examples": 3, "subject": 1}, node=8),
        _reply({"head.weight": torch.full((2, 2), 1.0)}, {"num-examples": 1, "subject": 1}, node=7),
        _reply({"head.weight": torch.full((2, 2), 4.0)}, {"num-examples": 3, "subject": 2}, node=9)])
    torch.testing.assert_close(arrays.to_torch_state_dict()["head.weight"], torch.full((2, 2), 3.25))
    # A site restarted alone comes back as a new node: it replaces its subject's old one.
    strategy.aggregate_train(3, [_reply(ok, {"num-examples": 1, "subject": 1}, node=10),
                                 _reply(ok, {"num-examples": 3, "subject": 2}, node=9)])
    assert strategy.sites == {1: 10, 2: 9} and strategy.refused == {8: 1}
    strategy = server.make_strategy(2)
    # The accepted case is brainrecon's own weighted average (n_s / sum n).
    arrays, metrics = strategy.aggregate_train(1, [_reply({"head.weight": torch.full((2, 2), 1.0)}, {"num-examples": 1}),
                                                   _reply({"head.weight": torch.full((2, 2), 4.0)}, {"num-examples": 3})])
    torch.testing.assert_close(arrays.to_torch_state_dict()["head.weight"], torch.full((2, 2), 3.25))
    assert dict(metrics) == {"num-examples": 4, "sites": 2}


# --------------------------------------------------------------------------- end to end
def _recording(monkeypatch):
    started = []
    real = loopback.start_process

    def start(*args, **kwargs):
        process = real(*args, **kwargs)
        started.append(process)
        return process

    monkeypatch.setattr(loopback, "start_process", start)
    return started


def _living_in_group(pgid: int) -> list[str]:
    """Processes (not zombies) whose process group is ``pgid``, from /proc."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2:].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            out.append(text[:text.rindex(")") + 1])
    return out


def _start_site(tmp_path: Path, subject: int, port: int, env, log: Path | None = None):
    """`brainrecon federate site` for ``subject`` against 127.0.0.1:``port``, its state in
    ``tmp_path/site-<subject>``, runs in ``tmp_path/flower``, its log in ``log`` (default
    ``tmp_path/site-<subject>.log``)."""
    return supervise.start_process(
        FEDERATE + ["site", "--subject", str(subject), "--data", DATA, "--server", f"127.0.0.1:{port}",
                    "--state-dir", str(tmp_path / f"site-{subject}"), "--out", str(tmp_path / "flower"), "--no-evaluate"],
        env=env, log=log or tmp_path / f"site-{subject}.log")


def _log_tails(root: Path, lines: int = 25) -> str:
    """The last lines of every log under ``root``, for a failure message."""
    parts = []
    for log in sorted(root.rglob("*.log")):
        text = log.read_text(errors="replace").splitlines()[-lines:]
        parts.append(f"==== {log.relative_to(root)}\n" + "\n".join(text))
    return "\n".join(parts)


def _assert_all_gone(started):
    assert started
    for process in started:
        assert process.poll() is not None, process.args
        deadline = time.monotonic() + 10  # SIGKILLed processes may take a moment to vanish
        while _living_in_group(process.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _living_in_group(process.pid), _living_in_group(process.pid)


@pytest.mark.numerics
def test_flower_engine_equals_local_engine(tmp_path, monkeypatch, one_thread, allow_loopback):
    """2 sites x 2 rounds on loopback. Tolerance: exact (atol = rtol = 0).

    Both engines run the same per-site step (``site_round``) from the same initial models with
    one CPU thread (``OMP_NUM_THREADS=1`` for the site processes); the flower sites restore
    their state from disk bit for bit between rounds and the server averages with the same
    function, so even the chaotic DFL start phase agrees exactly. (With more than two sites
    the server's sum order follows reply order, which can differ from subject order in the
    last float32 bit.)
    """
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    started = _recording(monkeypatch)
    monkeypatch.setattr(loopback, "fit_on_flower", functools.partial(loopback.fit_on_flower, timeout=400))
    # With a validation split, so the best-by-validation selection is compared too.
    params = {**PARAMS, "validation_fraction": 0.2}
    local = workflows.fit("brainguard", data=DATA, subjects=[1, 2], out=tmp_path / "local", evaluate=False,
                          params={**params, "checkpoint_dir": str(tmp_path / "local-ckpt")})
    flower = workflows.fit("brainguard", data=DATA, subjects=[1, 2], out=tmp_path / "flower", evaluate=False,
                           params={**params, "checkpoint_dir": str(tmp_path / "fl-state")}, engine="flower")
    _assert_all_gone(started)
    assert [r.name for r in flower] == [r.name for r in local] == ["brainguard-subj01-pixels", "brainguard-subj02-pixels"]
    n_voxels = {s: workflows.load_dataset(DATA, subjects=[s]).n_voxels(s) for s in (1, 2)}
    for a, b in zip(local, flower):
        s = a.subject
        ma, mb = a.load_decoder().models_[s].state_dict(), b.load_decoder().models_[s].state_dict()
        assert list(ma) == list(mb)
        for k in ma:  # private (ridge) and shared tensors alike
            torch.testing.assert_close(ma[k], mb[k], rtol=0, atol=0)
        np.testing.assert_array_equal(np.load(a.path / "predictions.npy"), np.load(b.path / "predictions.npy"))
        # The site's own history (losses, validation and global-backbone scores) is the same.
        assert a.load_decoder().history_ == b.load_decoder().history_
        for run in (a, b):
            assert_run_is_private(run.path, s, 3 - s, n_voxels[3 - s])
    g_local = federated.load_checkpoint(federated.read_latest(tmp_path / "local-ckpt"))[1]
    g_flower = load_file(str(tmp_path / "fl-state" / "server" / "global.safetensors"))
    assert list(g_flower) == list(g_local)
    for k in g_local:
        torch.testing.assert_close(g_flower[k], g_local[k], rtol=0, atol=0)
    # The server kept only shared tensors.
    assert not any(k.startswith("ridge.") for k in g_flower)


def test_interrupt_stops_every_process(tmp_path, monkeypatch, allow_loopback):
    """Ctrl-C while the federation runs: every process started is stopped, by its group id."""
    started = _recording(monkeypatch)
    sites_started = []
    before = signal.getsignal(signal.SIGTERM)

    def pause(seconds):
        if sites_started:
            raise KeyboardInterrupt  # as a Ctrl-C while waiting for the federation
        time.sleep(seconds)

    monkeypatch.setattr(loopback, "_pause", pause)
    temporary = tmp_path / "brainrecon-flower-tmp"
    monkeypatch.setattr(loopback.tempfile, "mkdtemp", lambda prefix: str(temporary.mkdir() or temporary))
    with pytest.raises(KeyboardInterrupt):
        loopback.fit_on_flower({**PARAMS, "target": "pixels"}, data=DATA, subjects=[1, 2], out=tmp_path / "runs",
                               names={1: "a", 2: "b"}, timeout=120,
                               log=lambda message: sites_started.append(message))
    assert len(started) == 3
    _assert_all_gone(started)
    assert signal.getsignal(signal.SIGTERM) == before  # the handler is put back
    # The sites' states (private input layers) and the server's database are not left behind.
    assert not temporary.exists()


def test_a_failing_site_fails_the_federation_and_stops_every_process(tmp_path, monkeypatch, allow_loopback):
    """Site 2 cannot read its data: the round fails with its error, nothing is left running."""
    started = _recording(monkeypatch)
    real_start = loopback.start_process

    def start(args, **kwargs):
        args = list(args)
        if "site" in args and args[args.index("--subject") + 1] == "2":
            args[args.index("--data") + 1] = str(tmp_path / "no-such-data")
        return real_start(args, **kwargs)

    monkeypatch.setattr(loopback, "start_process", start)
    # The site checks its data before it connects: one line at the site, nothing in the server's log.
    with pytest.raises(BrainreconError, match=r"Site 2 stopped \(exit code 1\): .*Data not found"):
        loopback.fit_on_flower({**PARAMS, "target": "pixels"}, data=DATA, subjects=[1, 2], out=tmp_path / "runs",
                               names={1: "a", 2: "b"}, state_dir=tmp_path / "state", timeout=300,
                               log=lambda message: None)
    _assert_all_gone(started)
    assert "Traceback" not in (tmp_path / "state" / "site-2.log").read_text()
    assert "no-such-data" not in "".join(p.read_text(errors="replace")
                                         for p in (tmp_path / "state" / "server").rglob("*.log"))
    assert not (tmp_path / "runs").exists()


def test_federate_server_params_and_fit_engine_option(monkeypatch, tmp_path):
    from typer.testing import CliRunner

    from brainrecon.cli import app
    from brainrecon.cli.federate import _decoder_params

    params = _decoder_params(None, ["hidden=8"], "weadl", "ipadapter", 3)
    assert params["rounds"] == 3 and params["hidden"] == 8 and params["sync_tensors"] == 24
    assert params["target"] == "ipadapter" and params["calibration"] == "none"
    with pytest.raises(BrainreconError, match="Unknown ema"):
        _decoder_params('{"ema": "fast"}', None, None, None, None)
    with pytest.raises(BrainreconError, match="--params must be one JSON object"):
        _decoder_params("hidden=8", None, None, None, None)

    seen = {}

    def fake(params, **kwargs):
        seen.update(params=params, **kwargs)
        raise BrainreconError("stopped here")

    monkeypatch.setattr(loopback, "fit_on_flower", fake)
    result = CliRunner().invoke(app, ["fit", "--decoder", "brainguard", "--engine", "flower", "--subjects", "1", "2",
                                      "--data", DATA, "--rounds", "2", "--out", str(tmp_path)])
    assert result.exit_code == 1 and "stopped here" in result.output
    assert seen["subjects"] == [1, 2] and seen["data"] == DATA and seen["params"]["rounds"] == 2
    assert seen["names"] == {1: "brainguard-subj01-pixels", 2: "brainguard-subj02-pixels"}
    result = CliRunner().invoke(app, ["fit", "--decoder", "ridge", "--engine", "flower", "--out", str(tmp_path)])
    assert result.exit_code == 1 and "--engine flower is for the brainguard decoder" in result.output


def test_leftover_flower_processes_are_found_by_flwr_home_and_stopped(tmp_path):
    """Detached processes (own session, one ignoring SIGTERM) that carry a FLWR_HOME are found
    and stopped; a process with another FLWR_HOME is left alone. A second server in the same
    directory is refused while the first holds its lock."""
    home, other = tmp_path / "server" / "flwr-home", tmp_path / "elsewhere"
    code = ("import signal, sys, time\n"
            "if sys.argv[1] == 'stubborn':\n    signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
            "print('ready', flush=True)\ntime.sleep(120)\n")
    procs = [subprocess.Popen([sys.executable, "-c", code, kind], start_new_session=True, stdout=subprocess.PIPE,
                              env=supervise.flower_env(flwr_home=h), text=True)
             for kind, h in (("polite", home), ("stubborn", home), ("polite", other))]
    try:
        assert [p.stdout.readline().strip() for p in procs] == ["ready"] * 3
        assert supervise.flower_processes(home) == sorted(p.pid for p in procs[:2])
        assert supervise.stop_flower_processes(home, grace=1.0) == sorted(p.pid for p in procs[:2])
        assert [p.wait(timeout=10) for p in procs[:2]] == [-signal.SIGTERM, -signal.SIGKILL]
        assert supervise.flower_processes(home) == [] and procs[2].poll() is None
    finally:
        for p in procs:
            p.kill()
            p.wait()
            p.stdout.close()
    lock = supervise.DirectoryLock(tmp_path, "brainrecon federate server")
    try:
        with pytest.raises(BrainreconError, match=rf"Another brainrecon federate server is running in .* \(pid {os.getpid()}\)"):
            server.serve(params={}, rounds=1, min_sites=1, server_dir=tmp_path, port=supervise.free_port())
    finally:
        lock.release()


def test_server_crash_and_resume_gives_the_uninterrupted_result(tmp_path, monkeypatch, one_thread, allow_loopback):
    """The server is killed (SIGKILL, with its SuperLink) after round 1 of 3 and restarted with
    --resume; the sites keep running, reconnect, and the result equals the local engine's."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("TQDM_DISABLE", "1")
    params = {**PARAMS, "rounds": 3, "target": "pixels"}
    reference = workflows.fit("brainguard", data=DATA, subjects=[1, 2], out=tmp_path / "local", evaluate=False,
                              params={k: v for k, v in params.items() if k != "target"})
    port = supervise.free_port()
    server_args = FEDERATE + ["server", "--rounds", "3", "--sites", "2", "--host", "127.0.0.1", "--port", str(port),
                         "--server-dir", str(tmp_path / "server"), "--params", json.dumps(params),
                         "--round-timeout", "240"]
    env = supervise.flower_env()
    homes = [tmp_path / "server" / "flwr-home", tmp_path / "site-1" / "flwr-home", tmp_path / "site-2" / "flwr-home"]
    started = []
    try:
        started.append(supervise.start_process(server_args, env=env, log=tmp_path / "server-1.log"))
        for s in (1, 2):
            started.append(_start_site(tmp_path, s, port, env))
        status = tmp_path / "server" / server.SERVER_STATUS
        deadline = time.monotonic() + 300
        while not (status.is_file() and json.loads(status.read_text())["rounds_completed"] >= 1):
            assert time.monotonic() < deadline and started[0].poll() is None, "round 1 never finished"
            time.sleep(0.2)
        # The server machine hangs, then dies: Flower's detached processes (the SuperLink's
        # SuperExec, the ServerApp) are frozen so they cannot notice their parent's death, as
        # happens where orphans are not reaped; the restarted server must stop them.
        detached = supervise.flower_processes(homes[0])
        assert detached, "the server's Flower processes were not found by FLWR_HOME"
        for pid in detached:
            os.kill(pid, signal.SIGSTOP)
        os.killpg(started[0].pid, signal.SIGKILL)
        started[0].wait(timeout=30)
        assert json.loads(status.read_text())["finished"] is False
        leftovers = supervise.flower_processes(homes[0])
        resumed = supervise.start_process(server_args + ["--resume"], env=env, log=tmp_path / "server-2.log")
        started.append(resumed)
        try:
            code = resumed.wait(timeout=400)
        except subprocess.TimeoutExpired:
            code = "no exit after 400 s"
        assert code == 0, _log_tails(tmp_path)
    finally:
        supervise.stop_all(started)
    _assert_all_gone(started)
    assert not any(supervise.flower_processes(h) for h in homes)
    if leftovers:  # not the case where the frozen processes were SIGKILLed with the group
        assert f"Flower process(es) an earlier server left running: pids {leftovers}" in \
            (tmp_path / "server-2.log").read_text()
    assert json.loads(status.read_text())["finished"] is True
    for run in reference:
        s = run.subject
        mine = Run.open(tmp_path / "flower" / run.name).load_decoder().models_[s].state_dict()
        for k, v in run.load_decoder().models_[s].state_dict().items():
            torch.testing.assert_close(mine[k], v, rtol=0, atol=0)
