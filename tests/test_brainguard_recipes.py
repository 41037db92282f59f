"""BrainGuard's named recipes and the released-code options they set (issue 11 §2)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from brainrecon.data.synthetic import make_synthetic
from brainrecon.decoders.brainguard import BrainGuardDecoder, BrainGuardNet, federated
from brainrecon.decoders.brainguard.model import decay_groups
from brainrecon.errors import DataError
from brainrecon.decoders import apply_recipe, recipes_for

TINY = {"hidden": 16, "n_blocks": 2, "rounds": 2, "batch_size": 30, "lr": 1e-3, "device": "cpu",
        "progress": False, "target_options": {"size": 4}, "dfl_num_pre_loss": 2}


pytestmark = pytest.mark.usefixtures("one_thread")


EXPECTED = {
    "brainguard-released": {
        "hidden": 2048, "n_blocks": 4, "dropout": 0.15, "rounds": 600, "local_iterations": 1,
        "batch_size": 50, "lr": 3e-4, "weight_decay": 1e-2, "decay_layernorm": True,
        "mse_weight": 2e4, "softclip_tau": 0.05, "softclip_weight": 1.0, "dfl_eta": 1.0,
        "dfl_grad_scale": 1000.0, "dfl_threshold": 50.0, "dfl_num_pre_loss": 10,
        "ema": "inverted", "ema_decay": 0.999, "warmup_epochs": 2.0, "validation": "dataset",
        "validation_fraction": 0.0, "trials": "single",
        "calibration": "none", "sync_layers": 1, "sync_tensors": None,
    },
}
EXPECTED["weadl"] = {**EXPECTED["brainguard-released"], "sync_layers": 0, "sync_tensors": 24}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_recipe_values_and_sources(name):
    recipe = recipes_for("brainguard")[name]
    assert dict(recipe.values) == EXPECTED[name]
    # Every value says where it comes from, and the recipe names its source files.
    assert set(recipe.notes) == set(recipe.values)
    assert all(len(note) > 10 for note in recipe.notes.values())
    assert ("kunzhan/BrainGuard" if name == "brainguard-released" else "IoanaGabor/bachelor-thesis") \
        in recipe.source
    # Every value is a valid decoder setting.
    BrainGuardDecoder(**{**recipe.values, **TINY})._train_config()


def test_explicit_params_win_over_recipe():
    params = apply_recipe("brainguard", "weadl", {"rounds": 3, "calibration": "token"})
    assert params["rounds"] == 3 and params["calibration"] == "token" and params["sync_tensors"] == 24


def test_describe_lists_recipes_with_sources():
    from typer.testing import CliRunner

    from brainrecon.cli import app

    result = CliRunner().invoke(app, ["decoders", "describe", "brainguard"], terminal_width=400)
    assert result.exit_code == 0, result.output
    assert "recipe brainguard-released" in result.output and "recipe weadl" in result.output
    assert "kunzhan/BrainGuard" in result.output and "IoanaGabor/bachelor-thesis" in result.output


def test_weadl_tiers_are_the_forks():
    # 32 tensors, p = 24: tensors 8-31 adaptive, 2-7 overwritten by the global model.
    net = BrainGuardNet(10, 8, 4, 16, 12, 0.0)
    names = [n for n, _ in net.named_parameters()]
    _, aligned, adaptive = federated.split_tiers(net, sync_layers=0, sync_tensors=24)
    assert aligned == names[2:8] and adaptive == names[8:]


# --------------------------------------------------------------------------- options
def test_layernorm_decay_toggle():
    net = BrainGuardNet(10, 8, 1, 2, 6, 0.0)
    names = {id(p): n for n, p in net.named_parameters()}
    intended, released = decay_groups(net, 0.01), decay_groups(net, 0.01, layernorm=True)

    def decayed(groups):
        return {names[id(p)] for p in groups[0]["params"]}

    assert "blocks.0.norm.weight" not in decayed(intended)
    assert "blocks.0.norm.weight" in decayed(released) and "projector.0.weight" in decayed(released)
    assert not any(n.endswith("bias") for n in decayed(released))
    assert decayed(released) - decayed(intended) == {n for n in names.values() if "norm" in n and
                                                      n.endswith("weight")} | {"projector.0.weight",
                                                                              "projector.3.weight",
                                                                              "projector.6.weight"}


def _client(**config):
    torch.manual_seed(0)
    X, Y = torch.randn(20, 6), torch.randn(20, 2, 4)
    cfg = federated.TrainConfig(**{"hidden": 8, "n_blocks": 1, "batch_size": 10, "dropout": 0.0,
                                   "dfl_num_pre_loss": 1, "sync_layers": 1, **config})
    return federated.Client(1, X, Y, BrainGuardNet(6, 8, 1, 2, 4, 0.0), cfg, torch.device("cpu"),
                            X[:5], Y[:5])


def test_warmup_is_measured_in_epochs():
    # 10 rounds x 5 local epochs x 2 steps: two epochs of warm-up = 4 of 100 steps.
    client = _client(rounds=10, local_iterations=5)
    assert client.scheduler.total_steps == 100
    lrs = []
    for _ in range(6):
        lrs.append(client.scheduler.get_last_lr()[0])
        client.optimizer.step()
        client.scheduler.step()
    # OneCycle peaks at step pct·total - 1: 3 for two epochs (it would be 19 for two rounds).
    assert int(np.argmax(lrs)) == 3


def test_standard_ema_restarts_after_fusion():
    client = _client(rounds=4, ema="standard", sync_layers=1)
    client.train(1)
    other = BrainGuardNet(6, 8, 1, 2, 4, 0.0)
    client.receive({k: v.detach() for k, v in other.named_parameters() if not k.startswith("ridge.")})
    for name, param in client.model.named_parameters():
        if not name.startswith("ridge."):
            torch.testing.assert_close(client.ema[name], param.detach(), rtol=0, atol=0)


def test_best_by_validation_is_kept_and_checkpointed(tmp_path):
    client = _client(rounds=3)
    scores = []
    for _ in range(3):
        client.train(1)
        scores.append(client.last_score)
    assert client.best_score == max(scores)
    tensors, meta = client.checkpoint_state()
    assert any(k.startswith("best.") for k in tensors) and meta["best_score"] == max(scores)
    clone = _client(rounds=3)
    clone.restore(tensors, meta)
    final = clone.final_model().state_dict()
    for k, v in client.best_state.items():
        torch.testing.assert_close(final[k], v, rtol=0, atol=0)


def test_checkpoint_keep_last_k(tmp_path):
    data = make_synthetic(seed=0, n_train=60, n_test=6, image_size=32, surface_size=32, subjects=[1, 2])
    decoder = BrainGuardDecoder(**{**TINY, "rounds": 4, "subjects": [1, 2]}, checkpoint_dir=str(tmp_path),
                                checkpoint_keep=2, validation_fraction=0.2).fit(data.train)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.json", "round-00003", "round-00004"]
    meta, _, tensors = federated.load_checkpoint(federated.read_latest(tmp_path))
    for s in (1, 2):
        assert meta["clients"][str(s)]["best_score"] is not None
        best = {k[len("best."):]: v for k, v in tensors[s].items() if k.startswith("best.")}
        # The decoder's final model is the best-by-validation one.
        for k, v in decoder.models_[s].state_dict().items():
            torch.testing.assert_close(v, best[k], rtol=0, atol=0)
    assert decoder.federation_["n_train"] == {"1": 48, "2": 48}
    # The global backbone is scored at each site (behind its own ridge) from round 2 on.
    assert "global_val" not in decoder.history_[0]
    assert all(set(r["global_val"]) == {"1", "2"} for r in decoder.history_[1:])


def test_global_backbone_is_scored_behind_the_sites_ridge():
    client = _client(rounds=2)
    other = BrainGuardNet(6, 8, 1, 2, 4, 0.0)
    global_state = {k: v.detach() for k, v in other.named_parameters() if not k.startswith("ridge.")}
    expected = BrainGuardNet(6, 8, 1, 2, 4, 0.0)
    expected.load_state_dict({**other.state_dict(), "ridge.weight": client.model.ridge.weight.detach(),
                              "ridge.bias": client.model.ridge.bias.detach()})
    expected.eval()
    with torch.no_grad():
        pred = expected(client.val_voxels)
    sim = torch.nn.functional.cosine_similarity(pred.flatten(1), client.val_targets.flatten(1), dim=1).mean()
    assert client.validate_global(global_state) == pytest.approx(float(sim), rel=1e-6)


def test_bad_validation_fraction():
    data = make_synthetic(seed=0, n_train=20, n_test=4, image_size=32, surface_size=32, subjects=[1])
    with pytest.raises(DataError, match=r"validation_fraction must be in \[0, 1\)"):
        BrainGuardDecoder(**TINY, validation_fraction=1.5).fit(data.train)
    with pytest.raises(DataError, match="leaves subject 1 0 validation"):
        BrainGuardDecoder(**TINY, validation_fraction=0.01).fit(data.train)


def test_auto_calibration_is_norm_on_pixels():
    # Row tokens rescaled one by one imprint horizontal bands on pixel targets: "auto" uses
    # the per-sample norm there and the per-token calibration for token targets.
    data = make_synthetic(seed=0, n_train=40, n_test=6, image_size=32, surface_size=32, subjects=[1])
    decoder = BrainGuardDecoder(**{**TINY, "rounds": 1}).fit(data.train)
    assert decoder.calibration == "auto" and decoder._calibration_kind() == "norm"
    auto = decoder.predict(data.test)[1]
    decoder.calibration = "norm"
    np.testing.assert_array_equal(auto, decoder.predict(data.test)[1])
    decoder.calibration = "token"
    assert not np.array_equal(auto, decoder.predict(data.test)[1])
    assert BrainGuardDecoder(target="ipadapter", calibration="auto")._calibration_kind() == "token"


def test_released_recipe_trains_on_single_repetitions_and_the_val_split(tmp_path, monkeypatch):
    """brainguard-released on MindEye1 data: batch b of every epoch feeds repetition b % 3 of each
    sample (the released ``voxel[:, train_i % 3]``), the model is selected on the val shards."""
    from brainrecon.data import load_dataset
    from brainrecon.data.miniature import write_mindeye1

    ds = load_dataset(str(write_mindeye1(tmp_path, subjects=(1, 2), n_train=30, n_val=6)))
    seen = []
    original = federated.Client.training_batches

    def spy(self):
        for b, (x, y) in enumerate(original(self)):
            seen.append((self.subject, b, self.repetitions_used[-1], x.detach().clone()))
            yield x, y

    monkeypatch.setattr(federated.Client, "training_batches", spy)
    params = apply_recipe("brainguard", "brainguard-released", {**TINY, "batch_size": 8, "rounds": 2})
    decoder = BrainGuardDecoder(**params).fit(ds.train)
    assert decoder.federation_["n_train"] == {"1": 30, "2": 30}  # the val shards' 6 images held out
    assert any("val" in rec for rec in decoder.history_)  # clients validated every round
    assert {b for _, b, _, _ in seen} == {0, 1, 2, 3}
    for s in (1, 2):
        stack = ds.train.trial_stack(s)
        avg = ds.train.voxels(s)
        mean, std = avg.mean(axis=0, dtype=np.float64), avg.std(axis=0, dtype=np.float64)
        z = ((stack - mean) / np.where(std > 1e-8, std, 1.0)).astype(np.float32)
        fit_rows = np.setdiff1d(np.arange(len(avg)), ds.train.validation_rows(s))
        for subject, b, rep, x in seen:
            if subject != s:
                continue
            assert rep == b % 3
            # Every row is that repetition of one of the subject's training (not validation) images.
            candidates = torch.from_numpy(z[fit_rows, rep])
            dist = torch.cdist(x, candidates, compute_mode="donot_use_mm_for_euclid_dist").min(dim=1).values
            assert float(dist.max()) < 1e-4
            # ... and not the average (single-trial rows differ from averages where an image has 2+ trials).
            other = torch.from_numpy(((avg[fit_rows] - mean) / std).astype(np.float32))
            exact = torch.cdist(x, other, compute_mode="donot_use_mm_for_euclid_dist")
            assert float(exact.min(dim=1).values.max()) > 1e-3 or rep == 2


def test_single_trials_need_data_with_trials():
    from brainrecon.data import from_arrays

    rng = np.random.default_rng(0)
    data = from_arrays({1: {"train_voxels": rng.standard_normal((20, 8)).astype(np.float32),
                            "test_voxels": rng.standard_normal((4, 8)).astype(np.float32),
                            "train_images": np.zeros((20, 8, 8, 3), np.uint8),
                            "test_images": np.zeros((4, 8, 8, 3), np.uint8)}})
    with pytest.raises(DataError, match="has no single trials.*trials='average'"):
        BrainGuardDecoder(**TINY, trials="single").fit(data.train)
    with pytest.raises(DataError, match="Unknown trials 'one'"):
        BrainGuardDecoder(**TINY, trials="one").fit(data.train)
