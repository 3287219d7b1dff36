"""`adapterkit data select`: scoring with a small model, the three rules, resuming after a kill, errors.

    python -m pytest -q tests/test_select.py
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from adapterkit.cli import main
from adapterkit.selection import keep_indices
from conftest import shared_data, write_jsonl


def test_the_rules_keep_the_fraction_they_say():
    scores = {i: float(s) for i, s in enumerate([5, 1, 4, 2, 3, 9, 0, 7, 6, 8])}
    assert keep_indices(scores, 0.3, "lowest_loss") == {6, 1, 3}  # scores 0, 1, 2
    assert keep_indices(scores, 0.4, "middle") == {4, 2, 0, 8}  # 3, 4, 5, 6: two dropped at each end
    assert keep_indices(scores, 0.2, "learnability") == {5, 9}  # the largest drops: 9, 8


def _select(*args):
    return subprocess.run([sys.executable, "-m", "adapterkit", "data", "select", *args], capture_output=True,
                          text=True, timeout=600)


def test_lowest_loss_keeps_what_the_scorer_finds_predictable(tmp_path, fast_builtin):
    # A sentiment file whose second half has its labels replaced by a word the scorer never saw as a
    # label: those completions are unpredictable, and lowest_loss must leave them out.
    real = [json.loads(x) for x in shared_data("sentiment", "train.jsonl").read_text().split("\n")[:60] if x]
    rows = real[:30] + [{"text": r["text"], "label": "xylophone"} for r in real[30:]]
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "sel.jsonl"
    done = _select(str(src), "--task", "generation", "--column", "instruction=text", "--column", "output=label",
                   "--scorer", "builtin:tiny", "--keep", "0.5", "--out", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    kept = [json.loads(x) for x in out.read_text().split("\n") if x]
    assert len(kept) == 30
    assert sum(r["label"] == "xylophone" for r in kept) <= 3
    report = json.loads((tmp_path / "sel.jsonl.report.json").read_text())
    assert report["scored"] == 60 and report["kept"] == 30


def test_a_killed_select_resumes_and_writes_what_an_uninterrupted_one_writes(tmp_path, fast_builtin):
    rows = [json.loads(x) for x in shared_data("sentiment", "train.jsonl").read_text().split("\n")[:240] if x]
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    args = ["--task", "sentiment", "--scorer", "builtin:tiny", "--keep", "0.6", "--batch-size", "1",
            "--chunk-rows", "40"]
    whole = _select(str(src), *args, "--out", str(tmp_path / "whole.jsonl"))
    assert whole.returncode == 0, whole.stderr[-2000:]

    out = tmp_path / "cut.jsonl"
    scores = tmp_path / "cut.jsonl.scores.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "adapterkit", "data", "select", str(src), *args, "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if scores.is_file() and len(scores.read_text().split("\n")) >= 3:  # the header and one chunk
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not out.exists()
    again = _select(str(src), *args, "--out", str(out))
    assert again.returncode == 0, again.stderr[-2000:]
    report = json.loads((tmp_path / "cut.jsonl.report.json").read_text())
    assert 1 <= report["resumed_chunks"] < 6
    assert out.read_text() == (tmp_path / "whole.jsonl").read_text()


def test_learnability_tunes_a_reference_on_held_out_rows_once(tmp_path, fast_builtin):
    rows = [json.loads(x) for x in shared_data("sentiment", "train.jsonl").read_text().split("\n")[:60] if x]
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    args = [str(src), "--task", "sentiment", "--scorer", "builtin:tiny", "--keep", "0.5", "--rule", "learnability",
            "--tune-steps", "4", "--out", str(tmp_path / "sel.jsonl")]
    first = _select(*args)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "tuning a LoRA reference on 3 held-out rows" in first.stdout
    report = json.loads((tmp_path / "sel.jsonl.report.json").read_text())
    assert report["held_out"] == 3 and report["scored"] == 57 and report["kept"] == round(0.5 * 57)
    kept = [json.loads(x) for x in (tmp_path / "sel.jsonl").read_text().split("\n") if x]
    assert not any(r == rows[i] for r in kept for i in (0, 20, 40))  # held-out rows are not selectable
    again = _select(*args)
    assert again.returncode == 0 and "tuning" not in again.stdout  # the reference run is reused
    assert (tmp_path / "sel.jsonl").read_text() == "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept)


@pytest.mark.parametrize("args, needle", [
    (["--rule", "easiest"], "is not a rule"),
    (["--keep", "1.5"], "is not a fraction"),
    (["--task", "sentimnt"], "did you mean 'sentiment'"),
])
def test_bad_options_exit_2(tmp_path, capsys, args, needle):
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": "fine", "label": "a"}])
    base = {"--task": "sentiment", "--keep": "0.5", "--rule": "lowest_loss"}
    for flag, value in zip(args[::2], args[1::2]):
        base[flag] = value
    with pytest.raises(SystemExit) as e:
        main(["data", "select", str(src), "--scorer", "builtin:tiny", "--out", str(tmp_path / "o.jsonl"),
              *[x for kv in base.items() for x in kv]])
    assert e.value.code == 2 and needle in capsys.readouterr().err
    assert not (tmp_path / "o.jsonl").exists()
