"""prepare-nsd on a miniature NSD release built in tmp_path (real layout and field names).

The release has the real directory layout, file names and field names: NIfTI betas of 750
trials per session on an 8 x 7 x 6 grid, an nsdgeneral mask with -1/0/1 values, a .mat design
with 30,000 trials and an 8 x 10,000 subjectim, a chunked (73000, 425, 425, 3) imgBrick with
only the needed images written, and a (73000, 5) caption array. Outputs are checked against
a direct in-memory computation of Brain-Diffuser's recipe.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest
import scipy.io
from typer.testing import CliRunner

from brainrecon.cli import app
from brainrecon.data import load_dataset
from brainrecon.data import nsd
from brainrecon.data.nsd import prepare as nsd_prepare  # where the preparation looks its helpers up
from brainrecon.data.nsd import plan_trials, prepare_nsd, read_design, resolve_sessions
from brainrecon.errors import DataError

GRID = (8, 7, 6)
T = 750
SESSIONS = {1: 3, 2: 2, 3: 1, 5: 1}  # session files written per subject
POOL_SHARED, POOL_OTHER = 8, 24  # list positions used by the first 3 sessions


def _save_nii(path: Path, data: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)


def build_release(root: Path, seed: int = 0) -> dict:
    """Write a miniature NSD release under ``root``; return what the reference needs."""
    rng = np.random.default_rng(seed)
    shared = rng.choice(np.arange(1, 73001), size=1000, replace=False)
    rest = np.setdiff1d(np.arange(1, 73001), shared)
    subjectim = np.stack([np.concatenate([shared, rng.permutation(rest)[:9000]]) for _ in range(8)]).astype(np.int64)
    pool = np.concatenate([rng.choice(np.arange(1, 1001), POOL_SHARED, replace=False),
                           rng.choice(np.arange(1001, 10001), POOL_OTHER, replace=False)])
    masterordering = rng.choice(pool, size=30000).astype(np.int64)
    design_path = root / nsd.DESIGN_FILE
    design_path.parent.mkdir(parents=True)
    scipy.io.savemat(design_path, {
        "masterordering": masterordering[None, :].astype(np.float64),  # MATLAB doubles, 1 x 30000
        "subjectim": subjectim.astype(np.float64),
        "sharedix": shared[None, :].astype(np.float64),
        "stimpattern": np.zeros((40, 12, 75)),
    })
    masks, betas = {}, {}
    for s, n_sess in SESSIONS.items():
        mask = rng.choice([-1.0, 0.0, 1.0], size=GRID, p=[0.2, 0.3, 0.5]).astype(np.float32)
        grid = (8, 7, 5) if s == 3 else GRID  # subject 3: betas on another grid than the mask
        _save_nii(root / f"nsddata/ppdata/subj{s:02d}/func1pt8mm/roi/nsdgeneral.nii.gz", mask)
        masks[s] = mask
        betas[s] = []
        for n in range(1, n_sess + 1):
            b = rng.integers(-3000, 3000, size=grid + (T,), dtype=np.int16)
            path = root / (f"nsddata_betas/ppdata/subj{s:02d}/func1pt8mm/betas_fithrf_GLMdenoise_RR/"
                           f"betas_session{n:02d}.nii.gz")
            _save_nii(path, b)
            betas[s].append(b)
    # Subject 5: a truncated (corrupt) session file.
    bad = root / "nsddata_betas/ppdata/subj05/func1pt8mm/betas_fithrf_GLMdenoise_RR/betas_session01.nii.gz"
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])

    needed = set()
    for s in (1, 2):
        pos = masterordering[: SESSIONS[s] * T]
        needed |= set((subjectim[s - 1, pos - 1] - 1).tolist())
    images = {}
    stim = root / nsd.STIMULI_FILE
    stim.parent.mkdir(parents=True)
    with h5py.File(stim, "w") as f:
        d = f.create_dataset("imgBrick", shape=(73000, 425, 425, 3), dtype=np.uint8, chunks=(1, 425, 425, 3))
        for i in sorted(needed):
            img = rng.integers(0, 256, size=(425, 425, 3), dtype=np.uint8)
            d[i] = img
            images[i] = img
    captions = np.array([[f"c{i}_{j}" for j in range(5)] for i in range(73000)], dtype="<U8")
    np.save(root / "COCO_73k_annots_curated.npy", captions)
    return {"masterordering": masterordering, "subjectim": subjectim, "masks": masks, "betas": betas,
            "images": images, "captions": captions}


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    root = tmp_path_factory.mktemp("nsd")
    info = build_release(root)
    info["root"] = root
    return info


def reference(info: dict, subject: int, n_sessions: int, zscore: str = "none") -> dict:
    """Brain-Diffuser's recipe, written out directly and in memory."""
    mask = info["masks"][subject] > 0
    rows = []
    for b in info["betas"][subject][:n_sessions]:
        x = b.astype(np.float32)[mask].T  # (750, V)
        if zscore == "session":
            x64 = x.astype(np.float64)
            sd = x64.std(0)
            x = ((x64 - x64.mean(0)) / np.where(sd > 0, sd, 1)).astype(np.float32)
        rows.append(x)
    fmri = np.concatenate(rows)
    train, test = {}, {}
    for j in range(n_sessions * T):
        k = info["masterordering"][j]
        nsd_id = info["subjectim"][subject - 1, k - 1] - 1
        (test if k <= 1000 else train).setdefault(int(nsd_id), []).append(j)
    out = {}
    for split, d in (("train", train), ("test", test)):
        out[f"{split}_ids"] = np.array(list(d), dtype=np.int64)
        out[f"{split}_voxels"] = np.stack([np.mean(fmri[sorted(v)], axis=0) for v in d.values()])
        out[f"{split}_images"] = np.stack([info["images"][i] for i in d])
        out[f"{split}_captions"] = info["captions"][list(d)]
    return out


