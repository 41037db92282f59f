"""Pieces of resumable, memory-light preparation shared by ``prepare-nsd`` and
``prepare-surfaces``: a ``.npy`` file written a row at a time, keys that tell whether a staged
file is still valid, progress bars and the process's peak memory."""

from __future__ import annotations

import hashlib
import os
import resource
import sys
from pathlib import Path
from typing import Any

import numpy as np

from brainrecon.errors import DataError
from brainrecon.progress import bar_disabled


class NpyRowWriter:
    """Write the rows of a ``.npy`` file one at a time with plain file writes.

    Creating the file reserves its full size (sparse where the filesystem allows); rows can
    be written in any order and rewritten, so a resumed copy may overlap the last checkpoint.

    Parameters
    ----------
    path : Path
    shape : tuple
        Full array shape; rows are along axis 0.
    dtype : numpy dtype
    resume : bool
        Reuse an existing file of the same shape and dtype instead of creating a new one.
    """

    def __init__(self, path: str | os.PathLike, shape: tuple[int, ...], dtype: Any, *, resume: bool = False):
        self.path = Path(path)
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        self.row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        existing = None
        if resume and self.path.is_file():
            try:
                existing = np.load(self.path, mmap_mode="r")
                if existing.shape != self.shape or existing.dtype != self.dtype:
                    existing = None
            except (ValueError, OSError, EOFError):
                existing = None
        if existing is None:
            existing = np.lib.format.open_memmap(self.path, mode="w+", dtype=self.dtype, shape=self.shape)
        self.offset = int(existing.offset)
        del existing
        self._f = open(self.path, "r+b")

    def write(self, row: int, value: np.ndarray) -> None:
        value = np.ascontiguousarray(value, dtype=self.dtype)
        if value.shape != self.shape[1:]:
            raise DataError(f"{self.path}: row {row} has shape {value.shape}; expected {self.shape[1:]}.")
        self._f.seek(self.offset + row * self.row_bytes)
        self._f.write(value.tobytes())

    def sync(self) -> None:
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        if not self._f.closed:
            self.sync()
            self._f.close()

    def __enter__(self) -> "NpyRowWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

def array_digest(*arrays: np.ndarray) -> str:
    """A short SHA-256 of the arrays' bytes (what a staged file was made from)."""
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:20]

def file_key(path: Path) -> dict[str, int]:
    """Size and modification time of ``path``: a file changed or replaced since gets another key."""
    st = path.stat()
    return {"size": int(st.st_size), "mtime_ns": int(st.st_mtime_ns)}

def npy_matches(path: Path, shape: tuple[int, ...], dtype: Any) -> bool:
    """Whether ``path`` is a readable ``.npy`` file of this shape and dtype."""
    if not path.is_file():
        return False
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError):
        return False
    ok = arr.shape == tuple(shape) and arr.dtype == np.dtype(dtype)
    del arr
    return ok

def peak_memory_mb() -> float:
    """Peak resident memory of this process so far, in MB (``getrusage`` max RSS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1e6 if sys.platform == "darwin" else rss / 1e3

def progress_bar(progress: bool, **kwargs):
    """A tqdm bar that follows :func:`brainrecon.progress.bar_disabled`."""
    from tqdm.auto import tqdm

    return tqdm(disable=bar_disabled(progress), **kwargs)


__all__ = ["NpyRowWriter", "array_digest", "file_key", "npy_matches", "peak_memory_mb", "progress_bar"]
