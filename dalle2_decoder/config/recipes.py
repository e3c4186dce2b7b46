"""Named training recipes: one config key, `recipe`, that turns on a measured set of options.

`reference` (the default) changes nothing: DALLE2-pytorch's behaviour. Any other recipe fills in
the options it lists wherever the config leaves them out; an option the config sets itself always
wins, so a recipe is a set of defaults, never an override. The filled-in values are part of the
resolved config (`--check` prints them, the run's saved config records them), so reading a saved
config back gives the same run even if a later release changes what a recipe name means.
docs/RECIPE.md has the measurements behind each recipe.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Mapping, Tuple, Union

# A value, or a function of the raw config giving it (e.g. one value per U-Net from the image sizes).
RecipeValue = Union[Any, Callable[[Mapping[str, Any]], Any]]

SAMPLE_EFFICIENT = "sample-efficient-v1"

RECIPES: Dict[str, Dict[str, RecipeValue]] = {
    "reference": {},
    # Measured by bench/recipe.py (docs/RECIPE.md): of the candidates, v-prediction (Salimans & Ho
    # 2022) lowered the paired error at equal training samples by far the most, at the same cost
    # per sample. A versioned name: what it turns on never changes once released; a better set
    # becomes a new name.
    SAMPLE_EFFICIENT: {
        "decoder.predict_v": True,
    },
}
"""recipe name -> {dotted option path: value}; the options are documented in docs/CONFIG.md."""

DEFAULT_RECIPE = "reference"


def recipe_options(name: str, raw: Mapping[str, Any]) -> Dict[str, Any]:
    """The option values recipe `name` gives for the raw config `raw` (functions evaluated)."""
    return {path: value(raw) if callable(value) else value for path, value in RECIPES[name].items()}


def apply_recipe(raw: Dict[str, Any]) -> Tuple[Dict[str, Any], List[str]]:
    """(raw config with the recipe's options filled in where absent, problems).

    Only the options the config does not give are filled; sections that are not objects are left
    for the section checks to report.
    """
    name = raw.get("recipe", DEFAULT_RECIPE)
    if not isinstance(name, str) or name not in RECIPES:
        return raw, [f"recipe: unknown recipe {name!r}; choose one of {', '.join(RECIPES)}"]
    filled = dict(raw)
    for path, value in recipe_options(name, raw).items():
        *parents, leaf = path.split(".")
        node = filled
        for key in parents:
            child = node.get(key, {})
            if not isinstance(child, Mapping):
                break  # a malformed section: its own check names it
            node[key] = child = dict(child)  # copies: the caller's dict is never changed
            node = child
        else:
            node.setdefault(leaf, value)
    return filled, []
