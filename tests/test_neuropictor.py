"""NeuroPictor decoder: tiny configurations, CPU, offline.

The frozen Stable Diffusion parts are tiny random models written to ``tmp_path`` in the
diffusers layout of ``stabilityai/stable-diffusion-2-1-base`` and loaded through the same
code path as the real weights; the conformance tests use ``base_model="tiny"``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from brainrecon.data.synthetic import make_synthetic
from brainrecon.decoders import load_decoder
from brainrecon.decoders.neuropictor import NeuroPictorDecoder, component_parameter_counts, describe_text
from brainrecon.decoders.neuropictor import model, sample
from brainrecon.decoders.neuropictor import train as train_module
from brainrecon.decoders.neuropictor.weights import (
    StateDictMismatchError,
    read_safetensors,
    save_safetensors_atomic,
)
from brainrecon.errors import BrainreconError, DataError, NotFittedError, WeightsNotFoundError
from conformance import DecoderConformance

TINY_SIZES = dict(
    surface_size=16, patch_size=4, encoder_dim=32, encoder_depth=2, encoder_heads=4,
    bottleneck_dim=16, decoder_dim=16, decoder_depth=1, decoder_heads=2, semantic_hidden=8,
    image_size=32,
)
TINY = dict(TINY_SIZES, batch_size=2, num_inference_steps=2, progress=False, device="cpu",
            gradient_checkpointing=False)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data():
    return make_synthetic(seed=0, subjects=(1, 2), n_train=8, n_test=4, image_size=32, surface_size=16)


def make(sd_dir, **kw) -> NeuroPictorDecoder:
    return NeuroPictorDecoder(**{**TINY, "base_model": sd_dir, **kw})


def _state(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _perturb_zero_convs(net, seed=0):
    """Give the zero-initialised layers random values (as after training)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layers = [net.feature_transform.zero_conv, net.semantic.aux_zero, net.controlnet.controlnet_mid_block,
                  *net.controlnet.controlnet_down_blocks]
        for layer in layers:
            for p in layer.parameters():
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


# ---------------------------------------------------------------------------- sizes
def test_component_parameter_counts_match_the_official_architecture():
    counts = component_parameter_counts()
    assert counts == {
        "fmri_encoder": 302_575_616,
        "semantic": 2_207_074,
        "feature_transform": 4_803_332,
        "controlnet": 363_141_760,
        "unet": 865_910_724,
    }
    text = describe_text()
    assert "2,207,074" in text and "865,910,724" in text


def test_full_size_shapes_on_the_meta_device():
    # The official shapes (spec §1, §4.2): 257 x 1024 tokens, 320 x 64 x 64 control features,
    # 12 down residuals + 1 mid residual, without allocating memory.
    from diffusers import UNet2DConditionModel

    from brainrecon.decoders.neuropictor import control

    sizes = model.Sizes()
    with torch.device("meta"):
        unet = UNet2DConditionModel(**model.sd21_base_unet_config())
        transform = sizes.feature_transform(320, 64)
        net = model.NeuroPictorNet(sizes.encoder(), sizes.semantic(77, 1024),
                                   control.build_controlnet(unet, transform, copy_weights=False)).to("meta")
        surfaces, z, t = torch.randn(2, 256, 256), torch.randn(2, 4, 64, 64), torch.tensor([1, 500])
        tokens = net.fmri_encoder(surfaces)
        down, mid, context, main = net(surfaces, z, t, use_aux=True)
        eps = unet(z, t, encoder_hidden_states=context, down_block_additional_residuals=down,
                   mid_block_additional_residual=mid).sample
    assert tokens.shape == (2, 257, 1024) and transform(tokens).shape == (2, 320, 64, 64)
    assert context.shape == main.shape == (2, 77, 1024)
    assert [tuple(d.shape[1:]) for d in down] == [
        (320, 64, 64)] * 3 + [(320, 32, 32), (640, 32, 32), (640, 32, 32), (640, 16, 16),
                              (1280, 16, 16), (1280, 16, 16), (1280, 8, 8), (1280, 8, 8), (1280, 8, 8)]
    assert mid.shape == (2, 1280, 8, 8) and eps.shape == (2, 4, 64, 64)


