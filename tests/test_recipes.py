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
