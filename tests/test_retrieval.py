"""Brain <-> image retrieval, as the MindEye papers report it: 300-way top-1 in both directions,
in the decoder's target space (no weights) and in CLIP image space (with weights)."""

from __future__ import annotations

import csv
import io
import itertools
import json
from math import comb

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from brainrecon.eval import metrics as M
from brainrecon.eval.report import CLIP_RETRIEVAL_METRICS, TARGET_RETRIEVAL_METRICS
from brainrecon.testing.tiny import save_tiny_metric_clip

from test_eval_harness import images

runner = CliRunner()


def _onehot_case():
    """302 candidates e_j; every query e_i finds its own, except query 0 (one candidate beats it),
    query 1 (two beat it) and query 3 (one ties with it: a failure)."""
    n = 302
    cand = np.eye(n)
    query = np.eye(n)
    query[0, 5] = 2.0
    query[1, [7, 9]] = 2.0
    query[3, 8] = 1.0
    return query, cand


def test_300_way_retrieval_matches_a_hand_computation():
    query, cand = _onehot_case()
    got = M.retrieval_per_image(query, cand, way=300)
    # A set of 300 of the 302 images that contains image i leaves out 2 of the other 301.
    # Query 0 succeeds only if its one competitor is among those 2: 2/301. Query 1 needs both of
    # its competitors left out: 1/C(301, 2) = 1/45150. Query 3's tie counts as a failure: 2/301.
    assert got[0] == pytest.approx(2 / 301, rel=1e-12)
    assert got[1] == pytest.approx(1 / 45150, rel=1e-12)
    assert got[3] == pytest.approx(2 / 301, rel=1e-12)
    others = np.delete(np.arange(302), [0, 1, 3])
    assert (got[others] == 1.0).all()
    assert got.mean() == pytest.approx((299 + 4 / 301 + 1 / 45150) / 302, rel=1e-12)


def test_per_image_score_is_the_average_over_every_candidate_set_containing_the_image():
    rng = np.random.default_rng(0)
    n, way = 7, 4
    q, c = rng.normal(size=(n, 5)), rng.normal(size=(n, 5))
    sim = (q / np.linalg.norm(q, axis=1, keepdims=True)) @ (c / np.linalg.norm(c, axis=1, keepdims=True)).T
    brute = np.zeros(n)
    for i in range(n):
        sets = [s for s in itertools.combinations(range(n), way) if i in s]
        assert len(sets) == comb(n - 1, way - 1)
        brute[i] = np.mean([all(sim[i, i] > sim[i, j] for j in s if j != i) for s in sets])
    np.testing.assert_allclose(M.retrieval_per_image(q, c, way=way), brute, rtol=0, atol=1e-12)


def test_fewer_images_than_300_is_plain_n_way_top1():
    rng = np.random.default_rng(1)
    q = rng.normal(size=(100, 12))
    c = q + rng.normal(size=(100, 12)) * 1.5
    got = M.retrieval_per_image(q, c)
    sim = (q / np.linalg.norm(q, axis=1, keepdims=True)) @ (c / np.linalg.norm(c, axis=1, keepdims=True)).T
    np.testing.assert_array_equal(got, (sim.argmax(axis=1) == np.arange(100)).astype(float))
    assert 0 < got.mean() < 1


def test_zero_vectors_and_ties_fail():
    q = np.array([[1.0, 0], [0, 0], [1, 0]])
    c = np.array([[1.0, 0], [0, 1], [1, 0]])
    np.testing.assert_array_equal(M.retrieval_per_image(q, c), [0, 0, 0])  # 0 and 2 tie; 1 is a zero vector


def _mindeye_loop(emb, emb_, subsets):
    """MindEye's retrieval cell (MindEyeV2 final_evaluations.ipynb; MindEye1 Retrievals.py), with
    its helpers utils.batchwise_cosine_similarity and utils.topk, on the given subsets."""

    def batchwise_cosine_similarity(Z, B):
        B = B.T
        Z_norm = torch.linalg.norm(Z, dim=1, keepdim=True)
        B_norm = torch.linalg.norm(B, dim=0, keepdim=True)
        return ((Z @ B) / (Z_norm @ B_norm)).T

    def topk(similarities, labels, k=1):
        return torch.sum(torch.argsort(similarities, axis=1)[:, -1] == labels) / len(labels)

    fwds, bwds = [], []
    for s in subsets:
        e = torch.nn.functional.normalize(torch.as_tensor(emb[s]), dim=-1)  # CLIP-Image
        e_ = torch.nn.functional.normalize(torch.as_tensor(emb_[s]), dim=-1)  # CLIP-Brain
        labels = torch.arange(len(e))
        bwd_sim = batchwise_cosine_similarity(e, e_)  # clip, brain
        fwd_sim = batchwise_cosine_similarity(e_, e)  # brain, clip
        fwds.append(topk(fwd_sim, labels).item())
        bwds.append(topk(bwd_sim, labels).item())
    return float(np.mean(fwds)), float(np.mean(bwds))


