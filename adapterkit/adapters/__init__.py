"""Training methods: one row each in `METHODS`, carrying everything the rest of adapterkit needs to know
about a method (what trains, how the base loads, which recipe sections and stages apply, whether it
can pack or checkpoint). Outside this package no code tests a method's name; it reads these rows.

QLoRA is LoRA on a 4-bit base, so it shares LoRA's code and differs only in `quantized_base`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

from adapterkit.adapters import full, lora, soft_prompt

if TYPE_CHECKING:
    from adapterkit.config.schema import AdapterConfig


class Wrap(Protocol):
    def __call__(self, model: Any, adapter: AdapterConfig, *, tokenizer_source: str | None,
                 checkpointing: bool) -> Any:
        """The model to train: `model` (a loaded or freshly built base) made ready for the method.
        `tokenizer_source` initialises a soft prompt from text; `checkpointing` says whether the trainer
        will checkpoint activations (a 4-bit base then needs input gradients)."""


class Continue(Protocol):
    def __call__(self, model: Any, adapter_dir: Path, *, checkpointing: bool) -> Any:
        """`model` (the base a run trained on) with that run's adapter from `adapter_dir`, trainable."""


@dataclass(frozen=True)
class MethodSpec:
    name: str
    family: Literal["full", "lora", "soft_prompt"]
    trains_base: bool
    """Whether the base weights themselves train (then they are kept in float32, and the run's result
    is whole weights that a later stage can start from)."""
    quantized_base: bool
    """Whether the base is loaded 4-bit (bitsandbytes NF4/FP4) under the adapter."""
    wrap: Wrap
    sections: tuple[str, ...] = ()
    """The `adapter.*` sections the method reads; a saved recipe leaves the others out."""
    prompt_options: tuple[str, ...] = ()
    """The `adapter.prompt.*` options beyond num_virtual_tokens that the method reads."""
    stages: tuple[str, ...] = ("pretrain", "sft", "dpo", "kto", "distill")
    """The stages that can train it."""
    can_pack: bool = True
    """Whether packed examples can share a row (not when a soft prompt is prepended to each sequence)."""
    can_checkpoint: bool = True
    """Whether gradient checkpointing works (prefix tuning's attention mask is not extended by the prefix)."""
    adds_positions: bool = False
    """Whether the virtual tokens occupy positions in every sequence (a prefix lives in the attention cache)."""
    continues: Continue | None = None
    """How a later stage (dpo, kto) keeps training a finished run's adapter; None when it cannot."""
    lighter: tuple[str, ...] = ()
    """Methods that train the same model in less memory, in the order the memory plan proposes them."""

    def virtual_tokens(self, adapter: AdapterConfig) -> int:
        """Positions the method adds in front of every sequence."""
        return adapter.prompt.num_virtual_tokens if self.adds_positions else 0


METHODS: dict[str, MethodSpec] = {
    "full": MethodSpec("full", "full", trains_base=True, quantized_base=False, wrap=full.wrap,
                       lighter=("lora", "qlora")),
    "lora": MethodSpec("lora", "lora", trains_base=False, quantized_base=False, wrap=lora.wrap, sections=("lora",),
                       continues=lora.continue_training, lighter=("qlora",)),
    "qlora": MethodSpec("qlora", "lora", trains_base=False, quantized_base=True, wrap=lora.wrap,
                        sections=("lora", "quant"), continues=lora.continue_training),
    "prompt_tuning": MethodSpec("prompt_tuning", "soft_prompt", trains_base=False, quantized_base=False,
                                wrap=soft_prompt.wrap, sections=("prompt",), prompt_options=("init_text",),
                                stages=("sft", "distill"), can_pack=False, adds_positions=True),
    "prefix_tuning": MethodSpec("prefix_tuning", "soft_prompt", trains_base=False, quantized_base=False,
                                wrap=soft_prompt.wrap, sections=("prompt",), stages=("sft", "distill"), can_pack=False,
                                can_checkpoint=False),
    "p_tuning": MethodSpec("p_tuning", "soft_prompt", trains_base=False, quantized_base=False, wrap=soft_prompt.wrap,
                           sections=("prompt",), prompt_options=("encoder_hidden_size",), stages=("sft", "distill"),
                           can_pack=False, adds_positions=True),
}


def trainable_parameters(model: Any) -> tuple[int, int]:
    """(trainable, total) parameter counts; peft counts a 4-bit weight as its number of values."""
    if hasattr(model, "get_nb_trainable_parameters"):
        return model.get_nb_trainable_parameters()
    return model.num_parameters(only_trainable=True), model.num_parameters()
