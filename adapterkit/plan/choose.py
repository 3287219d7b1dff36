"""Choosing a method: every adaptation method on one model, side by side, from its config alone.

    adapterkit methods Qwen/Qwen2.5-0.5B --gpu-memory 12GiB
    adapterkit methods path/to/config.json --gpu-memory 8GiB data.max_length=1024 train.batch_size=4

The methods are grouped as the parameter-efficient fine-tuning literature groups them (Lialin et al.,
"Scaling Down to Scale Up", 2023): additive methods put new trainable parameters beside a frozen model
(soft prompts: prompt tuning, prefix tuning, P-tuning); reparameterised ones train a low-rank change to
its weights (LoRA, DoRA, and QLoRA on a 4-bit base); full fine-tuning trains every weight. Each row is
the memory plan of one run (`plan.plan_recipe`, the same numbers `adapterkit plan` prints): what trains
and how much of the model that is, the planned peak, whether it fits, and whether the result can be
merged into the weights (a soft prompt stays an input, so it cannot).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from adapterkit.adapters import METHODS
from adapterkit.errors import AdapterkitError
from adapterkit.plan import plan_recipe
from adapterkit.plan.memory import human

BASE_RECIPE = "lora-sentiment"
"""The recipe each row starts from (its sequence length, batch and optimizer), with the method swapped in."""

ROWS: list[tuple[str, str, list[str]]] = [
    ("additive (soft prompt)", "prompt_tuning", ["adapter.method=prompt_tuning"]),
    ("additive (soft prompt)", "prefix_tuning", ["adapter.method=prefix_tuning"]),
    ("additive (soft prompt)", "p_tuning", ["adapter.method=p_tuning"]),
    ("reparameterised (low rank)", "lora", ["adapter.method=lora", "adapter.lora.dora=false"]),
    ("reparameterised (low rank)", "dora", ["adapter.method=lora", "adapter.lora.dora=true"]),
    ("reparameterised (low rank)", "qlora", ["adapter.method=qlora", "adapter.lora.dora=false"]),
    ("full fine-tuning", "full", ["adapter.method=full"]),
]
"""(family, name, the overrides that make the base recipe train it), in the table's order."""
REFERENCE = ROWS[3][1]
"""The row every model can plan (plain LoRA): when it fails, the input is wrong, not a method."""

MERGES = {"soft_prompt": "no: its virtual tokens are inputs", "lora": "yes", "full": "is the weights"}


@dataclass
class MethodRow:
    family: str
    method: str
    trainable: int | None = None
    parameters: int | None = None
    peak: int | None = None
    """Planned total: tensor peak plus, on a GPU, the CUDA context and allocator slack."""
    fits: bool | None = None
    merges: str = ""
    refused: str | None = None
    """Why this model cannot train with the method (exit 2 for a run), or None."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def methods_table(model: str, overrides: list[str], device: str = "cuda", budget: int | None = None,
                  config_path: str | None = None) -> list[MethodRow]:
    """One row per method for `model` (a hub id, a directory or builtin:NAME; or `config_path`, a config.json)."""
    rows, errors = [], {}
    for family, name, method in ROWS:
        spec = METHODS[method[0].split("=", 1)[1]]
        row = MethodRow(family, name, merges=MERGES[spec.family])
        base = [] if config_path else [f"model.name_or_path={model}"]
        try:
            _, _, plan = plan_recipe(BASE_RECIPE, [*base, *method, *overrides], device, config_path, budget)
        except AdapterkitError as e:
            errors[name] = e
            row.refused = "; ".join(f"{p.message} ({p.fix})" if p.fix else p.message for p in e.problems)
        else:
            row.trainable, row.parameters, row.peak = plan.trainable, plan.parameters, plan.total
            row.fits = plan.fits(budget) if budget is not None else None
        rows.append(row)
    if REFERENCE in errors:
        # Every model takes LoRA: its failing is the input's fault (a model that is not there, a bad
        # override), not a method's, and is reported as it would be for a run.
        raise errors[REFERENCE]
    return rows


def render_table(rows: list[MethodRow], model: str, device: str, budget: int | None) -> str:
    where = "a GPU" if device == "cuda" else "this CPU"
    params = next((r.parameters for r in rows if r.parameters), None)
    head = f"methods for {model}" + (f" ({params / 1e6:,.1f}M parameters)" if params else "") + f", planned on {where}"
    head += f", fitting in {human(budget)}" if budget is not None else ""
    lines = [head, f"  (each row: the {BASE_RECIPE} recipe with that method; `adapterkit plan` shows one in full)", ""]
    header = ["family", "method", "trains", "planned peak", *(["fits"] if budget is not None else []), "merges"]
    table, refusals = [header], []
    for r in rows:
        if r.refused:
            table.append([r.family, r.method, "refused (below)", "", *([""] if budget is not None else []), ""])
            refusals.append(f"  {r.method} refused: {r.refused}")
            continue
        share = f"{r.trainable:,} ({100 * r.trainable / r.parameters:.3g}%)"
        fits = [("yes" if r.fits else "no")] if budget is not None else []
        table.append([r.family, r.method, share, human(r.peak), *fits, r.merges])
    widths = [max(len(row[i]) for row in table if len(row) > i) for i in range(len(header))]
    for k, row in enumerate(table):
        lines.append("  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
        if k == 0:
            lines.append("  " + "  ".join("-" * w for w in widths))
    return "\n".join([*lines, *([""] + refusals if refusals else [])])
