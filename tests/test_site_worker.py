"""The site worker (issue 25 §3): a site kept in memory between Flower's per-message ClientApp processes.

No Flower processes: the ClientApp's handler (``site_train``) is called in this process, and
the worker serves its owner-only socket from a thread of this process, so both paths run the
same code on the same threads and their uploads must be equal bit for bit.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

flwr = pytest.importorskip("flwr", reason="needs the federated extra (pip install 'brainrecon[federated]')")

from flwr.app import ArrayRecord, Context, RecordDict

from brainrecon.errors import BrainreconError
from brainrecon.federation import channel, site, worker
from tests.test_brainguard_flower import (  # noqa: F401
    DATA,
    PARAMS,
    _instruction,
    one_thread,
    task_identity,
)

# Flower messages built outside a Flower process, and one torch thread (imported fixtures).
pytestmark = pytest.mark.usefixtures("task_identity", "one_thread")

ROUNDS = 3


def _context(root: Path, subject: int, *, with_worker: bool) -> Context:
    state = root / "state"
    state.mkdir(parents=True)
    settings = {"subject": subject, "data": DATA, "state_dir": str(state), "out": str(root / "runs"),
                "run_name": None, "evaluate": False, "worker": with_worker}
    (state / "site.json").write_text(json.dumps(settings))
    return Context(run_id=1, node_id=7, node_config={"site-file": str(state / "site.json")}, state=RecordDict(),
                   run_config={"params": json.dumps({**PARAMS, "rounds": ROUNDS, "target": "pixels"}),
                               "recipe": "weadl"})


class _Worker:
    """A site worker serving from a thread of this process."""

    def __init__(self, context: Context):
        self.stop = threading.Event()
        self.site_file = context.node_config["site-file"]
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()
        token = channel.token_path(Path(self.site_file).parent)
        for _ in range(200):
            if token.is_file():
                return
            self.thread.join(0.05)
        raise AssertionError(f"the worker did not listen: {self.error!r}")

    def _serve(self):
        try:
            worker.serve(self.site_file, stop=self.stop)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc

    def close(self):
        self.stop.set()
        self.thread.join(10)
        assert not self.thread.is_alive() and self.error is None, self.error


def _global(reply) -> ArrayRecord:
    """The global model of the next round: this site's upload shifted, as if averaged with another's."""
    arrays = reply.content.array_records["arrays"]
    return ArrayRecord.from_torch_state_dict({k: v + 0.01 for k, v in arrays.to_torch_state_dict().items()})


def _uploads(context: Context, rounds=range(1, ROUNDS + 1), first: ArrayRecord | None = None) -> list:
    replies, received = [], first if first is not None else ArrayRecord()
    for r in rounds:
        reply = site.site_train(_instruction(received, r, rounds=ROUNDS), context)
        replies.append(reply)
        received = _global(reply)
    return replies


def _assert_same(a, b):
    """Two replies are the same message content: every array's bytes, dtype, shape; the metrics."""
    x, y = a.content.array_records["arrays"], b.content.array_records["arrays"]
    assert list(x.keys()) == list(y.keys())
    for k in x:
        assert (x[k].dtype, x[k].shape, x[k].stype) == (y[k].dtype, y[k].shape, y[k].stype), k
        assert x[k].data == y[k].data, k
    assert dict(a.content.metric_records["metrics"]) == dict(b.content.metric_records["metrics"])


def test_worker_gives_the_uploads_of_the_in_process_path(tmp_path, capsys):
    """3 rounds at tiny size. Tolerance: exact (the same bytes) — same code, process and threads."""
    reference = _uploads(_context(tmp_path / "in-process", 2, with_worker=False))
    context = _context(tmp_path / "w", 2, with_worker=True)
    served = _Worker(context)
    try:
        replies = _uploads(context)
    finally:
        served.close()
    assert "runs in the ClientApp process" not in capsys.readouterr().err  # the worker answered
    for a, b in zip(reference, replies, strict=True):
        _assert_same(a, b)
    # The state it saved after the reply is the in-process path's, and the socket and token are gone.
    state = tmp_path / "w" / "state"
    for r in (ROUNDS - 1, ROUNDS):
        mine, theirs = load_file(str(state / site.SITE_STATE.format(r))), \
            load_file(str(tmp_path / "in-process" / "state" / site.SITE_STATE.format(r)))
        assert mine.keys() == theirs.keys()
        for k in mine:
            torch.testing.assert_close(mine[k], theirs[k], rtol=0, atol=0)
    assert not list(state.glob("input-*")) and not (state / channel.SOCKET_NAME).exists()
    assert not (state / channel.TOKEN_NAME).exists()
    assert json.loads((state / site.SITE_FINISHED).read_text())["rounds"] == ROUNDS


