"""Shared test set-up: no network, private data and cache locations, small threads."""

from __future__ import annotations

import os
import socket

import pytest
import torch

# .ci/run runs the `numerics` tests a second time with BRAINRECON_TEST_THREADS=1 (and one BLAS
# thread), which changes reduction orders the way another CPU does.
torch.set_num_threads(int(os.environ.get("BRAINRECON_TEST_THREADS", "2")))


class NetworkBlocked(RuntimeError):
    pass


def _blocked(*args, **kwargs):
    raise NetworkBlocked(
        "A test tried to open a network connection. brainrecon tests are offline: build tiny "
        "models locally and load them from tmp_path instead of downloading."
    )


def _unix_only(real):
    """``real`` for a Unix-domain socket (a file on this machine, not the network), else blocked."""

    def connect(self, address):
        if getattr(socket, "AF_UNIX", None) is not None and self.family == socket.AF_UNIX:
            return real(self, address)
        return _blocked()

    return connect


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    """Any network connection or DNS lookup in a test fails loudly (Unix-domain sockets, such as
    a site worker's, are local files and stay allowed)."""
    monkeypatch.setattr(socket.socket, "connect", _unix_only(socket.socket.connect))
    monkeypatch.setattr(socket.socket, "connect_ex", _unix_only(socket.socket.connect_ex))
    monkeypatch.setattr(socket, "create_connection", _blocked)
    monkeypatch.setattr(socket, "getaddrinfo", _blocked)


_REAL_CONNECT = socket.socket.connect
_REAL_CREATE_CONNECTION = socket.create_connection
_REAL_GETADDRINFO = socket.getaddrinfo


def _is_loopback(host) -> bool:
    import ipaddress

    try:
        return ipaddress.ip_address(str(host)).is_loopback
    except ValueError:
        return False


@pytest.fixture
def allow_loopback(monkeypatch, _no_network):
    """Permit connections to 127.0.0.0/8 and ::1 only (by numeric address); all else stays blocked."""

    def connect(self, address):
        if (isinstance(address, tuple) and _is_loopback(address[0])) or self.family == getattr(socket, "AF_UNIX", None):
            return _REAL_CONNECT(self, address)
        return _blocked()

    def create_connection(address, *args, **kwargs):
        if _is_loopback(address[0]):
            return _REAL_CREATE_CONNECTION(address, *args, **kwargs)
        return _blocked()

    def getaddrinfo(host, *args, **kwargs):
        if _is_loopback(host):
            return _REAL_GETADDRINFO(host, *args, **kwargs)
        return _blocked()

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket, "create_connection", create_connection)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


@pytest.fixture(autouse=True)
def _private_locations(monkeypatch, tmp_path_factory):
    """Caches and default data locations point into a temporary directory."""
    cache = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("BRAINRECON_CACHE", str(cache))
    monkeypatch.delenv("BRAINRECON_DATA", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(cache / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(cache / "torch"))
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def small_data():
    """A small synthetic dataset (4 subjects, 120 training and 12 test images of 32×32)."""
    from brainrecon.data.synthetic import make_synthetic

    return make_synthetic(seed=0, n_train=120, n_test=12, image_size=32, surface_size=32)


SMALL = "synthetic:n_train=120,n_test=12,image_size=32,surface_size=32"


@pytest.fixture(scope="session")
def evaluated_ridge_runs(tmp_path_factory):
    """`brainrecon fit --decoder ridge --data SMALL --subjects 1 2 --alphas 100,10000`, scored at the
    end of the fit (PixCorr, SSIM and target-space retrieval: no weights needed), made once per
    session: ``(runs folder, CliRunner result)``. Modules take copies (:func:`copy_runs`), never
    the folder itself."""
    from typer.testing import CliRunner

    from brainrecon.cli import app

    out = tmp_path_factory.mktemp("evaluated-ridge-runs")
    with pytest.MonkeyPatch.context() as patch:  # the autouse fixtures are not active yet
        patch.setenv("BRAINRECON_CACHE", str(tmp_path_factory.mktemp("session-cache")))
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setattr(socket, "getaddrinfo", _blocked)
        patch.setattr(socket.socket, "connect", _blocked)
        result = CliRunner().invoke(app, ["fit", "--decoder", "ridge", "--data", SMALL, "--subjects", "1", "2",
                                          "--out", str(out), "--alphas", "100,10000"])
    assert result.exit_code == 0, result.output
    return out, result


def copy_runs(source, destination, names=None):
    """Copy the runs of folder ``source`` (all, or those in ``names``) into ``destination``."""
    import shutil
    from pathlib import Path

    destination = Path(destination)
    destination.mkdir(parents=True, exist_ok=True)
    for run in sorted(Path(source).iterdir()):
        if (run / "run.json").is_file() and (names is None or run.name in names):
            shutil.copytree(run, destination / run.name)
    return destination


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory):
    """Tiny random IP-Adapter, image encoder and SD 1.5-style pipeline folders (built once)."""
    from brainrecon.testing.tiny import build_tiny_weights

    return build_tiny_weights(tmp_path_factory.mktemp("tiny_weights"))


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a test module: on 2 shared cores a second intra-op thread only adds
    contention for tiny networks, and subprocess workers that run one thread reduce alike."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory):
    """Tiny SD 2.1-like components saved in the diffusers layout (NeuroPictor's frozen base)."""
    from brainrecon.testing.tiny import save_tiny_sd21_folder

    return str(save_tiny_sd21_folder(tmp_path_factory.mktemp("tiny-sd"), seed=0))

