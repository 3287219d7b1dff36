"""Dataset shapes people have, end to end on real rows from ../shared/data: ShareGPT conversations and
SQuAD's nested answers train without converting the file first."""

from __future__ import annotations

import json

from conftest import shared_data, write_jsonl

from adapterkit.config import load_recipe
from adapterkit.stages import run

QUICK = ["train.max_steps=2", "train.save_every=null", "data.eval=null", "train.precision=fp32"]


def first_rows(path, n):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()[:n]]


def test_sharegpt_conversations_train_as_chat(tmp_path, fast_builtin):
    names = {"user": "human", "assistant": "gpt", "system": "system"}
    rows = [{"conversations": [{"from": names[m["role"]], "value": m["content"]} for m in r["messages"]]}
            for r in first_rows(shared_data("chat", "train.jsonl"), 24)]
    data = write_jsonl(tmp_path / "sharegpt.jsonl", rows)
    recipe, src = load_recipe("full-chat", [f"data.train={data}", *QUICK, f"output_dir={tmp_path / 'run'}"])
    out = run(recipe, src, echo=False).out
    report = json.loads((out / "data_report.json").read_text())[0]
    assert report["examples"] > 0 and json.loads((out / "manifest.json").read_text())["status"] == "completed"
    shared = [n for note, n in report["notes"].items() if note.startswith("ShareGPT turns")]
    assert shared and shared[0] >= 24 - sum(report["dropped"].values()), report


def test_squad_nested_answers_train_with_one_column_mapping(tmp_path, fast_builtin):
    rows = [{"question": r["question"], "context": r["context"],
             "answers": {"text": [r["answer"]], "answer_start": [r["answer_start"]]}}
            for r in first_rows(shared_data("qa", "train.jsonl"), 24)]
    data = write_jsonl(tmp_path / "squad.jsonl", rows)
    recipe, src = load_recipe("qlora-qa", [f"data.train={data}", "adapter.method=lora", "data.columns.answer=answers",
                                           *QUICK, f"output_dir={tmp_path / 'run'}"])
    out = run(recipe, src, echo=False).out
    report = json.loads((out / "data_report.json").read_text())[0]
    assert report["examples"] == 24 and not report["dropped"], report
    assert report["notes"] == {"'answer' read from a list (or a {text: [...]} record) as its first item": 24}
