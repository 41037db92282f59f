"""Miniature MindEye1 / MindEye2 downloads in the exact published layouts (file, member and
dataset names), with planted structure: for tests, the streaming benchmark and users who want to
try the readers without downloading gigabytes.

Voxels are ``signal(image) + noise(trial)`` so that a decoder can learn from them, and every
number is a function of ``seed``. The layouts are those of :mod:`brainrecon.data.mindeye`.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Sequence

import numpy as np

N_BEHAV = 17
SESSION_TRIALS = 750


def _image(nsd_id: int, size: int) -> np.ndarray:
    rng = np.random.default_rng([nsd_id, 99])
    base = rng.integers(0, 256, size=(4, 4, 3)).astype(np.uint8)
    return np.kron(base, np.ones((size // 4, size // 4, 1), dtype=np.uint8))


def _signal(nsd_ids: np.ndarray, n_voxels: int, seed: int) -> np.ndarray:
    """A linear function of each image's pixels, one per voxel: learnable by ridge."""
    pix = np.stack([_image(int(i), 16)[::4, ::4].reshape(-1) for i in nsd_ids]).astype(np.float32) / 255.0
    w = np.random.default_rng([seed, 1]).standard_normal((pix.shape[1], n_voxels)).astype(np.float32)
    s = (pix - 0.5) @ w
    return s / (s.std(axis=0, keepdims=True) + 1e-6)


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def _jpg(img: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 0
            tf.addfile(info, io.BytesIO(data))


def _repetitions(n: int, rng: np.random.Generator) -> np.ndarray:
    """1, 2 or 3 repetitions per image, mostly 3 (as in sessions 1-37)."""
    return rng.choice([1, 2, 3], size=n, p=[0.1, 0.15, 0.75])


def write_mindeye1(root: str | Path, *, subjects: Sequence[int] = (1,), n_voxels: int = 40, n_train: int = 30,
                   n_val: int = 6, n_test: int = 10, layout: str = "tar", variant: str = "webdataset_avg_split",
                   duplicates: int = 4, image_size: int = 16, noise: float = 0.5, seed: int = 0,
                   shards: int = 2) -> Path:
    """Write MindEye1's ``{variant}/`` for ``subjects``: ``train/train_subjXX_{i}.tar``,
    ``val/val_subjXX_0.tar``, ``test/test_subjXX_{i}.tar`` and ``metadata_subjXX.json`` (``layout
    ="tar"``), or the extracted folders ``train/train_subjXX/``, ``val/val_subjXX/``,
    ``test/subjXX/`` (``layout="folders"``, BrainGuard's README). Voxels are float16 (3, V) stacks
    padded as MedARC's creation code pads them; ``duplicates`` train samples are repeated (the
    trap of fMRI-reconstruction-NSD #38). Test images (shared, 73k ids 0..n_test-1) are the same
    for every subject. Returns the ``{variant}`` folder."""
    out = Path(root) / variant
    for subject in subjects:
        rng = np.random.default_rng([seed, subject])
        test_ids = np.arange(n_test) * 7 + 3
        own = 1000 + 500 * subject + rng.permutation(400)[: n_train + n_val]
        ids = {"train": own[:n_train], "val": own[n_train:], "test": test_ids}
        counts = {}
        key = 0
        for split in ("train", "val", "test"):
            nsd = ids[split]
            reps = _repetitions(len(nsd), rng)
            signal = _signal(nsd, n_voxels, seed)
            samples = []
            for i, nsd_id in enumerate(nsd):
                trials = signal[i] + noise * rng.standard_normal((reps[i], n_voxels)).astype(np.float32)
                if reps[i] == 1:
                    stack = np.repeat(trials, 3, axis=0)
                elif reps[i] == 2:
                    stack = np.concatenate([trials, trials.mean(0, keepdims=True)])
                else:
                    stack = trials
                first_trial = int(rng.integers(0, 27750))
                samples.append((f"sample{key:09d}", stack.astype(np.float16), int(nsd_id), first_trial,
                                int(reps[i]), _image(int(nsd_id), image_size)))
                key += 1
            if split == "train" and duplicates:
                samples += [(f"sample{key + k:09d}",) + samples[k][1:] for k in range(min(duplicates, len(samples)))]
                key += duplicates
            counts[split] = len(samples)
            members = []
            for name, stack, nsd_id, trial, nu, img in samples:
                members += [(f"{name}.nsdgeneral.npy", _npy(stack)), (f"{name}.jpg", _jpg(img)),
                            (f"{name}.coco73k.npy", _npy(np.array([nsd_id]))), (f"{name}.trial.npy",
                                                                                  _npy(np.array([trial]))),
                            (f"{name}.num_uniques.npy", _npy(np.array([nu])))]
            per_sample = 5
            if layout == "tar":
                n_shards = shards if split != "val" else 1
                chunks = np.array_split(np.arange(len(samples)), n_shards)
                for i, chunk in enumerate(chunks):
                    _write_tar(out / split / f"{split}_subj{subject:02d}_{i}.tar",
                               [m for c in chunk for m in members[c * per_sample:(c + 1) * per_sample]])
            elif layout == "folders":
                folder = out / split / (f"subj{subject:02d}" if split == "test" else f"{split}_subj{subject:02d}")
                folder.mkdir(parents=True, exist_ok=True)
                for name, data in members:
                    (folder / name).write_bytes(data)
            else:
                raise ValueError(f"layout must be 'tar' or 'folders', got {layout!r}")
        if layout == "tar":
            (out / f"metadata_subj{subject:02d}.json").write_text(json.dumps({"totals": counts}))
    return out


def write_mindeye2(root: str | Path, *, subjects: Sequence[int] = (1,), n_voxels: int = 40, n_images: int = 30,
                   n_shared: int = 10, n_sessions: int = 3, old_test_sessions: int | None = None,
                   noise: float = 0.5, seed: int = 0, image_rows: int | None = None, image_size: int = 224,
                   image_file: bool = True, chunk_rows: int = 1024) -> Path:
    """Write ``pscotti/mindeyev2``'s layout for ``subjects``: ``betas_all_subjXX_fp32_renorm.hdf5``
    (dataset ``betas``, (n_sessions * 750, V) float32, row = global trial),
    ``wds/subjXX/train/{0..n_sessions-1}.tar`` (non-shared trials of each session),
    ``wds/subjXX/new_test/0.tar`` (shared trials of all sessions), ``wds/subjXX/test/0.tar``
    (shared trials of the first ``old_test_sessions`` sessions, default all but the last) and
    ``coco_images_224_float16.hdf5`` (dataset ``images``, (image_rows, 3, S, S) float16 in [0, 1]).
    Each sample holds ``behav.npy`` (1, 17), ``past_behav.npy`` (15, 17), ``future_behav.npy``
    (15, 17) and ``olds_behav.npy`` (3, 17). Shared images are 73k ids ``0, 7, 14, ...``."""
    import h5py

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    old_test_sessions = n_sessions - 1 if old_test_sessions is None else old_test_sessions
    shared = np.arange(n_shared) * 7
    all_ids = [shared]
    n_trials_total = n_sessions * SESSION_TRIALS
    for subject in subjects:
        rng = np.random.default_rng([seed, subject, 2])
        own = 5 * n_shared + 1 + 3 * np.arange(n_images) + 1000 * subject
        all_ids.append(own)
        ids = np.concatenate([shared, own])
        reps = _repetitions(len(ids), rng)
        events = [(int(i), r) for i, n in zip(ids, reps) for r in range(n)]
        # Trials spread over the sessions' 750 slots (at most 750 per session).
        per_session = min(SESSION_TRIALS, max(60, -(-len(events) // n_sessions)))
        if len(events) > per_session * n_sessions:
            raise ValueError(f"{len(events)} trials do not fit in {n_sessions} sessions of {SESSION_TRIALS}")
        slots = rng.choice(n_sessions * per_session, size=len(events), replace=False)
        trial_of = (slots // per_session) * SESSION_TRIALS + (slots % per_session) * (SESSION_TRIALS // per_session)
        V = n_voxels
        signal = _signal(ids, V, seed)
        row_of_id = {int(i): k for k, i in enumerate(ids)}
        order = np.argsort(trial_of)
        with h5py.File(root / f"betas_all_subj{subject:02d}_fp32_renorm.hdf5", "w") as f:
            d = f.create_dataset("betas", shape=(n_trials_total, V), dtype="float32",
                                 chunks=(min(64, n_trials_total), V))
            # Written in blocks of whole chunks, in trial order (one pass over the file).
            k = 0
            for start in range(0, n_trials_total, chunk_rows):
                stop = min(n_trials_total, start + chunk_rows)
                block = np.zeros((stop - start, V), dtype=np.float32)
                while k < len(order) and trial_of[order[k]] < stop:
                    nsd_id, _ = events[order[k]]
                    block[trial_of[order[k]] - start] = (signal[row_of_id[nsd_id]]
                                                         + noise * rng.standard_normal(V).astype(np.float32))
                    k += 1
                d[start:stop] = block
        shards: dict[str, list] = {}
        shared_set = set(shared.tolist())
        for k in order:
            nsd_id, _ = events[k]
            t = int(trial_of[k])
            session = t // SESSION_TRIALS
            behav = np.full((1, N_BEHAV), -1.0, dtype=np.float64)
            behav[0, :6] = [nsd_id, subject, session + 1, (t % SESSION_TRIALS) // 63 + 1, t % 63 + 1, t]
            is_shared = nsd_id in shared_set
            behav[0, 16] = float(is_shared)
            targets = []
            if is_shared:
                targets.append("new_test/0")
                if session < old_test_sessions:
                    targets.append("test/0")
            else:
                targets.append(f"train/{session}")
            for target in targets:
                shards.setdefault(target, []).append((f"sample{t:09d}", behav))
        for s in range(n_sessions):
            shards.setdefault(f"train/{s}", [])
        for target, samples in shards.items():
            members = []
            for key, behav in samples:
                members += [(f"{key}.behav.npy", _npy(behav)),
                            (f"{key}.past_behav.npy", _npy(np.full((15, N_BEHAV), -1.0))),
                            (f"{key}.future_behav.npy", _npy(np.full((15, N_BEHAV), -1.0))),
                            (f"{key}.olds_behav.npy", _npy(np.full((3, N_BEHAV), -1.0)))]
            _write_tar(root / "wds" / f"subj{subject:02d}" / f"{target}.tar", members)
    if image_file:
        top = int(max(int(np.max(a)) for a in all_ids)) + 1
        rows_n = max(top, image_rows or 0)
        with h5py.File(root / "coco_images_224_float16.hdf5", "w") as f:
            d = f.create_dataset("images", shape=(rows_n, 3, image_size, image_size), dtype="float16",
                                 chunks=(1, 3, image_size, image_size))
            used = np.unique(np.concatenate(all_ids))
            for i in used:
                img = _image(int(i), 16)
                up = np.kron(img, np.ones((image_size // 16, image_size // 16, 1), dtype=np.uint8))
                d[int(i)] = (up.transpose(2, 0, 1) / 255.0).astype(np.float16)
    return root


__all__ = ["write_mindeye1", "write_mindeye2"]
