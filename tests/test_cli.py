"""The CLI as a user drives it: listing, showing, dry runs, a real run, data preview, and bad
input that ends with exit code 2, a message naming the place and the fix, no traceback, and
nothing written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import write_jsonl

from adapterkit.cli import main
from adapterkit.config import shipped


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


def _bad_inputs(tmp: Path, tiny_model_dir: Path) -> list[tuple[list[str], str]]:
    """(overrides or `@FILE` recipe, text the error must contain). Each must exit 2 and write nothing."""
    good = write_jsonl(tmp / "good.jsonl", [{"text": f"fine {i}", "label": "positive" if i % 2 else "negative"}
                                            for i in range(20)])
    broken = tmp / "broken.jsonl"
    broken.write_text('{"text": "fine", "label": "positive"}\n{"text": "oops", "label": \n')
    renamed = write_jsonl(tmp / "renamed.jsonl", [{"review": "fine", "label": "positive"}])
    unlabeled = write_jsonl(tmp / "unlabeled.jsonl", [{"text": f"fine {i}", "label": " "} for i in range(3)])
    gappy = write_jsonl(tmp / "gappy.jsonl", [{"text": f"ok {i}", "label": "positive" if i % 2 else "negative"}
                                              for i in range(18)] + [{"text": "", "label": "positive"}] * 2)
    neutral = write_jsonl(tmp / "neutral.jsonl", [{"text": "meh", "label": "positive"}, {"text": "so so", "label": "neutral"}])
    empty = tmp / "empty.jsonl"
    empty.write_text("")
    notes = tmp / "notes.docx"
    notes.write_text("hello")
    latin1 = tmp / "latin1.jsonl"
    latin1.write_bytes('{"text": "caf\u00e9", "label": "positive"}\n'.encode("latin-1"))
    not_list = tmp / "object.json"
    not_list.write_text('{"text": "fine", "label": "positive", "extra": 1}')
    ragged = tmp / "ragged.csv"
    ragged.write_text("text,label\ngood,positive\n\"a\",b,c\n")
    prose = tmp / "prose.txt"
    prose.write_text("Just some prose.\n\nMore prose.\n")
    chats = write_jsonl(tmp / "chats.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}] * 3)
    bad_yaml = tmp / "bad.yaml"
    bad_yaml.write_text("stage: sft\ntrain:\n  lr: [1,\n")
    a_file = tmp / "a_file"
    a_file.write_text("x")
    foreign = tmp / "foreign"
    foreign.mkdir(exist_ok=True)
    (foreign / "thesis.tex").write_text("precious")
    model = f"model.name_or_path={tiny_model_dir}"
    return [
        ([model, f"data.train={broken}"], f"{broken}:2: not valid JSON"),
        ([model, f"data.train={renamed}"], "data.columns.text=review"),
        ([model, f"data.train={empty}"], "is empty (no rows)"),
        ([model, f"data.train={unlabeled}"], "no usable training example (3 empty 'label')"),
        ([model, f"data.train={gappy}"], "2 of 20 rows (10.0%) would be dropped: 2 empty 'text'"),
        ([model, f"data.train={good}", f"data.eval={neutral}"], f"{neutral}:2: data.eval: label 'neutral' is not in"),
        ([model, f"data.train={notes}"], "unsupported file type '.docx'"),
        ([model, f"data.train={tmp / 'missing.jsonl'}"], "file not found"),
        ([model, f"data.train={latin1}"], "is not UTF-8"),
        ([model, f"data.train={not_list}"], "expected a list of objects"),
        ([model, f"data.train={ragged}"], f"{ragged}:3: row has more values than the header"),
        ([model, f"data.train={prose}"], "needs field 'label'"),
        # another task's rows: the task to set, not a mapping of 'label' to the conversation
        ([model, f"data.train={chats}"], "these rows have the fields of task 'chat' (messages): use data.task=chat"),
        ([model, "data.task=chat", f"data.train={chats}"], "messages are not a list of {role, content} (or ShareGPT's {from, value}) with an assistant"),
        ([model, f"data.train={good}", f"output_dir={foreign}"], "is not empty and is not an adapterkit run"),
        ([model, f"data.train={good}", f"output_dir={a_file}/run"], "is not a writable directory"),
        ([model, f"data.train={good}", f"output_dir={a_file}"], "is a file, not a directory"),
        (["model.name_or_path=./no/such/model", f"data.train={good}"], "'./no/such/model' does not exist"),
        ([model, f"data.train={good}", "train.precision=fp16"], "'fp16' needs a CUDA GPU"),
        (["train.batch_size=0"], "train.batch_size: 0 is too small"),
        (["train.lr=fast"], "train.lr: 'fast' is not allowed"),
        (["trian.lr=1e-4"], "did you mean 'train'"),
        (["train.lr"], "expected KEY=VALUE"),
        (["adapter.method=dpo"], "'dpo' is not allowed"),
        (["data.task=summarisation"], "did you mean 'summarization'"),
        (["adapter.method=qlora", "stage=pretrain", "data.task=text", "model.init=scratch"], "needs pretrained weights"),
        (["adapter.method=prompt_tuning", "data.packing=true"], "packing cannot be combined"),
        (["data.max_dropped=2"], "data.max_dropped: 2.0 is out of range"),
        (["@" + str(bad_yaml)], f"{bad_yaml}:4: not valid YAML"),
        (["@" + str(tmp / "nope.yaml")], "recipe file not found"),
    ]


def test_bad_input_exits_2_without_traceback_and_writes_nothing(capsys, tmp_path, tiny_model_dir):
    cases = _bad_inputs(tmp_path, tiny_model_dir)
    for overrides, needle in cases:
        recipe = "lora-sentiment"
        if overrides[0].startswith("@"):
            recipe, overrides = overrides[0][1:], overrides[1:]
        out_dir = tmp_path / "out"
        if not any(o.startswith("output_dir=") for o in overrides):
            overrides = overrides + [f"output_dir={out_dir}"]
        before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
        code, _, err = cli(capsys, "recipe", "run", recipe, *overrides)
        assert code == 2, (overrides, err)
        assert needle in err, (needle, err)
        assert "Traceback" not in err and "fix:" in err, err
        assert not out_dir.exists(), overrides
        assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before, overrides


def test_only_bitsandbytes_kernels_hub_warning_is_dropped(caplog):
    """The one line bitsandbytes prints on every start on AVX512-BF16 CPUs is dropped; its other warnings
    are not."""
    import logging

    import adapterkit  # noqa: F401  (installs the filter)

    log = logging.getLogger("bitsandbytes.backends.cpu.ops")
    with caplog.at_level(logging.WARNING):
        log.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure", "boom")
        log.warning("some other bitsandbytes warning")
    assert "kernels-community" not in caplog.text and "some other bitsandbytes warning" in caplog.text


def test_library_deprecations_are_hidden_unless_verbose(tmp_path, fast_builtin):
    # peft's prefix tuning passes past_key_values, which transformers 5 warns about on every forward.
    def warnings_of(*flags: str) -> int:
        proc = subprocess.run([sys.executable, "-m", "adapterkit", *flags, "recipe", "run",
                               "prefix-tuning-summarization", "train.max_steps=1", "eval.limit=2",
                               "train.save_every=null", f"output_dir={tmp_path / str(len(flags))}"],
                              capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return (proc.stdout + proc.stderr).count("FutureWarning")

    assert warnings_of() == 0
    assert warnings_of("--verbose") > 0


def test_data_commands_hint_the_option_they_take(tmp_path):
    # `data clean` and `data select` map fields with --column, as `eval` and `generate` do: a file whose
    # column has another name is refused with that option, not cleaned (or scored) down to nothing.
    data = write_jsonl(tmp_path / "r.jsonl", [{"review": "good film"}] * 3)
    for args in (["data", "clean", str(data), "--task", "sentiment", "--out", str(tmp_path / "c.jsonl")],
                 ["data", "select", str(data), "--task", "sentiment", "--scorer", "builtin:tiny", "--keep", "0.5",
                  "--out", str(tmp_path / "s.jsonl")]):
        proc = subprocess.run([sys.executable, "-m", "adapterkit", *args], capture_output=True, text=True)
        assert proc.returncode == 2, proc.stderr
        assert "--column text=review" in proc.stderr and "data.columns" not in proc.stderr
        assert "label=review" not in proc.stderr  # one column is suggested for one field only
    assert not (tmp_path / "c.jsonl").exists() and not (tmp_path / "s.jsonl").exists()
