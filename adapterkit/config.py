"""The recipe: typed config classes that the YAML mirrors one to one.

A recipe is read from YAML, dotted `key=value` overrides are applied on top, and the result is
checked against these classes. Every problem (unknown key, wrong type, bad value, incompatible
combination) is collected and raised together as one `ConfigError` that names the file and
line or the override, the bad value, what is allowed and a did-you-mean.

Defaults live here and only here; the shipped YAML files set what differs from them.
"""

from __future__ import annotations

import dataclasses
import math
import re
import string
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from adapterkit.errors import ConfigError, Problem, did_you_mean

Stage = Literal["pretrain", "sft", "dpo", "kto"]
Method = Literal["full", "lora", "qlora", "prompt_tuning", "prefix_tuning", "p_tuning"]
Task = Literal["qa", "summarization", "translation", "generation", "sentiment", "text", "chat", "preference",
               "unpaired"]
DType = Literal["auto", "float32", "bfloat16", "float16"]
SOFT_PROMPT_METHODS = ("prompt_tuning", "prefix_tuning", "p_tuning")
# Which adapter sections each method reads; a saved recipe leaves the others out.
SECTION_METHODS = {"lora": ("lora", "qlora"), "quant": ("qlora",), "prompt": SOFT_PROMPT_METHODS}


@dataclass
class ArchitectureConfig:
    """Explicit Llama-style architecture for `model.init: scratch`; unset fields come from `model.size`."""

    hidden_size: int | None = None
    """Width of the residual stream."""
    num_layers: int | None = None
    """Number of transformer blocks."""
    num_heads: int | None = None
    """Attention heads; must divide hidden_size."""
    num_kv_heads: int | None = None
    """Key/value heads (grouped-query attention); must divide num_heads. Defaults to num_heads."""
    intermediate_size: int | None = None
    """Width of the MLP."""
    max_position_embeddings: int | None = None
    """Longest sequence the model is built for."""


@dataclass
class ModelConfig:
    name_or_path: str = "builtin:tiny"
    """Hub id (`Qwen/Qwen2.5-0.5B`), local model directory, or `builtin:tiny`: adapterkit's own small
    base model, pretrained on first use from the `pretrain-tiny` recipe and cached."""
    init: Literal["pretrained", "scratch"] = "pretrained"
    """`pretrained` loads weights from name_or_path; `scratch` builds a new model from `size`/`architecture`."""
    size: Literal["tiny", "small", "base"] = "tiny"
    """Size preset for `init: scratch` (tiny ~2M, small ~30M, base ~110M parameters plus embeddings)."""
    architecture: ArchitectureConfig = field(default_factory=ArchitectureConfig)
    """Per-field overrides of the size preset for `init: scratch`."""
    tokenizer: str | None = None
    """Tokenizer hub id or directory. Unset: the model's own; for `init: scratch`, a byte-level BPE
    tokenizer trained on the training corpus."""
    vocab_size: int = 8192
    """Vocabulary size of a tokenizer trained for `init: scratch`."""
    dtype: DType = "auto"
    """Dtype the weights are loaded in. `auto`: float32 for full fine-tuning and scratch (mixed
    precision keeps master weights in float32), bfloat16 for a frozen base where the device supports it."""
    trust_remote_code: bool = False
    """Run model code shipped with a hub repository. Off unless you trust that repository."""
    from_run: str | None = None
    """Start from an earlier run's output_dir (e.g. an SFT run): its base model and, for LoRA/QLoRA runs,
    its adapter, which keeps training (and, for dpo/kto, is also the frozen reference). Replaces
    name_or_path; a full fine-tuning run's model becomes the base."""


@dataclass
class LoraSettings:
    r: int = 16
    """Rank of the low-rank update."""
    alpha: float = 32.0
    """Scale numerator: the update is scaled by alpha/r (alpha/sqrt(r) with rslora)."""
    dropout: float = 0.05
    """Dropout on the adapter's input."""
    target_modules: str | list[str] = "all-linear"
    """Module names to adapt, or `all-linear` for every linear layer except the output head."""
    dora: bool = False
    """Weight-decomposed LoRA (DoRA): learns a magnitude per output feature as well as a direction."""
    rslora: bool = False
    """Rank-stabilised LoRA: scale by alpha/sqrt(r), which keeps high ranks from learning slower."""


