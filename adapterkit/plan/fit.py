"""When a run does not fit: the nearest configuration that does (`adapterkit plan --gpu-memory`)."""

from __future__ import annotations

import dataclasses
import shlex
from dataclasses import dataclass


from adapterkit.adapters import METHODS
from adapterkit.config import Recipe, load_recipe
from adapterkit.errors import ConfigError
from adapterkit.plan.facts import ModelFacts
from adapterkit.plan.memory import MemoryPlan, estimate, optimizer_of

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
        p = estimate(candidate, facts, device)
        if p.fits(budget):
            command = "adapterkit recipe run " + " ".join(shlex.quote(x) for x in [name, *new])
            return Suggestion(moves, command, p, note)
    return None
