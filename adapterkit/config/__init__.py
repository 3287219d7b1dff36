"""The recipe: its schema (`schema`), where it comes from (`source`: shipped names, YAML files and
overrides), typed parsing (`typed`) and the rules across fields (`rules`). `load_recipe` does all of it.

A recipe is read from YAML, dotted `key=value` overrides are applied on top, and the result is
checked against the schema's classes. Every problem (unknown key, wrong type, bad value, incompatible
combination) is collected and raised together as one `ConfigError` that names the file and
line or the override, the bad value, what is allowed and a did-you-mean.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import yaml

from adapterkit.adapters import METHODS
from adapterkit.config.rules import _check, packs
from adapterkit.config.schema import *  # noqa: F403  (the schema's classes are this package's names)
from adapterkit.config.schema import Recipe
from adapterkit.config.source import (
    RecipeSource,
    apply_overrides,
    find_recipe,
    read_recipe_yaml,
    shipped,
    summary,
)
from adapterkit.config.typed import _build
from adapterkit.errors import ConfigError, Problem

__all__ = ["Recipe", "RecipeSource", "apply_overrides", "dump_recipe", "find_recipe", "load_recipe", "packs",
           "parse_recipe", "read_recipe_yaml", "recipe_to_dict", "saved_recipe", "shipped", "summary"]


def parse_recipe(src: RecipeSource) -> Recipe:
    """Check a raw recipe against the config classes and the cross-field rules; raise all problems at once."""
    problems: list[Problem] = []
    recipe = _build(Recipe, src.data, "", src, problems)
    # Cross-field rules run even when some values were rejected, so that every problem shows at
    # once; a rejected value fell back to its default and is not reported a second time.
    failed = {p.key for p in problems}
    problems += [p for p in _check(recipe, src) if p.key not in failed]
    if problems:
        raise ConfigError(problems, title=f"recipe '{src.name}' ({src.path}) is invalid:")
    if recipe.output_dir is None:
        recipe.output_dir = str(Path("runs") / src.name)
    return recipe


def load_recipe(name_or_path: str, overrides: list[str] | tuple[str, ...] = ()) -> tuple[Recipe, RecipeSource]:
    """Resolve a shipped recipe name or a YAML path, apply overrides, validate. Raises ConfigError."""
    path = find_recipe(name_or_path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise ConfigError(Problem(str(path), "is not a UTF-8 text file", fix="pass a YAML recipe")) from None
    if not any(line.strip() and not line.lstrip().startswith("#") for line in text.splitlines()):
        # An empty file would otherwise train every default (the shipped samples) without a word.
        raise ConfigError(Problem(str(path), "is empty (no key is set)",
                                  fix="start from a shipped recipe: adapterkit recipe show lora-sentiment > "
                                      f"{path.name}"))
    src = read_recipe_yaml(text, str(path), path.stem)
    apply_overrides(src, list(overrides))
    return parse_recipe(src), src


def recipe_to_dict(recipe: Recipe) -> dict[str, Any]:
    """Plain-data form of a recipe (what `--dry-run` prints and the run directory stores)."""
    return dataclasses.asdict(recipe)


def saved_recipe(recipe: Recipe) -> dict[str, Any]:
    """The recipe exactly as the run's recipe.yaml holds it: what resume fingerprints and compares, so
    a changed key is reported by name rather than lost among sections one side leaves out."""
    return yaml.safe_load(dump_recipe(recipe))


def dump_recipe(recipe: Recipe) -> str:
    """The resolved recipe as YAML that `load_recipe` reads back to the same recipe (the run's
    recipe.yaml): sections the method or init does not use are left out, since they would be errors."""
    data = recipe_to_dict(recipe)
    for section in ("lora", "quant", "prompt"):
        if section not in METHODS[recipe.adapter.method].sections:
            del data["adapter"][section]
    if recipe.model.init != "scratch":
        del data["model"]["architecture"]
    if recipe.stage not in ("dpo", "kto"):
        del data["preference"]
    if recipe.stage != "distill":
        del data["distill"]
    if recipe.model.from_run is not None:
        del data["model"]["name_or_path"]  # the run decides the model
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
