"""Ridge: the exact leave-one-out solver against brute force and scikit-learn, backends,
granularities, the estimator conventions, and the ``ridge`` decoder."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import sklearn.exceptions
from sklearn.base import clone
from sklearn.linear_model import Ridge
from sklearn.linear_model import RidgeCV as SklearnRidgeCV

from brainrecon.decoders.ridge import (
    RIDGE_CV_SOLVERS,
    AlphaGridWarning,
    RidgeCV,
    RidgeDecoder,
    default_alphas,
    get_ridge_backend,
)
from brainrecon.errors import BrainreconError, DataError, NotFittedError

from conformance import DecoderConformance

# Compares solvers, engines (numpy, torch) and references: .ci/run repeats these with one thread.
pytestmark = pytest.mark.numerics

CUDA = pytest.mark.skipif(
    not __import__("torch").cuda.is_available(), reason="needs a CUDA GPU"
)


def make_problem(n, p, t, seed=0, dtype=np.float64):
    """Targets with varied signal-to-noise, so that different targets prefer different alphas."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, p)) + 0.5
    W = rng.standard_normal((p, t)) * rng.uniform(0.0, 1.0, t) / np.sqrt(p)
    Y = X @ W + rng.standard_normal((n, t)) + rng.standard_normal(t) * 3
    return X.astype(dtype), Y.astype(dtype)


def fit_quiet(model, X, Y):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AlphaGridWarning)
        return model.fit(X, Y)


ALPHAS = np.logspace(-1, 4, 8)


def exact(**params):
    """A float64 numpy RidgeCV on the test grid."""
    return RidgeCV(**{"alphas": ALPHAS, "device": "numpy", "dtype": "float64", **params})


def brute_force_loo(X, Y, alphas):
    """Mean squared LOO error per (alpha, target): one sklearn Ridge fit per left-out row."""
    n = X.shape[0]
    out = np.zeros((len(alphas), Y.shape[1]))
    for a, alpha in enumerate(alphas):
        for i in range(n):
            keep = np.arange(n) != i
            model = Ridge(alpha=alpha, fit_intercept=True, solver="svd").fit(X[keep], Y[keep])
            out[a] += (model.predict(X[i : i + 1])[0] - Y[i]) ** 2
    return out / n


# --------------------------------------------------------------------------- solver math
@pytest.mark.parametrize("n, p", [(30, 70), (45, 12)], ids=["dual", "primal"])
def test_loo_scores_equal_brute_force(n, p):
    X, Y = make_problem(n, p, 4)
    alphas = [0.3, 3.0, 30.0, 300.0]
    model = fit_quiet(RidgeCV(alphas=alphas, device="numpy", dtype="float64"), X, Y)
    assert model.route_ == ("dual" if n <= p else "primal")
    np.testing.assert_allclose(model.cv_scores_, brute_force_loo(X, Y, alphas), rtol=1e-10)


