"""The ``clip`` target space (CLIP image + caption hidden states) and the two-branch BrainGuard on it.

A tiny CLIP built from config stands in for ``openai/clip-vit-large-patch14`` (no download).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from brainrecon.data.synthetic import make_synthetic
from brainrecon.decoders.brainguard import BrainGuardDecoder, BrainGuardNet, split_tiers
from brainrecon.errors import BrainreconError
from brainrecon.targets import get_target
from brainrecon.testing.tiny import save_tiny_clip

pytestmark = pytest.mark.usefixtures("one_thread")

IMAGE_TOKENS, TEXT_TOKENS, DIM = 5, 8, 16  # ViT-L/14: 257, 77, 768


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return save_tiny_clip(tmp_path_factory.mktemp("tiny-clip"), text_tokens=TEXT_TOKENS, dim=DIM)


def options(clip_dir):
    return {"model": str(clip_dir), "image_tokens": IMAGE_TOKENS, "text_tokens": TEXT_TOKENS, "dim": DIM,
            "device": "cpu"}


def test_clip_states_follow_the_clipper_normalisation(clip_dir):
    from transformers import CLIPModel, CLIPTokenizer

    target = get_target("clip", **options(clip_dir))
    assert target.shape == (IMAGE_TOKENS + TEXT_TOKENS, DIM)
    images = np.random.default_rng(0).integers(0, 256, (3, 40, 36, 3), dtype=np.uint8)
    captions = ["a red disc", "two blue squares", "a green triangle on white"]
    out = target.compute_pairs(images, captions)
    assert out.shape == (3, IMAGE_TOKENS + TEXT_TOKENS, DIM) and out.dtype == np.float32
    image, text = out[:, :IMAGE_TOKENS], out[:, IMAGE_TOKENS:]
    # image: every token divided by the class token's norm
    np.testing.assert_allclose(np.linalg.norm(image[:, 0], axis=-1), 1.0, rtol=1e-5)
    # text: divided by the norm of the pooled, projected embedding, which is the end token's state
    model = CLIPModel.from_pretrained(clip_dir).eval()
    tok = CLIPTokenizer.from_pretrained(clip_dir)
    ids = tok(captions, padding="max_length", max_length=TEXT_TOKENS, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        res = model.text_model(input_ids=ids)
        states = model.text_projection(res.last_hidden_state)
        pooled = model.text_projection(res.pooler_output)
        x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255
        x = torch.nn.functional.interpolate(x, size=(31, 28), mode="bicubic", align_corners=False)[:, :, 1:29]
        mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
        std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
        vis = model.visual_projection(model.vision_model.post_layernorm(
            model.vision_model(pixel_values=(x - mean) / std).last_hidden_state))
    np.testing.assert_allclose(text, (states / pooled.norm(dim=-1)[:, None, None]).numpy(), rtol=0, atol=1e-5)
    np.testing.assert_allclose(image, (vis / vis[:, :1].norm(dim=-1, keepdim=True)).numpy(), rtol=0, atol=1e-5)
    with pytest.raises(BrainreconError, match="pairs each image with a caption"):
        target.compute(images)


def test_clip_targets_are_cached_with_the_datas_captions(clip_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("BRAINRECON_CACHE", str(tmp_path / "cache"))
    ds = make_synthetic(seed=0, subjects=(1,), n_train=6, n_test=2, image_size=32, surface_size=16)
    target = get_target("clip", **options(clip_dir))
    values = target.load(ds.train, 1, progress=False)
    expected = target.compute_pairs(ds.train.images(1), np.asarray(ds.train.captions(1))[:, 0])
    np.testing.assert_allclose(values, expected, rtol=0, atol=1e-6)
    again = get_target("clip", **options(clip_dir)).load(ds.train, 1, progress=False)
    np.testing.assert_array_equal(values, again)
    second = get_target("clip", **options(clip_dir), caption_index=1).load(ds.train, 1, progress=False)
    assert not np.allclose(second[:, IMAGE_TOKENS:], values[:, IMAGE_TOKENS:])  # another caption, another cache


def test_two_branch_network_keeps_the_released_tensor_order():
    net = BrainGuardNet(20, 8, 4, 257 + 77, 768, 0.0, branches=(257, 77), projector_hidden=12)
    names = [n for n, _ in net.named_parameters()]
    assert len(names) == 46
    assert names[18:22] == ["head.weight", "head.bias", "head_text.weight", "head_text.bias"]
    assert names[22].startswith("projector.") and names[34].startswith("projector_text.")
    # sync_layers=1 fuses both projectors: the released -p 24
    _, _, adaptive = split_tiers(net, sync_layers=1)
    assert adaptive == names[22:]
    out = net(torch.randn(3, 20))
    assert out.shape == (3, 334, 768)


def test_brainguard_paper_recipe_is_the_published_network():
    from brainrecon.decoders import get_recipe

    recipe = get_recipe("brainguard", "brainguard-paper")
    assert recipe.values["target"] == "clip" and recipe.values["branches"] == [257, 77]
    assert recipe.values["hidden"] == 2048 and recipe.values["projector_hidden"] == 2048
    with torch.device("meta"):
        net = BrainGuardNet(15724, 2048, 4, 334, 768, 0.15, branches=(257, 77), projector_hidden=2048)
    assert sum(p.numel() for p in net.parameters()) == 589_308_928  # the published count, subject 1


def test_two_branch_brainguard_fits_on_clip_targets(clip_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("BRAINRECON_CACHE", str(tmp_path / "cache"))
    ds = make_synthetic(seed=0, subjects=(1, 2), n_train=20, n_test=4, image_size=32, surface_size=16)
    decoder = BrainGuardDecoder(target="clip", target_options=options(clip_dir), branches=[IMAGE_TOKENS, TEXT_TOKENS],
                                hidden=16, n_blocks=1, rounds=2, batch_size=10, sync_layers=1, device="cpu",
                                progress=False, dfl_num_pre_loss=1, validation_fraction=0.2)
    decoder.fit(ds.train)
    pred = decoder.predict(ds.test)
    assert pred[1].shape == (4, IMAGE_TOKENS + TEXT_TOKENS, DIM) and np.isfinite(pred[1]).all()
    assert decoder.models_[1].branches == (IMAGE_TOKENS, TEXT_TOKENS)
    decoder.save(tmp_path / "dec")
    from brainrecon.decoders import load_decoder

    again = load_decoder(tmp_path / "dec")
    np.testing.assert_array_equal(again.predict(ds.test)[2], pred[2])
    with pytest.raises(BrainreconError, match=r"branches=\[5, 9\] must be one or two positive token counts"):
        BrainGuardDecoder(target="clip", target_options=options(clip_dir), branches=[5, 9], hidden=8,
                          rounds=1, device="cpu", progress=False).fit(ds.train)
