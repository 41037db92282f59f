"""Images from IP-Adapter Plus tokens (brainrecon.generate) with tiny random models.

The SD 1.5-style pipeline folder, the IP-Adapter checkpoint and the image encoder are built by
:func:`brainrecon.testing.tiny.build_tiny_weights` (the session fixture ``tiny_weights``) and
loaded through the generator's own code path.
Reference results come from diffusers' ``StableDiffusionPipeline`` itself.
"""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from brainrecon.errors import BrainreconError, DataError, WeightsNotFoundError
from brainrecon.testing.tiny import (
    CROSS_DIM,
    ENC_HIDDEN,
    ENC_IMAGE,
    ENC_PATCH,
    TOKEN_SHAPE,
)

STEPS = 3
N_PATCH_TOKENS = (ENC_IMAGE // ENC_PATCH) ** 2 + 1


@pytest.fixture(scope="module")
def generator(tiny_weights):
    from brainrecon.generate import IPAdapterGenerator

    # Loads lazily, inside the first test (after the offline fixtures are in place).
    return IPAdapterGenerator(tiny_weights["sd"], ipadapter_dir=tiny_weights["ipadapter"], device="cpu")


def tokens(n, seed=0):
    return np.random.default_rng(seed).normal(size=(n,) + TOKEN_SHAPE).astype(np.float32)


def as_uint8(images):
    return np.clip(np.rint(np.asarray(images) * 255), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def plain(tiny_weights):
    """diffusers' own pipeline on the same folder, without IP-Adapter, with the same DDIM."""
    return functools.lru_cache(maxsize=None)(lambda: plain_pipeline(tiny_weights))


def plain_pipeline(tiny_weights):
    from diffusers import StableDiffusionPipeline

    from brainrecon.generate.ipadapter import make_scheduler

    pipe = StableDiffusionPipeline.from_pretrained(tiny_weights["sd"], safety_checker=None,
                                                   requires_safety_checker=False, local_files_only=True)
    pipe.scheduler = make_scheduler("ddim", pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---------------------------------------------------------------------------- generation
def test_shapes_determinism_and_batch_independence(generator):
    t = tokens(3)
    a = generator.generate(t, seeds=[5, 6, 7], steps=STEPS, batch_size=3, progress=False)
    assert a.shape == (3, 16, 16, 3) and a.dtype == np.uint8  # 8 x 8 latents x VAE factor 2
    b = generator.generate(t, seeds=[5, 6, 7], steps=STEPS, batch_size=2, progress=False)
    # Same seed, same image; batch composition changes only float rounding.
    assert np.abs(a.astype(int) - b).max() <= 1
    again = generator.generate(t, seeds=[5, 6, 7], steps=STEPS, batch_size=3, progress=False)
    np.testing.assert_array_equal(again, a)
    other_seed = generator.generate(t, seeds=[8, 9, 10], steps=STEPS, batch_size=3, progress=False)
    assert np.abs(other_seed.astype(int) - a).mean() > 5
    assert a.std() > 5  # not a blank image


def test_predicted_tokens_change_the_image(generator):
    t = tokens(2)
    a = generator.generate(t, seeds=0, steps=STEPS, progress=False)
    b = generator.generate(t * -1.0, seeds=0, steps=STEPS, progress=False)
    assert np.abs(a.astype(int) - b).mean() > 5
    # ... and the IP-Adapter scale controls how much.
    c = generator.generate(t, seeds=0, steps=STEPS, ip_adapter_scale=0.0, progress=False)
    d = generator.generate(t * -1.0, seeds=0, steps=STEPS, ip_adapter_scale=0.0, progress=False)
    np.testing.assert_array_equal(c, d)


def test_ip_adapter_scale_zero_equals_plain_generation(generator, plain):
    """Scale 0 with no text = diffusers' plain pipeline on all-zero text embeddings."""
    pipe = plain()
    ours = generator.generate(tokens(2), seeds=[3, 4], steps=STEPS, ip_adapter_scale=0.0, progress=False)
    gens = [torch.Generator().manual_seed(s) for s in (3, 4)]
    zeros = torch.zeros(2, 1, CROSS_DIM)
    ref = pipe(prompt_embeds=zeros, negative_prompt_embeds=zeros, num_inference_steps=STEPS, generator=gens,
               output_type="np").images
    assert np.abs(ours.astype(int) - as_uint8(ref)).max() <= 1
    # With a text prompt (tokenizer and text encoder loaded from the folder).
    ours = generator.generate(tokens(2), seeds=[3, 4], steps=STEPS, ip_adapter_scale=0.0, prompt="a red cat",
                              negative_prompt="dog", progress=False)
    gens = [torch.Generator().manual_seed(s) for s in (3, 4)]
    ref = pipe(prompt=["a red cat"] * 2, negative_prompt=["dog"] * 2, num_inference_steps=STEPS, generator=gens,
               output_type="np").images
    assert np.abs(ours.astype(int) - as_uint8(ref)).max() <= 1


def test_projection_bypass_equals_diffusers_ip_adapter(generator, tiny_weights, plain):
    """Post-projection tokens through the identity = diffusers running the Resampler itself.

    The reference loads the checkpoint by folder + subfolder + weight name (no network) and
    gets pre-projection CLIP hidden states, as diffusers expects for Plus models.
    """
    from brainrecon.targets.ipadapter import load_image_projection

    pipe = plain()
    pipe.load_ip_adapter(str(tiny_weights["ipadapter"]), subfolder="models",
                         weight_name="ip-adapter-plus_sd15.safetensors", image_encoder_folder=None,
                         local_files_only=True)
    g = torch.Generator().manual_seed(11)
    h_cond, h_uncond = torch.randn(2, 1, N_PATCH_TOKENS, ENC_HIDDEN, generator=g)
    zeros = torch.zeros(1, 1, CROSS_DIM)
    try:
        ref = pipe(prompt_embeds=zeros, negative_prompt_embeds=zeros,
                   ip_adapter_image_embeds=[torch.cat([h_uncond, h_cond])[:, None]], num_inference_steps=STEPS,
                   generator=[torch.Generator().manual_seed(21)], output_type="np").images
    finally:
        pipe.unload_ip_adapter()  # the module's plain pipeline stays plain
    proj = load_image_projection(tiny_weights["ipadapter"] / "models" / "ip-adapter-plus_sd15.bin")
    with torch.no_grad():
        cond, uncond = proj(h_cond).numpy(), proj(h_uncond)[0].numpy()
    ours = generator.generate(cond, uncond=uncond, seeds=[21], steps=STEPS, progress=False)
    assert np.abs(ours.astype(int) - as_uint8(ref)).max() <= 1
    # Guidance uses the uncond tokens: other negative tokens, another image.
    other = generator.generate(cond, uncond=uncond * 0, seeds=[21], steps=STEPS, progress=False)
    assert np.abs(other.astype(int) - ours).mean() > 1


def test_default_uncond_is_the_weights_uncond(generator, tiny_weights):
    from brainrecon.targets.ipadapter import IPAdapterTarget

    un = IPAdapterTarget(ipadapter_dir=tiny_weights["ipadapter"], device="cpu").uncond_tokens()
    t = tokens(1, seed=4)
    a = generator.generate(t, seeds=[1], steps=STEPS, progress=False)
    b = generator.generate(t, uncond=un, seeds=[1], steps=STEPS, progress=False)
    np.testing.assert_array_equal(a, b)


def test_schedulers_guidance_and_vae(tiny_weights, generator):
    from brainrecon.generate import IPAdapterGenerator

    t = tokens(1)
    base = generator.generate(t, seeds=[0], steps=STEPS, progress=False)
    no_cfg = generator.generate(t, seeds=[0], steps=STEPS, guidance_scale=1.0, progress=False)
    assert np.abs(no_cfg.astype(int) - base).mean() > 1
    # A stochastic scheduler (fresh noise each step, from the per-image generators) and a separate VAE.
    other = IPAdapterGenerator(tiny_weights["sd"], vae=tiny_weights["vae"], ipadapter_dir=tiny_weights["ipadapter"],
                               device="cpu", scheduler="euler-ancestral")
    v = other.generate(t, seeds=[0], steps=STEPS, progress=False)
    np.testing.assert_array_equal(v, other.generate(t, seeds=[0], steps=STEPS, progress=False))
    assert v.shape == base.shape and np.abs(v.astype(int) - base).mean() > 1
    assert type(other.load().vae.decoder.conv_out).__name__ == "Conv2d"
    torch.testing.assert_close(other.load().vae.decoder.conv_out.weight,
                               _vae_weight(tiny_weights["vae"]), rtol=0, atol=0)
    assert other.settings()["vae"] == str(tiny_weights["vae"]) and other.settings()["scheduler"] == "euler-ancestral"


def _vae_weight(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "diffusion_pytorch_model.safetensors"))["decoder.conv_out.weight"]


def test_bad_inputs(generator):
    from brainrecon.generate import IPAdapterGenerator

    with pytest.raises(BrainreconError, match="Unknown scheduler 'ddpm'. Available schedulers: 'ddim'"):
        IPAdapterGenerator(scheduler="ddpm")
    with pytest.raises(DataError, match=rf"Tokens must have shape \(n, 4, {CROSS_DIM}\).*got \(2, 16, 768\)"):
        generator.generate(np.zeros((2, 16, 768)), progress=False)
    with pytest.raises(DataError, match="Got 1 seeds for 2 images"):
        generator.generate(tokens(2), seeds=[1], progress=False)
    bad = tokens(1)
    bad[0, 0, 0] = np.nan
    with pytest.raises(DataError, match="1 token values are NaN"):
        generator.generate(bad, progress=False)
    with pytest.raises(BrainreconError, match="negative_prompt needs a prompt"):
        generator.generate(tokens(1), negative_prompt="x", progress=False)


def test_missing_base_model_offline(tiny_weights, tmp_path, monkeypatch):
    from brainrecon.generate import IPAdapterGenerator

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    gen = IPAdapterGenerator(ipadapter_dir=tiny_weights["ipadapter"], device="cpu")
    with pytest.raises(WeightsNotFoundError) as info:
        gen.generate(tokens(1), progress=False)
    msg = str(info.value)
    assert "'stable-diffusion-v1-5/stable-diffusion-v1-5'" in msg and "downloads are disabled" in msg
    assert "pass DIR as base_model" in msg and info.value.parameters == ("base_model",)
    empty = tmp_path / "empty-sd"
    empty.mkdir()
    with pytest.raises(WeightsNotFoundError, match="Cannot load the Stable Diffusion base model from"):
        IPAdapterGenerator(empty, ipadapter_dir=tiny_weights["ipadapter"], device="cpu").load()
    # The IP-Adapter checkpoint is checked before the base model is read.
    with pytest.raises(WeightsNotFoundError, match="ip-adapter-plus_sd15"):
        IPAdapterGenerator(tiny_weights["sd"], ipadapter_dir=tmp_path, device="cpu").load()


# ---------------------------------------------------------------------------- runs
def make_run(path, n=3, target="ipadapter", seed=0):
    path.mkdir(parents=True)
    ids = np.array([70, 12, 5, 33, 8][:n], dtype=np.int64)
    np.save(path / "test_ids.npy", ids)
    np.save(path / "predictions.npy", tokens(n, seed))
    info = {"name": path.name, "decoder": "ridge", "params": {"target": target}, "subject": 1, "target": target,
            "predicts": "target", "n_test": n}
    (path / "run.json").write_text(json.dumps(info))
    return ids


def test_reconstruct_run_writes_pngs_array_settings_and_resumes(generator, tmp_path, monkeypatch):
    from PIL import Image

    from brainrecon.workflows.reconstruct import reconstruct_run
    from brainrecon.runs import Run

    ids = make_run(tmp_path / "r")
    run = reconstruct_run(tmp_path / "r", generator=generator, steps=STEPS, seed=100, batch_size=2, progress=False)
    recon = run.reconstructions()
    assert recon.shape == (3, 16, 16, 3) and recon.dtype == np.uint8
    names = sorted(p.name for p in (tmp_path / "r" / "reconstructions").glob("*.png"))
    assert names == ["0000-id70.png", "0001-id12.png", "0002-id5.png"]
    for row, name in enumerate(names):
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "r" / "reconstructions" / name)), recon[row])
    # Image i uses seed + its test id, aligned with test_ids.
    direct = generator.generate(np.load(tmp_path / "r" / "predictions.npy"), seeds=100 + ids, steps=STEPS,
                                progress=False)
    assert np.abs(direct.astype(int) - recon).max() <= 1
    settings = json.loads((tmp_path / "r" / "reconstructions" / "generation.json").read_text())
    assert settings["steps"] == STEPS and settings["scheduler"] == "ddim" and settings["ip_adapter_scale"] == 1.0
    assert settings["guidance_scale"] == 7.5 and settings["prompt"] is None and settings["seed"] == 100

    # Interrupted run: one PNG missing -> only that image is generated again.
    (tmp_path / "r" / "reconstructions" / names[1]).unlink()
    calls = []
    original = generator.generate

    def counting(t, **kw):
        calls.append(len(t))
        return original(t, **kw)

    monkeypatch.setattr(generator, "generate", counting)
    again = reconstruct_run(Run.open(tmp_path / "r"), generator=generator, steps=STEPS, seed=100, progress=False)
    assert calls == [1]
    np.testing.assert_array_equal(np.delete(again.reconstructions(), 1, 0), np.delete(recon, 1, 0))
    assert np.abs(again.reconstructions()[1].astype(int) - recon[1]).max() <= 1  # batch of 1 instead of 2
    # Other settings: everything is regenerated.
    calls.clear()
    reconstruct_run(tmp_path / "r", generator=generator, steps=STEPS, seed=101, progress=False)
    assert calls == [3]