def test_tiny_counts_follow_the_formulas():
    # Hand-derived from the layer shapes (spec §3, §4.1) for T tokens, D width, h hidden, L x E context.
    T, D, h, L, E, C, s = 17, 32, 8, 77, 32, 8, 16
    sizes = model.Sizes(**{k: v for k, v in TINY_SIZES.items() if k != "image_size"})
    branch = (T * h + h) + (h * L + L) + (D * E + E) + 2 * E
    assert sum(p.numel() for p in sizes.semantic(L, E).parameters()) == 2 * branch + L * L * 3 + L
    ft = (T * 2 * T + 2 * T) + (2 * T * C + C) + (D * s * s + s * s) + (C * C * 3 + C)
    assert sum(p.numel() for p in sizes.feature_transform(C, s).parameters()) == ft


# ---------------------------------------------------------------------------- stages end to end
def test_every_stage_trains_saves_and_loads(sd_dir, data, tmp_path):
    enc = make(sd_dir, stage="encoder", steps=2).fit(data.train)
    assert len(enc.losses_) == 2 and not enc.reconstructs_images
    with pytest.raises(BrainreconError, match="stage 'encoder'"):
        enc.predict(data.test)
    enc.save(tmp_path / "enc")
    enc_loaded = load_decoder(tmp_path / "enc")
    for k, v in enc.net_.state_dict().items():
        torch.testing.assert_close(enc_loaded.net_.state_dict()[k], v, rtol=0, atol=0)

    pre = make(sd_dir, stage="pretrain", steps=2, init_from=str(tmp_path / "enc")).fit(data.train)
    assert pre.subjects_ == [1, 2] and not pre.aux_active_
    # The auxiliary branch is bypassed and outside the optimiser: its zero conv is still exactly zero.
    assert torch.count_nonzero(pre.net_.semantic.aux_zero.weight) == 0
    # Frozen modules: no gradients, unchanged.
    unet = pre._base().unet
    assert all(not p.requires_grad and p.grad is None for p in unet.parameters())
    fresh_unet = model.load_base_components(sd_dir).unet
    for (k, v), (_, w) in zip(unet.state_dict().items(), fresh_unet.state_dict().items()):
        assert torch.equal(v, w), k
    pre.save(tmp_path / "pre")

    fin = make(sd_dir, stage="finetune", subjects=[1], steps=2, init_from=str(tmp_path / "pre")).fit(data.train)
    assert fin.aux_active_ and fin.subjects_ == [1]
    assert torch.count_nonzero(fin.net_.semantic.aux_zero.weight) > 0
    fin.save(tmp_path / "fin")

    cfg = make(sd_dir, stage="cfg", subjects=[1], steps=2, init_from=str(tmp_path / "fin")).fit(data.train)
    assert cfg.aux_active_ and cfg.lineage_ == ["encoder", "pretrain", "finetune", "cfg"]
    pred = cfg.predict(data.test)
    assert set(pred) == {1}
    assert pred[1].shape == (4, 32, 32, 3) and pred[1].dtype == np.uint8
    cfg.save(tmp_path / "cfg")
    loaded = load_decoder(tmp_path / "cfg")
    assert loaded.lineage_ == cfg.lineage_ and loaded.aux_active_
    np.testing.assert_array_equal(loaded.predict(data.test)[1], pred[1])
    assert (tmp_path / "cfg" / "controlnet" / "config.json").is_file()
    assert (tmp_path / "cfg" / "feature_transform.safetensors").is_file()
    controlnet_keys = read_safetensors(tmp_path / "cfg" / "controlnet" / "diffusion_pytorch_model.safetensors", "x")
    assert not any(k.startswith("controlnet_cond_embedding.") for k in controlnet_keys)


def test_device_defaults_to_auto_and_a_saved_null_device_loads_as_before(sd_dir, data, tmp_path, monkeypatch):
    """Before, device defaulted to None (meaning "auto"); a decoder saved so loads and predicts alike."""
    import json

    from brainrecon.devices import resolve_device

    assert NeuroPictorDecoder().device == "auto"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # "auto" is the CPU it was fitted on
    fitted = make(sd_dir, stage="pretrain", subjects=[1], steps=1).fit(data.train)
    fitted.save(tmp_path / "d")
    config_path = tmp_path / "d" / "brainrecon.json"
    config = json.loads(config_path.read_text())
    config["params"]["device"] = None
    config_path.write_text(json.dumps(config))
    old = load_decoder(tmp_path / "d")
    assert old.device is None and old._device() == resolve_device("auto") == torch.device("cpu")
    np.testing.assert_array_equal(old.predict(data.test)[1], fitted.predict(data.test)[1])


