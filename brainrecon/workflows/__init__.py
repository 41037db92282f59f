"""The steps the CLI runs, as plain functions a user can call from Python.

>>> from brainrecon.workflows import fit
>>> runs = fit("ridge", target="pixels", subjects=[1], out="runs")   # synthetic data
>>> runs[0].metrics()["PixCorr"]            # mean over the test images (an EvalReport)
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from brainrecon.data import load_dataset
from brainrecon.decoders import get_decoder_class
from brainrecon.errors import BrainreconError
from brainrecon.io import jsonable, write_array_atomic
from brainrecon.runs import Run, check_run_name, default_run_name
from brainrecon.workflows.write import write_subject_runs

Log = Callable[[str], None]

#: The seed of a fit when none is given. A decoder with a ``seed`` parameter keeps its own
#: default (0 for the built-ins; this one if its default is None); numpy's, Python's and torch's
#: global generators are seeded with the fit's seed while it fits and predicts.
DEFAULT_SEED = 0


def _quiet(message: str) -> None:
    pass


def _run_names(decoder_name: str, subjects: Sequence[int], target: str | None,
               name: str | None) -> dict[int, str]:
    if name is None:
        return {s: default_run_name(decoder_name, s, target) for s in subjects}
    check_run_name(name)
    if len(subjects) == 1:
        return {subjects[0]: name}
    return {s: f"{name}-subj{s:02d}" for s in subjects}


#: Parameters that fix a BrainGuard network's shape: ``fit --init-from`` takes them from the saved
#: decoder unless they are given explicitly.
_BRAINGUARD_SIZES = ("target", "target_options", "hidden", "n_blocks", "branches", "projector_hidden")


def _init_from_sizes(decoder: str, params: dict[str, Any], log: Log) -> dict[str, Any]:
    """For ``brainguard`` with ``init_from``: the saved decoder's sizes (and target) under ``params``."""
    if decoder != "brainguard" or not params.get("init_from"):
        return params
    from brainrecon.decoders.base import CONFIG_FILE
    from brainrecon.io import read_json

    config_path = Path(params["init_from"]) / CONFIG_FILE
    if not config_path.is_file():
        return params  # the decoder names the problem
    saved = (read_json(config_path).get("params") or {})
    taken = {k: saved[k] for k in _BRAINGUARD_SIZES if k in saved and k not in params}
    if taken:
        log(f"from init_from: {', '.join(f'{k}={v!r}' for k, v in taken.items())}")
    return {**taken, **params}


