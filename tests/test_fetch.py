"""brainrecon.fetch against a real HTTP server on 127.0.0.1 (Range support, a cut connection once)."""

from __future__ import annotations

import hashlib
import http.server
import socket
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from brainrecon.errors import BrainreconError
from brainrecon.eval import weights as W
from brainrecon.fetch import FetchItem, download, fetch_all, import_from, plan, print_urls


class _Server:
    """Serves ``files`` (url path -> bytes) with Range support; paths in ``cut_once`` are cut mid-file once."""

    def __init__(self, files: dict[str, bytes]):
        self.files = files
        self.cut_once: set[str] = set()
        self.requests: list[tuple[str, str | None]] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                rng = self.headers.get("Range")
                outer.requests.append((self.path, rng))
                data = outer.files.get(self.path)
                if data is None:
                    self.send_error(404)
                    return
                start = 0
                if rng:
                    start = int(rng.split("=")[1].split("-")[0])
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.path in outer.cut_once:
                    outer.cut_once.discard(self.path)
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self.wfile.write(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


def _tiny_checkpoint(tmp_path: Path, seed: int, n: int = 8) -> bytes:
    """A random-weight state dict saved in torch's format (a stand-in for a torchvision file)."""
    g = torch.Generator().manual_seed(seed)
    path = tmp_path / f"ckpt{seed}.pth"
    torch.save({"features.0.weight": torch.randn(n, 3, 3, 3, generator=g), "fc.bias": torch.randn(4, generator=g)},
               path)
    return path.read_bytes()


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def test_download_resumes_after_cut_connection_and_verifies(tmp_path, allow_loopback):
    data = _tiny_checkpoint(tmp_path, 0, n=3000)  # ~320 kB
    with _Server({"/alexnet-test.pth": data}) as srv:
        srv.cut_once.add("/alexnet-test.pth")
        item = FetchItem("alexnet-test.pth", srv.url + "/alexnet-test.pth", tmp_path / "w" / "alexnet-test.pth",
                         _sha(data)[:8], "alexnet-test.pth")
        path = download(item, progress=False)
    assert path.read_bytes() == data
    assert not (tmp_path / "w" / "alexnet-test.pth.part").exists()
    ranges = [r for _, r in srv.requests]
    assert ranges[0] is None and ranges[1] is not None and ranges[1].startswith("bytes=")
    assert int(ranges[1].split("=")[1].rstrip("-")) > 0
    torch.load(path, weights_only=True)  # the resumed file is a valid checkpoint


def test_resume_from_part_file_left_by_an_earlier_run(tmp_path, allow_loopback):
    data = np.random.default_rng(1).bytes(100_000)
    dest = tmp_path / "swav_800ep_pretrain.pth.tar"
    dest.with_name(dest.name + ".part").write_bytes(data[:40_000])
    with _Server({"/swav_800ep_pretrain.pth.tar": data}) as srv:
        item = FetchItem(dest.name, srv.url + "/" + dest.name, dest, None, dest.name)
        download(item, progress=False)
    assert dest.read_bytes() == data
    assert srv.requests == [("/swav_800ep_pretrain.pth.tar", "bytes=40000-")]


def test_corrupted_file_is_refused_and_not_installed(tmp_path, allow_loopback):
    # Random bytes under torchvision's real name: its SHA-256 cannot start with the name's prefix.
    wf = W.WEIGHT_FILES["alexnet"]
    data = _tiny_checkpoint(tmp_path, 1)
    with _Server({"/" + wf.filename: data}) as srv:
        items = plan(to=tmp_path / "w", only="AlexNet(2)", mirror=srv.url)
        assert [i.name for i in items] == [wf.filename]
        with pytest.raises(BrainreconError, match=r"corrupted.*expected 7be5be79"):
            fetch_all(items, progress=False, log=lambda s: None)
    assert not (tmp_path / "w" / wf.filename).exists()
    assert not (tmp_path / "w" / (wf.filename + ".part")).exists()


def test_mirror_fetches_real_names_into_the_place_the_harness_looks(tmp_path, allow_loopback, monkeypatch):
    swav = _tiny_checkpoint(tmp_path, 2)
    cfg = b'{"model_type": "clip_vision_model"}'
    st = np.random.default_rng(2).bytes(5000)
    files = {"/swav_800ep_pretrain.pth.tar": swav, f"/{W.CLIP_REPO_ID}/config.json": cfg,
             f"/{W.CLIP_REPO_ID}/model.safetensors": st}
    monkeypatch.setenv("BRAINRECON_MIRROR", "http://127.0.0.1:1")  # overridden by the explicit mirror
    with _Server(files) as srv:
        items = plan(to=tmp_path / "w", only="SwAV,CLIP", mirror=srv.url)
        logs = []
        fetched = fetch_all(items, progress=False, log=logs.append)
        assert len(fetched) == 3
        again = fetch_all(items, progress=False, log=logs.append)  # everything present: no request
        assert again == [] and len(srv.requests) == 3
    assert W.find_weights(W.WEIGHT_FILES["swav"], tmp_path / "w").read_bytes() == swav
    assert W.find_weights(W.WEIGHT_FILES["clip"], tmp_path / "w") == tmp_path / "w" / W.CLIP_LOCAL_DIRNAME
    assert any("fetched" in line and "swav_800ep_pretrain.pth.tar" in line for line in logs)


def test_hf_endpoint_and_cache_layout(tmp_path, allow_loopback, monkeypatch):
    files = {f"/h94/IP-Adapter/resolve/main/{p}": np.random.default_rng(i).bytes(1000 + i)
             for i, p in enumerate(("models/ip-adapter-plus_sd15.safetensors", "models/image_encoder/config.json",
                                    "models/image_encoder/model.safetensors"))}
    with _Server(files) as srv:
        monkeypatch.setenv("HF_ENDPOINT", srv.url)
        monkeypatch.delenv("BRAINRECON_WEIGHTS", raising=False)
        items = plan(only="SwAV", with_="ipadapter")
        fetch_all([i for i in items if i.name.startswith("h94/")], progress=False, log=lambda s: None)
    from brainrecon.hub import hf_hub_cache

    repo = hf_hub_cache() / "models--h94--IP-Adapter"
    assert (repo / "refs" / "main").read_text() == "main"
    assert (repo / "snapshots" / "main" / "models" / "image_encoder" / "config.json").is_file()


def test_unreachable_host_fails_in_one_line_naming_it(tmp_path, allow_loopback):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    items = plan(to=tmp_path, only="SwAV", mirror=f"http://127.0.0.1:{port}")
    with pytest.raises(BrainreconError) as err:
        fetch_all(items, progress=False, log=lambda s: None)
    msg = str(err.value)
    assert msg.startswith("cannot reach 127.0.0.1") and "\n" not in msg


def test_non_loopback_stays_blocked(allow_loopback):
    from conftest import NetworkBlocked

    with pytest.raises(NetworkBlocked):
        socket.create_connection(("10.0.0.1", 80), timeout=1)


def test_print_urls_and_import_from(tmp_path, capsys):
    items = plan(to=tmp_path / "w", only="SwAV,CLIP")
    text = print_urls(items)
    assert "https://dl.fbaipublicfiles.com/deepcluster/swav_800ep_pretrain.pth.tar" in text.splitlines()
    sh = print_urls(items, "sh")
    assert "curl -fL -C - -o 'openai/clip-vit-large-patch14/config.json'" in sh
    src = tmp_path / "fetched"
    (src / W.CLIP_REPO_ID).mkdir(parents=True)
    (src / "swav_800ep_pretrain.pth.tar").write_bytes(b"swav")
    (src / W.CLIP_REPO_ID / "config.json").write_text("{}")
    (src / W.CLIP_REPO_ID / "model.safetensors").write_bytes(b"st")
    done = import_from(items, src, log=lambda s: None)
    assert len(done) == 3
    assert W.find_weights(W.WEIGHT_FILES["clip"], tmp_path / "w") is not None
    # a torchvision file whose hash does not match its name is refused on import
    (src / "alexnet-owt-7be5be79.pth").write_bytes(b"not alexnet")
    with pytest.raises(BrainreconError, match="corrupted"):
        import_from(plan(to=tmp_path / "w", only="alexnet"), src, log=lambda s: None)
    assert not (tmp_path / "w" / "alexnet-owt-7be5be79.pth").exists()


def test_downloads_are_opt_in(monkeypatch):
    from brainrecon.hub import downloads_allowed

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("BRAINRECON_OFFLINE", raising=False)
    monkeypatch.delenv("BRAINRECON_ALLOW_DOWNLOADS", raising=False)
    monkeypatch.delenv("PYTEST_CURRENT_TEST", raising=False)  # as outside tests
    assert not downloads_allowed()
    monkeypatch.setenv("BRAINRECON_ALLOW_DOWNLOADS", "1")
    assert downloads_allowed()


def test_bad_names_are_domain_errors(tmp_path):
    with pytest.raises(BrainreconError, match="--only: unknown weights nope"):
        plan(to=tmp_path, only="nope")
    with pytest.raises(BrainreconError, match="--with: unknown"):
        plan(to=tmp_path, with_="sdxl")


@pytest.mark.slow
def test_demo_makes_no_connection_attempt_on_an_online_machine(tmp_path, monkeypatch):
    """As on a connected laptop (no offline variables, not flagged as a test): every attempt is recorded."""
    from brainrecon import demo

    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "BRAINRECON_OFFLINE", "BRAINRECON_ALLOW_DOWNLOADS",
                "PYTEST_CURRENT_TEST", "BRAINRECON_WEIGHTS"):
        monkeypatch.delenv(var, raising=False)
    attempts = []

    def record(*args, **kwargs):
        attempts.append(args)
        raise OSError("recorded connection attempt")

    monkeypatch.setattr(socket.socket, "connect", lambda self, addr: record(addr))
    monkeypatch.setattr(socket.socket, "connect_ex", lambda self, addr: record(addr))
    monkeypatch.setattr(socket, "create_connection", record)
    monkeypatch.setattr(socket, "getaddrinfo", record)
    monkeypatch.setattr(demo, "DEMO_DECODERS", demo.DEMO_DECODERS[:1])  # ridge: the scoring path is the same
    logs = []
    result = demo.run_demo(tmp_path / "demo", quick=True, log=logs.append)
    assert attempts == []
    assert result["grid"].is_file()
    said = [line for line in logs if "not scored" in line and "brainrecon weights" in line]
    assert len(said) == 1, logs  # once, for all runs (issue 20)


