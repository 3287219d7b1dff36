"""Task-aware evaluation: the metric each task deserves, for the starting model and the tuned one.

    adapterkit eval runs/s1 --data test.jsonl             # task, template and columns from the run
    adapterkit eval path/to/model --task qa --data dev.jsonl --limit 500

Every prompt goes through the run's own formatter (`split_for_eval`), so a model is asked exactly
what it was trained on. Sentiment scores each label's likelihood under the prompt (no free
generation, so no unparseable outputs); the generative tasks generate greedily, in length-sorted
batches with left padding, and are scored with the task's metric (see `metrics.py`); generation,
chat and raw text also get the perplexity of the references.

A run's "base" is its starting point: the adapter disabled (LoRA, QLoRA, soft prompts), or the
base weights reloaded (full fine-tuning). Results go to metrics.json, report.md and
worst_examples.jsonl.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from adapterkit import metrics as M
from adapterkit import models, rundir
from adapterkit.config import DataConfig, EvalConfig
from adapterkit.data.formatter import Formatter, TemplateRejected, label_set
from adapterkit.data.loading import RawRow, read_rows
from adapterkit.data.tasks import TASKS
from adapterkit.errors import AdapterkitError, DataError, Problem
from adapterkit.trained import load_trained, locate

# Generation length per task when eval.max_new_tokens is not set: long enough for the references
# these tasks have, short enough that a CPU evaluation stays minutes, not hours.
MAX_NEW_TOKENS = {"qa": 32, "summarization": 128, "translation": 128, "generation": 256, "chat": 256, "text": 64}
# What the report's table leads with for each task.
HEADLINE = {"qa": "f1", "summarization": "rougeL", "translation": "chrf", "sentiment": "accuracy",
            "generation": "rougeL", "chat": "rougeL", "text": "perplexity"}
LOWER_IS_BETTER = {"perplexity", "undesirable_logp_per_token"}


@dataclass
class Example:
    """One eval row, tokenized as in training."""

    where: str
    prompt_ids: list[int]
    reference_ids: list[int]
    reference: str
    label: str | None = None
    label_ids: dict[str, list[int]] = field(default_factory=dict)
    """Sentiment: each label's completion ids under this prompt."""


def build_examples(rows: list[RawRow], formatter: Formatter, limit: int | None, source: str,
                   option: str = "data.columns", task_option: str | None = "data.task") -> tuple[list[Example], Counter]:
    """Eval examples from raw rows (the first `limit` usable ones), and the count of rows skipped by reason.
    `option`: how the command maps fields to columns, for its hints (`--column` for `adapterkit eval`)."""
    tok = formatter.tokenizer
    labels = formatter.spec.labels
    formatter.check_columns(rows, source, option, task_option)
    examples: list[Example] = []
    skipped: Counter = Counter()
    for raw in rows:
        if limit is not None and len(examples) >= limit:
            break
        fields, reason = formatter.fields(raw)
        if fields is None and reason.startswith("label not in"):
            col = formatter.columns.get("label", "label")
            raise DataError(Problem(raw.where, f"label {raw.values.get(col)!r} is not in the label set the model "
                                    f"was trained with ({', '.join(labels)})", "data",
                                    fix="fix the label, or evaluate on data with the training labels"))
        if fields is None:
            skipped[reason] += 1
            continue
        try:
            fields, fitted, _ = formatter.fit(fields)  # a long input is shortened as in training
            if fitted == "too_long":
                skipped[f"the completion alone does not fit max_length={formatter.spec.max_length}"] += 1
                continue
            prompt, reference = formatter.split_for_eval(formatter.record(fields))
        except TemplateRejected as e:
            skipped[f"the chat template rejects the conversation ({e})"] += 1
            continue
        if not prompt or len(prompt) >= formatter.spec.max_length:
            skipped[f"prompt longer than max_length={formatter.spec.max_length}"] += 1
            continue
        ex = Example(raw.where, prompt, reference, _decode(tok, reference, formatter.stop_ids))
        if formatter.task.name == "sentiment":
            ex.label = fields["label"]
            ex.label_ids = {lab: formatter.split_for_eval(formatter.record({**fields, "label": lab}))[1]
                            for lab in labels}
        examples.append(ex)
    if not examples:
        reasons = "; ".join(f"{n} {r}" for r, n in skipped.items()) or "no rows"
        raise DataError(Problem(source, f"no usable eval example ({reasons})", "data",
                                fix="check the file and the task's fields (see the README's task table)"))
    return examples, skipped


