"""Runs: one directory per fit (and its evaluation).

::

    runs/<name>/
        run.json            decoder, parameters, subject, target, dataset spec and fingerprint
        decoder/            the saved decoder (brainrecon.json + weights)
        test_ids.npy        int64 image ids of the test rows, in order
        predictions.npy     decoder output in its target space (decoders that predict targets)
        reconstructions.npy uint8 (N, H, W, 3) images aligned with test_ids, when they exist
        metrics.json        the evaluation report (MindEye's recipe, the default variant)
        per_image.csv       its per-image scores
        metrics-<variant>.json, per_image-<variant>.csv
                            the report of another variant (``evaluate --variant braindiffuser``)
        grid.png            ground truth beside reconstructions

A run directory is built under a temporary name and renamed when complete, so a crash never
leaves a half-written run at its final path, and an existing run is replaced only when the
user asks (``overwrite=True`` / ``--overwrite``).
"""

from __future__ import annotations

import datetime as _dt
import os
import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from brainrecon import __version__
from brainrecon.errors import BrainreconError, BrainreconWarning
from brainrecon.io import (
    atomic_directory,
    jsonable,
    load_array,
    read_json,
    restore_directory,
    write_array_atomic,
    write_json_atomic,
)

RUN_FILE = "run.json"
#: Fields a run.json must have for the run to be opened (write_run writes many more).
RUN_FIELDS = ("decoder", "subject")
_REFIT = "the run is damaged: fit it again (`brainrecon fit ... --overwrite`)"
_REEVAL = "re-run `brainrecon evaluate RUN` to write it again"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")

if TYPE_CHECKING:  # brainrecon.eval imports torch: only when a report is read
    from brainrecon.eval.report import EvalReport

__all__ = [
    "Run",
    "expand_runs",
    "list_runs",
    "write_array_atomic",
    "write_json_atomic",
    "write_run",
]


class Run:
    """A read-only view of a run directory."""

    def __init__(self, path: str | os.PathLike, info: dict[str, Any]):
        self.path = Path(path)
        self.info = info

    @classmethod
    def open(cls, path: str | os.PathLike) -> "Run":
        from brainrecon.hub import is_hub_address, resolve_hub_address

        path = resolve_hub_address(path) if is_hub_address(path) else Path(path)
        restore_directory(path)  # an --overwrite killed mid-swap left the previous run aside
        if not (path / RUN_FILE).is_file():
            raise BrainreconError(
                f"{path} is not a brainrecon run ({RUN_FILE} is missing). "
                f"Runs are written by `brainrecon fit`."
            )
        info = read_json(path / RUN_FILE, required=RUN_FIELDS, fix=_REFIT,
                         types={"decoder": str, "name": str, "data": dict, "fingerprint": str})
        try:
            int(info["subject"])
        except (TypeError, ValueError):
            raise BrainreconError(
                f"{path / RUN_FILE}: field 'subject' is {info['subject']!r}, expected an integer; {_REFIT}."
            ) from None
        return cls(path, info)

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r}, decoder={self.info.get('decoder')!r}, subject={self.subject})"

    @property
    def name(self) -> str:
        return self.info.get("name", self.path.name)

    @property
    def subject(self) -> int:
        return int(self.info["subject"])

    def _optional_array(self, filename: str, dtype_kind: str, ndim: int | None = None) -> np.ndarray | None:
        f = self.path / filename
        if not f.exists():
            return None
        arr = load_array(f, fix=_REFIT, mmap=True, dtype_kind=dtype_kind, ndim=ndim)
        n = len(self.test_ids())
        if arr.ndim == 0 or arr.shape[0] != n:
            raise BrainreconError(
                f"{f} has shape {arr.shape}, expected {n} rows (one per test id); {_REFIT}."
            )
        return arr

    def test_ids(self) -> np.ndarray:
        return load_array(self.path / "test_ids.npy", fix=_REFIT, dtype_kind="iu", ndim=1)

    def predictions(self) -> np.ndarray | None:
        """The decoder's predictions for the test ids (floating point, one row per id)."""
        return self._optional_array("predictions.npy", "f")

    def reconstructions(self) -> np.ndarray | None:
        """The reconstructed images, uint8 ``(N, H, W, 3)`` aligned with the test ids."""
        arr = self._optional_array("reconstructions.npy", "u", ndim=4)
        if arr is not None and (arr.dtype != np.uint8 or arr.shape[-1] != 3):
            raise BrainreconError(
                f"{self.path / 'reconstructions.npy'} is {arr.dtype} {arr.shape}, expected uint8 "
                f"(N, H, W, 3); {_REFIT}."
            )
        return arr

    def metrics(self, variant: str = "mindeye") -> EvalReport | None:
        """The run's evaluation report with ``variant``, or None if the run was not evaluated so.

        Parameters
        ----------
        variant : {"mindeye", "braindiffuser"}
            Which report: ``metrics.json`` (MindEye's recipe, the default) or
            ``metrics-<variant>.json`` (:func:`brainrecon.eval.report.report_files`).

        Returns
        -------
        brainrecon.eval.EvalReport or None
            A mapping metric name -> mean over the test images (``run.metrics()["PixCorr"]``),
            with ``intervals``, ``unavailable`` (metric -> why it was not scored), ``settings``
            and ``n_images``. Per-image scores are not read here:
            ``EvalReport.load(path)`` reads them too.
        """
        from brainrecon.eval.report import EvalReport, report_files

        f = self.path / report_files(variant)[0]
        if not f.exists():
            return None
        data = read_json(f, fix=_REEVAL.replace("RUN", f"RUN --variant {variant}") if variant != "mindeye" else _REEVAL,
                         types={"metrics": dict})
        try:
            return EvalReport.from_json(data)
        except BrainreconError as exc:
            raise BrainreconError(f"{f}: {exc}") from None

    def variants(self) -> list[str]:
        """The evaluation variants this run has a report of (``metrics.json`` is ``"mindeye"``)."""
        from brainrecon.eval.report import VARIANTS, report_files

        return [v for v in VARIANTS if (self.path / report_files(v)[0]).is_file()]

    def dataset(self, source: str | os.PathLike | None = None):
        """The run's dataset (re-opened from its spec, or from ``source`` if the data moved)."""
        from brainrecon.data import dataset_from_spec, load_dataset

        if source is not None:
            ds = load_dataset(source, subjects=[self.subject])
            if ds.fingerprint(self.subject) != self.info.get("fingerprint"):
                raise BrainreconError(
                    f"The data at {source} is not the data run {self.name!r} was fitted on "
                    f"(fingerprint {ds.fingerprint(self.subject)} != {self.info.get('fingerprint')})."
                )
            return ds
        if "data" not in self.info:
            raise BrainreconError(
                f"{self.path / RUN_FILE} is missing field 'data' (where the run's data is); "
                f"pass the data's location as source, or {_REFIT}.", parameters=("source",)
            )
        return dataset_from_spec(self.info["data"])

    def load_decoder(self):
        from brainrecon.decoders import load_decoder

        return load_decoder(self.path / "decoder")

    def set_reconstructions(self, images: np.ndarray) -> None:
        """Store reconstructions (uint8 (N, H, W, 3) aligned with test_ids), atomically."""
        images = np.asarray(images)
        n = len(self.test_ids())
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[0] != n or images.shape[-1] != 3:
            raise BrainreconError(
                f"Reconstructions must be uint8 of shape ({n}, H, W, 3); got {images.dtype} {images.shape}."
            )
        write_array_atomic(self.path / "reconstructions.npy", images)


