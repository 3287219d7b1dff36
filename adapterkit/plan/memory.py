"""The memory model: the peak memory of one training step, tensor by tensor (see the package's
docstring for the formula), with the constants it rests on and where they were measured."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

import torch

from adapterkit import kernels, models
from adapterkit.adapters import METHODS
from adapterkit.config import Recipe, packs
from adapterkit.errors import ConfigError, Problem
from adapterkit.kernels.lora_4bit import GATED_MLPS
from adapterkit.plan.facts import Architecture, ModelFacts, Trainable

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
    full_logits: int
    """What a loss on the whole logits would hold instead (transformers' own forward): for comparison."""
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


def estimate(recipe: Recipe, facts: ModelFacts, device: str = "cuda", padded: bool | None = None) -> MemoryPlan:
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
    if recipe.stage == "distill":
        notes.append("stage distill: planned as sft; not counted: "
                     + ("" if recipe.distill.cache else "the teacher's weights (it runs beside the student), ")
                     + "both models' logits at the supervised positions (the loss takes full-vocabulary softmaxes)")

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
    # train.kernels=adapterkit: the fused 4-bit LoRA functions keep less (adapterkit.kernels.lora_4bit).
    fused = kernels.wanted(t.kernels, device)[0] and method.quantized_base and not a.lora.dora
    fused_mlp = fused and facts.config.model_type in GATED_MLPS and {"gate_proj", "up_proj", "down_proj"} <= set(
        train.adapted_names)
    per_layer = _layer_activations(arch, d, full, seq, padded, fused_mlp)
    adapter_terms = (_fused_adapter_activations(arch, train, d, a, fused_mlp) if fused
                     else _adapter_activations(train, d, a, device))  # all layers together
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

    if t.kernels in ("adapterkit", "both") and not fused:
        notes.append("train.kernels: the fused 4-bit LoRA path is for qlora without DoRA; planned without it")
    setting = dict(model=arch.name, method=a.method, device=device, precision=precision,
                   batch_size=t.batch_size, seq_len=seq, grad_accum=t.grad_accum,
                   gradient_checkpointing=checkpointing, optimizer=opt.name,
                   kernels="fused 4-bit LoRA" + (" and MLP" if fused_mlp else "") if fused else "off")
    return MemoryPlan(
        setting=setting, parameters=arch.parameters, trainable=train.count, trainable_what=train.what,
        weights=weights, gradients=gradients, optimizer_state=optimizer_state, optimizer_pageable=opt.pageable,
        activations=activations, activations_checkpointed=saved_ckpt, activations_not_checkpointed=saved_plain,
        lm_head=lm_head, full_logits=_full_logits(arch, d, tokens - seqs), layer_backward=layer_bwd, autocast_copies=autocast_copies,
        step_temporaries=step_temporaries, forward_backward=forward_backward, optimizer_step=optimizer_step,
        peak=peak, phase=phase, overhead=overhead, total=peak + sum(overhead.values()), notes=notes)


def _fused_adamw() -> bool:
    """Whether the Trainer's default optimizer is torch's fused AdamW (`adamw_torch_fused`)."""
    from transformers import TrainingArguments

    return "fused" in str(TrainingArguments.optim)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _layer_activations(arch: Architecture, d: _Dtypes, full: bool, seq: int, padded: bool,
                       fused_mlp: bool = False) -> float:
    """Bytes per token that one Llama-style decoder layer saves for backward (adapters not included).
    `fused_mlp`: the MLP is adapterkit's fused function, which keeps gate and up only."""
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
    mlp = (2 if fused_mlp else 3) * d.linear_out * inter
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


def _fused_adapter_activations(arch: Architecture, train: Trainable, d: _Dtypes, adapter: Any,
                               fused_mlp: bool) -> float:
    """Bytes per token the fused 4-bit LoRA functions of all layers keep: each distinct input once (q, k
    and v share one, gate and up another; down_proj's is recomputed in a fused MLP), a bool dropout mask
    per projection, and drop(x) @ A.T (r wide, in the adapter's dtype or autocast's)."""
    if not train.adapted:
        return 0
    mask = 1 if adapter.lora.dropout > 0 else 0
    lora = d.compute if d.autocast else 4
    total = sum(mask * f_in + lora * r for f_in, f_out, r in train.adapted)
    shared = {"q_proj", "k_proj", "v_proj"}, {"gate_proj", "up_proj"}
    for (f_in, _, _), name in zip(train.adapted, train.adapted_names, strict=True):
        if name == "down_proj" and fused_mlp:
            continue
        if not any(name in group for group in shared):
            total += d.linear_out * f_in  # its own input (o_proj's: attention's output; down_proj's: the product)
    groups = sum(1 for group in shared if group & set(train.adapted_names))
    return total + groups * arch.layers * d.norm_out * arch.hidden


def _full_logits(arch: Architecture, d: _Dtypes, positions: int) -> int:
    """What a loss on the whole logits holds at least: the (positions, vocab) logits in the compute dtype,
    their float32 upcast for the cross-entropy, and the float32 gradient of the logits."""
    return positions * arch.vocab * (d.compute + 4 + 4)


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