def _prepare(release, out, subject=1, **kw):
    kw.setdefault("sessions", SESSIONS[subject])
    kw.setdefault("progress", False)
    return prepare_nsd(release["root"], subject, out, **kw)


# ----------------------------------------------------------------------------- plan
def test_plan_trials_matches_direct_loop_for_both_test_sets():
    rng = np.random.default_rng(1)
    subjectim = np.stack([rng.permutation(np.arange(1, 73001))[:10000] for _ in range(8)])
    subjectim[:, :1000] = subjectim[0, :1000]
    mo = rng.integers(1, 10001, size=30000)
    late = np.array([3, 17, 999])  # shared positions shown only in sessions 38-40
    mo[:27750][np.isin(mo[:27750], late)] = 1500
    mo[28000:28003] = late
    design = {"masterordering": mo, "subjectim": subjectim}
    for test_set in (1000, 982):
        plan = plan_trials(design, 2, 40, test_set)
        old_shared = set(mo[:27750][mo[:27750] <= 1000].tolist())
        train, test, dropped, n_dropped_trials = {}, {}, set(), 0
        for j in range(30000):
            k = int(mo[j])
            nsd_id = int(subjectim[1, k - 1] - 1)
            if k > 1000:
                train.setdefault(nsd_id, []).append(j)
            elif test_set == 1000 or k in old_shared:
                test.setdefault(nsd_id, []).append(j)
            else:
                dropped.add(k)
                n_dropped_trials += 1
        np.testing.assert_array_equal(plan.train_ids, list(train))
        np.testing.assert_array_equal(plan.test_ids, list(test))
        for split, d in ((0, train), (1, test)):
            for row, trials in enumerate(d.values()):
                assert (plan.trial_split[trials] == split).all() and (plan.trial_row[trials] == row).all()
        assert plan.n_dropped_shared == len(dropped)
        assert (plan.trial_split == -1).sum() == n_dropped_trials
        if test_set == 1000:
            assert not dropped
        else:
            assert {3, 17, 999} <= dropped


