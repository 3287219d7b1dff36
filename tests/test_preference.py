"""The preference stages on tiny models: DPO and KTO train only the adapter, the reference is the SFT
policy (a frozen copy of its adapter on the same base, not a second base), a pipeline chains its
stages and records the lineage, and bad preference data fails with exit code 2."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import write_jsonl
from test_methods import Snapshot
from transformers import AutoTokenizer, TrainerCallback

from adapterkit.cli import main
from adapterkit.config import load_recipe
from adapterkit import stages
from adapterkit.stages import preference
from adapterkit.trained import load_trained

QUIET = ["train.save_every=null", "train.log_every=1", "train.precision=fp32", "eval.limit=4",
         "eval.max_new_tokens=4"]


def sft_run(tmp_path, tiny_model_dir, method: str, *extra: str):
    """lora-generation (DoRA and rsLoRA), 12 steps."""
    recipe, src = load_recipe("lora-generation", [
        f"model.name_or_path={tiny_model_dir}", f"adapter.method={method}", "adapter.lora.dropout=0",
        "train.max_steps=12", "train.lr=2e-2", *QUIET, *extra, f"output_dir={tmp_path / ('sft-' + method)}"])
    return stages.run(recipe, src, echo=False).out


class ReferenceProbe(TrainerCallback):
    """At the first step, logits of the policy, of trl's reference (its 'ref' adapter) and of the base."""

    def __init__(self, batch):
        self.batch = batch

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        from trl.trainer.utils import use_adapter

        with torch.no_grad():
            self.policy = model(**self.batch).logits.float()
            self.adapters = set(model.peft_config)
            with use_adapter(model, adapter_name="ref" if "ref" in model.peft_config else None):  # as trl does
                self.reference = model(**self.batch).logits.float()
            with model.disable_adapter():
                self.base = model(**self.batch).logits.float()
        self.ref_before = {n: p.detach().clone() for n, p in model.named_parameters() if ".ref." in n}

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.ref_after = {n: p.detach().clone() for n, p in model.named_parameters() if ".ref." in n}


def losses(out):
    return [json.loads(line)["loss"] for line in (out / "train_log.jsonl").read_text().splitlines() if '"loss"' in line]


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_dpo_after_sft_trains_the_sft_adapter_against_the_sft_policy(tmp_path, tiny_model_dir, method, capsys):
    """preference.start_adapter=auto continues a QLoRA or DoRA run's adapter (merging would not be exact),
    and says so."""
    sft = sft_run(tmp_path, tiny_model_dir, method)
    sft_model = load_trained(sft)
    batch = sft_model.tokenizer(["Name a fruit that is yellow.\nResponse: A banana."], return_tensors="pt")
    with torch.no_grad():
        sft_logits = sft_model.model(**batch).logits.float()
    probe, snap = ReferenceProbe(batch), Snapshot()
    # Scored on the pairs it trains on: a few steps on a random toy need not generalise.
    recipe, src = load_recipe("dpo-preference", [f"model.from_run={sft}", "train.max_steps=8", "train.lr=5e-3",
                                                 "data.eval=sample:preference/train", *QUIET,
                                                 f"output_dir={tmp_path / 'dpo'}"])
    result = stages.run(recipe, src, callbacks=[probe, snap])
    why = "the run's base is 4-bit (qlora)" if method == "qlora" else "it is a DoRA adapter"
    said = capsys.readouterr().out
    assert "preference.start_adapter (auto): the run's adapter continues, since" in said and why in said

    # The reference is the SFT policy exactly, not the raw base; and it is the starting policy.
    assert torch.allclose(probe.reference, sft_logits, atol=1e-5), (probe.reference - sft_logits).abs().max()
    assert not torch.allclose(probe.base, sft_logits, atol=1e-2)
    assert torch.allclose(probe.policy, probe.reference, atol=1e-6)
    # So the first DPO loss is log 2 (policy = reference), and it falls from there.
    log = losses(result.out)
    assert log[0] == pytest.approx(math.log(2), abs=2e-3) and log[-1] < log[0]
    # Only the policy adapter trained: the base and trl's reference copy stayed frozen.
    changed = {n for n in snap.before if not torch.equal(snap.before[n], snap.after[n])}
    assert changed and all("lora_" in n and ".default" in n for n in changed), sorted(changed)[:4]
    assert probe.ref_before and all(torch.equal(probe.ref_before[n], probe.ref_after[n]) for n in probe.ref_before)
    # One copy of the base: for QLoRA it is 4-bit, shared by the policy and the reference.
    if method == "qlora":
        import bitsandbytes as bnb

        assert any(isinstance(m, bnb.nn.Linear4bit) for m in result.model.modules())
    # The saved adapter is the tuned policy only, and the manifest says where it came from.
    manifest = json.loads((result.out / "manifest.json").read_text())
    assert manifest["lineage"]["from_run"] == str(sft.resolve()) and manifest["method"] == method
    metrics = json.loads((result.out / "metrics.json").read_text())
    assert metrics["tuned"]["reward_margin"] > 0  # the implicit reward vs the SFT reference prefers chosen
    assert set(metrics["base"]) == {"preference_accuracy", "logp_margin"}


