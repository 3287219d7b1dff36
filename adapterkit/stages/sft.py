"""The training stage, shared by `pretrain` and `sft`: they differ only in their data.

    adapterkit recipe run lora-sentiment train.max_steps=50 output_dir=runs/s1

Prepare: the tokenizer first (a scratch model trains its own), then the data, read, formatted and
tokenized, and the model's config. Train: load or build the model, wrap it for the method, train
with trl's SFTTrainer, measuring the eval loss (and the task's metrics) before and after. The run
around it (lock, resume, manifest, atomic publish) is the shared skeleton's.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


from adapterkit import evaluation as evaluation_mod
from adapterkit import models, perf, rundir
from adapterkit import plan as plan_mod
from adapterkit.adapters import METHODS, trainable_parameters
from adapterkit.config import Recipe, packs
from adapterkit.data import streaming
from adapterkit.data.clean import RecipeCleaning
from adapterkit.data.formatter import DataReport, Formatter, encode_rows, label_set
from adapterkit.data.loading import RawRow, iter_rows, read_rows, read_training_rows, stream_rows
from adapterkit.data.streaming import TrainStream
from adapterkit.doctor import DoctorCallback
from adapterkit.errors import AdapterkitError, ConfigError, DataError, Problem
from adapterkit.stages.skeleton import Context, Data, Prepared, describe_source, refuse_unusable
from adapterkit.stages.trainer import (
    Auto,
    build_trainer,
    guarded_trainer_class,
    packing_isolates_examples,
    tracker_callbacks,
    trainer_args,
    use_kernels,
)
from adapterkit.trained import locate


def tokenizer_for(recipe: Recipe, say: Any = print) -> tuple[str | None, Any, list[RawRow] | None]:
    """(model source, tokenizer, train rows if they had to be read already).

    A scratch model without a given tokenizer gets a byte-level BPE trained on its training data."""
    m, d = recipe.model, recipe.data
    if m.init != "scratch":
        source = models.model_source(m)
        return source, models.load_tokenizer(m, m.tokenizer or source), None
    if m.tokenizer:
        return None, models.load_tokenizer(m, m.tokenizer), None
    column = d.columns.get("text", "text")
    if d.streaming:
        say(f"tokenizer: training a byte-level BPE tokenizer (vocab {m.vocab_size}) on the stream's first "
            f"{streaming.TOKENIZER_CHARS // 10**6} MB of text")
        rows = streaming.head(stream_rows(d.train, d.train_split, d.weights, recipe.train.seed))
        return None, models.train_tokenizer((r.values.get(column) or "" for r in rows), m.vocab_size), None
    train_rows, _ = read_training_rows(d.train, d.train_split, d.weights, recipe.train.seed)
    say(f"tokenizer: training a byte-level BPE tokenizer (vocab {m.vocab_size}) on the corpus")
    texts = (r.values.get(column) or "" for r in train_rows)
    return None, models.train_tokenizer(texts, m.vocab_size), train_rows


def eval_rows(recipe: Recipe) -> list[RawRow]:
    """data.eval's rows: all of them, or with data.streaming its first eval.limit rows, streamed."""
    d = recipe.data
    if not d.streaming:
        return read_rows(d.eval, d.eval_split, "data.eval")
    sources = [d.eval] if isinstance(d.eval, str) else list(d.eval or [])
    rows = itertools.chain.from_iterable(iter_rows(one, d.eval_split, "data.eval", streaming=True) for one in sources)
    return list(itertools.islice(rows, recipe.eval.limit))


