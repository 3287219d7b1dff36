"""The `distill` stage: a teacher's token distributions supervise the student, mixed with the labels.

    adapterkit recipe run distill-sentiment distill.teacher=runs/teacher

The student is the recipe's model, trained with its adapter method on the recipe's data, formatted as
sft formats it. At every supervised position the loss is

    label_weight * CE(labels) + (1 - label_weight) * T^2 * D(teacher_T || student_T)

where D is forward KL, reverse KL or the generalised JSD (`distill.loss`), both distributions softened
by the temperature T. With `distill.top_k` the teacher keeps its k likeliest tokens and the rest of its
probability as one bucket, and the student is compared on the same k + 1 outcomes (the whole vocabulary
when top_k is null). `distill.confidence` mixes in the weak-to-strong auxiliary confidence loss: CE
against the student's own argmax, warmed up over the first 20% of the steps (Burns et al. 2023).

The teacher runs on every batch, or once over the training rows before training (`distill.cache`): its
top-k log-probabilities go to a safetensors file under the adapterkit cache, keyed by the teacher, the
formatted rows, top_k and the temperature, so a resumed run or another student reuses them, and the
teacher is not in memory while the student trains.

Why not trl's trainers: GKDTrainer (trl.experimental) is built around on-policy generation with a ChatML
collator; its loss ignores its temperature and has neither a label mix nor a cache. DistillationTrainer
only distils on completions it generates. Their divergence is the one used here (generalised JSD with
trl's beta convention), and the tests check ours against GKDTrainer.generalized_jsd_loss.
"""

from __future__ import annotations

import gc
import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from adapterkit import builtin, rundir, trained
from adapterkit.config import DistillConfig, Recipe
from adapterkit.errors import ConfigError, Problem
from adapterkit.evaluation import Progress
from adapterkit.stages.sft import SFT
from adapterkit.stages.skeleton import Context, Prepared
from adapterkit.stages.trainer import guarded_trainer_class

IGNORE = -100
LOG_FLOOR = -30.0
"""Teacher log-probabilities are kept at or above this (e^-30 ~ 1e-13), so that a zero never makes the
reverse KL infinite, and so that they fit float16 in the cache."""
CONFIDENCE_WARMUP = 0.2
"""Share of the steps over which the confidence loss's weight rises from 0 (as in the weak-to-strong paper)."""


# -- the loss ----------------------------------------------------------------------------------------

@dataclass
class Sparse:
    """A teacher's distribution at N positions as k + 1 outcomes: its top-k tokens and the rest."""

    index: torch.Tensor
    """[N, k] token ids."""
    logprob: torch.Tensor
    """[N, k + 1] log-probabilities of those tokens and, last, of all the others together."""


def sparse_of(logits: torch.Tensor, k: int, temperature: float) -> Sparse:
    """The top-k form of `logits` [N, V] at `temperature`."""
    logp = F.log_softmax(logits.float() / temperature, dim=-1)
    top, index = logp.topk(min(k, logp.size(-1) - 1), dim=-1)
    rest = logp.scatter(-1, index, float("-inf")).logsumexp(-1, keepdim=True)
    return Sparse(index, torch.cat([top, rest], -1).clamp_min(LOG_FLOOR))


