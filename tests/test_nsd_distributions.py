"""MindEye1 webdataset and MindEye2 HDF5 readers on miniature files in the published layouts,
single trials vs averages, the validation split, and bad input."""

from __future__ import annotations

import shutil
import tarfile

import h5py
import numpy as np
import pytest

from brainrecon.data import load_dataset
from brainrecon.data.miniature import write_mindeye1, write_mindeye2
from brainrecon.errors import DataError


@pytest.fixture(scope="module")
def me1(tmp_path_factory):
    root = tmp_path_factory.mktemp("me1")
    return write_mindeye1(root / "tar", subjects=(1, 2)), write_mindeye1(root / "dir", subjects=(1, 2),
                                                                         layout="folders")


@pytest.fixture(scope="module")
def me2(tmp_path_factory):
    return write_mindeye2(tmp_path_factory.mktemp("me2"), subjects=(1,), image_size=32, old_test_sessions=1)


def test_published_names(me1, me2):
    tar_root, dir_root = me1
    assert (tar_root / "train" / "train_subj01_0.tar").exists() and (tar_root / "val" / "val_subj01_0.tar").exists()
    assert (tar_root / "test" / "test_subj01_1.tar").exists() and (tar_root / "metadata_subj01.json").exists()
    with tarfile.open(tar_root / "train" / "train_subj01_0.tar") as tf:
        names = tf.getnames()
    assert {n.split(".", 1)[1] for n in names} == {"nsdgeneral.npy", "jpg", "coco73k.npy", "trial.npy",
                                                    "num_uniques.npy"}
    assert names[0].startswith("sample000000000.")
    assert (dir_root / "train" / "train_subj01" / "sample000000000.nsdgeneral.npy").exists()
    assert (dir_root / "test" / "subj01").is_dir()
    with h5py.File(me2 / "betas_all_subj01_fp32_renorm.hdf5") as f:
        assert f["betas"].ndim == 2 and f["betas"].dtype == np.float32
    with h5py.File(me2 / "coco_images_224_float16.hdf5") as f:
        assert f["images"].dtype == np.float16 and f["images"].shape[1] == 3
    assert (me2 / "wds" / "subj01" / "new_test" / "0.tar").exists()
    assert (me2 / "wds" / "subj01" / "train" / "2.tar").exists()


def test_mindeye1_shards_and_extracted_folders_agree(me1):
    a, b = (load_dataset(str(r)) for r in me1)
    assert a.spec["kind"] == b.spec["kind"] == "mindeye1" and a.spec["layout"] == "tar"
    assert b.spec["layout"] == "folders" and a.ids_are_nsd
    for s in (1, 2):
        for split in ("train", "test"):
            x, y = getattr(a, split), getattr(b, split)
            np.testing.assert_array_equal(x.ids(s), y.ids(s))
            np.testing.assert_array_equal(x.voxels(s), y.voxels(s))
            np.testing.assert_array_equal(x.images(s, [0, 3]), y.images(s, [0, 3]))
        np.testing.assert_array_equal(a.train.validation_rows(s), b.train.validation_rows(s))
        assert a.fingerprint(s) != b.fingerprint(s) or a.spec["layout"] != b.spec["layout"]


def test_mindeye1_duplicates_dropped_and_val_is_validation(me1):
    ds = load_dataset(str(me1[0]), subjects=[1])
    ids = ds.train.ids(1)
    assert len(np.unique(ids)) == len(ids) == 36  # 30 train + 6 val images; 4 duplicated samples dropped
    assert ds.source_report["1"]["duplicates_dropped"] == 4
    assert ds.validation_origin[1] == "source" and len(ds.validation.ids(1)) == 6
    # The val shard's images, and no test image.
    assert not np.isin(ds.validation.ids(1), ds.test.ids(1)).any()
    assert np.isin(ds.validation.ids(1), ids[-6:]).all()


