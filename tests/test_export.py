"""`adapterkit export`: merged exports load with plain transformers and compute what the trained model
computed; QLoRA merges into the weights it trained against; soft prompts export their adapter; a merge
that loses the adapter, or uses the wrong base, is caught; bad input exits 2 and writes nothing.

    python -m pytest -q tests/test_export.py -s     # -s prints the parity numbers of each method
"""

from __future__ import annotations

import gc
import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import adapterkit.export as export_mod
from adapterkit.cli import main
from adapterkit.config import load_recipe
from adapterkit.export import ParityFailed, export, parity_batch
from adapterkit.stages import run
from adapterkit.trained import load_trained

# One run per way an export is built: (recipe, overrides). Adapters get a high learning rate so that they
# move the logits far more than any tolerance: a merge that lost them could not pass.
RUNS = {
    "lora": ("lora-sentiment", ["train.lr=1e-2"]),
    "lora-dora-rslora": ("lora-sentiment", ["train.lr=1e-2", "adapter.lora.dora=true", "adapter.lora.rslora=true"]),
    "qlora": ("qlora-qa", ["train.lr=1e-2"]),
    "full": ("full-chat", []),
    "prompt_tuning": ("prompt-tuning-translation", ["train.lr=1e-1"]),
}
MERGED = ["lora", "lora-dora-rslora", "qlora", "full"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """64-wide matmuls are too small to split across threads: on a busy 2-core machine two threads made
    an export 5x slower (12 s against 2.3 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir):
    """runs(name) -> a finished run directory on the tiny model (trained on first use)."""
    root = tmp_path_factory.mktemp("export-runs")

    def get(name: str) -> Path:
        out = root / name
        if not (out / "model").is_dir():
            recipe_name, extra = RUNS[name]
            recipe, src = load_recipe(recipe_name, [
                f"model.name_or_path={tiny_model_dir}", *extra, "train.max_steps=8", "train.precision=fp32",
                "data.eval=null", "train.save_every=null", "train.log_every=4", f"output_dir={out}"])
            run(recipe, src, echo=False)
        return out

    return get


@pytest.fixture(scope="module")
def exported(tmp_path_factory, runs):
    """exported(name) -> (run dir, export dir) of the run's default export (made on first use)."""
    root = tmp_path_factory.mktemp("exports")

    def get(name: str) -> tuple[Path, Path]:
        out = root / name
        if not out.is_dir():
            export(runs(name), out, say=lambda *a: None)
        return runs(name), out

    return get


def _export_json(out: Path) -> dict:
    return json.loads((out / "export.json").read_text())


def _leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".export-" in p.name]


@pytest.mark.parametrize("name", MERGED)
def test_merged_export_reproduces_the_trained_model(exported, name):
    run_dir, out = exported(name)
    info = _export_json(out)
    p = info["parity"]
    print(f"\n{name}: max|Δlogits| {p['max_abs_logit_diff']:.3g} (logit scale {p['logit_scale']:.3g}, tolerance "
          f"{p['tolerance']:.3g}), greedy identical {p['greedy_identical']}/{p['rows']}")
    assert p["passed"] and p["max_abs_logit_diff"] <= p["tolerance"] and not p["forced"]
    assert p["greedy_identical"] == p["rows"] == 8 and p["source"].startswith("data.train")
    assert info["format"] == "merged" and info["dtype"] == "float32"  # the tiny base is saved in float32
    # A standalone model: weights and config, no adapter, no quantisation left.
    names = {f.name for f in out.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "README.md",
            "format.json"} <= names and "adapter_config.json" not in names
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    # Lineage: the run, its recipe and method, the versions, in export.json and the model card.
    card = (out / "README.md").read_text()
    assert info["run"] == str(run_dir.resolve()) and str(run_dir.resolve()) in card
    assert info["adapter"]["method"] in card and info["recipe"] == RUNS[name][0] and "torch" in card
    assert info["versions"]["training"] == json.loads((run_dir / "manifest.json").read_text())["versions"]
    assert info["versions"]["export"]["peft"] == importlib.metadata.version("peft")


