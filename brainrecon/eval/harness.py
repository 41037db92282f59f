"""The evaluation harness: the eight NSD metrics for any set of reconstructions.

:func:`evaluate` takes ground-truth and reconstructed images in any common layout
(uint8 or float in [0, 1], HWC or CHW, any size), applies one of two published
preprocessing recipes (MindEye's or Brain-Diffuser's) and returns an :class:`EvalReport`.

``variant="mindeye"`` (default)
    Both sets are first brought to 256 x 256 (bilinear, no antialiasing); PixCorr
    and SSIM are computed after a further bilinear resize to 425; each network gets
    its own bilinear resize (AlexNet 256, Inception 342, CLIP 224, EffNet-B 255,
    SwAV 224) and ImageNet or CLIP normalisation; EffNet-B1 uses the ImageNet V2
    weights; SSIM is true 2-D SSIM. Ground truth goes through the same 256-px step
    as the reconstructions (MindEye's published 256-px ground truth came from a
    resampler the spec marks unverified; for exact parity pass those tensors).
``variant="braindiffuser"``
    Ground truth at its native size (425 in NSD); the reconstructions are resized to
    the ground-truth size with Pillow's bicubic filter for PixCorr and SSIM; every
    network gets a Pillow bilinear (antialiased) 224 x 224 resize; EffNet-B1 uses
    the V1 weights; SSIM is the column-wise form scikit-image 0.17 computed.

Images are streamed in batches: one pass computes PixCorr/SSIM per image and the
features of every network. Ground-truth features of networks with known weights
are cached on disk, keyed by a hash of the ground-truth pixels, so a second
decoder evaluated on the same test set only runs the networks on its own images.

The report and its files are :mod:`brainrecon.eval.report`; the preprocessing is
:mod:`brainrecon.eval.preprocess`; the cache is :mod:`brainrecon.eval.feature_cache`.
Evaluating a run directory is application work (:mod:`brainrecon.workflows.evaluate`).
"""

from __future__ import annotations

import hashlib
import math
import platform
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from brainrecon.devices import resolve_device
from brainrecon.errors import DataError, WeightsNotFoundError
from brainrecon.eval import metrics as M
from brainrecon.eval import stats
from brainrecon.eval.extractors import NETWORK_METRICS, FeatureNetwork, build_network, wrap_extractor
from brainrecon.eval.feature_cache import (
    _cache_file,
    _cache_key,
    _content_hash,
    _default_cache_dir,
    _load_cached,
    _save_cached,
)
from brainrecon.eval.preprocess import (
    _BASE_SIZE,
    _BD_SIZE,
    _LOW_LEVEL_SIZE,
    _METRIC_NETWORK,
    _align_ids,
    _hwc_to_float,
    _ImageSource,
    _net_input_size,
    _net_norm,
    _normalise,
    _pil_resize,
    _resize,
)
from brainrecon.eval.report import (
    ALL_METRICS,
    CLIP_RETRIEVAL_METRICS,
    DISTANCE_METRICS,
    HIGHER_IS_BETTER,
    LOW_LEVEL_METRICS,
    METRICS,
    PERCENT_METRICS,
    RETRIEVAL_METRICS,
    TARGET_RETRIEVAL_METRICS,
    TWO_WAY_METRICS,
    VARIANTS,
    EvalReport,
    _check_metrics,
    _check_variant,
)
from brainrecon.progress import bar_disabled

__all__ = [
    "ALL_METRICS",
    "CLIP_RETRIEVAL_METRICS",
    "DISTANCE_METRICS",
    "HIGHER_IS_BETTER",
    "LOW_LEVEL_METRICS",
    "METRICS",
    "PERCENT_METRICS",
    "RETRIEVAL_METRICS",
    "TARGET_RETRIEVAL_METRICS",
    "TWO_WAY_METRICS",
    "VARIANTS",
    "EvalReport",
    "evaluate",
]

_DEFAULT_SSIM_MODE = {"mindeye": "2d", "braindiffuser": "columnwise"}
_EFFNET_WEIGHTS = {"mindeye": "IMAGENET1K_V2", "braindiffuser": "IMAGENET1K_V1"}


