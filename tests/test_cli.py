"""The CLI as a user drives it: listing, showing, dry runs, a real run, data preview, and bad
input that ends with exit code 2, a message naming the place and the fix, no traceback, and
nothing written."""

from __future__ import annotations

import json

import pytest

from adapterkit.cli import main
from adapterkit.recipes import shipped
from conftest import write_jsonl


def cli(capsys, *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as e:
        main(list(args))
    out, err = capsys.readouterr()
    return e.value.code, out, err


def test_recipe_list_shows_every_recipe(capsys):
    code, out, _ = cli(capsys, "recipe", "list")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["NAME", "STAGE", "METHOD", "TASK"]
    assert {line.split()[0] for line in lines[1:]} == set(shipped())
    assert any(line.split()[:4] == ["qlora-qa", "sft", "qlora", "qa"] for line in lines)


def test_recipe_show_prints_the_commented_yaml(capsys):
    code, out, _ = cli(capsys, "recipe", "show", "lora-sentiment")
    assert code == 0 and out.startswith("# adapterkit recipe run lora-sentiment\n") and "method: lora" in out


def test_dry_run_prints_the_resolved_recipe_and_writes_nothing(capsys, tmp_path):
    import yaml

    out_dir = tmp_path / "never"
    code, out, _ = cli(capsys, "recipe", "run", "qlora-qa", "train.lr=5e-5", f"output_dir={out_dir}", "--dry-run")
    assert code == 0
    resolved = yaml.safe_load(out)
    assert resolved["train"]["lr"] == 5e-5 and resolved["adapter"]["quant"]["double_quant"] is True
    assert not out_dir.exists()


def test_run_and_preview_through_the_cli(capsys, tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "reviews.jsonl", [{"review": f"review {i} was good", "stars": "pos"} if i % 2 else
                                                   {"review": f"review {i} was bad", "stars": "neg"} for i in range(12)])
    common = [f"model.name_or_path={tiny_model_dir}", f"data.train={data}", "data.eval=null",
              "data.columns.text=review", "data.columns.label=stars"]
    code, out, _ = cli(capsys, "data", "preview", "lora-sentiment", *common, "-n", "2")
    assert code == 0
    assert "12 rows" in out and "labels: neg 6, pos 6" in out
    assert out.count("--- example") == 2 and "⟦ neg<|endoftext|>⟧" in out
    run_dir = tmp_path / "run"
    code, out, err = cli(capsys, "recipe", "run", "lora-sentiment", *common, "train.max_steps=2", "train.log_every=1",
                         f"output_dir={run_dir}")
    assert code == 0, err
    assert "train step     2/2" in out and "tok/s" in out and "eta" in out
    assert json.loads((run_dir / "manifest.json").read_text())["overrides"][-1] == f"output_dir={run_dir}"
    # Running again into the same output_dir is refused; the run is untouched.
    before = (run_dir / "manifest.json").read_text()
    code, _, err = cli(capsys, "recipe", "run", "lora-sentiment", *common, f"output_dir={run_dir}")
    assert code == 2 and "already holds a completed run" in err and "--restart" in err
    assert (run_dir / "manifest.json").read_text() == before


def _bad_inputs(tmp_path, tiny_model_dir):
    good = write_jsonl(tmp_path / "good.jsonl", [{"text": "fine", "label": "positive"}] * 4)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "fine", "label": "positive"}\n{"text": "oops", "label": \n')
    renamed = write_jsonl(tmp_path / "renamed.jsonl", [{"review": "fine", "label": "positive"}])
    unlabeled = write_jsonl(tmp_path / "unlabeled.jsonl", [{"text": "fine", "label": " "}] * 3)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    notes = tmp_path / "notes.docx"
    notes.write_text("hello")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    model = f"model.name_or_path={tiny_model_dir}"
    return [
        # (overrides, text the message must contain)
        ([model, f"data.train={broken}"], f"{broken}:2"),
        ([model, f"data.train={renamed}"], "data.columns.text=review"),
        ([model, f"data.train={empty}"], "is empty (no rows)"),
        ([model, f"data.train={unlabeled}"], "no usable training example (3 empty 'label')"),
        ([model, f"data.train={notes}"], "unsupported file type '.docx'"),
        ([model, f"data.train={tmp_path / 'missing.jsonl'}"], "file not found"),
        ([model, f"data.train={good}", f"output_dir={foreign}"], "is not empty and is not an adapterkit run"),
        (["model.name_or_path=./no/such/model", f"data.train={good}"], "'./no/such/model' does not exist"),
        (["train.batch_size=0"], "train.batch_size"),
        (["adapter.method=dpo"], "'dpo' is not allowed"),
        (["data.task=summarisation"], "did you mean 'summarization'"),
    ]


def test_bad_input_exits_2_without_traceback_and_writes_nothing(capsys, tmp_path, tiny_model_dir):
    for overrides, needle in _bad_inputs(tmp_path, tiny_model_dir):
        out_dir = tmp_path / "out"
        if not any(o.startswith("output_dir=") for o in overrides):
            overrides = overrides + [f"output_dir={out_dir}"]
        before = sorted(p.name for p in (tmp_path / "foreign").iterdir())
        code, _, err = cli(capsys, "recipe", "run", "lora-sentiment", *overrides, "data.eval=null")
        assert code == 2, (overrides, err)
        assert needle in err, (needle, err)
        assert "Traceback" not in err and "fix:" in err
        assert not out_dir.exists(), overrides
        assert sorted(p.name for p in (tmp_path / "foreign").iterdir()) == before
