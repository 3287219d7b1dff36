"""The training stage, shared by `pretrain` and `sft`: they differ only in their data.

    adapterkit recipe run lora-sentiment train.max_steps=50 output_dir=runs/s1

Top to bottom: check the output dir, read and format the data (tokenizer first: a scratch model
trains its own), load or build the model, wrap it for the method, train with trl's SFTTrainer,
measure the eval loss before and after, and publish the final model atomically.
Everything that can be wrong with the user's input is found before the output dir is touched.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapterkit import models, rundir
from adapterkit.adapters import METHODS, trainable_parameters
from adapterkit.adapters.lora import quantization_config
from adapterkit.config import Recipe, RecipeSource, dump_recipe
from adapterkit.data.formatter import DataReport, Formatter, encode_rows, label_set
from adapterkit.data.loading import RawRow, read_rows, resolve_sample
from adapterkit.errors import DataError, Problem


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
    evaluation = None
    if d.eval is not None:
        evaluation, eval_report = encode_rows(read_rows(d.eval, d.eval_split, "data.eval"), formatter, "eval",
                                              _describe(d.eval))
        reports.append(eval_report)
        if not evaluation:
            raise DataError(Problem(_describe(d.eval), "no usable eval example", "data.eval",
                                    fix="check the eval file, or remove data.eval"))
    return formatter, train, evaluation, reports


def _sft_config(recipe: Recipe, out: Path, precision: str, dev: Any, has_eval: bool) -> Any:
    from trl import SFTConfig

    t, d = recipe.train, recipe.data
    return SFTConfig(
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
        activation_checkpointing=t.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False} if t.gradient_checkpointing else None,
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
        disable_tqdm=True,
        include_num_input_tokens_seen="non_padding",
        max_length=d.max_length,
        packing=d.packing,
        # Pretraining concatenates documents (EOS between them) and cuts the stream into blocks; SFT
        # packs whole examples best-fit, padding-free, so attention never crosses two examples.
        packing_strategy="wrapped" if recipe.stage == "pretrain" else "bfd",
        dataset_num_proc=None,
    )


def _train(recipe: Recipe, out: Path, dev: Any, method: Any, source: str | None, config: Any, tokenizer: Any,
           train: list[dict], evaluation: list[dict] | None, precision: str, echo: bool,
           callbacks: list[Any] | None) -> tuple[Any, dict[str, Any]]:
    """Load or build the model, wrap it for the method, and train it; eval loss before and after."""
    import datasets
    import torch
    from transformers import PrinterCallback
    from trl import SFTTrainer

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
    model = method.wrap(model, recipe.adapter, tokenizer_source, recipe.train)
    trainable, total = trainable_parameters(model)
    say(f"model: {method.name}, {trainable:,} of {total:,} parameters train ({100 * trainable / total:.3f}%), "
        f"{dev.type}, {precision}")

    args = _sft_config(recipe, out, precision, dev, evaluation is not None)
    progress = rundir.ProgressLog(out, echo=echo)
    trainer = SFTTrainer(
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
    if evaluation:
        progress.phase = "before"
        metrics["eval_loss_before"] = trainer.evaluate()["eval_loss"]
        progress.phase = "train"
    result = trainer.train()
    metrics.update(train_loss=result.training_loss, steps=result.global_step,
                   runtime_s=round(result.metrics.get("train_runtime", 0.0), 2),
                   tokens_seen=trainer.state.num_input_tokens_seen)
    if evaluation:
        progress.phase = "after"
        metrics["eval_loss_after"] = trainer.evaluate()["eval_loss"]

    return trainer, metrics


@dataclass
class RunResult:
    """What `run` leaves: the run directory, and the trained model and tokenizer still in memory."""

    out: Path
    model: Any
    tokenizer: Any
    metrics: dict[str, Any]


def run(recipe: Recipe, src: RecipeSource, force: bool = False, echo: bool = True,
        callbacks: list[Any] | None = None) -> RunResult:
    """Train one recipe end to end. `callbacks` are extra transformers TrainerCallbacks."""
    import datasets
    from transformers import set_seed
    from transformers.utils import logging as hf_logging

    say = print if echo else (lambda *a, **k: None)
    datasets.disable_progress_bars()
    hf_logging.disable_progress_bar()  # the ProgressLog line is the progress display
    out = Path(recipe.output_dir)
    rundir.check_output_dir(out, force)
    dev = models.device()
    method = METHODS[recipe.adapter.method]
    m = recipe.model
    set_seed(recipe.train.seed)

    # Tokenizer and data first: bad data must fail before a model is loaded or a file is written.
    source, tokenizer, train_rows = tokenizer_for(recipe, say)
    formatter, train, evaluation, reports = prepare_data(recipe, tokenizer, train_rows)
    config = models.scratch_config(m, tokenizer) if m.init == "scratch" else models.load_config(m, source)
    precision = models.resolve_precision(recipe.train.precision, dev,
                                         models.count_parameters(config, m.trust_remote_code))
    say(f"data ({formatter.spec.task}, {formatter.spec.mode} template)")
    for report in reports:
        say("  " + report.summary())

    rundir.start(out, force, dump_recipe(recipe), {
        "recipe": src.name, "recipe_path": src.path, "overrides": src.command_line, "stage": recipe.stage,
        "method": method.name, "task": recipe.data.task, "seed": recipe.train.seed, "device": str(dev),
        "precision": precision, "model_source": source or "scratch",
        "data": {"train": _data_files(recipe.data.train, recipe.data.train_split),
                 "eval": _data_files(recipe.data.eval, recipe.data.eval_split)},
    })
    rundir.write_json(out / "data_report.json", [r.to_dict() for r in reports])

    try:
        trainer, metrics = _train(recipe, out, dev, method, source, config, tokenizer, train, evaluation, precision,
                                  echo, callbacks)
        save_final(trainer, tokenizer, formatter, out)
    except BaseException as e:
        rundir.update_manifest(out, status="failed", finished=rundir.now(), error=f"{type(e).__name__}: {e}")
        raise
    rundir.plot_losses(out)
    rundir.update_manifest(out, status="completed", finished=rundir.now(), metrics=metrics)
    if evaluation:
        say(f"eval loss {metrics['eval_loss_before']:.4f} -> {metrics['eval_loss_after']:.4f}")
    say(f"saved {method.name} {'adapter' if method.family != 'full' else 'model'} to {out / 'model'}")
    return RunResult(out, trainer.model, tokenizer, metrics)


def save_final(trainer: Any, tokenizer: Any, formatter: Formatter, out: Path) -> Path:
    """Write the final model/adapter, tokenizer and format spec to a temp dir, then move it into place."""
    model = trainer.model
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.generation_config.eos_token_id = tokenizer.eos_token_id
    base.generation_config.pad_token_id = tokenizer.pad_token_id
    tmp = rundir.make_temp_dir(out, ".model.")
    trainer.save_model(str(tmp))
    if trainer.is_world_process_zero():
        (tmp / "training_args.bin").unlink(missing_ok=True)  # a pickle; the run keeps recipe.yaml instead
        tokenizer.save_pretrained(tmp)
        base.generation_config.save_pretrained(tmp)
        rundir.write_atomic(tmp / "format.json", formatter.spec.to_json())
        rundir.publish_dir(tmp, out / "model")
    return out / "model"