def test_reconstruct_run_rejects_other_runs(tmp_path, generator):
    from brainrecon.workflows.reconstruct import reconstruct_run

    make_run(tmp_path / "pix", target="pixels")
    with pytest.raises(BrainreconError, match="predicts 'pixels', not IP-Adapter tokens"):
        reconstruct_run(tmp_path / "pix", generator=generator)
    with pytest.raises(BrainreconError, match="is not a brainrecon run"):
        reconstruct_run(tmp_path / "nothing", generator=generator)


def test_end_to_end_embed_fit_reconstruct_evaluate(tiny_weights, small_data, tmp_path, monkeypatch):
    """embed -> ridge on IP-Adapter tokens -> reconstruct -> evaluate (PixCorr, SSIM)."""
    import brainrecon.targets.ipadapter as ipa
    from brainrecon import workflows
    from brainrecon.workflows.evaluate import evaluate_run
    from brainrecon.workflows.reconstruct import reconstruct_run

    # `fit --target ipadapter` builds the target with default options; point them at the tiny weights.
    monkeypatch.setattr(ipa, "IPAdapterTarget", functools.partial(
        ipa.IPAdapterTarget, ipadapter_dir=tiny_weights["ipadapter"], device="cpu"))
    ds = small_data.select([1])
    cache = ipa.embed_dataset(ds, progress=False)
    assert (cache / "values.npy").is_file()
    runs = workflows.fit("ridge", dataset=ds, subjects=[1], target="ipadapter", out=tmp_path / "runs",
                         evaluate=False)
    assert runs[0].predictions().shape == (12,) + TOKEN_SHAPE and runs[0].reconstructions() is None
    run = reconstruct_run(runs[0], base_model=tiny_weights["sd"], ipadapter_dir=tiny_weights["ipadapter"],
                          steps=2, device="cpu", progress=False)
    assert run.reconstructions().shape == (12, 16, 16, 3)
    report = evaluate_run(run, metrics=["PixCorr", "SSIM"], device="cpu", progress=False)
    assert np.isfinite(report["PixCorr"]) and np.isfinite(report["SSIM"])
    assert (run.path / "metrics.json").is_file()


