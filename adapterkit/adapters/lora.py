"""LoRA, with its DoRA and rsLoRA variants, and QLoRA: the same adapter on a 4-bit base.

The 4-bit base is loaded by transformers with bitsandbytes (`quantization_config`); here it is
prepared for training (norms and embeddings upcast, input grads for checkpointing) and wrapped.
"""

from __future__ import annotations

from typing import Any

import torch


def quantization_config(quant: Any, compute_dtype: torch.dtype) -> Any:
    """bitsandbytes 4-bit settings for a QLoRA base."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant.type,
        bnb_4bit_use_double_quant=quant.double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_quant_storage=torch.uint8,
    )


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


def wrap(model: Any, adapter: Any, tokenizer_source: str, train: Any) -> Any:
    from peft import get_peft_model, prepare_model_for_kbit_training

    if getattr(model, "is_loaded_in_4bit", False):
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=train.gradient_checkpointing is True,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    return get_peft_model(model, lora_config(adapter.lora))
