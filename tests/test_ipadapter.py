"""IP-Adapter Plus tokens as a target space (brainrecon.targets.ipadapter).

Every model here is tiny and random, built from config by :mod:`brainrecon.testing.tiny` and saved
in the real ``h94/IP-Adapter`` layout (``models/image_encoder/``, ``models/ip-adapter-plus_sd15.bin``
and ``.safetensors``) and, for the generator tests, an SD 1.5-style diffusers folder (the session
fixture ``tiny_weights``); everything is loaded through the same code as the real weights.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from brainrecon.errors import DataError, WeightsNotFoundError
from brainrecon.testing.tiny import (
    CROSS_DIM,
    ENC_HIDDEN,
    ENC_IMAGE,
    ENC_PATCH,
    HEADS,
    NUM_QUERIES,
    TOKEN_SHAPE,
    tiny_resampler_state,
)

TARGET_OPTIONS = {"device": "cpu"}


# ---------------------------------------------------------------------------- reference math
def reference_resampler(sd: dict[str, torch.Tensor], h: torch.Tensor, heads: int, dim_head: int = 64) -> torch.Tensor:
    """The tencent Resampler (IP-Adapter Plus), written out from its equations.

    Per head the scale 64^-1/4 is applied to q and k separately and the softmax runs in
    float32, as in the reference; heads are looped over explicitly.
    """
    ln = lambda x, p: F.layer_norm(x, x.shape[-1:], sd[p + ".weight"], sd[p + ".bias"], eps=1e-5)  # noqa: E731
    x = h @ sd["proj_in.weight"].T + sd["proj_in.bias"]
    lat = sd["latents"].repeat(h.shape[0], 1, 1)
    depth = len({k.split(".")[1] for k in sd if k.startswith("layers.")})
    scale = dim_head ** -0.25
    for i in range(depth):
        p = f"layers.{i}."
        xn, ln_ = ln(x, p + "0.norm1"), ln(lat, p + "0.norm2")
        q = ln_ @ sd[p + "0.to_q.weight"].T
        kv = torch.cat([xn, ln_], dim=1) @ sd[p + "0.to_kv.weight"].T
        k, v = kv.chunk(2, dim=-1)
        outs = []
        for head in range(heads):
            sl = slice(head * dim_head, (head + 1) * dim_head)
            w = (q[..., sl] * scale) @ (k[..., sl] * scale).transpose(-2, -1)
            # Reference: softmax in float32 for fp16 inputs (``.float()``); never below float64 here.
            w = torch.softmax(w.to(torch.promote_types(w.dtype, torch.float32)), dim=-1).type(w.dtype)
            outs.append(w @ v[..., sl])
        lat = torch.cat(outs, dim=-1) @ sd[p + "0.to_out.weight"].T + lat
        ff = ln(lat, p + "1.0") @ sd[p + "1.1.weight"].T
        lat = F.gelu(ff) @ sd[p + "1.3.weight"].T + lat
    return ln(lat @ sd["proj_out.weight"].T + sd["proj_out.bias"], "norm_out")


# ---------------------------------------------------------------------------- projection
@pytest.mark.parametrize("suffix", [".bin", ".safetensors"])
def test_projection_matches_reference_resampler(tiny_weights, suffix):
    from brainrecon.targets.ipadapter import load_image_projection

    path = tiny_weights["ipadapter"] / "models" / f"ip-adapter-plus_sd15{suffix}"
    proj = load_image_projection(path)
    sd = tiny_weights["state"]["image_proj"]
    h = torch.randn(3, (ENC_IMAGE // ENC_PATCH) ** 2 + 1, ENC_HIDDEN, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        ours = proj(h)
        ref = reference_resampler(sd, h, HEADS)
        assert ours.shape == (3,) + TOKEN_SHAPE
        torch.testing.assert_close(ours, ref, rtol=0, atol=2e-4)
        # In float64 the two computations agree to rounding: same function, not just close.
        ours64 = proj.double()(h.double())
        ref64 = reference_resampler({k: v.double() for k, v in sd.items()}, h.double(), HEADS)
        torch.testing.assert_close(ours64, ref64, rtol=0, atol=1e-11)
    # Every output token is LayerNorm-ed (then the learned affine): undo the affine, check.
    z = (ours - sd["norm_out.bias"]) / sd["norm_out.weight"]
    torch.testing.assert_close(z.mean(-1), torch.zeros(3, NUM_QUERIES), rtol=0, atol=1e-5)
    torch.testing.assert_close(z.var(-1, unbiased=False), torch.ones(3, NUM_QUERIES), rtol=0, atol=1e-3)


def test_projection_sizes_are_read_from_weights():
    """Depth, heads and the feed-forward ratio come from the weights, not from constants."""
    from brainrecon.targets.ipadapter import projection_from_state_dict

    sd = {k: v for k, v in tiny_resampler_state(3).items() if not k.startswith(("layers.2.", "layers.3."))}
    proj = projection_from_state_dict(sd)
    assert len(proj.layers) == 2
    assert proj.layers[0].attn.heads == HEADS
    h = torch.randn(2, 5, ENC_HIDDEN)
    with torch.no_grad():
        torch.testing.assert_close(proj(h), reference_resampler(sd, h, HEADS), rtol=0, atol=2e-5)


def test_bin_and_safetensors_hold_the_same_weights(tiny_weights):
    from brainrecon.targets.ipadapter import read_ipadapter_checkpoint

    models = tiny_weights["ipadapter"] / "models"
    a = read_ipadapter_checkpoint(models / "ip-adapter-plus_sd15.bin")
    b = read_ipadapter_checkpoint(models / "ip-adapter-plus_sd15.safetensors")
    for group in ("image_proj", "ip_adapter"):
        assert a[group].keys() == b[group].keys()
        for k in a[group]:
            assert torch.equal(a[group][k], b[group][k])


def test_checkpoint_errors(tmp_path):
    from safetensors.torch import save_file

    from brainrecon.targets.ipadapter import load_image_projection, read_ipadapter_checkpoint

    with pytest.raises(WeightsNotFoundError, match="does not exist"):
        read_ipadapter_checkpoint(tmp_path / "nope.bin")
    save_file({"image_proj.proj.weight": torch.zeros(2, 2), "ip_adapter.1.to_k_ip.weight": torch.zeros(2, 2)},
              str(tmp_path / "base.safetensors"))
    with pytest.raises(DataError, match="not an IP-Adapter \\*Plus\\* checkpoint"):
        read_ipadapter_checkpoint(tmp_path / "base.safetensors")
    torch.save({"image_proj": {"latents": torch.zeros(1, 2, 3)}}, tmp_path / "half.bin")
    with pytest.raises(DataError, match="needs 'image_proj' and 'ip_adapter'"):
        read_ipadapter_checkpoint(tmp_path / "half.bin")
    sd = tiny_resampler_state()
    sd["layers.0.0.to_kv.weight"] = sd["layers.0.0.to_kv.weight"][:, :-1]
    torch.save({"image_proj": sd, "ip_adapter": {"1.to_k_ip.weight": torch.zeros(1)}}, tmp_path / "bad.bin")
    with pytest.raises(DataError, match="do not fit the Resampler"):
        load_image_projection(tmp_path / "bad.bin")


# ---------------------------------------------------------------------------- preprocessing
def test_clip_preprocess_matches_definition_and_transformers():
    from brainrecon.targets.ipadapter import CLIP_MEAN, CLIP_STD, clip_preprocess

    rng = np.random.default_rng(0)
    square = rng.integers(0, 256, (2, 24, 24, 3), dtype=np.uint8)
    # Already at the encoder's size: no resize, only scaling and normalisation.
    got = clip_preprocess(square, 24)
    want = (square / 255.0 - np.array(CLIP_MEAN)) / np.array(CLIP_STD)
    np.testing.assert_allclose(got, want.transpose(0, 3, 1, 2), atol=1e-6)
    wide = rng.integers(0, 256, (3, 40, 61, 3), dtype=np.uint8)
    got = clip_preprocess(wide, 28)
    assert got.shape == (3, 3, 28, 28) and got.dtype == np.float32
    try:
        from transformers import CLIPImageProcessorPil as Ref  # transformers >= 5: the Pillow path
    except ImportError:  # pragma: no cover - transformers 4: CLIPImageProcessor is the Pillow path
        from transformers import CLIPImageProcessor as Ref
    ref = Ref(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    want = ref(images=list(wide), return_tensors="np")["pixel_values"]
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_clip_preprocess_rejects_bad_shape():
    from brainrecon.targets.ipadapter import clip_preprocess

    with pytest.raises(DataError, match=r"\(n, H, W, 3\)"):
        clip_preprocess(np.zeros((2, 8, 8), dtype=np.uint8))


# ---------------------------------------------------------------------------- tokens
def _reference_tokens(tiny_weights, images: np.ndarray) -> torch.Tensor:
    """Encoder hidden_states[-2] -> reference Resampler, with the encoder loaded directly."""
    from transformers import CLIPVisionModelWithProjection

    from brainrecon.targets.ipadapter import clip_preprocess

    enc = CLIPVisionModelWithProjection.from_pretrained(tiny_weights["ipadapter"] / "models" / "image_encoder").eval()
    with torch.no_grad():
        pixels = torch.from_numpy(clip_preprocess(images, ENC_IMAGE))
        hs = enc(pixel_values=pixels, output_hidden_states=True).hidden_states
        assert len(hs) == enc.config.num_hidden_layers + 1
        return reference_resampler(tiny_weights["state"]["image_proj"], hs[-2], HEADS)


def test_target_computes_reference_tokens(tiny_weights):
    from brainrecon.targets import get_target

    target = get_target("ipadapter", ipadapter_dir=tiny_weights["ipadapter"], batch_size=2, **TARGET_OPTIONS)
    assert target.shape == TOKEN_SHAPE and target.cache_dtype == "float16"
    images = np.random.default_rng(1).integers(0, 256, (5, 33, 30, 3), dtype=np.uint8)
    got = target.compute(images)
    assert got.shape == (5,) + TOKEN_SHAPE and got.dtype == np.float32
    np.testing.assert_allclose(got, _reference_tokens(tiny_weights, images).numpy(), atol=5e-5)
    # Different images, different tokens; batch composition does not matter.
    assert not np.allclose(got[0], got[1], atol=1e-3)
    np.testing.assert_allclose(target.compute(images[3:4]), got[3:4], atol=1e-5)


def test_uncond_tokens_are_projection_of_zero_pixels_and_cached(tiny_weights):
    from transformers import CLIPVisionModelWithProjection

    from brainrecon.targets.ipadapter import IPAdapterTarget

    target = IPAdapterTarget(ipadapter_dir=tiny_weights["ipadapter"], **TARGET_OPTIONS)
    un = target.uncond_tokens()
    enc = CLIPVisionModelWithProjection.from_pretrained(tiny_weights["ipadapter"] / "models" / "image_encoder").eval()
    with torch.no_grad():
        h = enc(pixel_values=torch.zeros(1, 3, ENC_IMAGE, ENC_IMAGE), output_hidden_states=True).hidden_states[-2]
        ref = reference_resampler(tiny_weights["state"]["image_proj"], h, HEADS)[0]
    np.testing.assert_allclose(un, ref.numpy(), atol=5e-5)
    assert np.abs(un).max() > 0.1  # a fixed, non-zero tensor
    path = target.weights.uncond_path()
    assert path.is_file()
    # Second call reads the cache (no encoder needed): a fresh target, same numbers.
    again = IPAdapterTarget(ipadapter_dir=tiny_weights["ipadapter"], **TARGET_OPTIONS)
    np.testing.assert_array_equal(again.uncond_tokens(), un)
    assert again._embedder is None


def test_load_uses_id_keyed_fp16_cache_and_resumes(tiny_weights, tmp_path):
    from brainrecon.data import from_arrays
    from brainrecon.targets.cache import IdKeyedCache
    from brainrecon.targets.ipadapter import IPAdapterTarget

    rng = np.random.default_rng(2)
    imgs = rng.integers(0, 256, (10, 32, 32, 3), dtype=np.uint8)
    ds = from_arrays({1: {"train_voxels": rng.normal(size=(6, 5)).astype(np.float32), "train_images": imgs[:6],
                          "train_ids": np.array([50, 10, 30, 20, 40, 60]),
                          "test_voxels": rng.normal(size=(4, 5)).astype(np.float32), "test_images": imgs[6:],
                          "test_ids": np.array([3, 1, 2, 0])}})
    calls = []

    class Counting(IPAdapterTarget):
        def compute(self, images):
            calls.append(len(images))
            return super().compute(images)

    target = Counting(ipadapter_dir=tiny_weights["ipadapter"], cache_dir=tmp_path / "tok", **TARGET_OPTIONS)
    y = target.load(ds.train, 1, progress=False)
    assert y.shape == (6,) + TOKEN_SHAPE and y.dtype == np.float32
    ref = target.compute(imgs[:6])
    np.testing.assert_allclose(y, ref.astype(np.float16).astype(np.float32), atol=0)  # fp16 storage, row order kept
    calls.clear()
    assert np.array_equal(target.load(ds.train, 1, progress=False), y)
    assert calls == []  # served from the cache
    cache = IdKeyedCache(tmp_path / "tok", TOKEN_SHAPE, "float16", target.config())
    assert len(cache.missing(np.array([10, 20, 30, 40, 50, 60]))) == 0
    # Interrupted fill: mark two rows as not computed; only those are recomputed.
    filled = np.load(tmp_path / "tok" / "filled.npy", mmap_mode="r+")
    filled[[1, 4]] = False
    filled.flush()
    del filled
    calls.clear()
    y2 = target.load(ds.train, 1, progress=False)
    assert sum(calls) == 2
    np.testing.assert_array_equal(y2, y)


def test_embed_dataset_fills_default_cache_that_load_reads(tiny_weights, small_data):
    from brainrecon.targets.ipadapter import UNCOND_FILENAME, IPAdapterTarget, embed_dataset

    ds = small_data.select([1, 2])
    # A few images per split are enough here: keep the test fast.
    directory = embed_dataset(_head(ds, 3), ipadapter_dir=tiny_weights["ipadapter"], progress=False,
                              **TARGET_OPTIONS)
    assert (directory / UNCOND_FILENAME).is_file()
    small = _head(ds, 3)
    target = IPAdapterTarget(ipadapter_dir=tiny_weights["ipadapter"], **TARGET_OPTIONS)
    assert target.cache_dir(small.train) == directory

    def fail(images):
        raise AssertionError("load() recomputed tokens that embed_dataset had cached")

    target.compute = fail
    for s in (1, 2):
        assert target.load(small.test, s, progress=False).shape == (3,) + TOKEN_SHAPE


def _head(ds, n):
    """The first ``n`` rows of every split (a dataset with the same spec)."""
    from brainrecon.data import Dataset, SplitArrays

    data = {}
    for s in ds.subjects:
        data[s] = {}
        for name in ("train", "test"):
            split = getattr(ds, name)
            data[s][name] = SplitArrays(voxels=split.voxels(s)[:n], ids=split.ids(s)[:n],
                                        images=split.images(s, slice(0, n)))
    return Dataset(data, spec=ds.spec, name=ds.name)


def test_embed_images_file_npy_and_hdf5(tiny_weights, tmp_path):
    import h5py

    from brainrecon.targets.cache import IdKeyedCache
    from brainrecon.targets.ipadapter import IPAdapterTarget, embed_images_file

    imgs = np.random.default_rng(3).integers(0, 256, (5, 30, 30, 3), dtype=np.uint8)
    np.save(tmp_path / "stim.npy", imgs)
    with h5py.File(tmp_path / "nsd_stimuli.hdf5", "w") as f:
        f["imgBrick"] = imgs
    a = embed_images_file(tmp_path / "stim.npy", tmp_path / "a", ipadapter_dir=tiny_weights["ipadapter"],
                          progress=False, batch_size=2, **TARGET_OPTIONS)
    b = embed_images_file(tmp_path / "nsd_stimuli.hdf5", tmp_path / "b", ipadapter_dir=tiny_weights["ipadapter"],
                          progress=False, **TARGET_OPTIONS)
    target = IPAdapterTarget(ipadapter_dir=tiny_weights["ipadapter"], **TARGET_OPTIONS)
    want = target.compute(imgs).astype(np.float16)
    for d in (a, b):
        cache = IdKeyedCache(d, TOKEN_SHAPE, "float16", target.config())
        got = cache.get(np.array([4, 0, 2]))
        np.testing.assert_allclose(got.astype(np.float32), want[[4, 0, 2]].astype(np.float32), atol=2e-3)
    with pytest.raises(DataError, match="use .npy or .h5"):
        (tmp_path / "x.png").write_bytes(b"")
        embed_images_file(tmp_path / "x.png", tmp_path / "c", ipadapter_dir=tiny_weights["ipadapter"])


def test_target_shape_mismatch_names_the_fix(tiny_weights):
    from brainrecon.targets.ipadapter import IPAdapterTarget

    target = IPAdapterTarget(ipadapter_dir=tiny_weights["ipadapter"], device="cpu", num_tokens=16, token_dim=768)
    with pytest.raises(DataError, match=rf"pass num_tokens={NUM_QUERIES}, token_dim={CROSS_DIM}"):
        target.compute(np.zeros((1, 8, 8, 3), dtype=np.uint8))


def test_shape_comes_from_the_weights_else_sd15_default(tiny_weights, tmp_path):
    from brainrecon.targets.ipadapter import IPAdapterTarget

    assert IPAdapterTarget(ipadapter_dir=tiny_weights["ipadapter"]).shape == TOKEN_SHAPE
    bin_only = IPAdapterTarget(ipadapter_dir=tiny_weights["ipadapter"], weight_name="ip-adapter-plus_sd15.bin")
    assert bin_only.shape == TOKEN_SHAPE
    assert IPAdapterTarget(ipadapter_dir=tmp_path / "none").shape == (16, 768)
    # The cache key names the checkpoint, not where it sits.
    assert IPAdapterTarget(ipadapter_dir=tmp_path).config() == IPAdapterTarget().config()


def test_to_images_points_to_the_generator():
    from brainrecon.errors import BrainreconError
    from brainrecon.targets.ipadapter import IPAdapterTarget

    with pytest.raises(BrainreconError, match="brainrecon.generate"):
        IPAdapterTarget().to_images(np.zeros((1, 16, 768)))


# ---------------------------------------------------------------------------- missing weights
def test_missing_local_weights_name_files_and_places(tmp_path, small_data):
    from brainrecon.targets.ipadapter import IPAdapterTarget

    target = IPAdapterTarget(ipadapter_dir=tmp_path / "empty", cache_dir=tmp_path / "tok")
    with pytest.raises(WeightsNotFoundError) as info:
        target.load(small_data.train, 1)
    assert not (tmp_path / "tok").exists()  # failed before creating any cache file
    msg = str(info.value)
    assert "ip-adapter-plus_sd15.safetensors" in msg and "ip-adapter-plus_sd15.bin" in msg
    assert str(tmp_path / "empty" / "models" / "ip-adapter-plus_sd15.safetensors") in msg
    assert "as ipadapter_dir" in msg and "huggingface-cli download h94/IP-Adapter" in msg
    assert info.value.parameters == ("ipadapter_dir",)


def test_missing_encoder_is_reported(tiny_weights, tmp_path):
    import shutil

    from brainrecon.targets.ipadapter import IPAdapterWeights

    partial = tmp_path / "partial" / "models"
    partial.mkdir(parents=True)
    shutil.copy(tiny_weights["ipadapter"] / "models" / "ip-adapter-plus_sd15.bin", partial)
    w = IPAdapterWeights(local_dir=tmp_path / "partial")
    assert w.adapter_file().name == "ip-adapter-plus_sd15.bin"  # .bin when no .safetensors
    with pytest.raises(WeightsNotFoundError, match=r"image encoder \(models/image_encoder/config.json"):
        w.encoder_dir()


def test_missing_hub_weights_offline_do_not_touch_network(monkeypatch, tmp_path):
    """Repo-id weights that are not cached: a clear error, no download attempt, no hang."""
    from brainrecon.targets.ipadapter import IPAdapterWeights

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    w = IPAdapterWeights()
    with pytest.raises(WeightsNotFoundError) as info:
        w.adapter_file()
    msg = str(info.value)
    assert "offline: downloads are disabled" in msg
    assert "models--h94--IP-Adapter" in msg and "ip-adapter-plus_sd15.safetensors" in msg


def test_hub_cache_layout_is_found(tiny_weights, monkeypatch, tmp_path):
    """Files in the Hugging Face cache layout are used without a download."""
    import shutil

    from brainrecon.targets.ipadapter import IPAdapterWeights

    hub = tmp_path / "hub"
    snap = hub / "models--h94--IP-Adapter" / "snapshots" / ("0" * 40)
    shutil.copytree(tiny_weights["ipadapter"] / "models", snap / "models")
    (hub / "models--h94--IP-Adapter" / "refs").mkdir(parents=True)
    (hub / "models--h94--IP-Adapter" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    w = IPAdapterWeights()
    assert w.adapter_file() == snap / "models" / "ip-adapter-plus_sd15.safetensors"
    assert w.encoder_dir() == snap / "models" / "image_encoder"


def test_bad_options():
    from brainrecon.targets.ipadapter import IPAdapterTarget, resolve_device

    with pytest.raises(DataError, match="batch_size must be a positive integer"):
        IPAdapterTarget(batch_size=0)
    with pytest.raises(Exception, match="Unknown device 'tpu'"):
        resolve_device("tpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_fp16_tokens_match_cpu(tiny_weights):
    from brainrecon.targets.ipadapter import IPAdapterTarget

    images = np.random.default_rng(5).integers(0, 256, (4, 30, 30, 3), dtype=np.uint8)
    gpu = IPAdapterTarget(ipadapter_dir=tiny_weights["ipadapter"], device="cuda")
    assert gpu.embedder().dtype == torch.float16
    cpu = IPAdapterTarget(ipadapter_dir=tiny_weights["ipadapter"], device="cpu")
    np.testing.assert_allclose(gpu.compute(images), cpu.compute(images), atol=3e-2)
