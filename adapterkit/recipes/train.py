"""The training stage, shared by `pretrain` and `sft`: they differ only in their data.

    adapterkit recipe run lora-sentiment train.max_steps=50 output_dir=runs/s1

Top to bottom: check the output dir, read and format the data (tokenizer first: a scratch model
trains its own), load or build the model, wrap it for the method, train with trl's SFTTrainer,
measure the eval loss before and after, and publish the final model atomically.
Everything that can be wrong with the user's input is found before the output dir is touched.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adapterkit import evaluation as evaluation_mod
from adapterkit import models, perf, rundir
from adapterkit import plan as plan_mod
from adapterkit.adapters import METHODS, model_problems, trainable_parameters
from adapterkit.adapters.lora import quantization_config
from adapterkit.config import Recipe, RecipeSource, dump_recipe, packs, saved_recipe
from adapterkit.data.formatter import DataReport, Formatter, encode_rows, label_set
from adapterkit.data.loading import RawRow, read_rows, resolve_sample
from adapterkit.errors import AdapterkitError, ConfigError, DataError, Problem, TrainingStopped


def _describe(spec: str | list[str] | None) -> str:
    return ", ".join(spec) if isinstance(spec, list) else str(spec)


def _data_files(spec: str | list[str] | None, split: str) -> list[dict[str, str]]:
    """Identity of each data source for the manifest: a content hash for files, id and split for the hub."""
    out = []
    for one in ([spec] if isinstance(spec, str) else spec or []):
        path = resolve_sample(one) if one.startswith("sample:") else Path(one).expanduser()
        if path.is_file():
            out.append({"source": one, "path": str(path.resolve()), "sha256": rundir.file_sha256(path)})
        else:
            out.append({"source": one, "hub_split": split})
    return out


def tokenizer_for(recipe: Recipe, say: Any = print) -> tuple[str | None, Any, list[RawRow] | None]:
    """(model source, tokenizer, train rows if they had to be read already).

    A scratch model without a given tokenizer gets a byte-level BPE trained on its training data."""
    m, d = recipe.model, recipe.data
    if m.init != "scratch":
        source = models.model_source(m)
        return source, models.load_tokenizer(m, m.tokenizer or source), None
    train_rows = read_rows(d.train, d.train_split, "data.train")
    if m.tokenizer:
        return None, models.load_tokenizer(m, m.tokenizer), train_rows
    say(f"tokenizer: training a byte-level BPE tokenizer (vocab {m.vocab_size}) on the corpus")
    texts = (r.values.get(d.columns.get("text", "text")) or "" for r in train_rows)
    return None, models.train_tokenizer(texts, m.vocab_size), train_rows


def prepare_data(recipe: Recipe, tokenizer: Any, train_rows: list[RawRow] | None = None
                 ) -> tuple[Formatter, list[dict], list[dict] | None, list[DataReport]]:
    """Read, format and tokenize the train (and eval) data. Raises DataError when nothing can train."""
    d = recipe.data
    if train_rows is None:
        train_rows = read_rows(d.train, d.train_split, "data.train")
    labels = label_set(train_rows, d)
    formatter = Formatter.for_training(d, tokenizer, labels)
    train, train_report = encode_rows(train_rows, formatter, "train", _describe(d.train))
    reports = [train_report]
    if not train:
        reasons = "; ".join(f"{n} {r}" for r, n in train_report.dropped.items()) or "the data is empty"
        raise DataError(Problem(_describe(d.train), f"no usable training example ({reasons})", "data.train",
                                fix="check the file and the task's fields (see the README's task table)"))
    if d.task == "sentiment" and len(train_report.labels) == 1:
        only = next(iter(train_report.labels))
        raise DataError(Problem(_describe(d.train), f"every training row has the label {only!r}: a classifier "
                                "cannot learn from one class", "data.columns.label",
                                fix="check that data.columns.label names the label column and that the file holds "
                                    "every class (not, say, the first rows of a file sorted by label)"))
    # Pre-flight lint of the formatter's own promise: every kept, untruncated row ends in a
    # supervised EOS. A failure here is a bug in adapterkit, not in the data.
    kept = train_report.rows_read - sum(train_report.dropped.values())
    if train_report.eos_supervised < kept - train_report.truncated:
        raise RuntimeError(f"formatter bug: only {train_report.eos_supervised} of {kept} rows supervise EOS")
    dropped = sum(train_report.dropped.values())
    if dropped > d.max_dropped * train_report.rows_read:
        raise DataError(too_many_dropped(train_report, d, _describe(d.train)))
    evaluation = None
    if d.eval is not None:
        evaluation, eval_report = encode_rows(read_rows(d.eval, d.eval_split, "data.eval"), formatter, "eval",
                                              _describe(d.eval))
        reports.append(eval_report)
        if not evaluation:
            raise DataError(Problem(_describe(d.eval), "no usable eval example", "data.eval",
                                    fix="check the eval file, or remove data.eval"))
    return formatter, train, evaluation, reports


def too_many_dropped(report: DataReport, d: Any, source: str,
                     what_input_does: str = "keeps completions whole and shortens inputs") -> Problem:
    """The refusal when more than data.max_dropped of the rows would be dropped, with the fix that fits
    the reasons: a max_length that keeps enough rows (from their real lengths) when length is why."""
    dropped = sum(report.dropped.values())
    reasons = "; ".join(f"{n} {r}" for r, n in sorted(report.dropped.items()))
    by_length = sum(n for r, n in report.dropped.items() if "max_length" in r)
    allow = f"data.max_dropped={min(1.0, round(dropped / report.rows_read + 0.01, 2))}"
    fix = f"clean the data (see `adapterkit data preview`), or allow more with {allow}"
    length = report.max_length_keeping(1 - d.max_dropped) if by_length else None
    if length is not None and length > d.max_length:
        full = report.max_length_keeping(1.0)
        fix = (f"raise data.max_length: {length} keeps {1 - d.max_dropped:.0%} of the rows"
               + (f", {full} keeps them all" if full and full > length else "")
               + (f" (data.truncation=input {what_input_does})"
                  if d.truncation != "input" else "") + f"; or allow more with {allow}")
    return Problem(source, f"{dropped} of {report.rows_read} rows ({dropped / report.rows_read:.1%}) would be "
                   f"dropped: {reasons}", "data.max_dropped", fix=fix)


def trainer_args(recipe: Recipe, out: Path, precision: str, dev: Any, has_eval: bool) -> dict[str, Any]:
    """The TrainingArguments every stage shares (SFTConfig, DPOConfig and KTOConfig all take them)."""
    t = recipe.train
    checkpointing = t.gradient_checkpointing is True  # `auto` is decided before (plan.resolve_checkpointing)
    return dict(
        output_dir=str(out / "checkpoints"),
        num_train_epochs=t.epochs,
        max_steps=t.max_steps or -1,
        learning_rate=t.lr,
        lr_scheduler_type=t.schedule,
        warmup_steps=t.warmup_ratio,
        weight_decay=t.weight_decay,
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        max_grad_norm=t.max_grad_norm,
        seed=t.seed,
        activation_checkpointing=checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False} if checkpointing else None,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=dev.type == "cpu",
        logging_steps=t.log_every,
        eval_strategy="steps" if (has_eval and t.eval_every) else "no",
        eval_steps=t.eval_every,
        save_strategy="steps" if t.save_every else "no",
        save_steps=t.save_every or 500,
        save_total_limit=t.save_total_limit,
        report_to="none",
        logging_nan_inf_filter=False,  # a NaN loss must show in the log, not be replaced by an average
        disable_tqdm=True,
        include_num_input_tokens_seen="non_padding",
        max_length=recipe.data.max_length,
        dataset_num_proc=None,
        optim=models.OPTIM[models.resolve_optimizer(t.optimizer, recipe.adapter.method, dev.type)],
        # Every trainable weight (adapter, soft prompt or full model) gets a gradient each step, so DDP
        # need not search the graph for unused ones (its default when checkpointing is off).
        ddp_find_unused_parameters=False,
    )


def _sft_config(recipe: Recipe, out: Path, precision: str, dev: Any, has_eval: bool) -> Any:
    from trl import SFTConfig

    return SFTConfig(
        **trainer_args(recipe, out, precision, dev, has_eval),
        packing=packs(recipe),
        # Pretraining concatenates documents (EOS between them) and cuts the stream into blocks; SFT
        # packs whole examples best-fit, and attention never crosses two examples (PackedRowsCollator).
        packing_strategy="wrapped" if recipe.stage == "pretrain" else "bfd",
        # Without packing trl pads each batch to its longest example: on mixed lengths (short labels
        # beside long contexts) most of a random batch is padding. Grouping by length removes most of it.
        train_sampling_strategy="group_by_length" if recipe.data.group_by_length and not packs(recipe)
        else "random",
    )


def _varlen_attention(model: Any) -> bool:
    """Whether the model's attention runs packed sequences without a mask (flash attention's varlen
    kernels): then trl's padding-free batch of one long row costs nothing extra."""
    impl = str(getattr(model.config, "_attn_implementation", "") or "")
    return impl.startswith(("flash_attention", "kernels")) or "flash" in impl


