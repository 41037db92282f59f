"""NeuroPictor surface maps: the VC crop against a brute-force OpenCV-formula reference, the
readers for both released layouts, the duplicate rules, and joining the dataset by image id."""

from __future__ import annotations

import json
import math
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from brainrecon.cli import app
from brainrecon.data import load_dataset
from brainrecon.data.surfaces import (
    VCCrop,
    open_surfaces,
    prepare_surfaces,
    resize_bilinear,
    resize_nearest,
    select_samples,
    vc_crop_box,
)
from brainrecon.errors import DataError


# ----------------------------------------------------------------------------- reference
def cv2_linear_reference(img: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """OpenCV INTER_LINEAR written pixel by pixel (half-pixel centres, clamped borders)."""
    h, w = img.shape
    out = np.empty((out_h, out_w))

    def coord(d, n_in, n_out):
        f = (d + 0.5) * n_in / n_out - 0.5
        s = math.floor(f)
        f -= s
        if s < 0:
            s, f = 0, 0.0
        if s >= n_in - 1:
            s, f = n_in - 1, 0.0
        return s, f

    for dy in range(out_h):
        sy, fy = coord(dy, h, out_h)
        sy1 = min(sy + 1, h - 1)
        for dx in range(out_w):
            sx, fx = coord(dx, w, out_w)
            sx1 = min(sx + 1, w - 1)
            out[dy, dx] = ((1 - fy) * ((1 - fx) * img[sy, sx] + fx * img[sy, sx1])
                           + fy * ((1 - fx) * img[sy1, sx] + fx * img[sy1, sx1]))
    return out


def cv2_nearest_reference(img: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    h, w = img.shape
    out = np.empty((out_h, out_w), dtype=img.dtype)
    for dy in range(out_h):
        for dx in range(out_w):
            out[dy, dx] = img[min(int(math.floor(dy * h / out_h)), h - 1), min(int(math.floor(dx * w / out_w)), w - 1)]
    return out


def crop_reference(full_map: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """NeuroPictor's crop recipe (its dataset/dataset.py), written out directly."""
    ys, xs = np.nonzero(mask == 1)
    h, w = mask.shape
    x0, x1 = max(xs.min() - 1, 0), min(xs.max() + 1, w)
    y0, y1 = max(ys.min() - 10, 0), min(ys.max() + 10, h)
    crop = full_map[y0:y1 + 1, x0:x1 + 1].astype(np.float64)
    cmask = cv2_nearest_reference((mask[y0:y1 + 1, x0:x1 + 1] == 1).astype(np.float64), 256, 256)
    out = cv2_linear_reference(crop, 256, 256)
    out[cmask == 0] = 0
    return out


def make_mask(h: int, w: int, rng, top: int, left: int, bh: int, bw: int) -> np.ndarray:
    """Flat-map mask: background 0, cortex -1, an irregular visual-cortex blob of 1s."""
    mask = np.zeros((h, w), dtype=np.int64)
    mask[2:-2, 2:-2] = -1
    yy, xx = np.mgrid[0:bh, 0:bw]
    blob = ((yy - bh / 2) / (bh / 2)) ** 2 + ((xx - bw / 2) / (bw / 2)) ** 2 < 1 + 0.3 * rng.random((bh, bw))
    mask[top:top + bh, left:left + bw][blob] = 1
    return mask


# ----------------------------------------------------------------------------- resize / crop
@pytest.mark.parametrize("shape", [(37, 53), (300, 19), (256, 256), (1, 5)])
def test_resize_matches_opencv_formulas(shape):
    rng = np.random.default_rng(0)
    img = rng.normal(size=shape)
    np.testing.assert_allclose(resize_bilinear(img, 64), cv2_linear_reference(img, 64, 64), rtol=1e-5, atol=1e-5)
    labels = rng.integers(-1, 2, size=shape)
    np.testing.assert_array_equal(resize_nearest(labels, 64), cv2_nearest_reference(labels, 64, 64))
    stack = rng.normal(size=(3,) + shape)
    np.testing.assert_allclose(resize_bilinear(stack, 64)[2], resize_bilinear(stack[2], 64), rtol=1e-6)


@pytest.mark.parametrize("case", ["upsample", "downsample", "touches-edges"])
def test_vc_crop_matches_recipe(case):
    rng = np.random.default_rng(1)
    if case == "upsample":
        mask = make_mask(90, 120, rng, top=30, left=40, bh=30, bw=50)
    elif case == "downsample":
        mask = make_mask(420, 500, rng, top=60, left=100, bh=320, bw=300)
    else:  # the box padding is clipped at the map's borders
        mask = make_mask(80, 100, rng, top=4, left=1, bh=60, bw=99)
    maps = rng.normal(size=(2,) + mask.shape).astype(np.float32)
    crop = VCCrop(mask)
    out = crop(maps)
    assert out.shape == (2, 256, 256) and out.dtype == np.float32
    np.testing.assert_allclose(out[1], crop_reference(maps[1], mask), rtol=1e-5, atol=1e-5)
    assert (out[:, ~crop.resized_mask] == 0).all()
    assert crop.resized_mask.sum() > 0.3 * 256 * 256
    ys, xs = np.nonzero(mask == 1)
    y0, y1, x0, x1 = vc_crop_box(mask)
    assert (y0, x0) == (max(ys.min() - 10, 0), max(xs.min() - 1, 0))
    assert (y1, x1) == (min(ys.max() + 10, mask.shape[0]), min(xs.max() + 1, mask.shape[1]))


def test_vc_crop_errors(tmp_path):
    with pytest.raises(DataError, match=r"no pixel equal to 1 \(1 = visual cortex"):
        VCCrop(np.zeros((10, 10)))
    crop = VCCrop(make_mask(40, 40, np.random.default_rng(0), 10, 10, 15, 15))
    with pytest.raises(DataError, match=r"map has shape \(41, 40\) but the visual-cortex mask has shape \(40, 40\)"):
        crop(np.zeros((41, 40)))
    np.savez(tmp_path / "vc_roi.npz", other=np.zeros(3))
    with pytest.raises(DataError, match=r"vc_roi\.npz has no array 'images'"):
        VCCrop.from_npz(tmp_path / "vc_roi.npz")
    with pytest.raises(DataError, match=r"Visual-cortex mask not found: .*missing\.npz"):
        VCCrop.from_npz(tmp_path / "missing.npz")


# ----------------------------------------------------------------------------- duplicates
def test_select_samples_rules():
    labels = np.array([5, 7, 5, 9, 7, 5, 11, 3, 3])
    ids = np.array([5, 7, 11, 3, 9, 42])
    as_list = lambda groups: [g.tolist() for g in groups]
    assert as_list(select_samples(labels, ids, "train")) == [[5], [4], [6], [8], [3], []]
    assert as_list(select_samples(labels, ids, "test")) == [[0], [1], [6], [7], [3], []]
    assert as_list(select_samples(labels, ids, "test", "last")) == [[5], [4], [6], [8], [3], []]
    assert as_list(select_samples(labels, ids, "train", "first")) == [[0], [1], [6], [7], [3], []]
    assert as_list(select_samples(labels, ids, "train", "mean")) == [[0, 2, 5], [1, 4], [6], [7, 8], [3], []]
    with pytest.raises(DataError, match=r"Unknown duplicates policy 'median'; valid: 'neuropictor', 'first'"):
        select_samples(labels, ids, "train", "median")


# ----------------------------------------------------------------------------- fixtures
LABELS = np.array([5, 7, 5, 9, 7, 5, 11, 3, 3, 13])


def write_per_sample(root: Path, subject: int = 1, labels=LABELS, mask=None) -> Path:
    """NeuroPictor's NSD folder: fmri_npy/{SS}_label.npy and {SS}_norm/surf_XXXXXX.npy."""
    folder = root / "fmri_npy"
    (folder / f"{subject:02d}_norm").mkdir(parents=True)
    np.save(folder / f"{subject:02d}_label.npy", labels)
    for k in range(len(labels)):
        surf = np.full((256, 256), float(k + 1), np.float32)
        surf[0, :] = 0.0  # a zero row, "outside the visual cortex"
        if mask is not None:
            surf[~mask] = 0.0
        np.save(folder / f"{subject:02d}_norm" / f"surf_{k:06d}.npy", surf)
    return root


def write_brainrecon(out: Path, subject: int, train_ids, test_ids, n_voxels: int = 6) -> Path:
    """The layout prepare-nsd writes (manifest + per-split voxels and ids)."""
    d = out / f"subj{subject:02d}"
    d.mkdir(parents=True)
    for split, ids in (("train", train_ids), ("test", test_ids)):
        np.save(d / f"{split}_ids.npy", np.asarray(ids, dtype=np.int64))
        np.save(d / f"{split}_voxels.npy", np.arange(len(ids) * n_voxels, dtype=np.float32).reshape(len(ids), n_voxels))
    (out / "brainrecon-data.json").write_text(json.dumps({
        "format": "brainrecon-data", "version": 1, "name": "t", "subjects": [subject], "ids_are_nsd": True,
        "source": {"kind": "nsd", "sessions": "3", "test_set": 1000, "zscore": "none"}}))
    return out


# ----------------------------------------------------------------------------- join
def test_join_per_sample_maps_by_id(tmp_path):
    src = write_per_sample(tmp_path / "NSD")
    out = write_brainrecon(tmp_path / "data", 1, [11, 5, 7, 13], [3, 9])
    summary = prepare_surfaces(src, 1, out, progress=False)
    assert summary["mode"] == "joined" and summary["reader"] == "per-sample"
    ds = load_dataset(out)
    train, test = ds.train.surfaces(1), ds.test.surfaces(1)
    assert train.shape == (4, 256, 256) and train.dtype == np.float32
    # Sample k holds k + 1; train takes the last sample of an image, test the first.
    np.testing.assert_array_equal(train[:, 5, 5], [7, 6, 5, 10])
    np.testing.assert_array_equal(test[:, 5, 5], [8, 4])
    np.testing.assert_array_equal(ds.train.voxels(1), np.arange(24, dtype=np.float32).reshape(4, 6))  # untouched
    manifest = json.loads((out / "brainrecon-data.json").read_text())
    assert manifest["surfaces"]["1"]["duplicates"] == "neuropictor"
    assert manifest["surfaces"]["1"]["missing"] == {"train": 0, "test": 0}
    with pytest.raises(DataError, match="already has surface maps; pass overwrite=True"):
        prepare_surfaces(src, 1, out, progress=False)
    prepare_surfaces(src, 1, out, duplicates="mean", overwrite=True, progress=False)
    np.testing.assert_allclose(load_dataset(out).train.surfaces(1)[:, 5, 5], [7, (1 + 3 + 6) / 3, (2 + 5) / 2, 10])
    assert not list((out / "subj01").glob(".*"))  # no temporary files left


def test_join_missing_maps(tmp_path):
    src = write_per_sample(tmp_path / "NSD")
    out = write_brainrecon(tmp_path / "data", 1, [11, 5, 42, 43], [3, 9])
    with pytest.raises(DataError, match=r"2 of 4 train images of subject 1 have no surface map .*first ids: \[42, 43\].*"
                                        r"--sessions 37 --test-set 982.*missing='zero'"):
        prepare_surfaces(src, 1, out, progress=False)
    assert not (out / "subj01" / "train_surfaces.npy").exists()
    prepare_surfaces(src, 1, out, missing="zero", progress=False)
    surf = load_dataset(out).train.surfaces(1)
    assert (surf[2:] == 0).all() and surf[0, 5, 5] == 7
    assert json.loads((out / "brainrecon-data.json").read_text())["surfaces"]["1"]["missing"] == {"train": 2, "test": 0}


def test_join_full_brain_h5_with_vc_crop(tmp_path):
    rng = np.random.default_rng(3)
    mask = make_mask(70, 90, rng, top=20, left=25, bh=30, bw=45)
    root = tmp_path / "NSD_full_brain"
    (root / "fmri").mkdir(parents=True)
    np.savez(root / "vc_roi.npz", images=mask[None])
    maps = rng.normal(size=(len(LABELS), 70, 90)).astype(np.float32)
    with h5py.File(root / "fmri" / "01_norm.h5", "w") as f:
        f.create_dataset("images", data=maps)
        f.create_dataset("labels", data=LABELS.astype(np.float64))  # float labels are accepted
    reader = open_surfaces(root, 1)
    assert reader.kind == "full-brain" and reader.labels.tolist() == LABELS.tolist()
    np.testing.assert_allclose(reader.read(4), crop_reference(maps[4], mask), rtol=1e-5, atol=1e-5)
    reader.close()
    out = write_brainrecon(tmp_path / "data", 1, [5, 7], [3])
    prepare_surfaces(root, 1, out, progress=False)
    ds = load_dataset(out)
    crop = VCCrop(mask)
    np.testing.assert_allclose(ds.train.surfaces(1), crop(maps[[5, 4]]), rtol=1e-6)
    np.testing.assert_allclose(ds.test.surfaces(1)[0], crop(maps[7]), rtol=1e-6)
    (root / "vc_roi.npz").unlink()
    with pytest.raises(DataError, match=r"01_norm\.h5 need the visual-cortex mask vc_roi\.npz.*as vc_roi"):
        open_surfaces(root, 1)


# ----------------------------------------------------------------------------- surfaces only
def test_surfaces_only_subject(tmp_path):
    rng = np.random.default_rng(4)
    vc = make_mask(60, 60, rng, top=10, left=10, bh=40, bw=40)
    crop = VCCrop(vc)
    root = write_per_sample(tmp_path / "NSD", mask=crop.resized_mask)
    np.savez(root / "vc_roi.npz", images=vc[None])
    np.save(root / "sub1257_shared_triallabel.npy", np.array([9, 99, 3]))  # 99: not seen by this subject
    img_dir = root / "nsddata_stimuli" / "stimuli" / "images"
    img_dir.mkdir(parents=True)
    pictures = {}
    for i in set(LABELS.tolist()):
        pictures[i] = rng.integers(0, 256, size=(20, 20, 3), dtype=np.uint8)
        Image.fromarray(pictures[i]).save(img_dir / f"image_{i:06d}.png")
    captions = np.array([[f"cap{i}-{j}" for j in range(5)] for i in range(73000)], dtype="<U10")
    np.save(root / "COCO_73k_annots_curated.npy", captions)

    out = tmp_path / "surf-data"
    summary = prepare_surfaces(root, 1, out, progress=False)
    assert summary["mode"] == "surfaces-only"
    ds = load_dataset(out)
    np.testing.assert_array_equal(ds.test.ids(1), [9, 3])  # the test file's order, unseen ids dropped
    np.testing.assert_array_equal(ds.train.ids(1), [5, 7, 11, 13])  # first appearance
    surf = ds.train.surfaces(1)
    np.testing.assert_array_equal(surf[:, 100, 100], [6, 5, 7, 10])
    np.testing.assert_array_equal(ds.train.voxels(1), surf[:, crop.resized_mask])
    assert ds.n_voxels(1) == int(crop.resized_mask.sum())
    np.testing.assert_array_equal(ds.test.images(1)[1], pictures[3])
    np.testing.assert_array_equal(ds.train.captions(1)[2], captions[11])
    manifest = json.loads((out / "brainrecon-data.json").read_text())
    assert manifest["source"]["kind"] == "neuropictor-surfaces" and manifest["ids_are_nsd"]
    with pytest.raises(DataError, match="Subject 1 is already prepared"):
        prepare_surfaces(root, 1, out, progress=False)


def test_surfaces_only_without_vc_mask_uses_nonzero_pixels(tmp_path):
    root = write_per_sample(tmp_path / "NSD")
    np.save(tmp_path / "test_ids.npy", np.array([3]))
    out = tmp_path / "d"
    with pytest.raises(DataError, match=r"the test images must be named: pass test_ids"):
        prepare_surfaces(root, 1, out, progress=False)
    prepare_surfaces(root, 1, out, test_ids=tmp_path / "test_ids.npy", progress=False)
    ds = load_dataset(out)
    assert ds.n_voxels(1) == 255 * 256  # row 0 is zero in every map
    np.testing.assert_array_equal(ds.test.voxels(1), ds.test.surfaces(1)[:, 1:, :].reshape(1, -1))


def test_surfaces_refuses_nsd_directory_without_that_subject(tmp_path):
    root = write_per_sample(tmp_path / "NSD", subject=2)
    out = write_brainrecon(tmp_path / "data", 1, [5], [3])
    with pytest.raises(DataError, match=r"holds NSD-prepared subjects \[1\], not subject 2\. Run `brainrecon prepare-nsd"):
        prepare_surfaces(root, 2, out, progress=False)


def test_surfaces_refuse_brain_diffuser_directory(tmp_path):
    root = write_per_sample(tmp_path / "NSD")
    bd = tmp_path / "processed_data" / "subj01"
    bd.mkdir(parents=True)
    np.save(bd / "nsd_train_fmriavg_nsdgeneral_sub1.npy", np.zeros((2, 3), np.float32))
    with pytest.raises(DataError, match=r"subj01 exists but is not a subject of a brainrecon manifest"):
        prepare_surfaces(root, 1, tmp_path / "processed_data", test_ids=tmp_path / "x.npy", progress=False)
    assert (bd / "nsd_train_fmriavg_nsdgeneral_sub1.npy").is_file()


def test_reader_errors(tmp_path):
    with pytest.raises(DataError, match=r"No surface maps for subject 1 under .*fmri_npy/01_label\.npy"):
        open_surfaces(tmp_path, 1)
    root = write_per_sample(tmp_path / "NSD")
    (root / "fmri_npy" / "01_norm" / "surf_000003.npy").unlink()
    reader = open_surfaces(root, 1)
    with pytest.raises(DataError, match=r"Surface map not found: .*surf_000003\.npy; 10 samples are listed"):
        reader.read(3)
    np.save(root / "fmri_npy" / "01_norm" / "surf_000004.npy", np.zeros((128, 128)))
    with pytest.raises(DataError, match=r"surf_000004\.npy has shape \(128, 128\); expected \(256, 256\)"):
        reader.read(4)
    (root / "fmri_npy" / "01_norm" / "surf_000005.npy").write_bytes(b"\x93NUMPY broken")
    with pytest.raises(DataError, match=r"surf_000005\.npy could not be read .*corrupt"):
        reader.read(5)
    np.save(root / "fmri_npy" / "01_label.npy", np.array([0.5, 2.0]))
    with pytest.raises(DataError, match=r"01_label\.npy: labels must be integer 73k image ids"):
        open_surfaces(root, 1)


def test_cli_prepare_surfaces(tmp_path):
    src = write_per_sample(tmp_path / "NSD")
    out = write_brainrecon(tmp_path / "data", 1, [11, 5], [3])
    runner = CliRunner()
    result = runner.invoke(app, ["prepare-surfaces", "--source", str(src), "--subject", "1", "--out", str(out),
                                 "--duplicates", "first", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "subject 1: 2 train / 1 test surface maps (joined, per-sample maps)" in result.output
    np.testing.assert_array_equal(load_dataset(out).train.surfaces(1)[:, 5, 5], [7, 1])
    bad = runner.invoke(app, ["prepare-surfaces", "--source", str(src), "--subject", "1", "--out", str(out),
                              "--duplicates", "median"])
    assert bad.exit_code == 1 and "Unknown duplicates policy 'median'" in bad.output
