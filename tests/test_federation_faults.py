"""Faults a lab will meet (issue 25 §2): a site killed and restarted alone, two sites for one subject.

Real processes on 127.0.0.1 only, bounded in time, stopped by process id and group also on failure.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

flwr = pytest.importorskip("flwr", reason="needs the federated extra (pip install 'brainrecon[federated]')")

from brainrecon import workflows
from brainrecon.federation import server, supervise
from brainrecon.runs import Run
from tests.test_brainguard_flower import (
    DATA,
    PARAMS,
    _assert_all_gone,
    _log_tails,
    _start_site,
)
from tests.test_brainguard_flower import FEDERATE as CLI


@pytest.mark.slow
def test_a_site_killed_and_restarted_alone_rejoins_and_the_result_is_unchanged(tmp_path, monkeypatch, allow_loopback):
    """Site 2 is SIGKILLed (its whole process group) after round 1 of 3 and restarted with the same
    --state-dir; the server is not restarted, waits for it, and the federation equals the local engine."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("TQDM_DISABLE", "1")
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    params = {**PARAMS, "rounds": 3, "target": "pixels"}
    try:
        reference = workflows.fit("brainguard", data=DATA, subjects=[1, 2], out=tmp_path / "local", evaluate=False,
                                  params={k: v for k, v in params.items() if k != "target"})
    finally:
        torch.set_num_threads(previous)
    port = supervise.free_port()
    env = supervise.flower_env()
    homes = [tmp_path / "server" / "flwr-home", tmp_path / "site-1" / "flwr-home", tmp_path / "site-2" / "flwr-home"]
    started = []
    try:
        started.append(supervise.start_process(
            CLI + ["server", "--rounds", "3", "--sites", "2", "--port", str(port), "--server-dir",
                   str(tmp_path / "server"), "--params", json.dumps(params), "--round-timeout", "240"],
            env=env, log=tmp_path / "server.log"))
        for s in (1, 2):
            started.append(_start_site(tmp_path, s, port, env))
        status = tmp_path / "server" / server.SERVER_STATUS
        deadline = time.monotonic() + 300
        while not (status.is_file() and json.loads(status.read_text())["rounds_completed"] >= 1):
            assert time.monotonic() < deadline and started[0].poll() is None, _log_tails(tmp_path)
            time.sleep(0.2)
        os.killpg(started[2].pid, signal.SIGKILL)  # site 2's machine loses power, as it were
        started[2].wait(timeout=30)
        restarted = _start_site(tmp_path, 2, port, env, tmp_path / "site-2-restarted.log")
        started.append(restarted)
        try:
            code = started[0].wait(timeout=420)
        except subprocess.TimeoutExpired:
            code = "no exit after 420 s"
        assert code == 0, _log_tails(tmp_path)
        # The sites see the federation end, say which run they wrote and exit by themselves.
        for site in (started[1], restarted):
            site.wait(timeout=60)
            assert site.returncode == 0, _log_tails(tmp_path)
    finally:
        supervise.stop_all(started)
        for home in homes:
            supervise.stop_flower_processes(home)
    _assert_all_gone(started)
    assert not any(supervise.flower_processes(h) for h in homes)
    assert "this site wrote its run to" in (tmp_path / "site-2-restarted.log").read_text()
    assert json.loads(status.read_text())["finished"] is True
    # The server keeps only the global shared tensors (no database with the sites' uploads), and
    # every file a server or site wrote is readable by its owner only.
    assert not list((tmp_path / "server").glob("superlink.db*"))
    written = [p for d in ("server", "site-1", "site-2", "flower") for p in (tmp_path / d).rglob("*") if p.is_file()]
    assert written and all(p.stat().st_mode & 0o077 == 0 for p in written), \
        [(str(p), oct(p.stat().st_mode)) for p in written if p.stat().st_mode & 0o077]
    for run in reference:
        s = run.subject
        mine = Run.open(tmp_path / "flower" / run.name).load_decoder().models_[s].state_dict()
        for k, v in run.load_decoder().models_[s].state_dict().items():
            torch.testing.assert_close(mine[k], v, rtol=0, atol=0)


@pytest.mark.slow
def test_the_server_refuses_a_second_site_for_the_same_subject(tmp_path, allow_loopback):
    """Two sites of subject 1 (different state directories) and one of subject 2: the server
    refuses the second site of subject 1, naming it, instead of averaging it as a third subject;
    the federation goes on with one site per subject."""
    port = supervise.free_port()
    env = supervise.flower_env()
    env["TQDM_DISABLE"] = "1"
    started = []
    sites = {"1a": 1, "1b": 1, "2": 2}
    try:
        started.append(supervise.start_process(
            CLI + ["server", "--rounds", "2", "--sites", "2", "--port", str(port), "--server-dir",
                   str(tmp_path / "server"), "--params", json.dumps({**PARAMS, "rounds": 2, "target": "pixels"}),
                   "--round-timeout", "120"], env=env, log=tmp_path / "server.log"))
        for name, subject in sites.items():
            started.append(supervise.start_process(
                CLI + ["site", "--subject", str(subject), "--data", DATA, "--server", f"127.0.0.1:{port}",
                       "--state-dir", str(tmp_path / name), "--out", str(tmp_path / "runs"), "--no-evaluate"],
                env=env, log=tmp_path / f"site-{name}.log"))
        try:
            code = started[0].wait(timeout=300)
        except subprocess.TimeoutExpired:
            code = "no exit after 300 s"
    finally:
        supervise.stop_all(started)
        for home in ("server", *sites):
            supervise.stop_flower_processes(tmp_path / home / "flwr-home")
    _assert_all_gone(started)
    assert code == 0, _log_tails(tmp_path)
    run_log = (tmp_path / "server" / "run.log").read_text()
    refusals = [line for line in run_log.splitlines() if "as a second site of subject 1" in line]
    assert len(refusals) == 1 and "it gets no more rounds" in refusals[0], run_log
    # The refused site trained round 1 only (its upload not averaged), the others both rounds.
    last = {name: max(int(p.name[6:11]) for p in (tmp_path / name).glob("state-*.json")) for name in sites}
    assert last["2"] == 2 and sorted([last["1a"], last["1b"]]) == [1, 2], last
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["brainguard-subj01-pixels", "brainguard-subj02-pixels"]
    assert json.loads((tmp_path / "server" / server.SERVER_STATUS).read_text())["finished"] is True


