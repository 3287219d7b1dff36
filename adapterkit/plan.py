"""Memory plan: the peak memory of a training run, predicted from the model's config alone.

    adapterkit plan lora-sentiment model.name_or_path=Qwen/Qwen2.5-0.5B --gpu-memory 12GiB
    adapterkit plan qlora-qa --model-config llama-2-7b/config.json --gpu-memory 12GiB
    adapterkit plan full-chat model.name_or_path=path/to/model-dir --gpu-memory 24GB --json

Nothing is loaded but a config.json: the model is built on the meta device (shapes, no memory) and
peft wraps it there, so what trains is counted by peft itself. The peak of one training step, as
adapterkit runs it (trl's SFTTrainer), is

    weights + optimizer state + max(forward/backward, optimizer step)
        forward/backward = activations saved for backward
                           + the largest transient: the LM head's loss tiles, or one layer's backward
                           + autocast's half-precision copies of float32 weights
                           (+ the gradients, when grad_accum > 1 keeps them between micro-batches)
        optimizer step   = gradients + the optimizer's temporaries

Activations are counted tensor by tensor from what autograd saves in a Llama-style decoder layer
(RMSNorm, rotary attention through sdpa, gated MLP), for the dtypes each method really runs in;
other decoder architectures are planned with the same formula from their sizes. On a GPU the CUDA
context and the caching allocator's slack come on top, stated separately. The plan is checked
against peaks measured on real training steps by `python benchmarks/memory_plan.py`.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shlex
from dataclasses import dataclass, field
from typing import Any

import torch

from adapterkit import models
from adapterkit.adapters import METHODS
from adapterkit.adapters.lora import lora_config
from adapterkit.adapters.soft_prompt import peft_config
from adapterkit.builtin import BUILTIN, builtin_run_dir
from adapterkit.config import Recipe, load_recipe, packs
from adapterkit.errors import AdapterkitError, ConfigError, Problem
from adapterkit.trained import ADAPTER_CONFIG, locate

KiB, MiB, GiB = 1024, 1024**2, 1024**3
UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
         "kib": KiB, "mib": MiB, "gib": GiB, "tib": 1024**4}

# trl's fused LM head (trl/kernels/chunked_logprob.py) scores the vocabulary in tiles of 4096 tokens
# x 32768 columns, so the (batch, seq, vocab) logits are never built. Its tile buffer is allocated
# 32768 columns wide whatever the vocabulary. Without Triton (on a CPU) each tile is folded with torch
# ops, whose backward keeps 7 float32 tile-sized temporaries and a bool mask alive at once.
HEAD_TOKENS, HEAD_VOCAB = 4096, 32768
HEAD_CPU_BACKWARD_BYTES = 7 * 4 + 1
# What a CUDA process holds besides tensors: the context with PyTorch's kernels and cuBLAS
# workspaces (0.3-1 GiB depending on the GPU and libraries), and the caching allocator's reserved
# but unused blocks (fragmentation), taken as a share of the tensor peak.
CUDA_CONTEXT = GiB // 2
FRAGMENTATION = 0.10
# bitsandbytes 4-bit: two values per byte, an absmax per block of 64; with double quantisation the
# absmax is itself 8-bit, with a float32 scale per 256 absmax values; plus per-matrix constants
# (the 16-value NF4 code, the 256-value absmax code, an offset), in float32.
NF4_BLOCK, DQ_BLOCK, QUANT_CONSTANTS = 64, 256, (16 + 256 + 1) * 4
# bitsandbytes 8-bit optimizers keep tensors under 4096 values in 32-bit states.
BNB_MIN_8BIT = 4096


@dataclass(frozen=True)
class OptimizerSpec:
    name: str
    state_bytes: float
    """Bytes of state per trainable parameter (for tensors of at least BNB_MIN_8BIT values)."""
    pageable: bool
    """State lives in CUDA unified memory and pages out to CPU RAM instead of running out."""
    what: str


OPTIMIZERS: dict[str, OptimizerSpec] = {
    "adamw": OptimizerSpec("adamw", 8, False, "AdamW (the Trainer's): 2 float32 states per trainable parameter"),
    "adamw_8bit": OptimizerSpec("adamw_8bit", 2 + 2 * 4 / 256, False,
                                "bitsandbytes 8-bit AdamW: 2 uint8 states + a float32 scale per 256 values"),
    "paged_adamw_8bit": OptimizerSpec("paged_adamw_8bit", 2 + 2 * 4 / 256, True,
                                      "bitsandbytes paged 8-bit AdamW: in unified memory, pages out to CPU RAM "
                                      "when the GPU is full (not counted in the GPU peak)"),
}


def optimizer_of(train: Any, method: str, device: str) -> str:
    """The optimizer a run uses: `train.optimizer`, with `auto` resolved as training resolves it."""
    return models.resolve_optimizer(train.optimizer, method, device)


def parse_memory(text: str, where: str = "--gpu-memory") -> int:
    """Bytes in '12GiB', '12GB', '12000MiB', '11.5 GiB' (GB = 10^9, GiB = 2^30)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]+)\s*", text or "")
    unit = UNITS.get(m.group(2).lower()) if m else None
    if m is None or unit is None or float(m.group(1)) <= 0:
        raise ConfigError(Problem(where, f"{text!r} is not an amount of memory",
                                  fix="write a number and a unit, e.g. 12GiB, 24GB or 12000MiB"))
    return int(float(m.group(1)) * unit)