def prepare_data(recipe: Recipe, tokenizer: Any, train_rows: list[RawRow] | None = None
                 ) -> tuple[Formatter, list[dict], list[dict] | None, list[DataReport], TrainStream | None]:
    """Read, format and tokenize the train (and eval) data. Raises DataError when nothing can train.
    With data.streaming only the first rows are read here, and the stream that training reads is returned."""
    d = recipe.data
    clean = RecipeCleaning(d, tokenizer, describe_source(d.train))  # before the sources are mixed
    stream = None
    if d.streaming:
        def rows() -> Iterator[RawRow]:
            return stream_rows(d.train, d.train_split, d.weights, recipe.train.seed, clean.stream)

        train_rows = streaming.preview(rows())
        mixed: list[str] = []
    else:
        # (a scratch model's tokenizer was trained on the same rows: the mix is seeded, so they are the same)
        train_rows, mixed = (read_training_rows(d.train, d.train_split, d.weights, recipe.train.seed, clean)
                             if train_rows is None or d.weights else (clean(train_rows), []))
    labels = label_set(train_rows, d)
    formatter = Formatter.for_training(d, tokenizer, labels)
    train, train_report = encode_rows(train_rows, formatter, "train", describe_source(d.train))
    if d.streaming:
        train_report.streamed = True
        stream = streaming.TrainStream(rows, formatter, describe_source(d.train))
    train_report.cleaned = clean.reasons()
    train_report.mixed = mixed
    reports = [train_report]
    if train and d.task == "sentiment" and len(train_report.labels) == 1:
        only = next(iter(train_report.labels))
        raise DataError(Problem(describe_source(d.train), f"every training row has the label {only!r}: a "
                                "classifier cannot learn from one class", "data.columns.label",
                                fix="check that data.columns.label names the label column and that the file holds "
                                    "every class (not, say, the first rows of a file sorted by label)"))
    # Pre-flight lint of the formatter's own promise: every kept, untruncated row ends in a
    # supervised EOS. A failure here is a bug in adapterkit, not in the data.
    kept = train_report.rows_read - sum(train_report.dropped.values())
    if train and train_report.eos_supervised < kept - train_report.truncated:
        raise RuntimeError(f"formatter bug: only {train_report.eos_supervised} of {kept} rows supervise EOS")
    refuse_unusable(train_report, train, d, "train")
    evaluation = None
    if d.eval is not None:
        evaluation, eval_report = encode_rows(eval_rows(recipe), formatter, "eval", describe_source(d.eval))
        reports.append(eval_report)
        refuse_unusable(eval_report, evaluation, d, "eval")
    return formatter, train, evaluation, reports, stream


def _sft_config(recipe: Recipe, auto: Auto, out: Path, precision: str, dev: Any, has_eval: bool,
                **changes: Any) -> Any:
    from trl import SFTConfig

    return SFTConfig(
        **changes,
        **trainer_args(recipe, auto, out, precision, dev, has_eval),
        packing=auto.packing,
        # Pretraining concatenates documents (EOS between them) and cuts the stream into blocks; SFT
        # packs whole examples best-fit, and attention never crosses two examples (PackedRowsCollator).
        packing_strategy="wrapped" if recipe.stage == "pretrain" else "bfd",
        # Without packing trl pads each batch to its longest example: on mixed lengths (short labels
        # beside long contexts) most of a random batch is padding. Grouping by length removes most of it.
        train_sampling_strategy="group_by_length" if recipe.data.group_by_length and not auto.packing
        else "random",
    )


def _context(recipe: Recipe, auto: Auto, rows: list[dict]) -> float:
    """Mean number of positions a training token attends to (causal: a token at position i sees i)."""
    if recipe.stage == "pretrain" and auto.packing:  # every block is max_length long
        return (recipe.data.max_length + 1) / 2
    lengths = [min(len(r["input_ids"]), recipe.data.max_length) for r in rows] or [1]
    return sum(n * (n + 1) / 2 for n in lengths) / max(sum(lengths), 1)


