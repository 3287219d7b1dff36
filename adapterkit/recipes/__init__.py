"""Shipped recipes (the YAML files beside this module) and the stage code that runs them."""

from __future__ import annotations

from pathlib import Path

import yaml

from adapterkit.errors import ConfigError, Problem, did_you_mean

RECIPES_DIR = Path(__file__).parent


def shipped() -> dict[str, Path]:
    """Name -> path of every shipped recipe."""
    return {p.stem: p for p in sorted(RECIPES_DIR.glob("*.yaml"))}


def find_recipe(name_or_path: str) -> Path:
    """A shipped recipe's name or a YAML path -> the file. Raises ConfigError naming what exists."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    recipes = shipped()
    if name_or_path in recipes:
        return recipes[name_or_path]
    if path.suffix in (".yaml", ".yml") or "/" in name_or_path:
        raise ConfigError(Problem(name_or_path, "recipe file not found",
                                  fix="check the path, or use a shipped recipe: " + ", ".join(recipes)))
    hint = did_you_mean(name_or_path, recipes)
    raise ConfigError(Problem(name_or_path, "no shipped recipe by that name" + (f" ({hint})" if hint else ""),
                              fix="see `adapterkit recipe list`, or pass a path to a YAML file"))


def summary(path: Path) -> dict[str, str]:
    """name, stage, method, task and description of a recipe file, for `recipe list`."""
    from adapterkit.config import Recipe

    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if "pipeline" in data:
        stages = [str(s.get("name")) for s in data["pipeline"] if isinstance(s, dict)]
        return {"name": path.stem, "stage": "pipeline", "method": "-", "task": " > ".join(stages),
                "description": data.get("description", "")}
    defaults = Recipe()
    return {
        "name": path.stem,
        "stage": data.get("stage", defaults.stage),
        "method": (data.get("adapter") or {}).get("method", defaults.adapter.method),
        "task": (data.get("data") or {}).get("task", defaults.data.task),
        "description": data.get("description", ""),
    }
