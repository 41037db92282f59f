"""Fuzz the caches: every file of a target cache and a ground-truth feature cache entry.

A damaged cache must never be trusted: each corruption ends in the right values, recomputed
with a :class:`DamagedCacheWarning` naming the cache (or, when the change is harmless, the
same values without recomputation), never in a traceback or in stale values.
"""

from __future__ import annotations

import shutil
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from test_eval_harness import CountingNet, images
from test_fuzz_files import _bytes_cases, _directory, _json_cases, _npy_cases

from brainrecon.errors import DamagedCacheWarning
from brainrecon.eval.harness import evaluate
from brainrecon.targets.cache import IdKeyedCache

pytestmark = pytest.mark.slow

IDS = np.arange(10, 30)
SHAPE = (3, 4)


def _compute(batch):
    return np.stack([np.full(SHAPE, float(i)) for i in batch]).astype(np.float32)


@pytest.fixture(scope="module")
def target_cache(tmp_path_factory):
    d = tmp_path_factory.mktemp("target-cache") / "c"
    IdKeyedCache(d, SHAPE).get_or_compute(IDS, _compute, progress=False)
    return d


CACHE_FILES = {"ids.npy": _npy_cases, "values.npy": _npy_cases, "filled.npy": _npy_cases, "cache.json": _json_cases}


@pytest.mark.parametrize("name", sorted(CACHE_FILES))
def test_every_corruption_of_a_target_cache_file_is_recomputed_or_harmless(target_cache, tmp_path, name):
    cases = {**_bytes_cases(target_cache / name), "a directory": _directory, **CACHE_FILES[name](target_cache / name)}
    failures = []
    for case, corrupt in cases.items():
        d = tmp_path / "c"
        shutil.copytree(target_cache, d)
        corrupt(d / name)
        calls = []

        def counting(batch):
            calls.append(len(batch))
            return _compute(batch)

        try:
            with warnings.catch_warnings(record=True) as seen:
                warnings.simplefilter("always")
                got = IdKeyedCache(d, SHAPE).get_or_compute(IDS, counting, progress=False)
            warned = [w for w in seen if issubclass(w.category, DamagedCacheWarning)]
            if not np.array_equal(got, _compute(IDS)) or got.dtype != np.float32:
                failures.append(f"{name} {case}: wrong values returned")
            elif calls and not warned:
                failures.append(f"{name} {case}: recomputed {sum(calls)} rows without saying why")
            elif warned and str(d) not in str(warned[0].message):
                failures.append(f"{name} {case}: the warning does not name the cache: {warned[0].message}")
            elif not calls and warned:
                failures.append(f"{name} {case}: warned but trusted the cache")
            again = IdKeyedCache(d, SHAPE).get(IDS)  # the rebuilt cache is whole
            if not np.array_equal(again, _compute(IDS)):
                failures.append(f"{name} {case}: the rebuilt cache holds wrong values")
        except Exception as exc:  # noqa: BLE001 - this is what the suite looks for
            failures.append(f"{name} {case}: {type(exc).__name__}: {exc}"[:300])
        finally:
            shutil.rmtree(d, ignore_errors=True)
    assert not failures, f"{len(failures)} of {len(cases)} corruptions went wrong:\n" + "\n".join(failures)


def _gt_entry_cases(path):
    tensors = load_file(str(path))
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()

    def saver(new, metadata):
        return lambda p: (p.unlink(), save_file(new, str(p), metadata=metadata))

    name, t = next(iter(tensors.items()))
    return {
        "values changed, digest kept": saver({**tensors, name: t + 1}, meta),
        "no metadata (an older brainrecon)": saver(tensors, None),
        "written for another key": saver(tensors, {**meta, "key": meta["key"].replace("mindeye", "other")}),
        "one image less": saver({name: t[:-1].contiguous()}, meta),
        "a tensor missing": saver({"other": t}, meta),
    }


def test_every_corruption_of_a_ground_truth_feature_entry_is_recomputed(tmp_path):
    gt, rec = images(3, n=6, size=32)
    kw = {"metrics": ["CLIP"], "batch_size": 3, "progress": False}
    fresh = evaluate(gt, rec, extractors={"CLIP": CountingNet(0)}, cache_dir=False, **kw)
    pristine = tmp_path / "pristine"
    evaluate(gt, rec, extractors={"CLIP": CountingNet(0)}, cache_dir=pristine, **kw)
    (entry,) = pristine.glob("gt-*.safetensors")
    cases = {**_bytes_cases(entry), "a directory": _directory, **_gt_entry_cases(entry)}
    failures = []
    for case, corrupt in cases.items():
        cache = tmp_path / "cache"
        shutil.copytree(pristine, cache)
        corrupt(cache / entry.name)
        net = CountingNet(0)
        try:
            with warnings.catch_warnings(record=True) as seen:
                warnings.simplefilter("always")
                report = evaluate(gt, rec, extractors={"CLIP": net}, cache_dir=cache, **kw)
            warned = [str(w.message) for w in seen if issubclass(w.category, DamagedCacheWarning)]
            if report["CLIP"] != fresh["CLIP"]:
                failures.append(f"{case}: score {report['CLIP']} instead of {fresh['CLIP']}")
            elif net.calls != 4 or report.settings["gt_features_cached"]:
                failures.append(f"{case}: the damaged entry was trusted")
            elif not warned or entry.name not in warned[0]:
                failures.append(f"{case}: recomputed without a warning naming the entry ({warned})")
        except Exception as exc:  # noqa: BLE001 - this is what the suite looks for
            failures.append(f"{case}: {type(exc).__name__}: {exc}"[:300])
        finally:
            shutil.rmtree(cache, ignore_errors=True)
    assert not failures, f"{len(failures)} of {len(cases)} corruptions went wrong:\n" + "\n".join(failures)
    # and an intact entry is used as is
    net = CountingNet(0)
    report = evaluate(gt, rec, extractors={"CLIP": net}, cache_dir=pristine, **kw)
    assert net.calls == 2 and report.settings["gt_features_cached"] == ["CLIP"] and report["CLIP"] == fresh["CLIP"]
    assert torch.equal(load_file(str(entry))["CLIP"], load_file(str(entry))["CLIP"])


def test_a_cache_rebuild_cut_between_its_renames_is_restored_not_recomputed(target_cache, tmp_path):
    """Growing a cache swaps a rebuilt copy in with two renames; killed between them, the
    cache folder is missing and `.c.old` holds the previous one: it is restored (said), and
    nothing is recomputed."""
    d = tmp_path / "c"
    shutil.copytree(target_cache, tmp_path / ".c.old")
    calls = []
    with pytest.warns(RuntimeWarning, match="previous version was restored"):
        got = IdKeyedCache(d, SHAPE).get_or_compute(IDS, lambda b: calls.append(len(b)) or _compute(b), progress=False)
    assert calls == [] and np.array_equal(got, _compute(IDS)) and not (tmp_path / ".c.old").exists()