@pytest.fixture(scope="module")
def plain_loaded(exported, tmp_path_factory):
    """Each merged export loaded in a fresh interpreter where peft, adapterkit and bitsandbytes cannot be
    imported: its logits on a fixed text, its EOS/pad settings and its chat template."""
    dirs = {name: str(exported(name)[1]) for name in MERGED}
    result = tmp_path_factory.mktemp("plain") / "loaded.pt"
    script = f"""
import sys
for blocked in ("peft", "adapterkit", "bitsandbytes"):
    sys.modules[blocked] = None
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
out = {{}}
for name, path in {dirs!r}.items():
    model, tok = AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    ids = tok("the film was great, a joy", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits[0]
    gen = model.generation_config
    out[name] = dict(ids=ids[0], logits=logits, eos=gen.eos_token_id, pad=gen.pad_token_id,
                     tok_eos=tok.eos_token_id, tok_pad=tok.pad_token_id, chat_template=tok.chat_template)
torch.save(out, {str(result)!r})
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(result)


@pytest.mark.parametrize("name", MERGED)
def test_plain_transformers_loads_the_export_and_matches_the_trained_model(plain_loaded, runs, name):
    loaded = plain_loaded[name]
    trained = load_trained(runs(name))
    with torch.no_grad():
        expected = trained.model(input_ids=loaded["ids"][None]).logits[0]
    assert loaded["logits"].shape == expected.shape
    assert (loaded["logits"] - expected).abs().max() <= 1e-4 * max(1.0, expected.abs().max().item())
    # Generation stops where the trained model learned to: EOS (and pad) as in training.
    assert loaded["eos"] == loaded["tok_eos"] == trained.tokenizer.eos_token_id
    assert loaded["pad"] == loaded["tok_pad"] == trained.tokenizer.pad_token_id


def test_chat_template_survives_the_export(plain_loaded, runs):
    from adapterkit.data.formatter import FALLBACK_CHAT_TEMPLATE

    trained = load_trained(runs("full"))  # full-chat: the tiny tokenizer has no template, so the run saved one
    assert trained.tokenizer.chat_template == FALLBACK_CHAT_TEMPLATE
    assert plain_loaded["full"]["chat_template"] == FALLBACK_CHAT_TEMPLATE
    assert plain_loaded["lora"]["chat_template"] is None  # a plain-template run gains none


def test_qlora_merges_into_the_weights_it_trained_against(exported, runs, tmp_path):
    """Merged into the dequantised NF4 base, the export reproduces the trained model; merged naively into
    the original full-precision base it does not, and the export is refused unless forced."""
    run_dir, out = exported("qlora")
    info = _export_json(out)
    dequantised = info["parity"]["max_abs_logit_diff"]
    assert info["merge_base"] == "quantized" and "dequantised by bitsandbytes" in info["weights"]

    naive_out = tmp_path / "naive"
    with pytest.raises(ParityFailed) as refused:
        export(run_dir, naive_out, base="original", say=lambda *a: None)
    naive = refused.value.parity.max_abs_logit_diff
    print(f"\nqlora max|Δlogits|: dequantised NF4 base {dequantised:.3g}, original base {naive:.3g}")
    assert dequantised * 1000 < naive
    assert refused.value.exit_code == 3 and "does not reproduce" in str(refused.value)
    assert "leave --base out" in str(refused.value)
    assert not naive_out.exists() and not _leftovers(tmp_path)


def test_parity_check_catches_a_merge_that_drops_the_adapter(runs, tmp_path, monkeypatch):
    def base_only(trained, dtype, base, dev):
        model, trained.model = trained.model, None
        return model.unload(), "the base alone"

    monkeypatch.setattr(export_mod, "_merge", base_only)
    out = tmp_path / "broken"
    with pytest.raises(ParityFailed) as failed:
        export(runs("lora"), out, say=lambda *a: None)
    assert not failed.value.parity.passed and failed.value.parity.greedy_identical < 8
    assert not out.exists() and not _leftovers(tmp_path)

    forced = export(runs("lora"), out, force=True, say=lambda *a: None)  # --force writes it, and says so
    assert forced["parity"]["forced"] and not forced["parity"]["passed"] and forced["weights"] == "the base alone"
    assert "FAILED (written with --force)" in (out / "README.md").read_text()


def test_soft_prompt_exports_its_adapter_and_refuses_to_merge(runs, tiny_model_dir, tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run_dir, out = runs("prompt_tuning"), tmp_path / "prompt"
    with pytest.raises(SystemExit) as done:
        main(["export", str(run_dir), "--out", str(out)])
    assert done.value.code == 0
    assert "prompt_tuning cannot be merged into the weights" in capsys.readouterr().out
    info = _export_json(out)
    assert info["format"] == "adapter" and info["weights"] is None
    assert info["parity"]["passed"] and info["parity"]["max_abs_logit_diff"] == 0.0
    assert (out / "adapter_config.json").is_file() and not (out / "model.safetensors").exists()
    # The exported adapter, on the plain base, computes what the trained model does.
    trained = load_trained(run_dir)
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out).eval()
    ids = trained.tokenizer("hello world", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(trained.model(input_ids=ids).logits, reloaded(input_ids=ids).logits)

    with pytest.raises(SystemExit) as refused:
        main(["export", str(run_dir), "--out", str(tmp_path / "merged"), "--merge"])
    assert refused.value.code == 2
    err = capsys.readouterr().err
    assert "--merge: a prompt_tuning adapter cannot be merged" in err and "Traceback" not in err
    assert not (tmp_path / "merged").exists()


def test_no_merge_exports_the_lora_adapter_and_force_replaces_an_export(runs, tmp_path):
    out = tmp_path / "adapter"
    info = export(runs("lora"), out, merge=False, say=lambda *a: None)
    assert info["format"] == "adapter" and info["parity"]["max_abs_logit_diff"] == 0.0
    assert (out / "adapter_model.safetensors").is_file()
    assert "PeftModel.from_pretrained" in (out / "README.md").read_text()
    (out / "stale.txt").write_text("from before")
    again = export(runs("lora"), out, merge=False, force=True, say=lambda *a: None)
    assert _export_json(out) == again and not (out / "stale.txt").exists() and not _leftovers(tmp_path)


def test_parity_batch_prefers_the_runs_eval_data(runs):
    trained = load_trained(runs("lora"))
    trained.recipe.data.eval = "sample:sentiment/eval"
    batch = parity_batch(trained)
    assert batch.source == "data.eval (sample:sentiment/eval)" and len(batch.sequences) == 8
    eos = trained.tokenizer.eos_token_id
    assert all(seq[-1] == eos and seq[:len(p)] == p for seq, p in zip(batch.sequences, batch.prompts))


def _fake_unfinished_run(root: Path) -> Path:
    run_dir = root / "unfinished"
    run_dir.mkdir()
    (run_dir / "manifest.json").write_text(json.dumps({"status": "failed", "method": "lora"}))
    return run_dir


# (id, run name or a path maker (runs, tmp_path, tiny model dir), extra arguments, what the message must say)
BAD = [
    ("missing-run", lambda runs, tmp, tiny: tmp / "nope", [], "does not exist"),
    ("unfinished-run", lambda runs, tmp, tiny: _fake_unfinished_run(tmp), [],
     "this run has no final model (status: failed)"),
    ("model-dir-not-run", lambda runs, tmp, tiny: tiny, [], "is a model directory, not an adapterkit run"),
    ("bad-dtype", "lora", ["--dtype", "fp16"], "'fp16' is not a dtype adapterkit exports (did you mean 'float16'?)"),
    ("bad-base", "qlora", ["--base", "nf4"], "'nf4' is not a merge base"),
    ("base-on-lora", "lora", ["--base", "original"], "only QLoRA runs have a choice of merge base"),
    ("no-merge-full", "full", ["--no-merge"], "a full run has no adapter"),
    ("merge-soft-prompt", "prompt_tuning", ["--merge"], "cannot be merged into the weights"),
    ("dtype-no-merge", "lora", ["--no-merge", "--dtype", "bfloat16"], "--dtype sets the dtype of merged weights"),
    ("out-not-export", "lora", ["OUT=notes"], "is not an adapterkit export, so it is not replaced even with --force"),
    ("out-is-export", "lora", ["OUT=export"], "already holds an export"),
    ("out-is-run", "lora", ["OUT=run"], "would replace the run itself"),
]


@pytest.mark.parametrize("case, target, extra, message", BAD, ids=[row[0] for row in BAD])
def test_bad_input_exits_2_and_writes_nothing(runs, tiny_model_dir, tmp_path, capsys, case, target, extra, message):
    run_dir = runs(target) if isinstance(target, str) else target(runs, tmp_path, tiny_model_dir)
    out = tmp_path / "out"
    if "OUT=notes" in extra:
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    elif "OUT=export" in extra:
        out.mkdir()
        (out / "export.json").write_text("{}")
    elif "OUT=run" in extra:
        out = run_dir
    extra = [a for a in extra if not a.startswith("OUT=")] + (["--force"] if case == "out-not-export" else [])
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with pytest.raises(SystemExit) as done:
        main(["export", str(run_dir), "--out", str(out), *extra])
    err = capsys.readouterr().err
    assert done.value.code == 2, err
    assert message in err and "Traceback" not in err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_bf16_base_merges_in_bf16_holding_one_copy(tiny_model_dir, tmp_path, monkeypatch):
    """A bfloat16 base trained with float32 LoRA on a CPU exports in bfloat16 (the base's dtype): the base
    is loaded again in bfloat16 for the merge, never in float32, and only once the trained model is gone."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedModel, set_seed

    base = tmp_path / "base-bf16"
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    set_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, initializer_range=0.1,
                                 bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                 pad_token_id=tok.pad_token_id,
                                 tie_word_embeddings=True)).to(torch.bfloat16).save_pretrained(base)
    tok.save_pretrained(base)
    recipe, src = load_recipe("lora-sentiment", [
        f"model.name_or_path={base}", "train.max_steps=4", "train.precision=fp32", "data.eval=null",
        "train.save_every=null", f"output_dir={tmp_path / 'run'}"])
    run(recipe, src, echo=False)
    gc.collect()

    loads = []

    def spy(what, original):
        def load(*args, **kwargs):
            gc.collect()
            alive = sum(isinstance(o, PreTrainedModel) for o in gc.get_objects())
            model = original(*args, **kwargs)
            loads.append((what, next(model.parameters()).dtype, alive))
            return model
        return load

    monkeypatch.setattr("adapterkit.models.load_model", spy("base", export_mod.models.load_model))
    monkeypatch.setattr(export_mod, "_load_merged", spy("export", export_mod._load_merged))
    info = export(tmp_path / "run", tmp_path / "out", say=lambda *a: None)

    assert info["dtype"] == "bfloat16" and info["parity"]["passed"], info["parity"]
    # As trained (float32 on this CPU), then the merge's base and the reloaded export: bf16, each alone.
    assert loads == [("base", torch.float32, 0), ("base", torch.bfloat16, 0), ("export", torch.bfloat16, 0)]
    from safetensors import safe_open

    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
