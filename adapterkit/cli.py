"""The `adapterkit` command line.

    adapterkit recipe list
    adapterkit recipe show lora-sentiment
    adapterkit recipe run lora-sentiment train.max_steps=200 output_dir=runs/s1
    adapterkit recipe run my_recipe.yaml model.name_or_path=Qwen/Qwen2.5-0.5B data.train=reviews.csv
    adapterkit data preview my_recipe.yaml
    adapterkit data clean reviews.jsonl --task sentiment --out reviews.clean.jsonl
    adapterkit eval runs/s1 --data test.jsonl
    adapterkit export runs/s1 --out exported/s1
    adapterkit plan qlora-qa --gpu-memory 12GiB

Errors in the user's input (AdapterkitError) are printed without a traceback and exit with code 2.
"""

from __future__ import annotations

import signal
import sys
import warnings
from typing import Any, Optional

import click
import typer

from adapterkit.errors import AdapterkitError, Interrupted

app = typer.Typer(help="Fine-tune language models on one GPU (or a CPU): recipes for pretraining, LoRA, QLoRA, "
                       "soft prompts and full fine-tuning.", no_args_is_help=True, pretty_exceptions_show_locals=False,
                  add_completion=False)
recipe_app = typer.Typer(help="List, show and run recipes.", no_args_is_help=True)
data_app = typer.Typer(help="Look at data the way training will see it, and clean it.", no_args_is_help=True)
app.add_typer(recipe_app, name="recipe")
app.add_typer(data_app, name="data")


def _print_version(value: bool) -> None:
    if value:
        from adapterkit import rundir

        typer.echo("\n".join(f"{name} {version}" for name, version in rundir.versions().items()))
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                       help="Print the versions of adapterkit and the libraries it runs on."),
          verbose: bool = typer.Option(False, "--verbose", help="Also show the libraries' deprecation warnings and "
                                       "start-up notes that adapterkit hides by default.")) -> None:
    """Fine-tune language models on one GPU (or a CPU): recipes for pretraining, LoRA, QLoRA, soft prompts and
    full fine-tuning."""
    if verbose:
        import adapterkit

        adapterkit.show_library_noise()
        for pattern in QUIET_WARNINGS:
            warnings.filterwarnings("default", message=pattern, category=FutureWarning)

OVERRIDES = typer.Argument(None, help="Dotted overrides, e.g. train.max_steps=200 data.train=my.jsonl "
                                      "(values follow YAML rules: 1e-4, true, null).", show_default=False)


@recipe_app.command("list")
def recipe_list() -> None:
    """The shipped recipes, one line each: name, stage, method, task."""
    from adapterkit.config import shipped, summary

    rows = [summary(p) for p in shipped().values()]
    widths = {k: max(len(k), *(len(r[k]) for r in rows)) for k in ("name", "stage", "method", "task")}
    header = "  ".join(k.upper().ljust(widths[k]) for k in widths) + "  DESCRIPTION"
    typer.echo(header)
    for r in rows:
        typer.echo("  ".join(r[k].ljust(widths[k]) for k in widths) + "  " + r["description"])


@recipe_app.command("show")
def recipe_show(name: str = typer.Argument(..., help="A shipped recipe's name or a YAML path.")) -> None:
    """Print a recipe's commented YAML (copy it to start your own)."""
    from adapterkit.config import find_recipe

    typer.echo(find_recipe(name).read_text(encoding="utf-8"), nl=False)


