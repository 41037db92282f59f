"""Versatile Diffusion dual-guided generation from CLIP states, with tiny components built from config."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from brainrecon.errors import BrainreconError
from brainrecon.testing.tiny import save_tiny_clip, tiny_versatile_components

pytestmark = pytest.mark.usefixtures("one_thread")

IMG, TXT, DIM = 5, 3, 16  # Versatile Diffusion: 257 image and 77 text tokens of 768
STEPS = 3


@pytest.fixture(scope="module")
def generator():
    from brainrecon.generate.versatile import VersatileGenerator

    return VersatileGenerator.from_components(*tiny_versatile_components(cross_attention_dim=DIM), device="cpu",
                                              image_tokens=IMG)


def states(n, seed=0):
    return np.random.default_rng(seed).normal(size=(n, IMG + TXT, DIM)).astype(np.float32)


def test_dual_transformers_take_the_released_settings(generator):
    from diffusers.models import DualTransformer2DModel

    generator.generate(states(1), steps=1, mix_ratio=0.3, progress=False)
    duals = [m for m in generator.load()[0].modules() if isinstance(m, DualTransformer2DModel)]
    assert len(duals) == 4  # down (1), mid (1), up (2: layers_per_block + 1)
    assert all(d.mix_ratio == 0.3 and d.condition_lengths == [TXT, IMG] and d.transformer_index_for_condition == [1, 0]
               for d in duals)


def test_context_is_text_then_image_over_token_zero_norms_and_cfg_uses_zeros(generator):
    seen = []
    unet = generator.load()[0]
    handle = unet.register_forward_pre_hook(lambda m, args, kw: seen.append(kw["encoder_hidden_states"].clone()),
                                            with_kwargs=True)
    try:
        x = states(2)
        generator.generate(x, steps=2, guidance_scale=5.0, progress=False, batch_size=2)
    finally:
        handle.remove()
    ctx = seen[0]
    assert ctx.shape == (4, TXT + IMG, DIM) and len(seen) == 2
    assert torch.count_nonzero(ctx[:2]) == 0  # unconditional half: zeros
    text, image = x[:, IMG:], x[:, :IMG]
    ref_text = text / (np.linalg.norm(text[:, :1], axis=-1, keepdims=True) + 1e-6)
    ref_image = image / (np.linalg.norm(image[:, :1], axis=-1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(ctx[2:, :TXT].numpy(), ref_text, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(ctx[2:, TXT:].numpy(), ref_image, rtol=1e-6, atol=1e-6)


def test_images_are_seeded_per_image_and_scale_free(generator):
    x = states(3, seed=1)
    together = generator.generate(x, seeds=[10, 11, 12], steps=STEPS, batch_size=3, progress=False)
    alone = generator.generate(x[1:2], seeds=[11], steps=STEPS, progress=False)
    assert together.shape == (3, 16, 16, 3) and together.dtype == np.uint8
    np.testing.assert_array_equal(together[1], alone[0])
    # token-0 renormalisation: a prediction's overall scale does not matter
    scaled = generator.generate(x[1:2] * 7.0, seeds=[11], steps=STEPS, progress=False)
    assert np.abs(scaled.astype(int) - alone.astype(int)).max() <= 1
    assert not np.array_equal(together[0], together[1])


def test_mix_ratio_selects_the_branch(generator):
    x = states(1, seed=2)
    other_text = x.copy()
    other_text[:, IMG:] = states(1, seed=3)[:, IMG:]
    other_image = x.copy()
    other_image[:, :IMG] = states(1, seed=4)[:, :IMG]

    def gen(v, mix):
        return generator.generate(v, seeds=[0], steps=STEPS, mix_ratio=mix, progress=False).astype(int)

    np.testing.assert_array_equal(gen(x, 0.0), gen(other_text, 0.0))  # image states only
    np.testing.assert_array_equal(gen(x, 1.0), gen(other_image, 1.0))  # text states only
    assert np.abs(gen(x, 0.5) - gen(other_text, 0.5)).max() > 0


def test_img2img_starts_from_the_lowlevel_image(generator):
    calls = []
    unet = generator.load()[0]
    handle = unet.register_forward_pre_hook(lambda m, a: calls.append(1))
    low = np.random.default_rng(5).integers(0, 256, (1, 20, 20, 3), dtype=np.uint8)
    try:
        generator.generate(states(1), steps=10, lowlevel=low, img2img_strength=0.3, progress=False)
    finally:
        handle.remove()
    assert len(calls) == 3  # int(10 * 0.3) steps from t_start = 7
    with pytest.raises(BrainreconError, match="img2img_strength must be in"):
        generator.generate(states(1), steps=2, lowlevel=low, img2img_strength=0.0, progress=False)


def test_bad_states_are_refused(generator):
    with pytest.raises(BrainreconError, match=r"CLIP states must have shape \(n, 5 \+ text tokens, 16\)"):
        generator.generate(np.zeros((1, 4, DIM), np.float32), progress=False)


def test_reconstruct_a_clip_run_with_a_recipe(generator, tmp_path):
    from brainrecon.runs import Run
    from brainrecon.workflows.reconstruct import reconstruct_run

    run_dir = tmp_path / "clip-run"
    run_dir.mkdir()
    ids = np.array([3, 8, 13])
    np.save(run_dir / "predictions.npy", states(3, seed=6))
    np.save(run_dir / "test_ids.npy", ids)
    (run_dir / "run.json").write_text(json.dumps({"name": "clip-run", "decoder": "brainguard", "target": "clip",
                                                  "predicts": "target", "subject": 1, "n_test": 3,
                                                  "params": {"target": "clip"}}))
    run = reconstruct_run(run_dir, recipe="mindbridge", steps=STEPS, generator=generator, progress=False)
    settings = json.loads((run.path / "reconstructions" / "generation.json").read_text())
    assert settings["recipe"] == "mindbridge" and settings["guidance_scale"] == 5.0 and settings["mix_ratio"] == 0.5
    assert settings["steps"] == STEPS and "no ground-truth" in settings["selection"]
    direct = generator.generate(states(3, seed=6), seeds=ids, steps=STEPS, guidance_scale=5.0, progress=False)
    np.testing.assert_array_equal(Run.open(run_dir).reconstructions(), direct)
    with pytest.raises(BrainreconError, match="recipe 'weadl' is for the 'ipadapter' generator"):
        reconstruct_run(run_dir, recipe="weadl", generator=generator, progress=False)


@pytest.mark.slow
def test_published_brainguard_imports_reconstructs_evaluates_and_continues(generator, tmp_path, monkeypatch):
    """A tiny two-branch file in the released layout: import (with data) -> Versatile Diffusion ->
    evaluate -> fit --init-from on clip targets."""
    from test_brainguard_import import SMALL, SYNTH_V1, released_module
    from typer.testing import CliRunner

    from brainrecon.cli import app
    from brainrecon.runs import Run
    from brainrecon.workflows.evaluate import evaluate_run
    from brainrecon.workflows.reconstruct import reconstruct_run

    monkeypatch.setenv("BRAINRECON_CACHE", str(tmp_path / "cache"))
    module = released_module(SYNTH_V1, h=8, n_blocks=2, image_tokens=IMG, text_tokens=TXT, dim=DIM,
                             projector_width=12, seed=4)
    torch.save(module.state_dict(), tmp_path / "client1_best.pth")
    runner = CliRunner()
    result = runner.invoke(app, ["import", "brainguard", "--checkpoint", str(tmp_path / "client1_best.pth"),
                                 "--subject", "1", "--out", str(tmp_path / "imported"), "--data", SMALL,
                                 "--runs", str(tmp_path / "runs")])
    assert result.exit_code == 0, result.output
    assert "layout brainguard" in result.output and "--recipe mindbridge" in result.output
    run = Run.open(tmp_path / "runs" / "brainguard-official-subj01")
    assert run.info["target"] == "clip" and run.predictions().shape == (6, IMG + TXT, DIM)
    run = reconstruct_run(run, recipe="brainguard-released", steps=STEPS, generator=generator, progress=False)
    assert run.reconstructions().shape == (6, 16, 16, 3)
    report = evaluate_run(run, metrics=["PixCorr", "SSIM"], device="cpu", progress=False)
    assert np.isfinite(report["SSIM"])

    clip_dir = save_tiny_clip(tmp_path / "clip", text_tokens=TXT, dim=DIM)
    target_options = {"model": str(clip_dir), "image_tokens": IMG, "text_tokens": TXT, "dim": DIM, "device": "cpu"}
    result = runner.invoke(app, ["fit", "--decoder", "brainguard", "--data", SMALL, "--subjects", "1",
                                 "--init-from", str(tmp_path / "imported"), "--rounds", "1", "--no-evaluate",
                                 "--param", f"target_options={json.dumps(target_options)}",
                                 "--param", "batch_size=20", "--param", "progress=false",
                                 "--param", "dfl_num_pre_loss=1", "--out", str(tmp_path / "continued")])
    assert result.exit_code == 0, result.output
    cont = Run.open(next((tmp_path / "continued").iterdir()))
    assert cont.info["params"]["branches"] == [IMG, TXT] and cont.info["target"] == "clip"
    assert cont.info["params"]["projector_hidden"] == 12
    assert cont.predictions().shape == (6, IMG + TXT, DIM)