def test_cfg_stage_needs_a_trained_model(sd_dir, data):
    with pytest.raises(BrainreconError, match="init_from"):
        make(sd_dir, stage="cfg", steps=1).fit(data.train)


def test_invalid_parameters_are_named(sd_dir, data):
    with pytest.raises(BrainreconError, match=r"Unknown stage 'pre'.*'pretrain'"):
        make(sd_dir, stage="pre", steps=1).fit(data.train)
    with pytest.raises(BrainreconError, match="patch_size 5"):
        make(sd_dir, patch_size=5, steps=1).fit(data.train)
    with pytest.raises(DataError, match=r"\(16, 16\).*expects \(32, 32\).*surface_size=16"):
        make(sd_dir, surface_size=32, steps=1).fit(data.train)
    with pytest.raises(NotFittedError, match="not fitted"):
        make(sd_dir).predict(data.test)


# ---------------------------------------------------------------------------- learning
def _fixed_loss(decoder, net, split, seeds=(0, 1, 2, 3)) -> float:
    """Diffusion loss of the first four samples with fixed noise and timesteps."""
    base = decoder._base()
    data = train_module.TrainingData(split, [1], 16, 32, captions=False)
    batch = data.batch(np.arange(4), np.random.default_rng(0))
    cfg = train_module.TrainConfig(stage="finetune", lr=0, weight_decay=0, batch_size=4, total_steps=1,
                                   use_aux=True)
    empty = train_module.encode_text(base.tokenizer, base.text_encoder, [""], "cpu")[0]
    losses = []
    with torch.no_grad():
        for s in seeds:
            gen = torch.Generator().manual_seed(s)
            losses.append(float(train_module.diffusion_loss(
                net, base, batch, batch["surfaces"], gen, cfg, sample.training_scheduler(), empty,
                base.text_encoder, torch.float32, torch.device("cpu"))))
    return float(np.mean(losses))


def test_loss_decreases_when_overfitting_four_samples(sd_dir):
    four = make_synthetic(seed=1, subjects=(1,), n_train=4, n_test=2, image_size=32, surface_size=16)
    decoder = make(sd_dir, stage="finetune", steps=40, batch_size=4, lr=2e-3)
    initial, _ = decoder._build_trainable("finetune", None, decoder._base())
    before = _fixed_loss(decoder, initial, four.train)
    decoder.fit(four.train)
    after = _fixed_loss(decoder, decoder.net_, four.train)
    assert after < 0.8 * before, (before, after)

    enc = make(sd_dir, stage="encoder", steps=30, batch_size=4, lr=2e-3).fit(four.train)
    assert np.mean(enc.losses_[-5:]) < 0.5 * np.mean(enc.losses_[:2])


# ---------------------------------------------------------------------------- exactness at init
def test_zero_initialised_parts_make_control_and_aux_exactly_zero(sd_dir, data):
    decoder = make(sd_dir, stage="finetune")
    base = decoder._base()
    net, _ = decoder._build_trainable("finetune", None, base)
    surfaces = torch.from_numpy(data.train.surfaces(1)[:2])
    z = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([10, 500])
    with torch.no_grad():
        tokens = net.fmri_encoder(surfaces)
        context, main = net.semantic(tokens, use_aux=True)
        assert torch.equal(context, main)  # aux branch exactly zero
        down, mid, ctx, _ = net(surfaces, z, t, use_aux=True)
        assert len(down) == len(net.controlnet.controlnet_down_blocks)
        assert all(torch.count_nonzero(d) == 0 for d in down) and torch.count_nonzero(mid) == 0
        with_control = base.unet(z, t, encoder_hidden_states=ctx, down_block_additional_residuals=down,
                                 mid_block_additional_residual=mid).sample
        semantics_only = base.unet(z, t, encoder_hidden_states=main).sample
    assert torch.equal(with_control, semantics_only)


