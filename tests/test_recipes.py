"""Named recipes: applying, precedence of explicit parameters, errors, recording in runs."""

import pytest

from brainrecon.errors import BrainreconError
from brainrecon.decoders import apply_recipe, get_recipe, recipes_for
from brainrecon.recipes import Recipe


def test_explicit_params_win_and_values_are_copied():
    values = {"alphas": [1.0, 10.0], "device": "cpu"}
    recipe = Recipe("r", decoder="ridge", source="test", values=values)
    merged = recipe.apply({"device": "cuda"})
    assert merged == {"alphas": [1.0, 10.0], "device": "cuda"}
    merged["alphas"].append(100.0)
    assert values["alphas"] == [1.0, 10.0]


def test_no_recipe_returns_params_unchanged():
    assert apply_recipe("ridge", None, {"seed": 3}) == {"seed": 3}


def test_unknown_recipe_names_the_valid_ones():
    with pytest.raises(BrainreconError, match="Unknown recipe 'nope' for decoder 'ridge'"):
        get_recipe("ridge", "nope")


def test_recipe_with_unknown_parameter_is_rejected(monkeypatch):
    from brainrecon.decoders import get_decoder_class

    cls = get_decoder_class("ridge")
    bad = Recipe("bad", decoder="ridge", source="test", values={"no_such_param": 1})
    monkeypatch.setattr(cls, "recipes", (bad,), raising=False)
    with pytest.raises(TypeError, match="no_such_param"):
        recipes_for("ridge")


def test_fit_records_recipe(tmp_path, monkeypatch):
    from brainrecon import workflows
    from brainrecon.decoders import get_decoder_class

    cls = get_decoder_class("ridge")
    recipe = Recipe("tiny", decoder="ridge", source="test", values={"alphas": [1.0, 100.0]})
    monkeypatch.setattr(cls, "recipes", (recipe,), raising=False)
    runs = workflows.fit("ridge", data="synthetic", subjects=[1], out=tmp_path, recipe="tiny",
                         params={"device": "cpu"}, evaluate=False)
    assert runs[0].info["recipe"] == "tiny"
    assert runs[0].info["params"]["alphas"] == [1.0, 100.0]


def test_recipe_is_for_one_decoder_or_one_generator():
    with pytest.raises(TypeError, match="either decoder= or generator="):
        Recipe("both", decoder="ridge", generator="ipadapter", source="test", values={})
    with pytest.raises(TypeError, match="either decoder= or generator="):
        Recipe("neither", source="test", values={})


def test_none_counts_as_not_given_only_when_asked():
    recipe = Recipe("g", generator="ipadapter", source="test", values={"steps": 100, "guidance_scale": 7.5})
    explicit = {"steps": None, "guidance_scale": 3.0, "vae": None}
    assert recipe.apply(explicit, none_is_unset=True) == {"steps": 100, "guidance_scale": 3.0}
    # A decoder parameter may be set to None on purpose: by default None is a value that wins.
    assert recipe.apply(explicit) == {"steps": None, "guidance_scale": 3.0, "vae": None}


def test_generation_recipes_are_recipes_of_reconstruct_options():
    import inspect

    from brainrecon.generate.recipes import GENERATORS, RECIPES, get_generation_recipe
    from brainrecon.workflows.reconstruct import reconstruct_run

    options = set(inspect.signature(reconstruct_run).parameters) - {"run", "recipe"}
    assert {"weadl", "mindbridge", "brainguard-released"} <= set(RECIPES)
    for name, recipe in RECIPES.items():
        assert isinstance(recipe, Recipe) and recipe.name == name and not recipe.decoder
        assert recipe.generator in GENERATORS and recipe.source
        assert set(recipe.values) <= options, name
        assert set(recipe.notes) <= set(recipe.values), name
    with pytest.raises(BrainreconError, match="Unknown generation recipe 'nope'"):
        get_generation_recipe("nope")
