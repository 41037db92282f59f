"""Fuzz every file of real runs (ridge and BrainGuard, evaluated) and of a target cache.

Each corruption (truncation at several offsets, an empty file, garbage bytes, a directory in
place of the file, not-JSON, JSON of the wrong kind, a missing or an extra field, a wrong
dtype, a wrong shape, a missing or an extra array or tensor) is applied to one file of a copy
of the run. Then everything a user does with a run is done with it: open it, read its test
ids, predictions, reconstructions, metrics and per-image scores, load its decoder and
predict. Each case must end in a :class:`BrainreconError` or give exactly the intact run's
results (a harmless change, like an extra JSON field); any other exception, or a different
answer, is a failure. The leaderboard over the damaged run and an intact copy must rank the
intact one and skip or annotate the damaged one, never fail.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file, save_file

from brainrecon.errors import BrainreconError

pytestmark = pytest.mark.slow

DATA = "synthetic:n_train=80,n_test=8,image_size=32,surface_size=32"
KINDS = {
    "ridge": {"device": "cpu", "alphas": [1.0, 100.0]},
    "brainguard": {"device": "cpu", "hidden": 16, "n_blocks": 2, "rounds": 1, "batch_size": 40, "progress": False},
}
# Every file a run holds, by the reader family that fuzzes it; a new file must be added here.
LAYOUT = {
    "ridge": {"run.json": "json", "metrics.json": "json", "decoder/brainrecon.json": "json",
              "decoder/ridge_weights.npz": "npz", "per_image.csv": "csv", "test_ids.npy": "npy",
              "predictions.npy": "npy", "reconstructions.npy": "npy", "grid.png": "picture"},
    "brainguard": {"run.json": "json", "metrics.json": "json", "decoder/brainrecon.json": "json",
                   "decoder/subject-1.safetensors": "safetensors", "per_image.csv": "csv",
                   "test_ids.npy": "npy", "predictions.npy": "npy", "reconstructions.npy": "npy",
                   "grid.png": "picture"},
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from brainrecon import workflows

    out = tmp_path_factory.mktemp("fuzz-runs")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        made = {kind: workflows.fit(kind, data=DATA, subjects=[1], out=out, params=params, evaluate=True)[0].path
                for kind, params in KINDS.items()}
    return {kind: (path, _use(path)) for kind, path in made.items()}


def _use(path: Path) -> dict:
    """Everything a user reads from a run, as plain values to compare."""
    from brainrecon.eval.report import EvalReport
    from brainrecon.workflows.evaluate import run_scores_by_id
    from brainrecon.runs import Run

    run = Run.open(path)
    decoder = run.load_decoder()
    report = EvalReport.from_json(run.metrics())
    # What a reader of the report uses; fields only a person reads (timings, versions) or that
    # older reports lack (intervals) may go missing without changing an answer.
    metrics = {"scores": dict(report), "variant": report.variant, "n_images": report.n_images}
    return {"ids": run.test_ids(), "predictions": run.predictions(), "reconstructions": run.reconstructions(),
            "metrics": metrics, "scores": run_scores_by_id(run),
            "predict": decoder.predict(run.dataset().test)[run.subject]}


def _same(a, b) -> bool:
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return (isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.dtype == b.dtype
                and a.shape == b.shape and np.array_equal(a, b, equal_nan=a.dtype.kind == "f"))
    if isinstance(a, float) and isinstance(b, float) and np.isnan(a) and np.isnan(b):
        return True
    return type(a) is type(b) and a == b


# --------------------------------------------------------------------------- corruptions
def _replace(path: Path, data: bytes) -> None:
    # unlink first: the copy's untouched files are hard links to the pristine run
    path.unlink()
    path.write_bytes(data)


def _bytes_cases(path: Path) -> dict:
    data = path.read_bytes()
    rng = np.random.default_rng(len(data))
    cases = {f"truncated to {k:.0%}": data[: int(len(data) * k)] for k in (0.1, 0.5, 0.9)}
    cases["last byte cut"] = data[:-1]
    cases["empty"] = b""
    cases["garbage"] = rng.integers(0, 256, len(data), dtype=np.uint8).tobytes()
    return {name: (lambda p, d=d: _replace(p, d)) for name, d in cases.items()}


def _json_cases(path: Path) -> dict:
    obj = json.loads(path.read_text())
    cases = {"not JSON": b"hello", "a JSON list": b"[]", "a JSON string": b'"run"',
             "extra field": json.dumps({**obj, "zz_extra": [1, 2]}).encode()}
    for key in obj:
        cases[f"missing {key!r}"] = json.dumps({k: v for k, v in obj.items() if k != key}).encode()
        cases[f"{key!r} is null"] = json.dumps({**obj, key: None}).encode()
    return {name: (lambda p, d=d: _replace(p, d)) for name, d in cases.items()}


def _npy_cases(path: Path) -> dict:
    arr = np.load(path)

    def saver(new):
        return lambda p: (p.unlink(), np.save(p, new))

    cases = {"as strings": saver(arr.astype(str)), "one row less": saver(arr[:-1]),
             "flattened": saver(arr.reshape(-1)), "an extra axis": saver(arr[None]),
             "a scalar": saver(np.asarray(arr.reshape(-1)[0]))}
    if arr.dtype.kind == "f":
        cases["as integers"] = saver(arr.astype(np.int64))
    elif arr.dtype.kind in "iu":
        cases["as floats"] = saver(arr.astype(np.float64) + 0.5)
    else:
        cases["as floats"] = saver(arr.astype(np.float64))
    return cases


def _npz_cases(path: Path) -> dict:
    with np.load(path) as f:
        arrays = {k: f[k] for k in f.files}

    def saver(new):
        return lambda p: (p.unlink(), np.savez(p, **new))

    cases = {"extra array": saver({**arrays, "zz_extra": np.zeros(3)})}
    for k, v in arrays.items():
        cases[f"missing {k!r}"] = saver({n: a for n, a in arrays.items() if n != k})
        cases[f"{k!r} as strings"] = saver({**arrays, k: v.astype(str)})
        if v.ndim:
            cases[f"{k!r} one row less"] = saver({**arrays, k: v[:-1]})
        cases[f"{k!r} an extra axis"] = saver({**arrays, k: v[None]})
    return cases


def _safetensors_cases(path: Path) -> dict:
    import torch

    tensors = load_file(str(path))

    def saver(new):
        return lambda p: (p.unlink(), save_file(new, str(p)))

    cases = {"extra tensor": saver({**tensors, "zz_extra": torch.zeros(3)})}
    for k, v in list(tensors.items())[:6] + list(tensors.items())[-3:]:
        cases[f"missing {k!r}"] = saver({n: a for n, a in tensors.items() if n != k})
        cases[f"{k!r} as float16"] = saver({**tensors, k: v.to(torch.float16)})
        if v.ndim:
            cases[f"{k!r} one row less"] = saver({**tensors, k: v[:-1].contiguous()})
    return cases


def _csv_cases(path: Path) -> dict:
    lines = path.read_text().splitlines(keepends=True)
    cases = {"header only": "".join(lines[:1]), "one row less": "".join(lines[:-1]),
             "a row repeated": "".join(lines + lines[-1:]), "bad header": "".join(["id,foo\n", *lines[1:]]),
             "a column less": "".join(",".join(line.rstrip("\n").split(",")[:-1]) + "\n" for line in lines),
             "a non-number": "".join(lines[:-1] + [lines[-1].replace(",", ",abc,", 1)])}
    return {name: (lambda p, d=d.encode(): _replace(p, d)) for name, d in cases.items()}


FAMILIES = {"json": _json_cases, "npy": _npy_cases, "npz": _npz_cases, "safetensors": _safetensors_cases,
            "csv": _csv_cases, "picture": lambda p: {}}


def _directory(path: Path) -> None:
    path.unlink()
    path.mkdir()


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, copy_function=os.link)
    return dst


def _check_case(src: Path, intact: dict, rel: str, name: str, corrupt, scratch: Path) -> str | None:
    """None if the case ends well, else what went wrong."""
    copy = _copy(src, scratch / src.name)
    try:
        corrupt(copy / rel)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                got = _use(copy)
        except BrainreconError as exc:
            if str(copy) not in str(exc) and rel.split("/")[-1] not in str(exc):
                return f"{rel} {name}: the error does not name the file: {exc}"
            return None
        except Exception as exc:  # noqa: BLE001 - this is what the suite looks for
            return f"{rel} {name}: {type(exc).__name__}: {exc}"[:300]
        if not _same(got, intact):
            differ = [k for k in intact if not _same(got[k], intact[k])]
            return f"{rel} {name}: accepted with a different answer ({differ})"
        return None
    finally:
        shutil.rmtree(copy, ignore_errors=True)


@pytest.mark.parametrize("kind,rel", [(k, r) for k in LAYOUT for r in LAYOUT[k]])
def test_every_corruption_of_every_run_file_is_a_clear_error_or_harmless(runs, tmp_path, kind, rel):
    src, intact = runs[kind]
    cases = {**_bytes_cases(src / rel), "a directory": _directory, **FAMILIES[LAYOUT[kind][rel]](src / rel)}
    if LAYOUT[kind][rel] == "picture":
        cases = {"a directory": _directory, "empty": cases["empty"]}  # no command reads the grid back
    failures = [f for name, corrupt in cases.items()
                if (f := _check_case(src, intact, rel, name, corrupt, tmp_path)) is not None]
    assert not failures, f"{len(failures)} of {len(cases)} corruptions went wrong:\n" + "\n".join(failures)
    assert _same(_use(src), intact)  # the pristine run was not touched through the links


def test_layout_covers_every_file_of_a_run(runs):
    for kind, (path, _) in runs.items():
        found = {str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()}
        assert found == set(LAYOUT[kind]), kind


@pytest.mark.parametrize("rel,name", [("run.json", "empty"), ("metrics.json", "not JSON"),
                                      ("metrics.json", "a JSON list"), ("test_ids.npy", "as strings"),
                                      ("per_image.csv", "bad header"), ("per_image.csv", "one row less")])
def test_leaderboard_ranks_the_intact_run_beside_a_damaged_one(runs, tmp_path, rel, name):
    from brainrecon.leaderboard import collect, leaderboard

    src, _ = runs["ridge"]
    root = tmp_path / "runs"
    root.mkdir()
    _copy(src, root / "a-damaged")
    _copy(src, root / "b-intact")
    cases = {**_bytes_cases(src / rel), **FAMILIES[LAYOUT["ridge"][rel]](src / rel)}
    cases[name](root / "a-damaged" / rel)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        entries = collect(root)
        text = leaderboard(root, fmt="markdown")
    by_path = {e.path.name: e for e in entries}
    assert by_path["b-intact"].scores and "b-intact" not in {e.path.name for e in entries if e.note}
    assert "a-damaged" not in by_path or by_path["a-damaged"].note or not by_path["a-damaged"].per_image
    assert by_path["b-intact"].name in text
    skipped = "a-damaged" not in by_path
    assert not skipped or any("a-damaged" in str(w.message) for w in seen)
