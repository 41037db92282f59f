"""Shared test set-up: no network, private data and cache locations, small threads."""

from __future__ import annotations

import socket

import pytest
import torch

torch.set_num_threads(2)


class NetworkBlocked(RuntimeError):
    pass


def _blocked(*args, **kwargs):
    raise NetworkBlocked(
        "A test tried to open a network connection. brainrecon tests are offline: build tiny "
        "models locally and load them from tmp_path instead of downloading."
    )


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    """Any socket connection or DNS lookup in a test fails loudly."""
    monkeypatch.setattr(socket.socket, "connect", _blocked)
    monkeypatch.setattr(socket.socket, "connect_ex", _blocked)
    monkeypatch.setattr(socket, "create_connection", _blocked)
    monkeypatch.setattr(socket, "getaddrinfo", _blocked)


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


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory):
    """Tiny random IP-Adapter, image encoder and SD 1.5-style pipeline folders (built once)."""
    from test_ipadapter import build_tiny_weights

    return build_tiny_weights(tmp_path_factory.mktemp("tiny_weights"))
