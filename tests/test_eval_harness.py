"""The evaluation harness: preprocessing recipes, alignment, bad input, weights, caching, runs."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from skimage.color import rgb2gray
from skimage.metrics import structural_similarity
from torch import nn

from brainrecon.errors import BrainreconError, DataError, WeightsNotFoundError
from brainrecon.eval import METRICS, EvalReport, evaluate, weights_status
from brainrecon.eval import metrics as M
from brainrecon.eval import weights as W
from brainrecon.eval.extractors import build_network
from brainrecon.workflows.evaluate import evaluate_run

NET_METRICS = ("AlexNet(2)", "AlexNet(5)", "Inception", "CLIP", "EffNet-B", "SwAV")
IMAGENET = (np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225]))
CLIP_NORM = (np.array([0.48145466, 0.4578275, 0.40821073]), np.array([0.26862954, 0.26130258, 0.27577711]))


class TinyNet(nn.Module):
    """A few hundred parameters standing in for a feature network; records its inputs."""

    def __init__(self, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.conv = nn.Conv2d(3, 4, 5, stride=4)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=g) * 0.2)
            self.conv.bias.copy_(torch.randn(4, generator=g) * 0.1)
        self.pool = nn.AdaptiveAvgPool2d(3)
        self.inputs: list[torch.Tensor] = []

    def forward(self, x):
        self.inputs.append(x.detach().clone())
        return self.pool(torch.relu(self.conv(x)))


def tiny_extractors():
    return {m: TinyNet(i) for i, m in enumerate(NET_METRICS)}


def images(seed, n=6, size=48, noise=60):
    rng = np.random.default_rng(seed)
    gt = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    rec = np.clip(gt.astype(int) + rng.integers(-noise, noise + 1, gt.shape), 0, 255).astype(np.uint8)
    return gt, rec


def run_eval(gt, rec, **kw):
    kw.setdefault("extractors", tiny_extractors())
    kw.setdefault("progress", False)
    kw.setdefault("cache_dir", False)
    return evaluate(gt, rec, **kw)


# ---------------------------------------------------------------------------- results and recipes


def test_all_eight_metrics_and_json_round_trip():
    gt, rec = images(0)
    report = run_eval(gt, rec, batch_size=4)
    assert list(report) == list(METRICS) + ["ImageRet(CLIP)", "BrainRet(CLIP)"]  # + retrieval in CLIP space
    assert report.unavailable == {}
    assert report.n_images == 6 and report.variant == "mindeye"
    assert report.settings["ssim_mode"] == "2d" and report.settings["effnet_weights"] == "IMAGENET1K_V2"
    assert {"torch", "torchvision", "scikit-image"} <= set(report.versions)
    back = EvalReport.from_json(report.to_json())
    assert dict(back) == dict(report)
    assert back.n_images == 6 and back.settings == json.loads(report.to_json())["settings"]
    assert report.directions["EffNet-B"] == "lower" and report.directions["CLIP"] == "higher"


def test_mindeye_recipe_matches_manual_computation():
    gt, rec = images(1, n=5, size=40)
    nets = tiny_extractors()
    report = run_eval(gt, rec, extractors=nets, batch_size=2)

    def to256(x):
        t = torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255
        return F.interpolate(t, size=(256, 256), mode="bilinear", align_corners=False, antialias=False)

    g, r = to256(gt), to256(rec)
    g425 = F.interpolate(g, size=(425, 425), mode="bilinear", align_corners=False).double().numpy()
    r425 = F.interpolate(r, size=(425, 425), mode="bilinear", align_corners=False).double().numpy()
    pix = np.mean([np.corrcoef(g425[i].ravel(), r425[i].ravel())[0, 1] for i in range(5)])
    ssim = np.mean([
        structural_similarity(rgb2gray(r425[i].transpose(1, 2, 0)), rgb2gray(g425[i].transpose(1, 2, 0)),
                              gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.0)
        for i in range(5)
    ])
    assert report["PixCorr"] == pytest.approx(pix, abs=1e-6)
    assert report["SSIM"] == pytest.approx(ssim, abs=1e-6)

    sizes = {"AlexNet(2)": 256, "AlexNet(5)": 256, "Inception": 342, "CLIP": 224, "EffNet-B": 255, "SwAV": 224}
    for metric, size in sizes.items():
        first = nets[metric].inputs[0]  # ground-truth batch 0 (2 images)
        assert first.shape == (2, 3, size, size), metric
        mean, std = CLIP_NORM if metric == "CLIP" else IMAGENET
        expected = F.interpolate(g[:2], size=(size, size), mode="bilinear", align_corners=False)
        expected = (expected - torch.tensor(mean).view(1, 3, 1, 1).float()) / torch.tensor(std).view(1, 3, 1, 1).float()
        torch.testing.assert_close(first, expected.float(), atol=1e-5, rtol=0)

    with torch.no_grad():
        def feats(net, x, size, norm):
            mean, std = norm
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
            x = (x - torch.tensor(mean).view(1, 3, 1, 1).float()) / torch.tensor(std).view(1, 3, 1, 1).float()
            return net(x).reshape(len(x), -1).numpy()

        fg, fr = feats(nets["Inception"], g, 342, IMAGENET), feats(nets["Inception"], r, 342, IMAGENET)
        assert report["Inception"] == pytest.approx(M.two_way_identification(fg, fr), abs=1e-9)
        fg, fr = feats(nets["SwAV"], g, 224, IMAGENET), feats(nets["SwAV"], r, 224, IMAGENET)
        assert report["SwAV"] == pytest.approx(M.correlation_distance(fg, fr), abs=1e-6)


def test_braindiffuser_recipe_matches_manual_computation():
    rng = np.random.default_rng(2)
    gt = rng.integers(0, 256, (4, 40, 40, 3), dtype=np.uint8)
    rec = rng.integers(0, 256, (4, 52, 52, 3), dtype=np.uint8)
    nets = tiny_extractors()
    report = run_eval(gt, rec, variant="braindiffuser", extractors=nets)
    assert report.settings["ssim_mode"] == "columnwise"
    assert report.settings["effnet_weights"] == "IMAGENET1K_V1"

    r40 = np.stack([np.asarray(Image.fromarray(x).resize((40, 40), Image.Resampling.BICUBIC)) for x in rec]) / 255.0
    g40 = gt / 255.0
    pix = np.mean([np.corrcoef(g40[i].ravel(), r40[i].ravel())[0, 1] for i in range(4)])
    ssim = np.mean([
        structural_similarity(rgb2gray(r40[i]), rgb2gray(g40[i]), gaussian_weights=True, sigma=1.5,
                              use_sample_covariance=False, data_range=1.0, channel_axis=-1)
        for i in range(4)
    ])
    assert report["PixCorr"] == pytest.approx(pix, abs=1e-6)
    assert report["SSIM"] == pytest.approx(ssim, abs=1e-6)
    # Every network: Pillow bilinear 224 of the native image, then its normalisation.
    for metric in NET_METRICS:
        x = nets[metric].inputs[1]  # reconstruction batch
        mean, std = CLIP_NORM if metric == "CLIP" else IMAGENET
        pil = np.stack([np.asarray(Image.fromarray(im).resize((224, 224), Image.Resampling.BILINEAR)) for im in rec])
        expected = ((pil / 255.0 - mean) / std).transpose(0, 3, 1, 2)
        np.testing.assert_allclose(x.numpy(), expected, atol=1e-5)


def test_layouts_dtypes_and_tensors_give_the_same_scores():
    gt, rec = images(3, n=4, size=32)
    some = ["PixCorr", "SSIM", "AlexNet(2)", "CLIP"]
    base = run_eval(gt, rec, metrics=some)
    chw_float = run_eval(gt.transpose(0, 3, 1, 2) / 255.0, (rec / 255.0).astype(np.float32).transpose(0, 3, 1, 2),
                         metrics=some)
    tensors = run_eval(torch.from_numpy(gt), torch.from_numpy(rec), metrics=some)
    for m in some:
        assert chw_float[m] == pytest.approx(base[m], abs=1e-5), m
        assert tensors[m] == base[m], m


def test_batch_size_does_not_change_scores():
    gt, rec = images(4, n=5, size=32)
    some = ["PixCorr", "SSIM", "Inception", "EffNet-B"]
    a, b = run_eval(gt, rec, batch_size=5, metrics=some), run_eval(gt, rec, batch_size=2, metrics=some)
    for m in some:
        assert a[m] == pytest.approx(b[m], abs=1e-6), m


def test_reconstructions_are_aligned_by_id():
    gt, rec = images(5, n=6, size=32)
    ids = np.array([10, 42, 7, 99, 3, 58])
    perm = np.array([3, 0, 5, 1, 4, 2])
    some = ["PixCorr", "SSIM", "AlexNet(5)", "SwAV"]
    aligned = run_eval(gt, rec, gt_ids=ids, rec_ids=ids, metrics=some)
    shuffled = run_eval(gt, rec[perm], gt_ids=ids, rec_ids=ids[perm], metrics=some)
    assert shuffled.settings["aligned_by_id"] is True
    for m in some:
        assert shuffled[m] == pytest.approx(aligned[m], abs=1e-9), m
    unaligned = run_eval(gt, rec[perm], metrics=["PixCorr"])
    assert unaligned["PixCorr"] < aligned["PixCorr"] - 0.1


def test_metric_subset_and_blend():
    gt, rec = images(6, n=4, size=32)
    report = run_eval(gt, rec, metrics=["SSIM", "PixCorr"])
    assert list(report) == ["PixCorr", "SSIM"]
    blurry = np.full_like(rec, 128)
    blended = run_eval(gt, rec, metrics=["PixCorr"], blend=blurry)
    assert blended.settings["blend"] is True
    manual = run_eval(gt, (0.75 * rec / 255.0 + 0.25 * 128 / 255.0).astype(np.float32), metrics=["PixCorr"])
    assert blended["PixCorr"] == pytest.approx(manual["PixCorr"], abs=1e-6)


# ---------------------------------------------------------------------------- bad input


def test_non_finite_pixels_are_rejected():
    gt, _ = images(7, n=5, size=16)
    rec = gt / 255.0
    rec[3, 2, 2, 1] = np.nan
    with pytest.raises(DataError, match=r"reconstruction images contain non-finite values.*image 3"):
        run_eval(gt, rec, metrics=["PixCorr"])


def test_float_out_of_range_says_which_set():
    gt, rec = images(8, n=4, size=16)
    with pytest.raises(DataError, match=r"ground-truth images are float with values outside \[0, 1\].*max 2\d\d"):
        run_eval(gt.astype(np.float32), rec, metrics=["PixCorr"])
    with pytest.raises(DataError, match=r"reconstruction images are float.*min -0.5.*image 2"):
        bad = rec / 255.0
        bad[2, 0, 0, 0] = -0.5
        run_eval(gt, bad, metrics=["PixCorr"])


def test_mismatched_counts_and_ids():
    gt, rec = images(9, n=4, size=16)
    with pytest.raises(DataError, match="Ground truth has 4 images but there are 3 reconstructions"):
        run_eval(gt, rec[:3], metrics=["PixCorr"])
    with pytest.raises(DataError, match=r"first difference at position 2 \(ground truth id 7, reconstruction id 8\)"):
        run_eval(gt, rec, metrics=["PixCorr"], gt_ids=[5, 6, 7, 9], rec_ids=[5, 6, 8, 9])
    with pytest.raises(DataError, match="duplicate id 6"):
        run_eval(gt, rec, metrics=["PixCorr"], gt_ids=[5, 6, 6, 9], rec_ids=[5, 6, 7, 9])
    with pytest.raises(DataError, match="gt_ids has 3 entries for 4 images"):
        run_eval(gt, rec, metrics=["PixCorr"], gt_ids=[5, 6, 7], rec_ids=[5, 6, 7, 9])


def test_unknown_metric_variant_and_shapes():
    gt, rec = images(10, n=3, size=16)
    with pytest.raises(DataError, match=r"Unknown metric 'clip'\. Did you mean 'CLIP'\? Valid metrics: 'PixCorr', 'SSIM'"):
        run_eval(gt, rec, metrics=["clip"])
    with pytest.raises(DataError, match=r"Unknown variant 'mindeye2'\. Valid variants: 'mindeye', 'braindiffuser'"):
        run_eval(gt, rec, variant="mindeye2")
    with pytest.raises(DataError, match=r"shape \(n, H, W, 3\) or \(n, 3, H, W\); got shape \(3, 16, 16\)"):
        run_eval(gt[..., 0], rec, metrics=["PixCorr"])
    with pytest.raises(DataError, match="dtype int64"):
        run_eval(gt.astype(np.int64), rec, metrics=["PixCorr"])
    with pytest.raises(DataError, match="blend is MindEye2's recipe"):
        run_eval(gt, rec, variant="braindiffuser", blend=rec)
    with pytest.raises(DataError, match="extractors can replace only"):
        run_eval(gt, rec, extractors={"PixCorr": TinyNet(0)})


# ---------------------------------------------------------------------------- weights


def test_missing_weights_are_reported_unavailable_with_file_places_and_url(tmp_path):
    gt, rec = images(11, n=3, size=16)
    report = evaluate(gt, rec, metrics=["PixCorr", "AlexNet(2)", "SwAV"], weights_dir=tmp_path,
                      progress=False, cache_dir=False)
    assert list(report) == ["PixCorr"]
    reason = report.unavailable["AlexNet(2)"]
    assert "alexnet-owt-7be5be79.pth" in reason
    assert str(tmp_path / "alexnet-owt-7be5be79.pth") in reason
    assert str(W._torch_hub_checkpoints() / "alexnet-owt-7be5be79.pth") in reason
    assert "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth" in reason
    assert "swav_800ep_pretrain.pth.tar" in report.unavailable["SwAV"]
    with pytest.raises(KeyError, match="unavailable"):
        report["SwAV"]
    with pytest.raises(WeightsNotFoundError, match=r"alexnet-owt-7be5be79\.pth not found \(offline"):
        evaluate(gt, rec, metrics=["AlexNet(5)"], strict=True, progress=False, cache_dir=False)


def test_download_attempt_fails_fast_when_network_is_unreachable(monkeypatch):
    monkeypatch.delenv("PYTEST_CURRENT_TEST", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("BRAINRECON_OFFLINE", raising=False)
    monkeypatch.setenv("BRAINRECON_ALLOW_DOWNLOADS", "1")  # downloads are opt-in (issue 15)
    assert W.downloads_allowed()
    monkeypatch.setattr(W, "_reachable_hosts", {})
    with pytest.raises(WeightsNotFoundError, match="download failed, cannot reach download.pytorch.org"):
        W.resolve_weights("inception", allow_download=True)
    monkeypatch.setenv("BRAINRECON_OFFLINE", "1")
    assert not W.downloads_allowed()


def test_weights_status_lists_every_file(tmp_path):
    (tmp_path / "swav_800ep_pretrain.pth.tar").write_bytes(b"x")
    rows = {r["file"]: r for r in weights_status(tmp_path)}
    assert set(rows) == {
        "alexnet-owt-7be5be79.pth", "inception_v3_google-0cc3c7bd.pth", "efficientnet_b1-c27df63c.pth",
        "efficientnet_b1_rwightman-bac287d4.pth", "swav_800ep_pretrain.pth.tar",
        "openai/clip-vit-large-patch14/model.safetensors",
    }
    assert rows["swav_800ep_pretrain.pth.tar"]["status"] == "present"
    assert rows["swav_800ep_pretrain.pth.tar"]["path"] == str(tmp_path / "swav_800ep_pretrain.pth.tar")
    assert rows["alexnet-owt-7be5be79.pth"]["status"] == "missing"
    assert rows["alexnet-owt-7be5be79.pth"]["url"] == "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth"


def test_local_file_with_wrong_hash_is_refused(tmp_path):
    (tmp_path / "alexnet-owt-7be5be79.pth").write_bytes(b"not the weights")
    with pytest.raises(WeightsNotFoundError, match="SHA-256 starts with .* expected 7be5be79"):
        W.resolve_weights("alexnet", tmp_path)


def test_swav_checkpoint_loads_from_weights_dir(tmp_path):
    """SwAV's file: DataParallel 'module.' prefix plus heads the metric does not use."""
    import torchvision

    torch.manual_seed(0)
    ref = torchvision.models.resnet50(weights=None).eval()
    state = {f"module.{k}": v for k, v in ref.state_dict().items() if not k.startswith("fc.")}
    state["module.projection_head.0.weight"] = torch.zeros(8, 2048)
    state["module.prototypes.weight"] = torch.zeros(30, 128)
    torch.save(state, tmp_path / "swav_800ep_pretrain.pth.tar")

    net = build_network("swav", weights_dir=tmp_path)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        body = nn.Sequential(*list(ref.children())[:-1])
        torch.testing.assert_close(net(x)["SwAV"], body(x).flatten(1))

    del state["module.layer1.0.conv1.weight"]
    torch.save(state, tmp_path / "swav_800ep_pretrain.pth.tar")
    with pytest.raises(WeightsNotFoundError, match="does not fit the expected architecture"):
        build_network("swav", weights_dir=tmp_path)


