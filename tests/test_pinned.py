"""Pinned losses: five steps of LoRA SFT and of DPO on a 2-layer model built from a fixed seed, against the
losses this code produced when the test was written (as torchtune pins its recipes). A change anywhere in
the path (formatting, tokenization, masking, packing, the loss, the optimizer, the schedule, the
reference model) moves them. If a change is meant to move them, regenerate and paste:

    python tests/test_pinned.py

The tolerance (1e-4 relative) absorbs float32 reductions ordered differently by another CPU's kernels
(AVX512 or not), not a change of what is computed; every run is fp32 on the CPU.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_methods import MEMO  # noqa: E402

from adapterkit.config import load_recipe  # noqa: E402
from adapterkit.stages import run  # noqa: E402

PAIRS = [{"prompt": f"Which fruit is {colour}?", "chosen": fruit, "rejected": other}
         for colour, fruit, other in [("yellow", "A banana.", "A cherry."), ("red", "A cherry.", "A banana."),
                                      ("orange", "An orange.", "A plum."), ("purple", "A plum.", "An orange."),
                                      ("green", "A lime.", "A lemon."), ("brown", "A date.", "A lime."),
                                      ("pink", "A peach.", "A date."), ("blue", "A blueberry.", "A peach.")]]

EXPECTED = {
    "sft": [9.637141, 6.564431, 4.083185, 2.36337, 1.269586],
    "dpo": [0.693147, 0.300216, 0.137216, 0.071381, 0.036055],  # starts at log 2: the policy is its reference
}
"""Losses at steps 1-5, from `python tests/test_pinned.py`."""

COMMON = ["train.max_steps=5", "train.lr=1e-2", "train.schedule=constant", "train.warmup_ratio=0", "train.batch_size=8",
          "train.log_every=1", "train.save_every=null", "train.precision=fp32", "train.seed=0", "data.eval=null",
          "adapter.lora.dropout=0"]


def build_model(out: Path) -> Path:
    """A 2-layer, 64-wide random Llama (seed 0) with a BPE tokenizer trained on the sample corpus."""
    from transformers import LlamaConfig, LlamaForCausalLM, set_seed

    from adapterkit.data.loading import SAMPLES
    from adapterkit.models import train_tokenizer

    texts = (SAMPLES / "text" / "train.txt").read_text(encoding="utf-8").split("\n\n")
    tok = train_tokenizer(texts, vocab_size=1024)
    set_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                         tie_word_embeddings=True, initializer_range=0.3)
    LlamaForCausalLM(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def losses(work: Path) -> dict[str, list[float]]:
    """The per-step losses of the pinned sft and dpo runs, built and trained under `work`."""
    model = build_model(work / "model")
    memo, pairs = work / "memo.jsonl", work / "pairs.jsonl"
    memo.write_text("".join(json.dumps(r) + "\n" for r in MEMO))
    pairs.write_text("".join(json.dumps(r) + "\n" for r in PAIRS))
    out = {}
    for stage, recipe_name, data in (("sft", "lora-sentiment", memo), ("dpo", "dpo-preference", pairs)):
        recipe, src = load_recipe(recipe_name, [f"model.name_or_path={model}", f"data.train={data}", *COMMON,
                                                f"output_dir={work / stage}"])
        run(recipe, src, echo=False)
        log = [json.loads(line) for line in (work / stage / "train_log.jsonl").read_text().splitlines()]
        out[stage] = [round(r["loss"], 6) for r in log if "loss" in r]
    return out


@pytest.mark.parametrize("stage", sorted(EXPECTED))
def test_pinned_losses(tmp_path_factory, stage):
    got = _losses(tmp_path_factory)
    assert got[stage] == pytest.approx(EXPECTED[stage], rel=1e-4), (
        f"{stage} losses moved: {got[stage]} (expected {EXPECTED[stage]}); if that is intended, "
        "regenerate with `python tests/test_pinned.py`")


_CACHE: dict[str, list[float]] = {}


def _losses(factory) -> dict[str, list[float]]:
    if not _CACHE:
        _CACHE.update(losses(factory.mktemp("pinned")))
    return _CACHE


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        print(json.dumps(losses(Path(tmp)), indent=4))
