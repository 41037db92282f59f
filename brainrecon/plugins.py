"""One registry mechanism for everything brainrecon looks up by name: decoders and target spaces.

A :class:`Registry` maps names to import paths (``"module:Class"``), so nothing is imported
until it is used. Built-ins are given when the registry is made; other packages add entries
through an entry-point group (``[project.entry-points."brainrecon.decoders"]`` or
``"brainrecon.targets"`` in their ``pyproject.toml``), re-read at each listing so a package
installed meanwhile shows up. A plugin cannot replace a built-in name (the clash is recorded in
:attr:`Registry.problems`), and a plugin that fails to import is reported by name and
distribution, never hiding the built-ins.

>>> from brainrecon.plugins import Registry
>>> shapes = Registry("example.shapes", {"path": "pathlib:Path"}, kind="shape")
>>> shapes.available()
['path']
>>> shapes.load("path").__name__
'Path'
"""

from __future__ import annotations

import importlib
from typing import Any

from brainrecon.errors import BrainreconError


class Registry:
    """Names -> import paths, with plugins from the entry-point group ``group``.

    Parameters
    ----------
    group : str
        Entry-point group of plugins.
    builtins : dict
        ``name -> "module:Class"`` of the built-in entries.
    kind : str
        What an entry is, for messages ("decoder", "target").
    """

    def __init__(self, group: str, builtins: dict[str, str], kind: str):
        self.group = group
        self.kind = kind
        self.paths: dict[str, str] = dict(builtins)
        self.builtin_paths: dict[str, str] = dict(builtins)
        #: name -> distribution that declared it (plugins only)
        self.dists: dict[str, str] = {}
        #: name -> why a plugin of that name was not applied
        self.problems: dict[str, str] = {}

    def register(self, name: str, path: str) -> None:
        """Register ``name`` by its import path ``"module:Class"`` (from code, not an entry point)."""
        self.paths[name] = path

    def is_builtin(self, name: str) -> bool:
        """Whether ``name`` is a built-in still registered at its built-in path."""
        return name in self.builtin_paths and self.paths.get(name) == self.builtin_paths[name]

    def scan(self) -> None:
        """Add the entry points of the group (cheap; re-read on every call)."""
        from importlib.metadata import entry_points

        for ep in entry_points(group=self.group):
            dist = getattr(ep.dist, "name", None) or "unknown distribution"
            if ep.name in self.builtin_paths:
                self.problems[ep.name] = (f"plugin {ep.name!r} from {dist} is ignored: {ep.name!r} is a built-in "
                                          f"{self.kind}; rename its entry point")
                continue
            self.paths[ep.name] = ep.value
            self.dists[ep.name] = dist

    def available(self) -> list[str]:
        """Registered names (built-in and plugins), sorted."""
        self.scan()
        return sorted(self.paths)

    def unknown(self, name: str) -> BrainreconError:
        choices = ", ".join(repr(n) for n in self.available())
        return BrainreconError(f"Unknown {self.kind} {name!r}. Available {self.kind}s: {choices}.")

    def load(self, name: str, base: type | None = None) -> Any:
        """Import the object registered under ``name``.

        ``base``: the class it must subclass; None accepts any callable (a factory).

        Raises
        ------
        BrainreconError
            Unknown name (listing the valid ones), or a plugin that cannot be imported or is
            not what it must be (naming the plugin and its distribution).
        """
        if name not in self.paths:
            self.scan()
        if name not in self.paths:
            raise self.unknown(name)
        path, dist = self.paths[name], self.dists.get(name)
        module_name, _, attr = path.partition(":")
        where = f"plugin {self.kind} {name!r} ({path}, from {dist})" if dist else f"{self.kind} {name!r} ({path})"
        try:
            obj = getattr(importlib.import_module(module_name), attr)
        except Exception as exc:  # noqa: BLE001 - any failure of a third-party import is reported by name
            if dist is None:
                raise
            raise BrainreconError(f"{where} cannot be loaded: {type(exc).__name__}: {exc}. "
                                  f"Reinstall or fix {dist}, or uninstall it.") from exc
        if base is None:
            ok, what = callable(obj), "callable"
        else:
            ok = isinstance(obj, type) and issubclass(obj, base)
            what = f"{base.__module__}.{base.__name__} subclass"
        if not ok:
            message = f"{where} is not a {what}"
            if dist is None:
                raise TypeError(message)
            raise BrainreconError(message + f"; fix or uninstall {dist}.")
        return obj


__all__ = ["Registry"]