@recipe_app.command("run")
def recipe_run(
    name: str = typer.Argument(..., help="A shipped recipe's name or a YAML path."),
    overrides: Optional[list[str]] = OVERRIDES,
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the resolved recipe and stop."),
    force: bool = typer.Option(False, "--force", help="Write into an output_dir that is not an adapterkit run."),
    restart: bool = typer.Option(False, "--restart", help="Discard the run in output_dir and start over."),
    resume_anyway: bool = typer.Option(False, "--resume-anyway",
                                       help="Resume even though the recipe or data changed since the checkpoint."),
) -> None:
    """Run a recipe: validate it, then train and write the run directory.

    Re-running the same command on an interrupted run resumes from its newest checkpoint."""
    from adapterkit.config import dump_recipe, find_recipe, load_recipe
    from adapterkit.stages import pipeline as pipelines

    path = find_recipe(name)
    if pipelines.is_pipeline(path):
        pipeline = pipelines.load_pipeline(path, overrides or [])
        if dry_run:
            for stage, recipe, src, _ in pipelines.resolve(pipeline):
                typer.echo(f"# stage '{stage.name}': recipe '{src.name}' with overrides: {' '.join(src.command_line)}")
                typer.echo(dump_recipe(recipe))
            return
        pipelines.run(pipeline, force=force, restart=restart, resume_anyway=resume_anyway)
        return
    recipe, src = load_recipe(name, overrides or [])
    if dry_run:
        typer.echo(f"# resolved recipe '{src.name}' ({src.path})" +
                   (f" with overrides: {' '.join(src.command_line)}" if src.command_line else ""))
        typer.echo(dump_recipe(recipe), nl=False)
        return
    from adapterkit import stages

    stages.run(recipe, src, force=force, restart=restart, resume_anyway=resume_anyway)


@data_app.command("preview")
def data_preview(
    name: str = typer.Argument(..., help="A shipped recipe's name or a YAML path."),
    overrides: Optional[list[str]] = OVERRIDES,
    n: int = typer.Option(3, "-n", min=1, help="How many examples to show."),
    split: str = typer.Option("train", help="train or eval."),
) -> None:
    """Show formatted examples as training sees them; the supervised tokens are between ⟦ and ⟧."""
    from adapterkit.config import load_recipe
    from adapterkit.data.formatter import IGNORE
    from adapterkit.errors import ConfigError, Problem
    from adapterkit import stages

    if split not in ("train", "eval"):
        raise ConfigError(Problem("--split", f"'{split}' is not a split", fix="use --split train or --split eval"))
    recipe, _ = load_recipe(name, overrides or [])
    d = recipe.data
    if split == "eval" and d.eval is None:
        raise ConfigError(Problem("data.eval", "the recipe has no eval data", fix="use --split train"))
    stages.ensure_base(recipe)
    data = stages.STAGES[recipe.stage].data(recipe)
    formatter, tokenizer = data.formatter, data.tokenizer
    examples, report = (data.train, data.reports[0]) if split == "train" else (data.evaluation, data.reports[1])
    if examples and "input_ids" not in examples[0]:  # preference data, tokenized later by trl
        typer.echo(f"task {d.task}, {formatter.spec.mode} template; trl adds EOS to each completion")
        typer.echo(report.summary())
        for i, rec in enumerate(examples[:n]):
            typer.echo(typer.style(f"\n--- example {i}", bold=True))
            for key, value in rec.items():
                typer.echo(typer.style(f"[{key}]", fg="cyan") + f" {value}")
        return
    typer.echo(f"task {d.task}, {formatter.spec.mode} template; supervised tokens are shown between ⟦ and ⟧")
    typer.echo(report.summary())
    for i, ex in enumerate(examples[:n]):
        supervised = sum(lbl != IGNORE for lbl in ex["labels"])
        typer.echo(typer.style(f"\n--- example {i} ({len(ex['input_ids'])} tokens, {supervised} supervised)",
                               bold=True))
        typer.echo(_marked(tokenizer, ex["input_ids"], ex["labels"], IGNORE))