def test_dpo_after_a_lora_run_trains_a_new_adapter_on_it_merged_and_saves_one_adapter(tmp_path, tiny_model_dir):
    """preference.start_adapter=auto after a plain LoRA run: its adapter is merged into the base, a new
    adapter trains on top (the reference is the merged start, the new adapter switched off), and the
    saved adapter is both stacked, on the original base, equal to what trained."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    sft = sft_run(tmp_path, tiny_model_dir, "lora", "adapter.lora.dora=false")  # rsLoRA, not DoRA
    sft_model = load_trained(sft)
    batch = sft_model.tokenizer(["Name a fruit that is yellow.\nResponse: A banana."], return_tensors="pt")
    with torch.no_grad():
        sft_logits = sft_model.model(**batch).logits.float()
    snap = Snapshot()

    class Start(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            from trl.trainer.utils import use_adapter

            self.adapters = set(model.peft_config)
            with torch.no_grad():
                self.policy = model(**batch).logits.float()
                with use_adapter(model, adapter_name=None):  # trl's reference pass: adapters switched off
                    self.reference = model(**batch).logits.float()

    start = Start()
    recipe, src = load_recipe("dpo-preference", [f"model.from_run={sft}", "train.max_steps=6", "train.lr=5e-3",
                                                 "adapter.lora.r=4", "adapter.lora.alpha=8", *QUIET,
                                                 f"output_dir={tmp_path / 'dpo'}"])
    result = stages.run(recipe, src, echo=False, callbacks=[start, snap])

    # The base under the new adapter is the SFT policy merged, and it is the reference: no copy of an
    # adapter ("ref") is kept for it.
    assert start.adapters == {"default"}
    assert torch.allclose(start.reference, sft_logits, atol=1e-4), (start.reference - sft_logits).abs().max()
    assert torch.allclose(start.policy, start.reference, atol=1e-6)  # the new adapter starts as a no-op
    assert losses(result.out)[0] == pytest.approx(math.log(2), abs=2e-3)
    changed = {n for n in snap.before if not torch.equal(snap.before[n], snap.after[n])}
    assert changed and all("lora_" in n and ".default" in n for n in changed), sorted(changed)[:4]
    with torch.no_grad():
        trained = result.model(**batch).logits.float()
    assert not torch.allclose(trained, sft_logits, atol=1e-3)

    # One adapter on the original base: rank 16 (the SFT run's) + 4, and it is the model that trained.
    saved = json.loads((result.out / "model" / "adapter_config.json").read_text())
    sft_rank = json.loads((sft / "model" / "adapter_config.json").read_text())["r"]
    assert saved["r"] == sft_rank + 4
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(result.out / "model"))
    with torch.no_grad():
        reloaded = plain(**batch).logits.float()
    assert torch.allclose(reloaded, trained, atol=1e-4), (reloaded - trained).abs().max()
    assert "start_adapter: merge" in (result.out / "recipe.yaml").read_text()
    assert (result.out / "recipe.yaml").read_text().count("r: 4") == 1  # the new adapter's settings are saved


def test_stacking_two_lora_adapters_is_exact(tmp_path, tiny_model_dir):
    """lora.stack on adapters of different ranks, scalings (rsLoRA) and target modules: the base with the
    stacked adapter equals the base with the first merged and the second on top."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    from adapterkit.adapters import lora

    def random_adapter(name, **kw):
        torch.manual_seed(len(name))
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                               LoraConfig(task_type="CAUSAL_LM", init_lora_weights=False, **kw))
        model.save_pretrained(tmp_path / name)
        return tmp_path / name

    first = random_adapter("first", r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"])
    second = random_adapter("second", r=3, lora_alpha=5, use_rslora=True, target_modules=["q_proj", "o_proj"])
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(first)).merge_and_unload()
    with torch.no_grad():
        expected = PeftModel.from_pretrained(merged, str(second))(input_ids=ids).logits
    assert lora.stack_problem(first) is None and lora.stack_problem(second) is None
    lora.stack(first, second)
    stacked = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(second))
    with torch.no_grad():
        got = stacked(input_ids=ids).logits
    assert json.loads((second / "adapter_config.json").read_text())["r"] == 11
    assert torch.allclose(got, expected, atol=1e-4), (got - expected).abs().max()
    dora = random_adapter("dora", r=4, use_dora=True, target_modules=["q_proj"])
    assert "DoRA" in lora.stack_problem(dora)


