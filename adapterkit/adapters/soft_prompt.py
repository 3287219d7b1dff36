"""Soft prompts through peft: prompt tuning, prefix tuning and P-tuning.

The base stays frozen; only virtual-token embeddings (prompt tuning), per-layer key/value
prefixes (prefix tuning) or a small prompt encoder (P-tuning) train.
"""

from __future__ import annotations

from typing import Any

import torch


def peft_config(adapter: Any, tokenizer_source: str) -> Any:
    from peft import PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig, PromptTuningInit

    settings = adapter.prompt
    if adapter.method == "prompt_tuning":
        if settings.init_text:
            return PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=settings.num_virtual_tokens,
                                      prompt_tuning_init=PromptTuningInit.TEXT,
                                      prompt_tuning_init_text=settings.init_text,
                                      tokenizer_name_or_path=tokenizer_source)
        return PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=settings.num_virtual_tokens)
    if adapter.method == "prefix_tuning":
        return PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=settings.num_virtual_tokens)
    return PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=settings.num_virtual_tokens,
                               encoder_hidden_size=settings.encoder_hidden_size)


def wrap(model: Any, adapter: Any, tokenizer_source: str, train: Any) -> Any:
    from peft import get_peft_model

    model = get_peft_model(model, peft_config(adapter, tokenizer_source))
    # A frozen half-precision base must not make the few trainable weights half precision too:
    # Adam updates on bf16 virtual tokens round away.
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    return model
