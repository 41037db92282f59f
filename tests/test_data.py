import h5py
import numpy as np
import pytest

from brainrecon.data import dataset_from_spec, from_arrays, load_dataset
from brainrecon.data.synthetic import make_synthetic, render_image
from brainrecon.errors import DataError


def test_synthetic_is_deterministic_and_shaped_like_nsd(small_data):
    again = make_synthetic(seed=0, n_train=120, n_test=12, image_size=32, surface_size=32)
    assert small_data.subjects == [1, 2, 5, 7]
    counts = [small_data.n_voxels(s) for s in small_data.subjects]
    assert len(set(counts)) == 4 and all(1000 <= c <= 1600 for c in counts)
    for s in small_data.subjects:
        np.testing.assert_array_equal(small_data.train.voxels(s), again.train.voxels(s))
        # one shared test set, distinct training images per subject
        np.testing.assert_array_equal(small_data.test.ids(s), np.arange(12))
    train_sets = [set(small_data.train.ids(s)) for s in small_data.subjects]
    assert all(not (a & b) for i, a in enumerate(train_sets) for b in train_sets[i + 1:])
    assert small_data.fingerprint(1) == again.fingerprint(1)
    assert small_data.fingerprint(1) != small_data.fingerprint(2)
    other_seed = make_synthetic(seed=1, n_train=120, n_test=12, image_size=32, surface_size=32)
    assert other_seed.fingerprint(1) != small_data.fingerprint(1)


def test_synthetic_image_depends_only_on_id_and_seed():
    a, attrs = render_image(5, seed=0, size=32)
    b, _ = render_image(5, seed=0, size=32)
    c, _ = render_image(6, seed=0, size=32)
    assert a.dtype == np.uint8 and a.shape == (32, 32, 3)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert attrs["shapes"]


def test_synthetic_responses_carry_image_information(small_data):
    # Voxels of two subjects viewing the same test images are correlated across images
    # (shared structure), and repeated images give identical rows.
    X1 = small_data.test.voxels(1)
    X2 = small_data.test.voxels(2)
    z1 = (X1 - X1.mean(0)) / X1.std(0)
    z2 = (X2 - X2.mean(0)) / X2.std(0)
    # similarity structure between images agrees across subjects
    s1 = np.corrcoef(z1)[np.triu_indices(12, 1)]
    s2 = np.corrcoef(z2)[np.triu_indices(12, 1)]
    assert np.corrcoef(s1, s2)[0, 1] > 0.5


def test_surfaces_are_2d_maps_of_the_voxels(small_data):
    surf = small_data.train.surfaces(1)
    assert surf.shape == (120, 32, 32) and surf.dtype == np.float32
    assert np.isfinite(surf).all() and surf.std() > 0
    # pixels outside the sampled cortex are exactly zero and the same for every image
    zero = (surf == 0).all(axis=0)
    assert np.array_equal(zero, (small_data.test.surfaces(1) == 0).all(axis=0))


def test_lazy_images_with_index(small_data):
    imgs = small_data.train.images(1)
    picked = small_data.train.images(1, np.array([5, 2, 2]))
    np.testing.assert_array_equal(picked, imgs[[5, 2, 2]])
    batches = list(small_data.train.iter_images(1, batch_size=50))
    assert [b[0] for b in batches] == [0, 50, 100]


def test_captions_present(small_data):
    caps = small_data.train.captions(1)
    assert caps.shape == (120, 2) and all(isinstance(c, str) and c for c in caps[:, 0])


def test_nan_policy(small_data):
    X = small_data.train.voxels(1).copy()
    X[3, 7] = np.nan
    X[4, 1] = np.inf
    ds = from_arrays({1: {"train_voxels": X, "test_voxels": small_data.test.voxels(1)}})
    with pytest.raises(DataError, match=r"Subject 1 \(train split\): 2 voxel values are NaN or infinite.*nan_policy='zero'"):
        ds.train.voxels(1)
    fixed = ds.train.voxels(1, nan_policy="zero")
    assert fixed[3, 7] == 0 and fixed[4, 1] == 0
    with pytest.raises(DataError, match="Unknown nan_policy"):
        ds.train.voxels(1, nan_policy="drop")


def test_empty_and_mismatched_splits():
    X = np.zeros((10, 5), np.float32)
    with pytest.raises(DataError, match="test split is empty"):
        from_arrays({1: {"train_voxels": X, "test_voxels": X[:0]}})
    with pytest.raises(DataError, match="train has 5 voxels but test has 4"):
        from_arrays({1: {"train_voxels": X, "test_voxels": X[:, :4]}})
    with pytest.raises(DataError, match="10 voxel rows but 9 images"):
        from_arrays({1: {"train_voxels": X, "test_voxels": X,
                         "train_images": np.zeros((9, 4, 4, 3), np.uint8)}})


