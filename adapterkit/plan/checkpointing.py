"""`train.gradient_checkpointing: auto`: on only when the plan without it does not fit this device."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from adapterkit.adapters import METHODS
from adapterkit.config import Recipe
from adapterkit.plan.facts import ModelFacts
from adapterkit.plan.memory import estimate, human

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
    without = int(estimate(with_checkpointing(recipe, False), facts, device).total * slack)
    if without <= budget:
        return False, f"off (the run needs about {human(without)} without it; {human(budget)} is free)"
    with_ = int(estimate(with_checkpointing(recipe, True), facts, device).total * slack)
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