def test_single_trials_average_to_the_averages(me1, me2):
    for ds in (load_dataset(str(me1[0]), subjects=[1]), load_dataset(str(me2))):
        for split in (ds.train, ds.test, ds.validation):
            t = split.trials(1)
            X, rows = split.trial_voxels(1)
            avg = split.voxels(1)
            for r in range(split.n_images(1)):
                np.testing.assert_allclose(X[rows == r].mean(axis=0), avg[r], rtol=1e-5, atol=1e-5)
            assert set(t.repetition.tolist()) <= {0, 1, 2}
            # The released stack's mean is the average too (MedARC's padding of 1- and 2-trial images).
            np.testing.assert_allclose(split.trial_stack(1).mean(axis=1), avg, rtol=1e-5, atol=1e-5)


def test_mindeye1_stack_is_the_stored_stack(me1):
    """trial_stack gives back the (3, V) arrays MindEye1 stores, padding included."""
    ds = load_dataset(str(me1[1]), subjects=[1])
    folder = me1[1] / "test" / "subj01"
    stack = ds.test.trial_stack(1)
    for row, nsd_id in enumerate(ds.test.ids(1)):
        for f in folder.glob("*.coco73k.npy"):
            if int(np.load(f)[0]) == nsd_id:
                stored = np.load(str(f).replace("coco73k", "nsdgeneral")).astype(np.float32)
                np.testing.assert_allclose(stack[row], stored, rtol=1e-3, atol=1e-3)


def test_mindeye2_lazy_and_test_sets(me2):
    ds = load_dataset(str(me2))
    assert ds.spec["test_set"] == "1000" and ds.validation_origin[1] == "holdout"
    ids = ds.test.ids(1)
    np.testing.assert_array_equal(ids, np.sort(ids))  # MindEye2 evaluates in ascending 73k id
    assert ds.test.images(1, [0]).dtype == np.uint8 and ds.test.images(1, [0]).shape == (1, 32, 32, 3)
    old = load_dataset(f"{me2}::test_set=982")
    assert len(old.test.ids(1)) <= len(ids) and np.isin(old.test.ids(1), ids).all()
    assert old.fingerprint(1) != ds.fingerprint(1)
    # The betas rows are read from the HDF5 on demand, not loaded at open.
    assert type(ds.train.trials(1).voxels).__name__ == "_H5Rows"
    t = ds.train.trials(1)
    assert (np.diff(t.trial) > 0).all() and t.trial.min() >= 0
    with pytest.raises(DataError, match="test_set"):
        load_dataset(f"{me2}::test_set=999")


def test_holdout_validation_is_seeded_and_fingerprinted(me2):
    a, b = load_dataset(str(me2)), load_dataset(f"{me2}::validation_seed=3")
    assert not np.array_equal(a.validation.ids(1), b.validation.ids(1))
    assert a.fingerprint(1) != b.fingerprint(1)
    np.testing.assert_array_equal(a.validation.ids(1), load_dataset(str(me2)).validation.ids(1))
    assert not np.isin(a.validation.ids(1), a.test.ids(1)).any()
    c = load_dataset(f"{me2}::validation_fraction=0.2")
    assert len(c.validation.ids(1)) == 6


def test_data_info_cli(me1):
    from typer.testing import CliRunner

    from brainrecon.cli import app

    result = CliRunner().invoke(app, ["data", "info", "--data", str(me1[0])])
    assert result.exit_code == 0, result.output
    out = " ".join(result.output.split())
    assert "mindeye1" in out and "session-wise z-score" in out
    assert "validation: 6 training images (the source's validation split)" in out
    assert "train: 36 images; 91 single trials" in out and "duplicates dropped: 4" in out
    assert "test: 10 images; 27 single trials" in out


# ------------------------------------------------------------------ data verify
def _as_arrays_file(ds, subject, path, *, shuffle_test=False, drop_voxel=False):
    with h5py.File(path, "w") as f:
        f.attrs["ids_are_nsd"] = True
        g = f.create_group(f"subj{subject:02d}")
        for split in ("train", "test"):
            sp = getattr(ds, split)
            order = np.arange(sp.n_images(subject))
            if shuffle_test and split == "test":
                order = np.random.default_rng(0).permutation(order)
            vox = sp.voxels(subject)[order]
            g[f"{split}_voxels"] = vox[:, :-1] if drop_voxel else vox
            g[f"{split}_ids"] = sp.ids(subject)[order]
            g[f"{split}_images"] = sp.images(subject)[order]
    return path