def test_effnet_weights_follow_the_variant(tmp_path, monkeypatch):
    import torchvision

    torch.manual_seed(0)
    ref = torchvision.models.efficientnet_b1(weights=None).eval()
    path = tmp_path / "efficientnet_b1_rwightman-bac287d4.pth"
    torch.save(ref.state_dict(), path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    monkeypatch.setitem(W.WEIGHT_FILES, "effnet_v1",
                        dataclasses.replace(W.WEIGHT_FILES["effnet_v1"], sha256_prefix=digest[:8]))
    net = build_network("effnet", "braindiffuser", weights_dir=tmp_path)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(net(x)["EffNet-B"], ref.avgpool(ref.features(x)).flatten(1))
    with pytest.raises(WeightsNotFoundError, match="efficientnet_b1-c27df63c.pth"):
        build_network("effnet", "mindeye", weights_dir=tmp_path)


def _save_tiny_clip(directory):
    from transformers import CLIPConfig, CLIPModel

    cfg = CLIPConfig(
        text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                         vocab_size=49408, max_position_embeddings=8),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=28, patch_size=14),
        projection_dim=12,
    )
    torch.manual_seed(0)
    model = CLIPModel(cfg).eval()
    model.save_pretrained(directory)
    return model


def test_clip_loads_from_weights_dir_and_hub_cache(tmp_path, monkeypatch):
    model = _save_tiny_clip(tmp_path / "w" / "clip-vit-large-patch14")
    net = build_network("clip", weights_dir=tmp_path / "w")
    x = torch.rand(2, 3, 28, 28)
    with torch.no_grad():
        expected = model.get_image_features(pixel_values=x)
    expected = expected if torch.is_tensor(expected) else expected.pooler_output
    got = net(x)["CLIP"]
    assert got.shape == (2, 12)
    torch.testing.assert_close(got, expected)
    assert net.cache_key is not None

    repo = tmp_path / "hf" / "hub" / "models--openai--clip-vit-large-patch14"
    snap = repo / "snapshots" / "0123abc"
    _save_tiny_clip(snap)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123abc")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    assert W.find_weights(W.WEIGHT_FILES["clip"]) == snap
    torch.testing.assert_close(build_network("clip")(x)["CLIP"], expected)


