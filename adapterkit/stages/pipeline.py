"""Pipelines: recipes run in order, each stage's output feeding the next.

    adapterkit recipe run pipeline-quickstart                       # pretrain -> sft -> dpo
    adapterkit recipe run pipeline-quickstart train.max_steps=20    # every stage
    adapterkit recipe run pipeline-quickstart dpo.preference.beta=0.2   # one stage

A pipeline file lists stages (`name`, `recipe`: a shipped name or a path relative to the file,
`overrides`). Stage k+1 starts from stage k: from its weights (`model.name_or_path=<k>/model`) after
pretraining or full fine-tuning, from the run itself (`model.from_run=<k>`, the adapter continues)
after LoRA/QLoRA; a distill stage takes stage k as its teacher (`distill.teacher=<k>`). Every stage is validated before the first one starts. Each stage writes its own
run directory under the pipeline's output_dir, with the run it started from in its manifest
(`lineage`); `pipeline.json` lists the stages and their status. Re-running the command skips
completed stages and resumes an interrupted one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from adapterkit import models, rundir
from adapterkit.adapters import METHODS
from adapterkit.config import Recipe, RecipeSource, find_recipe, load_recipe, saved_recipe
from adapterkit.errors import ConfigError, Problem, did_you_mean
from adapterkit.stages import STAGES
from adapterkit.stages import run as run_recipe

KEYS = ("description", "pipeline", "output_dir")
STAGE_KEYS = ("name", "recipe", "overrides")


@dataclass
class Step:
    name: str
    recipe: str
    overrides: list[str] = field(default_factory=list)


@dataclass
class Pipeline:
    name: str
    path: Path
    stages: list[Step]
    output_dir: Path
    description: str = ""


def is_pipeline(path: Path) -> bool:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError):
        return False
    return isinstance(data, dict) and "pipeline" in data


def load_pipeline(path: Path, overrides: list[str]) -> Pipeline:
    """Read and check a pipeline file; `overrides` prefixed with a stage name go to that stage, others to all."""
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    where = str(path)
    problems = [Problem(where, f"unknown key '{k}'" + (f" ({h})" if (h := did_you_mean(k, KEYS)) else ""), k,
                        fix=f"use {', '.join(KEYS)}") for k in data if k not in KEYS]
    stages: list[Step] = []
    raw = data.get("pipeline")
    if not isinstance(raw, list) or not raw:
        problems.append(Problem(where, "pipeline must be a list of stages", "pipeline",
                                fix="list stages as - {name: sft, recipe: lora-sentiment, overrides: [...]}"))
        raw = []
    for i, item in enumerate(raw):
        key = f"pipeline[{i}]"
        if not isinstance(item, dict) or "name" not in item or "recipe" not in item:
            problems.append(Problem(where, "a stage needs a name and a recipe", key,
                                    fix="e.g. - {name: sft, recipe: lora-sentiment}"))
            continue
        unknown = [k for k in item if k not in STAGE_KEYS]
        if unknown:
            problems.append(Problem(where, f"unknown stage key(s) {unknown}", key, fix=f"use {', '.join(STAGE_KEYS)}"))
        ref = str(item["recipe"])
        local = path.parent / ref
        stages.append(Step(str(item["name"]), str(local) if local.is_file() else ref,
                            [str(o) for o in item.get("overrides") or []]))
    names = [s.name for s in stages]
    if len(set(names)) != len(names):
        problems.append(Problem(where, f"stage names repeat: {names}", "pipeline", fix="give each stage its own name"))
    output_dir = data.get("output_dir") or f"runs/{path.stem}"
    for item in overrides:
        key, _, value = item.partition("=")
        head = key.split(".", 1)[0]
        if key == "output_dir":
            output_dir = value
        elif head in names:
            next(s for s in stages if s.name == head).overrides.append(item[len(head) + 1:])
        else:
            for s in stages:
                s.overrides.append(item)
    if problems:
        raise ConfigError(problems, title=f"pipeline '{path.stem}' ({path}) is invalid:")
    return Pipeline(path.stem, path, stages, Path(output_dir), data.get("description", ""))


def resolve(pipeline: Pipeline) -> list[tuple[Step, Recipe, RecipeSource, str | None]]:
    """Every stage's recipe with its chaining overrides, checked before anything runs:
    [(stage, recipe, source, the run it starts from)]."""
    out, previous, problems = [], None, []
    for stage in pipeline.stages:
        chain: list[str] = [f"output_dir={pipeline.output_dir / stage.name}"]
        if previous is not None and _distills(stage):
            # A distill stage learns from the one before: it is the teacher, the student is its own model.
            chain.append(f"distill.teacher={pipeline.output_dir / previous[0].name}")
        elif previous is not None:
            prev_stage, prev_recipe = previous
            prev_dir = pipeline.output_dir / prev_stage.name
            method = METHODS[prev_recipe.adapter.method]
            if not method.trains_base and method.continues is None:
                problems.append(Problem(f"stage '{stage.name}'", f"stage '{prev_stage.name}' trains a soft prompt, "
                                        "which no later stage can build on", "pipeline",
                                        fix="end the pipeline with the soft-prompt stage"))
            chain.append(f"model.name_or_path={prev_dir / 'model'}" if method.trains_base
                         else f"model.from_run={prev_dir}")
        try:
            recipe, src = load_recipe(stage.recipe, stage.overrides + chain)
        except ConfigError as e:
            problems += [Problem(f"stage '{stage.name}': {p.where}", p.message, p.key, p.fix) for p in e.problems]
            previous = None
            continue
        out.append((stage, recipe, src, str(pipeline.output_dir / previous[0].name) if previous else None))
        previous = (stage, recipe)
    if problems:
        raise ConfigError(problems, title=f"pipeline '{pipeline.name}' ({pipeline.path}) is invalid:")
    return out


def _distills(stage: Step) -> bool:
    """Whether the stage's recipe (with its overrides) is a distill stage."""
    stage_overrides = [o.partition("=")[2] for o in stage.overrides if o.partition("=")[0] == "stage"]
    if stage_overrides:
        return stage_overrides[-1] == "distill"
    try:
        data = yaml.safe_load(find_recipe(stage.recipe).read_text(encoding="utf-8"))
    except (ConfigError, OSError, yaml.YAMLError, UnicodeDecodeError):
        return False  # load_recipe reports it
    return isinstance(data, dict) and data.get("stage") == "distill"


