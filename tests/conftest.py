"""Shared fixtures: an offline environment, a tiny model built in-process, and a fast builtin:tiny.

No test reaches the network: the hub clients are put in offline mode and every model is built
here from a config, with a tokenizer trained on the shipped sample corpus.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

# builtin:tiny as the tests build it: the real pretrain-tiny recipe, cut to a few steps.
FAST_BUILTIN = ["train.max_steps=8", "train.save_every=null", "data.eval=null"]


# Set before any test module imports transformers or huggingface_hub, which read them at import.
os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
# Triton kernels (adapterkit.kernels, Liger) run on a CPU only under Triton's interpreter, which Triton
# reads when a kernel is defined: set before any is.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session", autouse=True)
def offline_env(tmp_path_factory):
    """A private adapterkit cache for the whole session (the hub clients are offline from import)."""
    cache = tmp_path_factory.mktemp("adapterkit-cache")
    saved = os.environ.get("ADAPTERKIT_CACHE")
    os.environ["ADAPTERKIT_CACHE"] = str(cache)
    yield cache
    if saved is None:
        os.environ.pop("ADAPTERKIT_CACHE", None)
    else:
        os.environ["ADAPTERKIT_CACHE"] = saved


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 2-layer, 64-wide random Llama with a BPE tokenizer trained on the sample corpus, saved to disk."""
    from transformers import LlamaConfig, LlamaForCausalLM, set_seed

    from adapterkit.data.loading import SAMPLES
    from adapterkit.models import train_tokenizer

    out = tmp_path_factory.mktemp("tiny-model")
    texts = (SAMPLES / "text" / "train.txt").read_text(encoding="utf-8").split("\n\n")
    tok = train_tokenizer(texts, vocab_size=1024)
    set_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, tie_word_embeddings=True,
                         # Wide enough an init that a frozen, tied embedding still lets adapters move the
                         # logits (at the default 0.02 the reachable logit range is about +-1.3).
                         initializer_range=0.3)
    LlamaForCausalLM(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def fast_builtin(offline_env) -> Path:
    """Make `builtin:tiny` resolve to a few-step pretraining of the real pretrain-tiny recipe."""
    from adapterkit.builtin import builtin_run_dir
    from adapterkit.stages import build_builtin

    built = build_builtin("tiny", FAST_BUILTIN)
    target = builtin_run_dir("tiny")
    if not target.exists():
        shutil.copytree(built.parent, target)
    return target / "model"


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def shared_data(*parts: str) -> Path:
    """A file from ../shared/data, or skip the test saying why."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent: the real datasets live in ../shared/data beside the checkout")
    return path
