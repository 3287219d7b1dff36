"""Where a recipe comes from: finding a shipped recipe or a YAML file, reading it with the line of each
key (for error messages), and applying `key=value` overrides on top."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from adapterkit.config.schema import Recipe
from adapterkit.errors import ConfigError, Problem, did_you_mean

RECIPES_DIR = Path(__file__).parent.parent / "recipes"
"""The shipped recipes (YAML files only; the stage code lives in adapterkit.stages)."""


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


# ---------------------------------------------------------------------------------------------
# Reading YAML with line numbers, and applying overrides


@dataclass
class RecipeSource:
    """The raw mapping of a recipe plus where each dotted key came from (for error messages)."""

    name: str
    path: str
    data: dict[str, Any]
    where: dict[str, str] = field(default_factory=dict)
    command_line: list[str] = field(default_factory=list)


def _key_lines(node: yaml.Node, path: str, prefix: str, out: dict[str, str], problems: list[Problem]) -> None:
    if not isinstance(node, yaml.MappingNode):
        return
    seen: set[str] = set()
    for key_node, value_node in node.value:
        key = str(key_node.value)
        dotted = f"{prefix}{key}"
        if key in seen:
            problems.append(Problem(f"{path}:{key_node.start_mark.line + 1}", "key is set twice", dotted,
                                    "keep one of the two"))
        seen.add(key)
        out[dotted] = f"{path}:{key_node.start_mark.line + 1}"
        _key_lines(value_node, path, dotted + ".", out, problems)


def read_recipe_yaml(text: str, path: str, name: str) -> RecipeSource:
    """Parse recipe YAML, remembering the line of every key."""
    try:
        node = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else path
        raise ConfigError(Problem(where, f"not valid YAML: {getattr(e, 'problem', e)}",
                                  fix="check indentation and quoting on that line")) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(Problem(path, f"a recipe must be a mapping of sections, got {type(data).__name__}",
                                  fix="start from `adapterkit recipe show lora-sentiment`"))
    problems: list[Problem] = []
    where: dict[str, str] = {}
    _key_lines(node, path, "", where, problems)
    if problems:
        raise ConfigError(problems)
    return RecipeSource(name=name, path=path, data=data, where=where)


def apply_overrides(source: RecipeSource, overrides: list[str]) -> None:
    """Apply `a.b.c=value` overrides in place; values follow YAML scalar rules (`1e-4`, `true`, `null`)."""
    problems = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", key):
            problems.append(Problem(f"override '{item}'", "expected KEY=VALUE with a dotted key",
                                    fix="write it like train.max_steps=200 or data.train=reviews.csv"))
            continue
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        if isinstance(value, dict) and (not raw.lstrip().startswith("{")
                                        or (value and all(v is None for v in value.values()))):
            # `Review: {text}` is a sentence with a colon, and `{prompt}` a template placeholder, not a
            # mapping (no setting takes a mapping of empty values)
            value = raw
        node = source.data
        parts = key.split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[parts[-1]] = value
        for i in range(1, len(parts) + 1):
            prefix = ".".join(parts[:i])
            if i == len(parts) or prefix not in source.where:
                source.where[prefix] = f"override '{item}'"
        source.command_line.append(item)
    if problems:
        raise ConfigError(problems)
