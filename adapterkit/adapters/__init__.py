"""Training methods: one row each. A method decides what trains and how the base is loaded.

QLoRA is LoRA on a 4-bit base, so it shares LoRA's code and differs only in `quantized_base`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal

from adapterkit.adapters import full, lora, soft_prompt
from adapterkit.errors import Problem
from adapterkit.models import length_problems


@dataclass(frozen=True)
class MethodSpec:
    name: str
    family: Literal["full", "lora", "soft_prompt"]
    trains_base: bool
    """Whether the base weights themselves train (then they are kept in float32)."""
    quantized_base: bool
    wrap: Callable[..., Any]
    """wrap(model, adapter_config, tokenizer_source, train_config) -> the model to train."""


METHODS: dict[str, MethodSpec] = {
    "full": MethodSpec("full", "full", trains_base=True, quantized_base=False, wrap=full.wrap),
    "lora": MethodSpec("lora", "lora", trains_base=False, quantized_base=False, wrap=lora.wrap),
    "qlora": MethodSpec("qlora", "lora", trains_base=False, quantized_base=True, wrap=lora.wrap),
    "prompt_tuning": MethodSpec("prompt_tuning", "soft_prompt", trains_base=False, quantized_base=False,
                                wrap=soft_prompt.wrap),
    "prefix_tuning": MethodSpec("prefix_tuning", "soft_prompt", trains_base=False, quantized_base=False,
                                wrap=soft_prompt.wrap),
    "p_tuning": MethodSpec("p_tuning", "soft_prompt", trains_base=False, quantized_base=False,
                           wrap=soft_prompt.wrap),
}


def trainable_parameters(model: Any) -> tuple[int, int]:
    """(trainable, total) parameter counts; peft counts a 4-bit weight as its number of values."""
    if hasattr(model, "get_nb_trainable_parameters"):
        return model.get_nb_trainable_parameters()
    return model.num_parameters(only_trainable=True), model.num_parameters()


def virtual_tokens(adapter: Any) -> int:
    """Positions a soft prompt adds in front of every sequence (prompt tuning and P-tuning; a prefix lives
    in the attention cache instead)."""
    return adapter.prompt.num_virtual_tokens if adapter.method in ("prompt_tuning", "p_tuning") else 0


def model_problems(recipe: Any, config: Any, quantized_matrices: int) -> list[Problem]:
    """Why the recipe's method and data.max_length cannot train the model of `config` (none when they
    can), known from the config alone, before any weight is loaded. `quantized_matrices`: the linear layers
    bitsandbytes would make 4-bit."""
    method = recipe.adapter.method
    name = type(config).__name__.removesuffix("Config")
    problems = length_problems(recipe.data.max_length, config, virtual_tokens(recipe.adapter))
    if METHODS[method].quantized_base and quantized_matrices == 0:
        problems.append(Problem("adapter.method", f"'{method}': transformers quantises no layer of {name} models "
                                "(bitsandbytes replaces only plain nn.Linear and Conv1D layers), so there would be "
                                "no 4-bit base to train on", fix="use adapter.method=lora (the same adapters on the "
                                "unquantised base)"))
    return problems
