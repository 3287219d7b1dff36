"""LoRA, with its DoRA and rsLoRA variants, and QLoRA: the same adapter on a 4-bit base.

The 4-bit base is loaded by transformers with bitsandbytes (`models.load_base`); here it is
prepared for training (norms and embeddings upcast, input grads for checkpointing) and wrapped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from adapterkit.adapters.soft_prompt import fix_generation


def lora_config(settings: Any) -> Any:
    from peft import LoraConfig

    return LoraConfig(
        task_type="CAUSAL_LM",
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=settings.target_modules,
        use_dora=settings.dora,
        use_rslora=settings.rslora,
        bias="none",
    )


def wrap(model: Any, adapter: Any, *, tokenizer_source: str | None = None, checkpointing: bool = False) -> Any:
    from peft import get_peft_model

    return get_peft_model(_prepare_4bit(model, checkpointing), lora_config(adapter.lora))


def continue_training(model: Any, adapter_dir: Path, *, checkpointing: bool = False) -> Any:
    """`model` with a finished run's LoRA adapter from `adapter_dir`, trainable (a dpo or kto stage after
    SFT keeps training it)."""
    from peft import PeftModel

    return fix_generation(PeftModel.from_pretrained(_prepare_4bit(model, checkpointing), str(adapter_dir),
                                                    is_trainable=True))


def _prepare_4bit(model: Any, checkpointing: bool) -> Any:
    """A 4-bit base ready to train under an adapter (norms upcast, input gradients for checkpointing)."""
    from peft import prepare_model_for_kbit_training

    if not getattr(model, "is_loaded_in_4bit", False):
        return model
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing,
                                           gradient_checkpointing_kwargs={"use_reentrant": False})


# -- one adapter from two: a run's adapter, then one trained on top of it merged ------------------------

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
FACTORS = (".lora_A.weight", ".lora_B.weight")


def stack_problem(adapter_dir: Path) -> str | None:
    """Why the LoRA adapter saved in `adapter_dir` cannot be stacked exactly with another (`stack`), or
    None when it can: plain low-rank factors on linear layers, nothing else trained."""
    import json

    from safetensors import safe_open

    config = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
    if config.get("peft_type") not in (None, "LORA"):
        return f"it is a {config.get('peft_type')} adapter, not LoRA"
    if config.get("use_dora"):
        return "it is a DoRA adapter (its magnitude vectors do not add up)"
    for key, what in (("rank_pattern", "per-layer ranks"), ("alpha_pattern", "per-layer alphas"),
                      ("modules_to_save", "fully trained modules"), ("layers_to_transform", "a layer selection"),
                      ("target_parameters", "adapted parameters")):
        if config.get(key):
            return f"it has {what} ({key})"
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        return "it trains biases"
    weights = adapter_dir / ADAPTER_WEIGHTS
    if not weights.is_file():
        return f"{weights} is missing"
    with safe_open(str(weights), "pt") as f:
        other = [k for k in f.keys() if not k.endswith(FACTORS)]
    if other:
        return f"it holds more than LoRA factors of linear layers (e.g. {other[0]})"
    return None


def stack(first: Path, second: Path) -> None:
    """Rewrite the adapter in `second` (trained on the base with `first` merged into it) as one adapter on
    the original base: W + s1 B1 A1 + s2 B2 A2 = W + [s1 B1, s2 B2] [A1; A2], rank r1 + r2 and scale 1.
    The factors are placed side by side, not approximated; a module only one adapter targets gets zeros
    in the other's rows."""
    import json
    import math

    import torch
    from safetensors.torch import load_file, save_file

    def read(d: Path) -> tuple[dict[str, Any], dict[str, Any], float]:
        config = json.loads((d / ADAPTER_CONFIG).read_text())
        r, alpha = config["r"], config["lora_alpha"]
        return config, load_file(str(d / ADAPTER_WEIGHTS)), alpha / (math.sqrt(r) if config.get("use_rslora") else r)

    (c1, w1, s1), (c2, w2, s2) = read(first), read(second)
    r1, r2 = c1["r"], c2["r"]
    rank = r1 + r2
    modules = sorted({k[: -len(FACTORS[0])] for k in (*w1, *w2) if k.endswith(FACTORS[0])})
    out: dict[str, Any] = {}
    for m in modules:
        a_ref = w1.get(m + FACTORS[0], w2.get(m + FACTORS[0]))
        b_ref = w1.get(m + FACTORS[1], w2.get(m + FACTORS[1]))
        a = torch.zeros(rank, a_ref.shape[1], dtype=torch.float32)
        b = torch.zeros(b_ref.shape[0], rank, dtype=torch.float32)
        for w, s, rows in ((w1, s1, slice(0, r1)), (w2, s2, slice(r1, rank))):
            if m + FACTORS[0] in w:
                a[rows] = w[m + FACTORS[0]].float()
                b[:, rows] = w[m + FACTORS[1]].float() * s
        out[m + FACTORS[0]], out[m + FACTORS[1]] = a.contiguous(), b.contiguous()
    leaves = sorted({m.rsplit(".", 1)[-1] for m in modules})
    config = {**c2, "r": rank, "lora_alpha": rank, "use_rslora": False, "target_modules": leaves,
              "base_model_name_or_path": c1.get("base_model_name_or_path") or c2.get("base_model_name_or_path")}
    save_file(out, str(second / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (second / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