def _student_buckets(logp: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The student's log-probabilities [N, V] folded onto the teacher's k + 1 outcomes."""
    rest = logp.scatter(-1, index, float("-inf")).logsumexp(-1, keepdim=True)
    return torch.cat([logp.gather(-1, index), rest], -1)


def _kl(p_log: torch.Tensor, q_log: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row, from log-probabilities (0 log 0 = 0)."""
    p = p_log.exp()
    return torch.where(p > 0, p * (p_log - q_log), 0.0).sum(-1)


def divergence(student: torch.Tensor, teacher: torch.Tensor, loss: str, beta: float) -> torch.Tensor:
    """Per-row divergence between log-distributions over the same outcomes: `forward_kl` KL(t || s),
    `reverse_kl` KL(s || t), `jsd` beta * KL(t || m) + (1 - beta) * KL(s || m), m = beta t + (1 - beta) s."""
    if loss == "forward_kl":
        return _kl(teacher, student)
    if loss == "reverse_kl":
        return _kl(student, teacher)
    mix = torch.logsumexp(torch.stack([teacher + math.log(beta), student + math.log1p(-beta)]), 0)
    return beta * _kl(teacher, mix) + (1 - beta) * _kl(student, mix)


def position_losses(logits: torch.Tensor, targets: torch.Tensor, teacher: torch.Tensor | Sparse,
                    k: DistillConfig, confidence: float) -> dict[str, torch.Tensor]:
    """Per-position terms at N supervised positions: `label` (CE on the labels), `distill` (the divergence,
    times T^2), `confidence` (CE against the student's argmax) and `total`, their mix.

    `logits` [N, V] is the student's; `teacher` its dense logits [N, V] or a Sparse top-k form."""
    logits = logits.float()
    label = F.cross_entropy(logits, targets, reduction="none")
    t = k.temperature
    logp = F.log_softmax(logits / t, dim=-1)
    if isinstance(teacher, Sparse):
        dist = divergence(_student_buckets(logp, teacher.index), teacher.logprob.float(), k.loss, k.jsd_beta)
    else:
        dist = divergence(logp, F.log_softmax(teacher.float() / t, dim=-1), k.loss, k.jsd_beta)
    dist = dist * t * t
    own = F.cross_entropy(logits, logits.detach().argmax(-1), reduction="none")
    soft = (1 - confidence) * dist + confidence * own
    return {"label": label, "distill": dist, "confidence": own,
            "total": k.label_weight * label + (1 - k.label_weight) * soft}


# -- the teacher -------------------------------------------------------------------------------------

def teacher_source(k: DistillConfig) -> str:
    """distill.teacher as a loadable source (a built builtin: resolves to its directory)."""
    name = k.teacher or ""
    if name.startswith("builtin:"):
        built = builtin.model_dir(name.removeprefix("builtin:"))
        if built is None:
            raise ConfigError(Problem("distill.teacher", f"'{name}' has not been built yet",
                                      fix="run any recipe on it once (it is built on first use)"))
        return str(built)
    return name


def tokenizer_mismatch(student: Any, teacher: Any, texts: list[str]) -> str | None:
    """Why the two tokenizers would not give the same ids for the same text (None: they would)."""
    sv, tv = student.get_vocab(), teacher.get_vocab()
    if sv != tv:
        differ = [t for t in sv if tv.get(t) != sv[t]]
        example = next(iter(differ), None)
        shown = f", e.g. {example!r} is {sv[example]} vs {tv.get(example)}" if example is not None else ""
        return (f"the vocabularies differ: the student's has {len(sv)} tokens, the teacher's {len(tv)}; "
                f"{len(differ)} of the student's map to other ids{shown}")
    for name in ("eos_token_id", "bos_token_id"):  # (a pad token only pads: it may differ)
        if getattr(student, name) != getattr(teacher, name):
            return f"{name} is {getattr(student, name)} for the student, {getattr(teacher, name)} for the teacher"
    for text in texts:
        a, b = student(text, add_special_tokens=False).input_ids, teacher(text, add_special_tokens=False).input_ids
        if a != b:
            return f"the same vocabulary tokenizes {text[:40]!r} differently ({len(a)} vs {len(b)} tokens)"
    return None


def _identity(source: str) -> dict[str, Any]:
    """What the teacher is, for the cache key: its path and the size and time of its weight files (a
    hub id is its name)."""
    path = Path(source).expanduser()
    if not path.exists():
        return {"hub": source}
    _, model_dir = trained.locate(path)
    files = sorted(f for f in model_dir.iterdir() if f.suffix in (".safetensors", ".bin", ".json"))
    return {"path": str(model_dir.resolve()),
            "files": [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]}


def cache_key(source: str, rows: list[dict], k: DistillConfig) -> str:
    h = hashlib.sha256(json.dumps({"teacher": _identity(source), "top_k": k.top_k, "temperature": k.temperature,
                                   "format": 1}, sort_keys=True).encode())
    for r in rows:
        h.update(json.dumps([r["input_ids"], r["labels"]]).encode())
    return h.hexdigest()[:20]


def supervised(labels: torch.Tensor) -> torch.Tensor:
    """[B, T] bool: the positions whose next token is supervised (where the logits are compared)."""
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != IGNORE
    return mask


def _pad(rows: list[dict], pad_id: int, dev: torch.device) -> dict[str, torch.Tensor]:
    n = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), n), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), n), IGNORE, dtype=torch.long)
    attn = torch.zeros((len(rows), n), dtype=torch.long)
    for i, r in enumerate(rows):
        m = len(r["input_ids"])
        ids[i, :m], labels[i, :m], attn[i, :m] = torch.tensor(r["input_ids"]), torch.tensor(r["labels"]), 1
    return {"input_ids": ids.to(dev), "labels": labels.to(dev), "attention_mask": attn.to(dev)}