def _decode(tokenizer: Any, ids: list[int], stop_ids: list[int] | None = None) -> str:
    """Text of generated ids, cut at the first stop token (EOS, or the chat template's end of turn)."""
    stops = set(stop_ids or [tokenizer.eos_token_id])
    end = next((i for i, t in enumerate(ids) if t in stops), len(ids))
    return tokenizer.decode(ids[:end], skip_special_tokens=True).strip()


# -- model passes ----------------------------------------------------------------------------------

class Progress:
    """A progress line for one pass: rows done, rows/s, ETA. Rewritten in place on a terminal."""

    def __init__(self, say: Callable[..., None], what: str, total: int):
        self.say, self.what, self.total = say, what, total
        self.start = time.monotonic()
        self.tty = sys.stdout.isatty()
        self.shown = 0

    def update(self, done: int) -> None:
        elapsed = time.monotonic() - self.start
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - done) / rate if rate > 0 else 0.0
        line = f"  {self.what}: {done}/{self.total} rows, {rate:.1f} rows/s, ETA {eta:.0f}s"
        if self.tty:
            self.say("\r" + line, end="" if done < self.total else "\n", flush=True)
        elif done == self.total or done - self.shown >= max(1, self.total // 4):
            self.say(line)
            self.shown = done


def _batches(order: list[int], size: int) -> Iterator[list[int]]:
    for i in range(0, len(order), size):
        yield order[i:i + size]


@torch.no_grad()
def sequence_logprobs(model: Any, pairs: list[tuple[list[int], list[int]]], pad_id: int, batch_size: int,
                      progress: Progress | None = None) -> list[float]:
    """Sum of log p(target | prompt) for each (prompt ids, target ids) pair, batched with right padding."""
    dev = _device_of(model)
    out = [0.0] * len(pairs)
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]) + len(pairs[i][1]))
    done = 0
    for batch in _batches(order, batch_size):
        seqs = [pairs[i][0] + pairs[i][1] for i in batch]
        width = max(map(len, seqs))
        ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        target = torch.zeros_like(ids, dtype=torch.bool)
        for row, (i, seq) in enumerate(zip(batch, seqs)):
            ids[row, :len(seq)] = torch.tensor(seq)
            mask[row, :len(seq)] = 1
            target[row, len(pairs[i][0]):len(seq)] = True
        ids, mask, target = ids.to(dev), mask.to(dev), target.to(dev)
        # Soft prompts prepend virtual positions to the logits; the real tokens are always the last `width`.
        logits = model(input_ids=ids, attention_mask=mask).logits[:, -width:]  # (B, T, vocab)
        # Position t predicts token t+1; only target positions go through log_softmax (vocab can be large).
        picked = target[:, 1:]
        logp = torch.log_softmax(logits[:, :-1][picked].float(), dim=-1)  # (N, vocab)
        token_logp = logp.gather(1, ids[:, 1:][picked].unsqueeze(1)).squeeze(1)
        per_row = torch.zeros(len(seqs), device=dev).index_add_(
            0, picked.nonzero()[:, 0], token_logp)
        for row, i in enumerate(batch):
            out[i] = per_row[row].item()
        done += len(batch)
        if progress:
            progress.update(done)
    return out