def test_resolve_sessions_defaults_and_limits():
    assert resolve_sessions(1, None, None) == (40, "all", 1000)
    assert resolve_sessions(1, None, 982) == (37, "37-or-fewer", 982)
    assert resolve_sessions(4, None, 982) == (30, "37-or-fewer", 982)
    assert resolve_sessions(3, "all", None) == (32, "all", 1000)
    assert resolve_sessions(7, "12", 1000) == (12, "12", 1000)
    with pytest.raises(DataError, match=r"Subject 4 has 30 NSD sessions.*sessions=31"):
        resolve_sessions(4, 31, None)
    with pytest.raises(DataError, match=r"Unknown test set 900; valid: 982 .* or 1000"):
        resolve_sessions(1, None, 900)
    with pytest.raises(DataError, match=r"Unknown NSD subject 9; valid subjects: 1, 2"):
        resolve_sessions(9, None, None)


# ----------------------------------------------------------------------------- the recipe
@pytest.fixture(scope="module")
def prepared(release, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared") / "nsd-prepared"
    summary = _prepare(release, out, captions=release["root"] / "COCO_73k_annots_curated.npy")
    return out, summary


def test_brainrecon_format_matches_reference_recipe(release, prepared):
    out, summary = prepared
    ref = reference(release, 1, 3)
    ds = load_dataset(out)
    assert ds.subjects == [1] and ds.ids_are_nsd
    for split in ("train", "test"):
        part = getattr(ds, split)
        np.testing.assert_array_equal(part.ids(1), ref[f"{split}_ids"])
        X = np.load(out / "subj01" / f"{split}_voxels.npy")
        assert X.dtype == np.float32
        np.testing.assert_array_equal(X, ref[f"{split}_voxels"])  # bit-identical float32 means
        imgs = part.images(1)
        assert imgs.dtype == np.uint8 and imgs.shape[1:] == (425, 425, 3)
        np.testing.assert_array_equal(imgs, ref[f"{split}_images"])
        np.testing.assert_array_equal(part.captions(1), ref[f"{split}_captions"])
    assert summary["n_train"] == POOL_OTHER and summary["n_test"] == POOL_SHARED
    assert summary["n_voxels"] == int((release["masks"][1] > 0).sum())
    assert summary["peak_memory_mb"] > 0
    manifest = json.loads((out / "brainrecon-data.json").read_text())
    assert manifest["format"] == "brainrecon-data" and manifest["version"] == 1
    assert manifest["subjects"] == [1] and manifest["ids_are_nsd"] is True
    assert manifest["source"]["voxel_units"] == "nsd_raw_x300" and manifest["source"]["sessions"] == "3"
    assert manifest["subject_info"]["1"]["n_sessions"] == 3
    # Nothing temporary is left behind.
    assert sorted(p.name for p in out.iterdir()) == ["brainrecon-data.json", "subj01"]
    assert sorted(p.name for p in (out / "subj01").iterdir()) == sorted(
        f"{s}_{k}.npy" for s in ("train", "test") for k in ("voxels", "ids", "images", "captions"))


def test_keep_repetitions_writes_the_single_trials(release, tmp_path):
    """Single trials in chronological order, each image's trials averaging to its row; raw and z-scored."""
    for zscore in ("none", "session"):
        out = tmp_path / zscore
        _prepare(release, out, zscore=zscore, keep_repetitions=True)
        ref = reference(release, 1, 3, zscore=zscore)
        mask = release["masks"][1] > 0
        fmri = np.concatenate([b.astype(np.float32)[mask].T for b in release["betas"][1][:3]])
        ds = load_dataset(out)
        for split in ("train", "test"):
            part = getattr(ds, split)
            t = part.trials(1)
            X, rows = part.trial_voxels(1)
            assert (np.diff(t.trial) > 0).all()
            if zscore == "none":
                np.testing.assert_array_equal(X, fmri[t.trial])
            for r in range(part.n_images(1)):
                np.testing.assert_allclose(X[rows == r].mean(0), ref[f"{split}_voxels"][r], rtol=1e-5, atol=1e-4)
                reps = t.repetition[rows == r]
                np.testing.assert_array_equal(reps, np.arange(len(reps)))
        manifest = json.loads((out / "brainrecon-data.json").read_text())
        assert manifest["source"]["keep_repetitions"] is True
        assert sorted(p.name for p in out.iterdir()) == ["brainrecon-data.json", "subj01"]
    with pytest.raises(DataError, match="keep_repetitions=True needs format='brainrecon'"):
        _prepare(release, tmp_path / "bd", format="brain-diffuser", keep_repetitions=True)
    # A missing trial file is named.
    (tmp_path / "none" / "subj01" / "test_trials_rows.npy").unlink()
    with pytest.raises(DataError, match="test_trials_rows.npy is missing"):
        load_dataset(tmp_path / "none")


def test_zscore_session_matches_reference(release, tmp_path):
    _prepare(release, tmp_path / "z", zscore="session")
    ref = reference(release, 1, 3, zscore="session")
    for split in ("train", "test"):
        X = np.load(tmp_path / "z" / "subj01" / f"{split}_voxels.npy")
        np.testing.assert_allclose(X, ref[f"{split}_voxels"], rtol=1e-5, atol=1e-5)
    manifest = json.loads((tmp_path / "z" / "brainrecon-data.json").read_text())
    assert manifest["source"]["zscore"] == "session" and manifest["source"]["voxel_units"] == "session_zscore"


def test_brain_diffuser_format_names_shapes_values(release, prepared, tmp_path):
    out = tmp_path / "processed_data"
    _prepare(release, out, format="brain-diffuser", captions=release["root"] / "COCO_73k_annots_curated.npy")
    d = out / "subj01"
    ref = reference(release, 1, 3)
    for split in ("train", "test"):
        n = ref[f"{split}_ids"].size
        vox = np.load(d / f"nsd_{split}_fmriavg_nsdgeneral_sub1.npy")
        stim = np.load(d / f"nsd_{split}_stim_sub1.npy")
        cap = np.load(d / f"nsd_{split}_cap_sub1.npy")
        assert vox.dtype == np.float32 and vox.shape == (n, ref[f"{split}_voxels"].shape[1])
        assert stim.dtype == np.uint8 and stim.shape == (n, 425, 425, 3)
        assert cap.shape == (n, 5)
        np.testing.assert_array_equal(vox, ref[f"{split}_voxels"])
        np.testing.assert_array_equal(stim, ref[f"{split}_images"])
        np.testing.assert_array_equal(cap, ref[f"{split}_captions"])
        np.testing.assert_array_equal(np.load(d / f"nsd_{split}_ids_sub1.npy"), ref[f"{split}_ids"])
    assert not (out / "brainrecon-data.json").exists()
    ds = load_dataset(out)  # detected as Brain-Diffuser's layout by the foundation loader
    np.testing.assert_array_equal(ds.test.voxels(1), ref["test_voxels"])
    with pytest.raises(DataError, match="zscore='session' is only available with format='brainrecon'"):
        _prepare(release, tmp_path / "bdz", format="brain-diffuser", zscore="session")
    # Neither format silently replaces the other's files.
    with pytest.raises(DataError, match=r"subj01 already exists; pass overwrite=True to replace it"):
        _prepare(release, out)
    with pytest.raises(DataError, match=r"processed_data/subj01 already exists; pass overwrite=True"):
        _prepare(release, out, format="brain-diffuser")


def test_second_subject_with_other_options_is_refused(release, tmp_path):
    out = tmp_path / "two"
    _prepare(release, out, subject=1, sessions=2)
    with pytest.raises(DataError, match=r"holds subject\(s\) \[1\] prepared with other options "
                                        r"\(sessions: '2' there, '3' now\)"):
        _prepare(release, out, subject=2, sessions=3)
    with pytest.raises(DataError, match=r"other options \(zscore: 'none' there, 'session' now\)"):
        _prepare(release, out, subject=2, sessions=2, zscore="session")
    assert json.loads((out / "brainrecon-data.json").read_text())["subjects"] == [1]


def test_second_subject_same_options(release, tmp_path):
    out = tmp_path / "two"
    _prepare(release, out, subject=2, sessions=2)
    # Subject 1 with the same request ("2" sessions) joins the manifest.
    _prepare(release, out, subject=1, sessions=2)
    manifest = json.loads((out / "brainrecon-data.json").read_text())
    assert manifest["subjects"] == [1, 2] and set(manifest["subject_info"]) == {"1", "2"}
    ds = load_dataset(out)
    ref1, ref2 = reference(release, 1, 2), reference(release, 2, 2)
    np.testing.assert_array_equal(ds.train.voxels(1), ref1["train_voxels"])
    np.testing.assert_array_equal(ds.train.voxels(2), ref2["train_voxels"])
    # The shared test images are the same ids for both subjects.
    np.testing.assert_array_equal(np.sort(ds.test.ids(1)), np.sort(ds.test.ids(2)))
    with pytest.raises(DataError, match="Subject 1 is already prepared in .*pass overwrite=True"):
        _prepare(release, out, subject=1, sessions=2)
    _prepare(release, out, subject=1, sessions=2, overwrite=True)
    assert json.loads((out / "brainrecon-data.json").read_text())["subjects"] == [1, 2]


# ----------------------------------------------------------------------------- resume
class Interrupt(KeyboardInterrupt):
    pass


def test_resume_after_interruption_during_images(release, tmp_path, monkeypatch):
    out = tmp_path / "resume"
    reads, calls = [], {"n": 0}
    real_read_betas, real_read_image = nsd_prepare.read_session_betas, nsd_prepare._read_image

    def counting_betas(path, *a, **k):
        reads.append(Path(path).name)
        return real_read_betas(path, *a, **k)

    def failing_image(*a):
        calls["n"] += 1
        if calls["n"] == 11:
            raise Interrupt
        return real_read_image(*a)

    monkeypatch.setattr(nsd_prepare, "read_session_betas", counting_betas)
    monkeypatch.setattr(nsd_prepare, "_read_image", failing_image)
    monkeypatch.setattr(nsd_prepare, "IMAGE_CHECKPOINT", 4)
    with pytest.raises(Interrupt):
        _prepare(release, out)
    assert len(reads) == 3
    assert not (out / "subj01").exists() and not (out / "brainrecon-data.json").exists()
    state = json.loads((out / ".prepare-nsd-subj01.partial" / "state.json").read_text())
    assert sorted(state["sessions"]) == ["1", "2", "3"]
    assert state["images"]["train"]["done"] == 8  # the last checkpoint before the 11th image

    def counting_image(*a):
        calls["n"] += 1
        return real_read_image(*a)

    monkeypatch.setattr(nsd_prepare, "_read_image", counting_image)
    calls["n"] = 0
    summary = _prepare(release, out)
    assert len(reads) == 3  # no session read again
    assert calls["n"] == POOL_OTHER + POOL_SHARED - 8  # images restart at the checkpoint
    ref = reference(release, 1, 3)
    ds = load_dataset(out)
    for split in ("train", "test"):
        np.testing.assert_array_equal(getattr(ds, split).voxels(1), ref[f"{split}_voxels"])
        np.testing.assert_array_equal(getattr(ds, split).images(1), ref[f"{split}_images"])
    assert summary["n_train"] == POOL_OTHER
    assert not (out / ".prepare-nsd-subj01.partial").exists()


def test_resume_after_interruption_during_sessions(release, tmp_path, monkeypatch):
    out = tmp_path / "resume2"
    reads = []
    real = nsd_prepare.read_session_betas

    def flaky(path, *a, **k):
        reads.append(Path(path).name)
        if len(reads) == 2:
            raise Interrupt
        return real(path, *a, **k)

    monkeypatch.setattr(nsd_prepare, "read_session_betas", flaky)
    with pytest.raises(Interrupt):
        _prepare(release, out, zscore="session")
    assert reads == ["betas_session01.nii.gz", "betas_session02.nii.gz"]
    _prepare(release, out, zscore="session")
    assert reads[2:] == ["betas_session02.nii.gz", "betas_session03.nii.gz"]
    ref = reference(release, 1, 3, zscore="session")
    np.testing.assert_allclose(np.load(out / "subj01" / "test_voxels.npy"), ref["test_voxels"], rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- errors
def test_error_missing_session_file(release, tmp_path):
    with pytest.raises(DataError, match=r"subject 1, session 4 not found: .*subj01.*betas_session04\.nii\.gz.*"
                                        r"betas_session01\.\.04\.nii\.gz \(4 sessions requested\)"):
        _prepare(release, tmp_path / "o", sessions=4)
    assert not (tmp_path / "o").exists()


def test_error_subject_without_that_session(release, tmp_path):
    with pytest.raises(DataError, match=r"Subject 4 has 30 NSD sessions \(1-30\); sessions=31 .* does not have"):
        prepare_nsd(release["root"], 4, tmp_path / "o", sessions=31, progress=False)


def test_error_mask_beta_shape_mismatch(release, tmp_path):
    with pytest.raises(DataError, match=r"Mask/beta shape mismatch: .*subj03.*betas_session01\.nii\.gz has shape "
                                        r"\(8, 7, 5, 750\) but the ROI mask .*nsdgeneral\.nii\.gz has shape \(8, 7, 6\)"):
        prepare_nsd(release["root"], 3, tmp_path / "o", sessions=1, progress=False)


def test_error_corrupt_betas_file(release, tmp_path):
    with pytest.raises(DataError, match=r"subj05.*betas_session01\.nii\.gz could not be read .*corrupt or truncated\. "
                                        r"Expected a NIfTI volume of shape \(8, 7, 6, 750\)"):
        prepare_nsd(release["root"], 5, tmp_path / "o", sessions=1, progress=False)


def test_error_corrupt_design_and_stimuli(release, tmp_path):
    root = tmp_path / "nsd"
    for part in ("nsddata_betas", "nsddata"):
        shutil.copytree(release["root"] / part, root / part)
    (root / nsd.STIMULI_FILE).parent.mkdir(parents=True)
    (root / nsd.STIMULI_FILE).write_bytes(b"not an hdf5 file at all")
    (root / nsd.DESIGN_FILE).write_bytes(b"MATLAB 5.0 MAT-file garbage" * 3)
    with pytest.raises(DataError, match=r"nsd_expdesign\.mat could not be read as a MATLAB \.mat file .*corrupt"):
        prepare_nsd(root, 1, tmp_path / "o", sessions=1, progress=False)
    shutil.copy(release["root"] / nsd.DESIGN_FILE, root / nsd.DESIGN_FILE)
    with pytest.raises(DataError, match=r"nsd_stimuli\.hdf5 could not be read .*Expected an HDF5 file with dataset 'imgBrick'"):
        prepare_nsd(root, 1, tmp_path / "o", sessions=1, progress=False)
    os.remove(root / nsd.STIMULI_FILE)
    with pytest.raises(DataError, match=r"Stimulus file not found: .*nsd_stimuli\.hdf5"):
        prepare_nsd(root, 1, tmp_path / "o", sessions=1, progress=False)


def test_error_bad_options(release, tmp_path):
    with pytest.raises(DataError, match=r"Unknown zscore mode 'run'; valid: 'none', 'session'"):
        _prepare(release, tmp_path / "o", zscore="run")
    with pytest.raises(DataError, match=r"Unknown format 'mindeye'; valid: 'brainrecon', 'brain-diffuser'"):
        _prepare(release, tmp_path / "o", format="mindeye")
    with pytest.raises(DataError, match=r"Captions file not found: .*nope\.npy"):
        _prepare(release, tmp_path / "o", captions=tmp_path / "nope.npy")


def test_read_design_fields(release, tmp_path):
    design = read_design(release["root"] / nsd.DESIGN_FILE)
    np.testing.assert_array_equal(design["masterordering"], release["masterordering"])
    assert design["subjectim"].shape == (8, 10000) and design["sharedix"].shape == (1000,)
    bad = tmp_path / "d.mat"
    scipy.io.savemat(bad, {"subjectim": np.ones((8, 10))})
    with pytest.raises(DataError, match=r"d\.mat has no field 'masterordering'"):
        read_design(bad)


# ----------------------------------------------------------------------------- surfaces join, CLI
def test_surfaces_join_prepared_subject_and_overwrite_drops_them(release, tmp_path):
    from brainrecon.data.surfaces import prepare_surfaces

    out = tmp_path / "withsurf"
    _prepare(release, out)
    ref = reference(release, 1, 3)
    ids = np.concatenate([ref["train_ids"], ref["test_ids"]])
    folder = tmp_path / "NSD" / "fmri_npy"
    (folder / "01_norm").mkdir(parents=True)
    labels = np.concatenate([ids, ids[::-1]])  # every image twice
    np.save(folder / "01_label.npy", labels)
    for k, label in enumerate(labels):
        np.save(folder / "01_norm" / f"surf_{k:06d}.npy", np.full((256, 256), k + label / 1e5, np.float32))
    prepare_surfaces(tmp_path / "NSD", 1, out, progress=False)
    ds = load_dataset(out)
    surf = ds.train.surfaces(1)
    assert surf.shape == (len(ref["train_ids"]), 256, 256)
    # Train: the last sample of each image; test: the first.
    last = {int(l): k for k, l in enumerate(labels)}
    first = {int(l): k for k, l in reversed(list(enumerate(labels)))}
    np.testing.assert_allclose(surf[:, 0, 0], [last[i] + i / 1e5 for i in ref["train_ids"]], rtol=1e-6)
    np.testing.assert_allclose(ds.test.surfaces(1)[:, 5, 5], [first[i] + i / 1e5 for i in ref["test_ids"]], rtol=1e-6)
    assert json.loads((out / "brainrecon-data.json").read_text())["surfaces"]["1"]["duplicates"] == "neuropictor"
    _prepare(release, out, overwrite=True)
    assert load_dataset(out).train.surfaces(1) is None
    assert "1" not in json.loads((out / "brainrecon-data.json").read_text()).get("surfaces", {})


def test_cli_prepare_nsd(release, tmp_path):
    runner = CliRunner()
    out = tmp_path / "cli"
    result = runner.invoke(app, ["prepare-nsd", "--nsd-root", str(release["root"]), "--subject", "1",
                                 "--sessions", "3", "--out", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert f"subject 1: {POOL_OTHER} train / {POOL_SHARED} test images" in result.output
    assert "peak memory (process max RSS):" in result.output
    ds = load_dataset(out)
    np.testing.assert_array_equal(ds.test.ids(1), reference(release, 1, 3)["test_ids"])
    bad = runner.invoke(app, ["prepare-nsd", "--nsd-root", str(release["root"]), "--subject", "4",
                              "--sessions", "31", "--out", str(tmp_path / "x")])
    assert bad.exit_code == 1
    assert "Subject 4 has 30 NSD sessions" in bad.output


def test_ncsnr_threshold_keeps_the_voxels_above_it(release, prepared, tmp_path):
    root = release["root"]
    rng = np.random.default_rng(7)
    ncsnr = rng.uniform(0, 1, GRID).astype(np.float32)
    _save_nii(root / "nsddata_betas/ppdata/subj01/func1pt8mm/betas_fithrf_GLMdenoise_RR/ncsnr.nii.gz", ncsnr)
    out = tmp_path / "ncsnr"
    summary = _prepare(release, out, ncsnr_threshold=0.4)
    roi = release["masks"][1] > 0
    keep = roi & (ncsnr > 0.4)
    assert summary["n_voxels"] == int(keep.sum()) < int(roi.sum())
    full_dir, _ = prepared
    columns = (ncsnr > 0.4)[roi]  # the kept voxels, in the ROI's C order
    for split in ("train", "test"):
        full = np.load(full_dir / "subj01" / f"{split}_voxels.npy")
        np.testing.assert_array_equal(np.load(out / "subj01" / f"{split}_voxels.npy"), full[:, columns])
    manifest = json.loads((out / "brainrecon-data.json").read_text())
    assert manifest["source"]["ncsnr_threshold"] == 0.4
    assert load_dataset(out).fingerprint(1) != load_dataset(full_dir).fingerprint(1)
    with pytest.raises(DataError, match="choose a lower ncsnr_threshold"):
        _prepare(release, tmp_path / "none", ncsnr_threshold=5.0)
    (root / "nsddata_betas/ppdata/subj01/func1pt8mm/betas_fithrf_GLMdenoise_RR/ncsnr.nii.gz").unlink()
    with pytest.raises(DataError, match="ncsnr map not found"):
        _prepare(release, tmp_path / "missing", ncsnr_threshold=0.4)

