"""Decoders behind one interface, and the registry that names them.

The registry is the single source of truth for ``--decoder`` choices, ``brainrecon
decoders`` and loading a saved decoder. Entries are import paths, and what ``brainrecon
decoders`` and ``brainrecon fit --help`` show of the built-ins is kept here
(:data:`_BUILTIN_INFO`, checked against the classes by the tests), so listing decoders does
not import torch, scikit-learn or diffusers; plugins are imported to be listed.

Other packages add decoders through the ``brainrecon.decoders`` entry-point group
(``name = "module:Class"`` in their ``pyproject.toml`` under
``[project.entry-points."brainrecon.decoders"]``); they then appear everywhere a built-in
does. A plugin that fails to import is reported by name and never hides the built-ins;
a plugin cannot replace a built-in name. :mod:`brainrecon.testing` has the conformance
tests a plugin's own test suite can inherit.

>>> from brainrecon.decoders import available, get_decoder
>>> available()
['brainguard', 'neuropictor', 'ridge']
>>> decoder = get_decoder("ridge", target="pixels")
"""

from __future__ import annotations

import importlib
from pathlib import Path

from brainrecon.decoders.base import CliOption, Decoder
from brainrecon.errors import BrainreconError

# name -> "module:ClassName"
_REGISTRY: dict[str, str] = {
    "ridge": "brainrecon.decoders.ridge:RidgeDecoder",
    "brainguard": "brainrecon.decoders.brainguard:BrainGuardDecoder",
    "neuropictor": "brainrecon.decoders.neuropictor:NeuroPictorDecoder",
}


_BUILTIN = frozenset(_REGISTRY)
_BUILTIN_PATHS = dict(_REGISTRY)  # a built-in re-registered elsewhere (register()) is imported to be listed

# What the listing shows of each built-in, without importing it (ridge imports scikit-learn,
# BrainGuard and NeuroPictor torch: seconds). Must equal the classes' own attributes
# (tests/test_first_use.py::test_the_decoder_listing_says_what_the_classes_say).
_BUILTIN_INFO: dict[str, dict] = {
    "brainguard": {
        "predicts": "target",
        "multi_subject": True,
        "summary": "Per-subject MLP decoders trained by federated learning "
                   "(subject input layers stay private; shared layers fused by DFL).",
        "params": {"target": "pixels", "hidden": 2048, "rounds": 600, "local_iterations": 1, "sync_layers": 4,
                   "batch_size": 50, "lr": 0.0003, "seed": 0},
        "cli_options": (
            CliOption("rounds", "--rounds", "int", "federated rounds"),
            CliOption("local_iterations", "--local-iterations", "int", "local epochs per round"),
            CliOption("sync_layers", "--sync-layers", "int", "trailing layers (of blocks, head, projector) fused "
                      "adaptively; raw tensor count: --param sync_tensors=N"),
            CliOption("hidden", "--hidden", "int", "hidden width"),
        ),
    },
    "neuropictor": {
        "predicts": "images",
        "multi_subject": True,
        "summary": "NeuroPictor: fMRI surface maps control Stable Diffusion 2.1 (ControlNet + semantic context)",
        "params": {"stage": "pretrain", "base_model": "stabilityai/stable-diffusion-2-1-base", "init_from": None,
                   "image_size": 512, "batch_size": 16, "steps": None, "control_scale": 1.0, "guidance_scale": 5.0},
        "cli_options": (
            CliOption("stage", "--stage", "str", "training stage", ("encoder", "pretrain", "finetune", "cfg")),
            CliOption("init_from", "--init-from", "path", "saved decoder (run/decoder) of the previous stage"),
        ),
    },
    "ridge": {
        "predicts": "target",
        "multi_subject": False,
        "summary": "Closed-form ridge from z-scored voxels to a target space; alpha per target by "
                   "exact leave-one-out (CPU or CUDA).",
        "params": {"target": "pixels", "alphas": None, "granularity": "target", "rescale": "train", "device": "auto"},
        "cli_options": (CliOption("alphas", "--alphas", "floats", "comma-separated alpha grid, e.g. 1e3,1e4,1e5"),),
    },
}
ENTRY_POINT_GROUP = "brainrecon.decoders"
# name -> distribution that declared it (plugins only), and problems found while scanning.
_PLUGIN_DIST: dict[str, str] = {}
plugin_problems: dict[str, str] = {}


def register(name: str, path: str) -> None:
    """Register a decoder class under ``name`` by its import path ``"module:Class"``."""
    _REGISTRY[name] = path


def _scan_plugins(registry: dict[str, str], dists: dict[str, str], group: str, builtin: frozenset) -> None:
    """Add the entry points of ``group`` to ``registry`` (re-read each call: cheap, and a package
    installed meanwhile shows up); a clash with a built-in name is recorded, not applied."""
    from importlib.metadata import entry_points

    for ep in entry_points(group=group):
        dist = getattr(ep.dist, "name", None) or "unknown distribution"
        if ep.name in builtin:
            plugin_problems[ep.name] = (f"plugin {ep.name!r} from {dist} is ignored: {ep.name!r} is a built-in "
                                        f"{group.rsplit('.', 1)[-1][:-1]}; rename its entry point")
            continue
        registry[ep.name] = ep.value
        dists[ep.name] = dist