def human(n: float) -> str:
    """Bytes as GiB (or MiB below 1 GiB), e.g. '11.73 GiB'."""
    return f"{n / GiB:.2f} GiB" if abs(n) >= GiB else f"{n / MiB:.1f} MiB"


# ---------------------------------------------------------------------------------------------
# What the plan reads from a model: sizes from its config, and shapes from the model built on the
# meta device (and wrapped by peft there), which costs no memory and loads no weights.


@dataclass(frozen=True)
class Architecture:
    """The sizes of a decoder-only causal LM that its memory depends on."""

    name: str
    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    parameters: int
    """Every parameter, tied ones once."""
    decoder_linear: int
    """Parameters of the linear layers inside the decoder blocks (what autocast copies to half precision)."""
    quantized: int
    """Parameters in the linear layers bitsandbytes quantises (all but the output head)."""
    quantized_matrices: int
    largest_linear: int
    """Values in the largest decoder linear weight (a 4-bit one is dequantised whole for each matmul)."""


@dataclass(frozen=True)
class Trainable:
    """What trains for one adapter setting, as peft wraps the model."""

    tensors: tuple[int, ...]
    """Values in each trainable tensor."""
    adapted: tuple[tuple[int, int, int], ...] = ()
    """LoRA: (in_features, out_features, r) of each adapted layer."""
    what: str = ""

    @property
    def count(self) -> int:
        return sum(self.tensors)


def _meta_model(config: Any, trust_remote_code: bool) -> Any:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


def _kv_heads(text: Any, heads: int) -> int:
    """Key/value heads: GQA configs name them; multi-query Falcon (Falcon-7B) caches one."""
    if getattr(text, "multi_query", False) and not getattr(text, "new_decoder_architecture", False):
        return 1
    for name in ("num_key_value_heads", "num_kv_heads"):
        if getattr(text, name, None) is not None:
            return int(getattr(text, name))
    return heads


def _is_linear(module: Any) -> bool:
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, (torch.nn.Linear, Conv1D))


def _quantizable(module: Any) -> bool:
    from transformers.pytorch_utils import Conv1D

    return type(module) is torch.nn.Linear or isinstance(module, Conv1D)


