"""Importing NeuroPictor's released files: tiny official-layout files built here, offline.

The released UK-Biobank fMRI encoder is timm's ``VisionTransformer`` computation under the
official key names (``[module.]transformer.*`` inside ``{'model': ...}``), so the reference
here is a tiny timm ViT saved in that layout.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from brainrecon.data.synthetic import make_synthetic
from brainrecon.decoders import load_decoder
from brainrecon.decoders.neuropictor import NeuroPictorDecoder, load_official_encoder
from brainrecon.decoders.neuropictor.official import OfficialFileError
from brainrecon.errors import BrainreconError

timm = pytest.importorskip("timm")

TINY_SIZES = {
    "surface_size": 16, "patch_size": 4, "encoder_dim": 32, "encoder_depth": 2, "encoder_heads": 4,
    "bottleneck_dim": 16, "decoder_dim": 16, "decoder_depth": 1, "decoder_heads": 2, "semantic_hidden": 8,
    "image_size": 32,
}
TINY = {**TINY_SIZES, "batch_size": 2, "num_inference_steps": 2, "progress": False, "device": "cpu",
        "gradient_checkpointing": False, "base_model": "tiny"}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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
    with pytest.raises(BrainreconError, match=r"eps 1e-06.*--param encoder_eps=1e-06"):
        NeuroPictorDecoder(**{**TINY, "stage": "finetune", "steps": 1,
                              "init_from": str(tmp_path / "old")}).fit(ds.train)
    NeuroPictorDecoder(**{**TINY, "stage": "finetune", "steps": 1, "encoder_eps": 1e-6,
                          "init_from": str(tmp_path / "old")}).fit(ds.train)