def test_hub_cache_lookup_follows_refs_main(tmp_path, monkeypatch):
    """As the hub resolves it: the snapshot refs/main names, not the alphabetically first one."""
    repo = tmp_path / "hf" / "hub" / "models--openai--clip-vit-large-patch14"
    old, new = repo / "snapshots" / "000old", repo / "snapshots" / "fffnew"
    _save_tiny_clip(old)
    _save_tiny_clip(new)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    assert W.find_weights(W.WEIGHT_FILES["clip"]) is None  # no refs/main: nothing is guessed
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("fffnew\n")
    assert W.find_weights(W.WEIGHT_FILES["clip"]) == new


# ---------------------------------------------------------------------------- cache


class CountingNet(TinyNet):
    cache_key = "counting-net-v1"

    def __init__(self, seed):
        super().__init__(seed)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return super().forward(x)


def test_ground_truth_features_are_cached_by_content(tmp_path):
    gt, rec = images(12, n=6, size=32)
    net = CountingNet(0)
    first = evaluate(gt, rec, metrics=["CLIP"], extractors={"CLIP": net}, cache_dir=tmp_path,
                     batch_size=3, progress=False)
    assert net.calls == 4  # 2 batches x (gt + rec)
    assert len(list(tmp_path.glob("gt-*.safetensors"))) == 1
    net.calls = 0
    second = evaluate(gt, rec[::-1].copy(), metrics=["CLIP"], extractors={"CLIP": net}, cache_dir=tmp_path,
                      batch_size=3, progress=False)
    assert net.calls == 2  # reconstructions only
    assert second.settings["gt_features_cached"] == ["CLIP"]
    again = evaluate(gt, rec, metrics=["CLIP"], extractors={"CLIP": net}, cache_dir=tmp_path, progress=False)
    assert again["CLIP"] == first["CLIP"]
    net.calls = 0
    other_gt = gt.copy()
    other_gt[0, 0, 0, 0] ^= 1
    evaluate(other_gt, rec, metrics=["CLIP"], extractors={"CLIP": net}, cache_dir=tmp_path, batch_size=3,
             progress=False)
    assert net.calls == 4
    # Networks without a cache key (random or injected) never touch the cache.
    evaluate(gt, rec, metrics=["SwAV"], extractors={"SwAV": TinyNet(1)}, cache_dir=tmp_path, progress=False)
    assert len(list(tmp_path.glob("gt-*.safetensors"))) == 2


