"""The training doctor on runs that really show each problem (badly configured tiny recipes), on a
healthy run (nothing found), and its trend checks on logs with one known fault each."""

from __future__ import annotations

import json

import pytest
from conftest import write_jsonl

from adapterkit.cli import main
from adapterkit.data.loading import SAMPLES
from adapterkit.doctor import Evidence, diagnose

QUIET = ["data.eval=null", "train.save_every=null", "train.log_every=1", "train.precision=fp32"]


def run(capsys, *args):
    with pytest.raises(SystemExit) as e:
        main(list(args))
    out, err = capsys.readouterr()
    return e.value.code, out, err


def doctor(capsys, run_dir) -> tuple[int, dict[str, dict]]:
    code, out, _ = run(capsys, "doctor", str(run_dir), "--json")
    return code, {f["check"]: f for f in json.loads(out)}


def test_a_healthy_run_raises_nothing(tmp_path, capsys, fast_builtin):
    code, _, err = run(capsys, "recipe", "run", "lora-sentiment", "train.max_steps=24", *QUIET,
                       f"output_dir={tmp_path / 'ok'}")
    assert code == 0, err[-2000:]
    assert doctor(capsys, tmp_path / "ok") == (0, {})
    code, out, _ = run(capsys, "doctor", str(tmp_path / "ok"))
    assert code == 0 and "no problems found" in out


def test_a_learning_rate_too_low_shows_as_a_stagnant_loss(tmp_path, capsys, fast_builtin):
    code, _, err = run(capsys, "recipe", "run", "lora-sentiment", "train.lr=1e-8", "train.max_steps=24", *QUIET,
                       f"output_dir={tmp_path / 'low'}")
    assert code == 0, err[-2000:]
    code, found = doctor(capsys, tmp_path / "low")
    assert code == 1 and set(found) == {"learning rate far too low", "loss stagnant"}, found
    assert "train.lr=1e-08" in found["learning rate far too low"]["saw"]
    assert found["loss stagnant"]["fixes"][0].startswith("raise train.lr")


def test_a_learning_rate_too_high_is_named_when_the_guard_stops_the_run(tmp_path, capsys, fast_builtin):
    code, _, _ = run(capsys, "recipe", "run", "lora-sentiment", "train.lr=10", "train.max_steps=24", *QUIET,
                     f"output_dir={tmp_path / 'high'}")
    assert code == 3  # the non-finite guard stopped it
    code, found = doctor(capsys, tmp_path / "high")
    assert code == 1 and {"training stopped", "learning rate far too high"} <= set(found), found
    assert found["training stopped"]["severity"] == "error" and "nan" in found["training stopped"]["saw"]
    code, out, _ = run(capsys, "doctor", str(tmp_path / "high"))
    assert out.index("error: training stopped") < out.index("warning: learning rate")  # errors first


def test_tiny_data_for_many_steps_overfits_and_is_caught_during_training(tmp_path, capsys, fast_builtin):
    rows = [json.loads(line) for line in (SAMPLES / "sentiment" / "train.jsonl").read_text().splitlines()[:8]]
    data = write_jsonl(tmp_path / "tiny.jsonl", rows)
    code, out, err = run(capsys, "recipe", "run", "lora-sentiment", f"data.train={data}", "train.lr=5e-3",
                         "train.max_steps=120", "train.batch_size=8", "train.eval_every=10", "train.log_every=5",
                         "train.save_every=null", f"output_dir={tmp_path / 'over'}")
    assert code == 0, err[-2000:]
    assert "doctor: warning: overfitting: eval loss rose from" in out  # live, beside the progress lines
    code, found = doctor(capsys, tmp_path / "over")
    assert code == 1 and "overfitting" in found, found
    assert found["overfitting"]["fixes"][0].startswith("train for fewer steps")


def test_doctor_refuses_what_is_not_a_run(tmp_path, capsys):
    code, _, err = run(capsys, "doctor", str(tmp_path))
    assert code == 2 and "is not an adapterkit run" in err


def logs(losses, norms=None, rates=None):
    return [{"step": i + 1, "loss": v, "grad_norm": (norms or [1.0] * len(losses))[i],
             "tokens_per_s": (rates or [1000.0] * len(losses))[i]} for i, v in enumerate(losses)]


@pytest.mark.parametrize("train, check", [
    (logs([2.0, 1.9, 1.8, 1.9, 2.1, 2.3, 2.5, 2.7, 2.9, 3.1, 3.3, 3.5]), "loss rising"),
    (logs([2.0, 1.9, 1.8, 1.7, 1.6, 1.5, 9.0, 1.4, 1.3, 1.2]), "loss spike"),
    (logs([2.0, 1.9, 1.8, 1.7], norms=[0.0, 0.0, 0.0, 0.0]), "gradient zero"),
    (logs([2.0, 1.9, 1.8, 1.7, 1.6], norms=[1.0, 1.2, 0.9, 500.0, 1.0]), "gradient exploding"),
    (logs([2.0 - 0.1 * i for i in range(10)], rates=[900, 1000, 1010, 990, 1000, 1005, 995, 1000, 150, 140]),
     "throughput collapsed"),
])
def test_each_trend_check_fires_on_its_fault_only(train, check):
    found = {f.check for f in diagnose(Evidence(train=train, lr=2e-3))}
    assert found == {check}, found
    healthy = logs([2.0 - 0.1 * i for i in range(12)])
    assert diagnose(Evidence(train=healthy, lr=2e-3)) == []


def test_data_checks_read_the_data_report():
    report = {"split": "train", "examples": 10, "tokens": 500, "supervised_tokens": 40, "eos_supervised": 0}
    found = {f.check for f in diagnose(Evidence(lr=2e-3, reports=[report]))}
    assert found == {"end of turn never supervised"}
    found = {f.check for f in diagnose(Evidence(lr=2e-3, reports=[{**report, "supervised_tokens": 0}]))}
    assert "nothing supervised" in found
    assert diagnose(Evidence(lr=2e-3, stage="pretrain", reports=[report])) == []  # pretraining has no turns
