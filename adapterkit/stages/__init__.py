"""The stages a recipe runs (`stage:` in the recipe), one row each in `STAGES`, all on one skeleton.

- `skeleton.py`: the run every stage shares (lock, resume, manifest, failure marking, atomic publish).
- `trainer.py`: the trainer pieces they share (TrainingArguments, guarded trl trainers, packing, saving).
- `sft.py`: `pretrain` and `sft` (trl's SFTTrainer).
- `preference.py`: `dpo` and `kto` (trl's DPOTrainer and KTOTrainer), usually after an SFT run.
- `distill.py`: `distill` (a teacher's token distributions supervise the student, on sft's trainer).
- `pipeline.py`: a pipeline recipe, several stages in order, each starting from the one before.

Adding a stage is one new file with a class that has `resolve`, `prepare`, `train` and `finish` (see
`skeleton.Stage`), and one row here.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from adapterkit import builtin, models
from adapterkit.config import Recipe, RecipeSource
from adapterkit.stages import distill, preference, sft
from adapterkit.stages.skeleton import RunResult, Stage, run_stage

STAGES: dict[str, Stage] = {
    "pretrain": sft.STAGE,
    "sft": sft.STAGE,
    "dpo": preference.STAGE,
    "kto": preference.STAGE,
    "distill": distill.STAGE,
}

# What torchrun (and so `accelerate launch`) tells each process about the process group.
PROCESS_GROUP_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
                     "ROLE_RANK", "ROLE_WORLD_SIZE", "ROLE_NAME", "MASTER_ADDR", "MASTER_PORT")


def run(recipe: Recipe, src: RecipeSource, **kwargs: Any) -> RunResult:
    """Run one recipe with its stage (see `skeleton.run_stage` for the keyword arguments), building a
    `builtin:` base first when the recipe names one."""
    ensure_base(recipe)
    return run_stage(STAGES[recipe.stage], recipe, src, **kwargs)


def ensure_base(recipe: Recipe) -> None:
    """Build the recipe's `builtin:` base (and a distill stage's `builtin:` teacher) if it is one and is
    not cached yet."""
    name = recipe.model.name_or_path
    if recipe.model.from_run is None and recipe.model.init != "scratch" and name.startswith("builtin:"):
        build_builtin(name.removeprefix("builtin:"))
    teacher = recipe.distill.teacher or ""
    if recipe.stage == "distill" and teacher.startswith("builtin:"):
        build_builtin(teacher.removeprefix("builtin:"))


def build_builtin(name: str, overrides: list[str] | None = None) -> Path:
    """The model directory of built-in base `name`, pretraining it first (with the `pretrain` stage)
    if it is not cached yet."""
    recipe, src, final = builtin.builtin_recipe(name, overrides)
    if (final / "model" / "config.json").is_file():
        return final / "model"
    procs = models.processes()
    if procs.num_processes > 1:
        # Under `accelerate launch` the main process builds it, in a one-process run of its own, so
        # the cached model is the same however it was first asked for; the others wait for it.
        if procs.is_main_process:
            env = {k: v for k, v in os.environ.items()
                   if k not in PROCESS_GROUP_ENV and not k.startswith(("ACCELERATE_", "TORCHELASTIC_"))}
            build = ("import sys; from adapterkit.stages import build_builtin; "
                     "build_builtin(sys.argv[1], sys.argv[2:])")
            subprocess.run([sys.executable, "-c", build, name, *(overrides or [])], env=env, check=True)
        procs.wait_for_everyone()
        return final / "model"
    final.parent.mkdir(parents=True, exist_ok=True)
    print(f"adapterkit: building the built-in base model 'builtin:{name}' (first use only): pretraining it with "
          f"the '{builtin.BUILTIN[name]}' recipe on the shipped sample corpus; it will be cached in {final}",
          file=sys.stderr, flush=True)
    work = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{name}-building-"))
    try:
        recipe.output_dir = str(work / "run")
        run(recipe, src)  # a pretrain recipe: its base is built from scratch, never builtin
        try:
            os.replace(work / "run", final)
        except OSError:  # another process finished first; its copy is as good as ours
            if not (final / "model" / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"adapterkit: built-in base model ready: {final / 'model'}", file=sys.stderr, flush=True)
    return final / "model"