@dataclass
class QuantSettings:
    type: Literal["nf4", "fp4"] = "nf4"
    """4-bit data type of the frozen base (bitsandbytes)."""
    double_quant: bool = True
    """Quantise the quantisation constants too (saves about 0.4 bits per parameter)."""
    compute_dtype: DType = "auto"
    """Dtype the 4-bit weights are dequantised to for matmuls. `auto`: bfloat16 where supported, else float32."""


@dataclass
class PromptSettings:
    num_virtual_tokens: int = 20
    """Number of learned virtual tokens."""
    init_text: str | None = None
    """prompt_tuning only: initialise the virtual tokens from the embeddings of this text."""
    encoder_hidden_size: int | None = None
    """p_tuning only: hidden size of the prompt encoder MLP (default: the model's hidden size)."""


@dataclass
class AdapterConfig:
    method: Method = "lora"
    """What is trained: `full` (every weight), `lora`, `qlora` (LoRA on a 4-bit base), or a soft
    prompt: `prompt_tuning`, `prefix_tuning`, `p_tuning`."""
    lora: LoraSettings = field(default_factory=LoraSettings)
    """Settings for `lora` and `qlora`."""
    quant: QuantSettings = field(default_factory=QuantSettings)
    """Settings of the 4-bit base for `qlora`."""
    prompt: PromptSettings = field(default_factory=PromptSettings)
    """Settings for the soft-prompt methods."""


@dataclass
class DataConfig:
    task: Task = "sentiment"
    """How rows are turned into training text; see the README's table of tasks and fields."""
    train: str | list[str] = "sample:sentiment/train"
    """Training data: local .jsonl/.json/.csv/.parquet/.txt files (.gz too), a datasets hub id,
    or `sample:TASK/train` for the small samples shipped with adapterkit. A list is concatenated."""
    eval: str | list[str] | None = None
    """Held-out data in the same forms; its loss is measured before and after training."""
    train_split: str = "train"
    """Split to read when `train` is a hub id."""
    eval_split: str = "validation"
    """Split to read when `eval` is a hub id."""
    columns: dict[str, str] = field(default_factory=dict)
    """Map from the task's field names to your column names, e.g. `{text: review, label: stars}`."""
    max_length: int = 512
    """Longest example in tokens; see `truncation` for what happens to longer ones."""
    truncation: Literal["input", "end", "drop"] = "input"
    """For examples longer than max_length. `input`: keep the completion whole and shorten the task's long
    input field (qa: context, around the answer where it occurs; summarization: document; translation:
    source; generation: input, then instruction; sentiment: text), marking the cut with "…"; a row is
    dropped only when the completion alone cannot fit. `end`: cut the example at max_length (rows left
    with no supervised token are dropped). `drop`: drop every longer example. Chat and raw text are
    never shortened this way: conversations are cut at the end, raw text is split into chunks.
    Preference pairs (dpo, kto): `input` keeps the end of the prompt (cut from the left, BOS kept) and
    the start of each reply (cut from the right only when a reply would leave the prompt less than half
    of max_length); `end` is trl's own cut (the sequence's end; pairs whose prompt alone fills max_length
    are dropped); `drop` drops every pair that does not fit."""
    packing: bool | Literal["auto"] = "auto"
    """Pack several examples into each sequence of up to max_length tokens: no padding, and attention
    never crosses two examples. `auto`: on, except for soft prompts (which cannot pack)."""
    group_by_length: bool = True
    """Without packing: batch examples of similar length together (batches are drawn at random from
    groups of 50 sorted by length; the longest batch comes first, so a run that runs out of memory
    does so at once), so little of each batch is padding. Off: plain random order."""
    train_on_prompt: bool = False
    """Also compute the loss on prompt tokens, not only on the completion."""
    system_prompt: str | None = None
    """System message for tokenizers with a chat template (and prepended to plain-template prompts)."""
    max_dropped: float = 0.05
    """Largest fraction of training rows that may be dropped (missing or empty field, no supervised
    token within max_length, duplicate) before the run refuses to start."""
    template: str | None = None
    """Plain prompt template overriding the task's, with `{field}` placeholders, e.g. `"Review: {text}\\nLabel:"`."""


