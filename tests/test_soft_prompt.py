"""Soft prompts on every architecture: prefix tuning is sized for the key/value heads a model caches
(multi-query Falcon caches one; peft alone sizes the prefix for every query head), and generation uses
the soft prompt at every step (peft 0.21 and transformers 5.x disagree on the name of the cache, so
without adapterkit's shim prompt tuning re-prepends its virtual tokens and prefix tuning is dropped).

    python -m pytest -q tests/test_soft_prompt.py
"""

from __future__ import annotations

import pytest
import torch

from adapterkit.adapters.soft_prompt import wrap
from adapterkit.config import AdapterConfig, PromptSettings
def _falcon(**arch):
    from transformers import FalconConfig, FalconForCausalLM, set_seed

    set_seed(0)
    config = FalconConfig(vocab_size=200, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, **arch)
    return FalconForCausalLM(config)


@pytest.mark.parametrize("arch", [dict(multi_query=True, new_decoder_architecture=False),
                                  dict(multi_query=True, new_decoder_architecture=False, alibi=True),
                                  dict(new_decoder_architecture=True, num_kv_heads=2),
                                  dict(multi_query=False, new_decoder_architecture=False)],
                         ids=["multi-query", "multi-query-alibi", "new-decoder", "multi-head"])
def test_prefix_tuning_trains_only_the_prefix_on_falcon(arch):
    model = wrap(_falcon(**arch), AdapterConfig(method="prefix_tuning", prompt=PromptSettings(num_virtual_tokens=4)))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("prompt_encoder" in n for n in trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-1)
    ids = torch.randint(3, 200, (4, 10), generator=torch.Generator().manual_seed(0))
    model.train()
    losses = []
    for _ in range(10):
        loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == trainable
    model.eval()
    out = model.generate(input_ids=ids[:, :5], attention_mask=torch.ones_like(ids[:, :5]), max_new_tokens=3,
                         min_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (4, 8)


def test_multi_query_falcon_prefix_is_the_cache_of_a_real_prompt():
    # A prefix set to the key/values the model caches for 4 real tokens must give, on what follows, the
    # logits of the whole sequence: the prefix has the cache's shape (1 key/value head) and is used as one.
    base = _falcon(multi_query=True, new_decoder_architecture=False).eval()
    prompt, rest = torch.randint(3, 200, (1, 4)), torch.randint(3, 200, (1, 6))
    with torch.no_grad():
        cache = base(input_ids=prompt, use_cache=True).cache
        full = base(input_ids=torch.cat([prompt, rest], 1)).logits[:, 4:]
    model = wrap(base, AdapterConfig(method="prefix_tuning", prompt=PromptSettings(num_virtual_tokens=4)))
    model.eval()
    config = model.peft_config["default"]
    assert (config.num_attention_heads, config.token_dim) == (1, 16)  # one head of hidden / heads
    layers = [torch.stack([layer.keys[0], layer.values[0]]) for layer in cache.layers]  # [2, heads, tokens, dim]
    prefix = torch.stack(layers).permute(3, 0, 1, 2, 4).reshape(4, -1)  # peft's [tokens, layers*2*heads*dim]
    with torch.no_grad():
        model.prompt_encoder["default"].embedding.weight.copy_(prefix)
        got = model(input_ids=rest, attention_mask=torch.ones_like(rest)).logits
    torch.testing.assert_close(got, full, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method", ["prompt_tuning", "prefix_tuning", "p_tuning"])
def test_generate_follows_the_soft_prompt(method):
    from transformers import LlamaConfig, LlamaForCausalLM, set_seed

    set_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=200, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, initializer_range=0.3))
    model = wrap(base, AdapterConfig(method=method, prompt=PromptSettings(num_virtual_tokens=4,
                                                                          encoder_hidden_size=32))).eval()
    ids = torch.randint(3, 200, (2, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model.prompt_encoder["default"].embedding.weight.normal_(0, 1.0)  # a prompt that moves the logits
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, min_new_tokens=5,
                             do_sample=False, output_logits=True, return_dict_in_generate=True)
        for step, logits in enumerate(out.logits):
            seen = out.sequences[:, :6 + step]
            expected = model(input_ids=seen, attention_mask=torch.ones_like(seen)).logits[:, -1]
            torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)