def test_controlnet_is_a_copy_of_the_unet_encoder(sd_dir):
    decoder = make(sd_dir, stage="pretrain")
    base = decoder._base()
    net, _ = decoder._build_trainable("pretrain", None, base)
    unet_state = base.unet.state_dict()
    for key, value in net.controlnet.state_dict().items():
        if key.startswith(("down_blocks.", "mid_block.", "conv_in.", "time_embedding.")):
            assert torch.equal(value, unet_state[key]), key


def test_gradient_checkpointing_gives_the_same_training(sd_dir, data):
    plain = make(sd_dir, stage="finetune", subjects=[1], steps=2, lr=1e-3).fit(data.train)
    ckpt = make(sd_dir, stage="finetune", subjects=[1], steps=2, lr=1e-3,
                gradient_checkpointing=True).fit(data.train)
    np.testing.assert_allclose(ckpt.losses_, plain.losses_, rtol=1e-5)
    for k, v in plain.net_.state_dict().items():
        torch.testing.assert_close(ckpt.net_.state_dict()[k], v, rtol=1e-4, atol=1e-6)
    assert not ckpt._base().unet.is_gradient_checkpointing  # switched off again after training


def test_detached_unet_encoder_context_only_changes_gradients(sd_dir):
    base = model.load_base_components(sd_dir)
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    context = torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(1), requires_grad=True)

    def run():
        out = base.unet(z, 10, encoder_hidden_states=context).sample
        (grad,) = torch.autograd.grad(out.square().sum(), context)
        return out.detach(), grad

    out, grad = run()
    old = train_module.detach_encoder_context(base.unet)
    out_detached, grad_detached = run()
    # Only the decoder (up blocks) now passes gradient into the context.
    for name, proc in base.unet.attn_processors.items():
        assert isinstance(proc, train_module._DetachContext) == name.startswith(("down_blocks", "mid_block"))
    base.unet.set_attn_processor(old)
    assert torch.equal(out, out_detached)
    assert not torch.allclose(grad, grad_detached)
    torch.testing.assert_close(run()[1], grad)


# ---------------------------------------------------------------------------- sampling
def _trained_like_net(sd_dir, data):
    decoder = make(sd_dir, stage="finetune")
    base = decoder._base()
    net, geometry = decoder._build_trainable("finetune", None, base)
    _perturb_zero_convs(net)
    surfaces = torch.from_numpy(data.test.surfaces(1)[:2])
    with torch.no_grad():
        tokens = net.fmri_encoder(surfaces)
        context, _ = net.semantic(tokens)
    empty = train_module.encode_text(base.tokenizer, base.text_encoder, [""], "cpu")[0]
    latents = sample.initial_latents([1, 2], (4, 16, 16))
    return base, net, tokens, context, empty, latents


def test_control_scale_zero_equals_no_control(sd_dir, data):
    base, net, tokens, context, empty, latents = _trained_like_net(sd_dir, data)
    common = dict(unet=base.unet, controlnet=net.controlnet, tokens=tokens, context=context,
                  empty_context=empty, latents=latents, guidance_scale=5.0, num_inference_steps=3)
    zero = sample.denoise(control_scale=0.0, **common)
    none = sample.denoise(use_control=False, **common)
    full = sample.denoise(control_scale=1.0, **common)
    assert torch.equal(zero, none)
    assert not torch.allclose(full, none)