def test_sampled_protocol_is_mindeyes_loop_and_its_directions_map_to_ours():
    rng = np.random.default_rng(2)
    n = 420
    images_emb = rng.normal(size=(n, 16)) + 1.0
    brain_emb = images_emb + rng.normal(size=(n, 16)) * 1.2
    brain_emb[:40] += 4.0  # "hub" predictions close to every image: the two directions differ
    sub_rng = np.random.default_rng(42)
    subsets = [sub_rng.choice(n, size=300, replace=False) for _ in range(30)]
    fwd, bwd = _mindeye_loop(images_emb, brain_emb, subsets)
    image_ret = M.retrieval_sampled(brain_emb, images_emb, seed=42)  # each prediction among the images
    brain_ret = M.retrieval_sampled(images_emb, brain_emb, seed=42)  # each image among the predictions
    assert image_ret == pytest.approx(bwd, abs=1e-6) and brain_ret == pytest.approx(fwd, abs=1e-6)
    assert image_ret - brain_ret > 0.05
    # The per-image scores average to the expectation the sampled loop estimates.
    many = M.retrieval_sampled(brain_emb, images_emb, repeats=800, seed=0)
    assert M.retrieval_per_image(brain_emb, images_emb).mean() == pytest.approx(many, abs=0.004)


# ---------------------------------------------------------------------------- in the harness


SMALL = "synthetic:n_train=120,n_test=12,image_size=32,surface_size=32"


@pytest.fixture(scope="module")
def ridge_run(tmp_path_factory, evaluated_ridge_runs):
    """Subject 1's run of the session's `fit --decoder ridge --alphas 100,10000`, copied."""
    from conftest import copy_runs

    out = copy_runs(evaluated_ridge_runs[0], tmp_path_factory.mktemp("runs"), ["ridge-subj01-pixels"])
    return next(p for p in out.iterdir() if (p / "run.json").exists())


def test_target_space_retrieval_needs_no_weights_and_reaches_per_image_csv(ridge_run):
    from brainrecon.eval.report import read_per_image
    from brainrecon.runs import Run
    from brainrecon.targets import get_target

    run = Run.open(ridge_run)
    saved = json.loads((ridge_run / "metrics.json").read_text())
    assert set(TARGET_RETRIEVAL_METRICS) <= set(saved["metrics"])
    retrieval = saved["settings"]["retrieval"]
    assert retrieval["target_space"] == "pixels (32, 32, 3)" and retrieval["way"] == 300
    assert retrieval["effective_way"]["ImageRet(target)"] == 12
    assert set(retrieval["mindeye_sampled"]["scores"]) == set(TARGET_RETRIEVAL_METRICS)
    ids, cols = read_per_image(ridge_run / "per_image.csv")
    ds = run.dataset()
    pos = {int(v): i for i, v in enumerate(ds.test.ids(1))}
    truth = get_target("pixels").load(ds.test, 1, progress=False)[[pos[int(i)] for i in ids]]
    pred = np.asarray(run.predictions())
    np.testing.assert_allclose(cols["ImageRet(target)"], M.retrieval_per_image(pred, truth), atol=1e-12)
    np.testing.assert_allclose(cols["BrainRet(target)"], M.retrieval_per_image(truth, pred), atol=1e-12)
    assert saved["metrics"]["ImageRet(target)"] == pytest.approx(cols["ImageRet(target)"].mean(), abs=1e-12)
    lo, hi = saved["intervals"]["ImageRet(target)"]
    assert lo <= saved["metrics"]["ImageRet(target)"] <= hi
    assert "pixels (32, 32, 3)" in saved["settings"]["retrieval"]["target_space"]


def test_retrieval_is_on_the_leaderboard_and_compared_like_the_others(ridge_run, tmp_path):
    import shutil

    from brainrecon.leaderboard import collect, leaderboard

    root = tmp_path / "runs"
    root.mkdir()
    shutil.copytree(ridge_run, root / "ridge-a")
    shutil.copytree(ridge_run, root / "ridge-b")
    for name in ("ridge-a", "ridge-b"):
        info = json.loads((root / name / "run.json").read_text())
        info["name"] = name
        (root / name / "run.json").write_text(json.dumps(info))
    table = leaderboard(root)
    assert "ImageRet(target) ↑" in table and "BrainRet(target) ↑" in table
    assert "retrieval (target space: pixels (32, 32, 3))" in table
    rows = {r["name"]: r for r in csv.DictReader(io.StringIO(leaderboard(root, fmt="csv")))}
    marks = sorted(rows[n]["ImageRet(target) mark"] for n in ("ridge-a", "ridge-b"))
    assert marks == ["best", "n.s."]  # the same run twice: p = 1
    # Retrieval in another target space is another metric: another group.
    metrics = json.loads((root / "ridge-b" / "metrics.json").read_text())
    metrics["settings"]["retrieval"]["target_space"] = "ipadapter (16, 768)"
    (root / "ridge-b" / "metrics.json").write_text(json.dumps(metrics))
    entries = {e.name: e for e in collect(root)}
    assert entries["ridge-a"].group_key != entries["ridge-b"].group_key


