"""An on-disk cache of per-image arrays keyed by image id, memory-mapped and resumable.

Layout of a cache directory::

    ids.npy       int64 (capacity,), sorted image ids
    values.npy    (capacity, *shape) in the cache's dtype, memory-mapped
    filled.npy    bool (capacity,): which rows hold computed values
    cache.json    shape, dtype, and a description of what the values are

Rows are computed in batches and marked filled only after their values are flushed, so an
interrupted computation resumes where it stopped. Asking for ids the cache does not cover
rebuilds it with the union of ids (old values kept) under a temporary name, then renames.

Several processes may share one cache (two fits on one machine): filling holds an exclusive
lock on ``.<name>.lock`` beside the directory, reading a shared one, so a second process
waits while the first computes, then finds the values there (or computes only what is still
missing) and never reads files of two versions.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
from tqdm.auto import tqdm

from brainrecon.errors import BrainreconError, DamagedCacheWarning, DataError
from brainrecon.io import directory_lock, read_json, replace_directory, restore_directory, write_json_atomic
from brainrecon.progress import bar_disabled

CACHE_ENV = "BRAINRECON_CACHE"


def default_cache_root() -> Path:
    """``$BRAINRECON_CACHE`` or ``~/.cache/brainrecon``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "brainrecon")


class IdKeyedCache:
    """Per-image arrays keyed by int64 ids; see the module docstring.

    Parameters
    ----------
    directory : path
        Cache directory (created on first write).
    shape : tuple of int
        Shape of one row's value.
    dtype : str
        Storage dtype (e.g. ``"float16"`` for IP-Adapter tokens, ``"float32"`` for pixels).
    description : dict
        Stored in ``cache.json``; a cache whose description differs is an error rather than
        silently reused (it was computed by another model or setting).
    """

    def __init__(self, directory: str | os.PathLike, shape: tuple[int, ...], dtype: str = "float32",
                 description: dict[str, Any] | None = None):
        self.directory = Path(directory)
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        self.description = description or {}
        self._damaged = False  # set when the files are found damaged: rebuilt on the next fill
        if self.directory.exists() or self.directory.with_name(f".{self.directory.name}.old").exists():
            with self._lock(shared=False):
                restore_directory(self.directory)  # a rebuild killed mid-swap left the old cache aside
                self._check_meta()

    def _lock(self, shared: bool):
        return directory_lock(self.directory, shared=shared, waiting="this cache")

    def _check_meta(self) -> None:
        meta_path = self.directory / "cache.json"
        if meta_path.is_file():
            try:
                meta = read_json(meta_path, required=("shape", "dtype"),
                                 types={"shape": list, "dtype": str, "description": dict})
                if not all(isinstance(d, int) and not isinstance(d, bool) for d in meta["shape"]):
                    raise BrainreconError(f"field 'shape' is {meta['shape']}, expected a list of integers")
            except BrainreconError as exc:
                self._discard(f"{meta_path}: {exc}")
                self._damaged = True
                return
            if (tuple(meta["shape"]) != self.shape or meta["dtype"] != self.dtype.name
                    or meta.get("description", {}) != self.description):
                raise DataError(
                    f"The cache at {self.directory} was made with different settings "
                    f"({meta}); delete it or choose another cache directory."
                )

    # -------------------------------------------------------------- files
    def _discard(self, reason: str) -> None:
        """A damaged cache holds derived values only: say so and treat it as absent; the next
        fill rebuilds it and swaps it in atomically (nothing is deleted under another process)."""
        warnings.warn(f"The cache at {self.directory} is damaged ({reason}); it is recomputed.",
                      DamagedCacheWarning, stacklevel=3)

    def _open(self, mode: str = "r"):
        if self._damaged:
            return None, None, None
        ids_path = self.directory / "ids.npy"
        if not ids_path.is_file():
            if ids_path.exists() or (self.directory / "cache.json").exists():
                # cache.json is written last: with it present, every file must be there
                self._discard(f"{ids_path} is {'not a file' if ids_path.exists() else 'missing'}")
                self._damaged = True
            return None, None, None
        try:
            ids = np.load(self.directory / "ids.npy", allow_pickle=False)
            values = np.load(self.directory / "values.npy", mmap_mode=mode, allow_pickle=False)
            filled = np.load(self.directory / "filled.npy", mmap_mode=mode, allow_pickle=False)
        except (OSError, ValueError, EOFError) as exc:  # truncated or missing files
            self._discard(f"{type(exc).__name__}: {exc}")
            self._damaged = True
            return None, None, None
        if (ids.ndim != 1 or ids.dtype != np.int64 or values.shape != (len(ids),) + self.shape
                or filled.shape != (len(ids),) or values.dtype != self.dtype or filled.dtype != bool
                or (len(ids) > 1 and not np.all(ids[1:] > ids[:-1]))):
            reason = (f"ids {ids.shape} {ids.dtype}, values {values.shape} {values.dtype}, filled {filled.shape} "
                      f"{filled.dtype} do not fit sorted int64 ids and rows of {self.shape} {self.dtype}")
            del values, filled
            self._discard(reason)
            self._damaged = True
            return None, None, None
        return ids, values, filled

    def _create(self, ids: np.ndarray) -> None:
        """(Re)build the cache files for ``ids`` (sorted union with any existing ids)."""
        old_ids, old_values, old_filled = self._open("r")
        if old_ids is not None:
            ids = np.union1d(old_ids, ids)
        self.directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{self.directory.name}.", dir=self.directory.parent))
        try:
            np.save(tmp / "ids.npy", ids.astype(np.int64))
            values = np.lib.format.open_memmap(tmp / "values.npy", mode="w+", dtype=self.dtype,
                                               shape=(len(ids),) + self.shape)
            filled = np.lib.format.open_memmap(tmp / "filled.npy", mode="w+", dtype=bool,
                                               shape=(len(ids),))
            filled[:] = False
            if old_ids is not None:
                pos = np.searchsorted(ids, old_ids)
                for start in range(0, len(old_ids), 4096):
                    sl = slice(start, start + 4096)
                    values[pos[sl]] = old_values[sl]
                    filled[pos[sl]] = old_filled[sl]
            values.flush()
            filled.flush()
            del values, filled
            write_json_atomic(tmp / "cache.json", {"shape": list(self.shape), "dtype": self.dtype.name,
                                                   "description": self.description})
            replace_directory(tmp, self.directory)
            self._damaged = False
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    def _rows(self, ids: np.ndarray, cache_ids: np.ndarray) -> np.ndarray | None:
        pos = np.searchsorted(cache_ids, ids)
        pos = np.clip(pos, 0, len(cache_ids) - 1)
        if len(cache_ids) == 0 or not np.array_equal(cache_ids[pos], ids):
            return None
        return pos

    # -------------------------------------------------------------- public
    def missing(self, ids: np.ndarray) -> np.ndarray:
        """The ids among ``ids`` that have no computed value yet."""
        ids = np.asarray(ids, dtype=np.int64)
        with self._lock(shared=True):
            return self._missing(ids)

    def _missing(self, ids: np.ndarray) -> np.ndarray:
        cache_ids, _, filled = self._open("r")
        if cache_ids is None:
            return ids
        pos = self._rows(ids, cache_ids)
        if pos is None:
            known = np.isin(ids, cache_ids)
            out = ids[~known]
            kpos = np.searchsorted(cache_ids, ids[known])
            return np.concatenate([out, ids[known][~np.asarray(filled[kpos])]])
        return ids[~np.asarray(filled[pos])]

    def get(self, ids: np.ndarray) -> np.ndarray:
        """Values for ``ids`` as an array of shape (len(ids), *shape); all must be computed."""
        ids = np.asarray(ids, dtype=np.int64)
        with self._lock(shared=True):
            return self._get(ids)

    def _get(self, ids: np.ndarray) -> np.ndarray:
        cache_ids, values, filled = self._open("r")
        pos = None if cache_ids is None else self._rows(ids, cache_ids)
        if pos is None or not np.all(filled[pos]):
            raise DataError(f"The cache at {self.directory} does not hold all requested ids yet.")
        order = np.argsort(pos, kind="stable")
        out = np.empty((len(ids),) + self.shape, dtype=self.dtype)
        out[order] = values[pos[order]]
        return out

    def fill(self, ids: np.ndarray, compute: Callable[[np.ndarray], np.ndarray],
             batch_size: int = 256, progress: bool = True, desc: str = "computing targets") -> None:
        """Compute and store values for the ids among ``ids`` that are not cached yet.

        ``compute(batch_ids)`` returns an array of shape (len(batch_ids), *shape). Another
        process filling the same cache is waited for; what it computed is not computed again.
        """
        ids = np.asarray(ids, dtype=np.int64)
        if len(self.missing(ids)) == 0:
            return
        with self._lock(shared=False):
            self._fill(ids, compute, batch_size, progress, desc)

    def _fill(self, ids, compute, batch_size, progress, desc) -> None:
        if not self._damaged:  # another process may have swapped in a new version since: look again
            restore_directory(self.directory)
            self._check_meta()
        todo = self._missing(ids)
        if len(todo) == 0:
            return
        cache_ids, _, _ = self._open("r")
        if cache_ids is None or not np.all(np.isin(todo, cache_ids)):
            self._create(np.unique(np.asarray(ids, dtype=np.int64)))
        cache_ids, values, filled = self._open("r+")
        bar = tqdm(total=len(todo), desc=desc, unit="img", disable=bar_disabled(progress), leave=False)
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            result = np.asarray(compute(batch))
            if result.shape != (len(batch),) + self.shape:
                raise DataError(
                    f"Computed values have shape {result.shape}, expected {(len(batch),) + self.shape}."
                )
            pos = np.searchsorted(cache_ids, batch)
            values[pos] = result.astype(self.dtype)
            values.flush()
            filled[pos] = True
            filled.flush()
            bar.update(len(batch))
        bar.close()

    def get_or_compute(self, ids: np.ndarray, compute: Callable[[np.ndarray], np.ndarray],
                       **kwargs: Any) -> np.ndarray:
        self.fill(ids, compute, **kwargs)
        return self.get(ids)
