"""Resumable preparation of one NSD subject (:func:`prepare_nsd`, CLI ``brainrecon prepare-nsd``):
stage each session's masked betas, average the repetitions of every image, copy the images one
at a time, and swap the finished subject directory into place. The recipe, the output formats
and how an interrupted run resumes are described in :mod:`brainrecon.data.nsd`.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np

from brainrecon.data.layout import BRAIN_DIFFUSER_FILES, BRAINRECON_FILES, MANIFEST, TRIAL_FILES
from brainrecon.data.nsd.release import (
    _DOWNLOAD_HINT,
    BETA_VERSION,
    STIMULI_FILE,
    TRIALS_PER_SESSION,
    NSDRelease,
    _corrupt,
    _open_stimuli,
    _read_image,
    check_subject,
    load_mask,
    load_ncsnr,
    read_design,
    read_session_betas,
)
from brainrecon.data.nsd.trials import TrialPlan, plan_trials, resolve_sessions
from brainrecon.data.resumable import NpyRowWriter, array_digest, file_key, npy_matches, peak_memory_mb, progress_bar
from brainrecon.errors import BrainreconError, DataError
from brainrecon.io import read_json, replace_directory, write_array_atomic, write_json_atomic

FORMATS = ("brainrecon", "brain-diffuser")
ZSCORE_MODES = ("none", "session")
STATE_VERSION = 1
#: Images copied between two progress checkpoints (an fsync and a state write).
IMAGE_CHECKPOINT = 64
_SPLITS = ("train", "test")


def prepare_nsd(
    nsd_root: str | os.PathLike,
    subject: int,
    out: str | os.PathLike,
    *,
    sessions: int | str | None = None,
    test_set: int | None = None,
    zscore: str = "none",
    captions: str | os.PathLike | None = None,
    format: str = "brainrecon",
    beta_version: str = BETA_VERSION,
    overwrite: bool = False,
    progress: bool = True,
    name: str | None = None,
    ncsnr_threshold: float | None = None,
    keep_repetitions: bool = False,
) -> dict[str, Any]:
    """Prepare one NSD subject from the raw release (see :mod:`brainrecon.data.nsd` for the recipe).

    Parameters
    ----------
    nsd_root : path
        Directory holding ``nsddata``, ``nsddata_betas`` and ``nsddata_stimuli``.
    subject : int
        1..8.
    out : path
        Output directory (created). For the brainrecon format it may already hold other
        subjects prepared with the same options.
    sessions : int, "all" or None
        Use the first K sessions; None: all, or the first 37 with ``test_set=982``.
    test_set : {982, 1000} or None
        982: the shared images shown in sessions 1-37; 1000 (default): every shared image
        shown in the chosen sessions.
    zscore : {"none", "session"}
        Raw NSD units, or per-session per-voxel z-scoring before averaging.
    captions : path, optional
        ``COCO_73k_annots_curated.npy`` (73000, 5) strings.
    format : {"brainrecon", "brain-diffuser"}
    beta_version : str
        GLM folder name under ``func1pt8mm``.
    overwrite : bool
        Replace this subject's existing prepared files.
    progress : bool
        Show progress bars.
    name : str, optional
        Dataset name recorded in a new manifest (default: the output directory's name).
    ncsnr_threshold : float, optional
        Keep only nsdgeneral voxels whose noise-ceiling SNR (``ncsnr.nii.gz`` of the chosen
        beta version) exceeds this value, the voxel selection of MindEye2's preparation;
        recorded in the dataset's source (so in its fingerprint).
    keep_repetitions : bool
        Also write every single trial beside the averages (brainrecon format:
        ``{split}_trials_{voxels,rows,repetition,trial}.npy``; the voxels in the same units as
        the averages, which are their means), so that decoders can train on single trials. The
        trial voxels are written to disk session by session (about 1.7 GB for a 40-session subject).

    Returns
    -------
    dict
        ``subject, out (Path of the subject directory), n_train, n_test, n_voxels, n_sessions,
        test_set, zscore, format, peak_memory_mb`` (process max RSS so far).

    Raises
    ------
    DataError
        Missing or corrupt input files, a subject without the requested sessions, a mask/beta
        shape mismatch, conflicting options for an existing output directory.
    """
    subject = check_subject(subject)
    if format not in FORMATS:
        raise DataError(f"Unknown format {format!r}; valid: 'brainrecon', 'brain-diffuser'.")
    if zscore not in ZSCORE_MODES:
        raise DataError(f"Unknown zscore mode {zscore!r}; valid: 'none', 'session'.")
    if format == "brain-diffuser" and keep_repetitions:
        raise DataError("Brain-Diffuser's file layout has no place for single trials; keep_repetitions=True needs "
                        "format='brainrecon'.", parameters=("format", "keep_repetitions"))
    if format == "brain-diffuser" and zscore != "none":
        raise DataError("format='brain-diffuser' writes raw betas as Brain-Diffuser's files hold them; "
                        "zscore='session' is only available with format='brainrecon'.",
                        parameters=("format", "zscore"))
    n_sessions, request, test_set = resolve_sessions(subject, sessions, test_set)
    root = Path(nsd_root).expanduser()
    if not root.is_dir():
        raise DataError(f"NSD root {root} is not a directory; expected the folder holding nsddata/, "
                        f"nsddata_betas/ and nsddata_stimuli/.")
    release = NSDRelease(root, subject, beta_version)
    out = Path(out).expanduser()
    captions = Path(captions).expanduser() if captions is not None else None

    source = {
        "kind": "nsd",
        "beta_version": beta_version,
        "sessions": request,
        "test_set": test_set,
        "zscore": zscore,
        "voxel_units": "session_zscore" if zscore == "session" else "nsd_raw_x300",
        "voxel_order": "nibabel C order over (X, Y, Z) of nsdgeneral > 0",
        "row_order": "first appearance",
    }
    if keep_repetitions:
        source["keep_repetitions"] = True
    if ncsnr_threshold is not None:
        source["ncsnr_threshold"] = float(ncsnr_threshold)
        source["voxel_order"] = f"nibabel C order over (X, Y, Z) of nsdgeneral > 0 and ncsnr > {float(ncsnr_threshold):g}"
    subject_dir = out / f"subj{subject:02d}"
    partial = out / f".prepare-nsd-subj{subject:02d}.partial"
    request = {"source": source, "format": format, "nsd_root": str(root.resolve()), "n_sessions": n_sessions,
               "captions": str(captions.resolve()) if captions is not None else None}
    # A run killed after its finished subject folder was swapped in (before or after the manifest
    # was written, before its work folder was removed) is completed here without redoing it.
    finished = None if overwrite else _finished_run(partial, subject_dir, request)
    if finished is not None:
        manifest = _read_manifest(out) if format == "brainrecon" else None
        if format == "brainrecon" and (manifest is None or subject not in manifest["subjects"]
                                       or manifest.get("subject_info", {}).get(str(subject)) != finished["info"]):
            _update_manifest(out, subject, source, finished["info"], name)
        shutil.rmtree(partial, ignore_errors=True)
        print(f"prepare-nsd: subject {subject} was finished by an earlier run that was stopped before it cleaned up; "
              f"removed the work folder {partial} left by an earlier run.", file=sys.stderr)
        return {**finished["summary"], "out": subject_dir, "peak_memory_mb": peak_memory_mb()}
    # Fail fast, before any long work: the output directory, then every input file.
    _check_output(out, subject, format, source, overwrite)
    for session in range(1, n_sessions + 1):
        if not release.betas(session).is_file():
            raise DataError(
                f"Betas file for subject {subject}, session {session} not found: {release.betas(session)}. "
                f"Expected betas_session01..{n_sessions:02d}.nii.gz ({n_sessions} sessions requested) in "
                f"{release.betas(session).parent}. {_DOWNLOAD_HINT}"
            )
    if not release.stimuli.is_file():
        raise DataError(f"Stimulus file not found: {release.stimuli}. Expected {STIMULI_FILE} under the NSD "
                        f"root. {_DOWNLOAD_HINT}")
    if captions is not None and not captions.is_file():
        raise DataError(f"Captions file not found: {captions}. Expected COCO_73k_annots_curated.npy "
                        f"(73000 x 5 strings), or leave captions out.", parameters=("captions",))

    design = read_design(release.design)
    plan = plan_trials(design, subject, n_sessions, test_set)
    mask = load_mask(release.mask)
    if ncsnr_threshold is not None:
        mask = mask & (load_ncsnr(release.ncsnr, mask.shape, release.mask) > float(ncsnr_threshold))
        if not mask.any():
            raise DataError(f"No nsdgeneral voxel of subject {subject} has ncsnr > {ncsnr_threshold:g} "
                            f"({release.ncsnr}); choose a lower ncsnr_threshold.",
                            parameters=("ncsnr_threshold",))
    n_voxels = int(mask.sum())

    partial.mkdir(parents=True, exist_ok=True)
    state = _load_state(partial, subject, mask, release.mask)

    staged = _stage_sessions(release, plan, mask, partial, state, progress)
    trial_files = _trial_files(plan, partial) if keep_repetitions else None
    voxels = _average(plan, staged, n_voxels, zscore, progress, trial_files)
    images = _copy_images(release.stimuli, plan, partial, state, progress)
    caps = _read_captions(captions, plan) if captions is not None else None

    # Assemble the finished subject directory inside the partial one, then swap it in.
    names = BRAINRECON_FILES if format == "brainrecon" else BRAIN_DIFFUSER_FILES
    build = partial / "out"
    if build.exists():
        shutil.rmtree(build)
    build.mkdir()
    for split in _SPLITS:
        fill = {"split": split, "n": subject}
        write_array_atomic(build / names["voxels"].format(**fill), voxels[split])
        write_array_atomic(build / names["ids"].format(**fill), plan.ids(split))
        os.replace(images[split], build / names["images"].format(**fill))
        if caps is not None:
            write_array_atomic(build / names["captions"].format(**fill), caps[split])
        if trial_files is not None:
            for key, path in trial_files[split].items():
                os.replace(path, build / TRIAL_FILES[key].format(**fill))
    summary = {
        "subject": subject,
        "out": subject_dir,
        "n_train": int(plan.train_ids.size),
        "n_test": int(plan.test_ids.size),
        "n_voxels": n_voxels,
        "n_sessions": n_sessions,
        "test_set": test_set,
        "zscore": zscore,
        "format": format,
        "n_dropped_shared": plan.n_dropped_shared,
    }
    info = None
    if format == "brainrecon":
        info = {
            "nsd_root": str(root.resolve()),
            "n_sessions": n_sessions,
            "n_train": summary["n_train"],
            "n_test": summary["n_test"],
            "n_voxels": n_voxels,
            "n_dropped_shared": plan.n_dropped_shared,
            "captions": str(captions.resolve()) if captions is not None else None,
        }
    # Recorded before the swap: a rerun after a kill from here on finishes without redoing anything.
    state["finished"] = {"request": request, "info": info,
                         "summary": {k: v for k, v in summary.items() if k != "out"}}
    _save_state(state)
    replace_directory(build, subject_dir)
    if format == "brainrecon":
        _update_manifest(out, subject, source, info, name)
    shutil.rmtree(partial, ignore_errors=True)
    summary["peak_memory_mb"] = peak_memory_mb()
    return summary


# ----------------------------------------------------------------------------- steps
def _read_manifest(out: Path) -> dict[str, Any] | None:
    from brainrecon.data.loaders import read_brainrecon_manifest

    path = out / MANIFEST
    if not path.exists():
        return None
    return read_brainrecon_manifest(path, fix=f"fix or remove it (then re-run prepare-nsd for every subject of {out})")


_RECIPE_KEYS = ("kind", "beta_version", "sessions", "test_set", "zscore")


def _finished_run(partial: Path, subject_dir: Path, request: dict) -> dict[str, Any] | None:
    """What an earlier run of the same request recorded as finished, when its subject folder is in
    place (swapped in: the work folder has no ``out`` build left), else None."""
    state_file = partial / "state.json"
    if not (state_file.is_file() and subject_dir.is_dir()) or (partial / "out").exists():
        return None
    try:
        state = read_json(state_file)
    except BrainreconError:
        return None
    finished = state.get("finished") if isinstance(state, dict) else None
    if not (isinstance(finished, dict) and finished.get("request") == request
            and isinstance(finished.get("summary"), dict)):
        return None
    if request["format"] == "brainrecon" and not isinstance(finished.get("info"), dict):
        return None
    return finished

def _check_output(out: Path, subject: int, format: str, source: dict, overwrite: bool) -> None:
    subject_dir = out / f"subj{subject:02d}"
    manifest = _read_manifest(out) if format == "brainrecon" else None
    present = [int(s) for s in manifest.get("subjects", [])] if manifest else []
    partial = out / f".prepare-nsd-subj{subject:02d}.partial"
    unfinished = partial.is_dir()
    if subject in present and not overwrite:
        left = (f" The work folder {partial} of an unfinished earlier run is there too: overwrite=True resumes "
                f"from what it staged, or delete it." if unfinished else "")
        raise DataError(f"Subject {subject} is already prepared in {out}; pass overwrite=True to replace it "
                        f"(its surface maps, if any, are dropped and must be prepared again).{left}",
                        parameters=("overwrite",))
    # A run killed after swapping the subject directory in, before recording it (manifest) and
    # removing its work folder, is finished by re-running the same command.
    if subject_dir.exists() and not overwrite and not unfinished:
        # Another layout's files are never replaced silently.
        raise DataError(f"{subject_dir} already exists; pass overwrite=True to replace it, or choose another out "
                        f"directory.", parameters=("overwrite", "out"))
    if manifest is None:
        return
    others = [s for s in present if s != subject]
    old = manifest.get("source", {})
    differ = {k: (old.get(k), source[k]) for k in _RECIPE_KEYS if old.get(k) != source[k]}
    if others and differ:
        detail = ", ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in differ.items())
        raise DataError(f"{out} holds subject(s) {others} prepared with other options ({detail}). All subjects of "
                        f"one directory share the recipe; use another out directory or the same options.",
                        parameters=("out",))

def _update_manifest(out: Path, subject: int, source: dict, info: dict, name: str | None) -> None:
    manifest = _read_manifest(out) or {
        "format": "brainrecon-data",
        "version": 1,
        "name": name or out.resolve().name,
        "subjects": [],
        "ids_are_nsd": True,
    }
    subjects = sorted({int(s) for s in manifest.get("subjects", [])} | {subject})
    manifest["subjects"] = subjects
    manifest["ids_are_nsd"] = True
    manifest["source"] = source
    manifest.setdefault("subject_info", {})[str(subject)] = info
    # A re-prepared subject has new rows; surfaces joined to the old rows are gone with them.
    manifest.get("surfaces", {}).pop(str(subject), None)
    write_json_atomic(out / MANIFEST, manifest)

def _state_ok(state: Any, subject: int, mask_key: dict) -> bool:
    """Whether a read ``state.json`` has the structure this version writes (else staging restarts)."""
    if not (isinstance(state, dict) and state.get("version") == STATE_VERSION and state.get("subject") == subject
            and state.get("mask") == mask_key and isinstance(state.get("sessions"), dict)
            and isinstance(state.get("images"), dict)):
        return False
    for entry in state["images"].values():
        if not (isinstance(entry, dict) and isinstance(entry.get("key"), dict) and isinstance(entry.get("done"), int)
                and not isinstance(entry["done"], bool) and entry["done"] >= 0):
            return False
    return True

def _load_state(partial: Path, subject: int, mask: np.ndarray, mask_path: Path) -> dict[str, Any]:
    state_file = partial / "state.json"
    mask_key = {"shape": list(mask.shape), "n_voxels": int(mask.sum()), "sha": array_digest(np.packbits(mask))}
    state = None
    if state_file.is_dir():
        shutil.rmtree(state_file)
    if state_file.is_file():
        try:
            state = read_json(state_file)
        except (ValueError, BrainreconError):  # damaged: start this subject's staging over
            state = None
    if not _state_ok(state, subject, mask_key):
        # Nothing staged is valid for this mask (or the state is damaged): start over.
        for sub in ("betas",):
            shutil.rmtree(partial / sub, ignore_errors=True)
        state = {"version": STATE_VERSION, "subject": subject, "mask": mask_key, "sessions": {}, "images": {}}
        write_json_atomic(state_file, state)
    state["_file"] = str(state_file)
    return state

def _staged_key(src: Path, dst: Path) -> dict[str, Any]:
    """What a staged session is valid for: its source file and the staged file as written."""
    return {"source": file_key(src), "staged": file_key(dst)}

def _save_state(state: dict[str, Any]) -> None:
    write_json_atomic(state["_file"], {k: v for k, v in state.items() if k != "_file"})

def _stage_sessions(release: NSDRelease, plan: TrialPlan, mask: np.ndarray, partial: Path,
                    state: dict[str, Any], progress: bool) -> list[Path]:
    staged_dir = partial / "betas"
    staged_dir.mkdir(exist_ok=True)
    paths = []
    todo = []
    for session in range(1, plan.n_sessions + 1):
        src = release.betas(session)
        dst = staged_dir / f"session_{session:02d}.npy"
        paths.append(dst)
        if dst.is_dir():
            shutil.rmtree(dst)
        # A staged file that was changed or replaced since it was written is staged again.
        if not (dst.is_file() and state["sessions"].get(str(session)) == _staged_key(src, dst)):
            todo.append((session, src, dst))
    outer = progress_bar(progress, total=plan.n_sessions, initial=plan.n_sessions - len(todo),
                  desc=f"subj{plan.subject:02d} betas", unit="session")
    with outer:
        for session, src, dst in todo:
            with progress_bar(progress, total=TRIALS_PER_SESSION, desc=f"session {session:02d}", unit="vol",
                       leave=False) as bar:
                betas = read_session_betas(src, mask, mask_path=release.mask, progress=bar.update)
            write_array_atomic(dst, betas)
            del betas
            state["sessions"][str(session)] = _staged_key(src, dst)
            _save_state(state)
            outer.update(1)
    return paths

def zscore_session(betas: np.ndarray) -> np.ndarray:
    """Z-score each voxel over one session's trials.

    Parameters
    ----------
    betas : array of shape (n_trials, V)

    Returns
    -------
    float32 array of shape (n_trials, V)
        Mean 0 and standard deviation 1 (``ddof=0``) per column; constant columns become 0.
    """
    x = np.asarray(betas, dtype=np.float64)
    mean = x.mean(axis=0)
    std = x.std(axis=0)
    safe = np.where(std > 0, std, 1.0)
    z = (x - mean) / safe
    z[:, std == 0] = 0.0
    return z.astype(np.float32)

def _trial_files(plan: TrialPlan, partial: Path) -> dict[str, dict[str, Path]]:
    """Rows, repetition indices and trial numbers of each split's single trials (chronological),
    written now; the voxel file is filled by :func:`_average`."""
    files: dict[str, dict[str, Path]] = {}
    for code, split in ((0, "train"), (1, "test")):
        trial = np.flatnonzero(plan.trial_split == code).astype(np.int64)
        rows = plan.trial_row[trial].astype(np.int64)
        repetition = np.zeros(len(rows), dtype=np.int64)
        seen = np.zeros(plan.ids(split).size, dtype=np.int64)
        for k, r in enumerate(rows):
            repetition[k] = seen[r]
            seen[r] += 1
        files[split] = {}
        for key, arr in (("rows", rows), ("repetition", repetition), ("trial", trial)):
            path = partial / f"trials_{split}_{key}.npy"
            write_array_atomic(path, arr)
            files[split][key] = path
        files[split]["voxels"] = partial / f"trials_{split}_voxels.npy"
    return files


def _average(plan: TrialPlan, staged: list[Path], n_voxels: int, zscore: str, progress: bool,
             trial_files: dict[str, dict[str, Path]] | None = None) -> dict[str, np.ndarray]:
    sums = {split: np.zeros((plan.ids(split).size, n_voxels), dtype=np.float32) for split in _SPLITS}
    # Single trials go to disk session by session (a memory-mapped .npy), never whole in memory.
    singles = {split: np.lib.format.open_memmap(trial_files[split]["voxels"], mode="w+", dtype=np.float32,
                                                shape=(int((plan.trial_split == code).sum()), n_voxels))
               for code, split in ((0, "train"), (1, "test"))} if trial_files is not None else None
    written = {split: 0 for split in _SPLITS}
    counts = {split: np.zeros(plan.ids(split).size, dtype=np.int64) for split in _SPLITS}
    with progress_bar(progress, total=len(staged), desc=f"subj{plan.subject:02d} average", unit="session") as bar:
        for s, path in enumerate(staged):
            try:
                betas = np.load(path, allow_pickle=False)
            except (ValueError, OSError, EOFError) as exc:
                raise DataError(f"Staged betas {path} could not be read ({exc}); delete {path.parent.parent} and "
                                f"re-run.") from None
            if betas.shape != (TRIALS_PER_SESSION, n_voxels):
                raise DataError(f"Staged betas {path} have shape {betas.shape}, expected "
                                f"({TRIALS_PER_SESSION}, {n_voxels}); delete {path.parent.parent} and re-run.")
            values = zscore_session(betas) if zscore == "session" else betas.astype(np.float32)
            del betas
            sl = slice(s * TRIALS_PER_SESSION, (s + 1) * TRIALS_PER_SESSION)
            for code, split in ((0, "train"), (1, "test")):
                sel = np.flatnonzero(plan.trial_split[sl] == code)
                rows = plan.trial_row[sl][sel]
                # In trial order, so sums match a chronological np.mean bit for bit.
                np.add.at(sums[split], rows, values[sel])
                np.add.at(counts[split], rows, 1)
                if singles is not None:
                    singles[split][written[split]:written[split] + len(sel)] = values[sel]
                    written[split] += len(sel)
            del values
            bar.update(1)
    if singles is not None:
        for split in _SPLITS:
            singles[split].flush()
        del singles
    for split in _SPLITS:
        if (counts[split] == 0).any():  # cannot happen with a consistent plan
            raise DataError(f"Internal error: {int((counts[split] == 0).sum())} {split} images without trials.")
        sums[split] /= counts[split][:, None].astype(np.float32)
    return sums

def _copy_images(stimuli: Path, plan: TrialPlan, partial: Path, state: dict[str, Any], progress: bool) -> dict[str, Path]:
    checkpoint = IMAGE_CHECKPOINT
    f, dset = _open_stimuli(stimuli)
    paths = {}
    try:
        max_id = max(int(plan.train_ids.max(initial=-1)), int(plan.test_ids.max(initial=-1)))
        if max_id >= dset.shape[0]:
            raise DataError(f"{stimuli}: imgBrick holds {dset.shape[0]} images but image id {max_id} is needed; "
                            f"expected all 73000 NSD images.")
        shape_hw = tuple(int(s) for s in dset.shape[1:])
        source_key = file_key(stimuli)
        for split in _SPLITS:
            ids = plan.ids(split)
            path = partial / f"images_{split}.npy"
            paths[split] = path
            key = {"ids": array_digest(ids), "source": source_key, "shape": [int(ids.size), *shape_hw]}
            entry = state["images"].get(split)
            if path.is_dir():
                shutil.rmtree(path)
            # A half-copied file that is no longer the array started (truncated, replaced) starts over.
            resume = bool(entry and entry.get("key") == key and npy_matches(path, (int(ids.size), *shape_hw), np.uint8)
                          and int(entry["done"]) <= ids.size)
            done = int(entry["done"]) if resume else 0
            if not resume:
                state["images"][split] = {"key": key, "done": 0}
                _save_state(state)
            with NpyRowWriter(path, (ids.size, *shape_hw), np.uint8, resume=resume) as writer, \
                    progress_bar(progress, total=int(ids.size), initial=done, desc=f"subj{plan.subject:02d} {split} images",
                          unit="img") as bar:
                for i in range(done, ids.size):
                    writer.write(i, _read_image(dset, int(ids[i]), stimuli))
                    bar.update(1)
                    if (i + 1) % checkpoint == 0 or i + 1 == ids.size:
                        writer.sync()
                        state["images"][split]["done"] = i + 1
                        _save_state(state)
    finally:
        f.close()
    return paths

def _read_captions(path: Path, plan: TrialPlan) -> dict[str, np.ndarray]:
    try:
        caps = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as exc:
        raise DataError(f"{path} could not be read as a plain string array ({exc}); expected "
                        f"COCO_73k_annots_curated.npy, (73000, 5) strings, not pickled objects.") from exc
    except (OSError, EOFError) as exc:
        raise _corrupt(path, "COCO_73k_annots_curated.npy, (73000, 5) strings", exc) from exc
    if caps.ndim != 2 or caps.dtype.kind not in "US":
        raise DataError(f"{path} holds {caps.dtype} of shape {caps.shape}; expected (73000, 5) strings.")
    out = {}
    for split in _SPLITS:
        ids = plan.ids(split)
        if ids.size and ids.max() >= caps.shape[0]:
            raise DataError(f"{path} has {caps.shape[0]} rows but image id {int(ids.max())} is needed; "
                            f"expected one row per NSD 73k image.")
        rows = np.asarray(caps[ids])
        out[split] = rows.astype(str) if rows.dtype.kind == "S" else rows
    return out


__all__ = ["FORMATS", "IMAGE_CHECKPOINT", "ZSCORE_MODES", "prepare_nsd", "zscore_session"]
