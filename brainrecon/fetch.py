"""Fetch the weight files on request: resumable, verified, atomic, optionally from a mirror.

Nothing here runs unless asked (``brainrecon weights --download`` / ``--from`` /
``--print-urls``); every other command only *finds* weights (see
:mod:`brainrecon.eval.weights` and :func:`brainrecon.hub.downloads_allowed`).

The metric files come from :data:`brainrecon.eval.weights.WEIGHT_FILES`; the optional
generation weights (``--with ipadapter,sd15,sd21,versatile-diffusion,clip-vit-l,realistic-vision,sd-vae-ft-mse``)
and WeADL's published model (``--with weadl``) are Hugging Face repositories listed
in :data:`EXTRA_REPOS`. A download goes to ``<dest>.part``, continues with an HTTP Range
request after an interruption, is checked (SHA-256 prefix where the publisher gives one,
as in torchvision's file names; otherwise the size the server announced) and only then
renamed onto its final name.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from brainrecon.errors import BrainreconError
from brainrecon.progress import bar_disabled

__all__ = ["EXTRA_REPOS", "FetchItem", "download", "fetch_all", "import_from", "plan", "print_urls"]

_CHUNK = 1 << 16
_TIMEOUT_S = 30

#: Optional generation weights: repo id, local folder name, files inside the repo.
EXTRA_REPOS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "ipadapter": ("h94/IP-Adapter", "ip-adapter", (
        "models/ip-adapter-plus_sd15.safetensors", "models/image_encoder/config.json",
        "models/image_encoder/model.safetensors")),
    "sd15": ("stable-diffusion-v1-5/stable-diffusion-v1-5", "sd15", (
        "model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
        "vae/config.json", "vae/diffusion_pytorch_model.safetensors", "scheduler/scheduler_config.json",
        "text_encoder/config.json", "text_encoder/model.safetensors", "tokenizer/merges.txt",
        "tokenizer/special_tokens_map.json", "tokenizer/tokenizer_config.json", "tokenizer/vocab.json")),
    "sd21": ("stabilityai/stable-diffusion-2-1-base", "sd21", (
        "model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
        "vae/config.json", "vae/diffusion_pytorch_model.safetensors", "scheduler/scheduler_config.json",
        "text_encoder/config.json", "text_encoder/model.safetensors", "tokenizer/merges.txt",
        "tokenizer/special_tokens_map.json", "tokenizer/tokenizer_config.json", "tokenizer/vocab.json")),
    # BrainGuard's generator (MindBridge's reconstruction): the parts the dual-guided UNet needs.
    "versatile-diffusion": ("shi-labs/versatile-diffusion", "versatile-diffusion", (
        "model_index.json", "image_unet/config.json", "image_unet/diffusion_pytorch_model.bin",
        "text_unet/config.json", "text_unet/diffusion_pytorch_model.bin", "vae/config.json",
        "vae/diffusion_pytorch_model.bin", "scheduler/scheduler_config.json")),
    # The clip target space's encoder (BrainGuard / MindBridge Clipper).
    "clip-vit-l": ("openai/clip-vit-large-patch14", "clip-vit-large-patch14", (
        "config.json", "model.safetensors", "vocab.json", "merges.txt", "tokenizer_config.json",
        "special_tokens_map.json")),
    # WeADL's generator (reconstruct --recipe weadl): Realistic Vision V4.0 and the ft-MSE VAE.
    "realistic-vision": ("SG161222/Realistic_Vision_V4.0_noVAE", "realistic-vision-v4", (
        "model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.bin",
        "scheduler/scheduler_config.json", "text_encoder/config.json", "text_encoder/pytorch_model.bin",
        "tokenizer/merges.txt", "tokenizer/special_tokens_map.json", "tokenizer/tokenizer_config.json",
        "tokenizer/vocab.json")),
    "sd-vae-ft-mse": ("stabilityai/sd-vae-ft-mse", "sd-vae-ft-mse", (
        "config.json", "diffusion_pytorch_model.safetensors")),
    # WeADL's deployed model (brainrecon import brainguard --negative-tokens ...).
    "weadl": ("ig16/visual-brain-decoding-1", "weadl", ("model.pth", "unconditional_embeddings.pt")),
}


@dataclass(frozen=True)
class FetchItem:
    """One file to fetch.

    Attributes
    ----------
    name : str
        File name as published (for Hugging Face files: ``<repo>/<path in repo>``).
    url : str
        Where to download it from (already pointing at the mirror, if one is used).
    dest : Path
        Final location, where the evaluation harness / generators look for it.
    sha256_prefix : str or None
        Leading hex digits of the expected SHA-256, when the publisher gives them.
    mirror_name : str
        Path of the file below a mirror's base URL (and inside a ``--from`` folder).
    """

    name: str
    url: str
    dest: Path
    sha256_prefix: str | None = None
    mirror_name: str = ""


def _hf_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def _split(names) -> list[str]:
    if names is None:
        return []
    if isinstance(names, str):
        names = names.split(",")
    return [n.strip() for n in names if n and n.strip()]


def plan(to=None, only=None, with_=None, mirror=None) -> list[FetchItem]:
    """The files to fetch and where each goes.

    Parameters
    ----------
    to : path-like, optional
        Target folder. Default: ``$BRAINRECON_WEIGHTS``, else the torch hub checkpoints
        folder (metric files) and the Hugging Face cache (CLIP and ``--with`` repos).
    only : str or list of str, optional
        Metric names (``CLIP``, ``SwAV``, ``AlexNet(2)``...) or file keys (``alexnet``);
        default every metric file.
    with_ : str or list of str, optional
        Extra repositories from :data:`EXTRA_REPOS` (``ipadapter``, ``sd15``, ``sd21``,
        ``versatile-diffusion``, ``clip-vit-l``, ``realistic-vision``, ``sd-vae-ft-mse``, ``weadl``).
    mirror : str, optional
        Base URL of a mirror holding the same file names; default ``$BRAINRECON_MIRROR``.

    Returns
    -------
    list of FetchItem

    Raises
    ------
    BrainreconError
        For an unknown ``only`` or ``with_`` name.
    """
    from brainrecon.eval.weights import CLIP_REPO_ID, WEIGHT_FILES, download_destination
    from brainrecon.hub import hf_cache_snapshot

    mirror = (mirror or os.environ.get("BRAINRECON_MIRROR") or "").rstrip("/") or None
    if to is None and os.environ.get("BRAINRECON_WEIGHTS"):
        to = os.environ["BRAINRECON_WEIGHTS"]
    to = Path(to).expanduser() if to is not None else None

    wanted = _split(only)
    files = list(WEIGHT_FILES.values())
    if wanted:
        low = {w.lower() for w in wanted}
        files = [wf for wf in files if wf.key.lower() in low or any(m.lower() in low for m in wf.metrics)
                 or any(m.lower().split("(")[0] in low for m in wf.metrics)]
        known = {wf.key.lower() for wf in WEIGHT_FILES.values()} | {
            m.lower() for wf in WEIGHT_FILES.values() for m in wf.metrics} | {
            m.lower().split("(")[0] for wf in WEIGHT_FILES.values() for m in wf.metrics}
        unknown = sorted(low - known)
        if unknown:
            raise BrainreconError(
                f"--only: unknown weights {', '.join(unknown)}. To fix: use metric names or keys from "
                f"`brainrecon weights` ({', '.join(WEIGHT_FILES)}).")

    def url_for(default_url: str, mirror_name: str) -> str:
        return f"{mirror}/{mirror_name}" if mirror else default_url

    items: list[FetchItem] = []
    for wf in files:
        dest = download_destination(wf, to)  # eval.weights decides where a metric file goes
        if wf.source == "huggingface":
            for f in ("config.json", wf.filename):
                mname = f"{CLIP_REPO_ID}/{f}"
                items.append(FetchItem(mname, url_for(f"{_hf_endpoint()}/{CLIP_REPO_ID}/resolve/main/{f}", mname),
                                       dest.parent / f, None, mname))
        else:
            items.append(FetchItem(wf.filename, url_for(wf.url, wf.filename), dest, wf.sha256_prefix, wf.filename))
    for extra in _split(with_):
        if extra not in EXTRA_REPOS:
            raise BrainreconError(f"--with: unknown repository set {extra!r}. To fix: choose from "
                                  f"{', '.join(EXTRA_REPOS)}.")
        repo, local, paths = EXTRA_REPOS[extra]
        folder = to / local if to is not None else hf_cache_snapshot(repo)
        for p in paths:
            mname = f"{repo}/{p}"
            items.append(FetchItem(mname, url_for(f"{_hf_endpoint()}/{repo}/resolve/main/{p}", mname),
                                   folder / p, None, mname))
    return items


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _verify(item: FetchItem, path: Path, expected_size: int | None) -> None:
    size = path.stat().st_size
    if expected_size is not None and size != expected_size:
        raise BrainreconError(f"{item.name}: got {size} bytes, the server announced {expected_size}; "
                              f"the file was removed. To fix: run the command again.")
    if item.sha256_prefix is not None:
        digest = _sha256(path)
        if not digest.startswith(item.sha256_prefix):
            raise BrainreconError(
                f"{item.name} is corrupted or not the published file: SHA-256 starts with {digest[:8]}, "
                f"expected {item.sha256_prefix}; it was not installed. To fix: fetch it again from the "
                f"publisher ({item.url}).")


def _unreachable(url: str, exc: BaseException) -> BrainreconError:
    host = urlparse(url).hostname or url
    reason = getattr(exc, "reason", exc)
    return BrainreconError(f"cannot reach {host} ({reason}). To fix: connect to the network, use --mirror URL, "
                           f"or fetch the files elsewhere (`brainrecon weights --print-urls`) and import them "
                           f"with --from DIR.")


def download(item: FetchItem, *, progress: bool = True, retries: int = 3, timeout: float = _TIMEOUT_S) -> Path:
    """Download one file into ``item.dest``: resumable, verified, atomic.

    Bytes go to ``<dest>.part``; after a cut connection the download continues from the
    bytes already there (HTTP Range), up to ``retries`` times, and also on the next call.
    The finished file is verified before it is renamed onto ``dest``.

    Returns
    -------
    Path
        ``item.dest``.

    Raises
    ------
    BrainreconError
        Host unreachable (one line naming the host), HTTP error, or failed verification
        (the partial file is then removed).
    """
    from tqdm.auto import tqdm

    dest = Path(item.dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    total: int | None = None
    attempt = 0
    while True:
        offset = part.stat().st_size if part.exists() else 0
        req = urllib.request.Request(item.url, headers={"User-Agent": "brainrecon"})
        if offset:
            req.add_header("Range", f"bytes={offset}-")
        try:
            resp = urllib.request.urlopen(req, timeout=timeout)  # noqa: S310 - http(s) URLs from plan()
        except urllib.error.HTTPError as exc:
            if exc.code == 416 and offset:  # already complete
                break
            raise BrainreconError(f"{item.name}: {item.url} answered HTTP {exc.code} {exc.reason}. To fix: check "
                                  f"the URL or the mirror's file names.") from exc
        except (urllib.error.URLError, OSError) as exc:
            if attempt < retries and offset:
                attempt += 1
                continue
            raise _unreachable(item.url, exc) from exc
        with resp:
            if resp.status == 206:
                crange = resp.headers.get("Content-Range", "")
                if "/" in crange and crange.rsplit("/", 1)[1].strip().isdigit():
                    total = int(crange.rsplit("/", 1)[1])
                mode = "ab"
            else:  # 200: server ignored the range, start over
                offset = 0
                length = resp.headers.get("Content-Length")
                total = int(length) if length and length.isdigit() else None
                mode = "wb"
            try:
                with open(part, mode) as f, tqdm(total=total, initial=offset, unit="B", unit_scale=True,
                                                 desc=dest.name, disable=bar_disabled(progress), leave=False) as bar:
                    while True:
                        chunk = resp.read(_CHUNK)
                        if not chunk:
                            break
                        f.write(chunk)
                        bar.update(len(chunk))
                    f.flush()
                    os.fsync(f.fileno())
            except (OSError, urllib.error.URLError, ConnectionError) as exc:
                if attempt < retries:
                    attempt += 1
                    continue
                raise BrainreconError(f"{item.name}: the connection to {urlparse(item.url).hostname} broke "
                                      f"({exc}); {part} is kept. To fix: run the command again to resume.") from exc
        if total is not None and part.stat().st_size < total and attempt < retries:
            attempt += 1  # the server closed early without an error: resume
            continue
        break
    try:
        _verify(item, part, total)
    except BrainreconError:
        part.unlink(missing_ok=True)
        raise
    os.replace(part, dest)
    return dest


def _mark_hf_refs(dest: Path) -> None:
    """A file placed in a hub-cache snapshot ``main`` gets ``refs/main`` so the cache resolves it."""
    parts = dest.parts
    if "snapshots" in parts:
        i = parts.index("snapshots")
        repo_dir = Path(*parts[:i])
        ref = repo_dir / "refs" / "main"
        if not ref.exists():
            ref.parent.mkdir(parents=True, exist_ok=True)
            tmp = ref.with_name("main.tmp")
            tmp.write_text(parts[i + 1])
            os.replace(tmp, ref)


def fetch_all(items: list[FetchItem], *, progress: bool = True, log=print) -> list[Path]:
    """Download every item whose destination is missing; returns the paths fetched."""
    fetched = []
    for item in items:
        if item.dest.is_file():
            log(f"present  {item.name}  {item.dest}")
            continue
        path = download(item, progress=progress)
        _mark_hf_refs(path)
        log(f"fetched  {item.name}  -> {path} ({path.stat().st_size} bytes)")
        fetched.append(path)
    return fetched


def import_from(items: list[FetchItem], source, *, log=print) -> list[Path]:
    """Copy files fetched elsewhere from ``source`` into their places, verifying them.

    A file is looked for in ``source`` under its mirror path (``openai/clip-vit-large-patch14/config.json``,
    as ``--print-urls --format sh`` writes it; a single metric file also directly under its name). Files with a published SHA-256 prefix are checked first.

    Raises
    ------
    BrainreconError
        If ``source`` is not a folder, or a file fails verification.
    """
    source = Path(source).expanduser()
    if not source.is_dir():
        raise BrainreconError(f"--from {source}: not a folder. To fix: pass the folder holding the fetched files.")
    done = []
    for item in items:
        cands = [source / item.mirror_name]
        if "/" not in item.mirror_name:  # repo files keep their folders: unet/config.json ≠ vae/config.json
            cands.append(source / Path(item.mirror_name).name)
        src = next((c for c in cands if c.is_file()), None)
        if src is None:
            log(f"missing  {item.name}  (not in {source})")
            continue
        _verify(item, src, None)
        item.dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = item.dest.with_name(item.dest.name + ".part")
        shutil.copyfile(src, tmp)
        os.replace(tmp, item.dest)
        _mark_hf_refs(item.dest)
        log(f"imported {item.name}  -> {item.dest}")
        done.append(item.dest)
    return done


def print_urls(items: list[FetchItem], fmt: str = "list") -> str:
    """The downloads as a plain list of URLs or as a shell script (``fmt="sh"``) using curl."""
    if fmt == "list":
        return "\n".join(i.url for i in items) + "\n"
    if fmt != "sh":
        raise BrainreconError(f"--format {fmt!r}: unknown. To fix: use list or sh.")
    lines = ["#!/bin/sh", "# fetch brainrecon weights; then: brainrecon weights --from <this folder>", "set -e"]
    for i in items:
        d = os.path.dirname(i.mirror_name)
        if d:
            lines.append(f"mkdir -p '{d}'")
        lines.append(f"curl -fL -C - -o '{i.mirror_name}' '{i.url}'")
    return "\n".join(lines) + "\n"