class PackedRowsCollator:
    """Packed examples as one row per pack, for attention without varlen kernels (sdpa, eager).

    trl's padding-free collator concatenates the whole batch into one row of batch x max_length
    tokens; sdpa then attends over all of it under a block mask, which costs batch times the
    attention of the packs themselves. Here each pack stays a row: position ids restart at every
    example, there is no attention mask, and transformers derives a per-row block-diagonal causal
    mask from the position ids, so attention still never crosses two examples. The short tail of a
    row is padding (label -100, position 0)."""

    def __init__(self, pad_token_id: int) -> None:
        from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

        self.inner = DataCollatorForLanguageModeling(pad_token_id=pad_token_id, return_position_ids=True)
        self.pad_token_id = pad_token_id

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.inner(examples)
        batch.pop("attention_mask")
        return batch


def packing_isolates_examples(model: Any) -> tuple[bool, float]:
    """Whether `model` keeps packed examples apart when fed as the packed collators feed them (one row,
    position ids restarting at each example, no attention mask), and the largest change it measured.

    transformers derives the block-diagonal mask from the position ids, but only where the model passes
    them to its mask builder: OPT, for one, does not, and its packed examples attend to each other. So
    the model is asked directly: the second of two packed examples must compute the same logits
    whatever the first one holds. Two rows of 16 random tokens, in eval mode."""
    import torch

    vocab = model.get_input_embeddings().num_embeddings
    dev = next(model.parameters()).device
    gen = torch.Generator().manual_seed(0)
    first, other, second = (torch.randint(0, vocab, (n,), generator=gen) for n in (7, 7, 9))
    positions = torch.cat([torch.arange(7), torch.arange(9)]).unsqueeze(0).to(dev)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            outs = [model(input_ids=torch.cat([head, second]).unsqueeze(0).to(dev), position_ids=positions,
                          use_cache=False).logits[0, 7:]
                    .float() for head in (first, other)]
    finally:
        model.train(was_training)
    change = (outs[0] - outs[1]).abs().max().item()
    scale = max(1.0, outs[0].abs().max().item())
    return change <= 1e-3 * scale, change