@pytest.mark.parametrize("lost", [1, 2])
def test_a_site_stopped_between_reply_and_save_redoes_that_round(tmp_path,
                                                                 monkeypatch, lost):
    """The worker replied to round ``lost`` and stopped before its state was saved (as SIGKILL would
    do): the site, restarted without a worker, redoes that round from the global model it kept and
    continues with the uploads of an uninterrupted site (exact)."""
    reference = _uploads(_context(tmp_path / "ref", 2, with_worker=False))
    context = _context(tmp_path / "w", 2, with_worker=True)
    real = site.Site._save_in_thread

    def lose(self, snapshot):
        if snapshot[1]["rounds_completed"] != lost:
            real(self, snapshot)

    monkeypatch.setattr(site.Site, "_save_in_thread", lose)
    served = _Worker(context)
    try:
        replies = _uploads(context, range(1, lost + 1))
    finally:
        served.close()
    state = tmp_path / "w" / "state"
    assert sorted(p.name for p in state.glob("state-*.json")) == [site.SITE_META.format(r) for r in range(1, lost)]
    assert (state / site.SITE_INPUT.format(lost)).is_file()
    monkeypatch.setattr(site.Site, "_save_in_thread", real)
    replies += _uploads(context, range(lost + 1, ROUNDS + 1), first=_global(replies[-1]))  # no worker now
    for a, b in zip(reference, replies, strict=True):
        _assert_same(a, b)


def test_without_a_worker_the_clientapp_does_the_round_itself(tmp_path, capsys):
    reference = _uploads(_context(tmp_path / "ref", 2, with_worker=False), range(1, 2))
    replies = _uploads(_context(tmp_path / "w", 2, with_worker=True), range(1, 2))  # no worker started
    assert "this round runs in the ClientApp process" in capsys.readouterr().err
    _assert_same(reference[0], replies[0])


def test_the_channel_is_owner_only_and_refuses_a_wrong_token(tmp_path):
    context = _context(tmp_path, 2, with_worker=True)
    state = tmp_path / "state"
    served = _Worker(context)
    try:
        for path in (state / channel.SOCKET_NAME, state / channel.TOKEN_NAME):
            assert stat.S_IMODE(os.stat(path).st_mode) & 0o077 == 0, (path, oct(os.stat(path).st_mode))
        reply, _ = channel.call(state, {"op": "ping"})
        assert reply == {"pid": os.getpid()}
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(str(state / channel.SOCKET_NAME))
            channel.send_frame(sock, {"op": "ping", "token": "0" * 64})
            refused, _ = channel.recv_frame(sock)
        assert refused == {"refused": "this site worker refuses a wrong token"}
        (state / channel.TOKEN_NAME).write_text("f" * 64)  # a caller with a stale or forged token
        with pytest.raises(channel.WorkerUnavailable, match="wrong token"):
            channel.call(state, {"op": "ping"})
    finally:
        served.close()
    with pytest.raises(channel.WorkerUnavailable, match="no site worker"):
        channel.call(state, {"op": "ping"})


def test_worker_errors_reach_the_clientapp_as_one_line(tmp_path):
    context = _context(tmp_path, 2, with_worker=True)
    served = _Worker(context)
    try:
        with pytest.raises(BrainreconError, match=r"no saved state after round 4"):
            site.site_train(_instruction(ArrayRecord(), 5, rounds=ROUNDS), context)
        with pytest.raises(BrainreconError, match="does not know the request 'rm'"):
            channel.call(tmp_path / "state", {"op": "rm"})
    finally:
        served.close()