@pytest.mark.parametrize("device", ["numpy", "cpu"])
@pytest.mark.parametrize("n, p", [(60, 150), (150, 40)], ids=["dual", "primal"])
def test_matches_sklearn_ridgecv(n, p, device):
    X, Y = make_problem(n, p, 12, seed=1)
    ours = fit_quiet(RidgeCV(alphas=ALPHAS, device=device, dtype="float64"), X, Y)
    ref = SklearnRidgeCV(alphas=ALPHAS, alpha_per_target=True, fit_intercept=True).fit(X, Y)
    assert len(np.unique(ours.alphas_)) > 2  # the problem exercises per-target selection
    np.testing.assert_array_equal(ours.alphas_, ref.alpha_)
    np.testing.assert_allclose(ours.coef_, ref.coef_.T, rtol=1e-9, atol=1e-12)
    X_test, _ = make_problem(20, p, 1, seed=2)
    pred, pred_ref = ours.predict(X_test), ref.predict(X_test)
    assert np.linalg.norm(pred - pred_ref) / np.linalg.norm(pred_ref) <= 1e-4
    np.testing.assert_allclose(pred, pred_ref, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("n, p", [(50, 90), (90, 30)], ids=["dual", "primal"])
def test_refit_equals_per_target_ridge(n, p):
    X, Y = make_problem(n, p, 9, seed=3)
    model = fit_quiet(exact(), X, Y)
    for j in range(Y.shape[1]):
        ref = Ridge(alpha=model.alphas_[j], fit_intercept=True, solver="svd").fit(X, Y[:, j])
        np.testing.assert_allclose(model.coef_[:, j], ref.coef_, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(model.intercept_[j], ref.intercept_, rtol=1e-9, atol=1e-10)


def test_gcv_scores_follow_their_definition():
    X, Y = make_problem(25, 40, 3, seed=4)
    alphas = [1.0, 10.0, 100.0]
    model = fit_quiet(RidgeCV(alphas=alphas, cv="gcv", device="numpy", dtype="float64"), X, Y)
    n = X.shape[0]
    Xc = X - X.mean(0)
    for a, alpha in enumerate(alphas):
        H = np.ones((n, n)) / n + Xc @ np.linalg.solve(Xc.T @ Xc + alpha * np.eye(X.shape[1]), Xc.T)
        resid = Y - H @ Y
        expected = (resid**2).mean(0) / (1 - np.trace(H) / n) ** 2
        np.testing.assert_allclose(model.cv_scores_[a], expected, rtol=1e-9)


@pytest.mark.parametrize("n, p", [(40, 80), (80, 25)], ids=["dual", "primal"])
def test_loo_prediction_stats_equal_brute_force(n, p):
    X, Y = make_problem(n, p, 5, seed=5)
    model = fit_quiet(
        exact(loo_prediction_stats=True), X, Y
    )
    loo = np.zeros_like(Y)
    for i in range(n):
        keep = np.arange(n) != i
        for j in range(Y.shape[1]):
            ridge = Ridge(alpha=model.alphas_[j], solver="svd").fit(X[keep], Y[keep, j])
            loo[i, j] = ridge.predict(X[i : i + 1])[0]
    np.testing.assert_allclose(model.loo_mean_, loo.mean(0), rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(model.loo_std_, loo.std(0), rtol=1e-9)


@pytest.mark.parametrize("cv", ["loo", "gcv"])
def test_target_batches_give_the_same_fit(cv):
    X, Y = make_problem(40, 60, 11, seed=6)
    whole = fit_quiet(exact(cv=cv, loo_prediction_stats=True), X, Y)
    batched = fit_quiet(exact(cv=cv, loo_prediction_stats=True, n_targets_batch=3), X, Y)
    np.testing.assert_allclose(batched.cv_scores_, whole.cv_scores_, rtol=1e-12)
    np.testing.assert_allclose(batched.coef_, whole.coef_, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(batched.loo_mean_, whole.loo_mean_, rtol=1e-10)
    np.testing.assert_allclose(batched.loo_std_, whole.loo_std_, rtol=1e-10)


def test_dual_and_primal_routes_agree():
    from brainrecon.decoders.ridge import solve_ridge_loo

    backend = get_ridge_backend("numpy")
    X, Y = make_problem(50, 45, 6, seed=7)
    dual = solve_ridge_loo(X, Y, ALPHAS, backend=backend, route="dual")
    primal = solve_ridge_loo(X, Y, ALPHAS, backend=backend, route="primal")
    np.testing.assert_allclose(dual["cv_scores"], primal["cv_scores"], rtol=1e-8)
    np.testing.assert_allclose(dual["coef"], primal["coef"], rtol=1e-7, atol=1e-10)


def test_overwrite_inputs_centres_in_place_with_the_same_result():
    from brainrecon.decoders.ridge import solve_ridge_loo

    backend = get_ridge_backend("numpy")
    X, Y = make_problem(30, 50, 4, seed=12)
    ref = solve_ridge_loo(X, Y, ALPHAS, backend=backend)
    Xw, Yw = X.copy(), Y.copy()
    out = solve_ridge_loo(Xw, Yw, ALPHAS, backend=backend, overwrite_inputs=True)
    np.testing.assert_allclose(Xw.mean(0), 0, atol=1e-12)  # centred in place
    np.testing.assert_allclose(out["coef"], ref["coef"], rtol=1e-12)
    np.testing.assert_allclose(out["intercept"], ref["intercept"], rtol=1e-12)


def test_without_intercept_matches_sklearn():
    X, Y = make_problem(40, 70, 6, seed=8)
    ours = fit_quiet(exact(fit_intercept=False), X, Y)
    ref = SklearnRidgeCV(alphas=ALPHAS, alpha_per_target=True, fit_intercept=False).fit(X, Y)
    np.testing.assert_array_equal(ours.alphas_, ref.alpha_)
    np.testing.assert_allclose(ours.coef_, ref.coef_.T, rtol=1e-9, atol=1e-12)
    assert np.all(ours.intercept_ == 0)


# --------------------------------------------------------------------------- backends
def _backend_fit(device, X, Y):
    return fit_quiet(RidgeCV(alphas=ALPHAS, device=device, dtype="float32"), X, Y)


def _assert_float32_agreement(a, b):
    np.testing.assert_allclose(a.cv_scores_, b.cv_scores_, rtol=1e-4)
    same = a.alphas_ == b.alphas_
    assert same.mean() >= 0.95  # float32 near-ties may flip a choice
    np.testing.assert_allclose(a.coef_[:, same], b.coef_[:, same], rtol=2e-3, atol=2e-4)


@pytest.mark.parametrize("n, p", [(60, 150), (150, 40)], ids=["dual", "primal"])
def test_numpy_and_torch_cpu_agree_in_float32(n, p):
    X, Y = make_problem(n, p, 20, seed=9, dtype=np.float32)
    a, b = _backend_fit("numpy", X, Y), _backend_fit("cpu", X, Y)
    assert a.coef_.dtype == np.float32 and b.coef_.dtype == np.float32
    _assert_float32_agreement(a, b)
    ref = fit_quiet(exact(), X, Y)
    _assert_float32_agreement(b, ref)


@CUDA
def test_cuda_agrees_with_numpy():
    X, Y = make_problem(60, 150, 20, seed=9, dtype=np.float32)
    _assert_float32_agreement(_backend_fit("numpy", X, Y), _backend_fit("cuda", X, Y))


def test_cuda_unavailable_is_a_clear_error():
    if __import__("torch").cuda.is_available():
        pytest.skip("a GPU is present")
    X, Y = make_problem(10, 5, 2)
    with pytest.raises(DataError, match="needs a CUDA GPU.*device='cpu'"):
        RidgeCV(device="cuda").fit(X, Y)


def test_eigh_failure_falls_back_to_float64_cpu(monkeypatch):
    import scipy.linalg

    import brainrecon.decoders.ridge as ridge_module

    real = scipy.linalg.eigh
    calls = []

    def flaky(a, *args, **kwargs):
        calls.append(a.dtype)
        if len(calls) == 1:
            raise np.linalg.LinAlgError("simulated failure")
        return real(a, *args, **kwargs)

    monkeypatch.setattr(scipy.linalg, "eigh", flaky)
    X, Y = make_problem(30, 60, 3, dtype=np.float32)
    with pytest.warns(RuntimeWarning, match="retrying in float64"):
        model = fit_quiet(RidgeCV(alphas=ALPHAS, device="numpy"), X, Y)
    assert calls == [np.float32, np.float64]
    monkeypatch.setattr(scipy.linalg, "eigh", real)
    ref = fit_quiet(RidgeCV(alphas=ALPHAS, device="numpy"), X, Y)
    np.testing.assert_allclose(model.coef_, ref.coef_, rtol=1e-3, atol=1e-5)
    assert ridge_module.RIDGE_CV_SOLVERS is RIDGE_CV_SOLVERS


# --------------------------------------------------------------------------- granularity
def test_token_and_global_reduce_to_target_when_all_agree():
    # Scaled copies of one target: every target's LOO curve is the same up to a factor, so
    # all choose the same alpha and the three granularities must give identical fits.
    X, y = make_problem(40, 70, 1, seed=10)
    Y = y * np.array([1.0, -2.0, 0.5, 3.0, 1.5, -0.7])
    fits = {
        g: fit_quiet(exact(granularity=g, target_groups=3), X, Y)
        for g in ("target", "token", "global")
    }
    assert len(np.unique(fits["target"].alphas_)) == 1
    for g in ("token", "global"):
        np.testing.assert_array_equal(fits[g].alphas_, fits["target"].alphas_)
        np.testing.assert_array_equal(fits[g].coef_, fits["target"].coef_)


def test_token_granularity_sums_scores_over_each_group():
    X, Y = make_problem(40, 70, 12, seed=11)
    model = fit_quiet(exact(granularity="token", target_groups=4), X, Y)
    per_token = model.cv_scores_.reshape(len(ALPHAS), 4, 3).sum(-1)
    expected = np.repeat(np.asarray(ALPHAS)[per_token.argmin(0)], 3)
    np.testing.assert_array_equal(model.alphas_, expected)
    # Labels work as well as a count; the refit equals a fixed-alpha ridge per target.
    labels = np.repeat(["a", "b", "c", "d"], 3)
    by_label = fit_quiet(exact(granularity="token", target_groups=labels), X, Y)
    np.testing.assert_array_equal(by_label.alphas_, expected)
    ref = Ridge(alpha=expected[0], solver="svd").fit(X, Y[:, 0])
    np.testing.assert_allclose(model.coef_[:, 0], ref.coef_, rtol=1e-9, atol=1e-12)
    glob = fit_quiet(exact(granularity="global"), X, Y)
    assert np.all(glob.alphas_ == ALPHAS[model.cv_scores_.sum(1).argmin()])


# --------------------------------------------------------------------------- estimator API
def test_sklearn_conventions():
    model = RidgeCV(alphas=[1.0, 2.0], device="numpy", granularity="token", target_groups=2)
    params = model.get_params()
    assert params["alphas"] == [1.0, 2.0] and params["target_groups"] == 2
    twin = clone(model)
    assert twin is not model and twin.get_params() == params
    twin.set_params(cv="gcv")
    assert twin.cv == "gcv" and model.cv == "loo"
    X, Y = make_problem(20, 10, 4)
    assert fit_quiet(model, X, Y) is model
    assert model.n_features_in_ == 10 and model.alphas_.shape == (4,)
    assert model.cv_scores_.shape == (2, 4) and model.cv_scores_.dtype == np.float64


def test_passes_sklearn_check_estimator():
    from sklearn.utils.estimator_checks import check_estimator

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        check_estimator(RidgeCV(device="numpy", dtype="float64"))


@pytest.mark.parametrize("device", ["numpy", "cpu"])
def test_inputs_are_not_modified(device):
    X, Y = make_problem(20, 30, 3, dtype=np.float32)
    X0, Y0 = X.copy(), Y.copy()
    fit_quiet(RidgeCV(alphas=ALPHAS, device=device, loo_prediction_stats=True), X, Y).predict(X)
    np.testing.assert_array_equal(X, X0)
    np.testing.assert_array_equal(Y, Y0)


def test_one_dimensional_target():
    X, Y = make_problem(30, 20, 1)
    model = fit_quiet(exact(), X, Y[:, 0])
    ref = SklearnRidgeCV(alphas=ALPHAS).fit(X, Y[:, 0])
    assert model.coef_.shape == (20,) and isinstance(model.intercept_, float)
    assert model.predict(X).shape == (30,)
    np.testing.assert_allclose(model.coef_, ref.coef_, rtol=1e-9)


def test_default_alphas_scale_with_features():
    X, Y = make_problem(20, 30, 2)
    model = fit_quiet(RidgeCV(device="numpy"), X, Y)
    np.testing.assert_allclose(model.alpha_grid_, 30 * np.logspace(-2, 2, 9))
    np.testing.assert_allclose(default_alphas(30), model.alpha_grid_)


def test_predict_before_fit_raises():
    X, _ = make_problem(5, 3, 1)
    with pytest.raises(NotFittedError, match="not fitted"):
        RidgeCV().predict(X)
    with pytest.raises(sklearn.exceptions.NotFittedError):
        RidgeCV().predict(X)


def test_alpha_at_grid_edge_warns():
    X, Y = make_problem(40, 70, 3)
    edge = r"3 of 3 targets chose the smallest alpha \(1e\+06\)"
    with pytest.warns(AlphaGridWarning, match=edge):
        RidgeCV(alphas=[1e6, 1e7, 1e8], device="numpy").fit(X, Y)
    with warnings.catch_warnings():
        warnings.simplefilter("error", AlphaGridWarning)
        RidgeCV(alphas=[1e6], device="numpy").fit(X, Y)  # a single alpha is no grid


@pytest.mark.parametrize(
    "params, match",
    [
        ({"alphas": [1.0, -2.0]}, "positive finite"),
        ({"device": "tpu"}, "Unknown device 'tpu'. Valid devices: 'auto', 'cpu', 'cuda'"),
        ({"dtype": "float16"}, "Unknown dtype 'float16'. Valid choices: 'float32', 'float64'"),
        ({"cv": 5}, "Unknown cv 5. Valid choices: 'loo', 'gcv'"),
        ({"granularity": "voxel"}, "Unknown granularity 'voxel'"),
        ({"granularity": "token"}, "granularity='token' needs target_groups"),
        ({"granularity": "token", "target_groups": 5}, r"positive divisor of .* targets \(4\)"),
        ({"n_targets_batch": 0}, "n_targets_batch must be a positive integer"),
    ],
)
def test_bad_parameters_raise(params, match):
    X, Y = make_problem(10, 6, 4)
    with pytest.raises(DataError, match=match):
        RidgeCV(**{"device": "numpy", **params}).fit(X, Y)


def test_wrong_feature_count_at_predict():
    X, Y = make_problem(20, 6, 2)
    model = fit_quiet(RidgeCV(device="numpy"), X, Y)
    with pytest.raises(ValueError, match="6"):
        model.predict(X[:, :5])


# --------------------------------------------------------------------------- the decoder
class TestRidgeConformance(DecoderConformance):
    def make_decoder(self, **overrides):
        return RidgeDecoder(**{"device": "cpu", **overrides})

    def make_data(self):
        from brainrecon.data.synthetic import make_synthetic

        return make_synthetic(seed=0, n_train=120, n_test=12, image_size=32, surface_size=32)


@pytest.fixture(scope="module")
def decoder_data():
    from brainrecon.data.synthetic import make_synthetic
    from brainrecon.targets import get_target

    data = make_synthetic(seed=0, n_train=120, n_test=12, image_size=32, surface_size=32)
    return data, get_target("pixels").load(data.test, 2, progress=False)


def _heldout_correlation(pred, truth):
    p = pred.reshape(len(pred), -1)
    t = truth.reshape(len(truth), -1)
    return float(np.mean([np.corrcoef(a, b)[0, 1] for a, b in zip(p, t)]))


@pytest.mark.parametrize("rescale", ["train", "none", "test"])
def test_decoder_learns_the_synthetic_mapping(decoder_data, rescale):
    data, truth = decoder_data
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AlphaGridWarning)
        decoder = RidgeDecoder(subject=2, rescale=rescale, device="cpu").fit(data.train)
    pred = decoder.predict(data.test)
    assert list(pred) == [2] and pred[2].shape == truth.shape and pred[2].dtype == np.float32
    assert _heldout_correlation(pred[2], truth) > 0.2
    # Correlating each image with another image's truth does much worse.
    matched = _heldout_correlation(pred[2], truth)
    assert _heldout_correlation(pred[2], np.roll(truth, 1, axis=0)) < matched - 0.05
    if rescale == "test":  # Brain-Diffuser: test predictions get the training targets' spread
        spread = pred[2].reshape(12, -1).std(0)
        np.testing.assert_allclose(spread, decoder.y_std_, rtol=1e-3, atol=1e-5)


def test_decoder_train_rescaling_and_saving(decoder_data, tmp_path):
    data, _ = decoder_data
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AlphaGridWarning)
        common = dict(subject=2, granularity="token", device="numpy")
        decoder = RidgeDecoder(rescale="train", **common).fit(data.train)
        raw = RidgeDecoder(rescale="none", **common).fit(data.train)
    # Rows of the 32 x 32 x 3 pixel target share one alpha per row.
    assert np.all(decoder.alphas_.reshape(32, -1) == decoder.alphas_.reshape(32, -1)[:, :1])
    # The rescaling undoes shrinkage: predictions spread more than the raw ones.
    a, b = decoder.predict(data.test)[2], raw.predict(data.test)[2]
    assert a.reshape(12, -1).std(0).mean() > b.reshape(12, -1).std(0).mean()
    affine = b.reshape(12, -1) * decoder.scale_ + decoder.shift_
    np.testing.assert_allclose(a.reshape(12, -1), affine, rtol=1e-5, atol=1e-6)
    decoder.save(tmp_path / "ridge")
    loaded = RidgeDecoder.load(tmp_path / "ridge")
    assert loaded.get_params() == decoder.get_params()
    np.testing.assert_array_equal(loaded.predict(data.test)[2], a)
    np.testing.assert_array_equal(loaded.alphas_, decoder.alphas_)
    with np.load(tmp_path / "ridge" / "ridge_weights.npz", allow_pickle=False) as npz:
        assert npz["coef"].shape == (decoder.n_voxels_[2], 32 * 32 * 3)


def test_decoder_errors(decoder_data):
    data, _ = decoder_data
    with pytest.raises(DataError, match="Subject 3 is not in the training data"):
        RidgeDecoder(subject=3).fit(data.train)
    bad_rescale = "Unknown rescale 'zscore'. Valid choices: 'none', 'train', 'test'"
    with pytest.raises(DataError, match=bad_rescale):
        RidgeDecoder(rescale="zscore").fit(data.train)
    with pytest.raises(BrainreconError, match="Unknown target 'dino'"):
        RidgeDecoder(target="dino").fit(data.train)


def test_decoder_target_options(decoder_data):
    data, _ = decoder_data
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AlphaGridWarning)
        decoder = RidgeDecoder(subject=2, target_options={"size": 8}, device="numpy")
        pred = decoder.fit(data.train).predict(data.test)
    assert pred[2].shape == (12, 8, 8, 3) and decoder.target_shape_ == (8, 8, 3)
