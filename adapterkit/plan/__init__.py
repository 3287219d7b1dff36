"""Memory plan: the peak memory of a training run, predicted from the model's config alone.

`facts` reads the model (config and meta-device shapes), `memory` estimates the peak, `fit` finds the
nearest configuration that fits, `checkpointing` decides `train.gradient_checkpointing: auto`, and
`render` writes the table and the JSON. `plan_recipe` does all of it for a recipe.

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

from adapterkit.config import Recipe, load_recipe
from adapterkit.plan.checkpointing import (
    CPU_SLACK,
    auto_checkpointing,
    free_memory,
    resolve_checkpointing,
    with_checkpointing,
)
from adapterkit.plan.facts import Architecture, ModelFacts, Trainable, architecture, model_config, trainable
from adapterkit.plan.fit import Suggestion, candidates, nearest_fit
from adapterkit.plan.memory import (
    OPTIMIZERS,
    GiB,
    KiB,
    MemoryPlan,
    MiB,
    OptimizerSpec,
    estimate,
    human,
    optimizer_of,
    parse_memory,
)
from adapterkit.plan.render import render, to_json

__all__ = ["CPU_SLACK", "OPTIMIZERS", "Architecture", "GiB", "KiB", "MemoryPlan", "MiB", "ModelFacts", "OptimizerSpec",
           "Suggestion", "Trainable", "architecture", "auto_checkpointing", "candidates", "estimate", "free_memory",
           "human", "model_config", "nearest_fit", "optimizer_of", "parse_memory", "plan_recipe", "render",
           "resolve_checkpointing", "to_json", "trainable", "with_checkpointing"]


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
    memory = estimate(recipe, facts, device)
    if note:
        memory.notes.insert(0, note)
    return recipe, facts, memory
