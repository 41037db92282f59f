"""A federation is closed by default (issue 25 §1) and refuses bad sites early (§2).

Processes are started on 127.0.0.1 only, bounded in time, and stopped by process id (and
group) also on failure.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

flwr = pytest.importorskip("flwr", reason="needs the federated extra (pip install 'brainrecon[federated]')")

from brainrecon.errors import BrainreconError
from brainrecon.federation import server, site, supervise
from tests.test_brainguard_flower import DATA, _assert_all_gone, _log_tails, _start_site
from tests.test_brainguard_flower import FEDERATE as CLI
from tests.test_brainguard_flower import PARAMS as FLOWER_PARAMS

PARAMS = {**FLOWER_PARAMS, "target": "pixels"}

ATTACKER_APP = '''
from pathlib import Path
from flwr.app import Message, RecordDict, ConfigRecord
from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp

server_app = ServerApp()
client_app = ClientApp()


@server_app.main()
def main(grid, context):
    Path(str(context.run_config["leak"])).with_name("server-leak.txt").write_text("ran at the server")
    nodes = []
    for _ in range(100):
        nodes = list(grid.get_node_ids())
        if nodes:
            break
        import time; time.sleep(0.2)
    replies = grid.send_and_receive([Message(RecordDict(), dst_node_id=n, message_type="train") for n in nodes],
                                    timeout=60)
    for reply in replies:
        print("REPLY", reply.has_error(), reply.error if reply.has_error() else dict(reply.content))


@client_app.train()
def steal(msg, context):
    leak = Path(str(context.run_config["leak"]))
    site_file = context.node_config.get("site-file", "")
    leak.write_text("ran at a site: " + str(site_file) + " " + (Path(site_file).read_text() if site_file else ""))
    return Message(RecordDict({"config": ConfigRecord({"site": str(site_file)})}), reply_to=msg)
'''


def _attacker_app(directory: Path, leak: Path) -> Path:
    directory.mkdir(parents=True)
    (directory / "stealer.py").write_text(ATTACKER_APP)
    (directory / "pyproject.toml").write_text(f"""[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "attacker-app"
version = "1.0.0"
dependencies = []

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "someone"

[tool.flwr.app.components]
serverapp = "stealer:server_app"
clientapp = "stealer:client_app"

[tool.flwr.app.config]
leak = {json.dumps(str(leak))}
""")
    return directory


def _wait_for(predicate, timeout: float, message, processes=()):
    deadline = time.monotonic() + timeout
    while not predicate():
        for p in processes:
            assert p.poll() is None, f"{p.args[:5]} exited with {p.returncode}: {message()}"
        assert time.monotonic() < deadline, message()
        time.sleep(0.3)


def _attacker_home(tmp_path: Path, port: int) -> Path:
    """A Flower CLI configuration that points `flwr run` at 127.0.0.1:port (the victim)."""
    home = tmp_path / "attacker-home"
    home.mkdir()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "victim"\n\n[superlink.victim]\naddress = "127.0.0.1:{port}"\ninsecure = true\n')
    return home


@pytest.mark.slow
def test_attacker_app_submitted_with_flwr_run_is_refused_and_reads_nothing(tmp_path, allow_loopback):
    """A hand-written app run with `flwr run` against a running `brainrecon federate server`
    (with a site connected): the server refuses it in one line; none of its code runs, neither
    at the server nor at the site, and it reads nothing."""
    port = supervise.free_port()
    leak = tmp_path / "leak.txt"
    env = supervise.flower_env()
    env["TQDM_DISABLE"] = "1"
    started = []
    try:
        started.append(supervise.start_process(
            CLI + ["server", "--rounds", "2", "--sites", "2", "--port", str(port), "--server-dir",
                   str(tmp_path / "server"), "--params", json.dumps(PARAMS)], env=env, log=tmp_path / "server.log"))
        supervise.wait_for_port("127.0.0.1", port, 120, started[0])
        started.append(_start_site(tmp_path, 1, port, env))
        site_log = tmp_path / "site-1.log"
        _wait_for(lambda: "SuperNode ID" in site_log.read_text(errors="replace"), 120,
                  lambda: _log_tails(tmp_path, 30), started[:2])
        # The server's own run waits for its second site; meanwhile an attacker submits an app.
        attacker = supervise.start_process(
            [supervise.flower_bin("flwr"), "run", ".", "victim", "--stream"],
            env=supervise.flower_env(flwr_home=_attacker_home(tmp_path, port)), log=tmp_path / "attacker.log",
            cwd=_attacker_app(tmp_path / "attacker", leak))
        started.append(attacker)
        try:
            attacker.wait(timeout=120)
        except subprocess.TimeoutExpired:
            pass
        assert started[0].poll() is None and started[1].poll() is None, _log_tails(tmp_path, 30)
    finally:
        supervise.stop_all(started)
        supervise.stop_flower_processes(tmp_path / "site-1" / "flwr-home")
        supervise.stop_flower_processes(tmp_path / "server" / "flwr-home")
    _assert_all_gone(started)
    assert attacker.returncode not in (None, 0), _log_tails(tmp_path, 30)
    assert not leak.exists() and not (tmp_path / "server-leak.txt").exists()
    refusal = "refused to run 'attacker-app' 1.0.0"
    assert refusal in (tmp_path / "attacker.log").read_text(errors="replace"), _log_tails(tmp_path, 30)
    superlink_log = (tmp_path / "server" / "superlink.log").read_text(errors="replace")
    assert [line for line in superlink_log.splitlines() if refusal in line], superlink_log
    assert str(tmp_path / "site-1") not in (tmp_path / "attacker.log").read_text(errors="replace")


@pytest.mark.slow
def test_a_site_refuses_a_foreign_app_even_from_a_rogue_server(tmp_path, allow_loopback):
    """A site connected to a plain Flower SuperLink (a server taken over, or not brainrecon's):
    an app run there with `flwr run` is refused by the site in one line before any of its code
    runs at the site; it reads nothing of the site."""
    port = supervise.free_port()
    leak = tmp_path / "leak.txt"
    env = supervise.flower_env()
    env["TQDM_DISABLE"] = "1"
    started = []
    rogue_home = tmp_path / "rogue-home"
    try:
        started.append(supervise.start_process(
            [supervise.flower_bin("flower-superlink"), "--insecure", "--host", "127.0.0.1", "--port", str(port),
             "--disable-runtime-dependency-installation"],
            env=supervise.flower_env(flwr_home=rogue_home), log=tmp_path / "rogue.log"))
        supervise.wait_for_port("127.0.0.1", port, 120, started[0])
        started.append(_start_site(tmp_path, 1, port, env))
        site_log = tmp_path / "site-1.log"
        _wait_for(lambda: "SuperNode ID" in site_log.read_text(errors="replace"), 120,
                  lambda: _log_tails(tmp_path, 30), started[:2])
        started.append(supervise.start_process(
            [supervise.flower_bin("flwr"), "run", ".", "victim", "--stream"],
            env=supervise.flower_env(flwr_home=_attacker_home(tmp_path, port)), log=tmp_path / "attacker.log",
            cwd=_attacker_app(tmp_path / "attacker", leak)))
        _wait_for(lambda: "refused to run" in site_log.read_text(errors="replace") or leak.exists(), 150,
                  lambda: _log_tails(tmp_path, 30), started[:2])
        time.sleep(2)
    finally:
        supervise.stop_all(started)
        for home in (tmp_path / "site-1" / "flwr-home", rogue_home):
            supervise.stop_flower_processes(home)
    _assert_all_gone(started)
    assert not leak.exists(), leak.read_text()
    text = site_log.read_text(errors="replace")
    refusals = [line for line in text.splitlines() if "refused to run" in line]
    assert refusals and "'attacker-app' 1.0.0" in refusals[0] and "brainrecon-brainguard" in refusals[0], text
    assert "Traceback" not in text
    assert str(tmp_path / "site-1") not in (tmp_path / "attacker.log").read_text(errors="replace")


def test_the_site_accepts_the_app_the_server_ships():
    import tempfile

    from flwr.cli.build import build_fab_from_disk

    from brainrecon.federation import bundle

    with tempfile.TemporaryDirectory() as d:
        ours = build_fab_from_disk(server.write_app(Path(d) / "app"))
    assert bundle.app_refusal(ours) is None
    assert "refused to run an unreadable app" in bundle.app_refusal(b"not a zip")


def test_non_loopback_addresses_need_credentials(tmp_path, monkeypatch):
    """Nothing listens or connects beyond loopback without TLS and node authentication, unless
    --insecure is given (with a warning that names the risk)."""
    def no_start(*args, **kwargs):
        raise AssertionError("a process was started")

    monkeypatch.setattr(server, "start_process", no_start)
    monkeypatch.setattr(site.subprocess, "Popen", no_start)
    with pytest.raises(BrainreconError, match=r"--host 0.0.0.0 is reachable from other machines and no credentials"):
        server.serve(params={}, rounds=1, min_sites=1, server_dir=tmp_path / "s", host="0.0.0.0", port=1)
    with pytest.raises(BrainreconError, match=r"add --enable-supernode-auth"):
        server.serve(params={}, rounds=1, min_sites=1, server_dir=tmp_path / "s", host="10.1.2.3", port=1,
                     ssl_certfile="c", ssl_keyfile="k", ssl_ca_certfile="ca")
    with pytest.raises(BrainreconError, match=r"--server 10.1.2.3:9092 is another machine and no credentials"):
        site.run_site(subject=1, data=DATA, server="10.1.2.3:9092", state_dir=tmp_path / "site", out=tmp_path)
    with pytest.raises(BrainreconError, match=r"--auth-private-key"):
        site.run_site(subject=1, data=DATA, server="10.1.2.3:9092", state_dir=tmp_path / "site", out=tmp_path,
                      root_certificates="ca.pem")
    said = []
    assert server.server_transport("0.0.0.0", insecure=True, log=said.append) == "plain"
    assert "anyone on this network can join the federation" in said[0]
    assert server.server_transport("127.0.0.1") == "plain"
    assert site.site_transport("127.0.0.1:9092") is True


def test_control_api_answers_loopback_only_and_starts_brainrecons_app_once(tmp_path):
    """The SuperLink's rules: Control and Runtime APIs from loopback only; the Fleet API from
    anywhere; `start-run` only with brainrecon's app bundle, and only once."""
    import asyncio

    from flwr.cli.build import build_fab_from_disk
    from flwr.proto.control_pb2 import StartRunRequest
    from flwr.proto.fab_pb2 import Fab

    from brainrecon.federation.link import LoopbackOnly

    async def app(scope, receive, send):
        message = await receive() if scope["path"].endswith("start-run") else {"body": b""}
        await send({"type": "http.response.start", "status": 200, "headers": [], "seen": message["body"]})

    def call(rules, path, client, body=b""):
        sent, parts = [], [body[:10], body[10:]]

        async def receive():
            part = parts.pop(0)
            return {"type": "http.request", "body": part, "more_body": bool(parts)}

        async def send(message):
            sent.append(message)

        asyncio.run(rules({"type": "http", "path": path, "client": (client, 5)}, receive, send))
        return sent[0]

    def start_run(content: bytes) -> bytes:
        return StartRunRequest(fab=Fab(hash_str="x", content=content)).SerializeToString()

    rules = LoopbackOnly(app)
    assert call(rules, "/v1/control/start-run", "10.0.0.7")["status"] == 403
    assert call(rules, "/v1/runtime/pull-messages", "10.0.0.7")["status"] == 403
    assert call(rules, "/v1/control/list-runs", "127.0.0.1")["status"] == 200
    assert call(rules, "/v1/fleet/register-node", "10.0.0.7")["status"] == 200
    # A foreign app, or brainrecon's named by hash only, is refused before Flower sees it.
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "pyproject.toml").write_text(server.app_files()["pyproject.toml"].decode().replace(
        'version = "', 'version = "9'))
    (foreign / "README.md").write_text("x")
    assert call(rules, "/v1/control/start-run", "127.0.0.1", start_run(build_fab_from_disk(foreign)))["status"] == 403
    assert call(rules, "/v1/control/start-run", "127.0.0.1", start_run(b""))["status"] == 403
    assert call(rules, "/v1/control/start-run", "127.0.0.1", b"\xff garbage")["status"] == 403
    # brainrecon's app starts, with Flower reading the very bytes that were checked; once.
    ours = start_run(build_fab_from_disk(server.write_app(tmp_path / "app")))
    reply = call(rules, "/v1/control/start-run", "127.0.0.1", ours)
    assert reply["status"] == 200 and reply["seen"] == ours
    assert call(rules, "/v1/control/start-run", "127.0.0.1", ours)["status"] == 403


def test_bad_site_input_is_one_line_before_connecting(tmp_path, monkeypatch):
    """A wrong subject, a missing data path or another subject's state directory: one line at
    the site, exit code 1, nothing started (so nothing reaches the server's log)."""
    from typer.testing import CliRunner

    from brainrecon.cli import app

    def no_start(*args, **kwargs):
        raise AssertionError("a SuperNode was started")

    monkeypatch.setattr(site.subprocess, "Popen", no_start)
    base = ["federate", "site", "--server", "127.0.0.1:1", "--out", str(tmp_path / "runs")]
    for args, message in (
        (["--subject", "9", "--data", "synthetic", "--state-dir", str(tmp_path / "a")], "Unknown synthetic subject 9"),
        (["--subject", "1", "--data", str(tmp_path / "missing"), "--state-dir", str(tmp_path / "b")], "Data not found"),
    ):
        result = CliRunner().invoke(app, base + args)
        assert result.exit_code == 1, result.output
        assert message in result.output and "Traceback" not in result.output
        assert not isinstance(result.exception, AssertionError)
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "site.json").write_text(json.dumps({"subject": 2}))
    result = CliRunner().invoke(app, base + ["--subject", "1", "--data", DATA, "--state-dir", str(tmp_path / "c")])
    assert result.exit_code == 1 and "holds the site of subject 2, not 1" in result.output, result.output


def test_runs_never_record_tokens():
    from brainrecon.runs import _redacted

    assert _redacted(["flwr-clientapp", "--clientappio-api-address", "127.0.0.1:9094", "--token", "s3cret",
                      "--auth-secret=abc", "--run-once"]) == [
        "flwr-clientapp", "--clientappio-api-address", "127.0.0.1:9094", "--token", "<redacted>",
        "--auth-secret=<redacted>", "--run-once"]
