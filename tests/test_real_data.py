"""On real data (SST-2 sentences from ../shared/data): the LoRA and QLoRA sentiment recipes lower
the held-out loss well below where it started. Minutes on a CPU, so marked slow:

    python -m pytest -m slow tests/test_real_data.py -s
"""

from __future__ import annotations

import json

import pytest

from adapterkit.config import load_recipe
from adapterkit.recipes.train import run
from conftest import shared_data


@pytest.mark.slow
@pytest.mark.parametrize("name", ["lora-sentiment", "qlora-qa"])
def test_sentiment_recipes_lower_held_out_loss_on_sst2(name, tmp_path, monkeypatch):
    train, dev = shared_data("sentiment", "train.jsonl"), shared_data("sentiment", "dev.jsonl")
    # The real builtin:tiny (the full pretrain-tiny recipe), in a cache of this test's own.
    monkeypatch.setenv("ADAPTERKIT_CACHE", str(tmp_path.parent / "real-builtin-cache"))
    recipe, src = load_recipe(name, [
        "data.task=sentiment", f"data.train={train}", f"data.eval={dev}", "data.max_length=128",
        "train.max_steps=150", "train.batch_size=16", "train.lr=2e-3", "train.log_every=25",
        "train.save_every=null", f"output_dir={tmp_path / 'run'}",
    ])
    result = run(recipe, src)
    metrics = json.loads((result.out / "manifest.json").read_text())["metrics"]
    print(f"{name}: held-out loss {metrics['eval_loss_before']:.3f} -> {metrics['eval_loss_after']:.3f}")
    assert metrics["eval_loss_after"] < 0.5 * metrics["eval_loss_before"]
