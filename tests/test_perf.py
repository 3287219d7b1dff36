"""Throughput accounting and defaults: FLOPs per token, MFU in the training log, length-grouped batches."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
from conftest import write_jsonl
from transformers import AutoModelForCausalLM, TrainerCallback

from adapterkit import perf
from adapterkit.adapters.lora import lora_config
from adapterkit.config import LoraSettings, load_recipe
from adapterkit.stages import run


def test_flops_per_token_counts_6n_for_full_and_about_4n_under_lora(tiny_model_dir):
    from peft import get_peft_model

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    c = model.config
    linear = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, torch.nn.Linear))
    # The LM head is a matmul like any other (tied to the embedding here, and still counted once).
    assert linear > c.num_hidden_layers * 4 * c.hidden_size * c.hidden_size // 2
    attention = 12 * c.num_hidden_layers * 10 * c.num_attention_heads * (c.hidden_size // c.num_attention_heads)
    assert perf.flops_per_token(model, context=10) == pytest.approx(6 * linear + attention)

    lora = get_peft_model(model, lora_config(LoraSettings(r=4, target_modules="all-linear")))
    adapters = sum(m.in_features * m.out_features for n, m in lora.named_modules()
                   if isinstance(m, torch.nn.Linear) and "lora_" in n)
    # Frozen weights: forward and input gradient (4 per weight); the adapters also get weight gradients.
    assert perf.flops_per_token(lora, context=10) == pytest.approx(4 * linear + 6 * adapters + attention)
    assert perf.flops_per_token(lora, context=100) > perf.flops_per_token(lora, context=10)


def test_matmul_peak_is_measured_and_mfu_is_its_share():
    peak = perf.matmul_peak(torch.device("cpu"), torch.float32, n=256, repeats=1)
    assert math.isfinite(peak) and peak > 1e8  # any CPU of this century does 0.1 GFLOP/s
    assert perf.mfu(1000, peak / 2000, peak) == pytest.approx(0.5)


class PaddingMeter(TrainerCallback):
    """Counts the tokens and the padding the model is fed during training (packed rows carry no mask:
    their padding is the pad token at the end of a row)."""

    def __init__(self, pad_token_id):
        self.pad_token_id = pad_token_id
        self.useful = self.total = self.examples = 0

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        def count(module, a, kw):
            if not torch.is_grad_enabled():
                return
            ids, mask, positions = kw["input_ids"], kw.get("attention_mask"), kw.get("position_ids")
            real = mask.bool() if mask is not None else ids != self.pad_token_id
            self.useful += int(real.sum())
            self.total += ids.numel()
            # Examples fed: one per row when padded, one per position-0 token when packed.
            self.examples += ids.shape[0] if positions is None else int(((positions == 0) & real).sum())
        model.register_forward_pre_hook(count, with_kwargs=True)


def test_packing_and_length_grouping_remove_most_padding_and_log_mfu(tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer

    # Short and long rows mixed at random, as real data mixes short labels and long contexts.
    rng = random.Random(0)
    words = "the film was good bad dull bright long short story acting plot music".split()
    rows = [{"text": " ".join(rng.choice(words) for _ in range(rng.choice([3, 4, 30, 40]))),
             "label": rng.choice(["positive", "negative"])} for _ in range(96)]
    data = write_jsonl(tmp_path / "mixed.jsonl", rows)
    pad = AutoTokenizer.from_pretrained(tiny_model_dir).pad_token_id
    padding, examples = {}, {}
    for name, settings in [("random", ["data.packing=false", "data.group_by_length=false"]),
                           ("grouped", ["data.packing=false"]), ("packed", [])]:  # packing: the default
        out = tmp_path / f"run-{name}"
        recipe, src = load_recipe("lora-sentiment", [
            f"model.name_or_path={tiny_model_dir}", f"data.train={data}", "data.eval=null", "data.max_length=256",
            "train.batch_size=4", "train.epochs=1", "train.max_steps=null", "train.save_every=null",
            "train.log_every=1", f"output_dir={out}", *settings])
        meter = PaddingMeter(pad)
        run(recipe, src, echo=False, callbacks=[meter])
        padding[name], examples[name] = 1 - meter.useful / meter.total, meter.examples
        log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
        steps = [r for r in log if "loss" in r]
        assert steps and all(0 < r["mfu"] < 1 and r["tokens_per_s"] > 0 for r in steps)
    # Random batches of 4 from a 50/50 mix of short and long rows (with the prompt template, ~35 and ~100
    # tokens) are about a quarter padding (28% measured); grouped ones about 5%, and packed rows about 6%
    # (the space best-fit leaves at the end of a row). Grouping needs many rows to group; packing does not.
    assert padding["random"] > 0.2, padding
    assert padding["grouped"] < padding["random"] / 3 and padding["packed"] < padding["random"] / 3, padding
    assert examples == {"random": 96, "grouped": 96, "packed": 96}  # every row read once, whatever the batching