def test_image_decoders_have_no_target_space_and_say_so(ridge_run, tmp_path):
    import shutil

    from brainrecon.workflows.evaluate import evaluate_run

    path = tmp_path / "images-run"
    shutil.copytree(ridge_run, path)
    info = json.loads((path / "run.json").read_text())
    info.update(predicts="images", target=None)
    (path / "run.json").write_text(json.dumps(info))
    report = evaluate_run(path, metrics=["PixCorr", *TARGET_RETRIEVAL_METRICS], cache_dir=False, progress=False)
    assert "predicts images" in report.unavailable["ImageRet(target)"]
    assert "ImageRet(target)" not in report


def _clip_inputs(x_uint8):
    from brainrecon.eval import preprocess as H

    t = torch.from_numpy(x_uint8).permute(0, 3, 1, 2).float() / 255.0
    return H._normalise(H._resize(H._resize(t, 256), 224), "clip")


def test_clip_space_retrieval_with_clip_weights(tmp_path):
    from brainrecon.eval import evaluate
    from brainrecon.eval.extractors import build_network

    folder = save_tiny_metric_clip(tmp_path / "w" / "clip-vit-large-patch14", seed=0)
    gt, rec = images(5, n=8, size=40, noise=30)
    kw = {"weights_dir": folder.parent, "cache_dir": False, "progress": False}
    report = evaluate(gt, rec, metrics=["CLIP", *CLIP_RETRIEVAL_METRICS], **kw)
    net = build_network("clip", weights_dir=folder.parent)
    with torch.no_grad():
        f_gt, f_rec = net(_clip_inputs(gt))["CLIP"], net(_clip_inputs(rec))["CLIP"]
    np.testing.assert_allclose(report.per_image["ImageRet(CLIP)"], M.retrieval_per_image(f_rec, f_gt), atol=1e-12)
    np.testing.assert_allclose(report.per_image["BrainRet(CLIP)"], M.retrieval_per_image(f_gt, f_rec), atol=1e-12)
    assert report.settings["retrieval"]["clip_space"].startswith("the CLIP metric's image embeddings")
    # Retrieval alone still runs CLIP, without reporting the two-way CLIP score.
    alone = evaluate(gt, rec, metrics=["ImageRet(CLIP)"], **kw)
    assert list(alone) == ["ImageRet(CLIP)"] and alone.unavailable == {}
    assert alone["ImageRet(CLIP)"] == report["ImageRet(CLIP)"]
    # Without the weights: unavailable, with CLIP's reason.
    missing = evaluate(gt, rec, metrics=["ImageRet(CLIP)"], weights_dir=tmp_path / "none", cache_dir=False,
                       progress=False)
    assert "not found" in missing.unavailable["ImageRet(CLIP)"] and "CLIP" not in missing.unavailable


def test_published_retrieval_rows_are_cited_with_their_space():
    from brainrecon.eval.published import published_rows

    rows = [r for r in published_rows(subject=1) if r.kind == "retrieval"]
    me1 = next(r for r in rows if r.method == "MindEye (retrieval)")
    me2 = next(r for r in rows if r.method == "MindEye2 (retrieval)")
    assert me1.scores == {"ImageRet(CLIP)": 0.9468, "BrainRet(CLIP)": 0.9718} and me1.n_images == 982
    assert me2.scores == {"ImageRet(CLIP)": 0.9987, "BrainRet(CLIP)": 0.9996} and me2.n_images == 1000
    for r in rows:
        assert "comparable to ImageRet(CLIP)/BrainRet(CLIP) only in kind" in r.citation
        assert "6b30ea53" in r.citation or "c1847188" in r.citation
    assert {r.subjects for r in published_rows(subject=7) if r.kind == "retrieval"} == {"7"}


def test_grid_images_chooses_how_many_and_the_grid_names_them(ridge_run, tmp_path):
    import shutil

    from PIL import Image

    from brainrecon.cli import app
    from brainrecon.leaderboard import leaderboard
    from brainrecon.runs import Run

    path = tmp_path / "runs" / "ridge-grid"
    shutil.copytree(ridge_run, path)
    before = Image.open(path / "grid.png").size
    result = runner.invoke(app, ["evaluate", str(path), "--grid-images", "3"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    saved = json.loads((path / "metrics.json").read_text())
    ids = [int(v) for v in Run.open(path).test_ids()[:3]]
    assert saved["settings"]["grid_ids"] == ids
    after = Image.open(path / "grid.png").size
    assert after[1] < before[1] and after[0] > before[0] - 1  # 3 rows instead of 8, ids at the left
    page = leaderboard(tmp_path / "runs", fmt="html")
    assert f"test images {', '.join(map(str, ids))} (3 of 12)" in page