def guarded_trainer_class(base: type | None = None) -> type:
    """A trl trainer (SFTTrainer unless `base` is given) with atomic checkpoints and a stop on
    non-finite loss or gradients."""
    import torch
    from transformers.trainer_utils import rotate_checkpoints
    from trl import SFTTrainer

    class GuardedTrainer(base or SFTTrainer):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            packed = getattr(self, "padding_free", False) and getattr(self.args, "packing", False)
            if packed and not _varlen_attention(self.model):
                self.data_collator = PackedRowsCollator(self.data_collator.pad_token_id)

        def _save_checkpoint(self, model: Any, trial: Any) -> None:
            # transformers writes checkpoint-N in place, and a kill mid-save leaves a folder resume
            # would trust. Write it under a staging name, then publish it by rename.
            real = self.args.output_dir
            step = self.state.global_step
            staging = Path(real) / f".staging-{step}"
            self.args.output_dir = str(staging)
            try:
                super()._save_checkpoint(model, trial)
            except BaseException as e:
                shutil.rmtree(staging, ignore_errors=True)
                self.args.output_dir = real
                what = rundir.storage_error(e)
                if what is None:
                    raise
                raise AdapterkitError(Problem(
                    str(Path(real) / f"checkpoint-{step}"), f"could not write the checkpoint: {what}; "
                    f"{self._last_good()}", fix="free disk space (or fix permissions), then re-run the same "
                    "command: it resumes from the last good checkpoint")) from None
            finally:
                self.args.output_dir = real
            # Under accelerate every process writes into the staging dir (its RNG state; with FSDP or
            # DeepSpeed its shards): the main process publishes it once all of them are done.
            self.accelerator.wait_for_everyone()
            if self.args.should_save:
                rundir.publish_dir(staging / f"checkpoint-{step}", Path(real) / f"checkpoint-{step}")
                rundir.fsync_dir(Path(real))
                shutil.rmtree(staging, ignore_errors=True)
                rotate_checkpoints(output_dir=real, save_total_limit=self.args.save_total_limit)

        def _last_good(self) -> str:
            last = rundir.latest_checkpoint(Path(self.args.output_dir).parent)
            return f"the last good checkpoint, {last.name}, is kept" if last else "no checkpoint was written yet"

        def training_step(self, model: Any, inputs: Any, num_items_in_batch: Any = None) -> Any:
            loss = super().training_step(model, inputs, num_items_in_batch)
            if not torch.isfinite(loss).all():
                self._stop(f"the training loss is {loss.item()}")
            return loss

        def _get_grad_norm(self, model: Any, grad_norm: Any = None) -> Any:
            grad_norm = super()._get_grad_norm(model, grad_norm)
            if grad_norm is not None and not torch.isfinite(torch.as_tensor(grad_norm)).all():
                self._stop(f"the gradient norm is {float(grad_norm)}")
            return grad_norm

        def _stop(self, what: str) -> None:
            raise TrainingStopped(Problem(
                f"step {self.state.global_step + 1}", f"training stopped: {what}; {self._last_good()} and no "
                "final model was written", fix="lower train.lr (or use train.precision=fp32) and check the data "
                "for extreme values; then re-run with --resume-anyway to continue from the checkpoint with the "
                "new settings, or with --restart to start over"))

    return GuardedTrainer


