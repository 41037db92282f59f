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

from pathlib import Path

from brainrecon.decoders.base import CliOption, Decoder
from brainrecon.errors import BrainreconError
from brainrecon.plugins import Registry
from brainrecon.recipes import Recipe, pick_recipe, recipes_of

#: The decoder registry (:mod:`brainrecon.plugins`): name -> "module:ClassName".
DECODERS = Registry("brainrecon.decoders", {
    "ridge": "brainrecon.decoders.ridge:RidgeDecoder",
    "brainguard": "brainrecon.decoders.brainguard:BrainGuardDecoder",
    "neuropictor": "brainrecon.decoders.neuropictor:NeuroPictorDecoder",
}, kind="decoder")
ENTRY_POINT_GROUP = DECODERS.group
# The registry's own tables, by their older names (tests and plugins' tests reach them).
_REGISTRY = DECODERS.paths
_PLUGIN_DIST = DECODERS.dists
plugin_problems = DECODERS.problems

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
            CliOption("init_from", "--init-from", "path",
                      "saved BrainGuard decoder (e.g. `brainrecon import brainguard` output) to continue training from"),
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


def register(name: str, path: str) -> None:
    """Register a decoder class under ``name`` by its import path ``"module:Class"``."""
    DECODERS.register(name, path)


def available() -> list[str]:
    """Names of the registered decoders (built-in and plugins), sorted."""
    return DECODERS.available()


def get_decoder_class(name: str) -> type[Decoder]:
    """The decoder class registered under ``name``.

    Raises
    ------
    BrainreconError
        Unknown name (listing the valid ones), or a plugin that cannot be imported or is not
        a :class:`Decoder` (naming the plugin and its distribution).
    """
    return DECODERS.load(name, Decoder)


def recipes_for(decoder: str) -> dict[str, Recipe]:
    """The recipes decoder ``decoder`` declares, by name (empty for decoders without any)."""
    return recipes_of(get_decoder_class(decoder))


def get_recipe(decoder: str, name: str) -> Recipe:
    """The recipe ``name`` of ``decoder``; a clear error lists the valid names."""
    return pick_recipe(recipes_for(decoder), decoder, name)


def apply_recipe(decoder: str, name: str | None, params) -> dict:
    """``params`` with recipe ``name`` of ``decoder`` applied underneath (explicit ``params``
    win); with ``name=None`` a copy of ``params``. Recording the recipe's name in the run is
    the caller's job (:func:`brainrecon.workflows.fit` does it)."""
    if name is None:
        return dict(params)
    return get_recipe(decoder, name).apply(params)


def get_decoder(name: str, **params) -> Decoder:
    """Build the decoder registered under ``name`` with keyword ``params``."""
    cls = get_decoder_class(name)
    cls.check_params(params)
    return cls(**params)


def load_decoder(directory: str | Path) -> Decoder:
    """Load any saved decoder; its class is read from ``brainrecon.json``.

    ``directory`` may be a saved decoder, a run directory (its ``decoder/``) or a hub address
    ``hf://owner/name[@revision]`` of a run published with ``brainrecon push``.
    """
    from brainrecon.hub import is_hub_address, resolve_hub_address

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
        if DECODERS.is_builtin(name):
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
    if DECODERS.is_builtin(name):
        return _BUILTIN_INFO[name]["cli_options"]
    return tuple(getattr(get_decoder_class(name), "cli_options", ()) or ())


__all__ = [
    "Decoder",
    "apply_recipe",
    "available",
    "decoder_cli_options",
    "describe",
    "get_decoder",
    "get_decoder_class",
    "get_recipe",
    "load_decoder",
    "recipes_for",
    "register",
]