@data_app.command("clean")
def data_clean(
    source: str = typer.Argument(..., metavar="IN", help="A data file (jsonl, json, csv, tsv, parquet, txt; .gz too), "
                                                         "a sample: name or a datasets hub id."),
    task: str = typer.Option(..., "--task", help="The task the rows are for: its fields are checked and compared."),
    out: str = typer.Option(..., "--out", help="The cleaned rows (JSONL); the report goes to OUT.report.json."),
    column: Optional[list[str]] = typer.Option(None, "--column", help="FIELD=COLUMN where a task field has another "
                                                                      "name in the data (repeatable)."),
    dedup: bool = typer.Option(True, "--dedup/--no-dedup", help="Drop exact duplicates."),
    near_duplicates: str = typer.Option("0.85", "--near-duplicates", help="Jaccard similarity (0-1] at which a row "
                                                                           "is a near duplicate, or off."),
    min_tokens: Optional[int] = typer.Option(None, "--min-tokens", min=1, help="Drop rows with fewer tokens."),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", min=1, help="Drop rows with more tokens."),
    tokenizer: Optional[str] = typer.Option(None, "--tokenizer", help="The tokenizer that counts tokens (a hub id "
                                                                      "or directory): needed for the token limits."),
    language: Optional[list[str]] = typer.Option(None, "--language", help="Keep only these languages (ISO 639-1: "
                                                                          "en, de, ...; repeatable or comma-separated)."),
    language_confidence: float = typer.Option(0.9, "--language-confidence", min=0.0, max=1.0,
                                              help="Drop a row for its language only when the detector is this sure."),
    split: str = typer.Option("train", "--split", help="The split of a hub dataset."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Clean a data set for a task, streaming (a file larger than memory works): normalise Unicode and
    whitespace; drop empty rows, rows with control characters, exact and near duplicates, rows outside
    the token limits and rows in other languages; report what went and why."""
    import json
    from pathlib import Path

    from adapterkit.config import ModelConfig
    from adapterkit.config import CleanConfig
    from adapterkit.data.clean import clean_file
    from adapterkit.data.language import unknown_languages
    from adapterkit.data.tasks import TASKS
    from adapterkit.errors import ConfigError, Problem, did_you_mean
    from adapterkit.models import load_tokenizer

    problems = []
    if task not in TASKS:
        hint = did_you_mean(task, TASKS)
        problems.append(Problem("--task", f"'{task}' is not a task" + (f" ({hint})" if hint else ""),
                                fix=f"use one of {', '.join(TASKS)}"))
    columns = _columns(column, problems)
    near: float | None = None
    if near_duplicates.lower() not in ("off", "none", "0"):
        try:
            near = float(near_duplicates)
        except ValueError:
            near = -1.0
        if not 0 < near <= 1:
            problems.append(Problem("--near-duplicates", f"'{near_duplicates}' is not a similarity in (0, 1] or off",
                                    fix="e.g. --near-duplicates 0.85, or --near-duplicates off"))
    languages = sorted({code.strip() for item in language or [] for code in item.split(",") if code.strip()}) or None
    for code in unknown_languages(languages or []):
        problems.append(Problem("--language", f"'{code}' is not a language the detector knows",
                                fix="use ISO 639-1 codes such as en, de, fr, es, zh"))
    if min_tokens and max_tokens and min_tokens > max_tokens:
        problems.append(Problem("--min-tokens", f"{min_tokens} is more than --max-tokens {max_tokens}",
                                fix="give a minimum below the maximum"))
    if problems:
        raise ConfigError(problems)
    tok = load_tokenizer(ModelConfig(), tokenizer) if tokenizer else None
    settings = CleanConfig(dedup=dedup, near_duplicates=near, min_tokens=min_tokens, max_tokens=max_tokens,
                             languages=languages, language_confidence=language_confidence)
    report = clean_file(source, Path(out), task, columns, settings, tok, say=lambda m: typer.echo(m, err=True),
                        split=split)
    typer.echo(json.dumps(report.to_dict(), indent=2, ensure_ascii=False) if as_json else report.table())
    if not as_json:
        typer.echo(f"\nwrote {out} ({report.kept:,} rows) and {out}.report.json")


@data_app.command("select")
def data_select(
    source: str = typer.Argument(..., metavar="IN", help="A data file, a sample: name or a datasets hub id."),
    scorer: str = typer.Option(..., "--scorer", help="The small model that scores: a run, a model directory, "
                                                     "builtin:tiny or a hub id."),
    keep: float = typer.Option(..., "--keep", help="The fraction of the scored rows to keep, in (0, 1]."),
    out: str = typer.Option(..., "--out", help="The selected rows (JSONL, in input order); scores and report beside."),
    task: str = typer.Option(..., "--task", help="The task the rows are for (how they are formatted and scored)."),
    rule: str = typer.Option("lowest_loss", "--rule", help="lowest_loss, middle (drop outliers at both ends) or "
                                                           "learnability."),
    column: Optional[list[str]] = typer.Option(None, "--column", help="FIELD=COLUMN (repeatable)."),
    max_length: int = typer.Option(512, "--max-length", min=8, help="Longest example in tokens, as in training."),
    batch_size: int = typer.Option(16, "--batch-size", min=1, help="Rows per forward pass."),
    holdout: float = typer.Option(0.05, "--holdout", help="learnability: the share of rows held out to tune on."),
    tune_steps: int = typer.Option(40, "--tune-steps", min=1, help="learnability: LoRA steps on the held-out rows."),
    chunk_rows: int = typer.Option(512, "--chunk-rows", min=1, help="Rows scored between two saves of the scores "
                                                                    "(what a re-run after a kill skips)."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Score every row with a small model and keep a fraction by a rule: lowest loss, the middle (outliers
    at both ends dropped) or learnability. Batched, with progress; killed and re-run, it resumes from its
    saved scores and writes the same output."""
    import json
    from pathlib import Path

    from adapterkit.data.tasks import TASKS
    from adapterkit.errors import ConfigError, Problem, did_you_mean
    from adapterkit.selection import RULES, select_file

    problems = []
    if task not in TASKS:
        hint = did_you_mean(task, TASKS)
        problems.append(Problem("--task", f"'{task}' is not a task" + (f" ({hint})" if hint else ""),
                                fix=f"use one of {', '.join(TASKS)}"))
    if rule not in RULES:
        hint = did_you_mean(rule, RULES)
        problems.append(Problem("--rule", f"'{rule}' is not a rule" + (f" ({hint})" if hint else ""),
                                fix=f"use one of {', '.join(RULES)}"))
    if not 0 < keep <= 1:
        problems.append(Problem("--keep", f"{keep} is not a fraction in (0, 1]", fix="e.g. --keep 0.7"))
    columns = _columns(column, problems)
    if problems:
        raise ConfigError(problems)
    report = select_file(source, Path(out), scorer, task, keep, rule, columns, max_length, batch_size, holdout,
                         tune_steps, say=typer.echo, chunk_rows=chunk_rows)
    typer.echo(json.dumps(report.to_dict(), indent=2) if as_json else report.summary())
    if not as_json:
        typer.echo(f"wrote {out} ({report.kept:,} rows), {out}.scores.jsonl and {out}.report.json")


@app.command("eval")
def eval_command(
    path: str = typer.Argument(..., help="A run's output_dir, or a model directory (transformers or peft)."),
    data: Optional[str] = typer.Option(None, "--data", help="Eval data: a file or hub id. Default: the run's data.eval."),
    task: Optional[str] = typer.Option(None, "--task", help="The task, for a model adapterkit did not train."),
    split: Optional[str] = typer.Option(None, "--split", help="Split of a hub dataset (default: validation)."),
    column: Optional[list[str]] = typer.Option(None, "--column", help="FIELD=COLUMN, e.g. --column text=review."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Evaluate the first N usable rows."),
    all_rows: bool = typer.Option(False, "--all", help="Evaluate every row (no limit)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=1),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", min=1,
                                                 help="Generation length (default: per task)."),
    out: Optional[str] = typer.Option(None, "--out", help="Where the report goes (default: RUN/eval)."),
    no_base: bool = typer.Option(False, "--no-base", help="Skip the starting model."),
) -> None:
    """Score a model with its task's metric (before and after, for a run); write metrics.json and report.md."""
    from pathlib import Path

    from adapterkit.errors import ConfigError, Problem
    from adapterkit.evaluation import evaluate_path, metrics_table

    columns = {}
    for item in column or []:
        field, sep, col = item.partition("=")
        if not sep or not field or not col:
            raise ConfigError(Problem("--column", f"{item!r} is not FIELD=COLUMN", fix="e.g. --column text=review"))
        columns[field] = col
    settings = {k: v for k, v in dict(limit=limit, batch_size=batch_size, max_new_tokens=max_new_tokens).items()
                if v is not None}
    if all_rows:
        settings["limit"] = None
    summary, where = evaluate_path(path, data, task, split, columns, settings, Path(out) if out else None,
                                   base=not no_base, say=typer.echo)
    typer.echo(metrics_table(summary))
    typer.echo(f"wrote {where / 'metrics.json'}, {where / 'report.md'} and {where / 'worst_examples.jsonl'}")


@app.command("generate")
def generate_command(
    path: str = typer.Argument(..., help="A run's output_dir, or a model directory (transformers or peft)."),
    data: str = typer.Option(..., "--data", help="Prompts: a file (jsonl, json, csv, parquet, txt) or hub id, with "
                                                 "the task's input fields; an answer field is not needed."),
    out: str = typer.Option(..., "--out", help="The JSONL to write: each row's fields and its `completion`."),
    task: Optional[str] = typer.Option(None, "--task", help="The task, for a model adapterkit did not train."),
    column: Optional[list[str]] = typer.Option(None, "--column", help="FIELD=COLUMN, e.g. --column text=review."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="The first N rows only."),
    batch_size: int = typer.Option(8, "--batch-size", min=1),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", min=1,
                                                 help="Generation length (default: per task)."),
) -> None:
    """Write the model's completions for a file of prompts (batched, greedy, with the run's template and stops)."""
    from pathlib import Path

    from adapterkit.errors import ConfigError
    from adapterkit.inference import generate_file

    problems: list[Any] = []
    columns = _columns(column, problems)
    if problems:
        raise ConfigError(problems)
    done = generate_file(path, data, Path(out), task, columns, max_new_tokens, batch_size, limit, say=typer.echo)
    typer.echo(f"wrote {done['prompts']} completions to {done['out']}")


@app.command("chat")
def chat_command(
    path: str = typer.Argument(..., help="A run's output_dir, or a model directory (transformers or peft)."),
    task: Optional[str] = typer.Option(None, "--task", help="The task, for a model adapterkit did not train "
                                                            "(default: chat, with its own chat template)."),
    system: Optional[str] = typer.Option(None, "--system", help="A system message for the conversation."),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", min=1,
                                                 help="Longest reply (default: per task)."),
) -> None:
    """Talk to a model: each line you type is a turn, the reply streams back (Ctrl-D ends). With stdin
    from a pipe, all of it is one prompt and the reply is printed: `echo "..." | adapterkit chat RUN`."""
    import sys

    from adapterkit.inference import chat, stdin_lines

    interactive = sys.stdin.isatty()
    chat(path, stdin_lines(interactive), sys.stdout, task, max_new_tokens, system, interactive)


@app.command("export")
def export_command(
    path: str = typer.Argument(..., help="A run's output_dir."),
    out: str = typer.Option(..., "--out", help="The directory to write: new or empty (or an earlier export, "
                                               "with --force)."),
    merge: Optional[bool] = typer.Option(None, "--merge/--no-merge", show_default=False,
                                         help="Merge the adapter into the weights (default), or export the adapter. "
                                              "Soft prompts cannot merge: they export the adapter."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="float32 | bfloat16 | float16 of the merged weights "
                                                              "(default: the base model's)."),
    base: Optional[str] = typer.Option(None, "--base", help="QLoRA: merge into the dequantised 4-bit weights the "
                                                            "adapter trained against (quantized, default) or into "
                                                            "the original base (original)."),
    force: bool = typer.Option(False, "--force", help="Replace an earlier export at --out, and write the export even "
                                                      "if the parity check fails."),
    fmt: str = typer.Option("hf", "--format", help="hf (a transformers model directory) or gguf (one .gguf file "
                                                   "for llama.cpp and Ollama, with a Modelfile)."),
    quant: Optional[str] = typer.Option(None, "--quant", help="gguf: f32 | f16 (default) | bf16 | q8_0 | q4_0."),
) -> None:
    """Export a run as a standalone model directory (or its adapter), or as a GGUF file, checked against the
    model as trained: max |Δlogits| and greedy agreement on a fixed batch of the run's data go to export.json."""
    from adapterkit.errors import ConfigError, Problem

    if fmt not in ("hf", "gguf"):
        raise ConfigError(Problem("--format", f"'{fmt}' is not an export format", fix="use --format hf or --format gguf"))
    if fmt == "gguf":
        wrong = [(flag, why) for flag, given, why in (
            ("--dtype", dtype, "a GGUF file's number format is --quant"),
            ("--no-merge", merge is False, "a GGUF file holds merged weights only")) if given]
        if wrong:
            raise ConfigError([Problem(flag, f"does not apply to --format gguf: {why}", fix=f"leave {flag} out")
                               for flag, why in wrong])
        from adapterkit.export_gguf import DEFAULT_QUANT, export_gguf

        export_gguf(path, out, quant or DEFAULT_QUANT, base, force, say=typer.echo)
        return
    if quant is not None:
        raise ConfigError(Problem("--quant", "applies to --format gguf only", fix="add --format gguf, or use --dtype"))
    from adapterkit.export import export

    export(path, out, merge, dtype, base, force, say=typer.echo)


@app.command("plan")
def plan_command(
    name: str = typer.Argument(..., help="A shipped recipe's name or a YAML path."),
    overrides: Optional[list[str]] = OVERRIDES,
    gpu_memory: Optional[str] = typer.Option(None, "--gpu-memory", help="Memory to fit in, e.g. 12GiB, 24GB, "
                                                                         "12000MiB: says whether the run fits, and if "
                                                                         "not, the nearest setting that does."),
    model_config: Optional[str] = typer.Option(None, "--model-config",
                                               help="Plan this config.json (or the directory holding it) instead of "
                                                    "the recipe's model, e.g. a hub model without network."),
    device: str = typer.Option("cuda", "--device", help="cuda (a GPU) or cpu."),
    as_json: bool = typer.Option(False, "--json", help="Print the plan as JSON (bytes)."),
) -> None:
    """Predict a run's peak memory from the model's config alone, before anything is loaded."""
    from adapterkit.errors import ConfigError, Problem
    from adapterkit.plan import nearest_fit, parse_memory, plan_recipe, render, to_json

    if device not in ("cuda", "cpu"):
        raise ConfigError(Problem("--device", f"'{device}' is not a device", fix="use --device cuda or --device cpu"))
    budget = parse_memory(gpu_memory) if gpu_memory is not None else None
    _, facts, memory = plan_recipe(name, overrides or [], device, model_config, budget)
    fit = (nearest_fit(name, overrides or [], facts, budget, device, model_config)
           if budget and not memory.fits(budget) else None)
    typer.echo(to_json(memory, budget, fit) if as_json else render(memory, budget, fit, name))


@app.command("doctor")
def doctor_command(
    path: str = typer.Argument(..., help="A run's output_dir (finished, interrupted or failed)."),
    as_json: bool = typer.Option(False, "--json", help="Print the findings as JSON."),
) -> None:
    """What a run's log and reports show went wrong (stagnant, rising or spiking loss, vanishing or exploding
    gradients, a learning rate far outside the method's range, nothing supervised, no end of turn learnt,
    overfitting, throughput collapse), each with what it saw and the fixes to try, ranked. Exit code 0
    when nothing is found, 1 when something is."""
    from pathlib import Path

    from adapterkit.doctor import report, to_json

    found, text = report(Path(path))
    typer.echo(to_json(found) if as_json else text)
    raise typer.Exit(1 if found else 0)


@app.command("methods")
def methods_command(
    model: str = typer.Argument(..., help="A hub id, a model directory, builtin:tiny, or a config.json."),
    overrides: Optional[list[str]] = OVERRIDES,
    gpu_memory: Optional[str] = typer.Option(None, "--gpu-memory", help="Memory to fit in, e.g. 12GiB: says which "
                                                                         "methods fit."),
    device: str = typer.Option("cuda", "--device", help="cuda (a GPU) or cpu."),
    as_json: bool = typer.Option(False, "--json", help="Print the rows as JSON (bytes)."),
) -> None:
    """Every adaptation method on MODEL, from its config alone: what trains, the planned peak memory, whether
    it fits, and whether it merges into the weights. KEY=VALUE overrides (data.max_length=1024,
    train.batch_size=4, adapter.lora.r=64, ...) apply to every row."""
    import json

    from adapterkit.errors import ConfigError, Problem
    from adapterkit.plan import parse_memory
    from adapterkit.plan.choose import methods_table, render_table

    if device not in ("cuda", "cpu"):
        raise ConfigError(Problem("--device", f"'{device}' is not a device", fix="use --device cuda or --device cpu"))
    budget = parse_memory(gpu_memory) if gpu_memory is not None else None
    config_path = model if model.endswith(".json") else None
    rows = methods_table(model, overrides or [], device, budget, config_path)
    typer.echo(json.dumps([r.to_dict() for r in rows], indent=2) if as_json else render_table(rows, model, device, budget))


def _columns(items: list[str] | None, problems: list[Any]) -> dict[str, str]:
    """`--column FIELD=COLUMN` options as a mapping; a malformed one is added to `problems`."""
    from adapterkit.errors import Problem

    columns = {}
    for item in items or []:
        key, eq, value = item.partition("=")
        if not eq or not key or not value:
            problems.append(Problem("--column", f"'{item}' is not FIELD=COLUMN", fix="e.g. --column text=review"))
        else:
            columns[key] = value
    return columns


def _marked(tokenizer, ids: list[int], labels: list[int], ignore: int) -> str:
    """Decode ids in runs of same supervision, wrapping supervised runs in ⟦ ⟧."""
    out, run, flag = [], [], None
    for token, label in zip(ids + [None], labels + [None]):
        now = label is not None and label != ignore
        if token is None or (flag is not None and now != flag):
            text = tokenizer.decode(run, skip_special_tokens=False)
            out.append(typer.style(f"⟦{text}⟧", fg="green") if flag else text)
            run = []
        if token is not None:
            run.append(token)
            flag = now
    return "".join(out)


def _stop_cleanly_on_termination() -> None:
    """SIGTERM and SIGHUP (a job scheduler, a closed terminal) stop a run the way Ctrl-C does: the manifest
    says "interrupted" and the resume command is printed, instead of the process vanishing mid-run."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return

    def stop(signum: int, frame: Any) -> None:
        raise Interrupted(signal.Signals(signum).name)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) in (signal.SIG_DFL, None):
            signal.signal(sig, stop)


QUIET_WARNINGS = (
    r".*deprecated and will be removed in v6",  # transformers 5's renames, met inside peft and trl
    # transformers 5.x, once per forward: peft's prefix tuning passes past_key_values (30 lines per eval)
    r"`past_key_values` is deprecated and will be removed in version",
)
"""FutureWarnings from inside the libraries that adapterkit hides unless --verbose: each says what a
library will change, nothing a user of adapterkit can act on."""


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the CLI, turning user errors into a message and exit code 2."""
    # Deprecations inside the libraries we call are for us to fix, not for users to read (--verbose shows them).
    for pattern in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern, category=FutureWarning)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # adapterkit prints its own progress lines
    _stop_cleanly_on_termination()
    try:
        code = app(args=argv, standalone_mode=False)
    except AdapterkitError as e:
        typer.echo(f"error: {e.render()}", err=True)
        sys.exit(e.exit_code)
    except Interrupted as e:  # SIGTERM/SIGHUP: a run has marked itself interrupted and said how to resume
        typer.echo("aborted", err=True)
        sys.exit(128 + getattr(signal, e.signal_name))
    except (KeyboardInterrupt, click.exceptions.Abort):  # Ctrl-C, where typer does not turn it into exit 130
        typer.echo("aborted", err=True)
        sys.exit(130)
    except Exception as e:
        if not _usage_error(e):
            raise
        e.show()  # an unknown option, a missing or bad argument: the usage line and the error, exit 2
        sys.exit(e.exit_code)
    sys.exit(code if isinstance(code, int) else 0)


def _usage_error(e: Exception) -> bool:
    """Whether `e` is click's way of reporting bad command-line usage (typer vendors its own copy of click
    from 0.2x on, so click.ClickException alone does not catch it)."""
    package = type(e).__module__.split(".")[0]
    return package in ("click", "typer") and hasattr(e, "show") and isinstance(getattr(e, "exit_code", None), int)


if __name__ == "__main__":
    main()
