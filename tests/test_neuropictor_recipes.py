"""NeuroPictor's named recipes and the training options they need (accumulation, clipping,
schedules, resizing, sampling precision, per-stage values): tiny models, CPU, offline."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from brainrecon.data.synthetic import make_synthetic
from brainrecon.decoders.neuropictor import NeuroPictorDecoder
from brainrecon.decoders.neuropictor import train as train_module
from brainrecon.decoders.neuropictor.recipes import PAPER, RELEASED
from brainrecon.errors import BrainreconError
from brainrecon.decoders import apply_recipe

TINY_SIZES = {
    "surface_size": 16, "patch_size": 4, "encoder_dim": 32, "encoder_depth": 2, "encoder_heads": 4,
    "bottleneck_dim": 16, "decoder_dim": 16, "decoder_depth": 1, "decoder_heads": 2, "image_size": 32,
}
TINY = {**TINY_SIZES, "batch_size": 2, "num_inference_steps": 2, "progress": False, "device": "cpu",
        "gradient_checkpointing": False, "base_model": "tiny"}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data():
    return make_synthetic(seed=0, subjects=(1,), n_train=8, n_test=2, image_size=32, surface_size=16)


def released(**overrides) -> NeuroPictorDecoder:
    return NeuroPictorDecoder(**apply_recipe("neuropictor", "neuropictor-released", overrides))


# ---------------------------------------------------------------------------- the recipes' values
def test_describe_lists_every_recipe_value_with_its_note(monkeypatch):
    from typer.testing import CliRunner

    from brainrecon import cli

    monkeypatch.setattr(cli.console, "width", 2000)  # one table row per line
    result = CliRunner().invoke(cli.app, ["decoders", "describe", "neuropictor"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    for recipe in (RELEASED, PAPER):
        start = next(i for i, line in enumerate(lines) if f"recipe {recipe.name}" in line)
        block = "\n".join(lines[start:start + 3 * len(recipe.values) + 12])
        assert recipe.source[:40] in block
        for key, value in recipe.values.items():
            row = next((line for line in block.splitlines() if line.strip("│┃ ").startswith(f"{key} ")), None)
            assert row is not None, (recipe.name, key)
            assert repr(value) in row, (recipe.name, key, row)
            assert recipe.notes[key][:30] in row, (recipe.name, key)


def test_every_recipe_value_has_a_note_and_reaches_the_decoder():
    for recipe in (RELEASED, PAPER):
        assert set(recipe.notes) >= set(recipe.values)
        decoder = NeuroPictorDecoder(**apply_recipe("neuropictor", recipe.name, {}))
        params = decoder.get_params()
        for key, value in recipe.values.items():
            assert params[key] == value, key


def test_the_released_recipe_resolves_to_the_official_yaml_values_per_stage():
    decoder = released()
    n = 8859  # subject 1's training images
    pre = decoder.training_plan(67_000, stage="pretrain", processes=1)
    assert (pre["lr"], pre["semantic_weight"], pre["detach_unet_encoder"]) == (1e-4, 0.0, True)
    assert (pre["grad_accum"], pre["global_batch"]) == (6, 96)
    assert pre["steps"] == 80 * -(-67_000 // 96)
    pre_mask = decoder.training_plan(67_000, stage="cfg", use_aux=False, processes=6)
    assert pre_mask["stage_keys"] == ["pretrain_mask", "cfg"]
    assert (pre_mask["lr"], pre_mask["cfg_drop"], pre_mask["semantic_weight"]) == (1e-5, 0.05, 0.0)
    assert (pre_mask["grad_accum"], pre_mask["detach_unet_encoder"]) == (1, False)
    assert pre_mask["steps"] == 20 * -(-67_000 // 96)
    fin = decoder.training_plan(n, stage="finetune", processes=2)
    assert (fin["lr"], fin["semantic_weight"], fin["grad_accum"], fin["global_batch"]) == (1e-4, 0.1, 1, 32)
    assert fin["steps"] == 160 * -(-n // 32) and not fin["detach_unet_encoder"]
    fin_mask = decoder.training_plan(n, stage="cfg", use_aux=True, processes=1)
    assert (fin_mask["lr"], fin_mask["semantic_weight"], fin_mask["grad_accum"]) == (1e-5, 0.1, 2)
    assert fin_mask["steps"] == 15 * -(-n // 32)
    assert decoder._sizes().semantic_hidden == 128  # tokens // 2 at 257 tokens

    paper = NeuroPictorDecoder(**apply_recipe("neuropictor", "neuropictor-paper", {}))
    pre = paper.training_plan(67_000, stage="pretrain", processes=4)
    assert (pre["steps"], pre["global_batch"], pre["grad_accum"]) == (100_000, 64, 1)
    assert paper.training_plan(n, stage="finetune", processes=1)["steps"] == 60_000
    assert paper.training_plan(n, stage="cfg", use_aux=True)["steps"] == 15 * -(-n // 32)


def test_per_stage_values_and_global_batch_errors():
    with pytest.raises(BrainreconError, match=r"lr maps unknown stage\(s\) \['fine'\]"):
        NeuroPictorDecoder(lr={"fine": 1e-4}).training_plan(10, stage="finetune")
    with pytest.raises(BrainreconError, match=r"global_batch 96 is not a multiple of batch_size 16 x 5"):
        NeuroPictorDecoder(global_batch=96).training_plan(10, processes=5)
    with pytest.raises(BrainreconError, match="grad_accum=2 contradicts global_batch 96"):
        NeuroPictorDecoder(global_batch=96, grad_accum=2).training_plan(10, processes=1)
    plan = NeuroPictorDecoder(lr={"finetune": 3e-4}, epochs=2).training_plan(10, stage="pretrain", processes=1)
    assert plan["lr"] == 1e-4 and plan["steps"] == 2  # stages not in the mapping get the default


def test_a_recipe_fit_records_the_recipe_and_runs_with_accumulation(data, tmp_path):
    from brainrecon.workflows import fit

    params = {**TINY, "stage": "pretrain", "steps": 1, "global_batch": 4}
    (run,) = fit("neuropictor", dataset=data, out=tmp_path / "runs", recipe="neuropictor-released",
                 params=params, evaluate=False)
    assert run.info["recipe"] == "neuropictor-released"
    assert run.info["params"]["image_resize"] == "pil-bilinear"
    assert run.info["params"]["sample_precision"] == "fp16-autocast"
    from brainrecon.decoders import load_decoder

    decoder = load_decoder(run.path / "decoder")
    assert decoder.training_plan_["grad_accum"] == 2 and decoder.training_plan_["global_batch"] == 4


# ---------------------------------------------------------------------------- the training options
def _encoder_stage(data, **kw):
    common = {**TINY, "stage": "encoder", "steps": 3, "lr": 1e-3, "seed": 1}
    return NeuroPictorDecoder(**{**common, **kw}).fit(data.train)


def test_gradient_accumulation_equals_the_large_batch(data, monkeypatch):
    # The optimiser sees the same gradients (Adam's first steps amplify float noise in
    # near-zero gradients to +-lr, so the gradients, not the weights, are compared).
    seen = []
    real_step = torch.optim.AdamW.step

    def recording_step(self, *args, **kwargs):
        seen[-1].append([p.grad.detach().clone() for g in self.param_groups for p in g["params"]])
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    runs = {}
    for name, kw in {"big": {"batch_size": 4}, "accumulated": {"batch_size": 2, "grad_accum": 2},
                     "by_global": {"batch_size": 1, "global_batch": 4}}.items():
        seen.append([])
        runs[name] = _encoder_stage(data, **kw)
    big, *others = seen
    for other in others:
        assert len(other) == len(big) == 3
        for step_big, step_other in zip(big, other):
            for g_big, g_other in zip(step_big, step_other):
                torch.testing.assert_close(g_other, g_big, rtol=1e-4, atol=1e-7)
    for name in ("accumulated", "by_global"):
        np.testing.assert_allclose(runs[name].losses_, runs["big"].losses_, rtol=1e-5)
    assert runs["by_global"].train_stats_["samples_per_step"] == 4


def test_batch_schedule_splits_a_global_batch_the_same_way():
    one = train_module.BatchSchedule(10, 4, 1, seed=0)
    split = train_module.BatchSchedule(10, 1, 2, seed=0, grad_accum=2)
    for step in range(3):
        whole = one.positions(step, 0)
        parts = np.concatenate([split.positions(step, rank, micro) for micro in range(2) for rank in range(2)])
        np.testing.assert_array_equal(whole, parts)


def test_gradient_clipping_is_applied(data, monkeypatch):
    norms = []
    real_step = torch.optim.AdamW.step

    def recording_step(self, *args, **kwargs):
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        norms.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    _encoder_stage(data, steps=2)
    assert min(norms) > 1e-2
    norms.clear()
    _encoder_stage(data, steps=2, grad_clip=1e-3)
    assert max(norms) <= 1e-3 * (1 + 1e-4)


def test_learning_rate_schedules():
    f = train_module.lr_factor
    assert [f("constant", s, 10) for s in (0, 9)] == [1.0, 1.0]
    assert [f("linear", s, 10, 2) for s in (0, 1, 2, 6)] == [0.5, 1.0, 1.0, 0.5]
    assert f("cosine", 2, 10, 2) == 1.0 and abs(f("cosine", 6, 10, 2) - 0.5) < 1e-12
    with pytest.raises(BrainreconError, match="Unknown lr_schedule 'step'"):
        f("step", 0, 10)


def test_schedule_changes_training_only_through_the_learning_rate(data):
    constant = _encoder_stage(data, steps=2)
    warm = _encoder_stage(data, steps=2, lr_schedule="cosine", lr_warmup_steps=2)
    assert warm.losses_[0] == constant.losses_[0]  # same first batch, lr does not enter the loss
    assert warm.losses_[1] != constant.losses_[1]


def test_pil_bilinear_resizing_matches_torchvision_on_pil_images():
    transforms = pytest.importorskip("torchvision.transforms")
    from PIL import Image

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2, 24, 24, 3), dtype=np.uint8)
    got = train_module.resize_images(images, 16, "pil-bilinear")
    want = np.stack([np.asarray(transforms.Resize((16, 16))(Image.fromarray(im))) for im in images])
    np.testing.assert_array_equal(got, want)
    assert not np.array_equal(train_module.resize_images(images, 16), got)
    with pytest.raises(BrainreconError, match="Unknown image_resize 'area'"):
        train_module.resize_images(images, 16, "area")


def test_hidden_width_of_the_guiding_network_is_tokens_over_two(data):
    decoder = NeuroPictorDecoder(**{**TINY, "stage": "pretrain", "steps": 1}).fit(data.train)
    assert decoder.net_.semantic.main.token_mix1.out_channels == 17 // 2
    assert decoder.get_params()["semantic_hidden"] is None


def test_fp16_autocast_sampling_is_float32_on_cpu(data):
    decoder = NeuroPictorDecoder(**{**TINY, "stage": "pretrain", "steps": 1}).fit(data.train)
    auto = decoder.predict(data.test)[1]
    decoder.sample_precision = "fp16-autocast"
    np.testing.assert_array_equal(decoder.predict(data.test)[1], auto)
    decoder.sample_precision = "fp8"
    with pytest.raises(BrainreconError, match="Unknown sample_precision 'fp8'"):
        decoder.predict(data.test)


def test_resuming_checks_the_global_batch_not_its_split(data, tmp_path):
    common = {"batch_size": 2, "checkpoint_every": 2}
    full = _encoder_stage(data, steps=4, grad_accum=2, **common)
    _encoder_stage(data, steps=2, grad_accum=2, checkpoint_dir=str(tmp_path / "c"), **common)
    resumed = _encoder_stage(data, steps=4, global_batch=4, checkpoint_dir=str(tmp_path / "c"), resume=True, **common)
    assert resumed.losses_ == full.losses_
    with pytest.raises(BrainreconError, match=r"global_batch=4 in the checkpoint vs 8 now"):
        _encoder_stage(data, steps=6, global_batch=8, checkpoint_dir=str(tmp_path / "c"), resume=True, **common)


def test_pixel_rounding_truncates_like_the_official_png_writer():
    from brainrecon.decoders.neuropictor import sample

    class Identity:
        config = type("C", (), {"scaling_factor": 1.0})()

        def parameters(self):
            yield torch.zeros(())

        def decode(self, latents):
            return type("O", (), {"sample": latents})()

    x = torch.full((1, 3, 1, 1), 0.6 / 255 * 2 - 1)  # 0.6 of a grey level
    assert sample.decode_latents(Identity(), x).max() == 1
    assert sample.decode_latents(Identity(), x, rounding="truncate").max() == 0