def _context(recipe: Recipe, rows: list[dict]) -> float:
    """Mean number of positions a training token attends to (causal: a token at position i sees i)."""
    if recipe.stage == "pretrain" and packs(recipe):  # every block is max_length long
        return (recipe.data.max_length + 1) / 2
    lengths = [min(len(r["input_ids"]), recipe.data.max_length) for r in rows] or [1]
    return sum(n * (n + 1) / 2 for n in lengths) / max(sum(lengths), 1)


def _train(recipe: Recipe, out: Path, dev: Any, method: Any, source: str | None, config: Any, tokenizer: Any,
           train: list[dict], evaluation: list[dict] | None, precision: str, echo: bool,
           callbacks: list[Any] | None, checkpoint: Path | None, task_eval: TaskEval | None = None
           ) -> tuple[Any, dict[str, Any]]:
    """Load or build the model, wrap it for the method, and train it; eval loss (and the task's
    metrics, with `task_eval`) before and after."""
    import datasets
    import torch
    from transformers import PrinterCallback

    say = print if echo else (lambda *a, **k: None)
    m = recipe.model
    # Model: built from scratch, or loaded (4-bit for qlora) and wrapped for the method.
    if m.init == "scratch":
        model = models.build_model(config, recipe.train.seed)
        tokenizer_source = None
    else:
        dtype = models.resolve_dtype(m.dtype, method.trains_base, precision)
        quant = None
        if method.quantized_base:
            compute = models.resolve_dtype(recipe.adapter.quant.compute_dtype, False, precision)
            quant = quantization_config(recipe.adapter.quant, compute)
        model = models.load_model(m, source, dtype, quant, dev)
        tokenizer_source = m.tokenizer or source
    if packs(recipe) and recipe.stage == "sft":
        isolated, change = packing_isolates_examples(model)
        if not isolated:
            say(f"packing: off, batches are padded instead: {type(model).__name__} lets packed examples attend to "
                f"each other (its attention ignores restarting position ids; one example's logits moved by "
                f"{change:.3g} when the other changed)")
            recipe = dataclasses.replace(recipe, data=dataclasses.replace(recipe.data, packing=False))
        if models.processes().is_main_process:
            rundir.update_manifest(out, packing=isolated)
    model = method.wrap(model, recipe.adapter, tokenizer_source, recipe.train)
    trainable, total = trainable_parameters(model)
    say(f"model: {method.name}, {trainable:,} of {total:,} parameters train ({100 * trainable / total:.3f}%), "
        f"{dev.type}, {precision}")

    args = _sft_config(recipe, out, precision, dev, evaluation is not None)
    progress = rundir.ProgressLog(out, echo=echo, flops_per_token=perf.flops_per_token(model, _context(recipe, train)),
                                  peak_flops=perf.matmul_peak(dev, perf.compute_dtype(precision)),
                                  processes=args.world_size)
    trainer = guarded_trainer_class()(
        model=model,
        args=args,
        train_dataset=datasets.Dataset.from_list(train),
        eval_dataset=datasets.Dataset.from_list(evaluation) if evaluation else None,
        processing_class=tokenizer,
        callbacks=[progress, *(callbacks or [])],
    )
    trainer.remove_callback(PrinterCallback)  # ProgressLog prints a readable line instead of a dict
    # trl casts QLoRA adapters to bf16. Keep every trainable weight in float32 instead (autocast still
    # computes in half precision): tiny Adam updates survive, and the adapter reloaded by peft (which
    # upcasts to float32) computes exactly what was trained.
    for p in trainer.model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    metrics: dict[str, Any] = {"trainable_parameters": trainable, "total_parameters": total}
    previous = rundir.read_manifest(out).get("metrics") or {}
    if evaluation and "eval_loss_before" in previous:  # measured before the interruption
        metrics["eval_loss_before"] = previous["eval_loss_before"]
    elif evaluation:
        progress.phase = "before"
        metrics["eval_loss_before"] = trainer.evaluate()["eval_loss"]
        progress.phase = "train"
        if trainer.is_world_process_zero():
            rundir.update_manifest(out, metrics=metrics)
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
    # Trainer restores weights, optimizer, scheduler, RNG and data position from the checkpoint into
    # the model wrapped above (once: resuming never wraps an adapter twice).
    result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    metrics.update(train_loss=result.training_loss, steps=result.global_step,
                   runtime_s=round(result.metrics.get("train_runtime", 0.0), 2),
                   tokens_seen=trainer.state.num_input_tokens_seen)
    if evaluation:
        progress.phase = "after"
        metrics["eval_loss_after"] = trainer.evaluate()["eval_loss"]
    if task_eval is not None:
        metrics["task_after"] = task_eval.run(trainer.model, "tuned")

    return trainer, metrics


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
class RunResult:
    """What `run` leaves: the run directory, and the trained model and tokenizer still in memory."""

    out: Path
    model: Any
    tokenizer: Any
    metrics: dict[str, Any]


