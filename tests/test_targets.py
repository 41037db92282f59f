import numpy as np
import pytest

from brainrecon.errors import BrainreconError, DataError
from brainrecon.targets import PixelTarget, get_target
from brainrecon.targets.cache import IdKeyedCache


def test_pixel_target_is_an_area_average(small_data):
    target = get_target("pixels", size=16)
    Y = target.load(small_data.train, 1, progress=False)
    imgs = small_data.train.images(1).astype(np.float32) / 255
    # 32 -> 16 with antialiasing is the mean of 2x2 blocks
    expected = imgs.reshape(120, 16, 2, 16, 2, 3).mean(axis=(2, 4))
    assert Y.shape == (120, 16, 16, 3) and Y.dtype == np.float32
    np.testing.assert_allclose(Y, expected, atol=1e-5)


def test_pixel_target_round_trip_to_images(small_data):
    target = PixelTarget(size=32)
    Y = target.load(small_data.test, 2, progress=False)
    back = target.to_images(Y, image_size=32)
    np.testing.assert_array_equal(back, small_data.test.images(2))
    up = target.to_images(Y, image_size=64)
    assert up.shape == (12, 64, 64, 3) and up.dtype == np.uint8


def test_targets_cached_by_id_and_reused(small_data, monkeypatch):
    target = PixelTarget(size=8)
    first = target.load(small_data.test, 1, progress=False)
    calls = []
    monkeypatch.setattr(target, "compute", lambda images: calls.append(1) or np.zeros((len(images), 8, 8, 3)))
    # Test images are shared: another subject's test targets come from the cache.
    second = target.load(small_data.test, 7, progress=False)
    assert not calls
    np.testing.assert_array_equal(first, second)


def test_cache_resumes_after_interruption(tmp_path):
    cache = IdKeyedCache(tmp_path / "c", shape=(2,), dtype="float32", description={"v": 1})
    ids = np.array([30, 10, 20, 40])
    done = []

    def compute(batch):
        if len(done) == 1:
            raise KeyboardInterrupt
        done.append(batch.copy())
        return np.stack([batch, batch * 2], axis=1).astype(np.float32)

    with pytest.raises(KeyboardInterrupt):
        cache.fill(ids, compute, batch_size=2, progress=False)
    assert len(cache.missing(ids)) == 2
    done.append("resumed")
    computed = []
    cache.fill(ids, lambda b: computed.append(b) or np.stack([b, b * 2], 1).astype(np.float32),
               batch_size=2, progress=False)
    assert sum(len(b) for b in computed) == 2
    np.testing.assert_array_equal(cache.get(ids)[:, 1], ids * 2)
    # extending with new ids keeps old values
    more = np.array([5, 10])
    cache.fill(more, lambda b: np.stack([b, b * 2], 1).astype(np.float32), progress=False)
    np.testing.assert_array_equal(cache.get(np.array([5, 40]))[:, 0], [5, 40])
    with pytest.raises(DataError, match="different settings"):
        IdKeyedCache(tmp_path / "c", shape=(2,), dtype="float32", description={"v": 2})


def test_unknown_target():
    with pytest.raises(BrainreconError, match="Unknown target 'pixel'. Available targets: 'clip', 'ipadapter', 'pixels'"):
        get_target("pixel")