def _credentials(directory):
    """A CA, a server certificate for 127.0.0.1 and two sites' SuperNode keys, made here."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    directory.mkdir()
    now = datetime.datetime.now(datetime.timezone.utc)

    def cert(subject, key, issuer, issuer_key, ca, san=None):
        builder = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
                   .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        return builder.sign(issuer_key, hashes.SHA256())

    def pem_key(key):
        return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())

    ca_key, server_key = ec.generate_private_key(ec.SECP384R1()), ec.generate_private_key(ec.SECP384R1())
    ca = cert("brainguard-test-ca", ca_key, "brainguard-test-ca", ca_key, True)
    server_cert = cert("127.0.0.1", server_key, "brainguard-test-ca", ca_key, False,
                       [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")])
    (directory / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (directory / "server.pem").write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    (directory / "server.key").write_bytes(pem_key(server_key))
    for s in (1, 2, 3):
        key = ec.generate_private_key(ec.SECP384R1())
        (directory / f"site-{s}").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()))
        (directory / f"site-{s}.pub").write_bytes(key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH))
    return directory


def _readme_credentials(directory):
    """The same files made by the README's own commands ("Two machines, step by step": RSA CA and
    server certificate with openssl, ECDSA site keys with ssh-keygen), run as written; None where
    openssl or ssh-keygen is missing."""
    import re
    import shutil

    if not (shutil.which("openssl") and shutil.which("ssh-keygen")):
        return None
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    steps = readme[readme.index("**Two machines, step by step**"):]
    server_block = re.search(r"```bash\n(.*?)```", steps, re.S).group(1)
    keygen = re.search(r"`(ssh-keygen [^`]*-f site-1)`", steps).group(1)
    assert "openssl req -x509" in server_block and "IP:127.0.0.1" in server_block, server_block
    directory.mkdir()
    commands = [server_block] + [keygen.replace("site-1", f"site-{s}") for s in (1, 2, 3)]
    for command in commands:
        done = subprocess.run(["bash", "-euc", command], cwd=directory, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, f"README command failed:\n{command}\n{done.stderr}"
    return directory


@pytest.mark.slow
@pytest.mark.parametrize("made_by", ["readme-commands", "test"])
def test_tls_with_supernode_authentication_end_to_end(tmp_path, allow_loopback, made_by):
    """TLS and Flower's SuperNode authentication with certificates and keys made by the README's
    commands (RSA certificates; skipped without openssl and ssh-keygen) or by the test (EC): two
    registered sites finish a round; a site whose key was not registered is not admitted."""
    if made_by == "test":
        keys = _credentials(tmp_path / "keys")
    else:
        keys = _readme_credentials(tmp_path / "keys")
        if keys is None:
            pytest.skip("openssl or ssh-keygen is not installed")
    port = supervise.free_port()
    env = supervise.flower_env()
    env["TQDM_DISABLE"] = "1"
    started = []
    try:
        started.append(supervise.start_process(
            CLI + ["server", "--rounds", "1", "--sites", "2", "--port", str(port), "--server-dir",
                   str(tmp_path / "server"), "--params", json.dumps({**PARAMS, "rounds": 1, "target": "pixels"}),
                   "--ssl-certfile", str(keys / "server.pem"), "--ssl-keyfile", str(keys / "server.key"),
                   "--ssl-ca-certfile", str(keys / "ca.pem"), "--enable-supernode-auth",
                   "--site-public-key", str(keys / "site-1.pub"), "--site-public-key", str(keys / "site-2.pub"),
                   "--round-timeout", "200"], env=env, log=tmp_path / "server.log"))
        for s in (1, 2, 3):  # site 3's key was not registered at the server
            started.append(supervise.start_process(
                CLI + ["site", "--subject", str(s), "--data", DATA, "--server", f"127.0.0.1:{port}",
                       "--root-certificates", str(keys / "ca.pem"), "--auth-private-key", str(keys / f"site-{s}"),
                       "--state-dir", str(tmp_path / f"site-{s}"), "--out", str(tmp_path / "runs"), "--no-evaluate"],
                env=env, log=tmp_path / f"site-{s}.log"))
        try:
            code = started[0].wait(timeout=400)
        except subprocess.TimeoutExpired:
            code = "no exit after 400 s"
        assert code == 0, _log_tails(tmp_path)
        started[3].wait(timeout=60)
    finally:
        supervise.stop_all(started)
        for home in (tmp_path / "server", tmp_path / "site-1", tmp_path / "site-2", tmp_path / "site-3"):
            supervise.stop_flower_processes(home / "flwr-home")
    _assert_all_gone(started)
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["brainguard-subj01-pixels", "brainguard-subj02-pixels"]
    # The unregistered site was not admitted: one line, exit code 1, no traceback.
    assert started[3].returncode == 1, _log_tails(tmp_path)
    text = (tmp_path / "site-3.log").read_text()
    assert "did not admit this site" in text and "Traceback" not in text, text