def test_guidance_keeps_the_fmri_control_in_both_branches(sd_dir, data):
    base, net, tokens, context, empty, latents = _trained_like_net(sd_dir, data)
    scale, alpha, steps = 5.0, 0.7, 3
    got = sample.denoise(unet=base.unet, controlnet=net.controlnet, tokens=tokens, context=context,
                         empty_context=empty, latents=latents, control_scale=alpha,
                         guidance_scale=scale, num_inference_steps=steps)

    def eps(z, t, ctx, control: bool):
        kwargs = {}
        if control:
            down, mid = net.controlnet(z, t, encoder_hidden_states=ctx, controlnet_cond=tokens,
                                       conditioning_scale=alpha, return_dict=False)
            kwargs = dict(down_block_additional_residuals=down, mid_block_additional_residual=mid)
        return base.unet(z, t, encoder_hidden_states=ctx, **kwargs).sample

    def reference(uncond_control: bool):
        sched = sample.ddim_scheduler()
        sched.set_timesteps(steps)
        z = latents.clone()
        uncond = empty.unsqueeze(0).expand_as(context)
        with torch.no_grad():
            for t in sched.timesteps:
                e_u = eps(z, t, uncond, uncond_control)
                e_c = eps(z, t, context, True)
                z = sched.step(e_u + scale * (e_c - e_u), t, z, eta=0.0).prev_sample
        return z

    torch.testing.assert_close(got, reference(True), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(got, reference(False), rtol=1e-4, atol=1e-5)


def test_ddim_timesteps_match_the_original_discretisation():
    sched = sample.ddim_scheduler()
    sched.set_timesteps(50)
    assert sched.timesteps.tolist() == list(range(981, 0, -20))


def test_swap_and_sweep(sd_dir, data):
    decoder = make(sd_dir, stage="pretrain", subjects=[1], steps=1, predict_batch_size=2).fit(data.train)
    _perturb_zero_convs(decoder.net_)
    swapped = decoder.swap_semantics(data.test, 1, [(0, 1), (1, 1)])
    assert swapped.shape == (2, 32, 32, 3) and swapped.dtype == np.uint8
    surfaces = data.test.surfaces(1)
    same = decoder.reconstruct(surfaces[[1, 1]], image_ids=data.test.ids(1)[[1, 1]])
    np.testing.assert_array_equal(swapped[1], same[1])  # (b, b) is the ordinary reconstruction
    expected = decoder.reconstruct(surfaces[[1, 1]], semantic_surfaces=surfaces[[0, 1]],
                                   image_ids=data.test.ids(1)[[1, 1]])
    np.testing.assert_array_equal(swapped, expected)

    sweep = decoder.control_sweep(data.test, 1, [0, 2], [0.0, 0.5, 1.0])
    assert sweep.shape == (2, 3, 32, 32, 3) and sweep.dtype == np.uint8
    full = decoder.reconstruct(surfaces[[0, 2]], image_ids=data.test.ids(1)[[0, 2]], control_scale=1.0)
    np.testing.assert_array_equal(sweep[:, 2], full)
    with pytest.raises(DataError, match="out of range"):
        decoder.swap_semantics(data.test, 1, [(0, 9)])


# ---------------------------------------------------------------------------- checkpoints
def test_resume_equals_uninterrupted(sd_dir, data, tmp_path):
    common = dict(stage="pretrain", checkpoint_every=2, seed=3, lr=1e-3)
    full = make(sd_dir, steps=4, checkpoint_dir=str(tmp_path / "a"), validate_every=2, **common).fit(data.train)
    assert (tmp_path / "a" / "validation" / "step_00000004.png").is_file()
    make(sd_dir, steps=2, checkpoint_dir=str(tmp_path / "b"), **common).fit(data.train)
    assert [p.name for p in train_module.list_checkpoints(tmp_path / "b")] == ["step_00000002"]
    resumed = make(sd_dir, steps=4, checkpoint_dir=str(tmp_path / "b"), resume=True, **common).fit(data.train)
    assert resumed.losses_ == full.losses_
    a, b = full.net_.state_dict(), resumed.net_.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    with pytest.raises(BrainreconError, match="different settings.*seed"):
        make(sd_dir, steps=6, checkpoint_dir=str(tmp_path / "b"), resume=True,
             **{**common, "seed": 4}).fit(data.train)


def test_strict_loading_names_missing_and_unexpected_keys(sd_dir, data, tmp_path):
    decoder = make(sd_dir, stage="pretrain", steps=1).fit(data.train)
    decoder.save(tmp_path / "d")
    path = tmp_path / "d" / "semantic.safetensors"
    state = read_safetensors(path, "semantic")
    state.pop("main.norm.weight")
    state["extra.weight"] = torch.zeros(1)
    save_safetensors_atomic(state, path)
    with pytest.raises(StateDictMismatchError,
                       match=r"missing keys: main\.norm\.weight; unexpected keys: extra\.weight"):
        load_decoder(tmp_path / "d")
    decoder.save(tmp_path / "d2")
    (tmp_path / "d2" / "feature_transform.safetensors").unlink()
    with pytest.raises(WeightsNotFoundError, match="feature transformation weights file"):
        make(sd_dir, stage="finetune", steps=1, init_from=str(tmp_path / "d2")).fit(data.train)


# ---------------------------------------------------------------------------- weights
def test_missing_base_model_is_a_clear_error(tmp_path, sd_dir, monkeypatch):
    with pytest.raises(WeightsNotFoundError, match="does not exist"):
        model.load_base_components(str(tmp_path / "nowhere"))
    import shutil

    partial = tmp_path / "partial"
    shutil.copytree(sd_dir, partial)
    shutil.rmtree(partial / "vae")
    with pytest.raises(WeightsNotFoundError, match=r"vae/ is missing"):
        model.load_base_components(str(partial))
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(WeightsNotFoundError, match=r"stabilityai/stable-diffusion-2-1-base.*huggingface-cli download"):
        model.load_base_components(model.SD21_BASE)


def test_semantic_target_from_a_separate_last_layer_model(sd_dir, data, tmp_path):
    from transformers import CLIPTextConfig, CLIPTextModel

    tok = model.tiny_tokenizer()
    torch.manual_seed(0)
    CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=77,
                                 eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
                                 pad_token_id=tok.pad_token_id)).save_pretrained(tmp_path / "last")
    decoder = make(sd_dir, stage="finetune", subjects=[1], steps=2, sem_target="last",
                   sem_text_model=str(tmp_path / "last")).fit(data.train)
    assert decoder._sem_model_cache.config.num_hidden_layers == 3
    with pytest.raises(WeightsNotFoundError, match="sem_text_model"):
        make(sd_dir, stage="finetune", steps=1, sem_target="last",
             sem_text_model=str(tmp_path / "none")).fit(data.train)