def test_precedence_explicit_env_default(tmp_path, monkeypatch):
    ds = load_dataset("synthetic:n_train=20,n_test=4,image_size=32,surface_size=16")
    assert ds.spec["n_train"] == 20
    monkeypatch.setenv("BRAINRECON_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match=r"Places tried, in order: \$BRAINRECON_DATA: .*nowhere"):
        load_dataset()
    with pytest.raises(DataError, match=r"explicit argument: .*missing"):
        load_dataset(tmp_path / "missing")
    monkeypatch.delenv("BRAINRECON_DATA")
    assert load_dataset(n_train=20, n_test=4, image_size=32, surface_size=16).spec["kind"] == "synthetic"
    with pytest.raises(DataError, match="Bad synthetic data option"):
        load_dataset("synthetic:colour=red")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no recognised data layout"):
        load_dataset(tmp_path / "empty")


def _write_brain_diffuser(root, subject, n_train=6, n_test=3, n_vox=9):
    d = root / "processed_data" / f"subj{subject:02d}"
    d.mkdir(parents=True)
    rng = np.random.default_rng(subject)
    arrays = {}
    for split, n in (("train", n_train), ("test", n_test)):
        arrays[split] = {
            "fmri": rng.normal(size=(n, n_vox)),
            "stim": rng.uniform(0, 255, size=(n, 8, 8, 3)),
            "cap": np.array([[f"{split} {i} caption {k}" for k in range(5)] for i in range(n)]),
        }
        np.save(d / f"nsd_{split}_fmriavg_nsdgeneral_sub{subject}.npy", arrays[split]["fmri"])
        np.save(d / f"nsd_{split}_stim_sub{subject}.npy", arrays[split]["stim"])
        np.save(d / f"nsd_{split}_cap_sub{subject}.npy", arrays[split]["cap"])
    return arrays


def test_brain_diffuser_loader(tmp_path):
    a1 = _write_brain_diffuser(tmp_path, 1)
    _write_brain_diffuser(tmp_path, 2, n_vox=7)
    ds = load_dataset(tmp_path)
    assert ds.subjects == [1, 2] and ds.spec["kind"] == "brain-diffuser"
    assert isinstance(ds.train.dataset.subjects_data[1]["train"].voxels, np.memmap)
    np.testing.assert_allclose(ds.train.voxels(1), a1["train"]["fmri"].astype(np.float32))
    np.testing.assert_array_equal(ds.test.images(1), np.clip(np.rint(a1["test"]["stim"]), 0, 255).astype(np.uint8))
    assert ds.test.captions(1)[2, 4] == "test 2 caption 4"
    np.testing.assert_array_equal(ds.test.ids(1), ds.test.ids(2))
    assert ds.n_voxels(2) == 7
    again = dataset_from_spec(ds.select([2]).spec)
    assert again.subjects == [2] and again.fingerprint(2) == ds.fingerprint(2)
    with pytest.raises(DataError, match=r"subject\(s\) \[5\] not found.*Subjects present: \[1, 2\]"):
        load_dataset(tmp_path, subjects=[5])


def test_h5_arrays_loader(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "data.h5"
    with h5py.File(path, "w") as f:
        g = f.create_group("subj03")
        g["train_voxels"] = rng.normal(size=(5, 4)).astype(np.float32)
        g["test_voxels"] = rng.normal(size=(2, 4)).astype(np.float32)
        g["train_images"] = rng.integers(0, 255, size=(5, 4, 4, 3), dtype=np.uint8)
        g["test_images"] = rng.integers(0, 255, size=(2, 4, 4, 3), dtype=np.uint8)
        g["test_ids"] = np.array([11, 12])
        f.attrs["ids_are_nsd"] = True
    ds = load_dataset(path)
    assert ds.subjects == [3] and ds.ids_are_nsd
    np.testing.assert_array_equal(ds.test.ids(3), [11, 12])
    assert ds.test.images(3, np.array([1, 0])).shape == (2, 4, 4, 3)
    assert ds.fingerprint(3) == dataset_from_spec(ds.spec).fingerprint(3)


def test_select_and_unknown_subject(small_data):
    one = small_data.select([5])
    assert one.subjects == [5] and one.fingerprint(5) == small_data.fingerprint(5)
    with pytest.raises(DataError, match=r"Subject 3 is not in this dataset.*\[1, 2, 5, 7\]"):
        small_data.train.voxels(3)


@pytest.mark.numerics
def test_a_subject_is_the_same_whichever_subjects_are_loaded(small_data):
    """Bit for bit, in any order and beside any other subjects; the fingerprint too."""
    for subjects in ((5,), (7, 5), (5, 1, 2), (1, 2, 3, 4, 5, 6, 7, 8)):
        other = make_synthetic(seed=0, subjects=subjects, n_train=120, n_test=12, image_size=32, surface_size=32)
        for split in ("train", "test"):
            part, mine = getattr(other, split), getattr(small_data, split)
            np.testing.assert_array_equal(part.voxels(5), mine.voxels(5))
            np.testing.assert_array_equal(part.ids(5), mine.ids(5))
            np.testing.assert_array_equal(part.images(5), mine.images(5))
            np.testing.assert_array_equal(part.surfaces(5), mine.surfaces(5))
        assert other.fingerprint(5) == small_data.fingerprint(5)


def test_the_encoding_model_sees_each_block_of_images_alone():
    """Why the data cannot depend on the other subjects on any machine: the shapes of every
    matrix product are those of one block (the shared test set, or one subject's training
    images), whoever else is generated. A product over all images at once let a BLAS round a
    subject's rows differently with other subjects beside it (2.9e-6 seen on another CPU)."""
    from brainrecon.data import synthetic

    def shapes_for(subjects):
        seen = []
        real = synthetic._EncodingModel.unit_parts

        def recording(self, images, attrs):
            seen.append(images.shape)
            return real(self, images, attrs)

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(synthetic._EncodingModel, "unit_parts", recording)
            synthetic.make_synthetic(seed=3, subjects=subjects, n_train=20, n_test=6, image_size=32, surface_size=16)
        return seen

    assert shapes_for((5,)) == [(6, 32, 32, 3), (20, 32, 32, 3)]
    assert shapes_for((1, 2, 5)) == [(6, 32, 32, 3)] + [(20, 32, 32, 3)] * 3