_CLIENTAPP = """
import json, sys
from pathlib import Path
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity
for name in ("_run_id", "_node_id", "_task_id"):
    setattr(TaskIdentity, name, 1)
from brainrecon.federation.app import client_app  # what Flower's ClientApp process loads
from brainrecon.federation.site import site_train
site_file, params, r, exchange = sys.argv[1], sys.argv[2], int(sys.argv[3]), Path(sys.argv[4])
context = Context(run_id=1, node_id=7, node_config={"site-file": site_file}, state=RecordDict(),
                  run_config={"params": params, "recipe": ""})
received = ArrayRecord()
if r > 1:  # the previous reply, as Flower's runtime would hand over a global model
    for k, (name, dtype, shape) in enumerate(json.loads((exchange / "index.json").read_text())):
        received[name] = Array(dtype=dtype, shape=tuple(shape), stype="numpy.ndarray",
                               data=(exchange / f"{k}.npy").read_bytes())
config = ConfigRecord({"server-round": r, "num-rounds": 3, "sites": 2})
msg = Message(content=RecordDict({"arrays": received, "config": config}), dst_node_id=7, message_type="train")
arrays = site_train(msg, context).content.array_records["arrays"]
(exchange / "index.json").write_text(json.dumps([[k, a.dtype, list(a.shape)] for k, a in arrays.items()]))
for k, a in enumerate(arrays.values()):
    (exchange / f"{k}.npy").write_bytes(a.data)
print(json.dumps({"torch": "torch" in sys.modules, "arrays": len(arrays)}))
"""


@pytest.mark.slow
@pytest.mark.parametrize("with_worker", [True, False])
def test_a_fresh_clientapp_process_relays_to_the_worker_without_torch(tmp_path, with_worker):
    """The handler as Flower runs it, one fresh process per message, rounds 1 and 2: with a worker
    it never imports torch; without one it does the rounds itself."""
    import subprocess
    import sys

    context = _context(tmp_path, 2, with_worker=with_worker)
    served = _Worker(context) if with_worker else None
    results = []
    try:
        for r in (1, 2):
            done = subprocess.run([sys.executable, "-c", _CLIENTAPP, context.node_config["site-file"],
                                   context.run_config["params"], str(r), str(tmp_path)],
                                  capture_output=True, text=True, timeout=300, check=False,
                                  env={**os.environ, "OMP_NUM_THREADS": "1"})
            assert done.returncode == 0, done.stderr[-3000:]
            assert "runs in the ClientApp process" not in done.stderr
            results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    finally:
        if served is not None:
            served.close()
    assert [x["torch"] for x in results] == [not with_worker] * 2
    assert results[0]["arrays"] == results[1]["arrays"] > 0
    assert sorted(p.name for p in (tmp_path / "state").glob("state-*.json")) == \
        [site.SITE_META.format(r) for r in (1, 2)]


def test_a_state_dir_too_long_for_a_socket_address_gets_a_private_socket(tmp_path):
    """sun_path holds 108 bytes: the worker of a deeply nested state directory listens in a
    private 0700 temporary directory named in the token file, and removes it when it stops."""
    root = tmp_path / ("deep-" * 20)
    context = _context(root, 2, with_worker=True)
    state = root / "state"
    assert len(os.fsencode(state / channel.SOCKET_NAME)) > 108
    served = _Worker(context)
    try:
        _token, address = (state / channel.TOKEN_NAME).read_text().splitlines()
        private = Path(address).parent
        assert private.name.startswith(channel.PRIVATE_PREFIX) and not (state / channel.SOCKET_NAME).exists()
        assert stat.S_IMODE(os.stat(private).st_mode) == 0o700
        reply, _ = channel.call(state, {"op": "ping"})
        assert reply == {"pid": os.getpid()}
    finally:
        served.close()
    assert not private.exists() and not (state / channel.TOKEN_NAME).exists()


_TWO_SIGTERMS = """
import os, signal, sys, time
from brainrecon.federation.supervise import raise_on_sigterm
raise_on_sigterm(once=True)
try:
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(5)
except KeyboardInterrupt:
    os.kill(os.getpid(), signal.SIGTERM)  # a second one during the cleanup (e.g. the process group's)
    time.sleep(0.2)
    print("cleanup finished", flush=True)
"""


def test_a_second_sigterm_does_not_cut_the_workers_cleanup_short():
    """The worker's SIGTERM rule: the first interrupts, a second during the cleanup is swallowed
    (no traceback, no "ignored due to race condition"), and the process exits normally."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _TWO_SIGTERMS], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "cleanup finished" and done.stderr == "", done.stderr
