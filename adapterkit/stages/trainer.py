"""The trainer pieces every stage shares: the TrainingArguments a recipe gives, trl's trainers with
atomic checkpoints and a stop on non-finite numbers, the packed-rows collator and the probe that says
whether a model keeps packed examples apart, and the atomic publish of the final model."""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from adapterkit import kernels, models, rundir
from adapterkit.config import Recipe
from adapterkit.config.rules import trackers_of
from adapterkit.data.formatter import Formatter
from adapterkit.errors import AdapterkitError, Problem, TrainingStopped


@dataclass
class Auto:
    """The settings a recipe leaves to the machine (`auto`), as decided for this run. The recipe keeps
    `auto` (so that resuming on another machine is the same recipe); the manifest records these."""

    gradient_checkpointing: bool = False
    packing: bool = False
    kernels: dict[str, Any] | None = None
    """What `train.kernels` put into the model (kernels.KernelsRan)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def build_trainer(trainer_class: type, model: Any, **kwargs: Any) -> Any:
    """`trainer_class(model=model, **kwargs)`, with ProgressLog as the only printer, and every trainable
    weight in float32. trl casts the adapter of a 4-bit model to bf16, which would start the policy a
    rounding away from its reference and round tiny Adam updates away: the float32 values from before
    are put back (autocast still computes in half precision), so the adapter reloaded by peft (which
    upcasts to float32) computes exactly what was trained. Other weights are upcast in place."""
    from transformers import PrinterCallback

    kept = ({n: p.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}
            if getattr(model, "is_loaded_in_4bit", False) else {})
    trainer = trainer_class(model=model, **kwargs)
    trainer.remove_callback(PrinterCallback)  # ProgressLog prints a readable line instead of a dict
    for name, p in trainer.model.named_parameters():
        if name in kept:
            p.data = kept[name]
        elif p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    return trainer


def use_kernels(model: Any, recipe: Recipe, quantized_base: bool, auto: Auto, dev: Any, say: Callable) -> None:
    """Put `train.kernels` into the wrapped model, say what ran (and each kernel left out, and why),
    and keep it in `auto` for the manifest. Quiet when `auto` chose nothing."""
    ran = kernels.apply(model, recipe.train.kernels, quantized_base, dev)
    auto.kernels = ran.to_dict()
    if ran.adapterkit or ran.liger or recipe.train.kernels != "auto":
        say(ran.summary())
    for note in ran.notes:
        say(note)


def trainer_args(recipe: Recipe, auto: Auto, out: Path, precision: str, dev: Any, has_eval: bool) -> dict[str, Any]:
    """The TrainingArguments every stage shares (SFTConfig, DPOConfig and KTOConfig all take them)."""
    t = recipe.train
    checkpointing = auto.gradient_checkpointing
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



def _holds_weights(model_dir: Path) -> bool:
    """Whether a saved model or adapter has any tensor in its safetensors files."""
    from safetensors import safe_open

    for f in model_dir.glob("*.safetensors"):
        with safe_open(str(f), "pt") as weights:
            if len(weights.keys()):
                return True
    return False



def tracker_callbacks(recipe: Recipe, out: Path) -> list[Any]:
    """transformers' own callbacks for `train.report_to`, to go after the ProgressLog (which adds its
    tokens/s and MFU to each log, so that the trackers record them too); tensorboard writes to
    OUTPUT_DIR/tensorboard."""
    from transformers.integrations import get_reporting_integration_callbacks
    from transformers.integrations.integration_utils import TensorBoardCallback

    names = trackers_of(recipe.train.report_to)
    callbacks = [cls() for cls in get_reporting_integration_callbacks(names)] if names else []
    for callback in callbacks:
        if isinstance(callback, TensorBoardCallback):
            callback.logging_dir = str(out / "tensorboard")
    return callbacks


def save_final(trainer: Any, tokenizer: Any, formatter: Formatter, out: Path,
               rewrite: Callable[[Path], None] | None = None) -> Path:
    """Write the final model/adapter, tokenizer and format spec to a temp dir (`rewrite` may change the
    saved weights there), then move it into place."""
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
            if rewrite is not None:
                rewrite(tmp)
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