def check_run_name(name: str) -> str:
    if not _NAME_RE.match(name):
        raise BrainreconError(
            f"Invalid run name {name!r}: use letters, digits, '.', '_' and '-' (not starting with '.' or '-')."
        )
    return name


def default_run_name(decoder_name: str, subject: int, target: str | None) -> str:
    parts = [decoder_name, f"subj{int(subject):02d}"]
    if target:
        parts.append(target)
    return "-".join(parts)


def write_run(
    out_dir: str | os.PathLike,
    name: str,
    *,
    decoder,
    dataset,
    subject: int,
    predictions: np.ndarray | None,
    reconstructions: np.ndarray | None = None,
    overwrite: bool = False,
    extra: dict[str, Any] | None = None,
    seed: int | None = None,
) -> Run:
    """Write a complete run directory atomically and return it.

    Parameters
    ----------
    predictions : array or None
        The decoder's output for ``subject`` on ``dataset.test``: target values of shape
        (n_test, *target_shape) or uint8 images (n_test, H, W, 3).
    reconstructions : uint8 array (n_test, H, W, 3) or None
        Images to evaluate (for image decoders these are the predictions).
    seed : int, optional
        The seed the fit used (:func:`brainrecon.workflows.fit`), recorded in the provenance;
        default: the decoder's ``seed`` parameter.
    """
    check_run_name(name)
    path = Path(out_dir) / name
    if path.exists() and not overwrite:
        raise BrainreconError(
            f"Run directory {path} already exists; choose another name or pass overwrite=True to replace it.",
            parameters=("name", "overwrite")
        )
    subject = int(subject)
    test_ids = dataset.test.ids(subject)
    info = {
        "name": name,
        "decoder": decoder.name,
        "params": jsonable(decoder.get_params()),
        "subject": subject,
        "target": (decoder.target_space() or (None,))[0],
        "predicts": decoder.predicts,
        "data": dataset.spec,
        "data_name": dataset.name,
        "ids_are_nsd": dataset.ids_are_nsd,
        "fingerprint": dataset.fingerprint(subject),
        "n_test": int(len(test_ids)),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "brainrecon_version": __version__,
        "provenance": provenance(decoder, seed=seed),
    }
    if extra:
        info.update(extra)
    with atomic_directory(path, overwrite=overwrite) as tmp:
        decoder.save(tmp / "decoder")
        write_array_atomic(tmp / "test_ids.npy", np.asarray(test_ids, dtype=np.int64))
        if predictions is not None:
            if len(predictions) != len(test_ids):
                raise BrainreconError(
                    f"{len(predictions)} predictions for {len(test_ids)} test images of subject {subject}."
                )
            write_array_atomic(tmp / "predictions.npy", predictions)
        if reconstructions is not None:
            write_array_atomic(tmp / "reconstructions.npy", np.asarray(reconstructions, dtype=np.uint8))
        write_json_atomic(tmp / RUN_FILE, info)
    return Run(path, info)