def _versions() -> dict[str, str]:
    """Versions the numbers depend on (scipy's filters compute SSIM; the optional packages are
    listed when installed)."""
    from importlib.metadata import PackageNotFoundError, version

    import brainrecon

    out = {"brainrecon": brainrecon.__version__, "python": platform.python_version()}
    for dist in ("torch", "torchvision", "scipy", "numpy", "pillow", "transformers", "scikit-image"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            pass
    return out


# ============================================================================ networks


def _build_networks(
    wanted: list[str], variant: str, extractors, weights_dir, strict: bool, allow_download
) -> tuple[list[FeatureNetwork], dict[str, str]]:
    extractors = dict(extractors or {})
    for m in extractors:
        if m not in METRICS or m in LOW_LEVEL_METRICS:
            raise DataError(
                f"extractors has an entry for {m!r}; extractors can replace only "
                f"{', '.join(map(repr, TWO_WAY_METRICS + DISTANCE_METRICS))}."
            )
    nets: list[FeatureNetwork] = []
    unavailable: dict[str, str] = {}
    need_standard: list[str] = []
    shared: dict[int, FeatureNetwork] = {}
    for m in wanted:
        if m in LOW_LEVEL_METRICS:
            continue
        if m in extractors:
            ext = extractors[m]
            if isinstance(ext, FeatureNetwork):
                # One network object may serve several metrics (AlexNet(2) and (5)): run it once,
                # asking only for the metrics it was given for and that are wanted.
                if id(ext) not in shared:
                    if m not in ext.metrics:
                        raise DataError(f"extractors[{m!r}] is a network for {ext.metrics}, not for {m!r}.")
                    served = tuple(x for x in ext.metrics if x in wanted and extractors.get(x) is ext)
                    shared[id(ext)] = FeatureNetwork(ext.name, served, ext.module, ext.cache_key, ext.source)
                    nets.append(shared[id(ext)])
            else:
                nets.append(wrap_extractor(m, ext))
        elif _METRIC_NETWORK[m] not in need_standard:
            need_standard.append(_METRIC_NETWORK[m])
    for name in need_standard:
        served = [m for m in NETWORK_METRICS[name] if m in wanted and m not in extractors]
        try:
            net = build_network(name, variant, weights_dir=weights_dir, allow_download=allow_download)
        except WeightsNotFoundError as exc:
            if strict:
                raise
            for m in served:
                unavailable[m] = str(exc)
            continue
        except ImportError as exc:  # CLIP needs transformers (the diffusion extra)
            from brainrecon.extras import missing_extra_message

            message = missing_extra_message(exc)
            if message is None or strict:
                raise
            for m in served:
                unavailable[m] = message
            continue
        net.metrics = tuple(served)
        nets.append(net)
    return nets, unavailable


# ============================================================================ evaluate


def evaluate(
    gt,
    rec,
    metrics=None,
    variant: str = "mindeye",
    device="auto",
    *,
    gt_ids=None,
    rec_ids=None,
    weights_dir=None,
    extractors: Mapping[str, Any] | None = None,
    strict: bool = False,
    batch_size: int = 32,
    cache_dir=None,
    progress: bool = True,
    ssim_mode: str | None = None,
    blend=None,
    allow_download: bool | None = None,
    n_resamples: int = stats.DEFAULT_RESAMPLES,
    confidence: float = stats.DEFAULT_CONFIDENCE,
    seed: int = stats.DEFAULT_SEED,
    network_images: int | None = None,
    predictions=None,
    targets=None,
    target_space: str | None = None,
    retrieval_way: int = M.RETRIEVAL_WAY,
) -> EvalReport:
    """Score reconstructions against ground truth with the eight NSD metrics and retrieval.

    Parameters
    ----------
    gt, rec : array of shape (n_images, H, W, 3) or (n_images, 3, H, W)
        uint8 (0-255) or float in [0, 1]; numpy arrays, memory maps, HDF5 datasets or
        torch tensors. Sizes may differ between the two sets.
    metrics : list of str, optional
        Subset of ``METRICS`` (default all eight).
    variant : {"mindeye", "braindiffuser"}
        Preprocessing recipe (module docstring).
    device : str
        ``"auto"`` (CUDA when present), ``"cpu"``, ``"cuda"``, ``"cuda:N"``.
    gt_ids, rec_ids : int array of shape (n_images,), optional
        Image ids (NSD 73k ids). When both are given the reconstructions are put in
        ground-truth order; different id sets are an error naming the first difference.
    weights_dir : path-like, optional
        Searched for weight files before the torch hub / Hugging Face caches.
    extractors : mapping of metric name to callable, optional
        Replace a metric's feature network; ``f(x)`` gets a preprocessed float32 batch
        (B, 3, S, S) and returns (B, ...) features.
    strict : bool
        Raise :class:`WeightsNotFoundError` instead of reporting a metric unavailable.
    batch_size : int
        Images per forward pass.
    cache_dir : path-like or False, optional
        Ground-truth feature cache (default ``$BRAINRECON_CACHE/eval`` or
        ``~/.cache/brainrecon/eval``); ``False`` disables it. Only networks with known
        weights are cached.
    progress : bool
        Show a progress bar.
    ssim_mode : {"2d", "columnwise"}, optional
        Default: ``"2d"`` for MindEye, ``"columnwise"`` for Brain-Diffuser.
    blend : array like ``rec``, optional
        MindEye2's "enhanced" evaluation: reconstructions become 0.75 * rec + 0.25 * blend
        at 256 px before every metric (MindEye variant only; off by default).
    allow_download : bool, optional
        Whether missing weights may be downloaded (default: yes, unless offline
        variables are set or under pytest).
    n_resamples, confidence, seed
        The bootstrap of each metric's interval over images (recorded in the report).
    network_images : int, optional
        Score the six network metrics on the first ``network_images`` images only (in
        ground-truth order; PixCorr and SSIM still use all): a quick look on a CPU, recorded
        in ``settings["network_images"]``; their per-image rows beyond it are empty.
    predictions, targets : array of shape (n_images, ...), optional
        The decoder's predictions in its target space (in ``rec`` order, like the
        reconstructions) and the true targets of the ground-truth images (in ``gt`` order):
        with both, ``ImageRet(target)`` and ``BrainRet(target)`` are scored (cosine similarity of
        the flattened vectors; no weights needed). ``ImageRet(CLIP)`` and ``BrainRet(CLIP)``
        use the CLIP metric's embeddings of reconstructions and ground truth.
    target_space : str, optional
        Names the target space (recorded; runs are compared on retrieval only within one space).
    retrieval_way : int
        Candidates per retrieval set (MindEye: 300); ``min(retrieval_way, N)`` are used.

    Returns
    -------
    EvalReport

    Raises
    ------
    DataError
        Non-finite pixels, float values outside [0, 1], mismatched counts or ids,
        unknown metric or variant.
    WeightsNotFoundError
        Only with ``strict=True``.
    """
    from tqdm.auto import tqdm

    t_start = time.perf_counter()
    wanted = _check_metrics(metrics)
    variant = _check_variant(variant)
    ssim_mode = ssim_mode or _DEFAULT_SSIM_MODE[variant]
    if ssim_mode not in M.SSIM_MODES:
        raise DataError(f"Unknown ssim_mode {ssim_mode!r}. Valid modes: {', '.join(map(repr, M.SSIM_MODES))}.")
    if blend is not None and variant != "mindeye":
        raise DataError("blend is MindEye2's recipe; use it with variant='mindeye'.")
    dev = resolve_device(device)
    if int(batch_size) < 1:
        raise DataError(f"batch_size must be a positive integer, got {batch_size!r}.")
    batch_size = int(batch_size)

    gt_src = _ImageSource(gt, "ground-truth")
    rec_src = _ImageSource(rec, "reconstruction")
    rec_order, aligned = _align_ids(gt_ids, rec_ids, gt_src.n, rec_src.n)
    blend_src = None
    if blend is not None:
        blend_src = _ImageSource(blend, "blend")
        if blend_src.n != rec_src.n:
            raise DataError(f"blend has {blend_src.n} images for {rec_src.n} reconstructions.")
    n = gt_src.n
    if n < 2 and any(m in TWO_WAY_METRICS for m in wanted):
        raise DataError(f"Two-way identification needs at least 2 images; got {n}.")
    target_ret = [m for m in wanted if m in TARGET_RETRIEVAL_METRICS]
    if target_ret and (predictions is None or targets is None):
        if metrics is None:  # by default scored only where the caller has the target space
            wanted = [m for m in wanted if m not in TARGET_RETRIEVAL_METRICS]
        target_ret = []
    pred_arr = true_arr = None
    if target_ret:
        pred_arr = np.asarray(predictions)
        true_arr = np.asarray(targets)
        if len(pred_arr) != n or len(true_arr) != n:
            raise DataError(f"Retrieval needs one prediction and one true target per test image: got "
                            f"{len(pred_arr)} predictions and {len(true_arr)} targets for {n} images.")
        if n < 2:
            raise DataError(f"Retrieval needs at least 2 images; got {n}.")
        pred_arr = pred_arr[rec_order]
    clip_ret = [m for m in wanted if m in CLIP_RETRIEVAL_METRICS]
    # The CLIP-space retrieval needs the CLIP metric's embeddings, wanted or not.
    net_wanted = [m for m in wanted if m in METRICS] + (["CLIP"] if clip_ret and "CLIP" not in wanted else [])
    if network_images is not None and int(network_images) < 2:
        raise DataError(f"network_images must be at least 2 (two-way identification), got {network_images}.")
    n_net = n if network_images is None else min(n, int(network_images))

    nets, unavailable = _build_networks(net_wanted, variant, extractors, weights_dir, strict, allow_download)
    if "CLIP" in unavailable:
        unavailable.update({m: unavailable["CLIP"] for m in clip_ret})
        if "CLIP" not in wanted:
            del unavailable["CLIP"]
    missing_targets = [m for m in wanted if m in TARGET_RETRIEVAL_METRICS and m not in target_ret]
    unavailable.update({m: "no predictions and true targets in the decoder's target space were given"
                        for m in missing_targets})
    for net in nets:
        net.to(dev)

    timings: dict[str, float] = {}
    # Features are written into tensors of the full test-set size allocated at the first batch:
    # no per-batch lists to concatenate (which doubled the peak memory, fragmented heap included).
    gt_feats: dict[str, torch.Tensor] = {}
    cache_root = None if cache_dir is False else Path(cache_dir).expanduser() if cache_dir else _default_cache_dir()
    cache_files: dict[str, tuple[Path, str]] = {}
    cached_nets: set[str] = set()
    if cache_root is not None and any(net.cache_key for net in nets):
        t0 = time.perf_counter()
        gt_hash = _content_hash(gt_src, batch_size)
        for net in nets:
            if net.cache_key:
                key = _cache_key(gt_hash, variant, net, n_net)
                cache_files[net.name] = (_cache_file(cache_root, key, net), key)
                hit = _load_cached(cache_files[net.name][0], key, net, n_net, dev)
                if hit is not None:
                    gt_feats.update(hit)
                    cached_nets.add(net.name)
        timings["gt cache lookup"] = time.perf_counter() - t0
    rec_feats: dict[str, torch.Tensor] = {}
    pix_scores: list[np.ndarray] = []
    ssim_scores: list[np.ndarray] = []
    low_level = [m for m in wanted if m in LOW_LEVEL_METRICS]

    def tick(key: str, t0: float) -> float:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        now = time.perf_counter()
        timings[key] = timings.get(key, 0.0) + now - t0
        return now

    n_batches = math.ceil(n / batch_size)
    for b in tqdm(range(n_batches), desc=f"evaluate ({variant})", unit="batch", disable=bar_disabled(progress)):
        gi = np.arange(b * batch_size, min((b + 1) * batch_size, n))
        ri = rec_order[gi]
        t0 = time.perf_counter()
        if variant == "mindeye":
            g = _resize(gt_src.tensor(gi, dev), _BASE_SIZE)
            r = _resize(rec_src.tensor(ri, dev), _BASE_SIZE)
            if blend_src is not None:
                r = 0.75 * r + 0.25 * _resize(blend_src.tensor(ri, dev), _BASE_SIZE)
            if low_level:
                g_ll, r_ll = _resize(g, _LOW_LEVEL_SIZE), _resize(r, _LOW_LEVEL_SIZE)
                if dev.type == "cpu":  # scipy's filters beat torch's on a CPU
                    g_ll, r_ll = g_ll.numpy(), r_ll.numpy()
            net_inputs = {}
            for net in nets:
                key = (_net_input_size(net, variant), _net_norm(net))
                if key not in net_inputs:
                    net_inputs[key] = (_normalise(_resize(g, key[0]), key[1]), _normalise(_resize(r, key[0]), key[1]))
            t0 = tick("load + resize", t0)
        else:
            g_raw, r_raw = gt_src.raw(gi), rec_src.raw(ri)
            if low_level:
                g_ll = _hwc_to_float(g_raw)
                if tuple(r_raw.shape[1:3]) != tuple(g_raw.shape[1:3]):
                    r_ll = _pil_resize(r_raw, (g_raw.shape[2], g_raw.shape[1]), Image.Resampling.BICUBIC)
                else:
                    r_ll = _hwc_to_float(r_raw)
                g_ll, r_ll = g_ll.transpose(0, 3, 1, 2), r_ll.transpose(0, 3, 1, 2)
                if dev.type != "cpu":
                    g_ll, r_ll = torch.from_numpy(g_ll).to(dev), torch.from_numpy(r_ll).to(dev)
            net_inputs = {}
            if nets:

                def to_net(raw):
                    x = _pil_resize(raw, (_BD_SIZE, _BD_SIZE), Image.Resampling.BILINEAR)
                    return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous().to(dev)

                g224, r224 = to_net(g_raw), to_net(r_raw)
                for norm in {_net_norm(net) for net in nets}:
                    net_inputs[(_BD_SIZE, norm)] = (_normalise(g224, norm), _normalise(r224, norm))
            t0 = tick("load + resize", t0)
        if low_level:
            if "PixCorr" in wanted:
                pix_scores.append(M.pixcorr_per_image(g_ll, r_ll))
            if "SSIM" in wanted:
                ssim_scores.append(M.ssim_per_image(g_ll, r_ll, mode=ssim_mode))
            t0 = tick("PixCorr + SSIM", t0)
        rows = max(0, min(len(gi), n_net - int(gi[0])))  # the batch's rows the networks see
        for net in nets if rows else ():
            x_g, x_r = net_inputs[(_net_input_size(net, variant), _net_norm(net))]
            if net.name not in cached_nets:
                for m, f in net(x_g[:rows]).items():
                    _store(gt_feats, m, f, int(gi[0]), n_net)
            for m, f in net(x_r[:rows]).items():
                _store(rec_feats, m, f, int(gi[0]), n_net)
            t0 = tick(f"network {net.name}", t0)

    per_image: dict[str, np.ndarray] = {}
    if "PixCorr" in wanted:
        per_image["PixCorr"] = np.concatenate(pix_scores)
    if "SSIM" in wanted:
        per_image["SSIM"] = np.concatenate(ssim_scores)
    t0 = time.perf_counter()
    way = int(retrieval_way)
    sampled: dict[str, float] = {}
    if target_ret:
        # Image retrieval: each prediction among the true targets; brain retrieval: the reverse.
        pairs = {"ImageRet(target)": (pred_arr, true_arr), "BrainRet(target)": (true_arr, pred_arr)}
        for m in target_ret:
            per_image[m] = M.retrieval_per_image(*pairs[m], way=way)
            sampled[m] = M.retrieval_sampled(*pairs[m], way=way, seed=seed)
    for net in nets:
        if net.name not in cached_nets:
            if net.name in cache_files:
                _save_cached(*cache_files[net.name], {m: gt_feats[m] for m in net.metrics})
        for m in net.metrics:
            fr = rec_feats.pop(m)
            if m == "CLIP" and clip_ret:
                pairs = {"ImageRet(CLIP)": (fr, gt_feats[m]), "BrainRet(CLIP)": (gt_feats[m], fr)}
                for r in clip_ret:
                    per_image[r] = M.retrieval_per_image(*pairs[r], way=way)
                    sampled[r] = M.retrieval_sampled(*pairs[r], way=way, seed=seed)
                if "CLIP" not in wanted:
                    del fr
                    gt_feats.pop(m)
                    continue
            if m in TWO_WAY_METRICS:
                per_image[m] = M.two_way_per_reconstruction(gt_feats[m], fr)
            else:
                per_image[m] = M.correlation_distance_per_pair(gt_feats[m], fr)
            del fr
            gt_feats.pop(m)
    tick("scores", t0)
    per_image = {m: per_image[m] for m in ALL_METRICS if m in per_image}
    scores = {m: float(np.mean(v)) for m, v in per_image.items()}
    t0 = time.perf_counter()
    intervals = {
        m: stats.bootstrap_interval(v, n_resamples=n_resamples, confidence=confidence, seed=seed)
        for m, v in per_image.items()
    }
    tick("bootstrap intervals", t0)
    if n_net < n:  # network metrics cover the first n_net images; the others' rows stay empty
        for m, v in per_image.items():
            if len(v) == n_net:
                per_image[m] = np.concatenate([v, np.full(n - n_net, np.nan)])
    timings["total"] = time.perf_counter() - t_start

    settings = {
        "ssim_mode": ssim_mode,
        "blend": blend is not None,
        "effnet_weights": _EFFNET_WEIGHTS[variant],
        "networks": {m: net.source for net in nets for m in net.metrics},
        # Content hashes of the weight files (the ground-truth cache key): which weights, exactly.
        "weights_identity": {m: net.cache_key for net in nets for m in net.metrics if net.cache_key},
        "gt_features_cached": sorted(m for net in nets if net.name in cached_nets for m in net.metrics),
        "network_images": n_net,
        "aligned_by_id": aligned,
        "ids_sha256": _ids_hash(gt_ids) if gt_ids is not None else None,
        "gt_size": list(gt_src.size),
        "rec_size": list(rec_src.size),
        "device": str(dev),
    }
    if sampled:
        settings["retrieval"] = {
            "way": way,
            "effective_way": {m: min(way, n if m in TARGET_RETRIEVAL_METRICS else n_net) for m in sampled},
            "similarity": "cosine of the flattened, L2-normalised vectors",
            "per_image": "exact mean over all random sets of min(way, N) test images containing the image",
            "target_space": target_space if target_ret else None,
            "clip_space": "the CLIP metric's image embeddings, reconstruction vs ground truth" if clip_ret else None,
            "mindeye_sampled": {"repeats": M.RETRIEVAL_REPEATS, "seed": int(seed), "scores": sampled},
        }
    bootstrap = {
        "method": stats.BOOTSTRAP_METHOD, "n_resamples": int(n_resamples), "confidence": float(confidence),
        "seed": int(seed), "two_way_note": stats.TWO_WAY_APPROXIMATION,
    }
    return EvalReport(
        scores, n_images=n, variant=variant, unavailable=unavailable, settings=settings,
        versions=_versions(), timings={k: round(v, 4) for k, v in timings.items()},
        per_image=per_image, ids=gt_ids if gt_ids is not None else np.arange(n), intervals=intervals,
        bootstrap=bootstrap,
    )


def _store(buf: dict[str, torch.Tensor], metric: str, feats: torch.Tensor, start: int, n: int) -> None:
    """Write one batch of features at rows ``start:`` of the metric's (n, ...) tensor."""
    if metric not in buf:
        buf[metric] = torch.empty((n, *feats.shape[1:]), dtype=feats.dtype, device=feats.device)
    buf[metric][start : start + feats.shape[0]] = feats


def _ids_hash(ids) -> str:
    return hashlib.sha256(np.asarray(ids, dtype=np.int64).tobytes()).hexdigest()