# ---------------------------------------------------------------------------- CLI
def test_cli_embed_and_reconstruct(tiny_weights, tmp_path):
    import h5py

    from brainrecon.cli import app

    runner = CliRunner()
    imgs = np.random.default_rng(0).integers(0, 256, (3, 30, 30, 3), dtype=np.uint8)
    with h5py.File(tmp_path / "stim.hdf5", "w") as f:
        f["imgBrick"] = imgs
    result = runner.invoke(app, ["embed", "--images", str(tmp_path / "stim.hdf5"), "--out", str(tmp_path / "tok"),
                                 "--ipadapter-dir", str(tiny_weights["ipadapter"]), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "IP-Adapter tokens cached in" in result.output and (tmp_path / "tok" / "uncond_tokens.safetensors").is_file()
    result = runner.invoke(app, ["embed", "--images", str(tmp_path / "stim.hdf5")])
    assert result.exit_code == 1 and "--images needs --out" in result.output

    make_run(tmp_path / "run", n=2)
    result = runner.invoke(app, ["reconstruct", str(tmp_path / "run"), "--steps", "2", "--base-model",
                                 str(tiny_weights["sd"]), "--ipadapter-dir", str(tiny_weights["ipadapter"]),
                                 "--device", "cpu", "--seed", "3", "--guidance-scale", "5", "--batch-size", "1"])
    assert result.exit_code == 0, result.output
    assert np.load(tmp_path / "run" / "reconstructions.npy").shape == (2, 16, 16, 3)
    settings = json.loads((tmp_path / "run" / "reconstructions" / "generation.json").read_text())
    assert settings["guidance_scale"] == 5.0 and settings["seed"] == 3 and settings["steps"] == 2
    result = runner.invoke(app, ["reconstruct", str(tmp_path / "run"), "--scheduler", "nope"])
    assert result.exit_code == 1 and "Unknown scheduler 'nope'" in result.output
    result = runner.invoke(app, ["reconstruct", str(tmp_path / "run"), "--ipadapter-dir", str(tmp_path / "missing"),
                                 "--device", "cpu"])
    assert result.exit_code == 1 and "IP-Adapter weights not found" in result.output


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_fp16_generation_matches_cpu(tiny_weights, generator):
    from brainrecon.generate import IPAdapterGenerator

    gpu = IPAdapterGenerator(tiny_weights["sd"], ipadapter_dir=tiny_weights["ipadapter"], device="cuda")
    assert gpu.dtype == torch.float16
    t = tokens(2)
    a = gpu.generate(t, seeds=[0, 1], steps=STEPS, progress=False)
    b = generator.generate(t, seeds=[0, 1], steps=STEPS, progress=False)
    assert a.shape == b.shape
    # Same CPU-generated noise; fp16 vs fp32 rounding only.
    assert np.abs(a.astype(int) - b).mean() < 3


def test_cli_fit_with_ipadapter_dir_predicts_tokens(tiny_weights, tmp_path):
    from brainrecon.cli import app
    from brainrecon.runs import Run

    result = CliRunner().invoke(app, [
        "fit", "--decoder", "ridge", "--target", "ipadapter", "--ipadapter-dir", str(tiny_weights["ipadapter"]),
        "--data", "synthetic:n_train=40,n_test=4,image_size=32,surface_size=16", "--subject", "1",
        "--out", str(tmp_path), "--alphas", "100,1000", "--no-evaluate"])
    assert result.exit_code == 0, result.output
    run = Run.open(tmp_path / "ridge-subj01-ipadapter")
    assert run.predictions().shape == (4,) + TOKEN_SHAPE
    assert run.reconstructions() is None and "brainrecon reconstruct" in result.output
    assert run.info["params"]["target_options"] == {"ipadapter_dir": str(tiny_weights["ipadapter"])}
    wrong = CliRunner().invoke(app, ["fit", "--decoder", "ridge", "--ipadapter-dir", "x"])
    assert wrong.exit_code == 1 and "--ipadapter-dir is for --target ipadapter" in wrong.output
