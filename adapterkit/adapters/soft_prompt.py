"""Soft prompts through peft: prompt tuning, prefix tuning and P-tuning.

The base stays frozen; only virtual-token embeddings (prompt tuning), per-layer key/value
prefixes (prefix tuning) or a small prompt encoder (P-tuning) train.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch


def prefix_shape(model_config: Any) -> dict[str, int]:
    """PrefixTuningConfig sizes for a model whose key/value heads peft would count wrongly, else {}.

    peft sizes the prefix for `num_attention_heads` heads of `hidden_size // num_attention_heads`,
    or for `num_key_value_heads` where the config has that key. Multi-query Falcon (Falcon-7B:
    `multi_query=True`, `new_decoder_architecture=False`) caches one key/value head but names it
    nowhere peft looks (its `num_kv_heads` still equals the query heads), so the prefix would have
    `num_attention_heads` heads and the cache concatenation fails. Falcon-40B style
    (`new_decoder_architecture=True`) broadcasts its key/value heads to every query head before the
    cache, and plain multi-head Falcon has as many as it has query heads: both already fit.
    """
    if (getattr(model_config, "model_type", None) == "falcon" and getattr(model_config, "multi_query", False)
            and not getattr(model_config, "new_decoder_architecture", False)):
        head_dim = model_config.hidden_size // model_config.num_attention_heads
        return {"num_layers": model_config.num_hidden_layers, "num_attention_heads": 1, "token_dim": head_dim}
    return {}


def peft_config(adapter: Any, tokenizer_source: str | None, model_config: Any = None) -> Any:
    """The peft config of a soft-prompt adapter; `model_config` (the base model's) sizes a prefix
    where peft cannot (see `prefix_shape`)."""
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
        shape = prefix_shape(model_config) if model_config is not None else {}
        return PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=settings.num_virtual_tokens, **shape)
    return PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=settings.num_virtual_tokens,
                               encoder_hidden_size=settings.encoder_hidden_size)


def fix_generation(model: Any) -> Any:
    """Make a soft-prompt PeftModel generate with its soft prompt (in place; returns the model).

    peft 0.21's `PeftModelForCausalLM.prepare_inputs_for_generation` looks for the KV cache under
    `past_key_values` in what the base model's `prepare_inputs_for_generation` returns; transformers
    5.x returns it as `cache`. So peft takes every step for the first: prompt tuning and P-tuning
    prepend the virtual tokens again at every step after the first, and prefix tuning's prefix,
    handed on as `past_key_values`, is dropped by the model's forward for the (empty) `cache`, so
    generation runs on the bare base. Here peft sees the cache under the name it looks for, and the
    model gets it under the name it takes. Every PeftModel that generates needs it (wrapped or
    loaded), so that a run's own evaluation and a reloaded run's agree."""
    peft_prepare = getattr(model, "prepare_inputs_for_generation", None)
    base_prepare = getattr(model, "base_model_prepare_inputs_for_generation", None)
    config = getattr(model, "active_peft_config", None)
    if (getattr(model, "_adapterkit_generation_fixed", False) or base_prepare is None or config is None
            or not config.is_prompt_learning or "cache" not in inspect.signature(base_prepare).parameters):
        return model

    def base_renamed(*args: Any, **kwargs: Any) -> dict:
        inputs = base_prepare(*args, **kwargs)
        if "cache" in inputs:
            inputs["past_key_values"] = inputs.pop("cache")
        return inputs

    @functools.wraps(peft_prepare)
    def prepare_inputs_for_generation(*args: Any, **kwargs: Any) -> dict:
        model.base_model_prepare_inputs_for_generation = base_renamed
        try:
            inputs = peft_prepare(*args, **kwargs)
        finally:
            model.base_model_prepare_inputs_for_generation = base_prepare
        if "past_key_values" in inputs:
            inputs["cache"] = inputs.pop("past_key_values")
        return inputs

    model.prepare_inputs_for_generation = prepare_inputs_for_generation
    model._adapterkit_generation_fixed = True
    return model


def wrap(model: Any, adapter: Any, *, tokenizer_source: str | None = None, checkpointing: bool = False) -> Any:
    from peft import get_peft_model

    model = get_peft_model(model, peft_config(adapter, tokenizer_source, model.config))
    # A frozen half-precision base must not make the few trainable weights half precision too:
    # Adam updates on bf16 virtual tokens round away.
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    return fix_generation(model)
