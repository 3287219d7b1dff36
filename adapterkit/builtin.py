"""`builtin:tiny`: adapterkit's own small base model, so every recipe runs offline.

On first use (`adapterkit.stages.ensure_base`) it is pretrained with the shipped `pretrain-tiny` recipe on the shipped sample corpus
and cached under the user's cache dir (`$ADAPTERKIT_CACHE`, else `$XDG_CACHE_HOME/adapterkit`, else
`~/.cache/adapterkit`). The cache key is a hash of the recipe and the corpus, so editing either
builds a new one. It is a toy: a few million parameters that have read ~70 KB of text. Use it to try
adapterkit, and a real model (`model.name_or_path=...`) for real work.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from adapterkit.config import find_recipe, load_recipe
from adapterkit.data.loading import resolve_sample
from adapterkit.errors import ConfigError, Problem

BUILTIN = {"tiny": "pretrain-tiny"}


def cache_dir() -> Path:
    if os.environ.get("ADAPTERKIT_CACHE"):
        return Path(os.environ["ADAPTERKIT_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "adapterkit"


def builtin_recipe(name: str, overrides: list[str] | None = None) -> tuple[Any, Any, Path]:
    """The recipe that builds `name`, and the cache dir keyed by the recipe file, overrides and corpus."""
    if name not in BUILTIN:
        raise ConfigError(Problem("model.name_or_path", f"'builtin:{name}' is not a built-in model",
                                  fix=f"use one of: {', '.join('builtin:' + n for n in BUILTIN)}"))
    recipe_path = find_recipe(BUILTIN[name])
    recipe, src = load_recipe(str(recipe_path), overrides or [])
    h = hashlib.sha256(recipe_path.read_bytes())
    h.update("\n".join(overrides or []).encode())
    for source in [recipe.data.train] if isinstance(recipe.data.train, str) else recipe.data.train:
        h.update(resolve_sample(source).read_bytes() if source.startswith("sample:") else source.encode())
    return recipe, src, cache_dir() / "builtin" / f"{name}-{h.hexdigest()[:12]}"


def builtin_run_dir(name: str, overrides: list[str] | None = None) -> Path:
    """Where built-in base `name` (pretrained with these recipe overrides) is cached."""
    return builtin_recipe(name, overrides)[2]


def model_dir(name: str) -> Path | None:
    """The model directory of built-in base `name` when it has been built (None when not yet: the stage
    dispatcher, `adapterkit.stages.ensure_base`, builds it on first use)."""
    path = builtin_run_dir(name) / "model"
    return path if (path / "config.json").is_file() else None