def test_cli_weights_download_print_urls_and_from(tmp_path, allow_loopback):
    from typer.testing import CliRunner

    from brainrecon.cli import app

    runner = CliRunner()
    swav = _tiny_checkpoint(tmp_path, 3)
    with _Server({"/swav_800ep_pretrain.pth.tar": swav}) as srv:
        res = runner.invoke(app, ["weights", "--download", "--only", "SwAV", "--to", str(tmp_path / "w"),
                                  "--mirror", srv.url])
    assert res.exit_code == 0, res.output
    assert "fetched" in res.output and str(tmp_path / "w") in res.output
    assert (tmp_path / "w" / "swav_800ep_pretrain.pth.tar").read_bytes() == swav
    listed = runner.invoke(app, ["weights", "--weights-dir", str(tmp_path / "w")])
    assert "brainrecon weights --download" in listed.output
    urls = runner.invoke(app, ["weights", "--print-urls", "--only", "alexnet"])
    assert urls.output.strip() == W.WEIGHT_FILES["alexnet"].url
    res = runner.invoke(app, ["weights", "--from", str(tmp_path / "w"), "--only", "SwAV", "--to", str(tmp_path / "v")])
    assert res.exit_code == 0 and (tmp_path / "v" / "swav_800ep_pretrain.pth.tar").is_file()


