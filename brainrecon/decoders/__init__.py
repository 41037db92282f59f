"""Decoders behind one interface, and the registry that names them.

The registry is the single source of truth for ``--decoder`` choices, ``brainrecon
decoders`` and loading a saved decoder. Entries are import paths, so listing decoders
does not import torch or diffusers.

>>> from brainrecon.decoders import available, get_decoder
>>> available()
['brainguard', 'neuropictor', 'ridge']
>>> decoder = get_decoder("ridge", target="pixels")
"""

from __future__ import annotations

import importlib
from pathlib import Path

from brainrecon.decoders.base import Decoder
from brainrecon.errors import BrainreconError

# name -> "module:ClassName"
_REGISTRY: dict[str, str] = {
    "ridge": "brainrecon.decoders.ridge:RidgeDecoder",
    "brainguard": "brainrecon.decoders.brainguard:BrainGuardDecoder",
    "neuropictor": "brainrecon.decoders.neuropictor:NeuroPictorDecoder",
}


def register(name: str, path: str) -> None:
    """Register a decoder class under ``name`` by its import path ``"module:Class"``."""
    _REGISTRY[name] = path


def available() -> list[str]:
    """Names of the registered decoders, sorted."""
    return sorted(_REGISTRY)


def _unknown(name: str) -> BrainreconError:
    choices = ", ".join(repr(n) for n in available())
    return BrainreconError(f"Unknown decoder {name!r}. Available decoders: {choices}.")


def get_decoder_class(name: str) -> type[Decoder]:
    """The decoder class registered under ``name``."""
    if name not in _REGISTRY:
        raise _unknown(name)
    module_name, _, class_name = _REGISTRY[name].partition(":")
    module = importlib.import_module(module_name)
    cls = getattr(module, class_name)
    if not (isinstance(cls, type) and issubclass(cls, Decoder)):
        raise TypeError(f"{_REGISTRY[name]} is not a Decoder subclass")
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
    """Load any saved decoder; its class is read from ``brainrecon.json``."""
    return Decoder.load(directory)


def describe() -> list[dict]:
    """One row per decoder: name, what it predicts, summary and main parameters with defaults."""
    rows = []
    for name in available():
        cls = get_decoder_class(name)
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


__all__ = [
    "Decoder",
    "available",
    "describe",
    "get_decoder",
    "get_decoder_class",
    "load_decoder",
    "register",
]