# ---------------------------------------------------------------------------- conformance
class TestNeuroPictorConformance(DecoderConformance):
    def make_decoder(self, **overrides):
        return NeuroPictorDecoder(**{**TINY, "base_model": "tiny", "stage": "pretrain", "steps": 2,
                                     **overrides})

    def make_data(self):
        return make_synthetic(seed=0, subjects=(1, 2), n_train=4, n_test=2, image_size=32, surface_size=16)


def test_tiny_pixel_autoencoder_is_exact():
    base = model.load_base_components(model.TINY_PIXEL)
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    latents = base.vae.encode(images).latent_dist.sample()
    assert latents.shape == (2, 12, 16, 16) == (2, base.unet.config.in_channels, 16, 16)
    assert torch.equal(base.vae.decode(latents).sample, images)
    assert base.vae_scale_factor == 2 and all(not p.requires_grad for p in base.vae.parameters())


# ---------------------------------------------------------------------------- CLI
def test_cli_describe_and_manipulation_figures(tmp_path):
    from typer.testing import CliRunner

    from brainrecon.cli import app
    from brainrecon.workflows import fit

    runner = CliRunner()
    result = runner.invoke(app, ["decoders", "describe", "neuropictor"])
    assert result.exit_code == 0, result.output
    assert "302,575,616" in result.output and "363,141,760" in result.output

    ds = make_synthetic(seed=0, subjects=(1,), n_train=4, n_test=3, image_size=32, surface_size=16)
    params = {**TINY, "base_model": "tiny", "stage": "pretrain", "steps": 1}
    (run,) = fit("neuropictor", dataset=ds, out=tmp_path / "runs", params=params, evaluate=False)
    assert run.reconstructions().shape == (3, 32, 32, 3)
    result = runner.invoke(app, ["neuropictor-sample", str(run.path), "--swap-semantics", "0:1",
                                 "--swap-semantics", "2:0", "--control-sweep", "0,0.5,1", "--indices", "0,2"])
    assert result.exit_code == 0, result.output
    assert (run.path / "swap_semantics.png").is_file() and (run.path / "control_sweep.png").is_file()
    result = runner.invoke(app, ["neuropictor-sample", str(run.path), "--swap-semantics", "0-1"])
    assert result.exit_code == 1 and "A:B" in result.output