@dataclass
class TrainConfig:
    epochs: float = 1.0
    """Passes over the training data; ignored when max_steps is set."""
    max_steps: int | None = None
    """Stop after this many optimizer steps."""
    lr: float = 2e-4
    """Peak learning rate."""
    schedule: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "cosine"
    """Learning-rate schedule after warmup."""
    warmup_ratio: float = 0.03
    """Fraction of the steps spent warming up."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    batch_size: int = 8
    """Examples per micro-batch."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm."""
    seed: int = 42
    """Seed for initialisation, dropout and data order."""
    gradient_checkpointing: bool | Literal["auto"] = "auto"
    """Recompute activations in the backward pass: less memory, about 30% more compute. `auto`: on
    only when the memory plan (`adapterkit plan`) says the run would not fit in the device's free
    memory without it."""
    optimizer: Literal["auto", "adamw", "adamw_8bit", "paged_adamw_8bit"] = "auto"
    """`adamw` (torch's), or bitsandbytes' 8-bit AdamW (`adamw_8bit`; `paged_adamw_8bit` pages its state
    to CPU RAM when the GPU is full; both CUDA only). `auto`: paged 8-bit for qlora on a GPU, else adamw."""
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """Mixed precision. `auto`: bf16 where the GPU or CPU supports it, fp16 on older GPUs, else fp32."""
    log_every: int = 10
    """Print and log loss, learning rate and tokens/s every N steps."""
    eval_every: int | None = None
    """Measure the eval loss every N steps (always before and after training when `data.eval` is set)."""
    save_every: int | None = 200
    """Write a checkpoint every N steps (unset: only the final model)."""
    save_total_limit: int = 2
    """Checkpoints to keep."""


PreferenceLoss = Literal["sigmoid", "ipo", "sigmoid_norm", "hinge", "robust", "kto", "apo_zero_unpaired"]
DPO_LOSSES = ("sigmoid", "ipo", "sigmoid_norm", "hinge", "robust")
KTO_LOSSES = ("kto", "apo_zero_unpaired")


@dataclass
class PreferenceConfig:
    """The preference step (stages dpo and kto), on trl's DPOTrainer and KTOTrainer."""

    loss: PreferenceLoss | None = None
    """dpo: `sigmoid` (standard DPO), `ipo`, `sigmoid_norm` (length-normalised DPO: mean log-ratio per
    token, SimPO-style), `hinge`, `robust`; kto: `kto`, `apo_zero_unpaired`. Unset: sigmoid / kto."""
    beta: float = 0.1
    """How far the policy may move from the reference: higher keeps it closer (IPO: the tau regulariser)."""
    label_smoothing: float = 0.0
    """`robust`: the assumed share of flipped preference labels, in [0, 0.5)."""
    desirable_weight: float = 1.0
    """kto: weight of the desirable (label true) examples' loss."""
    undesirable_weight: float = 1.0
    """kto: weight of the undesirable (label false) examples' loss."""


@dataclass
class EvalConfig:
    """Task evaluation of the starting and the tuned model on `data.eval` (sft runs), and of `adapterkit eval`."""

    limit: int | None = 200
    """Evaluate the first this-many usable eval rows (generation is the slow part on a CPU); null for all."""
    max_new_tokens: int | None = None
    """Generation length. Unset: per task (qa 32, summarization/translation 128, generation/chat 256)."""
    batch_size: int = 8
    worst: int = 10
    """How many worst examples report.md and worst_examples.jsonl show."""


