"""The memory plan: a 7B model planned from its config.json alone, the plan's orderings (QLoRA weighs
less than LoRA, checkpointing saves activations), the nearest setting that fits, bad input, and one
prediction checked against a peak measured on a real training run."""

from __future__ import annotations

import importlib.util
import json
import shlex
import time
from pathlib import Path

import pytest

from adapterkit import plan as memory
from adapterkit.cli import main
from adapterkit.config import load_recipe

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "memory_plan.py"

# Llama-2-7B's config.json (the fields that shape it).
LLAMA_2_7B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
              "intermediate_size": 11008, "num_attention_heads": 32, "num_hidden_layers": 32,
              "num_key_value_heads": 32, "vocab_size": 32000, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
              "tie_word_embeddings": False, "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2,
              "torch_dtype": "float16"}
LLAMA_2_7B_PARAMETERS = 6_738_415_616


def cli(capsys, *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as e:
        main(list(args))
    out, err = capsys.readouterr()
    return e.value.code, out, err


@pytest.fixture(scope="module")
def llama_7b(tmp_path_factory) -> Path:
    """A directory holding nothing but Llama-2-7B's config.json: no weights, no tokenizer."""
    path = tmp_path_factory.mktemp("llama-2-7b") / "config.json"
    path.write_text(json.dumps(LLAMA_2_7B))
    return path


@pytest.fixture(scope="module")
def facts_7b(llama_7b) -> memory.ModelFacts:
    from transformers import AutoConfig

    return memory.ModelFacts.of(AutoConfig.from_pretrained(llama_7b), "llama-2-7b")


def plan_7b(facts, *overrides: str, device: str = "cuda") -> memory.MemoryPlan:
    recipe, _ = load_recipe("lora-sentiment", list(overrides))
    return memory.estimate(recipe, facts, device)


def test_a_7b_model_is_planned_from_its_config_json_alone(capsys, llama_7b):
    start = time.time()
    code, out, err = cli(capsys, "plan", "lora-sentiment", "--model-config", str(llama_7b), "--gpu-memory", "80GiB",
                         "--json")
    assert code == 0, err
    assert time.time() - start < 120  # built on the meta device: nothing of 13 GB is loaded
    assert list(llama_7b.parent.iterdir()) == [llama_7b]
    got = json.loads(out)
    assert got["parameters"] == LLAMA_2_7B_PARAMETERS
    assert got["trainable"] == 39_976_960  # LoRA r16 on q, k, v, o, gate, up, down of 32 layers, as peft counts
    assert got["weights"]["bfloat16 base (frozen)"] == 2 * LLAMA_2_7B_PARAMETERS
    assert got["fits"] is True and got["total"] < got["budget"] and got["setting"]["precision"] == "bf16"
    for key in ("gradients", "optimizer_state", "activations", "lm_head", "peak"):
        assert got[key] > 0, key
    # On a GPU the CUDA context and the allocator's slack come on top of the tensors, stated apart.
    assert set(got["overhead"]) == {"CUDA context", "allocator fragmentation (10%)"}


def test_the_table_names_every_part_of_the_peak(capsys, llama_7b):
    code, out, _ = cli(capsys, "plan", "qlora-qa", "--model-config", str(llama_7b))
    assert code == 0
    for label in ("weights", "nf4 4-bit base (224 matrices)", "absmax (double-quantised)", "trainable parameters",
                  "gradients", "optimizer state", "activations", "with gradient checkpointing", "logits and loss",
                  "peak (tensors)", "CUDA context", "fragmentation", "total"):
        assert label in out, label
    assert "fit" not in out  # no --gpu-memory, no verdict


def test_qlora_weighs_less_than_lora_and_lora_less_than_full(facts_7b):
    full, lora, qlora = (plan_7b(facts_7b, f"adapter.method={m}") for m in ("full", "lora", "qlora"))
    assert qlora.weights_total < lora.weights_total < full.weights_total
    assert full.weights_total == 4 * LLAMA_2_7B_PARAMETERS  # float32 master weights
    quantized = 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)  # every decoder linear; embeddings and head stay
    assert qlora.weights["nf4 4-bit base (224 matrices)"] == quantized // 2
    assert qlora.weights["float32 embeddings, head, norms (not 4-bit)"] == 4 * (LLAMA_2_7B_PARAMETERS - quantized)
    assert lora.trainable == qlora.trainable and lora.gradients == qlora.gradients
    assert full.optimizer_state == 8 * LLAMA_2_7B_PARAMETERS


