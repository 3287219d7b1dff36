"""`builtin:tiny`: adapterkit's own small base model, so every recipe runs offline.

On first use it is pretrained with the shipped `pretrain-tiny` recipe on the shipped sample corpus
and cached under the user's cache dir (`$ADAPTERKIT_CACHE`, else `$XDG_CACHE_HOME/adapterkit`, else
`~/.cache/adapterkit`). The cache key is a hash of the recipe and the corpus, so editing either
builds a new one. It is a toy: a few million parameters that have read ~70 KB of text. Use it to try
adapterkit, and a real model (`model.name_or_path=...`) for real work.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from adapterkit.errors import ConfigError, Problem

BUILTIN = {"tiny": "pretrain-tiny"}
# What torchrun (and so `accelerate launch`) tells each process about the process group.
_PROCESS_GROUP_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
                      "ROLE_RANK", "ROLE_WORLD_SIZE", "ROLE_NAME", "MASTER_ADDR", "MASTER_PORT")


def cache_dir() -> Path:
    if os.environ.get("ADAPTERKIT_CACHE"):
        return Path(os.environ["ADAPTERKIT_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "adapterkit"


def _builtin_recipe(name: str, overrides: list[str] | None) -> tuple[Any, Any, Path]:
    """The recipe that builds `name`, and the cache dir keyed by the recipe file, overrides and corpus."""
    from adapterkit.config import find_recipe, load_recipe
    from adapterkit.data.loading import resolve_sample

    if name not in BUILTIN:
        raise ConfigError(Problem("model.name_or_path", f"'builtin:{name}' is not a built-in model",
                                  fix=f"use one of: {', '.join('builtin:' + n for n in BUILTIN)}"))
    recipe_path = find_recipe(BUILTIN[name])
    recipe, src = load_recipe(str(recipe_path), overrides or [])
    h = hashlib.sha256(recipe_path.read_bytes())
    h.update("\n".join(overrides or []).encode())
    for spec in [recipe.data.train] if isinstance(recipe.data.train, str) else recipe.data.train:
        h.update(resolve_sample(spec).read_bytes() if spec.startswith("sample:") else spec.encode())
    return recipe, src, cache_dir() / "builtin" / f"{name}-{h.hexdigest()[:12]}"


def builtin_run_dir(name: str, overrides: list[str] | None = None) -> Path:
    """Where built-in base `name` (pretrained with these recipe overrides) is cached."""
    return _builtin_recipe(name, overrides)[2]


def ensure_builtin(name: str, overrides: list[str] | None = None) -> Path:
    """The model directory of built-in base `name`, pretraining it first if it is not cached yet."""
    from adapterkit.models import processes
    from adapterkit.recipes.train import run

    recipe, src, final = _builtin_recipe(name, overrides)
    if (final / "model" / "config.json").is_file():
        return final / "model"
    procs = processes()
    if procs.num_processes > 1:
        # Under `accelerate launch` the main process builds it, in a one-process run of its own, so
        # the cached model is the same however it was first asked for; the others wait for it.
        if procs.is_main_process:
            env = {k: v for k, v in os.environ.items()
                   if k not in _PROCESS_GROUP_ENV and not k.startswith(("ACCELERATE_", "TORCHELASTIC_"))}
            build = ("import sys; from adapterkit.builtin import ensure_builtin; "
                     "ensure_builtin(sys.argv[1], sys.argv[2:])")
            subprocess.run([sys.executable, "-c", build, name, *(overrides or [])], env=env, check=True)
        procs.wait_for_everyone()
        return final / "model"
    final.parent.mkdir(parents=True, exist_ok=True)
    print(f"adapterkit: building the built-in base model 'builtin:{name}' (first use only): pretraining it with "
          f"the '{BUILTIN[name]}' recipe on the shipped sample corpus; it will be cached in {final}",
          file=sys.stderr, flush=True)
    work = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{name}-building-"))
    try:
        recipe.output_dir = str(work / "run")
        run(recipe, src)
        try:
            os.replace(work / "run", final)
        except OSError:  # another process finished first; its copy is as good as ours
            if not (final / "model" / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"adapterkit: built-in base model ready: {final / 'model'}", file=sys.stderr, flush=True)
    return final / "model"
