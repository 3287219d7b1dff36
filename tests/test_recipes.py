"""Every shipped recipe runs to completion on CPU (a few steps, on the built-in base and the
shipped samples) and leaves a complete run directory."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json

import pytest
import torch

from adapterkit.config import load_recipe, shipped, summary
from adapterkit.data.formatter import FormatSpec, Formatter
from adapterkit.data.loading import read_rows, resolve_sample
from adapterkit import doctor
from adapterkit.stages import run

SFT = sorted(n for n in shipped() if summary(shipped()[n])["stage"] == "sft")
PREFERENCE = sorted(n for n in shipped() if summary(shipped()[n])["stage"] in ("dpo", "kto"))


@pytest.mark.parametrize("name", SFT)
def test_shipped_recipe_runs_end_to_end(name, tmp_path, fast_builtin):
    from transformers import AutoTokenizer

    recipe, src = load_recipe(name, ["train.max_steps=3", "train.log_every=1", "train.save_every=2",
                                     "eval.limit=4", "eval.max_new_tokens=8", f"output_dir={tmp_path / 'run'}"])
    result = run(recipe, src, echo=False)
    out = result.out
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "completed" and manifest["method"] == recipe.adapter.method
    assert manifest["model_source"] == str(fast_builtin)
    train_file = resolve_sample(recipe.data.train)
    assert [d["sha256"] for d in manifest["data"]["train"]] == [hashlib.sha256(train_file.read_bytes()).hexdigest()]
    assert manifest["versions"]["torch"] == torch.__version__
    assert manifest["versions"]["trl"] == importlib.metadata.version("trl")
    assert "eval_loss_before" in manifest["metrics"] and "eval_loss_after" in manifest["metrics"]
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3]
    assert all(r["tokens_per_s"] > 0 for r in log if "loss" in r)
    assert (out / "checkpoints" / "checkpoint-2").is_dir()
    assert (out / "loss.png").stat().st_size > 0
    model_dir = out / "model"
    expected = "model.safetensors" if recipe.adapter.method == "full" else "adapter_model.safetensors"
    assert (model_dir / expected).is_file() and not (model_dir / "training_args.bin").exists()
    fmt = json.loads((model_dir / "format.json").read_text())
    assert fmt["task"] == recipe.data.task
    tok = AutoTokenizer.from_pretrained(model_dir)
    if recipe.data.task == "chat":  # the fallback chat template travels with the model
        assert tok.chat_template == fmt["chat_template"]
    # The template saved with the model renders training rows to exactly the tokens trained on.
    rows = read_rows(recipe.data.train, "train", "data.train")
    trained_with = Formatter.for_training(recipe.data, result.tokenizer, fmt["labels"])
    saved = Formatter(FormatSpec(**fmt), tok, recipe.data.columns)
    for row in rows[:5]:
        fields, _ = saved.fields(row)
        assert saved.encode(saved.record(fields)) == trained_with.encode(trained_with.record(fields))
    assert not list(out.glob(".model.*"))  # no temp dir left behind
    # Task metrics of the starting and the tuned model, with the report a user opens.
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["task"] == recipe.data.task and summary["n"] == 4
    assert summary["headline"] in summary["base"] and summary["headline"] in summary["tuned"]
    assert (out / "report.md").read_text().startswith(f"# {name}: ")
    assert doctor.report(out)[0] == []  # a healthy run of a shipped recipe raises nothing


@pytest.mark.parametrize("name", PREFERENCE)
def test_shipped_preference_recipe_runs_end_to_end(name, tmp_path, fast_builtin):
    recipe, src = load_recipe(name, ["train.max_steps=3", "train.log_every=1", "train.save_every=2",
                                     f"output_dir={tmp_path / 'run'}"])
    result = run(recipe, src, echo=False)
    out = result.out
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "completed" and manifest["stage"] == recipe.stage
    assert (out / "checkpoints" / "checkpoint-2").is_dir() and (out / "loss.png").stat().st_size > 0
    assert (out / "model" / "adapter_model.safetensors").is_file()
    assert not (out / "model" / "ref").exists()  # only the trained adapter is saved, not trl's reference copy
    summary_ = json.loads((out / "metrics.json").read_text())
    assert summary_["n"] == 16
    moved = "reward_margin" if recipe.stage == "dpo" else "logp_gap"  # the policy moved from its reference
    assert summary_["tuned"][moved] != summary_["base"].get(moved, 0)
    assert doctor.report(out)[0] == []
