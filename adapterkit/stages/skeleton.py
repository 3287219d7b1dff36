"""The run every stage shares, top to bottom; a stage (`Stage`) fills in only what differs.

1. Take the output dir's lock, and decide before anything is written whether this is a fresh run or
   the resume of an interrupted one with the same recipe and data.
2. `stage.prepare`: the recipe as it will run (resolved once), tokenizer, data, model config and every
   check of the user's input. Bad input fails here, with the run dir untouched.
3. Start the manifest (or mark the run resumed): recipe.yaml is the resolved recipe, and the values
   decided for this machine where the recipe says `auto` are recorded beside it (`auto`).
4. `stage.train`, then the final model is published atomically. Any failure (an error, Ctrl-C, a
   signal) marks the run failed or interrupted, with the command that resumes it.
5. `stage.finish` writes the stage's reports; the manifest is marked completed.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from adapterkit import models, rundir
from adapterkit.adapters import MethodSpec
from adapterkit.config import Recipe, RecipeSource, dump_recipe, saved_recipe
from adapterkit.data.formatter import DataReport, Formatter
from adapterkit.data.loading import resolve_sample
from adapterkit.errors import DataError, Problem
from adapterkit.stages.trainer import Auto, save_final


def describe_source(source: str | list[str] | None) -> str:
    """A data source (or several) as the data report and error messages name it."""
    return ", ".join(source) if isinstance(source, list) else str(source)


def data_identity(source: str | list[str] | None, split: str) -> list[dict[str, str]]:
    """Identity of each data source for the manifest: a content hash for files, id and split for the hub."""
    out = []
    for one in ([source] if isinstance(source, str) else source or []):
        path = resolve_sample(one) if one.startswith("sample:") else Path(one).expanduser()
        if path.is_file():
            out.append({"source": one, "path": str(path.resolve()), "sha256": rundir.file_sha256(path)})
        elif path.is_dir():  # shards, possibly many GB: their names, sizes and times, not their bytes
            files = sorted(p for p in path.rglob("*") if p.is_file())
            stats = [(str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
            out.append({"source": one, "path": str(path.resolve()), "files": len(files),
                        "stat_sha256": hashlib.sha256(json.dumps(stats).encode()).hexdigest(), "split": split})
        else:
            out.append({"source": one, "hub_split": split})
    return out


def too_many_dropped(report: DataReport, d: Any, source: str,
                     what_input_does: str = "keeps completions whole and shortens inputs") -> Problem:
    """The refusal when more than data.max_dropped of the rows would be dropped, with the fix that fits
    the reasons: a max_length that keeps enough rows (from their real lengths) when length is why."""
    dropped = sum(report.dropped.values())
    reasons = "; ".join(f"{n} {r}" for r, n in sorted(report.dropped.items()))
    by_length = sum(n for r, n in report.dropped.items() if "max_length" in r)
    allow = f"data.max_dropped={min(1.0, round(dropped / report.rows_read + 0.01, 2))}"
    duplicates = any("duplicate" in r for r in report.dropped) and not d.clean
    fix = (f"drop duplicates (and near duplicates) before formatting with data.clean=true, or allow more with {allow}"
           if duplicates else f"clean the data (see `adapterkit data preview`), or allow more with {allow}")
    length = report.max_length_keeping(1 - d.max_dropped) if by_length else None
    if length is not None and length > d.max_length:
        full = report.max_length_keeping(1.0)
        fix = (f"raise data.max_length: {length} keeps {1 - d.max_dropped:.0%} of the rows"
               + (f", {full} keeps them all" if full and full > length else "")
               + (f" (data.truncation=input {what_input_does})"
                  if d.truncation != "input" else "") + f"; or allow more with {allow}")
    return Problem(source, f"{dropped} of {report.rows_read} rows ({dropped / report.rows_read:.1%}) would be "
                   f"dropped: {reasons}", "data.max_dropped", fix=fix)


def refuse_unusable(report: DataReport, examples: list[Any], d: Any, split: str,
                    what_input_does: str = "keeps completions whole and shortens inputs") -> None:
    """The checks every stage makes of a formatted split: something is left to train on (or evaluate),
    and no more than data.max_dropped of the training rows were dropped."""
    source = describe_source(d.train if split == "train" else d.eval)
    if split == "eval":
        if not examples:
            raise DataError(Problem(source, "no usable eval example", "data.eval",
                                    fix="check the eval file, or remove data.eval"))
        return
    if not examples:
        reasons = "; ".join(f"{n} {r}" for r, n in report.dropped.items()) or "the data is empty"
        raise DataError(Problem(source, f"no usable training example ({reasons})", "data.train",
                                fix="check the file and the task's fields (see the README's task table)"))
    if sum(report.dropped.values()) > d.max_dropped * report.rows_read:
        raise DataError(too_many_dropped(report, d, source, what_input_does))


@dataclass
class Context:
    """Where a run goes and how it runs on this machine: what every step of a stage sees."""

    out: Path
    src: RecipeSource
    dev: Any
    procs: Any
    """accelerate's process state: under `accelerate launch` every process runs the stage (each on its
    shard of the data), and only the main one prints and writes the run directory."""
    echo: bool
    callbacks: list[Any]
    lineage: dict[str, Any]
    checkpoint: Path | None = None
    """The checkpoint this run resumes from (None: a fresh run)."""

    @property
    def main(self) -> bool:
        return self.procs.is_main_process

    def say(self, *args: Any, **kwargs: Any) -> None:
        if self.echo:
            print(*args, **kwargs)


@dataclass
class Data:
    """A recipe's data as its stage trains on it (what `adapterkit data preview` shows)."""

    tokenizer: Any
    formatter: Formatter
    train: list[dict]
    evaluation: list[dict] | None
    reports: list[DataReport]
    source: str | None
    """Where the base weights come from: a hub id or directory (None: built from scratch)."""
    stream: Any = None
    """data.streaming: the stream training reads (`train` then holds the examples of its first rows)."""


