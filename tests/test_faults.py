"""Faults and bad input, each made for real (a truncated file, a corrupt manifest, a FIFO, a BOM), end in
exit 2 with a message naming the place, the bad value and the fix, no traceback, and the files on disk
unchanged. The faults that need a second process, a signal or a full disk are in test_reliability.py.

    python -m pytest -q tests/test_faults.py
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from adapterkit.cli import main
from conftest import write_jsonl
from test_methods import MEMO
from test_reliability import harness, overrides


def tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under `root` with its size and modification time (but the run's lock file, which every
    `recipe run` rewrites with its pid while it holds the lock)."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")
            if p.is_file() and p.name != ".adapterkit.lock"}


def refused(capsys, args: list[str], *expected: str) -> str:
    """Run the CLI; it must exit 2 without a traceback, its message holding every `expected` piece."""
    with pytest.raises(SystemExit) as e:
        main(args)
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert "Traceback" not in err and all(piece in err for piece in expected), err
    return err


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_model_dir) -> Path:
    """A finished LoRA run on the tiny model (its model dir is never modified by these tests)."""
    root = tmp_path_factory.mktemp("finished")
    data = write_jsonl(root / "d.jsonl", MEMO)
    out = root / "run"
    main_args = ["recipe", "run", "lora-sentiment", *overrides(tiny_model_dir, data, out), f"data.eval={data}"]
    with pytest.raises(SystemExit) as e:
        main(main_args)
    assert e.value.code == 0
    return out


def test_a_truncated_checkpoint_is_skipped_on_resume_and_kept_aside(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "d.jsonl", MEMO)
    out = tmp_path / "run"
    killed = harness(overrides(tiny_model_dir, data, out), kill_at_step=5)
    assert killed.returncode == -9
    weights = out / "checkpoints" / "checkpoint-4" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # cut short, as a failing copy leaves it
    cut = weights.read_bytes()
    resumed = harness(overrides(tiny_model_dir, data, out))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "skipped checkpoint-4: adapter_model.safetensors is corrupt or cut short" in resumed.stdout
    assert "resuming from" in resumed.stdout and "checkpoint-2 (step 2)" in resumed.stdout
    aside = out / "checkpoints" / "broken-checkpoint-4"
    assert (aside / "adapter_model.safetensors").read_bytes() == cut, sorted(p.name for p in aside.parent.iterdir())
    assert (out / "model" / "adapter_model.safetensors").is_file()


def test_a_model_with_truncated_weights_is_refused(tmp_path, tiny_model_dir, capsys):
    broken = tmp_path / "broken-model"
    shutil.copytree(tiny_model_dir, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:4096])
    data = write_jsonl(tmp_path / "d.jsonl", MEMO)
    out = tmp_path / "run"
    refused(capsys, ["recipe", "run", "lora-sentiment", *overrides(broken, data, out)],
            "model.name_or_path", "corrupt or cut short", "download or copy the model again")


@pytest.mark.parametrize("command", ["run", "eval", "export"])
def test_a_corrupt_manifest_is_named_for_run_eval_and_export(tmp_path, finished, tiny_model_dir, capsys, command):
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    manifest = run_dir / "manifest.json"
    manifest.write_text(manifest.read_text()[:40])  # cut short
    before = tree(run_dir)
    data = write_jsonl(tmp_path / "d.jsonl", MEMO)
    args = {"run": ["recipe", "run", "lora-sentiment", *overrides(tiny_model_dir, data, run_dir)],
            "eval": ["eval", str(run_dir), "--data", str(data)],
            "export": ["export", str(run_dir), "--out", str(tmp_path / "exported")]}[command]
    refused(capsys, args, str(manifest), "is not valid JSON", "--restart")
    assert tree(run_dir) == before and not (tmp_path / "exported").exists()


@pytest.mark.parametrize("override, shown", [("train.lr=.nan", "train.lr: nan is not a finite number"),
                                             ("train.epochs=.inf", "train.epochs: inf is not a finite number"),
                                             ("adapter.lora.alpha=-.inf", "-inf is not a finite number")])
def test_non_finite_numbers_are_refused_before_anything_loads(tmp_path, capsys, override, shown):
    refused(capsys, ["recipe", "run", "lora-sentiment", override, f"output_dir={tmp_path / 'run'}"], shown,
            "use a finite number")
    assert not (tmp_path / "run").exists()


def test_max_length_beyond_the_models_positions_is_refused(tmp_path, tiny_model_dir, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", MEMO)
    out = tmp_path / "run"
    refused(capsys, ["recipe", "run", "lora-sentiment", *overrides(tiny_model_dir, data, out),
                     "data.max_length=10000000"],
            "data.max_length", "10000000 is longer than the 512 positions", "use data.max_length=512 or less")
    assert not out.exists()
    refused(capsys, ["plan", "lora-sentiment", f"model.name_or_path={tiny_model_dir}", "data.max_length=10000000"],
            "10000000 is longer than the 512 positions")


@pytest.mark.parametrize("args, expected", [
    (["recipe", "run", "lora-sentiment", "--bogus"], "No such option: --bogus"),
    (["export", "runs/x"], "Missing option '--out'"),
    (["eval", "runs/x", "--limit", "0"], "Invalid value for '--limit'"),
])
def test_command_line_usage_errors_exit_2_with_the_usage_line(capsys, args, expected):
    refused(capsys, args, expected, "Usage: ", "--help' for help")


def test_version_prints_adapterkit_and_its_libraries(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    out = capsys.readouterr().out
    assert e.value.code == 0
    names = [line.split()[0] for line in out.splitlines()]
    assert {"adapterkit", "torch", "transformers", "peft", "trl", "bitsandbytes"} <= set(names)


def test_an_unwritable_eval_out_is_refused_before_any_row_is_scored(tmp_path, finished, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    data = write_jsonl(tmp_path / "d.jsonl", MEMO)
    err = refused(capsys, ["eval", str(finished), "--data", str(data), "--out", str(blocker / "report")],
                  "--out", "is not a writable directory")
    assert "generating" not in err and "rows/s" not in err  # nothing was scored first


def test_a_csv_with_a_utf8_byte_order_mark_reads_its_columns(tmp_path, tiny_model_dir, capsys):
    data = tmp_path / "excel.csv"
    rows = "".join(f"{r['text']},{r['label']}\n" for r in MEMO)
    data.write_bytes("\ufefftext,label\n".encode() + rows.encode())  # Excel's "CSV UTF-8"
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        main(["recipe", "run", "lora-sentiment", *overrides(tiny_model_dir, data, out), "train.max_steps=1"])
    assert e.value.code == 0, capsys.readouterr().err
    report = json.loads((out / "data_report.json").read_text())[0]
    assert report["examples"] == len(MEMO) and set(report["labels"]) == {r["label"] for r in MEMO}


def test_an_empty_recipe_file_is_refused(tmp_path, capsys):
    recipe = tmp_path / "mine.yaml"
    recipe.write_text("# my recipe\n\n")
    refused(capsys, ["recipe", "run", str(recipe), f"output_dir={tmp_path / 'run'}"], str(recipe), "is empty",
            "adapterkit recipe show lora-sentiment")
    assert not (tmp_path / "run").exists()


def test_a_single_class_training_set_is_refused(tmp_path, tiny_model_dir, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", [{**r, "label": "positive"} for r in MEMO])
    out = tmp_path / "run"
    refused(capsys, ["recipe", "run", "lora-sentiment", *overrides(tiny_model_dir, data, out)],
            "every training row has the label 'positive'", "data.columns.label")
    assert not out.exists()


def test_a_fifo_as_data_is_refused_instead_of_blocking(tmp_path, tiny_model_dir, capsys):
    fifo = tmp_path / "data.jsonl"
    os.mkfifo(fifo)
    refused(capsys, ["recipe", "run", "lora-sentiment", *overrides(tiny_model_dir, fifo, tmp_path / "run")],
            "is not a regular file", "write the data to a file first")