def positions_logits(model: Any, batch: dict[str, torch.Tensor], mask: torch.Tensor, virtual: int = 0) -> torch.Tensor:
    """The model's logits [N, V] at the `mask`ed positions only (row by row, in order): the rest of the
    sequence is never projected onto the vocabulary. `virtual`: positions a soft prompt puts in front."""
    keep = mask if not virtual else torch.cat([mask.new_zeros(mask.size(0), virtual), mask], 1)
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=keep,
                 use_cache=False).logits


@torch.no_grad()
def build_cache(teacher: Any, rows: list[dict], k: DistillConfig, path: Path, pad_id: int, batch_size: int,
                vocab: int, say: Any) -> None:
    """Run the teacher over `rows` once and write its top-k form at every supervised position to `path`
    (safetensors: `index` [P, k] int32, `logprob` [P, k + 1] float16, `offsets` [rows + 1]), atomically."""
    from safetensors.torch import save_file

    counts = [sum(1 for x in r["labels"][1:] if x != IGNORE) for r in rows]
    offsets = torch.tensor([0, *counts]).cumsum(0)
    total = int(offsets[-1])
    top = min(k.top_k, vocab - 1)
    index = torch.zeros((total, top), dtype=torch.int32)
    logprob = torch.zeros((total, top + 1), dtype=torch.float16)
    dev = next(teacher.parameters()).device
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]["input_ids"]))
    progress = Progress(say, "teacher logits for the cache", len(rows))
    done = 0
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        batch = _pad([rows[i] for i in chunk], pad_id, dev)
        mask = supervised(batch["labels"])
        sparse = sparse_of(positions_logits(teacher, batch, mask)[:, :vocab], top, k.temperature)
        at = 0
        for i in chunk:
            n = counts[i]
            index[offsets[i]:offsets[i] + n] = sparse.index[at:at + n].to(torch.int32).cpu()
            logprob[offsets[i]:offsets[i] + n] = sparse.logprob[at:at + n].to(torch.float16).cpu()
            at += n
        done += len(chunk)
        progress.update(done)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file({"index": index, "logprob": logprob, "offsets": offsets}, str(tmp),
                  metadata={"rows": str(len(rows)), "top_k": str(top), "temperature": str(k.temperature)})
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class TeacherCache:
    """The cached top-k form of one run's rows, read lazily from its safetensors file."""

    def __init__(self, path: Path) -> None:
        from safetensors import safe_open

        self.path = path
        self.file = safe_open(str(path), framework="pt")
        self.offsets = self.file.get_tensor("offsets")
        self.index = self.file.get_slice("index")
        self.logprob = self.file.get_slice("logprob")

    def rows(self, rows: list[int]) -> Sparse:
        """The positions of `rows`, in order."""
        spans = [(int(self.offsets[r]), int(self.offsets[r + 1])) for r in rows]
        index = torch.cat([self.index[a:b] for a, b in spans])
        logprob = torch.cat([self.logprob[a:b] for a, b in spans])
        return Sparse(index.long(), logprob.float())