def test_the_fused_4bit_path_is_planned_with_what_it_keeps(facts_7b):
    qlora = ("adapter.method=qlora", "train.gradient_checkpointing=false", "data.max_length=1024")
    off, fused = plan_7b(facts_7b, *qlora), plan_7b(facts_7b, *qlora, "train.kernels=adapterkit")
    assert fused.setting["kernels"] == "fused 4-bit LoRA and MLP" and off.setting["kernels"] == "off"
    tokens = 4 * 1024  # lora-sentiment's micro-batch of 4
    # Per layer and token: act(gate) (11008 float32) goes, and so do peft's bf16 LoRA input copies (q,
    # k, v, gate, up, o, down: one each), for one shared float32 input per group (q/k/v, gate/up) and
    # o_proj's input. Exactly: 32 layers x (4 x 11008 + 22,016) bytes per token.
    saved = off.activations - fused.activations
    assert saved == 32 * tokens * (4 * 11008 + 3 * (6 * 4096 + 11008) - (6 * 4096 + 11008 + 3 * 4 * 4096))
    assert fused.weights == off.weights and fused.lm_head == off.lm_head
    lora = plan_7b(facts_7b, "adapter.method=lora", "train.kernels=adapterkit")
    assert lora.setting["kernels"] == "off" and any("for qlora" in n for n in lora.notes)
    assert lora.activations == plan_7b(facts_7b, "adapter.method=lora").activations
    # the loss on whole logits, for comparison: logits in bf16, their float32 upcast and gradient
    assert off.full_logits == (tokens - 4) * 32000 * (2 + 4 + 4)


def test_checkpointing_lowers_activations_and_the_peak(facts_7b):
    plain = plan_7b(facts_7b, "data.max_length=2048")
    checkpointed = plan_7b(facts_7b, "data.max_length=2048", "train.gradient_checkpointing=true")
    assert checkpointed.activations < plain.activations / 10
    assert checkpointed.activations == plain.activations_checkpointed
    assert checkpointed.peak < plain.peak
    longer = plan_7b(facts_7b, "data.max_length=4096")
    assert longer.activations > 1.9 * plain.activations  # activations grow with the tokens per micro-batch


def test_a_run_that_does_not_fit_gets_the_nearest_setting_that_does(capsys, llama_7b):
    budget = "12GiB"
    args = ["plan", "lora-sentiment", "data.max_length=1024", "--model-config", str(llama_7b), "--gpu-memory", budget]
    code, out, _ = cli(capsys, *args)
    assert code == 0
    assert "does NOT fit in 12.00 GiB" in out and "nearest that fits" in out
    code, out, _ = cli(capsys, *args, "--json")
    got = json.loads(out)
    assert got["fits"] is False
    command = shlex.split(got["suggestion"]["command"])
    assert command[:4] == ["adapterkit", "recipe", "run", "lora-sentiment"]
    assert "data.max_length=1024" in command  # the user's own overrides are kept
    # The proposal is a valid recipe whose own plan fits, and keeps the effective batch.
    _, _, proposed = memory.plan_recipe("lora-sentiment", command[4:], "cuda", str(llama_7b))
    assert proposed.fits(memory.parse_memory(budget))
    asked = load_recipe("lora-sentiment", [])[0].train
    assert proposed.setting["batch_size"] * proposed.setting["grad_accum"] == asked.batch_size * asked.grad_accum


