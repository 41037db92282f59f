"""Two processes sharing one target cache: neither fails, neither loses the other's rows.

Before the cache took a lock, a second process asking for ids the cache did not cover rebuilt it
(the union of ids) while the first was still filling: the first kept writing into the replaced
files and then found its rows missing ("does not hold all requested ids yet").
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from brainrecon.targets.cache import IdKeyedCache

pytestmark = pytest.mark.slow

FILLER = r'''
import sys, time
from pathlib import Path
import numpy as np
from brainrecon.targets.cache import IdKeyedCache

directory, lo, hi, alive, other = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]), sys.argv[5]
alive.write_text("1")
cache = IdKeyedCache(directory, (3,), "float32", {"what": "id times (1, 2, 3)"})
first = [True]

def compute(ids):
    if first[0] and other != "-":  # the cache exists now: wait until the other process runs,
        first[0] = False           # then give it a second to reach the cache
        deadline = time.monotonic() + 60
        while not Path(other).exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(1.0)
    time.sleep(0.02)
    return ids[:, None] * np.array([1.0, 2.0, 3.0], dtype=np.float32)

ids = np.arange(lo, hi, dtype=np.int64)
values = cache.get_or_compute(ids, compute, batch_size=10, progress=False)
assert np.array_equal(values, ids[:, None] * np.array([1.0, 2.0, 3.0], dtype=np.float32))
print("ok", len(ids))
'''


def _start(script: Path, *args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(script), *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "TQDM_DISABLE": "1"})


def _finish(proc: subprocess.Popen, timeout: float = 120) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        return -1, out, err + f"\n(killed after {timeout} s)"
    return proc.returncode, out, err


def test_two_processes_fill_overlapping_ids_of_one_cache(tmp_path):
    """A fills ids 0..99 batch by batch and, with the cache created, pauses until B runs; B asks
    for 50..149 meanwhile. Both must get every value right; B waits for A."""
    script = tmp_path / "filler.py"
    script.write_text(FILLER)
    cache_dir = tmp_path / "cache"
    a_alive, b_alive = tmp_path / "a-alive", tmp_path / "b-alive"
    a = _start(script, cache_dir, 0, 100, a_alive, b_alive)
    b = None
    try:
        deadline = time.monotonic() + 60
        while not (cache_dir / "cache.json").exists() and time.monotonic() < deadline and a.poll() is None:
            time.sleep(0.05)
        assert (cache_dir / "cache.json").exists(), _finish(a)
        b = _start(script, cache_dir, 50, 150, b_alive, "-")
        results = [_finish(a), _finish(b)]
    finally:
        for proc in (a, b):
            if proc is not None and proc.poll() is None:
                proc.kill()
    for code, out, err in results:
        assert code == 0 and out.startswith("ok"), err[-3000:]
    cache = IdKeyedCache(cache_dir, (3,), "float32", {"what": "id times (1, 2, 3)"})
    ids = np.arange(0, 150)
    assert len(cache.missing(ids)) == 0
    np.testing.assert_array_equal(cache.get(ids), ids[:, None] * np.array([1.0, 2.0, 3.0], dtype=np.float32))
    # B found A at work and said it waited.
    assert "Waiting for another process" in results[1][2]


def test_two_fits_on_one_cache_at_once(tmp_path):
    """Two `brainrecon fit` processes (different subjects, so different training ids) share one
    target cache and run at the same time: both finish and write the same runs as fits made one
    after the other."""
    data = "synthetic:n_train=400,n_test=8,image_size=32,surface_size=16"
    env = {**os.environ, "TQDM_DISABLE": "1", "BRAINRECON_CACHE": str(tmp_path / "shared-cache"),
           "OMP_NUM_THREADS": "1"}

    def fit(subject: int, out: Path) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "brainrecon.cli", "fit", "--decoder", "ridge", "--data", data,
                                 "--subjects", str(subject), "--out", str(out), "--no-evaluate"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)

    procs = [fit(1, tmp_path / "together"), fit(2, tmp_path / "together")]
    results = [_finish(p, timeout=300) for p in procs]
    for code, out, err in results:
        assert code == 0, (out + err)[-3000:]
    env["BRAINRECON_CACHE"] = str(tmp_path / "own-cache")
    for subject in (1, 2):
        code, out, err = _finish(fit(subject, tmp_path / "alone"), timeout=300)
        assert code == 0, (out + err)[-3000:]
    for name in ("ridge-subj01-pixels", "ridge-subj02-pixels"):
        np.testing.assert_array_equal(np.load(tmp_path / "together" / name / "predictions.npy"),
                                      np.load(tmp_path / "alone" / name / "predictions.npy"))
