"""Rules across fields: combinations the schema's types alone cannot refuse."""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import string
from typing import Any

from adapterkit.config.schema import DPO_LOSSES, KTO_LOSSES, CleanConfig, Recipe
from adapterkit.adapters import METHODS
from adapterkit.config.source import RecipeSource
from adapterkit.config.typed import _where
from adapterkit.data.language import unknown_languages
from adapterkit.data.tasks import TASKS  # the task table is the one home of field names
from adapterkit.errors import Problem, did_you_mean


def _numbers(obj: Any, prefix: str = "") -> list[tuple[str, float]]:
    """(dotted key, value) of every float in a recipe's config dataclasses."""
    out = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            out += _numbers(value, key + ".")
        elif isinstance(value, float):
            out.append((key, value))
    return out


def packs(recipe: Recipe) -> bool:
    """Whether the run packs its examples (`data.packing`, with `auto` decided: on where the method can
    pack, for the stages that train on formatted examples; the preference stages never pack)."""
    if recipe.data.packing == "auto":
        return METHODS[recipe.adapter.method].can_pack and recipe.stage in ("pretrain", "sft")
    return bool(recipe.data.packing)


# ---------------------------------------------------------------------------------------------
# Rules across fields


TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio", "mlflow": "mlflow"}
"""train.report_to's trackers (transformers' integration names) and the package each needs."""


def trackers_of(report_to: str | list[str]) -> list[str]:
    """train.report_to as a list of tracker names: none (or an empty list) is no tracker."""
    names = [report_to] if isinstance(report_to, str) else list(report_to)
    return [n for n in names if n != "none"]


def _check_distill(recipe: Recipe, src: RecipeSource, bad: Any) -> None:
    """The distill stage's section: a teacher, losses and weights in range, a cache that can be kept."""
    k = recipe.distill
    if recipe.stage != "distill":
        if any(key == "distill" or key.startswith("distill.") for key in src.where):
            bad("distill", f"is set but the stage is '{recipe.stage}'", "remove distill, or set stage: distill")
        return
    if not k.teacher:
        bad("distill.teacher", "the distill stage needs a teacher",
            "set distill.teacher to a run directory, a model directory or a hub id (with the student's tokenizer)")
    if k.temperature <= 0:
        bad("distill.temperature", f"{k.temperature!r} must be positive", "use e.g. 1.0 or 2.0")
    if not 0 <= k.label_weight <= 1:
        bad("distill.label_weight", f"{k.label_weight!r} is out of range",
            "use a weight in [0, 1] (0: the teacher alone, 1: the labels alone)")
    if not 0 < k.jsd_beta < 1:
        bad("distill.jsd_beta", f"{k.jsd_beta!r} is out of range", "use a value in (0, 1); 0 and 1 are "
            "distill.loss=forward_kl and reverse_kl")
    if not 0 <= k.confidence < 1:
        bad("distill.confidence", f"{k.confidence!r} is out of range", "use a weight in [0, 1), e.g. 0.75")
    if k.top_k is not None and k.top_k < 1:
        bad("distill.top_k", f"{k.top_k!r} is too small", "use e.g. 50, or null for the whole distribution")
    if k.cache and k.top_k is None:
        bad("distill.cache", "a cache keeps the teacher's top-k tokens, but distill.top_k is null",
            "set distill.top_k (e.g. 50), or distill.cache=false to run the teacher on every batch")
    if k.label_weight == 1 and k.confidence == 0:
        bad("distill.label_weight", "1 trains on the labels alone: the teacher would run for nothing",
            "use a weight below 1, or stage: sft")
    if recipe.data.packing is True:
        bad("data.packing", "the distill stage does not pack examples (the teacher's positions are per row)",
            "set data.packing=false (or auto)")


