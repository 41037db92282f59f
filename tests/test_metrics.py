"""The pure metric functions against plain-loop implementations and scikit-image / scipy."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.spatial.distance
import torch
from skimage.color import rgb2gray
from skimage.metrics import structural_similarity

from brainrecon.eval import metrics as M


def _images(seed, n=4, h=37, w=45, noise=0.25):
    rng = np.random.default_rng(seed)
    gt = rng.random((n, 3, h, w))
    rec = np.clip(gt + noise * rng.standard_normal(gt.shape), 0, 1)
    return gt, rec


def _pearson_loop(a, b):
    a = [float(x) for x in np.ravel(a)]
    b = [float(x) for x in np.ravel(b)]
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    num = sum((x - ma) * (y - mb) for x, y in zip(a, b))
    da = sum((x - ma) ** 2 for x in a) ** 0.5
    db = sum((y - mb) ** 2 for y in b) ** 0.5
    return num / (da * db)


# ---------------------------------------------------------------------------- PixCorr


def test_pixcorr_matches_loop():
    gt, rec = _images(0, n=3, h=9, w=11)
    expected = np.mean([_pearson_loop(gt[i], rec[i]) for i in range(3)])
    assert M.pixcorr(gt, rec) == pytest.approx(expected, abs=1e-12)
    assert M.pixcorr(torch.from_numpy(gt).float(), torch.from_numpy(rec).float()) == pytest.approx(expected, abs=1e-6)


def test_pixcorr_uses_all_channels_not_gray():
    gt, rec = _images(1, n=2, h=8, w=8)
    expected = np.mean([np.corrcoef(gt[i].ravel(), rec[i].ravel())[0, 1] for i in range(2)])
    assert M.pixcorr(gt, rec) == pytest.approx(expected, abs=1e-12)


def test_pixcorr_identical_is_one_and_shape_mismatch_raises():
    gt, _ = _images(2)
    assert M.pixcorr(gt, gt) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="shape"):
        M.pixcorr(gt, gt[:, :, :-1])


# ---------------------------------------------------------------------------- SSIM


def _skimage_ssim(gt, rec, columnwise=False):
    out = []
    for i in range(len(gt)):
        g = rgb2gray(gt[i].transpose(1, 2, 0))
        r = rgb2gray(rec[i].transpose(1, 2, 0))
        kwargs = dict(gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.0)
        if columnwise:
            # What `multichannel=True` meant on a 2-D gray image under scikit-image <= 0.19.
            kwargs["channel_axis"] = -1
        out.append(structural_similarity(r, g, **kwargs))
    return np.array(out)


@pytest.mark.parametrize("mode", ["2d", "columnwise"])
@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_ssim_matches_skimage(mode, backend):
    gt, rec = _images(3)
    expected = _skimage_ssim(gt, rec, columnwise=(mode == "columnwise"))
    if backend == "torch":
        gt, rec = torch.from_numpy(gt), torch.from_numpy(rec)
    got = M.ssim_per_image(gt, rec, mode=mode)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)
    assert M.ssim(gt, rec, mode=mode) == pytest.approx(expected.mean(), abs=1e-12)


def test_ssim_modes_differ_and_identical_is_one():
    gt, rec = _images(4, noise=0.4)
    assert abs(M.ssim(gt, rec, "2d") - M.ssim(gt, rec, "columnwise")) > 1e-3
    assert M.ssim(gt, gt) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="Unknown SSIM mode 'multichannel'.*'2d', 'columnwise'"):
        M.ssim(gt, rec, mode="multichannel")


def test_ssim_on_small_square_images_matches_skimage():
    gt, rec = _images(5, n=2, h=16, w=16)
    np.testing.assert_allclose(M.ssim_per_image(gt, rec), _skimage_ssim(gt, rec), atol=1e-12)


# ---------------------------------------------------------------------------- two-way identification


def _two_way_loop(fg, fr):
    n = len(fg)
    per_rec = []
    for j in range(n):
        own = _pearson_loop(fg[j], fr[j])
        wins = 0
        for i in range(n):
            if i == j:
                continue
            other = _pearson_loop(fg[i], fr[j])
            if other < own:  # strict: ties are failures
                wins += 1
        per_rec.append(wins / (n - 1))
    return float(np.mean(per_rec))


def test_two_way_matches_loop_on_random_features():
    rng = np.random.default_rng(6)
    fg = rng.standard_normal((9, 13))
    fr = fg + 1.2 * rng.standard_normal((9, 13))
    expected = _two_way_loop(fg, fr)
    assert 0 < expected < 1
    assert M.two_way_identification(fg, fr) == pytest.approx(expected, abs=1e-12)
    assert M.two_way_identification(torch.from_numpy(fg), torch.from_numpy(fr)) == pytest.approx(expected, abs=1e-12)


def test_two_way_matches_corrcoef_reference_and_flattens_maps():
    """The reference implementation: np.corrcoef on the stacked 2N x D matrix."""
    rng = np.random.default_rng(7)
    fg = rng.standard_normal((7, 2, 3, 3)).astype(np.float32)
    fr = (fg + rng.standard_normal(fg.shape)).astype(np.float32)
    n = len(fg)
    c = np.corrcoef(np.concatenate([fg.reshape(n, -1), fr.reshape(n, -1)]).astype(np.float64))[:n, n:]
    expected = np.mean([(c[:, j] < c[j, j]).sum() / (n - 1) for j in range(n)])
    assert M.two_way_identification(fg, fr) == pytest.approx(expected, abs=1e-12)


def test_two_way_blocked_accumulation_equals_one_block(monkeypatch):
    rng = np.random.default_rng(8)
    fg = rng.standard_normal((6, 50))
    fr = fg + rng.standard_normal((6, 50))
    whole = M.two_way_per_reconstruction(fg, fr)
    monkeypatch.setattr(M, "_BLOCK_ELEMENTS", 6 * 7)  # 7 features per block
    np.testing.assert_allclose(M.two_way_per_reconstruction(fg, fr), whole)


def test_two_way_ties_are_failures():
    # Every ground truth has the same features: each distractor ties with the true match.
    fg = np.tile(np.array([[1.0, 2.0, 3.0, 5.0]]), (3, 1))
    fr = np.array([[1.0, 2.0, 3.0, 4.0], [4.0, 3.0, 2.0, 1.0], [1.0, 3.0, 2.0, 4.0]])
    assert M.two_way_identification(fg, fr) == 0.0
    assert _two_way_loop(fg, fr) == 0.0


def test_two_way_constant_features_fail_and_perfect_is_one():
    rng = np.random.default_rng(9)
    fg = rng.standard_normal((5, 8))
    assert M.two_way_identification(fg, fg) == 1.0
    fr = fg.copy()
    fr[2] = 1.0  # constant vector: its correlations are NaN
    per = M.two_way_per_reconstruction(fg, fr)
    assert per[2] == 0.0
    assert np.all(per[[0, 1, 3, 4]] == 1.0)


def test_two_way_orientation_is_one_recon_vs_two_gts():
    rng = np.random.default_rng(10)
    fg = rng.standard_normal((6, 10))
    fr = fg + 2 * rng.standard_normal((6, 10))
    # Swapping roles generally changes the score; the function must match the recon-column loop.
    assert M.two_way_identification(fg, fr) == pytest.approx(_two_way_loop(fg, fr))


def test_two_way_needs_two_images_and_equal_shapes():
    with pytest.raises(ValueError, match="at least 2"):
        M.two_way_identification(np.ones((1, 3)), np.ones((1, 3)))
    with pytest.raises(ValueError, match="must match"):
        M.two_way_identification(np.ones((3, 3)), np.ones((3, 4)))


# ---------------------------------------------------------------------------- correlation distance


def test_correlation_distance_matches_scipy():
    rng = np.random.default_rng(11)
    fg = rng.standard_normal((8, 20))
    fr = fg + rng.standard_normal((8, 20))
    expected = np.mean([scipy.spatial.distance.correlation(fg[i], fr[i]) for i in range(8)])
    assert M.correlation_distance(fg, fr) == pytest.approx(expected, abs=1e-12)
    assert M.correlation_distance(torch.from_numpy(fg).float(), torch.from_numpy(fr).float()) == pytest.approx(
        expected, abs=1e-6
    )
    loop = np.mean([1 - _pearson_loop(fg[i], fr[i]) for i in range(8)])
    assert M.correlation_distance(fg, fr) == pytest.approx(loop, abs=1e-12)


def test_correlation_distance_identical_is_zero():
    fg = np.random.default_rng(12).standard_normal((4, 6, 1, 1))
    assert M.correlation_distance(fg, fg) == pytest.approx(0.0, abs=1e-12)
