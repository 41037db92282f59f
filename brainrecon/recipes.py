"""Named recipes: cited parameter presets that reproduce a published configuration.

A recipe belongs to one decoder, names its source (paper, table, official config file) and
sets decoder parameters. ``brainrecon fit --recipe NAME`` applies it; parameters the user
gives explicitly (``--param``, named options) win over the recipe's values, and the run
records the recipe it used. ``brainrecon decoders describe NAME`` lists each recipe of the
decoder with its source and every value it sets.

Decoders declare their recipes in the class attribute ``recipes`` (a tuple of
:class:`Recipe`); :func:`recipes_for` reads it, so third-party decoders get the same
mechanism.

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


def recipes_for(decoder: str) -> dict[str, Recipe]:
    """The recipes a decoder declares, by name (empty for decoders without any)."""
    from brainrecon.decoders import get_decoder_class

    cls = get_decoder_class(decoder)
    recipes = getattr(cls, "recipes", ()) or ()
    out: dict[str, Recipe] = {}
    valid = set(cls._param_names())
    for recipe in recipes:
        unknown = sorted(set(recipe.values) - valid)
        if unknown:
            raise TypeError(
                f"recipe {recipe.name!r} of decoder {decoder!r} sets unknown parameter(s) {unknown}"
            )
        out[recipe.name] = recipe
    return out


def get_recipe(decoder: str, name: str) -> Recipe:
    """The recipe ``name`` of ``decoder``; a clear error lists the valid names."""
    recipes = recipes_for(decoder)
    if name not in recipes:
        valid = ", ".join(repr(n) for n in sorted(recipes)) or "none"
        raise BrainreconError(
            f"Unknown recipe {name!r} for decoder {decoder!r}. Recipes of {decoder!r}: {valid} "
            f"(see `brainrecon decoders describe {decoder}`)."
        )
    return recipes[name]


def apply_recipe(decoder: str, name: str | None, params: Mapping[str, Any]) -> dict[str, Any]:
    """``params`` with recipe ``name`` applied underneath (explicit ``params`` win).

    With ``name=None`` the params are returned unchanged (a copy). Recording the recipe's
    name in the run is the caller's job (:func:`brainrecon.workflows.fit` does it).
    """
    if name is None:
        return dict(params)
    return get_recipe(decoder, name).apply(params)


__all__ = ["Recipe", "apply_recipe", "get_recipe", "recipes_for"]
