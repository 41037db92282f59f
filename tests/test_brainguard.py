"""BrainGuard: fusion rule, tiers, server, learning, resume, calibration (issue 5 §4)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from brainrecon.data import from_arrays
from brainrecon.data.synthetic import make_synthetic
from brainrecon.decoders import get_decoder, load_decoder
from brainrecon.decoders.brainguard import (
    BrainGuardDecoder,
    BrainGuardNet,
    DynamicFusionLearner,
    aggregate,
    aggregation_weights,
    apply_calibration,
    brainguard_loss,
    fit_calibration,
    soft_clip_loss,
    split_tiers,
    token_shape,
)
from brainrecon.decoders.brainguard import federated
from brainrecon.errors import BrainreconError, DataError
from brainrecon.targets import get_target

from conformance import DecoderConformance

TINY = dict(hidden=32, n_blocks=2, rounds=2, batch_size=30, lr=1e-3, device="cpu",
            progress=False, target_options={"size": 8}, dfl_num_pre_loss=2)


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_data():
    return make_synthetic(seed=0, n_train=120, n_test=12, image_size=32, surface_size=32)


class TestBrainGuardConformance(DecoderConformance):
    def make_decoder(self, **overrides):
        return BrainGuardDecoder(**{**TINY, **overrides})

    def make_data(self):
        return tiny_data()


# --------------------------------------------------------------------------- fusion rule
def _linear(weight):
    model = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([weight], dtype=torch.float32))
    return model


def _mse(pred, target):
    return ((pred - target) ** 2).mean()


def test_fusion_update_hand_computed():
    # theta_l = [1, 2], theta_g = [3, 1]; W starts at 1, so theta_t starts at theta_g.
    model = _linear([1.0, 2.0])
    global_state = {"weight": torch.tensor([[3.0, 1.0]])}
    batches = [
        (torch.tensor([[1.0, 1.0]]), torch.tensor([[0.0]])),
        (torch.tensor([[1.0, 0.0]]), torch.tensor([[2.0]])),
    ]
    dfl = DynamicFusionLearner(eta=1.0, grad_scale=0.01)
    dfl.start_phase = False  # one epoch
    losses = dfl.fuse(model, global_state, ["weight"], lambda: iter(batches), _mse)
    # Batch 1: out = 3 + 1 = 4, loss 16, g = 2*4*[1, 1] = [8, 8], diff = [2, -1]
    #   W = clip(1 - 0.01*8*[2, -1]) = clip([0.84, 1.08]) = [0.84, 1]; theta_t = [2.68, 1]
    # Batch 2: out = 2.68, g = 2*0.68*[1, 0] = [1.36, 0]
    #   W = [0.84 - 0.01*1.36*2, 1] = [0.8128, 1]; theta_t = [1 + 2*0.8128, 1] = [2.6256, 1]
    np.testing.assert_allclose(dfl.weights["weight"].numpy(), [[0.8128, 1.0]], rtol=1e-6)
    np.testing.assert_allclose(model.weight.detach().numpy(), [[2.6256, 1.0]], rtol=1e-6)
    assert losses == [pytest.approx(0.68**2, rel=1e-5)]  # the last batch's loss of the epoch
    assert dfl.start_phase is False

    # W persists: the next call starts from W = [0.8128, 1] with the new local/global pair.
    model2 = _linear([0.0, 0.0])
    dfl.fuse(model2, {"weight": torch.tensor([[1.0, 1.0]])}, ["weight"],
             lambda: iter(batches[:1]), _mse)
    # theta_t = [0.8128, 1], out = 1.8128, g = 2*1.8128*[1, 1]; diff = [1, 1]
    w = np.clip(np.array([0.8128, 1.0]) - 0.01 * 2 * 1.8128 * np.array([1.0, 1.0]), 0, 1)
    np.testing.assert_allclose(dfl.weights["weight"].numpy()[0], w, rtol=1e-5)
    np.testing.assert_allclose(model2.weight.detach().numpy()[0], w, rtol=1e-5)


def test_fusion_start_phase_stopping_rule():
    batches = [(torch.tensor([[1.0, 1.0]]), torch.tensor([[0.0]]))]
    # A huge threshold stops as soon as more than num_pre_loss losses exist: num_pre_loss + 1.
    dfl = DynamicFusionLearner(grad_scale=0.0, threshold=1e9, num_pre_loss=3)
    losses = dfl.fuse(_linear([1.0, 2.0]), {"weight": torch.tensor([[3.0, 1.0]])}, ["weight"],
                      lambda: iter(batches), _mse)
    assert len(losses) == 4
    # A zero threshold is never met: the cap ends the start phase; later calls run one epoch.
    dfl = DynamicFusionLearner(grad_scale=0.0, threshold=0.0, num_pre_loss=3, max_start_epochs=7)
    fuse = lambda: dfl.fuse(_linear([1.0, 2.0]), {"weight": torch.tensor([[3.0, 1.0]])},  # noqa: E731
                            ["weight"], lambda: iter(batches), _mse)
    assert len(fuse()) == 7
    assert len(fuse()) == 1


def test_sync_tiers_partition_tensors():
    net = BrainGuardNet(10, 8, 4, 16, 12, 0.0)
    names = [n for n, _ in net.named_parameters()]
    assert len(names) == 32  # 2 ridge + 4*4 blocks + 2 head + 12 projector (spec §8)
    retained, aligned, adaptive = split_tiers(net, sync_layers=2)
    assert retained == ["ridge.weight", "ridge.bias"]
    assert adaptive == names[18:] and aligned == names[2:18]
    # The released scripts' p = 24 tensors: block 1's LayerNorm onwards (spec §8).
    _, aligned, adaptive = split_tiers(net, sync_layers=0, sync_tensors=24)
    assert adaptive == names[8:] and adaptive[0] == "blocks.1.norm.weight"
    _, aligned, adaptive = split_tiers(net, sync_layers=0)
    assert adaptive == [] and aligned == names[2:]
    with pytest.raises(DataError, match="sync_layers=7 must be between 0 and 6"):
        split_tiers(net, sync_layers=7)


def test_client_receive_applies_three_tiers():
    torch.manual_seed(0)
    n, V = 20, 6
    X, Y = torch.randn(n, V), torch.randn(n, 2, 4)
    config = federated.TrainConfig(hidden=8, n_blocks=2, rounds=1, batch_size=10, sync_layers=1,
                                   dfl_num_pre_loss=1, dropout=0.0)
    client = federated.Client(1, X, Y, BrainGuardNet(V, 8, 2, 2, 4, 0.0), config, torch.device("cpu"))
    before = {k: v.clone() for k, v in client.model.state_dict().items()}
    other = BrainGuardNet(V, 8, 2, 2, 4, 0.0)
    global_state = {k: v.detach().clone() for k, v in other.named_parameters() if not k.startswith("ridge.")}
    client.receive(global_state)
    after = client.model.state_dict()
    for k in client.retained:
        torch.testing.assert_close(after[k], before[k], rtol=0, atol=0)
    for k in client.aligned:
        torch.testing.assert_close(after[k], global_state[k], rtol=0, atol=0)
    assert client.adaptive and all(k.startswith("projector.") for k in client.adaptive)
    moved = False
    for k in client.adaptive:
        W = client.dfl.weights[k]
        assert float(W.min()) >= 0 and float(W.max()) <= 1
        expected = before[k] + (global_state[k] - before[k]) * W
        torch.testing.assert_close(after[k], expected, rtol=1e-6, atol=1e-6)
        moved |= bool((W < 1).any())
    assert moved, "the fusion weights never moved from 1"


# --------------------------------------------------------------------------- server
def test_aggregation_weights_follow_sample_counts():
    assert aggregation_weights([100, 300]) == [0.25, 0.75]
    states = [{"blocks.0.linear.weight": torch.full((2, 2), v)} for v in (1.0, 2.0, 4.0)]
    out = aggregate(states, [1, 2, 5])
    torch.testing.assert_close(out["blocks.0.linear.weight"],
                               torch.full((2, 2), (1 * 1 + 2 * 2 + 5 * 4) / 8.0))
    with pytest.raises(DataError, match="positive sample count"):
        aggregation_weights([3, 0])


def test_server_only_accepts_parameters():
    ok = {"head.weight": torch.zeros(2)}
    with pytest.raises(BrainreconError, match="subject-specific input layer"):
        aggregate([ok, {"ridge.weight": torch.zeros(2), **ok}], [1, 1])
    data = tiny_data()
    with pytest.raises(TypeError, match="only accepts state dicts"):
        aggregate([ok, data.train], [1, 1])
    with pytest.raises(TypeError, match="non-tensor"):
        aggregate([{"head.weight": np.zeros(2)}], [1])


def test_fit_aggregates_with_sample_counts_and_keeps_ridge(monkeypatch):
    """Unequal subjects: the server gets the true counts; ridge layers never leave clients."""
    rng = np.random.default_rng(0)
    subjects = {}
    for s, n, V in ((1, 40, 30), (2, 90, 25)):
        subjects[s] = {
            "train_voxels": rng.standard_normal((n, V)).astype(np.float32),
            "test_voxels": rng.standard_normal((5, V)).astype(np.float32),
            "train_images": rng.integers(0, 255, (n, 8, 8, 3), dtype=np.uint8),
            "test_images": rng.integers(0, 255, (5, 8, 8, 3), dtype=np.uint8),
        }
    data = from_arrays(subjects)
    seen_counts, seen_keys = [], []
    real_aggregate = federated.aggregate

    def spy(states, counts, device=None):
        seen_counts.append(list(counts))
        seen_keys.append([set(s) for s in states])
        return real_aggregate(states, counts, device)

    # Retention: each client's ridge after a round's fusion equals what its own training left.
    ridge_after_training: dict[int, list] = {1: [], 2: []}
    ridge_after_receive: dict[int, list] = {1: [], 2: []}
    real_train, real_receive = federated.Client.train, federated.Client.receive

    def train(self, epochs):
        out = real_train(self, epochs)
        ridge_after_training[self.subject].append(self.model.ridge.weight.detach().clone())
        return out

    def receive(self, state):
        assert not any(k.startswith("ridge.") for k in state)
        out = real_receive(self, state)
        ridge_after_receive[self.subject].append(self.model.ridge.weight.detach().clone())
        return out

    monkeypatch.setattr(federated, "aggregate", spy)
    monkeypatch.setattr(federated.Client, "train", train)
    monkeypatch.setattr(federated.Client, "receive", receive)
    decoder = BrainGuardDecoder(**{**TINY, "rounds": 3, "target_options": {"size": 4}}).fit(data.train)
    assert seen_counts == [[40, 90]] * 3
    assert all(not any(k.startswith("ridge.") for k in keys) for ks in seen_keys for keys in ks)
    for s in (1, 2):
        assert len(ridge_after_receive[s]) == 2
        for r in range(2):  # the fusion before round r+1 left round r's ridge untouched
            torch.testing.assert_close(ridge_after_receive[s][r], ridge_after_training[s][r],
                                       rtol=0, atol=0)
        torch.testing.assert_close(decoder.models_[s].ridge.weight, ridge_after_training[s][-1],
                                   rtol=0, atol=0)
    assert decoder.models_[1].ridge.weight.shape == (32, 30)
    assert decoder.models_[2].ridge.weight.shape == (32, 25)


# --------------------------------------------------------------------------- loss
def test_loss_matches_brute_force():
    rng = np.random.default_rng(1)
    P, T = rng.standard_normal((5, 3, 4)), rng.standard_normal((5, 3, 4))
    p = P.reshape(5, -1) / np.linalg.norm(P.reshape(5, -1), axis=1, keepdims=True)
    t = T.reshape(5, -1) / np.linalg.norm(T.reshape(5, -1), axis=1, keepdims=True)
    tau = 0.05
    mse = np.mean((p - t) ** 2)
    forward = backward = 0.0
    for i in range(5):
        q = np.exp([t[i] @ t[j] / tau for j in range(5)])
        q /= q.sum()
        row = np.array([p[i] @ t[j] / tau for j in range(5)])
        col = np.array([p[j] @ t[i] / tau for j in range(5)])
        forward -= sum(q[j] * (row[j] - math.log(np.exp(row).sum())) for j in range(5)) / 5
        backward -= sum(q[j] * (col[j] - math.log(np.exp(col).sum())) for j in range(5)) / 5
    expected = 2e4 * mse + 0.5 * (forward + backward)
    got = brainguard_loss(torch.tensor(P), torch.tensor(T), mse_weight=2e4, softclip_tau=tau,
                          softclip_weight=1.0)
    assert float(got) == pytest.approx(expected, rel=1e-9)
    # Blind to each sample's scale.
    scaled = torch.tensor(P) * torch.tensor([1.0, 3.0, 0.2, 7.0, 1.5])[:, None, None]
    assert float(brainguard_loss(scaled, torch.tensor(T), mse_weight=2e4, softclip_tau=tau,
                                 softclip_weight=1.0)) == pytest.approx(expected, rel=1e-9)
    assert float(soft_clip_loss(torch.tensor(t), torch.tensor(t), tau)) > 0


@pytest.mark.parametrize("hidden, voxels, expected", [
    (64, 15724, 1_927_360), (256, 13039, 7_224_064), (2048, 15724, 81_539_328), (2048, 12682, 75_309_312),
])
def test_parameter_counts_match_spec(hidden, voxels, expected):
    # WeADL's 16 x 768 IP-token variant: its parameter counts.
    from brainrecon.decoders.brainguard.model import count_parameters

    with torch.device("meta"):
        net = BrainGuardNet(voxels, hidden, 4, 16, 768, 0.15)
    assert count_parameters(net) == expected


def test_token_shape():
    assert token_shape((16, 768)) == (16, 768)
    assert token_shape((32, 32, 3)) == (32, 96)
    assert token_shape((3072,)) == (1, 3072)


# --------------------------------------------------------------------------- calibration
def test_calibration_restores_per_token_statistics():
    rng = np.random.default_rng(2)
    target = rng.standard_normal((200, 4, 6)) * np.array([1.0, 2.0, 0.5, 3.0])[None, :, None] + 1.5
    # Predictions: right direction up to noise, arbitrary per-sample scale.
    pred = (target + 0.3 * rng.standard_normal(target.shape)) * rng.uniform(0.01, 50, (200, 1, 1))
    stats = fit_calibration(pred, target, "token")
    out = apply_calibration(pred, stats, "token").astype(np.float64)
    np.testing.assert_allclose(out.mean(0), target.mean(0), atol=1e-5)
    spread = lambda a: np.sqrt(((a - a.mean(0)) ** 2).mean(axis=(0, 2)))  # noqa: E731
    np.testing.assert_allclose(spread(out), spread(target), rtol=1e-5)
    norm = apply_calibration(pred, stats, "norm")
    np.testing.assert_allclose(np.linalg.norm(norm.reshape(200, -1), axis=1),
                               np.linalg.norm(target.reshape(200, -1), axis=1).mean(), rtol=1e-5)
    np.testing.assert_array_equal(apply_calibration(pred, stats, "none"), pred.astype(np.float32))
    with pytest.raises(DataError, match="Unknown calibration 'zscore'"):
        fit_calibration(pred, target, "zscore")


def test_predicted_tokens_have_training_token_statistics():
    data = tiny_data()
    decoder = BrainGuardDecoder(**{**TINY, "subjects": [1, 2], "calibration": "token"}).fit(data.train)
    pred = decoder.predict(data.train)[1].astype(np.float64)  # calibrated, on the training voxels
    target = get_target("pixels", size=8).load(data.train, 1, progress=False).astype(np.float64)
    pred, target = pred.reshape(len(pred), 8, 24), target.reshape(len(target), 8, 24)
    np.testing.assert_allclose(pred.mean(0), target.mean(0), atol=1e-5)
    spread = lambda a: np.sqrt(((a - a.mean(0)) ** 2).mean(axis=(0, 2)))  # noqa: E731
    np.testing.assert_allclose(spread(pred), spread(target), rtol=1e-4)
    # The raw network output is on another scale entirely.
    decoder.calibration = "none"
    raw = decoder.predict(data.train)[1].reshape(len(pred), 8, 24)
    assert not np.allclose(spread(raw), spread(target), rtol=0.2)


# --------------------------------------------------------------------------- learning
def _mean_sample_correlation(pred: np.ndarray, target: np.ndarray) -> float:
    a = pred.reshape(len(pred), -1).astype(np.float64)
    b = target.reshape(len(target), -1).astype(np.float64)
    a = a - a.mean(1, keepdims=True)
    b = b - b.mean(1, keepdims=True)
    return float(((a * b).sum(1) / np.sqrt((a * a).sum(1) * (b * b).sum(1))).mean())


@pytest.mark.slow
def test_federated_training_helps_subject_1():
    """Four synthetic subjects share structure: federating them helps subject 1 on average.

    Mean per-sample correlation of subject 1's 50 test targets (16x16 pixels), h=128,
    30 rounds, n_train=200, model seeds 0 / 1 / 2 / 3, measured on the development machine
    with the synthetic data of this commit:

    - federated 0.5204 / 0.5323 / 0.5170 / 0.5470, alone 0.5208 / 0.5136 / 0.5176 / 0.5391
      (difference -0.0004 / +0.0187 / -0.0006 / +0.0079, mean +0.0064).

    The gain is small and a single seed's difference lies within seed-to-seed noise (seed 0
    alone shows a tie), so the test compares the means over the four seeds. With an earlier
    version of the synthetic data (training ids by subject position, test voxels scaled by
    their own split's spread) federated led for every seed at n_train=200 (by 0.004-0.014);
    at n_train=100 it led for 3 of 4 seeds, with plain FedAvg of the shared layers
    (sync_layers=0) it lost for 3 of 4, and at n_train=60 it lost for every seed: with 3
    steps per round the private input layers cannot adapt to a backbone averaged over
    subjects whose input layers started apart.
    """
    data = make_synthetic(seed=0, n_train=200, n_test=50, image_size=32, surface_size=32)
    target = get_target("pixels", size=16).load(data.test, 1, progress=False)
    federated, alone = [], []
    for seed in range(4):
        settings = dict(hidden=128, rounds=30, batch_size=25, lr=1e-3, device="cpu", progress=False,
                        target_options={"size": 16}, seed=seed)
        federated.append(_mean_sample_correlation(
            BrainGuardDecoder(subjects=[1, 2, 5, 7], **settings).fit(data.train).predict(data.test)[1], target))
        alone.append(_mean_sample_correlation(
            BrainGuardDecoder(subjects=[1], **settings).fit(data.train).predict(data.test)[1], target))
    assert min(federated) > 0.45
    assert np.mean(federated) >= np.mean(alone), (federated, alone)


# --------------------------------------------------------------------------- resume
def test_resume_equals_uninterrupted(tmp_path, monkeypatch):
    data = tiny_data()
    params = {**TINY, "rounds": 4, "subjects": [1, 2, 5]}
    reference = BrainGuardDecoder(**params, checkpoint_dir=str(tmp_path / "a")).fit(data.train)

    real_save = federated.save_checkpoint
    import brainrecon.decoders.brainguard.decoder as decoder_module

    def save_then_stop(directory, *, round_index, **kwargs):
        path = real_save(directory, round_index=round_index, **kwargs)
        if round_index == 1:
            raise KeyboardInterrupt  # interrupted after two complete rounds
        return path

    monkeypatch.setattr(decoder_module, "save_checkpoint", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        BrainGuardDecoder(**params, checkpoint_dir=str(tmp_path / "b")).fit(data.train)
    monkeypatch.setattr(decoder_module, "save_checkpoint", real_save)
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["latest.json", "round-00002"]

    resumed = BrainGuardDecoder(**params, checkpoint_dir=str(tmp_path / "b"), resume=True).fit(data.train)
    for s in params["subjects"]:
        a, b = reference.models_[s].state_dict(), resumed.models_[s].state_dict()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    pa, pb = reference.predict(data.test), resumed.predict(data.test)
    for s in pa:
        np.testing.assert_array_equal(pa[s], pb[s])
    assert resumed.history_ == reference.history_
    ga = federated.load_checkpoint(federated.read_latest(tmp_path / "a"))[1]
    gb = federated.load_checkpoint(federated.read_latest(tmp_path / "b"))[1]
    for k in ga:
        torch.testing.assert_close(ga[k], gb[k], rtol=0, atol=0)

    # A finished checkpoint resumes without training; other settings are refused.
    again = BrainGuardDecoder(**params, checkpoint_dir=str(tmp_path / "b"), resume=True).fit(data.train)
    np.testing.assert_array_equal(again.predict(data.test)[1], pa[1])
    with pytest.raises(BrainreconError, match=r"Cannot resume.*hidden: 32 -> 16"):
        BrainGuardDecoder(**{**params, "hidden": 16}, checkpoint_dir=str(tmp_path / "b"),
                          resume=True).fit(data.train)


def test_checkpoint_every(tmp_path, monkeypatch):
    import brainrecon.decoders.brainguard.decoder as decoder_module

    saved = []
    real_save = federated.save_checkpoint

    def spy(directory, *, round_index, **kwargs):
        saved.append(round_index + 1)
        return real_save(directory, round_index=round_index, **kwargs)

    monkeypatch.setattr(decoder_module, "save_checkpoint", spy)
    BrainGuardDecoder(**{**TINY, "rounds": 5, "subjects": [1, 2]}, checkpoint_dir=str(tmp_path),
                      checkpoint_every=2).fit(tiny_data().train)
    assert saved == [2, 4, 5]
    assert federated.read_latest(tmp_path).name == "round-00005"


# --------------------------------------------------------------------------- API
def test_for_subject_save_load(tmp_path):
    data = tiny_data()
    decoder = get_decoder("brainguard", subjects=[1, 2], **TINY).fit(data.train)
    full = decoder.predict(data.test)
    single = decoder.for_subject(2)
    # Nothing about subject 1 goes with subject 2's decoder (its run is subject 2's alone).
    assert single.subjects_ == [2] and single.get_params() == {**decoder.get_params(), "subjects": [2]}
    assert single.federation_ == {"subjects": [2], "n_sites": 2, "n_train": {"2": 120},
                                  "rounds_completed": 2}
    assert all(set(r["loss"]) == {"2"} for r in single.history_) and len(single.history_) == 2
    single.save(tmp_path / "s2")
    loaded = load_decoder(tmp_path / "s2")
    pred = loaded.predict(data.test)
    assert list(pred) == [2] and pred[2].shape == (12, 8, 8, 3)
    np.testing.assert_array_equal(pred[2], full[2])
    with pytest.raises(DataError, match="Subject 5 is not among"):
        decoder.for_subject(5)


@pytest.mark.parametrize(
    "params, message",
    [
        ({"rounds": 0}, "rounds must be an integer >= 1, got 0"),
        ({"ema": "fast"}, "Unknown ema 'fast'. Valid choices: 'none', 'standard', 'inverted'"),
        ({"calibration": "zscore"}, "Unknown calibration 'zscore'"),
        ({"sync_layers": 9}, "sync_layers=9 must be between 0 and 4"),
        ({"subjects": [1, 3]}, r"Subject\(s\) \[3\] are not in the training data"),
        ({"device": "tpu"}, "Unknown device 'tpu'"),
        ({"resume": True}, "resume=True needs checkpoint_dir"),
        ({"checkpoint_every": 0}, "checkpoint_every must be an integer >= 1"),
    ],
)
def test_bad_parameters_raise(params, message):
    with pytest.raises(DataError, match=message):
        BrainGuardDecoder(**{**TINY, **params}).fit(tiny_data().train)


def test_ema_modes_run():
    data = tiny_data()
    for mode in ("standard", "inverted"):
        decoder = BrainGuardDecoder(**{**TINY, "subjects": [1, 2], "ema": mode}).fit(data.train)
        assert np.all(np.isfinite(decoder.predict(data.test)[1]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_shapes():
    data = tiny_data()
    decoder = BrainGuardDecoder(**{**TINY, "device": "cuda"}).fit(data.train)
    assert decoder.predict(data.test)[1].shape == (12, 8, 8, 3)
