"""Named recipes: cited parameter presets that reproduce a published configuration.

A recipe belongs to one decoder, names its source (paper, table, official config file) and
sets decoder parameters. ``brainrecon fit --recipe NAME`` applies it; parameters the user
gives explicitly (``--param``, named options) win over the recipe's values, and the run
records the recipe it used. ``brainrecon decoders describe NAME`` lists each recipe of the
decoder with its source and every value it sets.

Decoders declare their recipes in the class attribute ``recipes`` (a tuple of
:class:`Recipe`); :func:`recipes_of` reads it, so third-party decoders get the same
mechanism. Looking recipes up by decoder name goes through the registry:
:func:`brainrecon.decoders.recipes_for`, :func:`~brainrecon.decoders.get_recipe` and
:func:`~brainrecon.decoders.apply_recipe`.

>>> from brainrecon.recipes import Recipe
>>> r = Recipe("demo", decoder="ridge", source="nowhere", values={"alphas": [1.0]})
>>> r.apply({"alphas": [2.0], "seed": 1})
{'alphas': [2.0], 'seed': 1}
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from brainrecon.errors import BrainreconError


@dataclass(frozen=True)
class Recipe:
    """A named, cited preset of decoder parameters.

    ``values`` maps decoder parameter names to values; ``notes`` maps a parameter name to
    one sentence on where the value comes from (optional, shown by ``describe``).
    """

    name: str
    decoder: str
    source: str
    values: Mapping[str, Any]
    summary: str = ""
    notes: Mapping[str, str] = field(default_factory=dict)

    def apply(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """The recipe's values overlaid by the explicitly given ``params`` (which win)."""
        merged = {k: _copy(v) for k, v in self.values.items()}
        merged.update(params)
        return merged


def _copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_copy(v) for v in value)
    return value


def recipes_of(cls: type) -> dict[str, Recipe]:
    """The recipes a decoder class declares (its ``recipes`` attribute), by name, each checked
    against the class's parameters; empty for a decoder without any. By decoder name:
    :func:`brainrecon.decoders.recipes_for`."""
    recipes = getattr(cls, "recipes", ()) or ()
    out: dict[str, Recipe] = {}
    valid = set(cls._param_names())
    for recipe in recipes:
        unknown = sorted(set(recipe.values) - valid)
        if unknown:
            raise TypeError(
                f"recipe {recipe.name!r} of decoder {recipe.decoder!r} sets unknown parameter(s) {unknown}"
            )
        out[recipe.name] = recipe
    return out


def pick_recipe(recipes: Mapping[str, Recipe], decoder: str, name: str) -> Recipe:
    """The recipe ``name`` among ``recipes`` of ``decoder``; a clear error lists the valid names."""
    if name not in recipes:
        valid = ", ".join(repr(n) for n in sorted(recipes)) or "none"
        raise BrainreconError(
            f"Unknown recipe {name!r} for decoder {decoder!r}. Recipes of {decoder!r}: {valid} "
            f"(see `brainrecon decoders describe {decoder}`)."
        )
    return recipes[name]


__all__ = ["Recipe", "pick_recipe", "recipes_of"]