def test_dpo_on_a_plain_model_uses_the_model_without_adapter_as_reference(tmp_path, tiny_model_dir):
    probe = ReferenceProbe({"input_ids": torch.tensor([[5, 6, 7, 8]])})
    recipe, src = load_recipe("dpo-preference", [f"model.name_or_path={tiny_model_dir}", "train.max_steps=4",
                                                 "preference.loss=ipo", *QUIET, f"output_dir={tmp_path / 'dpo'}"])
    result = stages.run(recipe, src, echo=False, callbacks=[probe])
    assert probe.adapters == {"default"}  # no copy of the fresh adapter is kept as the reference
    assert torch.allclose(probe.reference, probe.base, atol=1e-6)
    assert torch.allclose(probe.policy, probe.base, atol=1e-6)  # a fresh LoRA adapter starts as a no-op
    assert json.loads((result.out / "manifest.json").read_text())["lineage"] == {}  # started from no run


def test_kto_trains_on_unpaired_feedback(tmp_path, tiny_model_dir):
    sft = sft_run(tmp_path, tiny_model_dir, "lora", "adapter.lora.dora=false")  # merged, a new adapter on top
    snap = Snapshot()
    recipe, src = load_recipe("kto-feedback", [f"model.from_run={sft}", "train.max_steps=6", "train.lr=5e-3",
                                               *QUIET, f"output_dir={tmp_path / 'kto'}"])
    result = stages.run(recipe, src, echo=False, callbacks=[snap])
    changed = {n for n in snap.before if not torch.equal(snap.before[n], snap.after[n])}
    assert changed and all(".default" in n for n in changed)
    metrics = json.loads((result.out / "metrics.json").read_text())
    assert metrics["tuned"]["logp_gap"] != metrics["base"]["logp_gap"]  # the policy moved from its reference
    report = json.loads((result.out / "data_report.json").read_text())[0]
    assert report["labels"] == {"desirable": 24, "undesirable": 24}
    assert "start_adapter: merge" in (result.out / "recipe.yaml").read_text()


def test_pipeline_runs_its_stages_in_order_and_records_the_lineage(tmp_path, capsys):
    out = tmp_path / "pipe"
    args = ["recipe", "run", "pipeline-quickstart", "train.max_steps=2", "train.save_every=null", "eval.limit=2",
            "eval.max_new_tokens=2", f"output_dir={out}"]
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 0, capsys.readouterr().err
    record = json.loads((out / "pipeline.json").read_text())
    assert [s["name"] for s in record["stages"]] == ["pretrain", "sft", "dpo"]
    assert all(s["status"] == "completed" for s in record["stages"])
    sft = json.loads((out / "sft" / "manifest.json").read_text())
    dpo = json.loads((out / "dpo" / "manifest.json").read_text())
    assert sft["lineage"] == {"pipeline": "pipeline-quickstart", "stage": "sft",
                              "from_run": str((out / "pretrain").resolve())}
    assert sft["model_source"] == str(out / "pretrain" / "model")
    assert dpo["lineage"]["from_run"] == str((out / "sft").resolve())
    # Running it again finds every stage complete and trains nothing.
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 0 and capsys.readouterr().out.count("already complete") == 3


