"""Where the feature networks' weights live, how they are found, and how they are fetched.

Every weight file the eight metrics need is listed once in :data:`WEIGHT_FILES` with
its exact file name, its source URL and the metrics that use it. A file is looked
for, in this order:

1. the ``weights_dir`` argument (``--weights-dir`` on the command line);
2. the directory in the ``BRAINRECON_WEIGHTS`` environment variable;
3. the ecosystem's own cache: torch hub's ``$TORCH_HOME/hub/checkpoints/<file>`` for
   torchvision and SwAV files, the Hugging Face hub cache for CLIP.

In a weights directory a torchvision file sits under its own name
(``alexnet-owt-7be5be79.pth``) and CLIP is a folder ``clip-vit-large-patch14/``
holding ``config.json`` and ``model.safetensors`` (as ``save_pretrained`` writes it).

When a file is missing and downloads are allowed it is fetched by the normal
mechanism (``torch.hub.download_url_to_file`` into the torch hub cache, with the
SHA-256 prefix in the file name checked; ``from_pretrained`` for CLIP). Downloads
are opt-in: only with ``BRAINRECON_ALLOW_DOWNLOADS=1`` (``evaluate --download``) or
through ``brainrecon weights --download`` (:mod:`brainrecon.fetch`).
"""

from __future__ import annotations

import hashlib
import os
import socket
from dataclasses import dataclass
from pathlib import Path

from brainrecon.errors import WeightsNotFoundError
from brainrecon.hub import downloads_allowed, hf_cache_snapshot
from brainrecon.hub import hf_hub_cache as _hf_hub_cache

__all__ = [
    "CLIP_LOCAL_DIRNAME",
    "CLIP_REPO_ID",
    "OPENAI_CLIP_FILENAME",
    "WEIGHT_FILES",
    "WeightFile",
    "downloads_allowed",
    "download_destination",
    "file_digest",
    "find_weights",
    "missing_weights",
    "resolve_weights",
    "search_places",
    "weight_file_for",
    "weights_status",
]

CLIP_REPO_ID = "openai/clip-vit-large-patch14"
CLIP_LOCAL_DIRNAME = "clip-vit-large-patch14"
# OpenAI's own CLIP file, as `clip.load("ViT-L/14")` keeps it in ~/.cache/clip (every reference
# evaluation used it); accepted for the CLIP metric beside the Hugging Face folder.
OPENAI_CLIP_FILENAME = "ViT-L-14.pt"
_TORCHVISION_BASE = "https://download.pytorch.org/models/"
_DOWNLOAD_TIMEOUT_S = 30


@dataclass(frozen=True)
class WeightFile:
    """One weight file the metrics need.

    Attributes
    ----------
    key : str
        Short name used in code (``"alexnet"``, ``"effnet_v2"``, ``"clip"``...).
    metrics : tuple of str
        Metric names whose score depends on this file.
    filename : str
        Exact file name (for CLIP: the weights file inside the Hugging Face repo).
    url : str
        Where to get it.
    source : {"torchvision", "swav", "huggingface"}
        Which cache it lives in.
    sha256_prefix : str or None
        Leading hex digits of the file's SHA-256 (torch hub's naming convention).
    note : str
        Which variant uses it.
    """

    key: str
    metrics: tuple[str, ...]
    filename: str
    url: str
    source: str
    sha256_prefix: str | None = None
    note: str = ""


WEIGHT_FILES: dict[str, WeightFile] = {
    w.key: w
    for w in (
        WeightFile(
            "alexnet", ("AlexNet(2)", "AlexNet(5)"), "alexnet-owt-7be5be79.pth",
            _TORCHVISION_BASE + "alexnet-owt-7be5be79.pth", "torchvision", "7be5be79",
            "torchvision AlexNet_Weights.IMAGENET1K_V1",
        ),
        WeightFile(
            "inception", ("Inception",), "inception_v3_google-0cc3c7bd.pth",
            _TORCHVISION_BASE + "inception_v3_google-0cc3c7bd.pth", "torchvision", "0cc3c7bd",
            "torchvision Inception_V3_Weights.IMAGENET1K_V1",
        ),
        WeightFile(
            "clip", ("CLIP",), "model.safetensors",
            f"https://huggingface.co/{CLIP_REPO_ID}", "huggingface", None,
            f"Hugging Face {CLIP_REPO_ID} (config.json + model.safetensors)",
        ),
        WeightFile(
            "effnet_v2", ("EffNet-B",), "efficientnet_b1-c27df63c.pth",
            _TORCHVISION_BASE + "efficientnet_b1-c27df63c.pth", "torchvision", "c27df63c",
            "EfficientNet_B1_Weights.IMAGENET1K_V2 (variant mindeye)",
        ),
        WeightFile(
            "effnet_v1", ("EffNet-B",), "efficientnet_b1_rwightman-bac287d4.pth",
            _TORCHVISION_BASE + "efficientnet_b1_rwightman-bac287d4.pth", "torchvision", "bac287d4",
            "EfficientNet_B1_Weights.IMAGENET1K_V1 (variant braindiffuser)",
        ),
        WeightFile(
            "swav", ("SwAV",), "swav_800ep_pretrain.pth.tar",
            "https://dl.fbaipublicfiles.com/deepcluster/swav_800ep_pretrain.pth.tar", "swav", None,
            "SwAV ResNet-50, 800 epochs (facebookresearch/swav)",
        ),
    )
}


