"""Task evaluation on tiny models: the model passes are exact (batched = one by one), the "base" of a
run is really its starting model, label scoring finds what a model learned, every method family
evaluates, and `adapterkit eval` writes its report or fails with exit code 2."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import write_jsonl
from test_methods import MEMO

from adapterkit import evaluation as E
from adapterkit.cli import main
from adapterkit.config import load_recipe
from adapterkit.data.formatter import Formatter
from adapterkit.data.loading import read_rows
from adapterkit.stages import run
from adapterkit.trained import load_trained

FAST_EVAL = ["eval.limit=6", "eval.max_new_tokens=8", "eval.batch_size=4"]


def train(tmp_path, tiny_model_dir, recipe_name, *overrides, name="run"):
    recipe, src = load_recipe(recipe_name, [f"model.name_or_path={tiny_model_dir}", "train.max_steps=3",
                                            "train.save_every=null", *FAST_EVAL, f"output_dir={tmp_path / name}",
                                            *overrides])
    return run(recipe, src, echo=False)


def cli(capsys, *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as e:
        main(list(args))
    out, err = capsys.readouterr()
    return e.value.code, out, err


# Every method family on a task of its own; the run's metrics.json carries the task's metric.
CASES = [
    ("lora-sentiment", [], "accuracy"),
    ("qlora-qa", [], "f1"),
    ("prompt-tuning-translation", [], "chrf"),
    ("prefix-tuning-summarization", [], "rougeL"),
    ("p-tuning-sentiment", [], "macro_f1"),
    ("lora-generation", [], "perplexity"),
    ("full-chat", [], "rougeL"),
]


@pytest.mark.parametrize("recipe_name, extra, metric", CASES, ids=[c[0] for c in CASES])
def test_sft_run_evaluates_base_and_tuned(tmp_path, tiny_model_dir, recipe_name, extra, metric):
    result = train(tmp_path, tiny_model_dir, recipe_name, *extra)
    summary = json.loads((result.out / "metrics.json").read_text())
    assert summary["n"] == 6 and set(summary) >= {"task", "base", "tuned", "headline"}
    assert metric in summary["base"] and metric in summary["tuned"]
    report = (result.out / "report.md").read_text()
    assert "| metric | base | tuned | change |" in report and "![training and eval loss](loss.png)" in report
    worst = [json.loads(line) for line in (result.out / "worst_examples.jsonl").read_text().splitlines()]
    assert 0 < len(worst) <= 6
    assert all({"input", "reference", "base_prediction", "tuned_prediction"} <= set(w) for w in worst)
    scores = [w["score"] for w in worst]
    assert scores == sorted(scores)  # worst first


def _pairs(formatter, n=6, data="sample:generation/eval"):
    rows = read_rows(data, "validation", "data.eval")
    examples, _ = E.build_examples(rows, formatter, n, "sample")
    return [(e.prompt_ids, e.reference_ids) for e in examples]


@pytest.mark.parametrize("method", ["none", "prompt_tuning", "prefix_tuning"])
def test_batched_log_probs_equal_the_models_own_loss(tmp_path, tiny_model_dir, method):
    from adapterkit.config import DataConfig

    if method == "none":
        trained = load_trained(tiny_model_dir)
    else:
        result = train(tmp_path, tiny_model_dir, "lora-generation", f"adapter.method={method}", "data.eval=null",
                       "train.gradient_checkpointing=false")
        trained = load_trained(result.out)
    formatter = Formatter.for_training(DataConfig(task="generation"), trained.tokenizer, [])
    pairs = _pairs(formatter)
    batched = E.sequence_logprobs(trained.model, pairs, trained.tokenizer.pad_token_id, batch_size=4)
    for (prompt, target), got in zip(pairs, batched):
        ids = torch.tensor([prompt + target])
        labels = torch.tensor([[-100] * len(prompt) + target])
        with torch.no_grad():
            loss = trained.model(input_ids=ids, labels=labels).loss
        assert got == pytest.approx(-loss.item() * len(target), rel=1e-4, abs=1e-3)


@pytest.mark.parametrize("method", ["lora", "qlora", "prompt_tuning", "prefix_tuning", "p_tuning"])
def test_batched_generation_equals_one_by_one(tmp_path, tiny_model_dir, method):
    # Left padding must not change what a model generates; soft prompts are the fragile case.
    result = train(tmp_path, tiny_model_dir, "lora-sentiment", f"adapter.method={method}", "data.eval=null",
                   "train.gradient_checkpointing=false", "train.lr=5e-2")
    trained = load_trained(result.out)
    formatter = Formatter(trained.spec, trained.tokenizer, {})
    prompts = [p for p, _ in _pairs(formatter, 8, "sample:sentiment/eval")]
    assert len({len(p) for p in prompts}) > 3  # lengths differ, so batches are padded
    batched = E.generate(trained.model, prompts, trained.tokenizer, 6, batch_size=8)
    alone = [E.generate(trained.model, [p], trained.tokenizer, 6, batch_size=1)[0] for p in prompts]
    assert batched == alone


@pytest.mark.parametrize("recipe_name, method", [("lora-generation", "lora"), ("lora-generation", "prompt_tuning"),
                                                 ("full-chat", "full")])
def test_a_runs_base_is_its_starting_model(tmp_path, tiny_model_dir, recipe_name, method):
    # The base of a run (adapter switched off, or a full run's reloaded starting weights) scores exactly
    # what the plain starting model scores, and the tuned model does not.
    result = train(tmp_path, tiny_model_dir, recipe_name, f"adapter.method={method}", "train.lr=1e-2",
                   "train.gradient_checkpointing=false")
    task = result.out.joinpath("model", "format.json")
    task = json.loads(task.read_text())["task"]
    data = str(load_recipe(recipe_name)[0].data.eval)
    in_run = json.loads((result.out / "metrics.json").read_text())
    again, _ = E.evaluate_path(str(result.out), data, settings={"limit": 6, "max_new_tokens": 8}, say=lambda *a, **k: None)
    plain, _ = E.evaluate_path(str(tiny_model_dir), data, task=task, settings={"limit": 6, "max_new_tokens": 8},
                               out=tmp_path / "plain", say=lambda *a, **k: None)
    assert in_run["base"]["perplexity"] == pytest.approx(plain["model"]["perplexity"], rel=1e-4)
    assert again["base"] == pytest.approx(in_run["base"], rel=1e-4)
    assert again["tuned"] == pytest.approx(in_run["tuned"], rel=1e-4)
    assert in_run["tuned"]["perplexity"] != pytest.approx(in_run["base"]["perplexity"], rel=1e-3)


def test_label_scoring_finds_what_the_model_learned(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "memo.jsonl", MEMO)
    result = train(tmp_path, tiny_model_dir, "lora-sentiment", f"data.train={data}", f"data.eval={data}",
                   "train.max_steps=40", "train.lr=1e-2", "train.schedule=constant", "train.warmup_ratio=0",
                   "adapter.lora.dropout=0", "train.precision=fp32", "eval.limit=8")
    summary = json.loads((result.out / "metrics.json").read_text())
    assert summary["tuned"]["accuracy"] == 100.0 and summary["tuned"]["macro_f1"] == 100.0
    assert summary["base"]["accuracy"] < 100.0


def test_eval_cli_on_a_run_and_on_a_plain_model(tmp_path, tiny_model_dir, capsys):
    result = train(tmp_path, tiny_model_dir, "qlora-qa", "data.eval=null")
    data = write_jsonl(tmp_path / "dev.jsonl", [{"q": f"What is {i} plus {i}?", "a": str(2 * i)} for i in range(5)])
    code, out, err = cli(capsys, "eval", str(result.out), "--data", str(data), "--column", "question=q",
                         "--column", "answer=a", "--limit", "3", "--max-new-tokens", "4")
    assert code == 0, err
    assert "| metric | base | tuned | change |" in out and "generating" in out
    summary = json.loads((result.out / "eval" / "metrics.json").read_text())
    assert summary["task"] == "qa" and summary["n"] == 3 and {"exact_match", "f1"} <= set(summary["tuned"])
    code, out, err = cli(capsys, "eval", str(tiny_model_dir), "--task", "text", "--data", "sample:text/eval",
                         "--limit", "2", "--max-new-tokens", "4", "--out", str(tmp_path / "text-eval"))
    assert code == 0, err
    summary = json.loads((tmp_path / "text-eval" / "metrics.json").read_text())
    assert set(summary["model"]) == {"perplexity", "rougeL"} and summary["model"]["perplexity"] > 1


def test_eval_cli_bad_input_exits_2(tmp_path, tiny_model_dir, capsys):
    result = train(tmp_path, tiny_model_dir, "lora-sentiment", "data.eval=null")
    odd = write_jsonl(tmp_path / "odd.jsonl", [{"text": "meh", "label": "neutral"}])
    cases = [
        ((str(tmp_path / "nope"),), "does not exist"),
        ((str(tiny_model_dir), "--data", "sample:qa/eval"), "pass --task"),
        ((str(result.out),), "no eval data given"),
        ((str(result.out), "--data", str(odd)), "'neutral' is not in the label set"),
        ((str(result.out), "--data", str(odd), "--task", "qa"), "differs from the task"),
        ((str(result.out), "--data", str(odd), "--column", "text"), "is not FIELD=COLUMN"),
    ]
    for args, needle in cases:
        code, _, err = cli(capsys, "eval", *args)
        assert code == 2 and needle in err and "Traceback" not in err, (args, err)
    assert not (result.out / "eval").exists()