@dataclass
class Prepared:
    """What a stage found before anything is written."""

    recipe: Recipe
    """The recipe as it runs, resolved once: recipe.yaml is its dump, and the trainer reads it (with `auto`)."""
    auto: Auto
    method: MethodSpec
    source: str | None
    """Where the base weights come from: a hub id or directory (None: built from scratch)."""
    tokenizer: Any
    formatter: Formatter
    reports: list[DataReport]
    precision: str
    config: Any
    """The base model's config."""
    manifest: dict[str, Any] = field(default_factory=dict)
    """What the stage adds to the manifest."""
    work: Any = None
    """The stage's own (its formatted rows, its evaluation)."""
    rewrite_saved: Callable[[Path], None] | None = None
    """Rewrites the saved final weights in their temp dir before they are published (a preference run on
    a merged start stacks its adapter onto the starting one)."""


class Stage(Protocol):
    """One kind of training run (see `adapterkit.stages.STAGES`). The skeleton calls, in order:"""

    def resolve(self, recipe: Recipe) -> tuple[Recipe, dict[str, Any]]:
        """The recipe as it will run (what recipe.yaml saves and resume compares), and what the run starts
        from for the manifest's lineage (`from_run`)."""

    def data(self, recipe: Recipe, say: Any = print) -> Data:
        """The tokenizer, and the data read, checked and formatted as this stage trains on it."""

    def prepare(self, recipe: Recipe, ctx: Context) -> Prepared:
        """Read and check the data and the model config, decide the `auto` settings. Writes nothing."""

    def train(self, run: Prepared, ctx: Context) -> tuple[Any, dict[str, Any]]:
        """Load the model, train it (resuming from `ctx.checkpoint`); the trainer and the run's metrics."""

    def finish(self, run: Prepared, ctx: Context, metrics: dict[str, Any]) -> None:
        """After the model is published (main process only): the stage's reports."""


@dataclass
class RunResult:
    """What a run leaves: the run directory, and the trained model and tokenizer still in memory."""

    out: Path
    model: Any
    tokenizer: Any
    metrics: dict[str, Any]