BAD_ROWS = [
    ({"prompt": "hi", "chosen": "hello", "rejected": "hello"}, "chosen and rejected are the same"),
    ({"prompt": "hi", "chosen": "hello"}, "missing or non-text 'rejected'"),
    ({"chosen": "hello", "rejected": "go away"}, "missing or empty 'prompt'"),
    ({"chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
      "rejected": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "c"}]},
     "differ before the last reply"),
]


@pytest.mark.parametrize("row, reason", BAD_ROWS, ids=[r for _, r in BAD_ROWS])
def test_bad_preference_rows_fail_with_the_reason(tmp_path, tiny_model_dir, capsys, row, reason):
    good = {"prompt": "Say hi.", "chosen": "Hello there!", "rejected": "No."}
    data = write_jsonl(tmp_path / "pairs.jsonl", [good, row])
    with pytest.raises(SystemExit) as e:
        main(["recipe", "run", "dpo-preference", f"model.name_or_path={tiny_model_dir}", f"data.train={data}",
              "data.eval=null", f"output_dir={tmp_path / 'out'}"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and reason in err and "data.max_dropped" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_unpaired_labels_and_balance_are_checked(tmp_path, tiny_model_dir, capsys):
    rows = [{"prompt": f"q{i}", "completion": f"a{i}", "label": "maybe" if i % 5 == 0 else True} for i in range(30)]
    data = write_jsonl(tmp_path / "fb.jsonl", rows)
    with pytest.raises(SystemExit) as e:
        main(["recipe", "run", "kto-feedback", f"model.name_or_path={tiny_model_dir}", f"data.train={data}",
              "data.eval=null", "data.max_dropped=0.5", f"output_dir={tmp_path / 'out'}"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "kto needs both desirable" in err
    with pytest.raises(SystemExit) as e:
        main(["recipe", "run", "kto-feedback", f"model.name_or_path={tiny_model_dir}", f"data.train={data}",
              "data.eval=null", f"output_dir={tmp_path / 'out'}"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "label is not true or false" in err


@pytest.mark.parametrize("overrides, needle", [
    (["data.task=sentiment"], "stage 'dpo' trains on 'preference' data"),
    (["preference.loss=kto"], "'kto' is not a loss of stage 'dpo'"),
    (["adapter.method=prompt_tuning"], "not supported for stage 'dpo'"),
    (["preference.beta=0"], "preference.beta"),
])
def test_preference_config_errors(capsys, overrides, needle):
    with pytest.raises(SystemExit) as e:
        main(["recipe", "run", "dpo-preference", "--dry-run", *overrides])
    assert e.value.code == 2 and needle in capsys.readouterr().err


def test_from_run_must_be_a_run_that_can_continue(tmp_path, tiny_model_dir, capsys):
    sft = sft_run(tmp_path, tiny_model_dir, "lora")
    with pytest.raises(SystemExit) as e:  # an sft stage needs whole weights, not an adapter
        main(["recipe", "run", "lora-sentiment", f"model.from_run={sft}", f"output_dir={tmp_path / 'x'}"])
    assert e.value.code == 2 and "continue an adapter with a dpo or kto stage" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["recipe", "run", "dpo-preference", f"model.from_run={tmp_path / 'nope'}", f"output_dir={tmp_path / 'y'}"])
    assert e.value.code == 2 and "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # merging asked for, but a DoRA adapter cannot stack on it
        main(["recipe", "run", "dpo-preference", f"model.from_run={sft}", "preference.start_adapter=merge",
              "adapter.lora.dora=true", f"output_dir={tmp_path / 'z'}"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "preference.start_adapter" in err and "DoRA" in err and "continue" in err
    assert not (tmp_path / "z").exists()


def test_a_preference_run_is_evaluated_on_a_task_in_its_own_template(tmp_path, tiny_model_dir, capsys):
    recipe, src = load_recipe("dpo-preference", [f"model.name_or_path={tiny_model_dir}", "train.max_steps=2",
                                                 "data.eval=null", *QUIET, f"output_dir={tmp_path / 'dpo'}"])
    out = stages.run(recipe, src, echo=False).out
    with pytest.raises(SystemExit) as e:
        main(["eval", str(out), "--data", "sample:generation/eval"])
    assert e.value.code == 2 and "scored when a dpo or kto run ends" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["eval", str(out), "--task", "generation", "--data", "sample:generation/eval", "--limit", "2",
              "--max-new-tokens", "2"])
    assert e.value.code == 0
    summary = json.loads((out / "eval" / "metrics.json").read_text())
    assert summary["task"] == "generation" and {"perplexity", "rougeL"} <= set(summary["tuned"])


# -- fitting pairs into max_length (data.truncation) ---------------------------------------------------

def pair(prompt: int, chosen: int, rejected: int, bos: bool = False) -> dict:
    """A tokenized pair whose ids say where they came from: prompt 1000+i (BOS 1 first), replies 2000+i, 3000+i."""
    p = [1] * bos + [1000 + i for i in range(prompt - bos)]
    return {"prompt_ids": p, "chosen_ids": [2000 + i for i in range(chosen)],
            "rejected_ids": [3000 + i for i in range(rejected)]}


def test_input_truncation_cuts_a_prompt_only_when_the_replies_would_keep_too_little():
    fit = preference.fit_ids
    row = pair(10, 4, 6)
    assert fit(row, 16, "input", None) == (row, "fits")
    # A prompt that leaves the replies a quarter of the window stays whole; the replies lose their end
    # (trl's own cut).
    out, how = fit(pair(10, 4, 40), 16, "input", None)
    assert how == "reply" and out["prompt_ids"] == pair(10, 0, 0)["prompt_ids"]
    assert out["chosen_ids"] == [2000 + i for i in range(4)] and out["rejected_ids"] == [3000 + i for i in range(6)]
    # A longer prompt loses its start, so that the replies keep a quarter of the window (or all they need).
    out, how = fit(pair(30, 2, 3), 16, "input", None)
    assert how == "prompt" and out["prompt_ids"] == [1000 + i for i in range(17, 30)]
    assert out["chosen_ids"] == [2000, 2001] and out["rejected_ids"] == [3000, 3001, 3002]
    out, how = fit(pair(30, 2, 40), 16, "input", None)
    assert how == "prompt+reply" and out["rejected_ids"] == [3000 + i for i in range(4)]
    assert out["prompt_ids"] == [1000 + i for i in range(18, 30)]
    # A BOS the tokenizer put first stays first.
    out, _ = fit(pair(30, 2, 3, bos=True), 16, "input", 1)
    assert out["prompt_ids"] == [1] + [1000 + i for i in range(17, 29)]
    for n_prompt, n_reply in [(3, 40), (30, 4), (30, 40), (100, 100), (15, 1)]:
        out, _ = fit(pair(n_prompt, n_reply, 2), 16, "input", None)
        assert len(out["prompt_ids"]) + max(len(out["chosen_ids"]), len(out["rejected_ids"])) <= 16
        assert out["chosen_ids"] and out["prompt_ids"]


def test_end_and_drop_truncation_follow_trl_and_refuse_what_does_not_fit():
    fit = preference.fit_ids
    out, how = fit(pair(10, 10, 2), 16, "end", None)  # trl's keep_start: the sequence's end goes
    assert how == "end" and out["prompt_ids"] == pair(10, 0, 0)["prompt_ids"] and len(out["chosen_ids"]) == 6
    assert fit(pair(16, 2, 2), 16, "end", None)[1] == "drop"  # the prompt alone fills max_length
    assert fit(pair(10, 10, 2), 16, "drop", None)[1] == "drop"
    assert fit(pair(10, 6, 2), 16, "drop", None)[1] == "fits"
    # A KTO row: one completion, and its mismatched KL completion follows the fitted prompt.
    row = {"prompt_ids": list(range(30)), "completion_ids": [7] * 4, "KL_completion_ids": [9] * 12}
    out, how = fit(row, 16, "input", None)
    assert how == "prompt" and out["prompt_ids"] == list(range(18, 30)) and out["KL_completion_ids"] == [9] * 4


def long_pairs(n: int) -> list[dict]:
    """Pairs whose long prompt ends in a question that tells the replies apart."""
    return [{"prompt": " ".join(["The shop opened early and closed late that day."] * 12)
             + f" Question {i}: which fruit is yellow? Assistant:",
             "chosen": f"A banana, number {i}.", "rejected": f"A cherry is red, number {i}."} for i in range(n)]


class FirstBatch(TrainerCallback):
    def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
        self.batch = next(iter(train_dataloader))


def test_a_dpo_run_keeps_long_prompts_by_their_end_and_reports_it(tmp_path, tiny_model_dir, capsys):
    data = write_jsonl(tmp_path / "long.jsonl", long_pairs(16))
    common = [f"model.name_or_path={tiny_model_dir}", f"data.train={data}", "data.eval=null", "data.max_length=64",
              "train.max_steps=1", "train.batch_size=2", *QUIET]
    first = FirstBatch()
    recipe, src = load_recipe("dpo-preference", [*common, "data.truncation=input", f"output_dir={tmp_path / 'input'}"])
    result = stages.run(recipe, src, echo=True, callbacks=[first])
    printed = capsys.readouterr().out
    assert "16 of 16 pairs longer than data.max_length=64 (data.truncation: input): prompt cut from the left 16" \
        in printed
    report = json.loads((result.out / "data_report.json").read_text())[0]
    assert report["examples"] == 16 and report["truncated"] == 16 and not report["dropped"]
    assert report["notes"] == {"prompt cut from the left": 16}
    # What the model trains on: the end of the prompt (its question) and the whole reply, within 64 tokens.
    tok = result.tokenizer
    ids, mask = first.batch["input_ids"][0], first.batch["attention_mask"][0]
    text = tok.decode(ids[mask.bool()])
    assert mask.sum() <= 64 and "which fruit is yellow? Assistant:" in text and "A banana, number" in text
    assert not text.startswith("The shop opened")

    # trl's own cut drops every pair here (the prompt alone fills max_length): refused, naming the fix.
    with pytest.raises(SystemExit) as e:
        main(["recipe", "run", "dpo-preference", *common, "data.truncation=end", f"output_dir={tmp_path / 'end'}"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "16 of 16 rows" in err and "its prompt alone fills data.max_length=64" in err
    assert "data.truncation=input keeps every pair" in err and "raise data.max_length" in err
    assert not (tmp_path / "end" / "manifest.json").exists()  # refused before the run dir was written
    # Refused the same way over a finished run with --restart: that run stays as it was.
    saved = {p.name: p.read_bytes() for p in result.out.iterdir() if p.is_file()}
    with pytest.raises(SystemExit) as e:
        main(["recipe", "run", "dpo-preference", *common, "data.truncation=end", f"output_dir={result.out}",
              "--restart"])
    assert e.value.code == 2 and "its prompt alone fills" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in result.out.iterdir() if p.is_file()} == saved
    assert (result.out / "model" / "adapter_model.safetensors").is_file()


def test_a_preference_template_replaces_the_cue(tmp_path, tiny_model_dir, capsys):
    recipe, _ = load_recipe("dpo-preference", [f"model.name_or_path={tiny_model_dir}", "data.template={prompt}"])
    start = preference.starting_point(recipe)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    _, rows, _, _ = preference.prepare_data(recipe, tokenizer, start)
    assert rows and not any(r["prompt"].endswith("Response:") for r in rows)
    recipe, _ = load_recipe("dpo-preference", [f"model.name_or_path={tiny_model_dir}"])
    _, rows, _, _ = preference.prepare_data(recipe, tokenizer, start)
    assert all(r["prompt"].endswith("\nResponse:") for r in rows)
    with pytest.raises(SystemExit) as e:
        main(["recipe", "run", "dpo-preference", "--dry-run", "data.template={prompt} {chosen}"])
    assert e.value.code == 2 and "must not contain the answer field 'chosen'" in capsys.readouterr().err