def fit(
    decoder: str,
    *,
    data: str | os.PathLike | None = None,
    subjects: Sequence[int] | None = None,
    target: str | None = "pixels",
    out: str | os.PathLike = "runs",
    name: str | None = None,
    overwrite: bool = False,
    params: dict[str, Any] | None = None,
    recipe: str | None = None,
    evaluate: bool = True,
    dataset=None,
    log: Log = _quiet,
    engine: str = "local",
) -> list[Run]:
    """Fit a decoder, predict the test split, write one run per subject, reconstruct and score.

    Parameters
    ----------
    decoder : str
        Registry name (``brainrecon.decoders.available()``).
    data : path or None
        Data source (see :func:`brainrecon.data.load_dataset`); None uses ``$BRAINRECON_DATA``
        or the synthetic dataset.
    subjects : sequence of int, optional
        Subjects to fit. Single-subject decoders (ridge) are fitted once per subject;
        multi-subject decoders (BrainGuard, NeuroPictor pre-training) once for all of them.
        Default: the first subject of the dataset for single-subject decoders, all subjects
        for multi-subject ones.
    target : str or None
        Target space for decoders that predict targets (``"pixels"``, ``"ipadapter"``, ``"clip"``); None:
        the recipe's, or (BrainGuard with ``init_from``) the saved decoder's, else ``"pixels"``.
    out, name, overwrite
        Runs are written to ``out/name`` (one per subject; default names
        ``<decoder>-subjXX-<target>``). Existing runs are refused unless ``overwrite``.
    params : dict
        Further decoder parameters. ``seed`` is taken by every decoder: one with a ``seed``
        parameter gets it; for every decoder the global random generators are seeded with it
        during the fit (default: the decoder's own default seed, else :data:`DEFAULT_SEED`).
        ``run.json`` records the seed used under ``provenance.seed``.
    recipe : str, optional
        A named recipe of the decoder (:mod:`brainrecon.recipes`); explicitly given
        ``params`` win over its values. The run records the recipe's name.
    evaluate : bool
        Score reconstructions with the evaluation harness when they exist.
    engine : {"local", "flower"}
        BrainGuard only: train in this process (default), or on Flower with one site
        process per subject on loopback (:func:`brainrecon.federation.loopback.fit_on_flower`).

    Returns
    -------
    list of Run
    """
    from brainrecon.decoders import apply_recipe

    cls = get_decoder_class(decoder)
    params = apply_recipe(decoder, recipe, params or {})
    if recipe is not None:
        log(f"recipe {recipe!r} applied (explicit parameters win)")
    params = _init_from_sizes(decoder, params, log)
    if target is None and cls.predicts == "target":
        # The recipe's (or the continued decoder's) target, else the default.
        target = params.get("target") or "pixels"
    ds = dataset if dataset is not None else load_dataset(data, subjects=subjects)
    if subjects is None:
        subjects = ds.subjects if cls.multi_subject else ds.subjects[:1]
    subjects = [int(s) for s in subjects]
    for s in subjects:
        if s not in ds.subjects:
            raise BrainreconError(f"Subject {s} is not in the data; available subjects: {ds.subjects}.")
    accepted = cls._param_names()
    seed = _fit_seed(cls, params, accepted)
    if cls.predicts == "target":
        params["target"] = target
    run_target = target if cls.predicts == "target" else None
    names = _run_names(decoder, subjects, run_target, name)
    cls.check_params(params)
    kept: set[int] = set()  # runs this fit wrote before it was interrupted (--resume)
    for s, run_name in names.items():
        path = Path(out) / run_name
        if path.exists() and not overwrite:
            if params.get("resume") and _written_by_this_fit(path, cls, params, s):
                kept.add(s)
                continue
            hint = (" (with --resume the finished checkpoint is reused: nothing is trained again)"
                    if params.get("resume") else "")
            raise BrainreconError(
                f"Run directory {path} already exists; choose another --name or pass --overwrite{hint}."
            )

    if engine not in ("local", "flower"):
        raise BrainreconError(f"Unknown engine {engine!r}. Valid choices: 'local', 'flower'.")
    if engine == "flower":
        if decoder != "brainguard":
            raise BrainreconError(f"--engine flower is for the brainguard decoder, not {decoder!r}.")
        from brainrecon.federation.loopback import fit_on_flower

        # Each site opens the data itself and reads only its own subject.
        source = data if data is not None else os.environ.get("BRAINRECON_DATA", "synthetic")
        paths = fit_on_flower(params, data=str(source), subjects=subjects, out=out, names=names,
                              overwrite=overwrite, recipe=recipe, state_dir=params.get("checkpoint_dir"), log=log)
        for path in paths:
            log(f"wrote run {path}")
            if evaluate and (path / "reconstructions.npy").exists():
                evaluate_run_safely(Run.open(path), log=log)
        return [Run.open(p) for p in paths]
    if cls.multi_subject:  # fitted once on all subjects; each run holds its subject's part
        fitted = cls.for_subjects(subjects, **params)
        with seeded(seed):
            fitted.fit(ds.train)
        per_subject = {s: fitted.for_subject(s) for s in subjects}
    else:
        per_subject = {}
        for s in subjects:
            log(f"fitting {decoder} on subject {s}")
            with seeded(seed):
                per_subject[s] = cls.for_subjects([s], **params).fit(ds.train)

    if not _is_main_process():
        # Under `accelerate launch` every process trains; one writes and scores the runs.
        return []
    return write_subject_runs(per_subject, ds, out=out, names=names,
                              private=cls.private_runs,  # BrainGuard: a run holds one subject's data
                              overwrite=overwrite, extra={"recipe": recipe}, seed=seed,
                              evaluate=evaluate, kept=kept, log=log)


def _fit_seed(cls, params: dict[str, Any], accepted: Sequence[str]) -> int:
    """The seed of a fit (the given one, else the decoder's default, else :data:`DEFAULT_SEED`);
    a decoder with a ``seed`` parameter gets it in ``params``, one without loses the key."""
    given = params.get("seed") if "seed" in accepted else params.pop("seed", None)
    if given is None and "seed" in accepted:
        given = cls.default_params().get("seed")
    seed = DEFAULT_SEED if given is None else given
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise BrainreconError(f"seed must be an integer, got {seed!r}.")
    if "seed" in accepted:
        params["seed"] = int(seed)
    return int(seed)