def test_8bit_and_paged_optimizers_shrink_what_the_gpu_holds(facts_7b):
    """`train.optimizer` is read where the config has it (the recipe here is given one by hand)."""
    from types import SimpleNamespace

    recipe, _ = load_recipe("full-chat", [])
    plans = {}
    for name in ("adamw", "adamw_8bit", "paged_adamw_8bit"):
        recipe.train = SimpleNamespace(**{**vars(recipe.train), "optimizer": name})
        plans[name] = memory.estimate(recipe, facts_7b)
    assert plans["adamw_8bit"].optimizer_state < plans["adamw"].optimizer_state / 3.5
    assert plans["paged_adamw_8bit"].optimizer_state == plans["adamw_8bit"].optimizer_state
    assert plans["paged_adamw_8bit"].peak == plans["adamw_8bit"].peak - plans["adamw_8bit"].optimizer_state


def test_nothing_nearby_fits_a_tiny_budget(facts_7b):
    assert memory.nearest_fit("lora-sentiment", [], facts_7b, memory.parse_memory("1GiB")) is None


def test_candidates_go_from_cheap_to_drastic():
    recipe, _ = load_recipe("full-chat", ["train.batch_size=4", "train.grad_accum=1"])
    moves = memory.candidates(recipe, "cuda")
    assert moves[:3] == [{"train.gradient_checkpointing": "true"},
                         {"train.gradient_checkpointing": "true", "train.batch_size": "2", "train.grad_accum": "2"},
                         {"train.gradient_checkpointing": "true", "train.batch_size": "1", "train.grad_accum": "4"}]
    methods = [m.get("adapter.method", "full") for m in moves]
    assert methods == sorted(methods, key=["full", "lora", "qlora"].index) and methods[-1] == "qlora"


@pytest.mark.parametrize("text, expected", [("12GiB", 12 * 2**30), ("12GB", 12 * 10**9), ("12000MiB", 12000 * 2**20),
                                            ("11.5 gib", int(11.5 * 2**30))])
def test_memory_sizes_parse(text, expected):
    assert memory.parse_memory(text) == expected


@pytest.mark.parametrize("bad", ["12", "twelve GiB", "12 GiBs", "0GB", "-3GiB"])
def test_a_bad_gpu_memory_exits_2_with_the_fix(capsys, bad):
    code, out, err = cli(capsys, "plan", "lora-sentiment", "--gpu-memory", bad)
    assert code == 2 and out == ""
    assert f"--gpu-memory: {bad!r} is not an amount of memory" in err and "fix: write a number and a unit" in err
    assert "Traceback" not in err


def test_a_hub_model_that_cannot_be_reached_exits_2_and_names_model_config(capsys):
    code, _, err = cli(capsys, "plan", "lora-sentiment", "model.name_or_path=nobody-here/no-such-model-7b")
    assert code == 2 and "Traceback" not in err
    assert "could not read the config of 'nobody-here/no-such-model-7b'" in err and "--model-config" in err


def test_a_missing_model_config_exits_2(capsys, tmp_path):
    code, _, err = cli(capsys, "plan", "lora-sentiment", "--model-config", str(tmp_path / "nope" / "config.json"))
    assert code == 2 and "--model-config: could not read a model config from" in err and "Traceback" not in err


def test_the_builtin_base_is_planned_without_being_built(capsys, offline_env):
    cache = sorted((offline_env / "builtin").rglob("*"))
    code, out, err = cli(capsys, "plan", "lora-sentiment", "--device", "cpu")
    assert code == 0, err
    assert "on this CPU" in out and "builtin:tiny" in out
    assert sorted((offline_env / "builtin").rglob("*")) == cache  # planning never pretrains the built-in base


@pytest.mark.parametrize("method, extra", [("full", []), ("lora", []), ("lora", ["adapter.lora.dora=true"]),
                                           ("prompt_tuning", []), ("prefix_tuning", []), ("p_tuning", [])])
