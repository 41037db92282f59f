"""Evaluation you can cite: cache identity, OpenAI's CLIP file, per-image scores, intervals,
paired comparisons."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
import torch
from torch import nn

from brainrecon.eval import EvalReport, evaluate
from brainrecon.eval import weights as W
from brainrecon.eval.extractors import build_network
from brainrecon.eval.report import CLIP_RETRIEVAL_METRICS, METRICS, read_per_image
from brainrecon.eval.stats import bootstrap_interval, paired_comparison
from brainrecon.testing.tiny import random_swav_state, save_tiny_metric_clip

from test_eval_harness import images, run_eval


# ---------------------------------------------------------------------------- cache identity


def test_changing_clip_weights_of_equal_size_changes_the_cache_key_and_the_score(tmp_path):
    a = save_tiny_metric_clip(tmp_path / "a" / "clip-vit-large-patch14", seed=0)
    b = save_tiny_metric_clip(tmp_path / "b" / "clip-vit-large-patch14", seed=7)
    assert (a / "model.safetensors").stat().st_size == (b / "model.safetensors").stat().st_size
    assert (a / "model.safetensors").read_bytes() != (b / "model.safetensors").read_bytes()
    key_a = build_network("clip", weights_dir=a.parent).cache_key
    key_b = build_network("clip", weights_dir=b.parent).cache_key
    assert key_a != key_b

    gt, rec = images(3, n=6, size=40)
    cache = tmp_path / "cache"
    kw = {"metrics": ["CLIP"], "progress": False}
    first = evaluate(gt, rec, weights_dir=a.parent, cache_dir=cache, **kw)
    with_b = evaluate(gt, rec, weights_dir=b.parent, cache_dir=cache, **kw)
    fresh_b = evaluate(gt, rec, weights_dir=b.parent, cache_dir=False, **kw)
    assert with_b.settings["gt_features_cached"] == []  # weights A's features are not reused
    assert with_b["CLIP"] == fresh_b["CLIP"]
    assert evaluate(gt, rec, weights_dir=a.parent, cache_dir=cache, **kw).settings["gt_features_cached"] == ["CLIP"]
    assert first.settings["networks"]["CLIP"] != with_b.settings["networks"]["CLIP"]
    assert first.settings["weights_identity"]["CLIP"] == key_a and with_b.settings["weights_identity"]["CLIP"] == key_b


def test_swav_weights_of_equal_size_get_different_cache_keys(tmp_path):
    keys = []
    for seed in (0, 1):
        d = tmp_path / str(seed)
        d.mkdir()
        torch.save(random_swav_state(seed), d / "swav_800ep_pretrain.pth.tar")
        keys.append(build_network("swav", weights_dir=d).cache_key)
    sizes = {(tmp_path / s / "swav_800ep_pretrain.pth.tar").stat().st_size for s in ("0", "1")}
    assert len(sizes) == 1 and keys[0] != keys[1]


def test_file_digest_is_remembered_and_follows_changes(tmp_path):
    f = tmp_path / "w.bin"
    f.write_bytes(b"x" * 1000)
    d1 = W.file_digest(f)
    assert W._digest_index_path().is_file()  # persisted for the next process
    W._digests.clear()
    assert W.file_digest(f) == d1
    f.write_bytes(b"y" * 1000)  # same size, new content (and a new mtime)
    import os

    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10_000_000))
    assert W.file_digest(f) != d1


# ---------------------------------------------------------------------------- OpenAI's CLIP file


class _QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class _Block(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_1 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict(
            [("c_fc", nn.Linear(width, 4 * width)), ("gelu", _QuickGELU()), ("c_proj", nn.Linear(4 * width, width))]
        ))
        self.ln_2 = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class _Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int):
        super().__init__()
        self.resblocks = nn.Sequential(*[_Block(width, heads) for _ in range(layers)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resblocks(x)


class _Visual(nn.Module):
    """OpenAI CLIP's image tower in its key layout (sequence-first attention, as OpenAI's)."""

    def __init__(self, resolution=224, patch=56, width=128, layers=2, out_dim=12):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, patch, stride=patch, bias=False)
        scale = width ** -0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn((resolution // patch) ** 2 + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = _Transformer(width, layers, width // 64)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x).flatten(2).permute(0, 2, 1)
        cls = self.class_embedding.to(x.dtype) + torch.zeros(x.shape[0], 1, x.shape[-1], dtype=x.dtype)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding
        x = self.ln_pre(x).permute(1, 0, 2)
        x = self.transformer(x).permute(1, 0, 2)
        return self.ln_post(x[:, 0, :]) @ self.proj


class _OpenAIClip(nn.Module):
    def __init__(self):
        super().__init__()
        self.visual = _Visual()
        self.token_embedding = nn.Embedding(10, 8)  # a text-tower key the metric ignores
        self.logit_scale = nn.Parameter(torch.ones([]))

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        return self.visual(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encode_image(x)


def test_openai_torchscript_clip_file_is_accepted(tmp_path):
    torch.manual_seed(0)
    ref = _OpenAIClip().eval()
    with torch.no_grad():
        for p in ref.parameters():  # LayerNorms away from identity, so a mix-up would show
            p.add_(0.02 * torch.randn_like(p))
    scripted = torch.jit.script(ref)
    scripted.save(str(tmp_path / "ViT-L-14.pt"))
    assert W.find_weights(W.WEIGHT_FILES["clip"], tmp_path) == tmp_path / "ViT-L-14.pt"

    net = build_network("clip", weights_dir=tmp_path)
    x = torch.rand(3, 3, 224, 224)
    with torch.no_grad():
        expected = ref.encode_image(x)
    torch.testing.assert_close(net(x)["CLIP"], expected, atol=1e-5, rtol=1e-5)
    assert "ViT-L-14.pt" in net.source and "OpenAI" in net.source
    assert net.cache_key.startswith("clip-openai:ViT-L-14.pt-sha256:")

    gt, rec = images(5, n=4, size=32)
    report = evaluate(gt, rec, metrics=["CLIP"], weights_dir=tmp_path, cache_dir=False, progress=False)
    assert "ViT-L-14.pt" in report.settings["networks"]["CLIP"]


def test_a_file_without_clip_image_tower_is_a_clear_error(tmp_path):
    torch.jit.script(nn.Linear(2, 2)).save(str(tmp_path / "ViT-L-14.pt"))
    from brainrecon.errors import WeightsNotFoundError

    with pytest.raises(WeightsNotFoundError, match="no OpenAI CLIP image tower"):
        build_network("clip", weights_dir=tmp_path)


# ---------------------------------------------------------------------------- per-image scores


def test_per_image_means_equal_the_metrics_and_round_trip_through_csv(tmp_path):
    gt, rec = images(1, n=10, size=40)
    ids = np.arange(100, 110)[::-1].copy()
    report = run_eval(gt, rec, gt_ids=ids, rec_ids=ids)
    scored = METRICS + CLIP_RETRIEVAL_METRICS  # retrieval in the (here: tiny) CLIP network's space
    assert list(report.per_image) == list(scored)
    for m in scored:
        assert len(report.per_image[m]) == 10
        assert np.mean(report.per_image[m]) == pytest.approx(report[m], abs=1e-12)
        lo, hi = report.intervals[m]
        assert lo <= report[m] <= hi
    assert report.bootstrap["n_resamples"] == 2000 and report.bootstrap["seed"] == 0
    assert "two-way" in report.bootstrap["two_way_note"]

    report.save(tmp_path / "metrics.json")
    read_ids, cols = read_per_image(tmp_path / "per_image.csv")
    np.testing.assert_array_equal(read_ids, ids)
    for m in scored:
        np.testing.assert_array_equal(cols[m], report.per_image[m])  # exact floats
    back = EvalReport.load(tmp_path / "metrics.json")
    assert back.intervals == report.intervals
    np.testing.assert_array_equal(back.per_image["CLIP"], report.per_image["CLIP"])

    pd = pytest.importorskip("pandas")
    frame = pd.read_csv(tmp_path / "per_image.csv", index_col="image_id")
    assert list(frame.columns) == list(scored) and list(frame.index) == list(ids)
    assert frame["SSIM"].mean() == pytest.approx(report["SSIM"], abs=1e-12)


def test_damaged_per_image_file_is_a_clear_error(tmp_path):
    from brainrecon.errors import DataError

    (tmp_path / "per_image.csv").write_text("image_id,CLIP\n1,0.5\n2,zero\n")
    with pytest.raises(DataError, match="malformed row.*brainrecon evaluate"):
        read_per_image(tmp_path / "per_image.csv")
    (tmp_path / "per_image.csv").write_text("id,Foo\n")
    with pytest.raises(DataError, match="bad header"):
        read_per_image(tmp_path / "per_image.csv")


def test_same_seed_same_intervals_other_seed_other_intervals():
    gt, rec = images(2, n=8, size=40)
    a = run_eval(gt, rec)
    b = run_eval(gt, rec)
    c = run_eval(gt, rec, seed=1)
    assert a.intervals == b.intervals
    assert a.intervals["PixCorr"] != c.intervals["PixCorr"]


# ---------------------------------------------------------------------------- statistics


def test_intervals_contain_the_mean_and_shrink_with_n():
    rng = np.random.default_rng(0)
    widths = []
    for n in (50, 200, 800):
        v = rng.normal(0.3, 0.1, n)
        lo, hi = bootstrap_interval(v, seed=0)
        assert lo < v.mean() < hi
        widths.append(hi - lo)
    assert widths[0] > widths[1] > widths[2]
    assert widths[0] / widths[2] == pytest.approx(4, rel=0.25)  # ~ 1/sqrt(n)
    assert bootstrap_interval(v, seed=3) == bootstrap_interval(v, seed=3)
    assert all(np.isnan(bootstrap_interval([0.1, np.nan])))


def test_identical_runs_are_never_significant():
    v = np.random.default_rng(1).uniform(size=300)
    c = paired_comparison(v, v.copy(), metric="SSIM")
    assert c.diff == 0 and c.p_value == 1.0 and not c.significant(0.05)
    assert c.wins_a == c.wins_b == 0 and c.ties == 300 and c.better == "tie"


def test_a_clearly_better_run_is_significant_in_either_direction():
    rng = np.random.default_rng(2)
    b = rng.uniform(0.2, 0.6, 200)
    a = b + rng.normal(0.03, 0.02, 200)
    c = paired_comparison(a, b, metric="SSIM", higher_is_better=True)
    assert c.significant(0.05) and c.p_value < 0.001 and c.better == "a"
    assert c.diff_lo > 0 and c.wins_a > c.wins_b
    # For a distance, lower is better: the same numbers favour run B.
    d = paired_comparison(a, b, metric="SwAV", higher_is_better=False)
    assert d.better == "b" and d.wins_b == c.wins_a
    assert paired_comparison(a, b, seed=4) == paired_comparison(a, b, seed=4)


def test_noise_alone_is_rarely_significant():
    rng = np.random.default_rng(3)
    hits = 0
    for _ in range(40):
        base = rng.uniform(size=100)
        hits += paired_comparison(base + rng.normal(0, 0.05, 100), base + rng.normal(0, 0.05, 100),
                                  n_permutations=999, n_resamples=200).significant(0.05)
    assert hits <= 6  # ~2 expected at alpha = 0.05


# ---------------------------------------------------------------------------- leaderboard


def _run_with_scores(root, name, per_image, ids):
    from brainrecon.io import write_array_atomic, write_json_atomic

    path = root / name
    path.mkdir(parents=True)
    write_array_atomic(path / "test_ids.npy", np.asarray(ids, dtype=np.int64))
    write_json_atomic(path / "run.json", {
        "name": name, "decoder": name.split("-")[0], "params": {}, "subject": 1, "target": "pixels",
        "predicts": "target", "data": {"kind": "synthetic", "seed": 0}, "data_name": "synthetic(seed=0)",
        "ids_are_nsd": False, "fingerprint": "fp", "n_test": len(ids),
    })
    from brainrecon.eval.stats import bootstrap_interval

    EvalReport({m: float(np.mean(v)) for m, v in per_image.items()}, n_images=len(ids), variant="mindeye",
               per_image=per_image, ids=ids,
               intervals={m: bootstrap_interval(v) for m, v in per_image.items()}).save(path / "metrics.json")
    return path


@pytest.fixture()
def three_runs(tmp_path):
    rng = np.random.default_rng(0)
    n = 120
    ids = np.arange(1000, 1000 + n)
    base = {m: rng.uniform(0.3, 0.7, n) for m in METRICS}
    better = {m: v + (0.05 if m not in ("EffNet-B", "SwAV") else -0.05) + rng.normal(0, 0.01, n)
              for m, v in base.items()}
    root = tmp_path / "runs"
    _run_with_scores(root, "ridge-best", better, ids)
    _run_with_scores(root, "neuropictor-same", {m: v.copy() for m, v in better.items()}, ids)
    # A clearly worse run, its rows stored in another order (matched by id, not position).
    order = rng.permutation(n)
    _run_with_scores(root, "brainguard-worse", {m: v[order] for m, v in base.items()}, ids[order])
    return root


def test_leaderboard_shows_intervals_and_marks_ties_with_the_best(three_runs):
    from brainrecon.leaderboard import leaderboard

    table = leaderboard(three_runs, fmt="table")
    lines = {ln.split()[1]: ln for ln in table.splitlines() if ln[:1].isdigit()}
    assert "±" in lines["ridge-best"]
    # Two identical runs tie for best: one is the reference, the other is never distinguishable from it.
    marks = sorted([lines["ridge-best"].count("n.s."), lines["neuropictor-same"].count("n.s.")])
    assert marks == [0, 8]
    assert sorted([lines["ridge-best"].count("(best)"), lines["neuropictor-same"].count("(best)")]) == [0, 8]
    assert "n.s." not in lines["brainguard-worse"]  # clearly worse on every metric
    assert "max-statistic permutation test" in table and "alpha = 0.05" in table

    md = leaderboard(three_runs, fmt="markdown")
    assert md.count(" n.s.") >= 8 and "±" in md
    html = leaderboard(three_runs, fmt="html")
    assert html.count('class="ns"') == 8 and "p = " in html

    import csv
    import io

    rows = {r["name"]: r for r in csv.DictReader(io.StringIO(leaderboard(three_runs, fmt="csv")))}
    ref, twin = ("neuropictor-same", "ridge-best") if rows["ridge-best"]["CLIP p_vs_best"] else ("ridge-best", "neuropictor-same")
    assert rows[twin]["CLIP mark"] == "n.s." and rows[ref]["CLIP mark"] == "best"
    assert float(rows[twin]["CLIP p_vs_best"]) == 1.0 and float(rows[twin]["CLIP p_adjusted"]) == 1.0
    assert rows["brainguard-worse"]["CLIP mark"] == "differs"
    assert float(rows["brainguard-worse"]["SwAV p_vs_best"]) < 0.001
    assert rows[ref]["CLIP p_vs_best"] == ""  # the reference itself
    lo, hi = float(rows["ridge-best"]["SSIM lo"]), float(rows["ridge-best"]["SSIM hi"])
    assert lo < float(rows["ridge-best"]["SSIM"]) < hi

    # A strict enough alpha turns nothing into "significant" that was not.
    assert leaderboard(three_runs, fmt="table", alpha=0.5).count("n.s.") >= 8
    from brainrecon.errors import DataError

    with pytest.raises(DataError, match="alpha must be between 0 and 1"):
        leaderboard(three_runs, alpha=5)


def test_leaderboard_of_old_runs_without_per_image_scores_says_how_to_get_them(three_runs):
    from brainrecon.leaderboard import leaderboard

    for f in three_runs.glob("*/per_image.csv"):
        f.unlink()
    table = leaderboard(three_runs, fmt="table")
    assert " n.s." not in table and "re-run `brainrecon evaluate RUN`" in table


def test_network_metrics_on_a_subset_equal_scoring_that_subset(tmp_path):
    gt, rec = images(4, n=9, size=40)
    part = run_eval(gt, rec, network_images=4, batch_size=3)
    first4 = run_eval(gt[:4], rec[:4])
    whole = run_eval(gt, rec)
    assert part.settings["network_images"] == 4
    for m in ("AlexNet(2)", "CLIP", "SwAV"):
        assert part[m] == pytest.approx(first4[m], abs=1e-12)
        assert np.isnan(part.per_image[m][4:]).all() and len(part.per_image[m]) == 9
    assert part["PixCorr"] == pytest.approx(whole["PixCorr"], abs=1e-12)
    part.save(tmp_path / "metrics.json")
    _, cols = read_per_image(tmp_path / "per_image.csv")
    assert np.isnan(cols["CLIP"][4:]).all() and not np.isnan(cols["SSIM"]).any()
    from brainrecon.errors import DataError

    with pytest.raises(DataError, match="network_images must be at least 2"):
        run_eval(gt, rec, network_images=1)
