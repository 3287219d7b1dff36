"""The plan as a readable table, and as JSON."""

from __future__ import annotations

import json
from typing import Any


from adapterkit.adapters import METHODS
from adapterkit.plan.fit import Suggestion
from adapterkit.plan.memory import OPTIMIZERS, MemoryPlan, human

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
        f"checkpointing {'on' if s['gradient_checkpointing'] else 'off'}, optimizer {s['optimizer']}, "
        f"kernels {s['kernels']}",
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
    row("(a loss on the whole logits)", p.full_logits,
        f"for comparison: the fused head saves {human(p.full_logits - p.lm_head)}" if p.full_logits > p.lm_head
        else "for comparison: at this size the fused head's fixed tiles hold more than the whole logits",
        indent=4)
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
