"""`adapterkit generate` and `adapterkit chat`: prompts exactly as training built them, for every kind of run."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import write_jsonl

from adapterkit.config import load_recipe
from adapterkit.data.loading import RawRow, read_rows
from adapterkit.inference import chat, formatter_of, generate_file, prompt_ids
from adapterkit.stages import run
from adapterkit.trained import load_trained

RUNS = {  # recipe -> the overrides that make it a two-step run
    "lora-sentiment": [],
    "prompt-tuning-translation": [],
    "qlora-qa": [],
    "full-chat": ["train.lr=1e-4"],
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, fast_builtin) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for name, extra in RUNS.items():
        recipe, src = load_recipe(name, ["train.max_steps=2", "train.save_every=null", "data.eval=null",
                                         f"output_dir={root / name}", *extra])
        out[name] = run(recipe, src, echo=False).out
    return out


@pytest.mark.parametrize("name", sorted(RUNS))
def test_a_prompt_row_without_its_answer_is_the_prompt_training_built(runs, name):
    trained = load_trained(runs[name])
    formatter = formatter_of(trained, None)
    recipe, _ = load_recipe(str(runs[name] / "recipe.yaml"))
    for raw in read_rows(recipe.data.train, recipe.data.train_split, "data.train")[:5]:
        fields, _ = formatter.fields(raw)
        fields, _, _ = formatter.fit(fields)
        trained_prompt, _ = formatter.split_for_eval(formatter.record(fields))
        values = dict(raw.values)
        if formatter.task.kind == "chat":  # a conversation to be answered: it ends with the user's turn
            col = formatter.columns.get("messages", "messages")
            last = max(i for i, m in enumerate(values[col]) if m["role"] == "assistant")
            values[col] = values[col][:last]
        else:
            values.pop(formatter.columns.get(formatter.task.target, formatter.task.target))
        assert prompt_ids(formatter, values) == trained_prompt, raw.where


@pytest.mark.parametrize("name", ["lora-sentiment", "prompt-tuning-translation", "qlora-qa"])
def test_generate_writes_a_completion_per_usable_row(runs, name, tmp_path):
    trained = load_trained(runs[name])
    formatter = formatter_of(trained, None)
    first = formatter.task.required[0]
    rows = [{first: "the first input"}, {first: "a second, longer input than the first one"}, {"other": "x"}]
    data = write_jsonl(tmp_path / "prompts.jsonl", rows)
    done = generate_file(str(runs[name]), str(data), tmp_path / "out" / "c.jsonl", say=lambda *a, **k: None)
    written = [json.loads(x) for x in (tmp_path / "out" / "c.jsonl").read_text().splitlines()]
    assert done["prompts"] == 2 and sum(done["skipped"].values()) == 1
    assert [w[first] for w in written] == [rows[0][first], rows[1][first]]
    assert all(isinstance(w["completion"], str) for w in written)


def test_chat_from_a_pipe_replies_as_generate_completes(runs, tmp_path):
    data = write_jsonl(tmp_path / "p.jsonl", [{"text": "a gripping, funny and moving film"}])
    generate_file(str(runs["lora-sentiment"]), str(data), tmp_path / "c.jsonl", say=lambda *a, **k: None)
    expected = json.loads((tmp_path / "c.jsonl").read_text())["completion"]
    proc = subprocess.run([sys.executable, "-m", "adapterkit", "chat", str(runs["lora-sentiment"])],
                          input="a gripping, funny and moving film\n", capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == expected


def test_a_conversation_keeps_its_history_until_reset(runs):
    stream = io.StringIO()
    said = chat(str(runs["full-chat"]), ["Hello there.", "", "And then?", "/reset", "Hello there."], stream,
                max_new_tokens=6, interactive=False)
    assert [line for line, _ in said] == ["Hello there.", "And then?", "Hello there."]
    # greedy, and the same first turn after /reset: the same reply as the first time
    assert said[2][1] == said[0][1]
    assert "(conversation reset)" in stream.getvalue()


def test_generate_refuses_a_file_without_the_tasks_inputs(runs, tmp_path):
    data = write_jsonl(tmp_path / "p.jsonl", [{"review": "good"}])
    out = tmp_path / "c.jsonl"
    proc = subprocess.run([sys.executable, "-m", "adapterkit", "generate", str(runs["lora-sentiment"]), "--data",
                           str(data), "--out", str(out)], capture_output=True, text=True)
    assert proc.returncode == 2 and "--column" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert not out.exists()
    # and the mapping it suggests works
    done = subprocess.run([sys.executable, "-m", "adapterkit", "generate", str(runs["lora-sentiment"]), "--data",
                           str(data), "--out", str(out), "--column", "text=review"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert json.loads(out.read_text())["review"] == "good"


def test_prompt_rows_need_no_answer_for_a_model_given_its_task(tiny_model_dir):
    trained = load_trained(tiny_model_dir)
    formatter = formatter_of(trained, "qa")
    ids = prompt_ids(formatter, {"question": "Who?", "context": "Ann did."})
    assert isinstance(ids, list) and ids
    assert isinstance(prompt_ids(formatter, RawRow({"context": "no question"}, "x").values), str)


def test_an_export_keeps_the_column_mapping_it_was_trained_with(fast_builtin, tmp_path):
    from adapterkit.data.loading import SAMPLES

    def renamed(split: str) -> Path:
        rows = [json.loads(x) for x in (SAMPLES / "sentiment" / f"{split}.jsonl").read_text().splitlines()]
        return write_jsonl(tmp_path / f"{split}.jsonl", [{"review": r["text"], "stars": r["label"]} for r in rows])

    train, dev = renamed("train"), renamed("eval")
    recipe, src = load_recipe("lora-sentiment", ["train.max_steps=2", "train.save_every=null", f"data.train={train}",
                                                 "data.eval=null", "data.columns.text=review",
                                                 "data.columns.label=stars", f"output_dir={tmp_path / 'run'}"])
    run(recipe, src, echo=False)
    export = tmp_path / "export"
    subprocess.run([sys.executable, "-m", "adapterkit", "export", str(tmp_path / "run"), "--out", str(export)],
                   check=True, capture_output=True)
    assert json.loads((export / "format.json").read_text())["columns"] == {"text": "review", "label": "stars"}
    for args in (["eval", str(export), "--data", str(dev), "--limit", "4", "--out", str(tmp_path / "ev")],
                 ["generate", str(export), "--data", str(dev), "--limit", "3", "--out", str(tmp_path / "g.jsonl")]):
        proc = subprocess.run([sys.executable, "-m", "adapterkit", *args], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr  # no --column needed: the export says how to read the rows
    assert len((tmp_path / "g.jsonl").read_text().splitlines()) == 3
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["n"] == 4


def test_a_named_chat_template_trains_and_is_saved_with_the_model(fast_builtin, tmp_path):
    from transformers import AutoTokenizer

    from adapterkit.data.chat_templates import CHAT_TEMPLATES

    recipe, src = load_recipe("full-chat", ["train.max_steps=1", "train.save_every=null", "data.eval=null",
                                            "train.lr=1e-5", "model.chat_template=chatml",
                                            f"output_dir={tmp_path / 'run'}"])
    run(recipe, src, echo=False)
    model_dir = tmp_path / "run" / "model"
    assert AutoTokenizer.from_pretrained(model_dir).chat_template == CHAT_TEMPLATES["chatml"]
    trained = load_trained(tmp_path / "run")
    formatter = formatter_of(trained, None)
    assert formatter.spec.mode == "chat_template"
    ids = prompt_ids(formatter, {"messages": [{"role": "user", "content": "Hello there."}]})
    assert trained.tokenizer.decode(ids).endswith("<|im_start|>user\nHello there.<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize("value,said", [
    ("chatlm", "did you mean 'chatml'"),
    ("broken.jinja", "does not render a reply as the continuation"),
    ("missing.jinja", "neither a named template nor a file"),
])
def test_a_bad_chat_template_is_refused_before_anything_is_written(fast_builtin, tmp_path, value, said):
    (tmp_path / "broken.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}"
                                           "{% if add_generation_prompt %}ASSISTANT:{% endif %}")
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "adapterkit", "recipe", "run", "full-chat",
                           f"model.chat_template={value}", f"output_dir={out}"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2 and "model.chat_template" in proc.stderr and said in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and not (out / "manifest.json").exists()