def test_the_trainable_count_is_what_training_wraps(tiny_model_dir, method, extra):
    from transformers import AutoModelForCausalLM

    from adapterkit.adapters import METHODS, trainable_parameters

    recipe, _ = load_recipe("lora-sentiment", [f"model.name_or_path={tiny_model_dir}", f"adapter.method={method}",
                                               *extra])
    config, name = memory.model_config(recipe)
    planned = memory.estimate(recipe, memory.ModelFacts.of(config, name), "cpu")
    wrapped = METHODS[method].wrap(AutoModelForCausalLM.from_pretrained(tiny_model_dir), recipe.adapter,
                                   tokenizer_source=str(tiny_model_dir))
    assert planned.trainable == trainable_parameters(wrapped)[0]
    assert planned.parameters == AutoModelForCausalLM.from_pretrained(tiny_model_dir).num_parameters()


def test_the_predicted_peak_matches_a_measured_training_run(tmp_path, tiny_model_dir):
    """One configuration of benchmarks/memory_plan.py, on the tiny test model (the benchmark has the table)."""
    spec = importlib.util.spec_from_file_location("memory_plan_benchmark", BENCHMARK)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    got = bench.measure(tiny_model_dir, "lora", 96, 2, [], tmp_path)
    predicted = bench.predict(tiny_model_dir, "lora", 96, 2, [], tmp_path)
    assert predicted.weights_total == pytest.approx(got["baseline"], rel=0.01)
    assert predicted.peak == pytest.approx(got["peak"], rel=0.1)  # the benchmark table: all within 1%


def test_auto_checkpointing_turns_on_only_when_the_run_would_not_fit(facts_7b):
    recipe, _ = load_recipe("lora-sentiment", ["data.max_length=1024"])
    assert recipe.train.gradient_checkpointing == "auto"  # the default
    off = memory.estimate(memory.with_checkpointing(recipe, False), facts_7b, "cuda").total
    on = memory.estimate(memory.with_checkpointing(recipe, True), facts_7b, "cuda").total
    assert on < off
    assert memory.auto_checkpointing(recipe, facts_7b, "cuda", off)[0] is False
    decided, why = memory.auto_checkpointing(recipe, facts_7b, "cuda", off - 1)
    assert decided is True and "may still not fit" not in why
    decided, why = memory.auto_checkpointing(recipe, facts_7b, "cuda", on - 1)
    assert decided is True and "may still not fit" in why  # on is the best it can do; the plan says more
    # A CPU process holds more than its tensors: the same budget that fits a GPU run is short on a CPU.
    cpu_off = memory.estimate(memory.with_checkpointing(recipe, False), facts_7b, "cpu").total
    assert memory.auto_checkpointing(recipe, facts_7b, "cpu", cpu_off)[0] is True
    prefix, _ = load_recipe("lora-sentiment", ["adapter.method=prefix_tuning"])
    assert memory.auto_checkpointing(prefix, facts_7b, "cuda", 1)[0] is False  # prefix tuning cannot checkpoint


def test_plan_decides_auto_for_the_gpu_memory_given(capsys, llama_7b):
    args = ["plan", "lora-sentiment", "data.max_length=1024", "--model-config", str(llama_7b)]
    code, out, _ = cli(capsys, *args, "--json")
    off = json.loads(out)
    assert code == 0 and off["setting"]["gradient_checkpointing"] is False  # no budget: planned off
    assert any("gradient checkpointing auto" in n for n in off["notes"])
    budget = str(off["total"] - 1) + "B"  # one byte short: auto turns it on, and then it fits
    code, out, _ = cli(capsys, *args, "--gpu-memory", budget)
    assert code == 0 and "gradient checkpointing on" in out and "fits in" in out and "NOT" not in out
    assert "gradient checkpointing auto: on" in out


def test_a_run_decides_auto_from_the_free_memory_and_records_it(tmp_path, tiny_model_dir, monkeypatch):
    from adapterkit.stages import run

    common = [f"model.name_or_path={tiny_model_dir}", "data.eval=null", "train.max_steps=2", "train.save_every=null"]
    recipe, src = load_recipe("lora-sentiment", [*common, f"output_dir={tmp_path / 'roomy'}"])
    result = run(recipe, src, echo=False)
    manifest = json.loads((result.out / "manifest.json").read_text())
    assert manifest["gradient_checkpointing"] is False  # this machine has gigabytes free for a tiny model
    assert not result.model.get_base_model().is_gradient_checkpointing
    assert "gradient_checkpointing: auto" in (result.out / "recipe.yaml").read_text()  # what was asked is kept

    monkeypatch.setattr(memory.checkpointing, "free_memory", lambda dev, processes=1: 1 * memory.MiB)  # a machine short of memory
    recipe, src = load_recipe("lora-sentiment", [*common, f"output_dir={tmp_path / 'short'}"])
    result = run(recipe, src, echo=False)
    assert json.loads((result.out / "manifest.json").read_text())["gradient_checkpointing"] is True
    assert result.model.get_base_model().is_gradient_checkpointing


