"""Pretraining from scratch: a tokenizer is trained, the model is saved in a form plain
transformers loads, and the loss falls."""

from __future__ import annotations

import json

import torch

from adapterkit.config import load_recipe
from adapterkit.stages import run


def test_pretrain_from_scratch_saves_a_plain_transformers_model(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    recipe, src = load_recipe("pretrain-tiny", [
        "model.vocab_size=512", "model.architecture.hidden_size=64", "model.architecture.num_layers=2",
        "model.architecture.intermediate_size=128", "data.max_length=64", "train.max_steps=40", "train.batch_size=8",
        "train.log_every=1", "train.save_every=null", f"output_dir={tmp_path / 'run'}",
    ])
    result = run(recipe, src, echo=False)
    model_dir = result.out / "model"
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert len(tok) == 512 and model.config.vocab_size == 512 and model.config.hidden_size == 64
    assert tok.eos_token_id == model.generation_config.eos_token_id
    # The tokenizer was trained on the corpus: its text round-trips and common words are single tokens.
    text = "The weather in the town was warm."
    assert tok.decode(tok(text).input_ids) == text
    assert len(tok(" the").input_ids) == 1
    log = [json.loads(line) for line in (result.out / "train_log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if "loss" in r]
    assert losses[0] > 6.0 and losses[-1] < 0.85 * losses[0], losses  # from ln(512) = 6.24
    manifest = json.loads((result.out / "manifest.json").read_text())
    assert manifest["metrics"]["eval_loss_after"] < manifest["metrics"]["eval_loss_before"]
    with torch.no_grad():  # the reloaded model is the trained one
        ids = tok(text, return_tensors="pt").input_ids
        assert torch.allclose(model(ids).logits, result.model.eval()(ids).logits, atol=1e-5)


def test_builtin_base_is_built_once_and_cached(fast_builtin, offline_env):
    from adapterkit.builtin import builtin_run_dir
    from adapterkit.stages import build_builtin

    assert fast_builtin.is_relative_to(offline_env)
    assert build_builtin("tiny") == fast_builtin  # cached: no second pretraining
    manifest = json.loads((builtin_run_dir("tiny") / "manifest.json").read_text())
    assert manifest["recipe"] == "pretrain-tiny" and manifest["status"] == "completed"
