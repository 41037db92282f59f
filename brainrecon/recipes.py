"""Named recipes: cited parameter presets that reproduce a published configuration.

A recipe belongs to one decoder, names its source (paper, table, official config file) and
sets decoder parameters. ``brainrecon fit --recipe NAME`` applies it; parameters the user
gives explicitly (``--param``, named options) win over the recipe's values, and the run
records the recipe it used. The generators' recipes (:mod:`brainrecon.generate.recipes`,
``brainrecon reconstruct --recipe NAME``) are the same :class:`Recipe`, made with
``generator=`` instead of ``decoder=``. ``brainrecon decoders describe NAME`` lists each recipe of the
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


@dataclass(frozen=True, kw_only=True)
class Recipe:
    """A named, cited preset of the parameters of one decoder or of one generator.

    Exactly one of ``decoder`` (the registry name of the decoder whose parameters it sets) and
    ``generator`` (``"ipadapter"`` or ``"versatile"``: the generator whose options of
    :func:`brainrecon.workflows.reconstruct.reconstruct_run` it sets) is given. ``values`` maps
    parameter names to values; ``notes`` maps a parameter name to one sentence on where the value
    comes from (optional, shown by ``describe``). Every field but ``name`` is keyword-only.
    """

    name: str = field(kw_only=False)
    source: str
    values: Mapping[str, Any]
    decoder: str = ""
    generator: str = ""
    summary: str = ""
    notes: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self):
        if bool(self.decoder) == bool(self.generator):
            raise TypeError(f"recipe {self.name!r}: give either decoder= or generator= (one of the two)")

    def apply(self, params: Mapping[str, Any], *, none_is_unset: bool = False) -> dict[str, Any]:
        """The recipe's values (copied) overlaid by the explicitly given ``params``, which win.

        With ``none_is_unset=True`` a parameter whose value is None counts as not given, so the
        recipe's value stays: for callers whose keyword arguments default to None, such as
        ``reconstruct_run`` and its command-line options. Otherwise None is a value like any other
        (a decoder parameter may be set to None on purpose).
        """
        merged = {k: _copy(v) for k, v in self.values.items()}
        merged.update({k: v for k, v in params.items() if not (none_is_unset and v is None)})
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