def run(pipeline: Pipeline, echo: bool = True, **kwargs: Any) -> list[Path]:
    """Run the stages in order; completed stages (same recipe and data) are skipped. Returns the run dirs."""
    main = models.processes().is_main_process  # under `accelerate launch` only the main process writes
    say = print if echo and main else (lambda *a, **k: None)
    stages = resolve(pipeline)
    pipeline.output_dir.mkdir(parents=True, exist_ok=True)
    record = {"pipeline": pipeline.name, "path": str(pipeline.path), "stages": [
        {"name": s.name, "recipe": s.recipe, "output_dir": r.output_dir, "from": prev, "status": "pending"}
        for s, r, _, prev in stages]}
    if main:
        rundir.write_json(pipeline.output_dir / "pipeline.json", record)
    outs = []
    for i, (stage, recipe, src, prev) in enumerate(stages):
        out = Path(recipe.output_dir)
        say(f"== stage {i + 1}/{len(stages)}: {stage.name} ({src.name}, {recipe.stage}, {recipe.adapter.method})")
        if _completed(out, recipe):
            say(f"   already complete in {out}; skipped")
        else:
            lineage = {"pipeline": pipeline.name, "stage": stage.name, **({"from_run": prev} if prev else {})}
            run_recipe(recipe, src, echo=echo, lineage=lineage, **kwargs)
        record["stages"][i]["status"] = "completed"
        if main:
            rundir.write_json(pipeline.output_dir / "pipeline.json", record)
        outs.append(out)
    return outs


def _completed(out: Path, recipe: Recipe) -> bool:
    if not (out / rundir.MANIFEST).is_file():
        return False
    m = rundir.read_manifest(out)
    resolved, _ = STAGES[recipe.stage].resolve(recipe)
    return m.get("status") == "completed" and m.get("fingerprint") == rundir.fingerprint(saved_recipe(resolved))