class RowCollator:
    """trl's collator, keeping each example's row number (`row`) for the cache lookup."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        rows = [e.pop("row", None) for e in examples]  # eval rows have none
        batch = self.inner(examples)
        if None not in rows:
            batch["row"] = torch.tensor(rows)
        return batch


def distill_trainer_class() -> type:
    """The guarded SFTTrainer with the distillation loss in place of trl's (see the module's docstring)."""

    class DistillTrainer(guarded_trainer_class()):
        def __init__(self, *args: Any, teacher: Any = None, cache: TeacherCache | None = None,
                     settings: DistillConfig, vocab: int, virtual: int = 0, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.teacher, self.cache, self.settings, self.vocab, self.virtual = teacher, cache, settings, vocab, virtual
            self.data_collator = RowCollator(self.data_collator)
            self.loss_is_scaled_for_ga = True  # compute_loss divides by the tokens of the whole accumulated step
            self._parts: dict[str, list[float]] = {"label_loss": [], "distill_loss": []}

        def confidence_now(self) -> float:
            """The confidence loss's weight at this step (warmed up over the first 20% of the steps)."""
            c = self.settings.confidence
            if not c:
                return 0.0
            warmup = max(1, round(CONFIDENCE_WARMUP * max(self.state.max_steps, 1)))
            return c * min(1.0, self.state.global_step / warmup)

        def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                         num_items_in_batch: Any = None) -> Any:
            rows = inputs.pop("row", None)
            mask = supervised(inputs["labels"])
            logits = positions_logits(model, inputs, mask, self.virtual)[:, :self.vocab]
            targets = inputs["labels"][:, 1:][mask[:, :-1]]
            if not model.training:  # held-out loss: the labels' cross-entropy, as an sft run reports it
                loss = F.cross_entropy(logits.float(), targets)
                return (loss, None) if return_outputs else loss
            if self.cache is not None:
                teacher: torch.Tensor | Sparse = self.cache.rows(rows.tolist())
                teacher = Sparse(teacher.index.to(logits.device), teacher.logprob.to(logits.device))
            else:
                self.teacher.eval()
                with torch.no_grad():
                    dense = positions_logits(self.teacher, inputs, mask)[:, :self.vocab]
                top = self.settings.top_k
                teacher = sparse_of(dense, top, self.settings.temperature) if top and top < self.vocab - 1 else dense
            if isinstance(teacher, Sparse) and teacher.index.size(0) != logits.size(0):
                raise RuntimeError(f"teacher cache {self.cache.path} holds {teacher.index.size(0)} positions for "
                                   f"rows {rows.tolist()}, the batch has {logits.size(0)}")
            parts = position_losses(logits, targets, teacher, self.settings, self.confidence_now())
            if num_items_in_batch is not None:
                denom = num_items_in_batch.to(logits.device) if torch.is_tensor(num_items_in_batch) else num_items_in_batch
                if self.args.average_tokens_across_devices:
                    denom = denom / self.accelerator.num_processes  # DDP averages the processes' gradients
            else:
                denom = max(logits.size(0), 1) * self.current_gradient_accumulation_steps
            for name in ("label", "distill"):
                self._parts[f"{name}_loss"].append(parts[name].detach().mean().item())
            loss = parts["total"].sum() / denom
            return (loss, None) if return_outputs else loss

        def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
            if "loss" in logs:
                for name, values in self._parts.items():
                    if values:
                        logs[name] = round(sum(values) / len(values), 4)
                    values.clear()
            super().log(logs, *args, **kwargs)

    return DistillTrainer


@torch.no_grad()
def eval_loss(model: Any, loader: Any, vocab: int, virtual: int = 0) -> float:
    """The labels' cross-entropy over `loader`, averaged as Trainer.evaluate averages its eval_loss (each
    batch's mean, weighted by its rows): the teacher's number beside the student's."""
    was = model.training
    model.eval()
    total, rows = 0.0, 0
    dev = next(model.parameters()).device
    try:
        for batch in loader:
            batch = {k: v.to(dev) for k, v in batch.items() if k != "row"}
            mask = supervised(batch["labels"])
            logits = positions_logits(model, batch, mask, virtual)[:, :vocab]
            loss = F.cross_entropy(logits.float(), batch["labels"][:, 1:][mask[:, :-1]])
            total += loss.item() * batch["input_ids"].size(0)
            rows += batch["input_ids"].size(0)
    finally:
        model.train(was)
    return total / max(rows, 1)


# -- the stage ---------------------------------------------------------------------------------------

@dataclass
class DistillWork:
    teacher: Any = None
    cache_path: Path | None = None
    vocab: int = 0