# -- adapterkit methods: every method on one model ------------------------------------------------------

def test_methods_lists_every_method_with_what_trains_and_what_fits(capsys, llama_7b):
    code, out, _ = cli(capsys, "methods", str(llama_7b), "--gpu-memory", "12GiB", "--json")
    rows = {r["method"]: r for r in json.loads(out)}
    assert code == 0 and list(rows) == ["prompt_tuning", "prefix_tuning", "p_tuning", "lora", "dora", "qlora", "full"]
    assert {r["family"] for r in rows.values()} == {"additive (soft prompt)", "reparameterised (low rank)",
                                                    "full fine-tuning"}
    # On Llama-2-7B in 12 GiB, of the low-rank methods only QLoRA fits; full fine-tuning trains every weight.
    assert rows["qlora"]["fits"] and not rows["lora"]["fits"] and not rows["full"]["fits"]
    assert rows["full"]["trainable"] == rows["full"]["parameters"] > 6.7e9
    assert rows["prompt_tuning"]["trainable"] < rows["lora"]["trainable"] < rows["dora"]["trainable"]
    assert rows["lora"]["trainable"] == rows["qlora"]["trainable"]
    assert rows["qlora"]["peak"] < rows["lora"]["peak"] < rows["full"]["peak"]
    assert rows["p_tuning"]["merges"].startswith("no") and rows["lora"]["merges"] == "yes"
    # A row is the memory plan of that method (adapterkit plan's own numbers).
    _, plan_out, _ = cli(capsys, "plan", "lora-sentiment", "adapter.method=qlora", "adapter.lora.dora=false",
                         "--model-config", str(llama_7b), "--gpu-memory", "12GiB", "--json")
    assert json.loads(plan_out)["total"] == rows["qlora"]["peak"]
    # Overrides apply to every row: a longer sequence costs the LoRA run more memory.
    _, longer, _ = cli(capsys, "methods", str(llama_7b), "--json", "data.max_length=2048")
    assert json.loads(longer)[3]["peak"] > rows["lora"]["peak"]


def test_methods_counts_what_peft_trains_on_the_real_model(capsys, tiny_model_dir):
    """The trainable count of the LoRA row equals peft's on the model really loaded and wrapped."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from adapterkit.adapters.lora import lora_config

    code, out, _ = cli(capsys, "methods", str(tiny_model_dir), "--device", "cpu", "--json")
    rows = {r["method"]: r for r in json.loads(out)}
    recipe, _ = load_recipe("lora-sentiment", ["adapter.lora.dora=false"])
    wrapped = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), lora_config(recipe.adapter.lora))
    trainable, total = wrapped.get_nb_trainable_parameters()
    assert code == 0 and rows["lora"]["trainable"] == trainable and rows["lora"]["parameters"] == total - trainable
    assert rows["lora"]["fits"] is None  # no --gpu-memory: nothing to fit in


def test_methods_shows_a_refused_method_and_refuses_a_missing_model(capsys, tmp_path):
    from architectures import build

    falcon = build("falcon", tmp_path / "falcon")
    code, out, _ = cli(capsys, "methods", str(falcon), "--device", "cpu")
    assert code == 0 and "qlora refused: 'qlora': transformers quantises no layer of" in out, out
    assert "use adapter.method=lora" in out
    assert "lora " in out and "full fine-tuning" in out
    code, _, err = cli(capsys, "methods", str(tmp_path / "nope"))
    assert code == 2 and "nope" in err and "Traceback" not in err