def run(recipe: Recipe, src: RecipeSource, force: bool = False, echo: bool = True,
        callbacks: list[Any] | None = None, restart: bool = False, resume_anyway: bool = False,
        lineage: dict[str, Any] | None = None) -> RunResult:
    """Train one recipe end to end (see `_run`), holding the output dir's lock: a second process on the
    same output_dir is refused, naming the first one's pid."""
    out = Path(recipe.output_dir)
    with rundir.exclusive(out, force=force, take=models.processes().is_main_process):
        return _run(recipe, src, force=force, echo=echo, callbacks=callbacks, restart=restart,
                    resume_anyway=resume_anyway, lineage=lineage)


def _run(recipe: Recipe, src: RecipeSource, force: bool = False, echo: bool = True,
         callbacks: list[Any] | None = None, restart: bool = False, resume_anyway: bool = False,
         lineage: dict[str, Any] | None = None) -> RunResult:
    """Train one recipe end to end, or resume it from its newest checkpoint when `output_dir` holds
    an interrupted run of the same recipe and data. `callbacks` are extra TrainerCallbacks; `lineage`
    (which pipeline and run this one comes from) goes into the manifest."""
    import datasets
    from transformers import set_seed
    from transformers.utils import logging as hf_logging

    # Under `accelerate launch` every process runs all of this (each trains on its shard of the data);
    # only the main one prints and writes the run directory.
    procs = models.processes()
    main = procs.is_main_process
    echo = echo and main
    say = print if echo else (lambda *a, **k: None)
    datasets.disable_progress_bars()
    hf_logging.disable_progress_bar()  # the ProgressLog line is the progress display
    out = Path(recipe.output_dir)
    data_ids = {"train": _data_files(recipe.data.train, recipe.data.train_split),
                "eval": _data_files(recipe.data.eval, recipe.data.eval_split)}
    resolved = saved_recipe(recipe)
    checkpoint = rundir.plan_output_dir(out, resolved, data_ids, force, restart, resume_anyway)
    procs.wait_for_everyone()  # all processes decide on output_dir (fresh or resume) before anything is written
    dev = models.device()
    method = METHODS[recipe.adapter.method]
    m = recipe.model
    set_seed(recipe.train.seed)
    lineage = dict(lineage or {})
    if m.from_run is not None:
        # The run's weights become the base; the saved recipe names them directly.
        weights, lineage["from_run"] = _weights_of_run(m.from_run)
        recipe = dataclasses.replace(recipe, model=dataclasses.replace(m, name_or_path=weights, from_run=None))
        m = recipe.model

    # Tokenizer and data first: bad data must fail before a model is loaded or a file is written.
    source, tokenizer, train_rows = tokenizer_for(recipe, say)
    formatter, train, evaluation, reports = prepare_data(recipe, tokenizer, train_rows)
    config = models.scratch_config(m, tokenizer) if m.init == "scratch" else models.load_config(m, source)
    problems = model_problems(recipe, config, plan_mod.architecture(config, m.trust_remote_code).quantized_matrices)
    if problems:
        raise ConfigError(problems)
    precision = models.resolve_precision(recipe.train.precision, dev,
                                         models.count_parameters(config, m.trust_remote_code))
    say(f"data ({formatter.spec.task}, {formatter.spec.mode} template)")
    for report in reports:
        say("  " + report.summary())
    # `auto` settings decided for this machine; recipe.yaml keeps what was asked, the manifest what ran.
    decided, why = plan_mod.resolve_checkpointing(recipe, config, m.name_or_path, dev, procs.num_processes)
    if why:
        say(f"gradient checkpointing (auto): {why}")
    task_eval = None
    if recipe.stage == "sft" and recipe.data.eval is not None:
        examples, skipped = evaluation_mod.build_examples(
            read_rows(recipe.data.eval, recipe.data.eval_split, "data.eval"), formatter, recipe.eval.limit,
            _describe(recipe.data.eval))
        task_eval = TaskEval(examples, skipped, formatter, recipe.eval, say)

    if main and checkpoint is not None:
        step = rundir.resume(out, checkpoint, say)
        say(f"resuming from {checkpoint} (step {step}); recipe and data are unchanged since it was written")
    elif main:
        rundir.start(out, (out / rundir.MANIFEST).is_file(), dump_recipe(recipe), {
            "recipe": src.name, "recipe_path": src.path, "overrides": src.command_line, "stage": recipe.stage,
            "method": method.name, "task": recipe.data.task, "seed": recipe.train.seed, "device": str(dev),
            "processes": procs.num_processes, "precision": precision, "model_source": source or "scratch",
            "gradient_checkpointing": decided.train.gradient_checkpointing,
            "fingerprint": rundir.fingerprint(resolved), "data": data_ids, "lineage": lineage,
        })
        rundir.write_json(out / "data_report.json", [r.to_dict() for r in reports])
    procs.wait_for_everyone()  # the others read the manifest next

    try:
        trainer, metrics = _train(decided, out, dev, method, source, config, tokenizer, train, evaluation, precision,
                                  echo, callbacks, checkpoint, task_eval)
        save_final(trainer, tokenizer, formatter, out)
    except BaseException as e:
        if main:
            rundir.mark_ended(out, e)
        raise
    if not main:
        return RunResult(out, trainer.model, tokenizer, metrics)
    rundir.plot_losses(out)
    if task_eval is not None:
        summary = task_eval.report(out, f"{src.name}: {method.name} on {recipe.data.task}")
        say(evaluation_mod.metrics_table(summary))
        say(f"report: {out / 'report.md'}")
    rundir.update_manifest(out, status="completed", finished=rundir.now(), metrics=metrics)
    if evaluation:
        say(f"eval loss {metrics['eval_loss_before']:.4f} -> {metrics['eval_loss_after']:.4f}")
    say(f"saved {method.name} {'adapter' if method.family != 'full' else 'model'} to {out / 'model'}")
    return RunResult(out, trainer.model, tokenizer, metrics)