class Distill(SFT):
    """`distill`: sft's data, model and trainer, with the teacher's distributions in the loss."""

    def prepare(self, recipe: Recipe, ctx: Context) -> Prepared:
        run = super().prepare(recipe, ctx)
        k = recipe.distill
        source = teacher_source(k)
        teacher_tok, spec = trained.reference_tokenizer(source, "distill.teacher")
        texts = [run.tokenizer.decode(r["input_ids"]) for r in run.work.train[:20]]
        why = tokenizer_mismatch(run.tokenizer, teacher_tok, texts)
        if why:
            raise ConfigError(Problem("distill.teacher", f"'{k.teacher}' does not share the student's tokenizer: {why}",
                                      fix="distillation compares the two models' distributions token by token: use a "
                                          "teacher of the student's family (same tokenizer), or train on the labels "
                                          "alone (stage: sft)"))
        if spec is not None and (spec.task, spec.template, spec.mode) != (run.formatter.spec.task,
                                                                          run.formatter.spec.template,
                                                                          run.formatter.spec.mode):
            ctx.say(f"distill: the teacher was trained on {spec.task} rows with a {spec.mode} template; the student's "
                    f"rows are {run.formatter.spec.task} with a {run.formatter.spec.mode} template, so the teacher "
                    "reads a format it was not trained on")
        work = DistillWork(vocab=len(run.tokenizer))
        if k.cache:
            work.cache_path = (builtin.cache_dir() / "distill" / cache_key(source, run.work.train, k)
                               / "teacher.safetensors")
        run.manifest["distill"] = {"teacher": k.teacher, "teacher_source": source,
                                   "cache": str(work.cache_path) if work.cache_path else None}
        run.work.distill = work
        return run

    def trainer_parts(self, run: Prepared, ctx: Context, model: Any) -> tuple[type, dict[str, Any]]:
        k, work, method = run.recipe.distill, run.work.distill, run.method
        source = teacher_source(k)
        if work.cache_path is not None and work.cache_path.is_file():
            ctx.say(f"distill: the teacher's top-{k.top_k} log-probabilities are cached in {work.cache_path}")
        else:
            ctx.say(f"distill: loading the teacher {source}")
            work.teacher = trained.load_reference(source, "distill.teacher", ctx.dev)[0]
            if work.cache_path is not None and ctx.main:
                build_cache(work.teacher, run.work.train, k, work.cache_path, run.tokenizer.pad_token_id,
                            run.recipe.eval.batch_size, work.vocab, ctx.say)
                ctx.say(f"distill: cached the teacher's top-{k.top_k} log-probabilities in {work.cache_path} "
                        f"({work.cache_path.stat().st_size / 2**20:.1f} MiB)")
        ctx.procs.wait_for_everyone()  # the others read the cache the main process wrote
        kwargs = {"settings": k, "vocab": work.vocab, "virtual": method.virtual_tokens(run.recipe.adapter)}
        if work.cache_path is not None:
            kwargs["cache"] = TeacherCache(work.cache_path)
        else:
            kwargs["teacher"] = work.teacher
        return distill_trainer_class(), kwargs

    def training_rows(self, run: Prepared) -> list[dict]:
        return [{**r, "row": i} for i, r in enumerate(run.work.train)]

    def config_changes(self) -> dict[str, Any]:
        # The row numbers must reach the collator; eval needs only the loss.
        return {"remove_unused_columns": False, "prediction_loss_only": True}

    def before_training(self, run: Prepared, ctx: Context, trainer: Any, metrics: dict[str, Any],
                        previous: dict[str, Any]) -> None:
        """The teacher's held-out loss (and task metrics) beside the student's; then, with a cache, the
        teacher leaves memory."""
        work, k = run.work.distill, run.recipe.distill
        if run.work.evaluation and "teacher_eval_loss" not in previous:
            teacher = work.teacher or trained.load_reference(teacher_source(k), "distill.teacher", ctx.dev)[0]
            metrics["teacher_eval_loss"] = eval_loss(teacher, trainer.get_eval_dataloader(), work.vocab)
            ctx.say(f"distill: teacher eval loss {metrics['teacher_eval_loss']:.4f}")
            if run.work.task_eval is not None:
                metrics["task_teacher"] = run.work.task_eval.run(teacher, "teacher")
            work.teacher = teacher if work.cache_path is None else None
            del teacher
        elif "teacher_eval_loss" in previous:
            metrics["teacher_eval_loss"] = previous["teacher_eval_loss"]
            if "task_teacher" in previous and run.work.task_eval is not None:
                metrics["task_teacher"] = previous["task_teacher"]
                run.work.task_eval.results["teacher"] = (previous["task_teacher"], None)
        if work.cache_path is not None:
            work.teacher = None
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        if ctx.main:
            rundir.update_manifest(ctx.out, metrics=metrics)

    def finish(self, run: Prepared, ctx: Context, metrics: dict[str, Any]) -> None:
        super().finish(run, ctx, metrics)
        if "teacher_eval_loss" in metrics and "eval_loss_after" in metrics:
            ctx.say(f"teacher eval loss {metrics['teacher_eval_loss']:.4f}; the student's gap to it "
                    f"{metrics['eval_loss_before'] - metrics['teacher_eval_loss']:+.4f} -> "
                    f"{metrics['eval_loss_after'] - metrics['teacher_eval_loss']:+.4f}")


STAGE = Distill()