def test_neuropictor_base_model_from_the_hub_is_not_downloaded_unasked(monkeypatch):
    """On an online machine a hub repo id that is not cached fails with no connection attempt."""
    import huggingface_hub.constants

    from brainrecon.decoders.neuropictor import model
    from brainrecon.errors import WeightsNotFoundError

    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "BRAINRECON_ALLOW_DOWNLOADS", "PYTEST_CURRENT_TEST"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    attempts = []

    def record(*args, **kwargs):
        attempts.append(args)
        raise OSError("recorded connection attempt")

    monkeypatch.setattr(socket.socket, "connect", lambda self, addr: record(addr))
    monkeypatch.setattr(socket, "create_connection", record)
    monkeypatch.setattr(socket, "getaddrinfo", record)
    with pytest.raises(WeightsNotFoundError):
        model.load_base_components(model.SD21_BASE)
    assert attempts == []


def test_with_knows_the_published_brainguard_family_files(tmp_path):
    items = plan(to=tmp_path, only="SwAV", with_="versatile-diffusion,realistic-vision,sd-vae-ft-mse,clip-vit-l,weadl")
    names = {i.name for i in items}
    assert {"shi-labs/versatile-diffusion/image_unet/config.json",
            "shi-labs/versatile-diffusion/text_unet/diffusion_pytorch_model.bin",
            "SG161222/Realistic_Vision_V4.0_noVAE/unet/config.json",
            "stabilityai/sd-vae-ft-mse/diffusion_pytorch_model.safetensors",
            "openai/clip-vit-large-patch14/model.safetensors",
            "ig16/visual-brain-decoding-1/model.pth",
            "ig16/visual-brain-decoding-1/unconditional_embeddings.pt"} <= names
    by_name = {i.name: i for i in items}
    assert by_name["ig16/visual-brain-decoding-1/model.pth"].dest == tmp_path / "weadl" / "model.pth"
    assert by_name["shi-labs/versatile-diffusion/vae/config.json"].url.endswith(
        "/shi-labs/versatile-diffusion/resolve/main/vae/config.json")