def provenance(decoder=None, seed: int | None = None) -> dict[str, Any]:
    """What made a run: package versions, the git commit of a brainrecon checkout (when
    there is one), the exact command line, the seed used (``seed``, else the decoder's ``seed``
    parameter) and the device."""
    import platform
    import subprocess
    import sys
    from importlib import metadata

    versions = {}
    for package in ("brainrecon", "numpy", "torch", "diffusers", "transformers", "himalaya", "flwr"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    commit = None
    source = Path(__file__).resolve().parent.parent
    if (source / ".git").exists():
        try:
            out = subprocess.run(["git", "-C", str(source), "rev-parse", "HEAD"],
                                 capture_output=True, text=True, timeout=10)
            if out.returncode == 0:
                commit = out.stdout.strip()
                dirty = subprocess.run(["git", "-C", str(source), "status", "--porcelain",
                                        "--untracked-files=no"],
                                       capture_output=True, text=True, timeout=10)
                if dirty.returncode == 0 and dirty.stdout.strip():
                    commit += "+dirty"
        except (OSError, subprocess.SubprocessError):
            commit = None
    params = decoder.get_params() if decoder is not None else {}
    return {
        "versions": versions,
        "git_commit": commit,
        "command": _redacted([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv else [],
        "python": platform.python_version(),
        "platform": platform.platform(),
        "seed": seed if seed is not None else params.get("seed"),
        "device": params.get("device"),
    }


_SECRET_FLAGS = ("token", "secret", "password")


def _redacted(argv: list[str]) -> list[str]:
    """The command line with the values of secret options (``--token`` and the like) replaced,
    so a run never records a credential (a Flower ClientApp process is started with one)."""
    out, hide = [], False
    for arg in argv:
        if hide:
            out.append("<redacted>")
            hide = False
            continue
        flag, eq, _ = arg.partition("=")
        if flag.startswith("-") and any(word in flag.lower() for word in _SECRET_FLAGS):
            if eq:
                out.append(f"{flag}=<redacted>")
            else:
                out.append(arg)
                hide = True
            continue
        out.append(arg)
    return out


def list_runs(root: str | os.PathLike) -> list[Run]:
    """Every readable run directly under ``root`` (sorted by name); a missing root gives an
    empty list. A broken run (damaged run.json, test ids or metrics) is skipped with a
    :class:`BrokenRunWarning` naming it, so one bad folder does not hide the others."""
    root = Path(root)
    if not root.is_dir():
        return []
    runs = []
    for p in sorted(root.iterdir()):
        if p.name.startswith(".") and p.name.endswith(".old"):
            restore_directory(p.with_name(p.name[1:-len(".old")]))
    for p in sorted(root.iterdir()):
        if p.name.startswith(".") or not (p / RUN_FILE).exists():
            continue  # hidden: a run being written (.partial) or the old copy of one being replaced
        try:
            run = Run.open(p)
            run.test_ids()
            run.metrics()
        except BrainreconError as exc:
            warnings.warn(BrokenRunWarning(f"skipping broken run {p.name}: {exc}", parameters=exc.parameters),
                          stacklevel=2)
            continue
        runs.append(run)
    return runs


def expand_runs(paths) -> list[Path]:
    """Run directories as given, with each folder of runs replaced by its readable runs (a
    broken one is skipped with a :class:`BrokenRunWarning`); a folder holding none is an error."""
    out: list[Path] = []
    for p in map(Path, paths):
        if (p / RUN_FILE).exists() or not p.is_dir():
            out.append(p)
        else:
            found = [r.path for r in list_runs(p)]
            if not found:
                raise BrainreconError(f"{p} is neither a run nor a folder holding readable runs.")
            out.extend(found)
    return out


class BrokenRunWarning(BrainreconWarning):
    """A run folder that cannot be read was left out of a collection."""