def run_stage(stage: Stage, recipe: Recipe, src: RecipeSource, force: bool = False, echo: bool = True,
              callbacks: list[Any] | None = None, restart: bool = False, resume_anyway: bool = False,
              lineage: dict[str, Any] | None = None) -> RunResult:
    """Run one recipe end to end with `stage`, holding the output dir's lock (a second process on the same
    output_dir is refused, naming the first one's pid); or resume it from its newest checkpoint when
    `output_dir` holds an interrupted run of the same recipe and data. `callbacks`: extra
    TrainerCallbacks; `lineage` (which pipeline and run this one comes from) goes into the manifest."""
    out = Path(recipe.output_dir)
    with rundir.exclusive(out, force=force, take=models.processes().is_main_process):
        return _run(stage, recipe, src, force, echo, callbacks, restart, resume_anyway, lineage)


def _run(stage: Stage, recipe: Recipe, src: RecipeSource, force: bool, echo: bool, callbacks: list[Any] | None,
         restart: bool, resume_anyway: bool, lineage: dict[str, Any] | None) -> RunResult:
    import datasets
    from transformers import set_seed
    from transformers.utils import logging as hf_logging

    procs = models.processes()
    ctx = Context(Path(recipe.output_dir), src, models.device(), procs, echo and procs.is_main_process,
                  list(callbacks or []), dict(lineage or {}))
    datasets.disable_progress_bars()
    hf_logging.disable_progress_bar()  # the ProgressLog line is the progress display
    recipe, start = stage.resolve(recipe)
    ctx.lineage.update(start)
    out = ctx.out
    data_ids = {"train": data_identity(recipe.data.train, recipe.data.train_split),
                "eval": data_identity(recipe.data.eval, recipe.data.eval_split)}
    saved = saved_recipe(recipe)
    ctx.checkpoint = rundir.plan_output_dir(out, saved, data_ids, force, restart, resume_anyway)
    procs.wait_for_everyone()  # all processes decide on output_dir (fresh or resume) before anything is written
    set_seed(recipe.train.seed)
    # Tokenizer, data and model config first: bad input must fail before the run dir is touched.
    prepared = stage.prepare(recipe, ctx)
    if ctx.main and ctx.checkpoint is not None:
        step = rundir.resume(out, ctx.checkpoint, ctx.say)
        ctx.say(f"resuming from {ctx.checkpoint} (step {step}); " + (
            "--resume-anyway: the recipe or data may differ from what it was written with" if resume_anyway else
            "recipe and data are unchanged since it was written"))
    elif ctx.main:
        rundir.start(out, (out / rundir.MANIFEST).is_file(), dump_recipe(recipe), {
            "recipe": src.name, "recipe_path": src.path, "overrides": src.command_line, "stage": recipe.stage,
            "method": prepared.method.name, "task": recipe.data.task, "seed": recipe.train.seed,
            "device": str(ctx.dev), "processes": procs.num_processes, "precision": prepared.precision,
            "model_source": prepared.source or "scratch", "auto": prepared.auto.to_dict(),
            "gradient_checkpointing": prepared.auto.gradient_checkpointing,
            "fingerprint": rundir.fingerprint(saved), "data": data_ids, "lineage": ctx.lineage,
            **prepared.manifest,
        })
        rundir.write_json(out / "data_report.json", [r.to_dict() for r in prepared.reports])
    procs.wait_for_everyone()  # the others read the manifest next

    try:
        trainer, metrics = stage.train(prepared, ctx)
        save_final(trainer, prepared.tokenizer, prepared.formatter, out, prepared.rewrite_saved)
    except BaseException as e:
        if ctx.main:
            rundir.mark_ended(out, e)
        raise
    result = RunResult(out, trainer.model, prepared.tokenizer, metrics)
    if not ctx.main:
        return result
    rundir.plot_losses(out)
    stage.finish(prepared, ctx, metrics)
    rundir.update_manifest(out, status="completed", finished=rundir.now(), metrics=metrics,
                           auto=prepared.auto.to_dict())
    method = prepared.method
    ctx.say(f"saved {method.name} {'model' if method.trains_base else 'adapter'} to {out / 'model'}")
    return result