@contextlib.contextmanager
def seeded(seed: int):
    """Within the block, numpy's legacy global generator, Python's ``random`` and (when torch is
    loaded) torch's CPU generator start from ``seed``; each is restored afterwards, so a decoder
    that draws from them is reproducible and the caller's generators are left as they were."""
    import random
    import sys

    torch = sys.modules.get("torch")
    states = (np.random.get_state(), random.getstate(),
              torch.default_generator.get_state() if torch is not None else None)
    np.random.seed(seed)
    random.seed(seed)
    if torch is not None:
        torch.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        np.random.set_state(states[0])
        random.setstate(states[1])
        if torch is not None:
            torch.default_generator.set_state(states[2])


def log_unavailable(reports, log: Log = _quiet) -> None:
    """Say once, in one short line, which metrics the ``reports`` could not score (and the one
    command that helps); the reasons per metric stay in each run's ``metrics.json``."""
    from brainrecon.eval.report import unavailable_summary

    unavailable: dict[str, str] = {}
    for report in reports:
        for metric, why in (getattr(report, "unavailable", None) or {}).items():
            unavailable.setdefault(metric, why)
    line = unavailable_summary(unavailable)
    if line:
        log(line)


def _written_by_this_fit(path: Path, cls, params: dict, subject: int) -> bool:
    """Whether the run at ``path`` is complete and holds a decoder of ``cls`` with exactly the
    parameters this fit would save (so a fit resumed after a kill keeps it instead of asking
    for --overwrite)."""
    from brainrecon.io import read_json

    try:
        run = Run.open(path)
        saved = read_json(path / "decoder" / "brainrecon.json", required=("decoder", "params"))
    except BrainreconError:
        return False
    try:
        planned = cls.for_subjects([subject], **params).get_params()  # as for_subject saves it
    except (BrainreconError, TypeError, ValueError):
        return False
    same = {k: v for k, v in jsonable(planned).items() if k not in ("resume", "progress")}
    mine = {k: v for k, v in saved["params"].items() if k not in ("resume", "progress")}
    return saved["decoder"] == cls.name and run.subject == subject and same == mine


def _is_main_process() -> bool:
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return True
    from accelerate import PartialState

    return PartialState().is_main_process


def make_reconstructions(decoder, predictions: np.ndarray | None, dataset, subject: int,
                         log: Log = _quiet) -> np.ndarray | None:
    """Images from a decoder's predictions, or None when a generator is needed later."""
    if predictions is None:
        return None
    if decoder.predicts == "images":
        return np.asarray(predictions, dtype=np.uint8)
    from brainrecon.targets import get_target

    target = get_target(decoder.target, **(getattr(decoder, "target_options", None) or {}))
    image_size = int(dataset.test.images(subject, slice(0, 1)).shape[1])
    try:
        return target.to_images(predictions, image_size=image_size)
    except BrainreconError as exc:
        log(f"no reconstructions yet: {exc} Run `brainrecon reconstruct RUN` when the generator's weights are available.")
        return None


def evaluate_run_safely(run: Run, log: Log = _quiet, **options: Any):
    """Score a run with :func:`brainrecon.workflows.evaluate.evaluate_run`; metrics whose weights are missing
    are reported unavailable (in the run's ``metrics.json``) rather than failing the fit.

    Nothing is said here about them (``log`` is kept for callers): a caller scoring several
    runs says it once for all with :func:`log_unavailable`.
    """
    from brainrecon.workflows.evaluate import evaluate_run

    return evaluate_run(run, **options)


def predict(run: str | os.PathLike, *, data: str | os.PathLike | None = None,
            out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Predict the test split of ``data`` (default: the run's own data) with a run's decoder.

    Writes an ``.npy`` of the predictions for the run's subject, aligned with the test ids
    (written beside it as ``<out stem>_ids.npy``, :func:`prediction_ids_path`). Returns ``out``.
    """
    r = Run.open(run)
    out = Path(out)
    if out.suffix != ".npy":
        raise BrainreconError(f"--out must be a .npy file, got {out}.")
    if out.exists() and not overwrite:
        raise BrainreconError(f"{out} already exists; pass --overwrite to replace it.")
    ds = load_dataset(data, subjects=[r.subject]) if data is not None else r.dataset()
    decoder = r.load_decoder()
    pred = decoder.predict(ds.test)[r.subject]
    write_array_atomic(out, pred)
    write_array_atomic(prediction_ids_path(out), ds.test.ids(r.subject))
    return out


def prediction_ids_path(out: str | os.PathLike) -> Path:
    """The test ids file :func:`predict` writes beside ``out``: ``pred.npy`` -> ``pred_ids.npy``."""
    out = Path(out)
    return out.with_name(out.stem + "_ids.npy")