def available() -> list[str]:
    """Names of the registered decoders (built-in and plugins), sorted."""
    _scan_plugins(_REGISTRY, _PLUGIN_DIST, ENTRY_POINT_GROUP, _BUILTIN)
    return sorted(_REGISTRY)


def _unknown(name: str) -> BrainreconError:
    choices = ", ".join(repr(n) for n in available())
    return BrainreconError(f"Unknown decoder {name!r}. Available decoders: {choices}.")


def get_decoder_class(name: str) -> type[Decoder]:
    """The decoder class registered under ``name``.

    Raises
    ------
    BrainreconError
        Unknown name (listing the valid ones), or a plugin that cannot be imported or is not
        a :class:`Decoder` (naming the plugin and its distribution).
    """
    if name not in _REGISTRY:
        _scan_plugins(_REGISTRY, _PLUGIN_DIST, ENTRY_POINT_GROUP, _BUILTIN)
    if name not in _REGISTRY:
        raise _unknown(name)
    return _import_class(name, _REGISTRY[name], _PLUGIN_DIST.get(name), Decoder, "decoder")


def _import_class(name: str, path: str, dist: str | None, base: type | None, kind: str):
    module_name, _, class_name = path.partition(":")
    where = f"plugin {kind} {name!r} ({path}, from {dist})" if dist else f"{kind} {name!r} ({path})"
    try:
        module = importlib.import_module(module_name)
        cls = getattr(module, class_name)
    except Exception as exc:  # noqa: BLE001 - any failure of a third-party import is reported by name
        if dist is None:
            raise
        raise BrainreconError(f"{where} cannot be loaded: {type(exc).__name__}: {exc}. "
                              f"Reinstall or fix {dist}, or uninstall it.") from exc
    if base is None:  # any factory will do (target spaces are built by calling them)
        ok, what = callable(cls), "callable"
    else:
        ok, what = isinstance(cls, type) and issubclass(cls, base), f"{base.__module__}.{base.__name__} subclass"
    if not ok:
        msg = f"{where} is not a {what}"
        if dist is None:
            raise TypeError(msg)
        raise BrainreconError(msg + f"; fix or uninstall {dist}.")
    return cls


def get_decoder(name: str, **params) -> Decoder:
    """Build the decoder registered under ``name`` with keyword ``params``."""
    cls = get_decoder_class(name)
    valid = cls._param_names()
    unknown = [k for k in params if k not in valid]
    if unknown:
        raise BrainreconError(
            f"Unknown parameter(s) {', '.join(map(repr, unknown))} for decoder {name!r}. "
            f"Valid parameters: {', '.join(map(repr, valid))}."
        )
    return cls(**params)


def load_decoder(directory: str | Path) -> Decoder:
    """Load any saved decoder; its class is read from ``brainrecon.json``.

    ``directory`` may be a saved decoder, a run directory (its ``decoder/``) or a hub address
    ``hf://owner/name[@revision]`` of a run published with ``brainrecon push``.
    """
    from brainrecon.publish import is_hub_address, resolve_hub_address

    path = resolve_hub_address(directory) if is_hub_address(directory) else Path(directory)
    if not (path / "brainrecon.json").is_file() and (path / "decoder" / "brainrecon.json").is_file():
        path = path / "decoder"
    return Decoder.load(path)


def describe() -> list[dict]:
    """One row per decoder: name, what it predicts, summary and main parameters with defaults.

    Built-ins are described without being imported; plugins are imported (a broken one is
    listed with its problem).
    """
    rows = []
    for name in available():
        if name in _BUILTIN and _REGISTRY[name] == _BUILTIN_PATHS[name]:
            info = _BUILTIN_INFO[name]
            rows.append({"name": name, "predicts": info["predicts"], "summary": info["summary"],
                         "params": dict(info["params"])})
            continue
        try:
            cls = get_decoder_class(name)
        except BrainreconError as exc:  # a broken plugin: listed with its problem, others unaffected
            rows.append({"name": name, "predicts": "?", "summary": f"broken plugin: {exc}", "params": {}})
            continue
        defaults = cls.default_params()
        rows.append(
            {
                "name": name,
                "predicts": cls.predicts,
                "summary": cls.summary,
                "params": {p: defaults.get(p) for p in cls.main_params},
            }
        )
    return rows


def decoder_cli_options(name: str) -> tuple[CliOption, ...]:
    """The decoder's own ``brainrecon fit`` options (``Decoder.cli_options``); a built-in's are
    read without importing it."""
    if name in _BUILTIN and _REGISTRY.get(name) == _BUILTIN_PATHS[name]:
        return _BUILTIN_INFO[name]["cli_options"]
    return tuple(getattr(get_decoder_class(name), "cli_options", ()) or ())


__all__ = [
    "Decoder",
    "available",
    "decoder_cli_options",
    "describe",
    "get_decoder",
    "get_decoder_class",
    "load_decoder",
    "register",
]