@dataclass
class TaskEval:
    """The task metrics of a run's eval rows, for the starting model and the tuned one."""

    examples: list[evaluation_mod.Example]
    skipped: Any
    formatter: Formatter
    settings: Any
    say: Any
    results: dict[str, tuple[dict[str, float], list[dict] | None]] = field(default_factory=dict)

    def run(self, model: Any, name: str) -> dict[str, float]:
        self.say(f"eval ({self.formatter.task.name}, {len(self.examples)} rows): {name} model")
        self.results[name] = evaluation_mod.evaluate(model, self.examples, self.formatter, self.settings,
                                                     self.say, name)
        return self.results[name][0]

    def report(self, out: Path, title: str) -> dict[str, Any]:
        summary = evaluation_mod.compare(self.results, self.examples, self.formatter, self.skipped,
                                         self.settings.worst)
        evaluation_mod.write_report(out, summary, title, out / "loss.png")
        return summary


@dataclass
class SFTData:
    """The sft stage's own part of a prepared run."""

    train: list[dict]
    evaluation: list[dict] | None
    task_eval: TaskEval | None
    distill: Any = None
    """The distill stage's teacher and cache (stages/distill.py)."""
    stream: TrainStream | None = None
    """data.streaming: what training reads (`train` then holds the examples of its first rows)."""


def weights_of_run(path: str) -> tuple[str, str]:
    """(model directory, run directory) of a full or pretraining run that an sft stage starts from."""
    run_dir, model_dir = locate(path)
    if run_dir is None:
        raise AdapterkitError(Problem("model.from_run", f"'{path}' is a model directory, not a run",
                                      fix="use model.name_or_path for a plain model directory"))
    method = METHODS[rundir.read_manifest(run_dir).get("method", "full")]
    if not method.trains_base:
        raise AdapterkitError(Problem("model.from_run", f"run '{run_dir}' trained a {method.name} adapter; an sft "
                                      "stage starts from whole weights (a pretraining or full run)",
                                      fix="continue an adapter with a dpo or kto stage, or merge it first with "
                                          "`adapterkit export` and use model.name_or_path"))
    return str(model_dir), str(run_dir.resolve())