# ---------------------------------------------------------------------------- runs


def write_fake_run(root, name, dataset, subject, recs, ids, **info):
    from brainrecon.io import write_array_atomic, write_json_atomic

    path = root / name
    path.mkdir(parents=True)
    write_array_atomic(path / "test_ids.npy", np.asarray(ids, dtype=np.int64))
    if recs is not None:
        write_array_atomic(path / "reconstructions.npy", recs)
    base = {
        "name": name, "decoder": "ridge", "params": {}, "subject": subject, "target": "pixels",
        "predicts": "target", "data": dataset.spec, "data_name": dataset.name,
        "ids_are_nsd": dataset.ids_are_nsd, "fingerprint": dataset.fingerprint(subject), "n_test": len(ids),
    }
    base.update(info)
    write_json_atomic(path / "run.json", base)
    return path


def test_evaluate_run_writes_metrics_and_grid(small_data, tmp_path):
    ids = small_data.test.ids(1)
    gt = small_data.test.images(1)
    rng = np.random.default_rng(13)
    order = rng.permutation(len(ids))[:9]  # a subset, in another order
    recs = np.clip(gt[order].astype(int) + rng.integers(-40, 41, gt[order].shape), 0, 255).astype(np.uint8)
    path = write_fake_run(tmp_path, "r1", small_data, 1, recs, ids[order])

    report = evaluate_run(path, extractors=tiny_extractors(), cache_dir=False, progress=False)
    direct = run_eval(gt[order], recs)
    for m in METRICS:
        assert report[m] == pytest.approx(direct[m], abs=1e-9), m
    saved = EvalReport.from_json((path / "metrics.json").read_text())
    assert dict(saved) == dict(report) and saved.settings["run"] == "r1"
    grid = Image.open(path / "grid.png")
    assert grid.size[0] > 2 * 128 and grid.size[1] > 8 * 128
    assert not [p for p in path.iterdir() if p.name.endswith(".tmp")]