@dataclass
class Recipe:
    stage: Stage = "sft"
    """`pretrain` (causal LM on raw text, every token supervised), `sft` (supervised fine-tuning), `dpo`
    (preference pairs) or `kto` (unpaired desirable/undesirable examples)."""
    description: str = ""
    """One line shown by `adapterkit recipe list`."""
    model: ModelConfig = field(default_factory=ModelConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    preference: PreferenceConfig = field(default_factory=PreferenceConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output_dir: str | None = None
    """Where the run is written. Unset: `runs/<recipe name>`."""


# ---------------------------------------------------------------------------------------------
# Reading YAML with line numbers, and applying overrides


@dataclass
class RecipeSource:
    """The raw mapping of a recipe plus where each dotted key came from (for error messages)."""

    name: str
    path: str
    data: dict[str, Any]
    where: dict[str, str] = field(default_factory=dict)
    command_line: list[str] = field(default_factory=list)


def _key_lines(node: yaml.Node, path: str, prefix: str, out: dict[str, str], problems: list[Problem]) -> None:
    if not isinstance(node, yaml.MappingNode):
        return
    seen: set[str] = set()
    for key_node, value_node in node.value:
        key = str(key_node.value)
        dotted = f"{prefix}{key}"
        if key in seen:
            problems.append(Problem(f"{path}:{key_node.start_mark.line + 1}", "key is set twice", dotted,
                                    "keep one of the two"))
        seen.add(key)
        out[dotted] = f"{path}:{key_node.start_mark.line + 1}"
        _key_lines(value_node, path, dotted + ".", out, problems)


def read_recipe_yaml(text: str, path: str, name: str) -> RecipeSource:
    """Parse recipe YAML, remembering the line of every key."""
    try:
        node = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else path
        raise ConfigError(Problem(where, f"not valid YAML: {getattr(e, 'problem', e)}",
                                  fix="check indentation and quoting on that line")) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(Problem(path, f"a recipe must be a mapping of sections, got {type(data).__name__}",
                                  fix="start from `adapterkit recipe show lora-sentiment`"))
    problems: list[Problem] = []
    where: dict[str, str] = {}
    _key_lines(node, path, "", where, problems)
    if problems:
        raise ConfigError(problems)
    return RecipeSource(name=name, path=path, data=data, where=where)


def apply_overrides(source: RecipeSource, overrides: list[str]) -> None:
    """Apply `a.b.c=value` overrides in place; values follow YAML scalar rules (`1e-4`, `true`, `null`)."""
    problems = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", key):
            problems.append(Problem(f"override '{item}'", "expected KEY=VALUE with a dotted key",
                                    fix="write it like train.max_steps=200 or data.train=reviews.csv"))
            continue
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        if isinstance(value, dict) and (not raw.lstrip().startswith("{")
                                        or (value and all(v is None for v in value.values()))):
            # `Review: {text}` is a sentence with a colon, and `{prompt}` a template placeholder, not a
            # mapping (no setting takes a mapping of empty values)
            value = raw
        node = source.data
        parts = key.split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[parts[-1]] = value
        for i in range(1, len(parts) + 1):
            prefix = ".".join(parts[:i])
            if i == len(parts) or prefix not in source.where:
                source.where[prefix] = f"override '{item}'"
        source.command_line.append(item)
    if problems:
        raise ConfigError(problems)


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
    """Whether the run packs its examples (`data.packing`, with `auto` decided)."""
    if recipe.data.packing == "auto":
        return recipe.adapter.method not in SOFT_PROMPT_METHODS and recipe.stage in ("pretrain", "sft")
    return bool(recipe.data.packing)


# ---------------------------------------------------------------------------------------------
# Typed parsing


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "a mapping"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(tp, str(tp))


_NO = object()


def _coerce(value: Any, tp: Any, key: str, src: RecipeSource, problems: list[Problem]) -> Any:
    """Return `value` converted to `tp`, or _NO (with no problem recorded) if it does not fit."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            out = _coerce(value, arg, key, src, problems)
            if out is not _NO:
                return out
        return _NO
    if tp is type(None):
        return None if value is None else _NO
    if origin is Literal:
        return value if isinstance(value, str) and value in typing.get_args(tp) else _NO
    if tp is bool:
        return value if isinstance(value, bool) else _NO
    if tp is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else _NO
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        # YAML 1.1 reads `2e-4` (no dot) as a string; a careful user still means a number.
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                return _NO
        return _NO
    if tp is str:
        return value if isinstance(value, str) else _NO
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            return _NO
        items = [_coerce(v, item_tp, key, src, problems) for v in value]
        return _NO if any(i is _NO for i in items) else items
    if origin is dict:
        if not isinstance(value, dict):
            return _NO
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
            return _NO
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            return _NO
        return _build(tp, value, key + ".", src, problems)
    raise TypeError(f"unsupported config type {tp!r}")


def _where(src: RecipeSource, key: str) -> str:
    while key:
        if key in src.where:
            return src.where[key]
        key = key.rpartition(".")[0]
    return src.path


def _build(cls: type, data: dict[str, Any], prefix: str, src: RecipeSource, problems: list[Problem]) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            hint = did_you_mean(str(key), names)
            allowed = ", ".join(names)
            problems.append(Problem(_where(src, dotted), f"unknown key '{key}'" + (f" ({hint})" if hint else ""),
                                    dotted, f"use one of: {allowed}"))
            continue
        tp = hints[key]
        out = _coerce(value, tp, dotted, src, problems)
        if out is _NO:
            choices = typing.get_args(tp) if typing.get_origin(tp) is Literal else ()
            hint = did_you_mean(value, choices) if isinstance(value, str) and choices else None
            problems.append(Problem(_where(src, dotted), f"{value!r} is not allowed" + (f" ({hint})" if hint else ""),
                                    dotted, f"expected {_type_name(tp)}"))
            continue
        kwargs[key] = out
    return cls(**kwargs)


# ---------------------------------------------------------------------------------------------
# Rules across fields


def _check(recipe: Recipe, src: RecipeSource) -> list[Problem]:
    from adapterkit.data.tasks import TASKS  # the task table is the one home of field names

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
    if not 0 <= a.lora.dropout < 1:
        bad("adapter.lora.dropout", f"{a.lora.dropout!r} is out of range", "use a value in [0, 1)")
    if not 0 <= d.max_dropped <= 1:
        bad("data.max_dropped", f"{d.max_dropped!r} is out of range", "use a fraction in [0, 1], e.g. 0.05")
    if not 0 <= t.warmup_ratio < 1:
        bad("train.warmup_ratio", f"{t.warmup_ratio!r} is out of range", "use a value in [0, 1)")
    if t.max_steps is None and t.epochs <= 0:
        bad("train.epochs", f"{t.epochs!r} must be positive", "set train.epochs > 0 or train.max_steps")

    # Method-specific sections only make sense for their method.
    owners = SECTION_METHODS
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
    if a.prompt.init_text is not None and a.method in SOFT_PROMPT_METHODS and a.method != "prompt_tuning":
        bad("adapter.prompt.init_text", f"only prompt_tuning uses it, not '{a.method}'", "remove it")
    if a.prompt.encoder_hidden_size is not None and a.method in SOFT_PROMPT_METHODS and a.method != "p_tuning":
        bad("adapter.prompt.encoder_hidden_size", f"only p_tuning uses it, not '{a.method}'", "remove it")

    if m.init == "scratch" and a.method != "full":
        bad("adapter.method", f"'{a.method}' needs pretrained weights but model.init is 'scratch'",
            "use adapter.method=full to train a model from scratch")
    if m.init == "scratch" and recipe.stage != "pretrain":
        bad("model.init", "'scratch' only makes sense for stage 'pretrain'", "set stage: pretrain, or model.init=pretrained")
    if recipe.stage == "pretrain" and d.task != "text":
        bad("data.task", f"stage 'pretrain' trains on raw text, not '{d.task}'", "set data.task=text")
    if recipe.stage == "pretrain" and a.method in SOFT_PROMPT_METHODS:
        bad("adapter.method", f"'{a.method}' is not a way to pretrain", "use full, lora or qlora")
    # The preference stages: their own data, losses and methods.
    pref_task = {"dpo": "preference", "kto": "unpaired"}
    if recipe.stage in pref_task and d.task != pref_task[recipe.stage]:
        bad("data.task", f"stage '{recipe.stage}' trains on '{pref_task[recipe.stage]}' data, not '{d.task}'",
            f"set data.task={pref_task[recipe.stage]}")
    if recipe.stage not in pref_task and d.task in pref_task.values():
        stage = next(k for k, v in pref_task.items() if v == d.task)
        bad("data.task", f"'{d.task}' data is for stage '{stage}', not '{recipe.stage}'", f"set stage: {stage}")
    if recipe.stage in pref_task and a.method in SOFT_PROMPT_METHODS:
        bad("adapter.method", f"'{a.method}' is not supported for stage '{recipe.stage}'", "use lora, qlora or full")
    losses = {"dpo": DPO_LOSSES, "kto": KTO_LOSSES}.get(recipe.stage, ())
    if recipe.preference.loss is not None and recipe.preference.loss not in losses:
        bad("preference.loss", f"'{recipe.preference.loss}' is not a loss of stage '{recipe.stage}'",
            f"use one of: {', '.join(losses)}" if losses else "remove preference (only stages dpo and kto use it)")
    if not 0 <= recipe.preference.label_smoothing < 0.5:
        bad("preference.label_smoothing", f"{recipe.preference.label_smoothing!r} is out of range",
            "use a value in [0, 0.5)")
    at_least("preference.beta", recipe.preference.beta, 1e-9)
    # A run given on the command line replaces the file's model; both given in one place is a mistake.
    named_where = src.where.get("model.name_or_path", "")
    if m.from_run is not None and named_where and (named_where.startswith("override")
                                                   == src.where.get("model.from_run", "").startswith("override")):
        bad("model.from_run", "is set together with model.name_or_path, but the run decides the model",
            "remove model.name_or_path (or model.from_run)")
    if m.from_run is not None and m.init == "scratch":
        bad("model.from_run", "cannot be combined with model.init: scratch", "remove one of them")
    if d.packing is True and a.method in SOFT_PROMPT_METHODS:
        bad("data.packing", f"packing cannot be combined with '{a.method}': virtual tokens are prepended to each "
            "sequence, so packed examples would share one prompt", "set data.packing=false")
    if a.method == "prefix_tuning" and t.gradient_checkpointing is True:
        bad("train.gradient_checkpointing", "prefix_tuning fails with gradient checkpointing (the attention mask "
            "is not extended by the virtual tokens)", "set train.gradient_checkpointing=false")
    if m.init == "pretrained" and "model.architecture" in src.where:
        bad("model.architecture", "only used with model.init: scratch", "remove it, or set model.init: scratch")

    spec = TASKS[d.task]
    for field_name in d.columns:
        if field_name not in spec.fields:
            hint = did_you_mean(field_name, spec.fields)
            bad(f"data.columns.{field_name}", f"'{field_name}' is not a field of task '{d.task}'"
                + (f" ({hint})" if hint else ""),
                f"map the task's fields ({', '.join(spec.fields)}) to your column names, e.g. "
                f"columns: {{{spec.fields[0]}: my_column}}")
    if d.template is not None:
        if spec.kind not in ("prompt_completion", "preference", "unpaired"):
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
                spec.kind, (spec.fields[-1] if spec.target is None else spec.target,))
            unknown = sorted(placeholders - set(spec.fields))
            if unknown:
                bad("data.template", f"unknown placeholder(s) {unknown}",
                    f"use the fields of task '{d.task}': {', '.join(f for f in spec.fields if f not in answers)}")
            for target in (f for f in answers if f in placeholders):
                bad("data.template", f"the template must not contain the answer field '{target}'",
                    "the template is the prompt; the completion is appended after it")
    return problems


def parse_recipe(src: RecipeSource) -> Recipe:
    """Check a raw recipe against the config classes and the cross-field rules; raise all problems at once."""
    problems: list[Problem] = []
    recipe = _build(Recipe, src.data, "", src, problems)
    # Cross-field rules run even when some values were rejected, so that every problem shows at
    # once; a rejected value fell back to its default and is not reported a second time.
    failed = {p.key for p in problems}
    problems += [p for p in _check(recipe, src) if p.key not in failed]
    if problems:
        raise ConfigError(problems, title=f"recipe '{src.name}' ({src.path}) is invalid:")
    if recipe.output_dir is None:
        recipe.output_dir = str(Path("runs") / src.name)
    return recipe


def load_recipe(name_or_path: str, overrides: list[str] | tuple[str, ...] = ()) -> tuple[Recipe, RecipeSource]:
    """Resolve a shipped recipe name or a YAML path, apply overrides, validate. Raises ConfigError."""
    from adapterkit.recipes import find_recipe

    path = find_recipe(name_or_path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise ConfigError(Problem(str(path), "is not a UTF-8 text file", fix="pass a YAML recipe")) from None
    if not any(line.strip() and not line.lstrip().startswith("#") for line in text.splitlines()):
        # An empty file would otherwise train every default (the shipped samples) without a word.
        raise ConfigError(Problem(str(path), "is empty (no key is set)",
                                  fix="start from a shipped recipe: adapterkit recipe show lora-sentiment > "
                                      f"{path.name}"))
    src = read_recipe_yaml(text, str(path), path.stem)
    apply_overrides(src, list(overrides))
    return parse_recipe(src), src


def recipe_to_dict(recipe: Recipe) -> dict[str, Any]:
    """Plain-data form of a recipe (what `--dry-run` prints and the run directory stores)."""
    return dataclasses.asdict(recipe)


def saved_recipe(recipe: Recipe) -> dict[str, Any]:
    """The recipe exactly as the run's recipe.yaml holds it: what resume fingerprints and compares, so
    a changed key is reported by name rather than lost among sections one side leaves out."""
    return yaml.safe_load(dump_recipe(recipe))


def dump_recipe(recipe: Recipe) -> str:
    """The resolved recipe as YAML that `load_recipe` reads back to the same recipe (the run's
    recipe.yaml): sections the method or init does not use are left out, since they would be errors."""
    data = recipe_to_dict(recipe)
    for section, methods in SECTION_METHODS.items():
        if recipe.adapter.method not in methods:
            del data["adapter"][section]
    if recipe.model.init != "scratch":
        del data["model"]["architecture"]
    if recipe.stage not in ("dpo", "kto"):
        del data["preference"]
    if recipe.model.from_run is not None:
        del data["model"]["name_or_path"]  # the run decides the model
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