def _weights_of_run(path: str) -> tuple[str, str]:
    """(model directory, run directory) of a full or pretraining run that an sft stage starts from."""
    from adapterkit.trained import locate

    run_dir, model_dir = locate(path)
    if run_dir is None:
        raise AdapterkitError(Problem("model.from_run", f"'{path}' is a model directory, not a run",
                                      fix="use model.name_or_path for a plain model directory"))
    method = rundir.read_manifest(run_dir).get("method")
    if method != "full":
        raise AdapterkitError(Problem("model.from_run", f"run '{run_dir}' trained a {method} adapter; an sft stage "
                                      "starts from whole weights (a pretraining or full run)",
                                      fix="continue an adapter with a dpo or kto stage, or merge it first with "
                                          "`adapterkit export` and use model.name_or_path"))
    return str(model_dir), str(run_dir.resolve())


def _holds_weights(model_dir: Path) -> bool:
    """Whether a saved model or adapter has any tensor in its safetensors files."""
    from safetensors import safe_open

    for f in model_dir.glob("*.safetensors"):
        with safe_open(str(f), "pt") as weights:
            if len(weights.keys()):
                return True
    return False


def save_final(trainer: Any, tokenizer: Any, formatter: Formatter, out: Path) -> Path:
    """Write the final model/adapter, tokenizer and format spec to a temp dir, then move it into place."""
    from accelerate.utils import broadcast_object_list

    model = trainer.model
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    stops = formatter.stop_ids  # EOS, and the chat template's end-of-turn token where it has its own
    base.generation_config.eos_token_id = stops if len(stops) > 1 else stops[0]
    base.generation_config.pad_token_id = tokenizer.pad_token_id
    main = trainer.is_world_process_zero()
    # One temp dir, made by the main process: with FSDP or DeepSpeed every process saves into it.
    tmp = broadcast_object_list([rundir.make_temp_dir(out, ".model.") if main else None])[0]
    if trainer.is_fsdp_enabled:  # gather the weights into one file, not one shard per process (as peft does)
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    try:
        trainer.save_model(str(tmp))
        trainer.accelerator.wait_for_everyone()
        if main and not _holds_weights(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
            raise AdapterkitError(Problem(str(out / "model"), "the trainer saved no weights (DeepSpeed ZeRO-3 keeps "
                                          "them sharded unless told to gather them)",
                                          fix="set zero3_save_16bit_model: true in the accelerate config, then "
                                              "re-run the same command: it resumes from the last checkpoint"))
        if main:
            (tmp / "training_args.bin").unlink(missing_ok=True)  # a pickle; the run keeps recipe.yaml instead
            tokenizer.save_pretrained(tmp)
            base.generation_config.save_pretrained(tmp)
            rundir.write_atomic(tmp / "format.json", formatter.spec.to_json())
            rundir.publish_dir(tmp, out / "model")
    except BaseException as e:  # a full disk, Ctrl-C, anything: no half-written model dir stays behind
        shutil.rmtree(tmp, ignore_errors=True)
        what = rundir.storage_error(e)
        if what is None:
            raise
        last = rundir.latest_checkpoint(out)
        raise AdapterkitError(Problem(str(out / "model"), f"could not save the final model: {what}; nothing "
                                      "was half-written" + (f", and {last.name} is kept" if last else ""),
                                      fix="free disk space (or fix permissions), then re-run the same command: it "
                                          "resumes from the last checkpoint")) from None
    return out / "model"