def _openai_clip_cache() -> Path:
    return Path("~/.cache/clip").expanduser()


def _torch_hub_checkpoints() -> Path:
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints"


def _user_dirs(weights_dir) -> list[Path]:
    dirs = []
    if weights_dir is not None:
        dirs.append(Path(weights_dir).expanduser())
    if os.environ.get("BRAINRECON_WEIGHTS"):
        dirs.append(Path(os.environ["BRAINRECON_WEIGHTS"]).expanduser())
    return dirs


def search_places(wf: WeightFile, weights_dir=None) -> list[Path]:
    """Every path where ``wf`` is looked for, in order.

    Parameters
    ----------
    wf : WeightFile
    weights_dir : path-like, optional

    Returns
    -------
    list of Path
        For CLIP the paths are directories (a local folder, then the hub cache's
        ``models--openai--clip-vit-large-patch14``).
    """
    if wf.source == "huggingface":
        places = []
        for d in _user_dirs(weights_dir):
            places += [d / CLIP_LOCAL_DIRNAME, d / OPENAI_CLIP_FILENAME]
        places.append(_hf_hub_cache() / ("models--" + CLIP_REPO_ID.replace("/", "--")))
        places.append(_openai_clip_cache() / OPENAI_CLIP_FILENAME)
        return places
    return [d / wf.filename for d in _user_dirs(weights_dir)] + [_torch_hub_checkpoints() / wf.filename]


def _hf_snapshot_with_weights(repo_dir: Path, revision: str = "main") -> Path | None:
    """The snapshot of a hub-cache repo that ``refs/<revision>`` points at, as the hub resolves
    it, when it has config.json and a weights file; None otherwise (an unpinned snapshot left by
    another revision is never picked instead)."""
    ref = repo_dir / "refs" / revision
    if not ref.is_file():
        return None
    snap = repo_dir / "snapshots" / ref.read_text(encoding="utf-8").strip()
    if (snap / "config.json").is_file() and any(
        (snap / f).is_file() for f in ("model.safetensors", "pytorch_model.bin")
    ):
        return snap
    return None


def find_weights(wf: WeightFile, weights_dir=None) -> Path | None:
    """The first place where ``wf`` is present, or None.

    Parameters
    ----------
    wf : WeightFile
    weights_dir : path-like, optional

    Returns
    -------
    Path or None
        A file for torchvision / SwAV weights, a ``from_pretrained``-loadable folder
        for CLIP.
    """
    for place in search_places(wf, weights_dir):
        if wf.source == "huggingface":
            if place.name == OPENAI_CLIP_FILENAME:
                if place.is_file():
                    return place
            elif place.name.startswith("models--"):
                snap = _hf_snapshot_with_weights(place)
                if snap is not None:
                    return snap
            elif (place / "config.json").is_file() and any(
                (place / f).is_file() for f in ("model.safetensors", "pytorch_model.bin")
            ):
                return place
        elif place.is_file():
            return place
    return None


_digests: dict[tuple[str, int, int, int], str] = {}
_DIGEST_INDEX = "digests.json"


def _digest_index_path() -> Path:
    if os.environ.get("BRAINRECON_CACHE"):
        return Path(os.environ["BRAINRECON_CACHE"]).expanduser() / "eval" / _DIGEST_INDEX
    return Path("~/.cache/brainrecon/eval").expanduser() / _DIGEST_INDEX