def _check(recipe: Recipe, src: RecipeSource) -> list[Problem]:

    problems: list[Problem] = []

    def bad(key: str, message: str, fix: str) -> None:
        problems.append(Problem(_where(src, key), message, key, fix))

    def at_least(key: str, value: float | None, low: float) -> None:
        if value is not None and math.isfinite(value) and value < low:
            bad(key, f"{value!r} is too small", f"use a value >= {low}")

    # YAML reads .nan and .inf as floats: they pass every range check and fail only once training starts.
    for key, value in _numbers(recipe):
        if not math.isfinite(value):
            bad(key, f"{value!r} is not a finite number", "use a finite number")

    m, a, d, t = recipe.model, recipe.adapter, recipe.data, recipe.train
    for key, value, low in [
        ("model.vocab_size", m.vocab_size, 256), ("adapter.lora.r", a.lora.r, 1),
        ("adapter.lora.alpha", a.lora.alpha, 1e-9), ("adapter.prompt.num_virtual_tokens", a.prompt.num_virtual_tokens, 1),
        ("data.max_length", d.max_length, 8), ("train.batch_size", t.batch_size, 1),
        ("train.grad_accum", t.grad_accum, 1), ("train.lr", t.lr, 1e-12), ("train.max_steps", t.max_steps, 1),
        ("train.log_every", t.log_every, 1), ("train.eval_every", t.eval_every, 1),
        ("train.save_every", t.save_every, 1), ("train.save_total_limit", t.save_total_limit, 1),
        ("train.weight_decay", t.weight_decay, 0), ("train.max_grad_norm", t.max_grad_norm, 0),
        ("adapter.prompt.encoder_hidden_size", a.prompt.encoder_hidden_size, 1),
        ("eval.limit", recipe.eval.limit, 1), ("eval.max_new_tokens", recipe.eval.max_new_tokens, 1),
        ("eval.batch_size", recipe.eval.batch_size, 1), ("eval.worst", recipe.eval.worst, 0),
    ]:
        at_least(key, value, low)
    for name, value in vars(m.architecture).items():
        at_least(f"model.architecture.{name}", value, 1)
    trackers = trackers_of(t.report_to)
    for name in trackers:
        if name not in TRACKERS:
            hint = did_you_mean(name, TRACKERS)
            bad("train.report_to", f"'{name}' is not a tracker adapterkit reports to" + (f" ({hint})" if hint else ""),
                f"use none or any of: {', '.join(TRACKERS)}")
        elif importlib.util.find_spec(TRACKERS[name]) is None:
            bad("train.report_to", f"'{name}' needs the {TRACKERS[name]} package, which is not installed",
                f"pip install {TRACKERS[name]} (or train.report_to=none)")
    if t.kernels in ("liger", "both") and importlib.util.find_spec("liger_kernel") is None:
        bad("train.kernels", f"'{t.kernels}' needs the liger-kernel package, which is not installed",
            'pip install -e ".[gpu]" (or pip install liger-kernel), or train.kernels=adapterkit|auto|off')
    if isinstance(d.clean, CleanConfig):
        c = d.clean
        if c.near_duplicates is not None and not 0 < c.near_duplicates <= 1:
            bad("data.clean.near_duplicates", f"{c.near_duplicates!r} is not a similarity in (0, 1]",
                "use e.g. 0.85, or null to keep near duplicates")
        if not 0 <= c.language_confidence <= 1:
            bad("data.clean.language_confidence", f"{c.language_confidence!r} is out of range", "use a value in [0, 1]")
        if c.min_tokens and c.max_tokens and c.min_tokens > c.max_tokens:
            bad("data.clean.min_tokens", f"{c.min_tokens} is more than data.clean.max_tokens={c.max_tokens}",
                "give a minimum below the maximum")
        for code in unknown_languages(c.languages or []):
            bad("data.clean.languages", f"'{code}' is not a language the detector knows",
                "use ISO 639-1 codes such as en, de, fr, es, zh")
    if d.weights is not None:
        sources = d.train if isinstance(d.train, list) else [d.train]
        if len(d.weights) != len(sources):
            bad("data.weights", f"{len(d.weights)} weights for {len(sources)} data.train source(s)",
                "give one weight per data.train source, e.g. data.train=[a.jsonl, b.jsonl] data.weights=[0.7, 0.3]")
        elif any(not math.isfinite(w) or w < 0 for w in d.weights) or not sum(d.weights) > 0:
            bad("data.weights", f"{d.weights} are not proportions", "use non-negative weights that do not all "
                "sum to 0, e.g. [0.7, 0.3]")
    if not 0 <= a.lora.dropout < 1:
        bad("adapter.lora.dropout", f"{a.lora.dropout!r} is out of range", "use a value in [0, 1)")
    if not 0 <= d.max_dropped <= 1:
        bad("data.max_dropped", f"{d.max_dropped!r} is out of range", "use a fraction in [0, 1], e.g. 0.05")
    if not 0 <= t.warmup_ratio < 1:
        bad("train.warmup_ratio", f"{t.warmup_ratio!r} is out of range", "use a value in [0, 1)")
    if t.max_steps is None and t.epochs <= 0:
        bad("train.epochs", f"{t.epochs!r} must be positive", "set train.epochs > 0 or train.max_steps")

    # Method-specific sections only make sense for their method.
    method = METHODS[a.method]
    owners = {section: [n for n, m in METHODS.items() if section in m.sections]
              for section in ("lora", "quant", "prompt")}
    method_overridden = src.where.get("adapter.method", "").startswith("override")
    for section, methods in owners.items():
        # Switching adapter.method on the command line leaves the file's other-method sections unused;
        # that is the user's intent, not a mistake. Setting both in one place is.
        section_overridden = src.where.get(f"adapter.{section}", "").startswith("override")
        if method_overridden and not section_overridden:
            continue
        if section in src.data.get("adapter", {}) and a.method not in methods:
            bad(f"adapter.{section}", f"is set but adapter.method is '{a.method}'",
                f"remove adapter.{section}, or set adapter.method to one of: {', '.join(methods)}")
    # (Under another family's method the whole prompt section is unused, and reported above if it is a mistake.)
    for option in ("init_text", "encoder_hidden_size"):
        used = "prompt" in method.sections and option in method.prompt_options
        if getattr(a.prompt, option) is not None and "prompt" in method.sections and not used:
            users = " or ".join(n for n, m in METHODS.items() if option in m.prompt_options)
            bad(f"adapter.prompt.{option}", f"only {users} uses it, not '{a.method}'", "remove it")

    if m.init == "scratch" and not method.trains_base:
        bad("adapter.method", f"'{a.method}' needs pretrained weights but model.init is 'scratch'",
            "use adapter.method=full to train a model from scratch")
    if m.init == "scratch" and recipe.stage != "pretrain":
        bad("model.init", "'scratch' only makes sense for stage 'pretrain'", "set stage: pretrain, or model.init=pretrained")
    if recipe.stage == "pretrain" and d.task != "text":
        bad("data.task", f"stage 'pretrain' trains on raw text, not '{d.task}'", "set data.task=text")
    able = ", ".join(n for n, m in METHODS.items() if recipe.stage in m.stages)
    if recipe.stage == "pretrain" and recipe.stage not in method.stages:
        bad("adapter.method", f"'{a.method}' is not a way to pretrain", f"use {able}")
    if d.streaming and recipe.stage != "pretrain":
        bad("data.streaming", f"is for stage 'pretrain', not '{recipe.stage}': the other stages read their data "
            "whole, to check, count and deduplicate every row before training",
            "set data.streaming=false (use `adapterkit data select` or `data clean` to make a large set smaller)")
    elif d.streaming and t.max_steps is None:
        bad("train.max_steps", "is unset, but data.streaming is on: a stream has no length to count epochs in",
            "set train.max_steps, e.g. train.max_steps=10000")
    # The preference stages: their own data, losses and methods.
    pref_task = {"dpo": "preference", "kto": "unpaired"}
    if recipe.stage in pref_task and d.task != pref_task[recipe.stage]:
        bad("data.task", f"stage '{recipe.stage}' trains on '{pref_task[recipe.stage]}' data, not '{d.task}'",
            f"set data.task={pref_task[recipe.stage]}")
    if recipe.stage not in pref_task and d.task in pref_task.values():
        stage = next(k for k, v in pref_task.items() if v == d.task)
        bad("data.task", f"'{d.task}' data is for stage '{stage}', not '{recipe.stage}'", f"set stage: {stage}")
    if recipe.stage in pref_task and recipe.stage not in method.stages:
        bad("adapter.method", f"'{a.method}' is not supported for stage '{recipe.stage}'", f"use {able}")
    losses = {"dpo": DPO_LOSSES, "kto": KTO_LOSSES}.get(recipe.stage, ())
    if recipe.preference.loss is not None and recipe.preference.loss not in losses:
        bad("preference.loss", f"'{recipe.preference.loss}' is not a loss of stage '{recipe.stage}'",
            f"use one of: {', '.join(losses)}" if losses else "remove preference (only stages dpo and kto use it)")
    if not 0 <= recipe.preference.label_smoothing < 0.5:
        bad("preference.label_smoothing", f"{recipe.preference.label_smoothing!r} is out of range",
            "use a value in [0, 0.5)")
    at_least("preference.beta", recipe.preference.beta, 1e-9)
    _check_distill(recipe, src, bad)
    # A run given on the command line replaces the file's model; both given in one place is a mistake.
    named_where = src.where.get("model.name_or_path", "")
    if m.from_run is not None and named_where and (named_where.startswith("override")
                                                   == src.where.get("model.from_run", "").startswith("override")):
        bad("model.from_run", "is set together with model.name_or_path, but the run decides the model",
            "remove model.name_or_path (or model.from_run)")
    if m.from_run is not None and m.init == "scratch":
        bad("model.from_run", "cannot be combined with model.init: scratch", "remove one of them")
    if d.packing is True and not method.can_pack:
        bad("data.packing", f"packing cannot be combined with '{a.method}': virtual tokens are prepended to each "
            "sequence, so packed examples would share one prompt", "set data.packing=false")
    if not method.can_checkpoint and t.gradient_checkpointing is True:
        bad("train.gradient_checkpointing", f"{a.method} fails with gradient checkpointing (the attention mask "
            "is not extended by the virtual tokens)", "set train.gradient_checkpointing=false")
    if m.init == "pretrained" and "model.architecture" in src.where:
        bad("model.architecture", "only used with model.init: scratch", "remove it, or set model.init: scratch")

    task = TASKS[d.task]
    for field_name in d.columns:
        if field_name not in task.fields:
            hint = did_you_mean(field_name, task.fields)
            bad(f"data.columns.{field_name}", f"'{field_name}' is not a field of task '{d.task}'"
                + (f" ({hint})" if hint else ""),
                f"map the task's fields ({', '.join(task.fields)}) to your column names, e.g. "
                f"columns: {{{task.fields[0]}: my_column}}")
    if d.template is not None:
        if task.kind not in ("prompt_completion", "preference", "unpaired"):
            bad("data.template", f"task '{d.task}' has no prompt template", "remove data.template")
        else:
            try:
                placeholders = {f for _, f, _, _ in string.Formatter().parse(d.template) if f}
            except ValueError as e:
                placeholders = set()
                bad("data.template", f"{d.template!r} is not a valid template ({e})",
                    "use {field} placeholders; write {{ and }} for literal braces")
            # The fields a template may not show: what the model is to produce (and a kto row's verdict).
            answers = {"preference": ("chosen", "rejected"), "unpaired": ("completion", "label")}.get(
                task.kind, (task.fields[-1] if task.target is None else task.target,))
            unknown = sorted(placeholders - set(task.fields))
            if unknown:
                bad("data.template", f"unknown placeholder(s) {unknown}",
                    f"use the fields of task '{d.task}': {', '.join(f for f in task.fields if f not in answers)}")
            for target in (f for f in answers if f in placeholders):
                bad("data.template", f"the template must not contain the answer field '{target}'",
                    "the template is the prompt; the completion is appended after it")
    return problems