def architecture(config: Any, trust_remote_code: bool = False, name: str = "") -> Architecture:
    """Sizes from the config, and parameter counts from the model built on the meta device."""
    from transformers.quantizers.base import get_keys_to_not_convert
    from transformers.quantizers.quantizers_utils import should_convert_module

    text = config.get_text_config() if hasattr(config, "get_text_config") else config

    def size(*names: str, default: int | None = None) -> int:
        for n in names:
            if getattr(text, n, None) is not None:
                return int(getattr(text, n))
        if default is None:
            raise AdapterkitError(Problem("model config", f"has none of {', '.join(names)}",
                                          fix="pass the config.json of a decoder-only causal language model"))
        return default

    hidden = size("hidden_size", "n_embd", "d_model")
    heads = size("num_attention_heads", "n_head")
    model = _meta_model(config, trust_remote_code)
    # Which linear layers bitsandbytes would quantise: transformers' own rule (the output head, tied
    # weights and the model's keep-in-fp32 modules stay as they are).
    keep = get_keys_to_not_convert(model) + list(getattr(model, "_keep_in_fp32_modules", None) or [])
    out_head = model.get_output_embeddings()
    linears = [(n, m) for n, m in model.named_modules() if _is_linear(m) and m is not out_head]
    # transformers' bitsandbytes integration (replace_with_bnb_linear) replaces exactly `nn.Linear`
    # (not subclasses such as Falcon's FalconLinear) and GPT-2's Conv1D.
    quantized = [m.weight.numel() for n, m in linears if _quantizable(m) and should_convert_module(n, keep)]
    return Architecture(
        name=name or getattr(config, "_name_or_path", "") or type(config).__name__,
        vocab=size("vocab_size"), hidden=hidden, layers=size("num_hidden_layers", "n_layer"), heads=heads,
        kv_heads=_kv_heads(text, heads), head_dim=size("head_dim", default=hidden // heads),
        intermediate=size("intermediate_size", "n_inner", "ffn_dim", "ffn_hidden_size", default=4 * hidden),
        parameters=sum(p.numel() for p in model.parameters()),
        decoder_linear=sum(m.weight.numel() for _, m in linears),
        quantized=sum(quantized), quantized_matrices=len(quantized),
        largest_linear=max((m.weight.numel() for _, m in linears), default=0),
    )


def trainable(config: Any, adapter: Any, trust_remote_code: bool = False) -> Trainable:
    """What trains for `adapter` (an AdapterConfig): peft wraps the meta-device model and counts."""
    method = METHODS[adapter.method]
    model = _meta_model(config, trust_remote_code)
    if method.family == "full":
        return Trainable(tuple(p.numel() for p in model.parameters()), what="every weight")
    from peft import get_peft_model

    if method.family == "lora":
        from peft.tuners.lora import LoraLayer

        model = get_peft_model(model, lora_config(adapter.lora))
        adapted = tuple((m.in_features, m.out_features, m.r["default"]) for m in model.modules()
                        if isinstance(m, LoraLayer))
        what = f"LoRA r{adapter.lora.r} on {len(adapted)} modules" + (" + DoRA magnitudes" if adapter.lora.dora else "")
    else:
        # A text-initialised prompt has the same shape as a random one; the tokenizer is not needed here.
        shaped = dataclasses.replace(adapter, prompt=dataclasses.replace(adapter.prompt, init_text=None))
        model = get_peft_model(model, peft_config(shaped, None, config))
        adapted = ()
        what = f"{adapter.prompt.num_virtual_tokens} virtual tokens ({adapter.method})"
    return Trainable(tuple(p.numel() for p in model.parameters() if p.requires_grad), adapted, what)


class _Vocab:
    """Stands in for a tokenizer of `n` tokens where only its size matters (a scratch model's config)."""

    bos_token_id = eos_token_id = 0
    pad_token_id = 1

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n


def _read_config(path: str, where: str, trust_remote_code: bool) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise AdapterkitError(Problem(where, f"could not read a model config from '{path}': {first}",
                                      fix="pass a config.json of a transformers model (or the directory holding it)")
                              ) from None


def model_config(recipe: Recipe, config_path: str | None = None) -> tuple[Any, str]:
    """(config, what it is) for the recipe's model, reading nothing but a config.json: never weights,
    and never building `builtin:` bases. `config_path` (a config.json or a directory) replaces the
    recipe's model, e.g. to plan a hub model offline."""
    m = recipe.model
    if config_path is not None:
        return _read_config(config_path, "--model-config", m.trust_remote_code), config_path
    if m.init == "scratch":
        size = len(models.load_tokenizer(m, m.tokenizer)) if m.tokenizer else m.vocab_size
        return models.scratch_config(m, _Vocab(size)), f"scratch {m.size}"
    name = m.name_or_path
    if m.from_run is not None:
        _, model_dir = locate(m.from_run)
        if not (model_dir / "config.json").is_file():
            name = json.loads((model_dir / ADAPTER_CONFIG).read_text())["base_model_name_or_path"]
        else:
            name = str(model_dir)
    if name.startswith("builtin:"):
        built = builtin_run_dir(name.removeprefix("builtin:")) / "model" / "config.json"
        if built.is_file():
            return _read_config(str(built), "model.name_or_path", False), name
        builtin_recipe, _ = load_recipe(BUILTIN[name.removeprefix("builtin:")])
        return models.scratch_config(builtin_recipe.model, _Vocab(builtin_recipe.model.vocab_size)), name
    source = models.model_source(dataclasses.replace(m, name_or_path=name, from_run=None))
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(source, trust_remote_code=m.trust_remote_code), name
    except (OSError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise AdapterkitError(Problem("model.name_or_path", f"could not read the config of '{name}': {first}",
                                      fix="without network, pass its config.json: --model-config path/to/config.json "
                                          "(or set model.name_or_path to a local directory holding it)")) from None


@dataclass
class ModelFacts:
    """A model's architecture, and what trains under each adapter setting (computed once, then cached)."""

    config: Any
    arch: Architecture
    trust_remote_code: bool = False
    _trainable: dict[str, Trainable] = field(default_factory=dict)

    @classmethod
    def of(cls, config: Any, name: str = "", trust_remote_code: bool = False) -> ModelFacts:
        return cls(config, architecture(config, trust_remote_code, name), trust_remote_code)

    def trainable(self, adapter: Any) -> Trainable:
        # LoRA and QLoRA train the same adapters; each family reads only its own settings.
        family = METHODS[adapter.method].family
        settings = {"full": None, "lora": adapter.lora, "soft_prompt": adapter.prompt}[family]
        key = json.dumps([family if family != "soft_prompt" else adapter.method,
                          dataclasses.asdict(settings) if settings else None], sort_keys=True, default=str)
        if key not in self._trainable:
            self._trainable[key] = trainable(self.config, adapter, self.trust_remote_code)
        return self._trainable[key]


# ---------------------------------------------------------------------------------------------
# The plan


@dataclass
class MemoryPlan:
    """Predicted peak memory of one training step, in bytes, and what it is made of."""

    setting: dict[str, Any]
    """What was planned: model, method, device, precision, micro-batch, sequence length, grad_accum,
    checkpointing, optimizer."""
    parameters: int
    trainable: int
    trainable_what: str
    weights: dict[str, int]
    """Weight bytes by kind: the base in its dtype (or 4-bit), its un-quantised parts, the trainable part."""
    gradients: int
    optimizer_state: int
    optimizer_pageable: bool
    activations: int
    """Saved for backward with the recipe's checkpointing setting."""
    activations_checkpointed: int
    activations_not_checkpointed: int
    lm_head: int
    """The LM head's logits and loss buffers (trl's fused head: tiles, never the whole logits)."""
    layer_backward: int
    """One decoder layer's backward: its gradient temporaries (and recomputed activations, with checkpointing)."""
    autocast_copies: int
    step_temporaries: int
    forward_backward: int
    optimizer_step: int
    peak: int
    """Tensor memory at the peak."""
    phase: str
    overhead: dict[str, int]
    """GPU only: CUDA context and allocator fragmentation."""
    total: int
    notes: list[str] = field(default_factory=list)

    @property
    def weights_total(self) -> int:
        return sum(self.weights.values())

    def fits(self, budget: int) -> bool:
        return self.total <= budget

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"weights_total": self.weights_total}


@dataclass(frozen=True)
class _Dtypes:
    """Bytes per value of what one configuration computes in."""

    compute: int
    """Matmuls and attention (autocast's half type, or float32)."""
    autocast: bool
    base: int
    """Frozen (or fully trained) base weights as loaded."""
    stream: int
    """The residual stream: the dtype of the embeddings as trained."""
    linear_out: int
    """Outputs of the base's linear layers (and so the MLP's intermediates)."""
    norm_out: int
    """RMSNorm outputs: weight dtype x stream dtype."""


def _dtype_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def plan(recipe: Recipe, facts: ModelFacts, device: str = "cuda", padded: bool | None = None) -> MemoryPlan:
    """The memory plan of `recipe` on a `cuda` GPU or the `cpu`, from the model's facts alone.

    `padded`: whether attention takes a mask (padding, or packed examples kept apart); by default it
    does unless the recipe pretrains on wrapped blocks."""
    a, t, arch = recipe.adapter, recipe.train, facts.arch
    method = METHODS[a.method]
    problems = models.model_problems(recipe, facts.config, arch.quantized_matrices)
    if problems:
        raise ConfigError(problems)
    if device == "cuda":
        precision = "bf16" if t.precision == "auto" else t.precision
    else:
        precision = models.resolve_precision(t.precision, torch.device("cpu"), arch.parameters)
    autocast = precision in ("bf16", "fp16")
    base_dtype = models.resolve_dtype(recipe.model.dtype, method.trains_base, precision)
    base = _dtype_bytes(base_dtype)
    compute = 2 if autocast else 4
    # peft's prepare_model_for_kbit_training upcasts everything QLoRA leaves un-quantised (embeddings,
    # head, norms) to float32, so the residual stream and the 4-bit layers' outputs are float32.
    stream = 4 if method.quantized_base else base
    d = _Dtypes(compute=compute, autocast=autocast, base=base, stream=stream,
                linear_out=4 if method.quantized_base else (compute if autocast else base), norm_out=stream)
    train = facts.trainable(a)
    full = method.family == "full"
    notes: list[str] = []

    # Tokens per micro-batch. Preference stages score two sequences per example (chosen and rejected,
    # or the completion and its KL counterpart); soft prompts lengthen every sequence.
    seqs = t.batch_size * (2 if recipe.stage in ("dpo", "kto") else 1)
    seq = recipe.data.max_length + METHODS[a.method].virtual_tokens(a)
    tokens = seqs * seq
    if recipe.stage in ("dpo", "kto"):
        notes.append(f"stage {recipe.stage}: planned as 2 sequences per example with the sft formula (not measured)")

    # Weights, by kind.
    weights: dict[str, int] = {}
    if full:
        weights[f"{_dtype_name(base_dtype)} (every weight trains)"] = arch.parameters * base
    elif method.quantized_base:
        q = arch.quantized
        absmax = (q // NF4_BLOCK + q // (NF4_BLOCK * DQ_BLOCK) * 4) if a.quant.double_quant else q // NF4_BLOCK * 4
        weights[f"{a.quant.type} 4-bit base ({arch.quantized_matrices} matrices)"] = q // 2
        weights["4-bit absmax" + (" (double-quantised)" if a.quant.double_quant else "") + " and codes"] = (
            absmax + arch.quantized_matrices * QUANT_CONSTANTS)
        weights["float32 embeddings, head, norms (not 4-bit)"] = (arch.parameters - q) * 4
    else:
        weights[f"{_dtype_name(base_dtype)} base (frozen)"] = arch.parameters * base
    if not full:
        weights["float32 trainable"] = train.count * 4

    # Gradients and optimizer state, for the trainable parameters (float32: adapterkit keeps every
    # trainable weight in float32, and a fully trained base is loaded in float32).
    grad_bytes = base if full else 4
    gradients = train.count * grad_bytes
    opt = OPTIMIZERS[optimizer_of(t, a.method, device)]
    if opt.name != "adamw" and device == "cpu":
        notes.append(f"{opt.name} is a CUDA optimizer; planned with its GPU sizes")
    if opt.name == "adamw":
        optimizer_state = 2 * gradients  # two states in the parameters' dtype
    else:
        optimizer_state = int(sum(n * (8 if n < BNB_MIN_8BIT else opt.state_bytes) for n in train.tensors))

    # Activations saved for backward, per token.
    if padded is None:
        # A mask reaches attention unless every row is one full sequence: pretraining's wrapped blocks.
        # Packed SFT rows carry a block mask that keeps their examples apart (transformers builds it
        # from the position ids), which costs attention what a padding mask does.
        padded = not (packs(recipe) and recipe.stage == "pretrain")
    per_layer = _layer_activations(arch, d, full, seq, padded)
    adapter_terms = _adapter_activations(train, d, a, device)  # all layers together
    outside = _outside_layers(arch, d, full)
    mask_once = seqs * seq * seq if padded else 0  # transformers' bool (batch, 1, seq, seq) mask, shared
    saved_plain = tokens * (arch.layers * per_layer + adapter_terms + outside) + mask_once
    saved_ckpt = tokens * (arch.layers * d.stream * arch.hidden + outside) + mask_once
    checkpointing = t.gradient_checkpointing is True and METHODS[a.method].can_checkpoint
    activations = saved_ckpt if checkpointing else saved_plain

    # The largest transient on top of the saved activations.
    lm_head = _lm_head(arch, d, tokens - seqs, device, head_weight=4 if method.quantized_base else base)
    # A layer's backward holds an MLP-wide gradient and two float32 hidden-wide ones at a time (measured:
    # the saved activations free as fast as the gradients appear); with checkpointing it first recomputes
    # the layer's activations.
    layer_bwd = tokens * (d.linear_out * arch.intermediate + 2 * 4 * arch.hidden)
    if method.quantized_base:
        layer_bwd += arch.largest_linear * d.compute  # a 4-bit weight dequantised for its matmul
    if "lora" in METHODS[a.method].sections and a.lora.dora:
        # DoRA materialises W + BA of a layer to take its norm (float32), in forward and backward.
        layer_bwd += 3 * 4 * arch.largest_linear
    if checkpointing:
        layer_bwd += tokens * (per_layer + adapter_terms / max(arch.layers, 1))
    autocast_copies = 0
    if autocast:
        # Autocast casts float32 weights to the half type once per forward and autograd keeps the
        # copies for backward: every decoder linear when they are float32, else only the adapters.
        copied = arch.decoder_linear if (base == 4 and not method.quantized_base) else 0
        autocast_copies = (copied + (0 if full else train.count)) * d.compute
    # trl's head builds a trained head's gradient in float32 in its first backward op (with grad_accum > 1
    # as a temporary added to the gradient kept from the earlier micro-batches of the step).
    head_grad = arch.vocab * arch.hidden * 4 if full else 0
    kept_gradients = gradients if t.grad_accum > 1 else 0
    if checkpointing:
        # Checkpointed layers keep no autocast copies for backward: they go when the forward ends.
        transient = max(lm_head + head_grad, layer_bwd, autocast_copies)
    else:
        transient = autocast_copies + max(lm_head + head_grad, layer_bwd)
    forward_backward = activations + transient + kept_gradients

    # The optimizer step: gradients, plus the optimizer's temporaries. transformers' default AdamW is
    # torch's fused one from torch 2.8 on, which updates in place; before, a GPU ran the foreach one (a
    # temporary per state value, all at once) and a CPU the one-tensor-at-a-time loop (two temporaries).
    if opt.name != "adamw" or _fused_adamw():
        step_temporaries = 0
    elif device == "cuda":
        step_temporaries = gradients
    else:
        step_temporaries = 2 * grad_bytes * max(train.tensors, default=0)
    optimizer_step = gradients + step_temporaries

    resident_state = 0 if (opt.pageable and device == "cuda") else optimizer_state
    weights_total = sum(weights.values())
    peak = weights_total + resident_state + max(forward_backward, optimizer_step)
    phase = "forward/backward" if forward_backward >= optimizer_step else "optimizer step"
    overhead = {}
    if device == "cuda":
        overhead = {"CUDA context": CUDA_CONTEXT, "allocator fragmentation (10%)": int(peak * FRAGMENTATION)}
    if device == "cuda" and t.precision == "auto":
        notes.append("precision auto is planned as bf16 (Ampere or newer); set train.precision=fp16 for older GPUs")
    if packs(recipe):
        notes.append("data.packing: planned as micro-batches of full max_length rows")

    setting = dict(model=arch.name, method=a.method, device=device, precision=precision,
                   batch_size=t.batch_size, seq_len=seq, grad_accum=t.grad_accum,
                   gradient_checkpointing=checkpointing, optimizer=opt.name)
    return MemoryPlan(
        setting=setting, parameters=arch.parameters, trainable=train.count, trainable_what=train.what,
        weights=weights, gradients=gradients, optimizer_state=optimizer_state, optimizer_pageable=opt.pageable,
        activations=activations, activations_checkpointed=saved_ckpt, activations_not_checkpointed=saved_plain,
        lm_head=lm_head, layer_backward=layer_bwd, autocast_copies=autocast_copies,
        step_temporaries=step_temporaries, forward_backward=forward_backward, optimizer_step=optimizer_step,
        peak=peak, phase=phase, overhead=overhead, total=peak + sum(overhead.values()), notes=notes)


def _fused_adamw() -> bool:
    """Whether the Trainer's default optimizer is torch's fused AdamW (`adamw_torch_fused`)."""
    from transformers import TrainingArguments

    return "fused" in str(TrainingArguments.optim)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _layer_activations(arch: Architecture, d: _Dtypes, full: bool, seq: int, padded: bool) -> float:
    """Bytes per token that one Llama-style decoder layer saves for backward (adapters not included)."""
    h, inter = arch.hidden, arch.intermediate
    q = arch.heads * arch.head_dim
    kv = arch.kv_heads * arch.head_dim
    if padded:
        # With a padding mask, transformers repeats grouped key/value heads for sdpa (no enable_gqa),
        # and sdpa turns the bool mask into one of its own in the attention dtype, in every layer.
        kv = q
    mask = seq * d.compute if padded else 0
    # RMSNorm: the float32 copy of its input and 1/rms; and its normalised input when its weight trains.
    norms = 2 * (4 * h + 4 + (d.norm_out * h if full else 0))
    # sdpa (flash / memory-efficient kernels, on CPU too): q, k, v, output, log-sum-exp; rotary cos/sin are
    # per position and small.
    attention = d.compute * (2 * q + 2 * kv) + 4 * arch.heads + mask
    # Gated MLP: SiLU saves its input, the product saves both factors.
    mlp = 3 * d.linear_out * inter
    linear_inputs = 0
    if full:
        # Trained linear layers save their input. Under autocast each layer casts the float32 norm output
        # itself (q, k, v: three copies; gate, up: two); o_proj's input is sdpa's saved output.
        casts = d.autocast and d.norm_out != d.compute
        linear_inputs = ((3 + 2) * d.compute * h if casts else 2 * d.norm_out * h) + d.linear_out * inter
    return norms + attention + mlp + linear_inputs


def _adapter_activations(train: Trainable, d: _Dtypes, adapter: Any, device: str) -> float:
    """Bytes per token the LoRA (DoRA) branches of all layers save: the dropout mask, lora_A's input
    (peft casts the input to the adapter's float32, autocast casts it back), lora_A's output."""
    if not train.adapted:
        return 0
    dropout = adapter.lora.dropout > 0
    # On a GPU dropout keeps a bool mask; on a CPU a float32 mask the size of its input.
    mask = (1 if device == "cuda" else 4) if dropout else 0
    branch_in = d.compute if d.autocast else 4
    total = sum((mask + branch_in) * f_in + branch_in * r for f_in, f_out, r in train.adapted)
    if adapter.lora.dora:
        total += sum(2 * d.linear_out * f_out for f_in, f_out, r in train.adapted)  # base and LoRA results
    return total


def _outside_layers(arch: Architecture, d: _Dtypes, full: bool) -> float:
    """Bytes per token saved outside the decoder layers: the final norm, and the LM head's input copy
    with its per-token log-sum-exp, entropy, target and mask."""
    final_norm = 4 * arch.hidden + 4 + (d.norm_out * arch.hidden if full else 0)
    head = d.stream * arch.hidden + 8 + 4 + 4 + 2
    return final_norm + head + (8 if full else 0)  # a trained embedding keeps the token ids


def _lm_head(arch: Architecture, d: _Dtypes, positions: int, device: str, head_weight: int) -> int:
    """trl's fused head in backward: its tile buffer, the float32 fold temporaries (CPU), the float32
    gradient of the hidden states, and a compute-dtype copy of a chunk of the head weight when the
    weight is in another dtype (on a CPU also a float32 one of a half-precision chunk)."""
    rows, cols = min(positions, HEAD_TOKENS), min(arch.vocab, HEAD_VOCAB)
    tile = rows * HEAD_VOCAB * d.compute
    folds = rows * cols * HEAD_CPU_BACKWARD_BYTES if device == "cpu" else 0
    grad_hidden = positions * arch.hidden * 4
    chunk_copies = cols * arch.hidden * (d.compute if head_weight != d.compute else 0)
    if device == "cpu" and d.compute != 4:
        chunk_copies += cols * arch.hidden * 4
    return tile + folds + grad_hidden + chunk_copies


# ---------------------------------------------------------------------------------------------
# When it does not fit: the nearest configuration that does


@dataclass
class Suggestion:
    overrides: dict[str, str]
    """The settings changed, as override key -> value."""
    command: str
    plan: MemoryPlan
    note: str = ""


def _divisors_below(n: int) -> list[int]:
    return [b for b in range(n - 1, 0, -1) if n % b == 0]


def candidates(recipe: Recipe, device: str) -> list[dict[str, str]]:
    """Nearby settings, nearest first: gradient checkpointing, then smaller micro-batches with more
    accumulation (the same effective batch), then an 8-bit / paged 8-bit optimizer, then LoRA instead
    of full fine-tuning, then QLoRA instead of LoRA."""
    a, t = recipe.adapter, recipe.train
    methods = [a.method, *METHODS[a.method].lighter]
    current = optimizer_of(t, a.method, device)
    optimizers = [current]
    if device == "cuda" and current == "adamw":
        optimizers += ["adamw_8bit", "paged_adamw_8bit"]
    can_checkpoint = METHODS[a.method].can_checkpoint
    t = dataclasses.replace(t, gradient_checkpointing=t.gradient_checkpointing is True)  # auto plans as off
    out = []
    for method in methods:
        for opt in optimizers:
            level = {}
            if method != a.method:
                level["adapter.method"] = method
            if opt != current:
                level["train.optimizer"] = opt
            shapes = [(t.gradient_checkpointing, t.batch_size)]
            if can_checkpoint and not t.gradient_checkpointing:
                shapes.append((True, t.batch_size))
            shapes += [(t.gradient_checkpointing or can_checkpoint, b) for b in _divisors_below(t.batch_size)]
            for ckpt, batch in shapes:
                moves = dict(level)
                if ckpt != t.gradient_checkpointing:
                    moves["train.gradient_checkpointing"] = "true"
                if batch != t.batch_size:
                    moves["train.batch_size"] = str(batch)
                    moves["train.grad_accum"] = str(t.grad_accum * t.batch_size // batch)
                if moves:
                    out.append(moves)
    return out


def nearest_fit(name: str, overrides: list[str], facts: ModelFacts, budget: int, device: str = "cuda",
                config_path: str | None = None) -> Suggestion | None:
    """The first of `candidates` whose own plan fits in `budget`, as a runnable command line.

    `config_path`: the --model-config that was planned instead of the recipe's model."""
    recipe, _ = load_recipe(name, overrides)
    note = ""
    if config_path and not any(o.startswith("model.name_or_path=") for o in overrides):
        note = (f"the plan is for the model of {config_path}: add model.name_or_path= that model (a hub id or "
                "its directory) to the command")
    for moves in candidates(recipe, device):
        kept = [o for o in overrides if o.partition("=")[0].strip() not in moves]
        new = kept + [f"{k}={v}" for k, v in moves.items()]
        try:
            candidate, _ = load_recipe(name, new)
        except ConfigError:
            continue  # a combination the recipe's own rules refuse
        p = plan(candidate, facts, device)
        if p.fits(budget):
            command = "adapterkit recipe run " + " ".join(shlex.quote(x) for x in [name, *new])
            return Suggestion(moves, command, p, note)
    return None


# ---------------------------------------------------------------------------------------------
# train.gradient_checkpointing: auto

# What a CPU training process holds beyond the planned tensors (mostly glibc's heap keeping the holes
# freed activations leave), as a share of the tensor peak. Measured with benchmarks/throughput.py at
# 100M parameters, 8 x 512 tokens, without checkpointing: peak resident memory 1.51x (LoRA) and 1.62x
# (QLoRA) the planned tensor peak.
CPU_SLACK = 0.6


def with_checkpointing(recipe: Recipe, on: bool) -> Recipe:
    return dataclasses.replace(recipe, train=dataclasses.replace(recipe.train, gradient_checkpointing=on))


def auto_checkpointing(recipe: Recipe, facts: ModelFacts, device: str, budget: int) -> tuple[bool, str]:
    """Whether `train.gradient_checkpointing: auto` turns checkpointing on, given `budget` bytes of free
    memory: only when the plan without it does not fit (and the method can checkpoint). The reason
    comes second, for the log."""
    if not METHODS[recipe.adapter.method].can_checkpoint:
        return False, f"off ({recipe.adapter.method} cannot checkpoint)"
    slack = 1 + (CPU_SLACK if device == "cpu" else 0)
    without = int(plan(with_checkpointing(recipe, False), facts, device).total * slack)
    if without <= budget:
        return False, f"off (the run needs about {human(without)} without it; {human(budget)} is free)"
    with_ = int(plan(with_checkpointing(recipe, True), facts, device).total * slack)
    verdict = "" if with_ <= budget else "; it may still not fit: `adapterkit plan --gpu-memory` proposes what does"
    return True, (f"on (the run needs about {human(without)} without it and {human(with_)} with it; "
                  f"{human(budget)} is free{verdict})")


def free_memory(dev: torch.device, processes: int = 1) -> int:
    """Bytes this process can use: the GPU's free memory, or its share of the machine's available RAM
    (`processes` training processes share it)."""
    if dev.type == "cuda":
        return torch.cuda.mem_get_info(dev)[0]
    import psutil

    return psutil.virtual_memory().available // max(processes, 1)


def resolve_checkpointing(recipe: Recipe, config: Any, model_name: str, dev: torch.device,
                          processes: int = 1) -> tuple[bool, str]:
    """Whether the run checkpoints: `train.gradient_checkpointing` as set, or `auto` decided for this
    device; and the reason ("" when it was not auto)."""
    if recipe.train.gradient_checkpointing != "auto":
        return recipe.train.gradient_checkpointing is True, ""
    budget = free_memory(dev, processes)
    facts = ModelFacts.of(config, model_name, recipe.model.trust_remote_code)
    return auto_checkpointing(recipe, facts, "cuda" if dev.type == "cuda" else "cpu", budget)


# ---------------------------------------------------------------------------------------------
# Output


def render(p: MemoryPlan, budget: int | None = None, suggestion: Suggestion | None = None,
           recipe_name: str = "") -> str:
    """The plan as a readable table."""
    s = p.setting
    where = "a GPU" if s["device"] == "cuda" else "this CPU"
    lines = [
        f"memory plan{' for ' + recipe_name if recipe_name else ''}: {s['method']} on {s['model']} "
        f"({p.parameters / 1e6:,.1f}M parameters), on {where}, {s['precision']}",
        f"  micro-batch {s['batch_size']} x {s['seq_len']} tokens, grad_accum {s['grad_accum']}, gradient "
        f"checkpointing {'on' if s['gradient_checkpointing'] else 'off'}, optimizer {s['optimizer']}",
        "",
    ]

    def row(label: str, n: float, note: str = "", indent: int = 2) -> None:
        lines.append(f"{' ' * indent}{label:<{48 - indent}}{human(n):>12}  {note}".rstrip())

    row("weights", p.weights_total)
    for label, n in p.weights.items():
        row(label, n, indent=4)
    row("trainable parameters", p.trainable * 4, f"{p.trainable:,} ({p.trainable_what}), in the weights above"
        if not METHODS[s["method"]].trains_base else f"{p.trainable:,} (every weight), in the weights above")
    row("gradients", p.gradients, "one per trainable parameter")
    opt = OPTIMIZERS[s["optimizer"]]
    row("optimizer state", p.optimizer_state, opt.what)
    ckpt = s["gradient_checkpointing"]
    row("activations", p.activations,
        f"saved for backward; {'without' if ckpt else 'with'} gradient checkpointing: "
        f"{human(p.activations_not_checkpointed if ckpt else p.activations_checkpointed)}")
    row("logits and loss buffers", p.lm_head, "trl's fused LM head works in tiles; the logits are never whole")
    row("one layer's backward", p.layer_backward, "gradient temporaries" + (" and recomputed activations"
                                                                            if ckpt else ""))
    if p.autocast_copies:
        row("autocast weight copies", p.autocast_copies, f"{s['precision']} copies kept for backward")
    if p.step_temporaries:
        row("optimizer step temporaries", p.step_temporaries)
    lines.append("")
    row("peak (tensors)", p.peak, f"during the {p.phase}")
    for label, n in p.overhead.items():
        row(f"+ {label}", n)
    verdict = ""
    if budget is not None:
        verdict = (f"fits in {human(budget)} ({human(budget - p.total)} to spare)" if p.fits(budget)
                   else f"does NOT fit in {human(budget)} ({human(p.total - budget)} over)")
    row("total", p.total, verdict)
    for note in p.notes:
        lines.append(f"  note: {note}")
    if budget is not None and not p.fits(budget):
        lines.append("")
        if suggestion is None:
            lines.append("  nothing nearby fits: try a shorter data.max_length, a smaller model or a larger GPU")
        else:
            lines.append(f"  nearest that fits ({human(suggestion.plan.total)}): "
                         + " ".join(f"{k}={v}" for k, v in suggestion.overrides.items()))
            lines.append(f"    {suggestion.command}")
            if suggestion.note:
                lines.append(f"    ({suggestion.note})")
    return "\n".join(lines)


def to_json(p: MemoryPlan, budget: int | None = None, suggestion: Suggestion | None = None) -> str:
    """The plan as JSON (bytes), with the verdict and the suggestion when a budget is given."""
    out: dict[str, Any] = p.to_dict()
    if budget is not None:
        out["budget"] = budget
        out["fits"] = p.fits(budget)
        if suggestion is not None:
            out["suggestion"] = {"overrides": suggestion.overrides, "command": suggestion.command,
                                 "total": suggestion.plan.total, "note": suggestion.note}
    return json.dumps(out, indent=2)


def plan_recipe(name: str, overrides: list[str], device: str = "cuda", config_path: str | None = None,
                budget: int | None = None) -> tuple[Recipe, ModelFacts, MemoryPlan]:
    """Load and validate a recipe, read its model's config, and plan it. `train.gradient_checkpointing:
    auto` is decided as a run would decide it with `budget` bytes free (off without a budget)."""
    recipe, _ = load_recipe(name, overrides)
    config, model_name = model_config(recipe, config_path)
    facts = ModelFacts.of(config, model_name, recipe.model.trust_remote_code)
    note = ""
    if recipe.train.gradient_checkpointing == "auto":
        if budget is None:
            on, note = False, ("gradient checkpointing auto: planned off; a run turns it on when the device's free "
                               "memory is too small without it (--gpu-memory shows its choice)")
        else:
            on, why = auto_checkpointing(recipe, facts, device, budget)
            note = f"gradient checkpointing auto: {why}"
        recipe = with_checkpointing(recipe, on)
    memory = plan(recipe, facts, device)
    if note:
        memory.notes.insert(0, note)
    return recipe, facts, memory