def _read_digest_index() -> dict:
    import json

    try:
        data = json.loads(_digest_index_path().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}  # absent or damaged: digests are recomputed, never trusted
    return data if isinstance(data, dict) else {}


def file_digest(path) -> str:
    """SHA-256 (hex) of a weight file's content.

    Memoised per file identity (resolved path, size, modification time, inode) in this
    process and in ``digests.json`` of the evaluation cache, so a 1.7 GB CLIP file is read
    once, not at every evaluation; any change to the file changes its identity.
    """
    path = Path(path).resolve()
    st = path.stat()
    ident = (str(path), st.st_size, st.st_mtime_ns, st.st_ino)
    if ident in _digests:
        return _digests[ident]
    key = "|".join(map(str, ident))
    index = _read_digest_index()
    digest = index.get(key)
    if not (isinstance(digest, str) and len(digest) == 64):
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
        digest = h.hexdigest()
        index[key] = digest
        try:
            from brainrecon.io import write_json_atomic

            write_json_atomic(_digest_index_path(), index)
        except OSError:
            pass  # a read-only cache only costs a re-hash next time
    _digests[ident] = digest
    return digest


def _check_hash(wf: WeightFile, path: Path) -> None:
    """Compare a local file with the SHA-256 prefix in its name (torch hub's convention)."""
    if wf.sha256_prefix is None:
        return
    digest = file_digest(path)
    if not digest.startswith(wf.sha256_prefix):
        raise WeightsNotFoundError(
            f"{path} does not match the expected weights: its SHA-256 starts with {digest[:8]}, "
            f"expected {wf.sha256_prefix}. Download it again from {wf.url}."
        )


def _missing_error(wf: WeightFile, weights_dir, reason: str) -> WeightsNotFoundError:
    """The error for weights found nowhere: every place searched and how to get them."""
    places = "; ".join(str(p) for p in search_places(wf, weights_dir))
    if wf.source == "huggingface":
        how = (
            f"download the Hugging Face repo {CLIP_REPO_ID} ({wf.url}; config.json and model.safetensors) "
            f"into <weights-dir>/{CLIP_LOCAL_DIRNAME}/ or the Hugging Face cache (OpenAI's {OPENAI_CLIP_FILENAME} "
            f"in <weights-dir>/ or ~/.cache/clip/ works too)"
        )
        name = f"{CLIP_REPO_ID} ({wf.filename})"
    else:
        how = f"download {wf.url} into <weights-dir>/ or {_torch_hub_checkpoints()}/"
        name = wf.filename
    return WeightsNotFoundError(f"weights {name} not found ({reason}). Searched: {places}. To fix: run "
                                f"`brainrecon weights --download --only {wf.key}`, or {how}, or pass the folder "
                                f"holding them as weights_dir.", parameters=("weights_dir",))


_reachable_hosts: dict[str, str | None] = {}


def _unreachable_reason(url: str) -> str | None:
    """None if the URL's host accepts a connection within a few seconds, else why not.

    Probed once per host and process, so that an offline machine learns it in one
    short DNS failure instead of every library's own retry-and-back-off loop.
    """
    from urllib.parse import urlparse

    host = urlparse(url).hostname or ""
    if host not in _reachable_hosts:
        try:
            socket.create_connection((host, 443), timeout=5).close()
            _reachable_hosts[host] = None
        except Exception as exc:  # noqa: BLE001 - DNS, refused, timeout, blocked sockets alike
            _reachable_hosts[host] = f"cannot reach {host}: {exc}"
    return _reachable_hosts[host]


def _download_torch_file(wf: WeightFile) -> Path:
    import torch

    dest = _torch_hub_checkpoints() / wf.filename
    dest.parent.mkdir(parents=True, exist_ok=True)
    old = socket.getdefaulttimeout()
    # torch.hub's urlopen has no timeout of its own; without one a firewalled host hangs.
    socket.setdefaulttimeout(_DOWNLOAD_TIMEOUT_S)
    try:
        torch.hub.download_url_to_file(wf.url, str(dest), hash_prefix=wf.sha256_prefix, progress=True)
    finally:
        socket.setdefaulttimeout(old)
    return dest


