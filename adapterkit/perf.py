"""Throughput accounting: the model FLOPs a training token costs, this device's measured matmul peak,
and model FLOP utilisation (MFU) = FLOPs per token x tokens/s / peak.

FLOPs per token follow the usual accounting (Kaplan et al. 2020; PaLM's MFU), counted from the
model as it trains rather than from a parameter total:

- every matrix multiply (`nn.Linear`, 4-bit ones included, the LM head, LoRA's A and B): 2 FLOPs per
  weight forward, 2 backward for the gradient of its input, and 2 more for its weight's gradient
  only when that weight trains (so full fine-tuning costs 6N, a frozen base under LoRA about 4N);
- attention scores and values: 2 x 2 x context x width per layer forward, twice that backward.

Embedding lookups, norms, activations and the optimizer are not counted, and neither are recomputed
forwards under gradient checkpointing: MFU measures useful model work, not hardware busy time.
"""

from __future__ import annotations

import time
from typing import Any

import torch

_PEAK_CACHE: dict[tuple[str, torch.dtype], float] = {}


def compute_dtype(precision: str) -> torch.dtype:
    """The dtype matmuls run in under a training precision (autocast's for bf16/fp16)."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)


def matmul_peak(dev: torch.device, dtype: torch.dtype, n: int | None = None, repeats: int = 3) -> float:
    """FLOP/s of a square matmul on `dev` in `dtype`, measured now (best of `repeats`), cached per process."""
    key = (str(dev), dtype)
    if key in _PEAK_CACHE:
        return _PEAK_CACHE[key]
    # 4096^2 on a GPU: long enough to time (~1 ms at 100 TFLOP/s), small enough (3 x 32 MiB in bf16)
    # not to matter on a GPU that already holds the model.
    n = n or (4096 if dev.type == "cuda" else 2048)
    a = torch.randn(n, n, device=dev, dtype=dtype)
    b = torch.randn(n, n, device=dev, dtype=dtype)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    a @ b  # warm-up: kernel selection, allocator
    sync()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - t)
    del a, b
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    _PEAK_CACHE[key] = 2 * n**3 / best
    return _PEAK_CACHE[key]


def _linear_shapes(model: Any) -> list[tuple[int, bool]]:
    """(weights, trains) of every matrix multiply in the model, each module once."""
    from transformers.pytorch_utils import Conv1D

    out = []
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            out.append((module.in_features * module.out_features, module.weight.requires_grad))
        elif isinstance(module, Conv1D):  # GPT-2's linear layers, weight stored (in, out)
            out.append((module.weight.numel(), module.weight.requires_grad))
    return out


def _attention_width(config: Any) -> tuple[int, int]:
    """(layers, query width) of a decoder config; (0, 0) when it does not say."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    layers = getattr(text, "num_hidden_layers", 0) or 0
    heads = getattr(text, "num_attention_heads", 0) or 0
    hidden = getattr(text, "hidden_size", 0) or 0
    head_dim = getattr(text, "head_dim", None) or (hidden // heads if heads else 0)
    return layers, heads * head_dim


def flops_per_token(model: Any, context: float) -> float:
    """Model FLOPs of one training token (forward and backward) at a mean attended `context`."""
    shapes = _linear_shapes(model)
    matmul = sum(6 * w if trains else 4 * w for w, trains in shapes)
    layers, width = _attention_width(model.config)
    return float(matmul + 12 * layers * context * width)


def mfu(tokens_per_s: float, flops_per_token: float, peak: float) -> float:
    """Model FLOP utilisation, as a fraction of `peak`."""
    return tokens_per_s * flops_per_token / peak if peak > 0 else 0.0
