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