def test_verify_consistent_and_planted_mismatches(me1, tmp_path):
    from brainrecon.data.verify import verify_sources

    a, b = (load_dataset(str(r), subjects=[1]) for r in me1)
    report = verify_sources(a, b, 1)
    assert report.ok, report.text()
    same = load_dataset(str(_as_arrays_file(a, 1, tmp_path / "same.h5")))
    assert verify_sources(a, same, 1).ok
    shuffled = load_dataset(str(_as_arrays_file(a, 1, tmp_path / "shuffled.h5", shuffle_test=True)))
    rep = verify_sources(a, shuffled, 1)
    assert not rep.ok and "[MISMATCH] test order" in rep.text() and "[ok] test images" in rep.text()
    dropped = load_dataset(str(_as_arrays_file(a, 1, tmp_path / "dropped.h5", drop_voxel=True)))
    rep = verify_sources(a, dropped, 1)
    assert "[MISMATCH] voxels: 40 vs 39 voxels" in rep.text() and not rep.ok


def test_verify_cli(me1, tmp_path):
    from typer.testing import CliRunner

    from brainrecon.cli import app

    ok = CliRunner().invoke(app, ["data", "verify", str(me1[0]), str(me1[1]), "--subject", "1"])
    assert ok.exit_code == 0, ok.output
    assert "verdict: consistent" in ok.output
    a = load_dataset(str(me1[0]), subjects=[1])
    bad = _as_arrays_file(a, 1, tmp_path / "shuffled.h5", shuffle_test=True)
    res = CliRunner().invoke(app, ["data", "verify", str(me1[0]), str(bad), "--subject", "1"])
    assert res.exit_code == 2 and "MISMATCH" in res.output


# ------------------------------------------------------------------ bad input
def _copy(src, tmp_path):
    dst = tmp_path / src.name
    shutil.copytree(src, dst)
    return dst


def test_missing_shard(me1, tmp_path):
    root = _copy(me1[0], tmp_path)
    (root / "train" / "train_subj01_0.tar").unlink()
    with pytest.raises(DataError, match=r"train_subj01_0\.tar missing"):
        load_dataset(str(root), subjects=[1])


def test_truncated_shard(me1, tmp_path):
    root = _copy(me1[0], tmp_path)
    shard = root / "test" / "test_subj01_1.tar"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"test_subj01_1\.tar.*(truncated|damaged)"):
        load_dataset(str(root), subjects=[1]).test.voxels(1)


def test_sample_missing_a_key(me1, tmp_path):
    root = _copy(me1[1], tmp_path)
    (root / "train" / "train_subj01" / "sample000000003.coco73k.npy").unlink()
    with pytest.raises(DataError, match=r"sample000000003 has no sample000000003\.coco73k\.npy"):
        load_dataset(str(root), subjects=[1])


def test_both_variants_ask_which(me1, tmp_path):
    shutil.copytree(me1[0], tmp_path / "webdataset_avg_split")
    shutil.copytree(me1[0], tmp_path / "webdataset_avg_new")
    with pytest.raises(DataError, match="webdataset_avg_split and webdataset_avg_new|webdataset_avg_new and"):
        load_dataset(str(tmp_path))
    assert load_dataset(str(tmp_path / "webdataset_avg_new"), subjects=[1]).spec["variant"] == "webdataset_avg_new"


def test_betas_row_out_of_range(me2, tmp_path):
    root = _copy(me2, tmp_path)
    f = root / "betas_all_subj01_fp32_renorm.hdf5"
    with h5py.File(f, "r") as h:
        betas = h["betas"][:100]
    f.unlink()
    with h5py.File(f, "w") as h:
        h["betas"] = betas
    with pytest.raises(DataError, match="outside betas_all_subj01_fp32_renorm.hdf5's 100 rows"):
        load_dataset(str(root))