def test_evaluate_run_takes_the_shared_arguments_in_evaluates_order(small_data, tmp_path):
    import inspect

    def positional(f):
        return [(p.name, p.default) for p in inspect.signature(f).parameters.values()
                if p.kind == p.POSITIONAL_OR_KEYWORD]

    assert positional(evaluate_run)[1:] == positional(evaluate)[2:] == [
        ("metrics", None), ("variant", "mindeye"), ("device", "auto")]
    gt = small_data.test.images(1)[:4]
    path = write_fake_run(tmp_path, "r", small_data, 1, gt, small_data.test.ids(1)[:4])
    report = evaluate_run(path, ["PixCorr"], "braindiffuser", "cpu", cache_dir=False, progress=False)
    assert list(report) == ["PixCorr"] and report.variant == "braindiffuser"


def test_evaluate_run_errors(small_data, tmp_path):
    ids = small_data.test.ids(1)
    path = write_fake_run(tmp_path, "norecs", small_data, 1, None, ids)
    with pytest.raises(BrainreconError, match="has no reconstructions.npy"):
        evaluate_run(path, extractors=tiny_extractors(), cache_dir=False, progress=False)
    recs = small_data.test.images(1)[:2]
    path = write_fake_run(tmp_path, "badids", small_data, 1, recs, [ids[0], 10**6])
    with pytest.raises(DataError, match="test id 1000000"):
        evaluate_run(path, extractors=tiny_extractors(), cache_dir=False, progress=False)