class SFT:
    """`pretrain` and `sft`: trl's SFTTrainer on formatted (or raw, for pretraining) text."""

    def resolve(self, recipe: Recipe) -> tuple[Recipe, dict[str, Any]]:
        m = recipe.model
        if m.from_run is None:
            return recipe, {}
        # The run's weights become the base; the saved recipe names them directly.
        weights, run_dir = weights_of_run(m.from_run)
        return dataclasses.replace(recipe, model=dataclasses.replace(m, name_or_path=weights, from_run=None)), {
            "from_run": run_dir}

    def data(self, recipe: Recipe, say: Any = print) -> Data:
        source, tokenizer, train_rows = tokenizer_for(recipe, say)
        formatter, train, evaluation, reports, stream = prepare_data(recipe, tokenizer, train_rows)
        return Data(tokenizer, formatter, train, evaluation, reports, source, stream)

    def prepare(self, recipe: Recipe, ctx: Context) -> Prepared:
        m, say = recipe.model, ctx.say
        method = METHODS[recipe.adapter.method]
        data = self.data(recipe, say)
        source, tokenizer, formatter, train, evaluation, reports = (
            data.source, data.tokenizer, data.formatter, data.train, data.evaluation, data.reports)
        config = models.scratch_config(m, tokenizer) if m.init == "scratch" else models.load_config(m, source)
        problems = models.model_problems(recipe, config,
                                         plan_mod.architecture(config, m.trust_remote_code).quantized_matrices)
        if problems:
            raise ConfigError(problems)
        precision = models.resolve_precision(recipe.train.precision, ctx.dev,
                                             models.count_parameters(config, m.trust_remote_code))
        say(f"data ({formatter.spec.task}, {formatter.spec.mode} template)")
        for report in reports:
            say("  " + report.summary())
        if data.stream is not None:
            say(f"  (data.streaming: the train line counts only the rows read ahead to check the stream, at most "
                f"{streaming.PREVIEW_ROWS} or {streaming.PREVIEW_CHARS // 10**6} MB of text; training reads the rest "
                "as it goes)")
        checkpointing, why = plan_mod.resolve_checkpointing(recipe, config, m.name_or_path, ctx.dev,
                                                            ctx.procs.num_processes)
        if why:
            say(f"gradient checkpointing (auto): {why}")
        task_eval = None
        if recipe.stage in ("sft", "distill") and recipe.data.eval is not None:
            examples, skipped = evaluation_mod.build_examples(
                read_rows(recipe.data.eval, recipe.data.eval_split, "data.eval"), formatter, recipe.eval.limit,
                describe_source(recipe.data.eval))
            task_eval = TaskEval(examples, skipped, formatter, recipe.eval, say)
        return Prepared(recipe, Auto(gradient_checkpointing=checkpointing, packing=packs(recipe)), method, source,
                        tokenizer, formatter, reports, precision, config,
                        work=SFTData(train, evaluation, task_eval, stream=data.stream))

    def train(self, run: Prepared, ctx: Context) -> tuple[Any, dict[str, Any]]:
        """Load or build the model, wrap it for the method, and train it; eval loss (and the task's
        metrics) before and after."""
        import datasets

        recipe, method, work, out, say = run.recipe, run.method, run.work, ctx.out, ctx.say
        m = recipe.model
        # Model: built from scratch, or loaded (4-bit for qlora) and wrapped for the method.
        if m.init == "scratch":
            model = models.build_model(run.config, recipe.train.seed)
            tokenizer_source = None
        else:
            model = models.load_base(m, run.source, run.precision, method.trains_base,
                                     recipe.adapter.quant if method.quantized_base else None, dev=ctx.dev)
            tokenizer_source = m.tokenizer or run.source
        if run.auto.packing and recipe.stage == "sft":
            isolated, change = packing_isolates_examples(model)
            if not isolated:
                say(f"packing: off, batches are padded instead: {type(model).__name__} lets packed examples attend "
                    f"to each other (its attention ignores restarting position ids; one example's logits moved by "
                    f"{change:.3g} when the other changed)")
                run.auto.packing = False
            if ctx.main:
                rundir.update_manifest(out, packing=isolated, auto=run.auto.to_dict())
        model = method.wrap(model, recipe.adapter, tokenizer_source=tokenizer_source,
                            checkpointing=run.auto.gradient_checkpointing)
        use_kernels(model, recipe, method.quantized_base, run.auto, ctx.dev, say)
        trainable, total = trainable_parameters(model)
        say(f"model: {method.name}, {trainable:,} of {total:,} parameters train ({100 * trainable / total:.3f}%), "
            f"{ctx.dev.type}, {run.precision}")

        args = _sft_config(recipe, run.auto, out, run.precision, ctx.dev, work.evaluation is not None,
                           **self.config_changes())
        trainer_class, trainer_kwargs = self.trainer_parts(run, ctx, model)
        progress = rundir.ProgressLog(
            out, echo=ctx.echo, flops_per_token=perf.flops_per_token(model, _context(recipe, run.auto, work.train)),
            peak_flops=perf.matmul_peak(ctx.dev, perf.compute_dtype(run.precision)), processes=args.world_size)
        trainer = build_trainer(
            trainer_class, model,
            args=args,
            train_dataset=self.train_dataset(run),
            eval_dataset=datasets.Dataset.from_list(work.evaluation) if work.evaluation else None,
            processing_class=run.tokenizer,
            callbacks=[progress, DoctorCallback(method.family, recipe.stage, recipe.train.lr, echo=ctx.echo,
                                                phase=lambda: progress.phase), *tracker_callbacks(recipe, out),
                       *ctx.callbacks],
            **trainer_kwargs,
        )
        metrics: dict[str, Any] = {"trainable_parameters": trainable, "total_parameters": total}
        previous = rundir.read_manifest(out).get("metrics") or {}
        if work.evaluation and "eval_loss_before" in previous:  # measured before the interruption
            metrics["eval_loss_before"] = previous["eval_loss_before"]
        elif work.evaluation:
            progress.phase = "before"
            metrics["eval_loss_before"] = trainer.evaluate()["eval_loss"]
            progress.phase = "train"
            if trainer.is_world_process_zero():
                rundir.update_manifest(out, metrics=metrics)
        task_eval = work.task_eval
        if task_eval is not None:
            if "task_before" in previous:
                metrics["task_before"] = previous["task_before"]
                task_eval.results["base"] = (previous["task_before"], None)
            else:
                # The starting model: a LoRA adapter starts as a no-op, but soft prompts start as a change.
                with evaluation_mod.adapter_disabled(trainer.model) as base:
                    metrics["task_before"] = task_eval.run(base, "base")
                if trainer.is_world_process_zero():
                    rundir.update_manifest(out, metrics=metrics)
        self.before_training(run, ctx, trainer, metrics, previous)
        # Trainer restores weights, optimizer, scheduler, RNG and data position from the checkpoint into
        # the model wrapped above (once: resuming never wraps an adapter twice).
        try:
            result = trainer.train(resume_from_checkpoint=str(ctx.checkpoint) if ctx.checkpoint else None)
        except DataError as e:  # a streamed row, met in training
            if work.stream is None:
                raise
            kept = rundir.latest_checkpoint(out)
            then = (f"the run stopped at step {trainer.state.global_step}; "
                    + (f"{kept.name} is kept: fix the data, then run the same command with --resume-anyway to "
                       "continue from it" if kept else "no checkpoint was saved yet (train.save_every)"))
            raise DataError([dataclasses.replace(p, fix=f"{p.fix}; {then}" if p.fix else then) for p in e.problems],
                            e.title) from None
        metrics.update(train_loss=result.training_loss, steps=result.global_step,
                       runtime_s=round(result.metrics.get("train_runtime", 0.0), 2),
                       tokens_seen=trainer.state.num_input_tokens_seen)
        if work.stream is not None:  # what this process read (a resumed run reads again up to its step)
            metrics["streamed"] = work.stream.report.to_dict()
        if work.evaluation:
            progress.phase = "after"
            metrics["eval_loss_after"] = trainer.evaluate()["eval_loss"]
        if task_eval is not None:
            metrics["task_after"] = task_eval.run(trainer.model, "tuned")
        return trainer, metrics

    # What a stage built on this one (distill) changes: the trainer, its rows and settings, and a step
    # before training starts.
    def trainer_parts(self, run: Prepared, ctx: Context, model: Any) -> tuple[type, dict[str, Any]]:
        """The trainer class and its extra keyword arguments."""
        return guarded_trainer_class(), {}

    def training_rows(self, run: Prepared) -> list[dict]:
        return run.work.train

    def train_dataset(self, run: Prepared) -> Any:
        """What the trainer reads: the training rows, or with data.streaming the stream, shuffled in a buffer."""
        import datasets

        if run.work.stream is not None:
            return run.work.stream.dataset().shuffle(seed=run.recipe.train.seed, buffer_size=streaming.SHUFFLE_BUFFER)
        return datasets.Dataset.from_list(self.training_rows(run))

    def config_changes(self) -> dict[str, Any]:
        """SFTConfig settings that differ from sft's."""
        return {}

    def before_training(self, run: Prepared, ctx: Context, trainer: Any, metrics: dict[str, Any],
                        previous: dict[str, Any]) -> None:
        """After the starting model is measured, before trainer.train (`previous`: the interrupted run's metrics)."""

    def finish(self, run: Prepared, ctx: Context, metrics: dict[str, Any]) -> None:
        if run.work.task_eval is not None:
            summary = run.work.task_eval.report(ctx.out, f"{ctx.src.name}: {run.method.name} on {run.recipe.data.task}")
            ctx.say(evaluation_mod.metrics_table(summary))
            ctx.say(f"report: {ctx.out / 'report.md'}")
        if run.work.stream is not None:
            r = run.work.stream.report
            ctx.say(f"streamed in training: {r.rows_read:,} rows -> {r.examples:,} examples, {r.tokens:,} tokens")
        if run.work.evaluation:
            ctx.say(f"eval loss {metrics['eval_loss_before']:.4f} -> {metrics['eval_loss_after']:.4f}")


STAGE = SFT()
