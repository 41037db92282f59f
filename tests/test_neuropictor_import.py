"""Importing NeuroPictor's released files: tiny official-layout files built here, offline.

The released UK-Biobank fMRI encoder is timm's ``VisionTransformer`` computation under the
official key names (``[module.]transformer.*`` inside ``{'model': ...}``), so the reference
here is a tiny timm ViT saved in that layout.
"""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch

from brainrecon.data.synthetic import make_synthetic
from brainrecon.decoders import load_decoder
from brainrecon.decoders.neuropictor import NeuroPictorDecoder, load_official_encoder
from brainrecon.decoders.neuropictor.official import OfficialFileError
from brainrecon.errors import BrainreconError

from test_neuropictor import TINY_SIZES

timm = pytest.importorskip("timm")

TINY = {**TINY_SIZES, "batch_size": 2, "num_inference_steps": 2, "progress": False, "device": "cpu",
        "gradient_checkpointing": False, "base_model": "tiny"}


pytestmark = pytest.mark.usefixtures("one_thread")


def reference_vit(seed: int = 0):
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(seed)
    return VisionTransformer(img_size=16, patch_size=4, in_chans=1, embed_dim=32, depth=2, num_heads=4,
                             class_token=True, global_pool="", num_classes=0,
                             norm_layer=torch.nn.LayerNorm).eval()


def official_encoder_file(path, vit, *, ddp: bool = True, extra: dict | None = None):
    """Save ``vit`` as the released ``checkpoint_120000.pth`` is laid out (with autoencoder parts)."""
    g = torch.Generator().manual_seed(1)
    dim = vit.embed_dim
    state = {f"transformer.{k}": v.clone() for k, v in vit.state_dict().items()}
    state.update({
        "transformer.pred.weight": torch.randn(2048, dim, generator=g),
        "transformer.pred.bias": torch.zeros(2048),
        "transformer.mask_token": torch.zeros(1, 1, 16),
        "transformer.decoder_embed.weight": torch.randn(16, 2048, generator=g),
        "transformer.decoder_pos_embed": torch.zeros(1, 17, 16),
        "transformer.decoder_blocks.0.norm1.weight": torch.ones(16),
        "transformer.decoder_norm.weight": torch.ones(16),
        "transformer.decoder_pred.weight": torch.randn(16, 16, generator=g),
    })
    state.update(extra or {})
    if ddp:
        state = {f"module.{k}": v for k, v in state.items()}
    torch.save({"model": state, "epoch": 120000}, path)
    return path


def write_yaml(path, **model):
    import yaml

    config = {"Data": {"patch_size": 4, "image_size": [16, 16]},
              "Model": {"embed_dim": 32, "decoder_embed_dim": 16, "num_heads": 4, "drop_rate": 0.0,
                        "in_chans": 1, "encoder_depth": 2, "decoder_depth": 1, **model}}
    path.write_text(yaml.safe_dump(config))
    return path


# ---------------------------------------------------------------------------- the encoder file
@pytest.mark.parametrize("ddp", [True, False])
def test_official_encoder_equals_the_reference_vit(tmp_path, ddp):
    vit = reference_vit()
    path = official_encoder_file(tmp_path / "checkpoint_120000.pth", vit, ddp=ddp)
    encoder = load_official_encoder(path, write_yaml(tmp_path / "fMRI_AutoEncoder.yaml"))
    x = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got, want = encoder(x), vit.forward_features(x)
    assert got.shape == (3, 17, 32)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    spec = encoder.official_spec
    assert (spec.surface_size, spec.patch_size, spec.dim, spec.depth, spec.heads, spec.eps) == (16, 4, 32, 2, 4, 1e-5)
    assert "pred.weight" in spec.ignored and "decoder_embed.weight" in spec.ignored
    assert all(m.eps == 1e-5 for m in encoder.modules() if isinstance(m, torch.nn.LayerNorm))