def test_one_network_object_can_serve_two_metrics():
    from brainrecon.eval.extractors import FeatureNetwork

    class TwoNodes(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = TinyNet(0), TinyNet(1)
            self.calls = 0

        def forward(self, x):
            self.calls += 1
            return {"AlexNet(2)": self.a(x), "AlexNet(5)": self.b(x)}

    module = TwoNodes()
    net = FeatureNetwork("alexnet", ("AlexNet(2)", "AlexNet(5)"), module, None, "test")
    gt, rec = images(14, n=4, size=32)
    both = run_eval(gt, rec, metrics=["AlexNet(2)", "AlexNet(5)"],
                    extractors={"AlexNet(2)": net, "AlexNet(5)": net}, batch_size=4)
    assert module.calls == 2  # one forward per image set, not one per metric
    separate = run_eval(gt, rec, metrics=["AlexNet(2)", "AlexNet(5)"],
                        extractors={"AlexNet(2)": module.a, "AlexNet(5)": module.b})
    assert dict(both) == pytest.approx(dict(separate))
    only_one = run_eval(gt, rec, metrics=["AlexNet(5)"], extractors={"AlexNet(5)": net})
    assert list(only_one) == ["AlexNet(5)"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_gives_the_cpu_scores():
    gt, rec = images(15, n=6, size=64)
    cpu = run_eval(gt, rec, device="cpu")
    gpu = run_eval(gt, rec, device="cuda")
    for m in METRICS:
        assert gpu[m] == pytest.approx(cpu[m], abs=1e-4), m


def test_unavailable_cuda_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    gt, rec = images(16, n=2, size=16)
    with pytest.raises(DataError, match="no CUDA device is visible.*device='cpu'"):
        run_eval(gt, rec, metrics=["PixCorr"], device="cuda")
    with pytest.raises(DataError, match="Unknown device 'gpu0'"):
        run_eval(gt, rec, metrics=["PixCorr"], device="gpu0")
