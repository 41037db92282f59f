"""Picture grids: layout, pixels, labels, atomic writes, run comparison."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from brainrecon.errors import BrainreconError, DataError
from brainrecon.io import write_array_atomic, write_json_atomic
from brainrecon.viz import _HEADER, _PAD, image_grid, to_uint8_hwc
from brainrecon.workflows.figures import compare_runs


def _imgs(seed, n=5, size=16):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_grid_layout_and_cell_pixels(tmp_path):
    gt, a, b = _imgs(0), _imgs(1), _imgs(2)
    out = tmp_path / "sub" / "grid.png"
    img = image_grid(gt, {"ridge": a, "brainguard": b}, path=out, max_rows=4, cell_size=16)
    assert img.size == (3 * (16 + _PAD) + _PAD, _HEADER + 4 * (16 + _PAD) + _PAD)
    arr = np.asarray(img)
    for col, src in enumerate([gt, a, b]):
        for row in range(4):
            x, y = _PAD + col * (16 + _PAD), _HEADER + row * (16 + _PAD)
            np.testing.assert_array_equal(arr[y : y + 16, x : x + 16], src[row])
    # Labels are drawn in the header band.
    assert (arr[:_HEADER] < 200).any()
    assert out.is_file() and np.array_equal(np.asarray(Image.open(out)), arr)
    assert [p.name for p in out.parent.iterdir()] == ["grid.png"]  # no temporary files left


def test_grid_accepts_chw_float_and_resizes_cells():
    gt = _imgs(3, n=2, size=20)
    rec_float = gt.transpose(0, 3, 1, 2) / 255.0
    img = image_grid(gt, {"float CHW": rec_float}, cell_size=40, row_labels=["id 7", "id 9"])
    arr = np.asarray(img)
    left = arr.shape[1] - 2 * (40 + _PAD) - _PAD
    assert left > 0  # room for the row labels
    first = arr[_HEADER : _HEADER + 40, left + _PAD : left + _PAD + 40]
    second = arr[_HEADER : _HEADER + 40, left + 2 * _PAD + 40 : left + 2 * _PAD + 80]
    np.testing.assert_array_equal(first, second)  # float [0,1] CHW == uint8 HWC after conversion


def test_to_uint8_and_bad_input():
    x = np.random.default_rng(4).random((2, 3, 5, 5))
    np.testing.assert_array_equal(to_uint8_hwc(x), np.round(x.transpose(0, 2, 3, 1) * 255).astype(np.uint8))
    with pytest.raises(DataError, match=r"shape \(n, H, W, 3\) or \(n, 3, H, W\)"):
        to_uint8_hwc(np.zeros((2, 5, 5)))
    with pytest.raises(DataError, match="non-finite"):
        to_uint8_hwc(np.full((1, 4, 4, 3), np.nan))
    with pytest.raises(DataError, match="Column 'short' has 1 images; the grid shows 3 rows"):
        image_grid(_imgs(5, n=3), {"short": _imgs(6, n=1)})


def _run(root, name, ds, subject, ids, recs, data=None):
    path = root / name
    path.mkdir(parents=True)
    write_array_atomic(path / "test_ids.npy", np.asarray(ids, dtype=np.int64))
    write_array_atomic(path / "reconstructions.npy", recs)
    write_json_atomic(path / "run.json", {
        "name": name, "decoder": "ridge", "params": {}, "subject": subject, "data": data or ds.spec,
        "data_name": ds.name, "ids_are_nsd": ds.ids_are_nsd, "fingerprint": ds.fingerprint(subject),
        "n_test": len(ids),
    })
    return path


def test_compare_runs_aligns_by_id(small_data, tmp_path):
    ids = small_data.test.ids(1)
    gt = small_data.test.images(1)
    a = _run(tmp_path, "a", small_data, 1, ids, 255 - gt)
    perm = np.random.default_rng(7).permutation(len(ids))
    b = _run(tmp_path, "b", small_data, 1, ids[perm], gt[perm])  # same images as gt, other order
    out = compare_runs([a, b], tmp_path / "cmp.png", max_rows=3, cell_size=32)
    arr = np.asarray(Image.open(out))
    label_w = arr.shape[1] - 3 * (32 + _PAD) - _PAD
    cols = [arr[_HEADER:, label_w + _PAD + c * (32 + _PAD):][:, :32] for c in range(3)]
    for r in range(3):
        y = r * (32 + _PAD)
        np.testing.assert_array_equal(cols[0][y : y + 32], cols[2][y : y + 32])  # run b == ground truth
        np.testing.assert_array_equal(cols[1][y : y + 32], 255 - cols[0][y : y + 32])


def test_compare_runs_errors(small_data, tmp_path):
    ids = small_data.test.ids(1)
    gt = small_data.test.images(1)
    a = _run(tmp_path, "a", small_data, 1, ids[:4], gt[:4])
    c = _run(tmp_path, "c", small_data, 1, ids[4:8], gt[4:8])
    with pytest.raises(BrainreconError, match="share no test image"):
        compare_runs([a, c], tmp_path / "x.png")
    d = _run(tmp_path, "d", small_data, 1, ids[:4], gt[:4], data={**small_data.spec, "seed": 1})
    with pytest.raises(BrainreconError, match="fitted on different data"):
        compare_runs([a, d], tmp_path / "x.png")