def test_heads_default_to_the_official_sixteen_without_a_yaml(tmp_path):
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    vit = VisionTransformer(img_size=16, patch_size=4, in_chans=1, embed_dim=32, depth=1, num_heads=16,
                            class_token=True, global_pool="", num_classes=0,
                            norm_layer=torch.nn.LayerNorm).eval()
    encoder = load_official_encoder(official_encoder_file(tmp_path / "e.pth", vit))
    assert encoder.official_spec.heads == 16
    x = torch.randn(2, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(encoder(x), vit.forward_features(x[:, None]), rtol=0, atol=1e-5)


def test_yaml_dropout_reaches_every_block(tmp_path):
    path = official_encoder_file(tmp_path / "e.pth", reference_vit())
    encoder = load_official_encoder(path, write_yaml(tmp_path / "c.yaml", drop_rate=0.1))
    block = encoder.blocks[0]
    assert (block.attn.attn_drop, block.attn.proj_drop.p, block.mlp.drop1.p, block.drop_path1.p) == (0.1,) * 4
    x = torch.randn(2, 16, 16)
    with torch.no_grad():
        assert torch.equal(encoder.eval()(x), encoder(x))  # eval: deterministic
        assert not torch.equal(encoder.train()(x), encoder.eval()(x))


def test_unknown_keys_are_listed(tmp_path):
    path = official_encoder_file(tmp_path / "e.pth", reference_vit(),
                                 extra={"transformer.extra_head.weight": torch.zeros(2),
                                        "transformer.blocks.0.ls1.gamma": torch.zeros(32)})
    with pytest.raises(OfficialFileError, match=r"2 key\(s\).*blocks\.0\.ls1\.gamma, extra_head\.weight"):
        load_official_encoder(path)
    other = tmp_path / "other.pth"
    torch.save({"model": {"encoder.cls_token": torch.zeros(1, 1, 32)}}, other)
    with pytest.raises(OfficialFileError, match=r"not under 'transformer\.'"):
        load_official_encoder(other)


def test_a_yaml_contradicting_the_tensors_names_both_values(tmp_path):
    path = official_encoder_file(tmp_path / "e.pth", reference_vit())
    with pytest.raises(OfficialFileError,
                       match=r"Model\.embed_dim=64 in .*c\.yaml but the tensors give 32; "
                             r"Model\.encoder_depth=3 .* give 2"):
        load_official_encoder(path, write_yaml(tmp_path / "c.yaml", embed_dim=64, encoder_depth=3))
    with pytest.raises(OfficialFileError, match=r"Data\.image_size=\[32, 32\].*16x16"):
        load_official_encoder(path, {"Data": {"image_size": [32, 32]}, "Model": {"num_heads": 4}})
    with pytest.raises(OfficialFileError, match="not divisible by 5 heads"):
        load_official_encoder(path, {"Model": {"num_heads": 5}})


class _NotWeights:
    pass


def test_files_that_need_more_than_weights_are_refused(tmp_path):
    path = tmp_path / "pickle.pth"
    torch.save({"model": {"transformer.cls_token": torch.zeros(1)}, "obj": _NotWeights()}, path)
    with pytest.raises(OfficialFileError, match=r"Refusing to read .*weights_only=True"):
        load_official_encoder(path)


# ---------------------------------------------------------------------------- fit from it
def test_pretraining_starts_from_the_official_encoder(tmp_path):
    from brainrecon.workflows import fit

    vit = reference_vit()
    path = official_encoder_file(tmp_path / "checkpoint_120000.pth", vit)
    ds = make_synthetic(seed=0, subjects=(1,), n_train=4, n_test=2, image_size=32, surface_size=16)
    params = {**TINY, "stage": "pretrain", "steps": 1, "lr": 0.0, "encoder_init": str(path),
              "encoder_config": str(write_yaml(tmp_path / "fMRI_AutoEncoder.yaml"))}
    (run,) = fit("neuropictor", dataset=ds, out=tmp_path / "runs", params=params, evaluate=False)
    decoder = load_decoder(run.path / "decoder")
    assert decoder.encoder_init == str(path)
    x = torch.from_numpy(ds.test.surfaces(1))
    with torch.no_grad():  # lr 0: the encoder is still the file's
        torch.testing.assert_close(decoder.net_.fmri_encoder(x), vit.forward_features(x[:, None]),
                                   rtol=0, atol=1e-5)

    with pytest.raises(BrainreconError, match=r"encoder_dim=32.*this decoder has .*encoder_dim=64"):
        NeuroPictorDecoder(**{**TINY, "encoder_dim": 64, "encoder_heads": 4, "stage": "pretrain",
                              "steps": 1, "encoder_init": str(path)}).fit(ds.train)
    with pytest.raises(BrainreconError, match="encoder_heads=16.*encoder_heads=4"):
        NeuroPictorDecoder(**{**TINY, "stage": "pretrain", "steps": 1, "encoder_init": str(path),
                              "encoder_heads": 4}).fit(ds.train)  # no yaml: 16 heads assumed
    with pytest.raises(BrainreconError, match="either init_from .* or encoder_init"):
        NeuroPictorDecoder(**{**params, "init_from": str(run.path / "decoder")}).fit(ds.train)


# ---------------------------------------------------------------------------- old saves
def test_decoders_saved_before_the_eps_fix_keep_their_eps(tmp_path):
    ds = make_synthetic(seed=0, subjects=(1,), n_train=4, n_test=2, image_size=32, surface_size=16)
    decoder = NeuroPictorDecoder(**{**TINY, "stage": "pretrain", "steps": 1}).fit(ds.train)
    decoder.save(tmp_path / "new")
    loaded = load_decoder(tmp_path / "new")
    assert loaded.encoder_eps == 1e-5
    assert all(m.eps == 1e-5 for m in loaded.net_.fmri_encoder.modules() if isinstance(m, torch.nn.LayerNorm))
    np.testing.assert_array_equal(loaded.predict(ds.test)[1], decoder.predict(ds.test)[1])

    # What an earlier brainrecon wrote: no layout field, no encoder parameters.
    decoder.save(tmp_path / "old")
    config_path = tmp_path / "old" / "brainrecon.json"
    config = json.loads(config_path.read_text())
    del config["state"]["layout"]
    for key in [k for k in config["params"] if k.startswith("encoder_") and k not in (
            "encoder_dim", "encoder_depth", "encoder_heads")]:
        del config["params"][key]
    config_path.write_text(json.dumps(config))
    old = load_decoder(tmp_path / "old")
    assert old.encoder_eps == 1e-6
    assert all(m.eps == 1e-6 for m in old.net_.fmri_encoder.modules() if isinstance(m, torch.nn.LayerNorm))
    with pytest.raises(BrainreconError, match=r"eps 1e-06.*Pass encoder_eps=1e-06"):
        NeuroPictorDecoder(**{**TINY, "stage": "finetune", "steps": 1,
                              "init_from": str(tmp_path / "old")}).fit(ds.train)
    NeuroPictorDecoder(**{**TINY, "stage": "finetune", "steps": 1, "encoder_eps": 1e-6,
                          "init_from": str(tmp_path / "old")}).fit(ds.train)


# ============================================================================ official epoch files
# The reverse of diffusers' ldm -> diffusers key mapping, enough for the tiny SD-like modules:
# it writes brainrecon's tiny modules in the layout of the released epoch files.
_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
           "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def _resnet(rest: str) -> str:
    head, _, leaf = rest.partition(".")
    return f"{_RESNET[head]}.{leaf}"


def _unet_key(key: str, per_level: int, up_attention: set[int]) -> str | None:
    import re

    fixed = {"time_embedding.linear_1.": "time_embed.0.", "time_embedding.linear_2.": "time_embed.2.",
             "conv_in.": "input_blocks.0.0.", "conv_norm_out.": "out.0.", "conv_out.": "out.2.",
             "controlnet_mid_block.": "middle_block_out.0."}
    for old, new in fixed.items():
        if key.startswith(old):
            return new + key[len(old):]
    if m := re.match(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
        i, j, rest = int(m[1]), int(m[2]), m[3]
        return f"input_blocks.{per_level * i + j + 1}.0.{_resnet(rest)}"
    if m := re.match(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.*)", key):
        return f"input_blocks.{per_level * int(m[1]) + int(m[2]) + 1}.1.{m[3]}"
    if m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
        return f"input_blocks.{per_level * (int(m[1]) + 1)}.0.op.{m[2]}"
    if m := re.match(r"mid_block\.resnets\.(\d+)\.(.*)", key):
        return f"middle_block.{2 * int(m[1])}.{_resnet(m[2])}"
    if m := re.match(r"mid_block\.attentions\.0\.(.*)", key):
        return f"middle_block.1.{m[1]}"
    if m := re.match(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
        return f"output_blocks.{per_level * int(m[1]) + int(m[2])}.0.{_resnet(m[3])}"
    if m := re.match(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.*)", key):
        return f"output_blocks.{per_level * int(m[1]) + int(m[2])}.1.{m[3]}"
    if m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", key):
        i = int(m[1])
        return f"output_blocks.{per_level * i + per_level - 1}.{2 if i in up_attention else 1}.conv.{m[2]}"
    if m := re.match(r"controlnet_down_blocks\.(\d+)\.(.*)", key):
        return f"zero_convs.{m[1]}.0.{m[2]}"
    raise KeyError(key)


def unet_to_ldm(state, config, prefix: str) -> dict:
    per_level = config["layers_per_block"] + 1
    up_attention = {int(k.split(".")[1]) for k in state if k.startswith("up_blocks.") and ".attentions." in k}
    return {prefix + _unet_key(k, per_level, up_attention): v.clone() for k, v in state.items()
            if not k.startswith("controlnet_cond_embedding.")}


def vae_to_ldm(state, config) -> dict:
    import re

    n = len(config["block_out_channels"])
    attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    out = {}
    for key, value in state.items():
        new = key.replace("conv_norm_out", "norm_out")
        if m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.*)\.(weight|bias)", new):
            new = f"{m[1]}.mid.attn_1.{attn[m[2]]}.{m[3]}"
            if m[3] == "weight" and value.ndim == 2:
                value = value[:, :, None, None]
        new = re.sub(r"mid_block\.resnets\.(\d+)", lambda g: f"mid.block_{int(g[1]) + 1}", new)
        new = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets", r"encoder.down.\1.block", new)
        new = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0", r"encoder.down.\1.downsample", new)
        new = re.sub(r"decoder\.up_blocks\.(\d+)\.resnets", lambda g: f"decoder.up.{n - 1 - int(g[1])}.block", new)
        new = re.sub(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0",
                     lambda g: f"decoder.up.{n - 1 - int(g[1])}.upsample", new)
        new = new.replace("conv_shortcut", "nin_shortcut")
        out["first_stage_model." + new] = value.clone()
    return out


def official_epoch_state(net, base, *, with_frozen: bool = True) -> dict:
    """An official-layout epoch file's state dict made from brainrecon's tiny modules."""
    from brainrecon.decoders.neuropictor import official

    state = {}
    if with_frozen:
        state.update(unet_to_ldm(base.unet.state_dict(), base.unet.config, "model.diffusion_model."))
        state.update(vae_to_ldm(base.vae.state_dict(), base.vae.config))
    state.update(unet_to_ldm(net.controlnet.state_dict(), base.unet.config, "control_model."))
    mapper = {v: k for k, v in official.MAPPER_KEYS.items()}
    for k, v in net.feature_transform.state_dict().items():
        module, _, leaf = k.rpartition(".")
        state[f"control_model.fmri_mapper.{mapper[module]}.{leaf}"] = v.clone()
    hlgn = {v: k for k, v in official.HLGN_KEYS.items()}
    for k, v in net.semantic.state_dict().items():
        module, _, leaf = k.rpartition(".")
        state[f"cond_stage.{hlgn[module]}.{leaf}"] = v.clone()
    for k, v in net.fmri_encoder.state_dict().items():
        state[f"fmri_encoder.transformer.{k}"] = v.clone()
    dim = net.fmri_encoder.cls_token.shape[-1]
    g = torch.Generator().manual_seed(3)
    state["fmri_encoder.transformer.pred.weight"] = torch.randn(2048, dim, generator=g)
    state["fmri_encoder.transformer.pred.bias"] = torch.zeros(2048)
    state["fmri_encoder.transformer.mask_token"] = torch.zeros(1, 1, 16)
    # Never-used image-hint encoder (16 tensors), text tower and DDPM buffers: on the ignore list.
    channels = [3, 16, 16, 32, 32, 96, 96, 256, int(base.unet.config.block_out_channels[0])]
    for n, (c_in, c_out) in enumerate(itertools.pairwise(channels)):
        state[f"control_model.input_hint_block.{2 * n}.weight"] = torch.randn(c_out, c_in, 3, 3, generator=g)
        state[f"control_model.input_hint_block.{2 * n}.bias"] = torch.zeros(c_out)
    state["cond_stage_model.model.ln_final.weight"] = torch.ones(32)
    state["cond_stage_model.model.positional_embedding"] = torch.zeros(77, 32)
    state["betas"] = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2
    state["alphas_cumprod"] = torch.cumprod(1 - state["betas"], 0)
    return state


@pytest.fixture(scope="module")
def released_like(sd_dir, tmp_path_factory):
    """A tiny fine-tuned decoder and the same model written as an official ``epoch_015.pth``."""
    ds = make_synthetic(seed=0, subjects=(1,), n_train=4, n_test=2, image_size=32, surface_size=16)
    decoder = NeuroPictorDecoder(**{**TINY, "base_model": sd_dir, "stage": "finetune", "steps": 1}).fit(ds.train)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # trained-looking zero-initialised layers (the aux branch becomes active)
        for layer in [decoder.net_.feature_transform.zero_conv, decoder.net_.semantic.aux_zero,
                      decoder.net_.controlnet.controlnet_mid_block, *decoder.net_.controlnet.controlnet_down_blocks]:
            for p in layer.parameters():
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    path = tmp_path_factory.mktemp("official") / "finetune_single_sub" / "sub01" / "epoch_015.pth"
    path.parent.mkdir(parents=True)
    state = official_epoch_state(decoder.net_, decoder._base())
    torch.save(state, path)
    return decoder, path, state, ds


def _import(path, sd_dir, **kw):
    from brainrecon.workflows.importers import import_official_checkpoint

    kw.setdefault("encoder_config", {"Model": {"num_heads": 4}})
    return import_official_checkpoint(path, base_model=sd_dir,
                                      params={"device": "cpu", "num_inference_steps": 2, "progress": False}, **kw)


def test_imported_modules_equal_the_modules_the_file_was_built_from(released_like, sd_dir):
    original, path, _, ds = released_like
    imported, report = _import(path, sd_dir, check=True)
    assert imported.subjects_ == [1] and imported.stage_ == "finetune" and imported.aux_active_
    assert report.counts == {"fmri_encoder": 33, "unet": 208, "vae": 124, "feature_transform": 8,
                             "semantic": 18, "controlnet": 112}
    assert report.ignored == {"control_model.input_hint_block": 16, "cond_stage_model": 2, "ddpm buffers": 2}
    assert report.frozen_max_diff == {"unet": 0.0, "vae": 0.0}
    assert all(v < 1e-5 for k, v in report.checks.items() if "largest" not in k), report.checks
    surfaces = torch.from_numpy(ds.test.surfaces(1))
    z = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([10, 700])
    with torch.no_grad():
        outs = [net(surfaces, z, t, use_aux=True) for net in (original.net_, imported.net_)]
    for a, b in zip(outs[0][0] + [outs[0][1], outs[0][2]], outs[1][0] + [outs[1][1], outs[1][2]]):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-5)
    images = imported.predict(ds.test)[1]
    assert np.abs(images.astype(int) - original.predict(ds.test)[1]).max() <= 1


def test_saved_import_loads_identically_and_fine_tunes(released_like, sd_dir, tmp_path):
    from brainrecon.workflows.importers import import_neuropictor

    _, path, _, ds = released_like
    out, _ = import_neuropictor(path, tmp_path / "sub01", base_model=sd_dir,
                                encoder_config={"Model": {"num_heads": 4}},
                                params={"device": "cpu", "num_inference_steps": 2, "progress": False})
    imported, _ = _import(path, sd_dir)
    loaded = load_decoder(out)
    for key, value in imported.net_.state_dict().items():
        assert torch.equal(loaded.net_.state_dict()[key], value), key
    np.testing.assert_array_equal(loaded.predict(ds.test)[1], imported.predict(ds.test)[1])
    assert json.loads((out / "brainrecon.json").read_text())["state"]["imported"]["file"] == "epoch_015.pth"
    tuned = NeuroPictorDecoder(**{**TINY, "base_model": sd_dir, "stage": "cfg", "steps": 1,
                                  "init_from": str(out)}).fit(ds.train)
    assert tuned.lineage_ == ["official:epoch_015.pth", "cfg"] and tuned.aux_active_


def test_import_is_strict(released_like, sd_dir, tmp_path):
    _, _, state, _ = released_like
    bad = tmp_path / "unknown.pth"
    torch.save({**state, "fmri_pred_head.weight": torch.zeros(1), "control_model.extra.weight": torch.zeros(1)}, bad)
    with pytest.raises(OfficialFileError, match=r"1 key\(s\) that are neither mapped nor on the ignore list: "
                                                r"fmri_pred_head\.weight"):
        _import(bad, sd_dir)
    extra = tmp_path / "extra.pth"
    torch.save({**state, "control_model.extra.weight": torch.zeros(1)}, extra)
    with pytest.raises(OfficialFileError, match=r"ControlNet .*did not map: extra\.weight"):
        _import(extra, sd_dir)
    missing = tmp_path / "missing.pth"
    torch.save({k: v for k, v in state.items() if k != "control_model.zero_convs.0.0.weight"}, missing)
    with pytest.raises(OfficialFileError, match=r"missing ControlNet weights: controlnet_down_blocks\.0\.weight"):
        _import(missing, sd_dir)
    hlgn = tmp_path / "hlgn.pth"
    torch.save({**state, "cond_stage.extra_clip.4.weight": torch.zeros(1)}, hlgn)
    with pytest.raises(OfficialFileError, match=r"unknown guiding-network key\(s\): extra_clip\.4\.weight"):
        _import(hlgn, sd_dir)
    other_unet = tmp_path / "other_unet.pth"
    torch.save({k: (v + 1 if k == "model.diffusion_model.out.2.bias" else v) for k, v in state.items()}, other_unet)
    with pytest.raises(OfficialFileError, match=r"unet of .* differs from base_model=.* by up to 1"):
        _import(other_unet, sd_dir)
    with pytest.raises(OfficialFileError, match="holds its own .*fMRI encoder.*Leave encoder out"):
        _import(released_like[1], sd_dir, encoder=tmp_path / "e.pth")


def test_the_initial_controlnet_file_takes_the_released_encoder(released_like, sd_dir, tmp_path):
    _, _, state, ds = released_like
    initial = {k: v for k, v in state.items()
               if not k.startswith(("fmri_encoder.", "cond_stage.", "control_model.fmri_mapper."))}
    path = tmp_path / "control_sd21_ini.ckpt"
    torch.save(initial, path)
    with pytest.raises(OfficialFileError, match="no fMRI encoder.*encoder=checkpoint_120000.pth"):
        _import(path, sd_dir)
    vit = reference_vit()
    enc = official_encoder_file(tmp_path / "checkpoint_120000.pth", vit)
    imported, report = _import(path, sd_dir, encoder=enc, encoder_config=write_yaml(tmp_path / "c.yaml"),
                               subjects=[1])
    assert imported.stage_ == "pretrain" and not imported.aux_active_
    assert any("feature transformation" in f for f in report.fresh)
    x = torch.from_numpy(ds.test.surfaces(1))
    with torch.no_grad():
        torch.testing.assert_close(imported.net_.fmri_encoder(x), vit.forward_features(x[:, None]), rtol=0, atol=1e-5)


def test_cli_import_with_check(released_like, sd_dir, tmp_path):
    from typer.testing import CliRunner

    from brainrecon.cli import app

    _, path, _, _ = released_like
    cfg = write_yaml(tmp_path / "fMRI_AutoEncoder.yaml")
    result = CliRunner().invoke(app, ["import", "neuropictor", "--checkpoint", str(path), "--encoder-config", str(cfg),
                                      "--base-model", sd_dir, "--out", str(tmp_path / "np"), "--check"])
    assert result.exit_code == 0, result.output
    assert "check fmri encoder tokens" in result.output and "ignored control_model.input_hint_block" in result.output
    assert load_decoder(tmp_path / "np").subjects_ == [1]
    result = CliRunner().invoke(app, ["import", "neuropictor", "--checkpoint", str(path), "--base-model", sd_dir,
                                      "--out", str(tmp_path / "np")])
    assert result.exit_code == 1 and "already exists" in result.output


def test_imported_model_reconstructs_evaluates_and_samples(released_like, sd_dir, tmp_path):
    from typer.testing import CliRunner

    from brainrecon.cli import app
    from brainrecon.workflows.importers import write_runs

    _, path, _, ds = released_like
    imported, _ = _import(path, sd_dir)
    (run,) = write_runs(imported, dataset=ds, out=tmp_path / "runs")
    assert run.name == "neuropictor-official-subj01" and run.info["imported_from"] == "epoch_015.pth"
    np.testing.assert_array_equal(run.reconstructions(), imported.predict(ds.test)[1])
    runner = CliRunner()
    result = runner.invoke(app, ["evaluate", str(run.path), "-m", "PixCorr", "-m", "SSIM", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert (run.path / "metrics.json").is_file()
    result = runner.invoke(app, ["neuropictor-sample", str(run.path), "--swap-semantics", "0:1"])
    assert result.exit_code == 0, result.output
    assert (run.path / "swap_semantics.png").is_file()


def test_the_encoder_stage_continues_the_released_autoencoder(tmp_path):
    from brainrecon.decoders.neuropictor.encoder import FMRIAutoencoderHead

    vit = reference_vit()
    torch.manual_seed(5)
    head = FMRIAutoencoderHead(surface_size=16, patch_size=4, encoder_dim=32, bottleneck=16, dim=16, depth=1,
                               heads=4).eval()
    path = tmp_path / "checkpoint_120000.pth"
    state = {f"module.transformer.{k}": v for k, v in vit.state_dict().items()}
    state.update({f"module.transformer.{k}": v for k, v in head.state_dict().items()})
    torch.save({"model": state}, path)
    ds = make_synthetic(seed=0, subjects=(1,), n_train=4, n_test=2, image_size=32, surface_size=16)
    config = write_yaml(tmp_path / "fMRI_AutoEncoder.yaml", decoder_embed_dim=16, decoder_depth=1)
    common = {**TINY, "stage": "encoder", "steps": 1, "lr": 0.0, "encoder_init": str(path),
              "encoder_config": str(config), "decoder_heads": 4}
    decoder = NeuroPictorDecoder(**common).fit(ds.train)
    x = torch.from_numpy(ds.test.surfaces(1))
    with torch.no_grad():
        torch.testing.assert_close(decoder.net_(x), head(vit.forward_features(x[:, None])), rtol=0, atol=1e-5)
    with pytest.raises(BrainreconError, match=r"decoder_dim=16.*this decoder has .*decoder_dim=8.*decoder_dim=16"):
        NeuroPictorDecoder(**{**common, "decoder_dim": 8}).fit(ds.train)
    with pytest.raises(OfficialFileError, match=r"Model\.decoder_depth=3 in .* give 1"):
        NeuroPictorDecoder(**{**common, "encoder_config": str(write_yaml(tmp_path / "d.yaml", decoder_depth=3))}
                           ).fit(ds.train)


def test_full_size_layout_converts_key_for_key():
    # SD 2.1-base-sized UNet, VAE and ControlNet on the meta device (no memory): diffusers'
    # converters turn the official layout into exactly the modules' keys.
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders import single_file_utils as sfu

    from brainrecon.decoders.neuropictor import control, model

    with torch.device("meta"):
        unet = UNet2DConditionModel(**model.sd21_base_unet_config())
        vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                            norm_num_groups=32, sample_size=512)
        controlnet = control.build_controlnet(unet, control.FeatureTransform(), copy_weights=False)
    config = dict(unet.config)
    ldm = unet_to_ldm(unet.state_dict(), config, "model.diffusion_model.")
    assert set(sfu.convert_ldm_unet_checkpoint(ldm, config)) == set(unet.state_dict())
    ldm = vae_to_ldm(vae.state_dict(), vae.config)
    assert set(sfu.convert_ldm_vae_checkpoint(ldm, dict(vae.config))) == set(vae.state_dict())
    ldm = unet_to_ldm(controlnet.state_dict(), config, "control_model.")
    target = control.controlnet_state_without_embedding(controlnet)
    assert len(target) == 324 and set(sfu.convert_controlnet_checkpoint(ldm, config)) == set(target)


# ---------------------------------------------------------------------------- issue 24 §3 follow-ups
def test_relative_base_model_and_config_are_stored_absolute(released_like, sd_dir, tmp_path, monkeypatch):
    import shutil

    from brainrecon.workflows.importers import import_neuropictor

    _, path, _, ds = released_like
    work = tmp_path / "work"
    shutil.copytree(sd_dir, work / "sd")
    write_yaml(work / "fMRI_AutoEncoder.yaml", num_heads=4)
    monkeypatch.chdir(work)
    out, _ = import_neuropictor(path, work / "imported", base_model="sd", encoder_config="fMRI_AutoEncoder.yaml",
                                params={"device": "cpu", "num_inference_steps": 2, "progress": False})
    params = json.loads((out / "brainrecon.json").read_text())["params"]
    assert params["base_model"] == str((work / "sd").resolve())
    assert params["encoder_config"] == str((work / "fMRI_AutoEncoder.yaml").resolve())
    monkeypatch.chdir(tmp_path)  # elsewhere: the saved decoder still finds its base model
    assert load_decoder(out).predict(ds.test)[1].shape[0] == 2


def test_assumed_encoder_settings_are_reported_and_described(released_like, sd_dir, tmp_path):
    from typer.testing import CliRunner

    from brainrecon.cli import app
    from brainrecon.workflows.importers import import_neuropictor

    _, path, _, _ = released_like
    out, report = import_neuropictor(path, tmp_path / "assumed", base_model=sd_dir,
                                     params={"device": "cpu", "progress": False})
    line = next(x for x in report.lines() if "fMRI encoder:" in x)
    assert "16 heads, LayerNorm eps 1e-05, dropout 0" in line and "ASSUMED" in line
    described = CliRunner().invoke(app, ["decoders", "describe", str(out)])
    assert described.exit_code == 0, described.output
    assert "16 heads" in described.output and "ASSUMED" in described.output
    _, given = _import(path, sd_dir)  # a config given: no assumption
    assert "from the given config" in next(x for x in given.lines() if "fMRI encoder:" in x)


def test_subjects_come_from_the_files_own_folder(released_like, sd_dir, tmp_path):
    import shutil

    _, path, _, _ = released_like
    multi = tmp_path / "sub1" / "pretrain_multi_sub" / "sub_all_womask" / "epoch_080.pth"
    multi.parent.mkdir(parents=True)
    shutil.copy(path, multi)
    decoder, report = _import(multi, sd_dir)
    assert decoder.subjects_ == list(range(1, 9))
    assert any("subjects 1-8" in x and "sub_all_womask" in x for x in report.lines())
    single = tmp_path / "x" / "sub03" / "epoch_015.pth"
    single.parent.mkdir(parents=True)
    shutil.copy(path, single)
    decoder, report = _import(single, sd_dir)
    assert decoder.subjects_ == [3] and any("inferred from the folder name 'sub03'" in x for x in report.lines())
    decoder, report = _import(multi, sd_dir, subjects=[2])
    assert decoder.subjects_ == [2] and any("subjects [2] (as given)" in x for x in report.lines())
    assert any(x.strip().startswith("stage finetune") for x in report.lines())


def test_the_encoder_file_as_checkpoint_suggests_encoder(sd_dir, tmp_path):
    from typer.testing import CliRunner

    from brainrecon.cli import app

    folder = tmp_path / "fMRI2fMRI_UKB"
    folder.mkdir()
    enc = official_encoder_file(folder / "checkpoint_120000.pth", reference_vit())
    result = CliRunner().invoke(app, ["import", "neuropictor", "--checkpoint", str(enc), "--base-model", sd_dir,
                                      "--out", str(tmp_path / "np")])
    assert result.exit_code == 1
    assert "is the fMRI autoencoder" in result.output and "--encoder" in result.output
    # A pickle that needs a class: the refusal names it, carries no terminal colour codes, and
    # (the file being named like the autoencoder) suggests encoder.
    torch.save({"model": {"transformer.cls_token": torch.zeros(1)}, "obj": _NotWeights()},
               folder / "checkpoint_1.pth")
    with pytest.raises(OfficialFileError) as exc:
        _import(folder / "checkpoint_1.pth", sd_dir)
    text = str(exc.value)
    assert "_NotWeights" in text and "\x1b[" not in text and "pass it as encoder" in text
    assert exc.value.parameters == ("encoder",)
