"""Atomic file writes: a reader never sees a half-written file at its final path.

Every file a user keeps (saved decoders, run records, prepared data, caches) goes through
these helpers: the content is written to a temporary sibling, flushed, and renamed over the
final path with :func:`os.replace`, which is atomic on POSIX and Windows.

The readers here are the other half: a missing, truncated or wrongly typed file, or arrays
that differ from what the configuration says, is one :class:`BrainreconError` naming the
file, what is wrong (expected vs found) and what to do.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import numpy as np

from brainrecon.errors import BrainreconError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it to ``path`` on success.

    On an exception the temporary file is removed and ``path`` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, sort_keys=False, default=_json_default)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
    return Path(path)


def write_array_atomic(path: str | os.PathLike, array: np.ndarray) -> Path:
    """Save ``array`` as ``.npy`` to ``path`` atomically (never pickled)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, np.asarray(array), allow_pickle=False)
    return Path(path)


def write_npz_atomic(path: str | os.PathLike, **arrays: np.ndarray) -> Path:
    """Save named arrays as an uncompressed ``.npz`` atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **{k: np.asarray(v) for k, v in arrays.items()})
    return Path(path)


_JSON_KINDS = {dict: "an object", list: "a list", str: "a string", int: "an integer", float: "a number",
               bool: "true or false", type(None): "null"}


def _json_kind(value: Any) -> str:
    return _JSON_KINDS.get(type(value), type(value).__name__)


def read_json(path: str | os.PathLike, *, required: Iterable[str] = (),
              fix: str = "re-create it with the command that wrote it",
              types: Mapping[str, type | tuple[type, ...]] | None = None) -> Any:
    """Read a JSON file; a damaged one is a :class:`BrainreconError` naming the file, what is
    wrong (missing, a directory, empty, not JSON, not an object, missing field X, field X of
    the wrong kind) and ``fix``.

    ``types`` maps field names to the Python type(s) their values must have when present
    (``int`` excludes ``bool``); with ``required`` or ``types`` the file must hold an object.
    """
    path = Path(path)
    if path.is_dir():
        raise BrainreconError(f"{path} is a directory where a JSON file should be; {fix}.")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise BrainreconError(f"{path} is missing; {fix}.") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise BrainreconError(f"{path} cannot be read ({exc}); {fix}.") from None
    if not text.strip():
        raise BrainreconError(f"{path} is empty (a write was cut short?); {fix}.")
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise BrainreconError(f"{path} is not valid JSON ({exc}; truncated?); {fix}.") from None
    required = list(required)
    if (required or types) and not isinstance(data, dict):
        raise BrainreconError(f"{path} holds {_json_kind(data)}, expected a JSON object; {fix}.")
    missing = [k for k in required if k not in data]
    if missing:
        raise BrainreconError(
            f"{path} is missing field(s) {', '.join(map(repr, missing))}; {fix}."
        )
    for key, kinds in (types or {}).items():
        if key not in data:
            continue
        kinds = kinds if isinstance(kinds, tuple) else (kinds,)
        value = data[key]
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            want = " or ".join(_JSON_KINDS.get(k, k.__name__) for k in kinds)
            raise BrainreconError(f"{path}: field {key!r} is {_json_kind(value)}, expected {want}; {fix}.")
    return data


def check_arrays(path: str | os.PathLike, arrays: Mapping[str, Any],
                 expected: Mapping[str, tuple[tuple[int | None, ...], str | tuple[str, ...]]], *,
                 fix: str, optional: Iterable[str] = ()) -> None:
    """Check the arrays (numpy) or tensors (torch) read from ``path`` against what the
    configuration says they must be: ``expected`` maps each name to ``(shape, dtype)``, where
    ``None`` in a shape matches any length and ``dtype`` is a name (``"float32"``) or a tuple
    of accepted names. Missing names (other than ``optional`` ones), unexpected names, and
    every shape or dtype that differs are one :class:`BrainreconError`, expected vs found.
    """
    optional = set(optional)
    problems = []
    missing = [k for k in expected if k not in arrays and k not in optional]
    if missing:
        problems.append(f"missing {', '.join(map(repr, missing))}")
    extra = sorted(set(arrays) - set(expected))
    if extra:
        problems.append(f"unexpected {', '.join(map(repr, extra))}")
    for key, (shape, dtypes) in expected.items():
        if key not in arrays:
            continue
        dtypes = (dtypes,) if isinstance(dtypes, str) else tuple(dtypes)
        got_shape = tuple(int(d) for d in arrays[key].shape)
        got_dtype = str(arrays[key].dtype).removeprefix("torch.")
        shape_ok = len(got_shape) == len(shape) and all(e is None or e == g for e, g in zip(shape, got_shape))
        if not shape_ok or got_dtype not in dtypes:
            want = "(" + ", ".join("any" if d is None else str(d) for d in shape) + ("," if len(shape) == 1 else "") + ")"
            problems.append(f"{key!r} is {got_dtype} {got_shape}, expected {'/'.join(dtypes)} {want}")
    if problems:
        shown = "; ".join(problems[:4]) + (f"; and {len(problems) - 4} more" if len(problems) > 4 else "")
        raise BrainreconError(f"{path} does not hold what its configuration says: {shown}; {fix}.")


def load_array(path: str | os.PathLike, *, fix: str, mmap: bool = False,
               dtype_kind: str | None = None, ndim: int | None = None) -> np.ndarray:
    """Load a ``.npy`` array; a damaged or wrongly typed one is a :class:`BrainreconError`
    naming the file, what is wrong (expected vs found) and ``fix``."""
    path = Path(path)
    if path.is_dir():
        raise BrainreconError(f"{path} is a directory where an array file should be; {fix}.")
    try:
        arr = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except FileNotFoundError:
        raise BrainreconError(f"{path} is missing; {fix}.") from None
    except (ValueError, OSError, EOFError) as exc:
        raise BrainreconError(f"{path} is damaged or truncated ({exc}); {fix}.") from None
    if dtype_kind is not None and arr.dtype.kind not in dtype_kind:
        raise BrainreconError(
            f"{path} holds {arr.dtype} values, expected dtype kind {dtype_kind!r}; {fix}."
        )
    if ndim is not None and arr.ndim != ndim:
        raise BrainreconError(
            f"{path} has shape {arr.shape}, expected {ndim} dimension(s); {fix}."
        )
    return arr


def load_npz(path: str | os.PathLike, *, fix: str, required: Iterable[str] = ()) -> dict[str, np.ndarray]:
    """All arrays of an ``.npz`` file, read eagerly; a damaged file or a missing array is a
    :class:`BrainreconError` naming the file and ``fix``."""
    import zipfile

    path = Path(path)
    if path.is_dir():
        raise BrainreconError(f"{path} is a directory where an .npz file should be; {fix}.")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except FileNotFoundError:
        raise BrainreconError(f"{path} is missing; {fix}.") from None
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise BrainreconError(f"{path} is damaged or truncated ({exc}); {fix}.") from None
    missing = [k for k in required if k not in arrays]
    if missing:
        raise BrainreconError(f"{path} is missing array(s) {missing}; {fix}.")
    return arrays


def load_safetensors(path: str | os.PathLike, *, fix: str) -> dict:
    """All tensors of a ``.safetensors`` file; a missing, empty, truncated or otherwise damaged
    file is a :class:`BrainreconError` naming the file and ``fix``."""
    from safetensors.torch import load_file

    path = Path(path)
    if path.is_dir():
        raise BrainreconError(f"{path} is a directory where a .safetensors file should be; {fix}.")
    if not path.is_file():
        raise BrainreconError(f"{path} is missing; {fix}.")
    try:
        return load_file(str(path))
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own SafetensorError
        raise BrainreconError(f"{path} is damaged or truncated ({exc}); {fix}.") from None


def save_safetensors_atomic(state: Mapping[str, Any], path: str | os.PathLike,
                            metadata: dict[str, str] | None = None) -> Path:
    """Write the torch tensors of ``state`` to ``path`` as safetensors (contiguous CPU copies),
    atomically: an interrupted write never leaves a partial file at ``path``."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return Path(path)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Build a directory under a temporary name; move it to ``path`` when the block succeeds.

    With ``overwrite=True`` an existing ``path`` is replaced only after the new one is
    complete; otherwise the caller must have checked that ``path`` does not exist.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
    try:
        yield tmp
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} appeared while it was being written; nothing was overwritten")
        replace_directory(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def directory_lock(directory: str | os.PathLike, *, shared: bool = False,
                   waiting: str | None = None) -> Iterator[None]:
    """Hold an advisory ``flock`` on ``.<name>.lock`` beside ``directory`` for the block.

    Processes sharing a cache take it exclusively to create, fill or swap the directory and
    shared to read it, so no reader sees files of two versions and no writer's rows are lost
    in another's rebuild. Waiting is said once on stderr (``waiting`` names what is waited
    for). The kernel drops a dead holder's lock. Where no lock file can be made (a read-only
    folder, a system without ``fcntl``) the block runs unlocked: nothing can write there.
    """
    import sys

    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    directory = Path(directory)
    lock_path = directory.with_name(f".{directory.name}.lock")
    try:
        if not shared:
            lock_path.parent.mkdir(parents=True, exist_ok=True)
        elif not lock_path.parent.is_dir():  # nothing there to read, nor to protect
            yield
            return
        handle = open(lock_path, "a+b")
    except OSError:
        yield
        return
    mode = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
    try:
        try:
            fcntl.flock(handle, mode | fcntl.LOCK_NB)
        except OSError:
            if waiting:
                print(f"Waiting for another process using {waiting} ({directory})...", file=sys.stderr)
            fcntl.flock(handle, mode)
        yield
    finally:
        handle.close()  # closing releases the lock


def restore_directory(final: str | os.PathLike) -> bool:
    """Undo a :func:`replace_directory` cut between its two renames (a kill, a power cut):
    ``final`` is missing and the previous version waits as ``.final.old``; rename it back,
    with a warning. Returns whether it did."""
    import warnings

    final = Path(final)
    old = final.with_name(f".{final.name}.old")
    if final.exists() or not old.is_dir():
        return False
    try:
        os.replace(old, final)
    except OSError:  # another process restored it first, or the disk is read-only
        return final.exists()
    warnings.warn(f"{final} was being replaced when the process stopped; its previous version was restored.",
                  RuntimeWarning, stacklevel=2)
    return True


def replace_directory(build: str | os.PathLike, final: str | os.PathLike) -> Path:
    """Move the finished directory ``build`` to ``final``, replacing an older ``final``.

    The old directory is first renamed aside, so ``final`` never holds a mix of old and new
    files; it is deleted once the new one is in place.
    """
    build, final = Path(build), Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists():
        old = final.with_name(f".{final.name}.old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
        os.replace(build, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(build, final)
    return final


def jsonable(value: Any) -> Any:
    """``value`` in the form it has after a JSON round trip: dict keys as str, tuples as lists,
    numpy scalars and arrays as Python numbers and lists, paths as str.

    Used to store parameters and to compare stored settings with current ones.
    """
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (np.ndarray, np.generic, Path)):
        return jsonable(_json_default(value))
    return value


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serialisable")


# --------------------------------------------------------------------------- released pickles
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_GLOBAL = re.compile(r"GLOBAL ([A-Za-z_][\w.]*)")


def torch_load_weights_only(path: str | os.PathLike, what: str, *, error: type[BrainreconError] = BrainreconError,
                            hint: str = "", allowed: tuple = (), parameters: tuple[str, ...] = ()) -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)`` with errors that say what to do.

    The one way brainrecon reads a pickle (released checkpoints of other projects).
    ``weights_only=True`` rebuilds only tensors, containers and plain values (plus the classes in
    ``allowed``); anything else is refused with one message that names the class the file
    needs (torch's own message, less its terminal colour codes), says why, and how to re-save
    the weights. ``hint`` is appended (e.g. "this looks like the encoder file: pass it as
    encoder"; ``parameters`` names the library parameters it mentions). Errors are ``error`` (a :class:`BrainreconError` subclass); a missing file is a
    :class:`~brainrecon.errors.WeightsNotFoundError`.
    """
    import pickle

    import torch

    from brainrecon.errors import WeightsNotFoundError

    path = Path(path)
    if not path.is_file():
        raise WeightsNotFoundError(f"The {what} file {path} does not exist.")
    try:
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        text = _ANSI.sub("", str(exc))
        found = _GLOBAL.search(text)
        needs = (f"the class {found.group(1)}" if found else
                 (text.strip().splitlines()[0] if text.strip() else type(exc).__name__))
        cls = error if issubclass(error, BrainreconError) else BrainreconError
        raise cls(
            f"Refusing to read {path} ({what}): it needs {needs} to unpickle, more than tensors and plain "
            f"values. brainrecon reads released files with torch.load(weights_only=True) only, because a "
            f"general pickle can run code. If you trust the file, re-save just its weights in a trusted "
            f"Python session (torch.save(state_dict, 'weights_only.pth') with the tensors of "
            f"torch.load(path, weights_only=False)) and pass that file.{(' ' + hint) if hint else ''}",
            parameters=parameters,
        ) from exc
    except (RuntimeError, EOFError, OSError) as exc:
        cls = error if issubclass(error, BrainreconError) else BrainreconError
        raise cls(f"Cannot read {path} ({what}) with torch.load: {_ANSI.sub('', str(exc))}") from exc