def test_subject_mismatch_between_files(me2, tmp_path):
    root = _copy(me2, tmp_path)
    shutil.copytree(root / "wds" / "subj01", root / "wds" / "subj02")
    shutil.copy(root / "betas_all_subj01_fp32_renorm.hdf5", root / "betas_all_subj02_fp32_renorm.hdf5")
    with pytest.raises(DataError, match="trial of subject 1, but it sits in subject 2's folder"):
        load_dataset(str(root), subjects=[2])


def test_hdf5_of_the_wrong_shape(me2, tmp_path):
    root = _copy(me2, tmp_path)
    f = root / "betas_all_subj01_fp32_renorm.hdf5"
    f.unlink()
    with h5py.File(f, "w") as h:
        h["betas"] = np.zeros((10, 4, 5), dtype=np.float32)
    with pytest.raises(DataError, match=r"dataset 'betas' is float32 of shape \(10, 4, 5\), expected float"):
        load_dataset(str(root))
    f.write_bytes(b"not hdf5")
    with pytest.raises(DataError, match="could not be opened as HDF5"):
        load_dataset(str(root))


# ------------------------------------------------------------------ decoders on the new sources
def _heldout_correlation(pred, truth):
    p, t = pred.reshape(len(pred), -1), truth.reshape(len(truth), -1)
    return float(np.mean([np.corrcoef(a, b)[0, 1] for a, b in zip(p, t)]))


@pytest.mark.parametrize("trials", ["average", "single"])
@pytest.mark.parametrize("source", ["me1", "me2"])
def test_ridge_fits_end_to_end(source, trials, request, tmp_path):
    import warnings

    from brainrecon.decoders import load_decoder
    from brainrecon.decoders.ridge import RidgeDecoder
    from brainrecon.targets import get_target

    root = request.getfixturevalue(source)
    root = root[0] if source == "me1" else root
    ds = load_dataset(str(root), subjects=[1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        decoder = RidgeDecoder(target_options={"size": 4}, trials=trials, device="numpy").fit(ds.train)
    truth = get_target("pixels", size=4).load(ds.test, 1, progress=False)
    pred = decoder.predict(ds.test)[1]
    assert pred.shape == truth.shape
    assert _heldout_correlation(pred, truth) > 0.3
    assert _heldout_correlation(pred, truth) > _heldout_correlation(pred, np.roll(truth, 1, axis=0)) + 0.1
    decoder.save(tmp_path / "ridge")
    assert load_decoder(tmp_path / "ridge").get_params()["trials"] == trials  # the choice is recorded


def test_ridge_single_uses_every_trial(me2):
    from brainrecon.decoders.ridge import RidgeDecoder

    ds = load_dataset(str(me2))
    avg = RidgeDecoder(target_options={"size": 4}, device="numpy", alphas=[1.0]).fit(ds.train)
    single = RidgeDecoder(target_options={"size": 4}, device="numpy", alphas=[1.0], trials="single").fit(ds.train)
    X, _ = ds.train.trial_voxels(1)
    np.testing.assert_allclose(single.x_mean_, X.mean(axis=0), rtol=1e-4, atol=1e-5)
    assert not np.allclose(single.coef_, avg.coef_)
    with pytest.raises(DataError, match="Unknown trials"):
        RidgeDecoder(trials="both").fit(ds.train)


def test_brainguard_fits_on_mindeye2(me2):
    from brainrecon.decoders.brainguard import BrainGuardDecoder

    ds = load_dataset(str(me2))
    decoder = BrainGuardDecoder(hidden=16, n_blocks=1, sync_layers=1, rounds=2, batch_size=8, device="cpu", progress=False,
                                target_options={"size": 4}, dfl_num_pre_loss=2, trials="single",
                                validation="dataset").fit(ds.train)
    assert decoder.federation_["n_train"] == {"1": ds.train.n_images(1) - len(ds.validation.ids(1))}
    assert decoder.predict(ds.test)[1].shape == (ds.test.n_images(1), 4, 4, 3)