def resolve_weights(wf: WeightFile | str, weights_dir=None, allow_download: bool | None = None) -> Path | str:
    """Find ``wf`` locally, else download it when allowed, else raise.

    Parameters
    ----------
    wf : WeightFile or str
        A :class:`WeightFile` or its key in :data:`WEIGHT_FILES`.
    weights_dir : path-like, optional
        Searched first.
    allow_download : bool, optional
        Default: :func:`downloads_allowed`.

    Returns
    -------
    Path or str
        A local file (torchvision, SwAV), a local folder (CLIP), or, for CLIP when a
        download is allowed and nothing is local, the repo id for ``from_pretrained``.

    Raises
    ------
    WeightsNotFoundError
        Naming the exact file, every place searched and where to download it.
    """
    if isinstance(wf, str):
        wf = WEIGHT_FILES[wf]
    path = find_weights(wf, weights_dir)
    if path is not None:
        if wf.source != "huggingface":
            _check_hash(wf, path)
        return path
    if allow_download is None:
        allow_download = downloads_allowed()
    if not allow_download:
        raise _missing_error(wf, weights_dir, "offline: downloads are disabled")
    unreachable = _unreachable_reason(wf.url)
    if unreachable:
        raise _missing_error(wf, weights_dir, f"download failed, {unreachable}")
    if wf.source == "huggingface":
        return CLIP_REPO_ID  # from_pretrained downloads it into the hub cache
    try:
        return _download_torch_file(wf)
    except Exception as exc:  # noqa: BLE001 - any network failure becomes one actionable message
        raise _missing_error(wf, weights_dir, f"download failed: {exc}") from exc


def weight_file_for(metric: str, variant: str = "mindeye") -> WeightFile | None:
    """The weight file ``metric`` needs in ``variant`` (None for PixCorr and SSIM, which need none).

    Only EfficientNet-B1 differs between variants: ImageNet V2 weights for MindEye, V1 for
    Brain-Diffuser.
    """
    if metric == "EffNet-B":
        return WEIGHT_FILES["effnet_v2" if variant == "mindeye" else "effnet_v1"]
    return next((wf for wf in WEIGHT_FILES.values() if metric in wf.metrics), None)


def missing_weights(metrics, variant: str = "mindeye", weights_dir=None) -> dict[str, WeightFile]:
    """Metric -> its weight file, for each of ``metrics`` whose file is not on this machine
    (searched as :func:`find_weights` does; nothing is downloaded or loaded)."""
    out = {}
    for m in metrics:
        wf = weight_file_for(m, variant)
        if wf is not None and find_weights(wf, weights_dir) is None:
            out[m] = wf
    return out


def download_destination(wf: WeightFile, to=None) -> Path:
    """Where ``brainrecon weights --download`` puts ``wf``: ``to``, else ``$BRAINRECON_WEIGHTS``,
    else the torch hub cache (CLIP: the Hugging Face cache); :func:`brainrecon.fetch.plan`
    fetches into it. In a folder, CLIP goes into its own ``clip-vit-large-patch14/``."""
    if to is None and os.environ.get("BRAINRECON_WEIGHTS"):
        to = os.environ["BRAINRECON_WEIGHTS"]
    to = Path(to).expanduser() if to is not None else None
    if wf.source == "huggingface":
        folder = to / CLIP_LOCAL_DIRNAME if to is not None else hf_cache_snapshot(CLIP_REPO_ID)
    else:
        folder = to if to is not None else _torch_hub_checkpoints()
    return folder / wf.filename


def weights_status(weights_dir=None) -> list[dict]:
    """One row per weight file: which metrics use it and whether it is present.

    Parameters
    ----------
    weights_dir : path-like, optional

    Returns
    -------
    list of dict
        Keys ``metrics`` (str), ``file``, ``status`` (``"present"`` / ``"missing"``),
        ``path`` (where found, else where ``brainrecon weights --download`` puts it: the same
        file name as ``file``), ``url``, ``note``.
    """
    rows = []
    for wf in WEIGHT_FILES.values():
        found = find_weights(wf, weights_dir)
        name = f"{CLIP_REPO_ID}/{wf.filename}" if wf.source == "huggingface" else wf.filename
        if found is not None and found.name == OPENAI_CLIP_FILENAME:
            name = f"{OPENAI_CLIP_FILENAME} (OpenAI's CLIP ViT-L/14)"  # what was found, not the hub file
        rows.append(
            {
                "metrics": ", ".join(wf.metrics),
                "file": name,
                "status": "present" if found is not None else "missing",
                "path": str(found if found is not None else download_destination(wf, weights_dir)),
                "url": wf.url,
                "note": wf.note,
            }
        )
    return rows