@torch.no_grad()
def generate(model: Any, prompts: list[list[int]], tokenizer: Any, max_new_tokens: int, batch_size: int,
             progress: Progress | None = None, stop_ids: list[int] | None = None) -> list[list[int]]:
    """Greedy continuations of each prompt (new token ids, up to and with the first stop token: EOS by
    default), in length-sorted batches with left padding."""
    from transformers import GenerationConfig

    dev = _device_of(model)
    stops = list(stop_ids or [tokenizer.eos_token_id])
    config = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=max_new_tokens,
                              eos_token_id=stops, pad_token_id=tokenizer.pad_token_id)
    out: list[list[int]] = [[] for _ in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    if _soft_prompt_active(model):
        # peft puts the virtual tokens before any left padding and ignores position ids, so padding
        # would move the prompt away from its virtual tokens: batch only prompts of equal length.
        by_length: dict[int, list[int]] = {}
        for i in order:
            by_length.setdefault(len(prompts[i]), []).append(i)
        batches = [b for group in by_length.values() for b in _batches(group, batch_size)]
    else:
        batches = list(_batches(order, batch_size))
    done = 0
    for batch in batches:
        width = max(len(prompts[i]) for i in batch)
        ids = torch.full((len(batch), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, i in enumerate(batch):
            ids[row, width - len(prompts[i]):] = torch.tensor(prompts[i])
            mask[row, width - len(prompts[i]):] = 1
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Position ids are not supported")
            generated = model.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev), generation_config=config)
        for row, i in enumerate(batch):
            new = generated[row, width:].tolist()
            # A finished row is padded until the batch ends; keep it up to and with its EOS.
            end = next((j for j, t in enumerate(new) if t in stops), None)
            out[i] = new[: end + 1] if end is not None else new
        done += len(batch)
        if progress:
            progress.update(done)
    return out


def _soft_prompt_active(model: Any) -> bool:
    config = getattr(model, "active_peft_config", None)
    return bool(config is not None and config.is_prompt_learning and not getattr(model, "_adapters_disabled", False))


def _device_of(model: Any) -> torch.device:
    return next(model.parameters()).device


@contextlib.contextmanager
def adapter_disabled(model: Any) -> Iterator[Any]:
    """The starting model of an adapter run: the same object with its adapter switched off."""
    if hasattr(model, "disable_adapter"):
        with model.disable_adapter():
            yield model
    else:
        yield model


# -- one model on one task ---------------------------------------------------------------------------

def evaluate(model: Any, examples: list[Example], formatter: Formatter, settings: EvalConfig,
             say: Callable[..., None] = print, name: str = "model") -> tuple[dict[str, float], list[dict]]:
    """(metrics, per-example results) of one model. The model is put in eval mode and left there."""
    task = formatter.task.name
    tok = formatter.tokenizer
    was_training = model.training
    model.eval()
    try:
        if task == "sentiment":
            return _score_labels(model, examples, formatter, settings, say, name)
        metrics: dict[str, float] = {}
        if task in ("generation", "chat", "text"):
            nll = sequence_logprobs(model, [(e.prompt_ids, e.reference_ids) for e in examples], tok.pad_token_id,
                                    settings.batch_size, Progress(say, f"{name} perplexity", len(examples)))
            n_tokens = sum(len(e.reference_ids) for e in examples)
            metrics["perplexity"] = math.exp(-sum(nll) / n_tokens)
        new_tokens = settings.max_new_tokens or MAX_NEW_TOKENS[task]
        outputs = generate(model, [e.prompt_ids for e in examples], tok, new_tokens, settings.batch_size,
                           Progress(say, f"{name} generating", len(examples)), formatter.stop_ids)
        predictions = [_decode(tok, ids, formatter.stop_ids) for ids in outputs]
        references = [e.reference for e in examples]
        metrics.update(M.generation_metrics(task, predictions, references))
        score = M.EXAMPLE_SCORES[task]
        rows = [{"where": e.where, "prediction": p, "score": score(p, e.reference)} for e, p in zip(examples, predictions)]
        return metrics, rows
    finally:
        model.train(was_training)


def _score_labels(model: Any, examples: list[Example], formatter: Formatter, settings: EvalConfig,
                  say: Callable[..., None], name: str) -> tuple[dict[str, float], list[dict]]:
    labels = formatter.spec.labels
    pairs = [(e.prompt_ids, e.label_ids[lab]) for e in examples for lab in labels]
    logp = sequence_logprobs(model, pairs, formatter.tokenizer.pad_token_id, settings.batch_size,
                             Progress(say, f"{name} scoring labels", len(pairs)))
    rows, predictions = [], []
    for k, e in enumerate(examples):
        scores = dict(zip(labels, logp[k * len(labels):(k + 1) * len(labels)]))
        best = max(scores, key=scores.get)
        predictions.append(best)
        # Margin: log-probability of the right label minus the best other one (negative = wrong).
        others = [v for lab, v in scores.items() if lab != e.label]
        margin = scores[e.label] - max(others) if others else 0.0
        rows.append({"where": e.where, "prediction": best, "score": margin})
    return M.classification_metrics(predictions, [e.label for e in examples], labels), rows


# -- base vs tuned, and the files a user reads ---------------------------------------------------------

def compare(results: dict[str, tuple[dict[str, float], list[dict] | None]], examples: list[Example], formatter: Formatter,
            skipped: Counter, worst: int) -> dict[str, Any]:
    """metrics.json's content from the per-model results ({"base": ..., "tuned": ...} or {"model": ...})."""
    task = formatter.task.name
    summary: dict[str, Any] = {"task": task, "n": len(examples), "skipped": dict(skipped),
                               "headline": HEADLINE[task]}
    for name, (metrics, _) in results.items():
        summary[name] = {k: round(v, 4) for k, v in metrics.items()}
    final = "tuned" if "tuned" in results else next(iter(results))
    rows = results[final][1]
    order = sorted(range(len(rows)), key=lambda i: rows[i]["score"])[:worst]
    tok = formatter.tokenizer
    summary["worst"] = [{
        "where": examples[i].where,
        "input": tok.decode(examples[i].prompt_ids, skip_special_tokens=True).strip(),
        "reference": examples[i].reference,
        **{f"{name}_prediction": res[1][i]["prediction"] for name, res in results.items() if res[1] is not None},
        "score": round(rows[i]["score"], 4),
    } for i in order]
    return summary


def metrics_table(summary: dict[str, Any]) -> str:
    """A markdown table: one row per metric, a column per model, and the change when there are two."""
    names = [n for n in ("teacher", "base", "tuned", "model") if n in summary]
    keys = list(dict.fromkeys(k for n in names for k in summary[n]))
    change = "base" in names and "tuned" in names  # from the starting model to the tuned one
    head = "| metric | " + " | ".join(names) + (" | change |" if change else " |")
    lines = [head, "|" + "---|" * (len(names) + 1 + change)]
    for key in keys:
        vals = [summary[n].get(key) for n in names]
        cells = [f"{v:.2f}" if v is not None else "-" for v in vals]
        before, after = (summary["base"].get(key), summary["tuned"].get(key)) if change else (None, None)
        if change and None not in (before, after):
            delta = after - before
            better = delta < 0 if key in LOWER_IS_BETTER else delta > 0
            cells.append(f"{delta:+.2f}" + (" (better)" if better and delta else ""))
        elif change:
            cells.append("-")
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(out: Path, summary: dict[str, Any], title: str, loss_plot: Path | None = None) -> None:
    """metrics.json, report.md and worst_examples.jsonl in `out`, each written atomically."""
    out.mkdir(parents=True, exist_ok=True)
    worst = summary.pop("worst")
    rundir.write_json(out / "metrics.json", summary)
    rundir.write_atomic(out / "worst_examples.jsonl",
                        "".join(json.dumps(w, ensure_ascii=False) + "\n" for w in worst))
    skipped = ", ".join(f"{n} {r}" for r, n in summary["skipped"].items())
    lines = [f"# {title}", "", f"Task **{summary['task']}**, {summary['n']} examples"
             + (f" ({skipped} skipped)" if skipped else "") + ".", "", metrics_table(summary), ""]
    if loss_plot is not None and loss_plot.exists():
        rel = loss_plot.relative_to(out) if loss_plot.is_relative_to(out) else Path("..") / loss_plot.name
        lines += ["## Loss", "", f"![training and eval loss]({rel})", ""]
    if worst:
        lines += ["## Worst examples", "", "Lowest per-example score of the " + (
            "tuned model" if "tuned" in summary else "model") + (
            " (log-probability margin of the right label)" if summary["task"] == "sentiment" else "") + ".", ""]
        for w in worst:
            lines += [f"### {w['where']} (score {w['score']:.2f})", "", "**Input**", "", _quote(w["input"]), "",
                      f"**Reference**: {_short(w['reference'])}", ""]
            for key in (k for k in w if k.endswith("_prediction")):
                lines += [f"**{key.removesuffix('_prediction')}**: {_short(w[key])}", ""]
    rundir.write_atomic(out / "report.md", "\n".join(lines))
    summary["worst"] = worst


def _short(text: str, limit: int = 400) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + " ..."


def _quote(text: str, limit: int = 600) -> str:
    text = text if len(text) <= limit else "... " + text[-limit:]
    return "\n".join("> " + line for line in text.splitlines()) or "> "


# -- `adapterkit eval` ----------------------------------------------------------------------------------

def _check_writable(out: Path) -> None:
    """Refuse (exit 2) a report directory that cannot be written, naming the reason."""
    import os

    if out.exists() and not out.is_dir():
        raise AdapterkitError(Problem("--out", f"'{out}' is a file", fix="choose a directory for the report"))
    parent = next(p for p in [out, *out.parents] if p.exists())
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise AdapterkitError(Problem("--out", f"cannot write the report to '{out}': '{parent}' is not a writable "
                                      "directory", fix="pass --out with a writable directory"))


def evaluate_path(path: str, data: str | None = None, task: str | None = None, split: str | None = None,
                  columns: dict[str, str] | None = None, settings: dict[str, Any] | None = None,
                  out: Path | None = None, base: bool = True, say: Callable[..., None] = print) -> tuple[dict, Path]:
    """Evaluate a run (tuned and starting model) or any model directory on `data`; write the report.
    `settings` override the run's `eval` section (limit, batch_size, max_new_tokens, worst).

    Returns (metrics.json's content, the directory written)."""
    from dataclasses import replace


    run_dir, model_dir = locate(path)
    if out is None:
        out = run_dir / "eval" if run_dir is not None else Path("evals") / model_dir.name
    _check_writable(out)  # before any row is scored, not after
    trained = load_trained(path)
    recipe = trained.recipe
    if recipe is not None:
        split = split or recipe.data.eval_split
        columns = {**recipe.data.columns, **(columns or {})}
    elif trained.spec is not None:  # an export: its format.json keeps the mapping it was trained with
        columns = {**trained.spec.columns, **(columns or {})}
    config = replace(recipe.eval if recipe is not None else EvalConfig(), **(settings or {}))
    if data is None:
        if recipe is None or recipe.data.eval is None:
            raise DataError(Problem("--data", "no eval data given" + (" and the run's recipe has no data.eval"
                                                                      if recipe is not None else ""),
                                    fix="pass --data FILE (jsonl, json, csv, parquet, or a hub dataset id)"))
        data = recipe.data.eval
    preference_run = trained.spec is not None and trained.spec.task in ("preference", "unpaired")
    if task in ("preference", "unpaired") or (preference_run and task is None):
        raise DataError(Problem("--task", "preference data is scored when a dpo or kto run ends (its metrics.json "
                                "and report.md), not by `adapterkit eval`",
                                fix="evaluate the model on a task's data with --task (e.g. generation, chat)"))
    if trained.spec is not None and not preference_run:
        if task is not None and task != trained.spec.task:
            raise DataError(Problem("--task", f"'{task}' differs from the task the model was trained on "
                                    f"('{trained.spec.task}')", fix="leave --task out for a run's model"))
        rows = read_rows(data, split or "validation", "--data")
        formatter = Formatter(trained.spec, trained.tokenizer, columns)
    else:
        if task is None or task not in TASKS:
            raise DataError(Problem("--task", f"{task!r} is not a task" if task else "this model was not trained by "
                                    "adapterkit, so its task is not known", fix=f"pass --task, one of: {', '.join(TASKS)}"))
        rows = read_rows(data, split or "validation", "--data")
        max_length = min(getattr(trained.model.config, "max_position_embeddings", 2048) or 2048, 4096)
        cfg = DataConfig(task=task, columns=dict(columns or {}), max_length=max_length)
        formatter = Formatter.for_training(cfg, trained.tokenizer, label_set(rows, cfg))
        if preference_run:  # ask in the template the preference run was trained with
            formatter.spec.mode, formatter.spec.system_prompt = trained.spec.mode, trained.spec.system_prompt
            formatter.spec.chat_template = trained.spec.chat_template or formatter.spec.chat_template
            formatter = Formatter(formatter.spec, trained.tokenizer, columns)
    for field_name in columns or {}:
        if field_name not in formatter.task.fields:
            raise DataError(Problem("--column", f"'{field_name}' is not a field of task '{formatter.task.name}'",
                                    fix=f"map the task's fields ({', '.join(formatter.task.fields)}) to columns"))
    source = data if isinstance(data, str) else ", ".join(data)
    fixed = trained.spec is not None and not preference_run  # a run's model: its task is its own
    examples, skipped = build_examples(rows, formatter, config.limit, source, option="--column",
                                       task_option=None if fixed else "--task")
    say(f"eval {formatter.task.name} on {source}: {len(examples)} rows"
        + (f" ({sum(skipped.values())} skipped)" if skipped else ""))

    results: dict[str, tuple[dict[str, float], list[dict] | None]] = {}
    name = "tuned" if trained.run_dir is not None else "model"
    results[name] = evaluate(trained.model, examples, formatter, config, say, name)
    if base and trained.run_dir is not None:
        if trained.is_adapter:
            with adapter_disabled(trained.model) as model:
                results["base"] = evaluate(model, examples, formatter, config, say, "base")
        elif trained.manifest.get("model_source") not in (None, "scratch"):
            # A full run's starting weights are another copy of the model: free the tuned one first.
            del trained.model
            start = models.load_base(recipe.model, trained.manifest["model_source"], "fp32", dtype=trained.dtype)
            results["base"] = evaluate(start, examples, formatter, config, say, "base")
        results = {k: results[k] for k in ("base", "tuned") if k in results}
    summary = compare(results, examples, formatter, skipped, config.worst)
    summary.update(model_path=str(trained.run_dir or trained.model_dir), data=source)
    loss = trained.run_dir / "loss.png" if trained.run_dir is not None else None
    write_report(out, summary, f"{Path(summary['model_path']).name}: {formatter.task.name} on {Path(source).name}", loss)
    return summary, out
