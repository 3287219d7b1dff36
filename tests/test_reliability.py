"""Reliability: a run killed with SIGKILL at any moment, even inside a checkpoint save, resumes on
re-run and ends bit-identical to an uninterrupted run; changed recipes are refused; NaN stops the
run without touching the last good checkpoint; a failed final save loses nothing."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback

from adapterkit.cli import main
from adapterkit.config import load_recipe
from adapterkit.errors import TrainingStopped
from adapterkit.recipes.train import run
from conftest import write_jsonl
from test_methods import MEMO

HARNESS = Path(__file__).with_name("killable_run.py")


def overrides(model: Path, data: Path, out: Path) -> list[str]:
    # LoRA with dropout and shuffled batches of 4 over 8 rows: the RNG and the data position matter.
    return [f"model.name_or_path={model}", f"data.train={data}", "data.eval=null", "train.max_steps=6",
            "train.batch_size=4", "train.save_every=2", "train.save_total_limit=3", "train.log_every=1",
            "train.lr=1e-2", "train.precision=fp32", f"output_dir={out}"]


def harness(args: list[str], **kill: int) -> subprocess.CompletedProcess:
    env = {**os.environ, **{k.upper(): str(v) for k, v in kill.items()}}
    env["PYTHONPATH"] = os.pathsep.join([str(HARNESS.parent.parent), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, str(HARNESS), "lora-sentiment", *args], env=env, capture_output=True,
                          text=True, timeout=300)


def adapter_bytes(out: Path) -> bytes:
    return (out / "model" / "adapter_model.safetensors").read_bytes()


def test_kill_9_anywhere_then_resume_is_bit_identical(tmp_path, tiny_model_dir, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", MEMO)
    ref = tmp_path / "ref"
    done = harness(overrides(tiny_model_dir, data, ref))
    assert done.returncode == 0, done.stderr[-2000:]

    # Killed right after step 3: checkpoint-2 is the newest.
    a = tmp_path / "a"
    killed = harness(overrides(tiny_model_dir, data, a), kill_at_step=3)
    assert killed.returncode == -9
    assert not (a / "model").exists() and json.loads((a / "manifest.json").read_text())["status"] == "running"
    # The same command with a different recipe is refused, and nothing changes.
    before = sorted(str(p) for p in a.rglob("*"))
    with pytest.raises(SystemExit) as e:
        main(["recipe", "run", "lora-sentiment", *overrides(tiny_model_dir, data, a), "train.lr=5e-3"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "train.lr (0.01 -> 0.005)" in err and "--resume-anyway" in err
    assert sorted(str(p) for p in a.rglob("*")) == before
    resumed = harness(overrides(tiny_model_dir, data, a))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from" in resumed.stdout and "checkpoint-2 (step 2)" in resumed.stdout
    assert adapter_bytes(a) == adapter_bytes(ref)

    # Killed inside the save of checkpoint-4, then again after step 5 of the resumed run.
    b = tmp_path / "b"
    killed = harness(overrides(tiny_model_dir, data, b), kill_in_save_at_step=4)
    assert killed.returncode == -9
    assert (b / "checkpoints" / ".staging-4").is_dir() and not (b / "checkpoints" / "checkpoint-4").exists()
    killed = harness(overrides(tiny_model_dir, data, b), kill_at_step=5)
    assert killed.returncode == -9 and "checkpoint-2 (step 2)" in killed.stdout  # the half-written one was skipped
    resumed = harness(overrides(tiny_model_dir, data, b))
    assert resumed.returncode == 0 and "checkpoint-4 (step 4)" in resumed.stdout
    assert adapter_bytes(b) == adapter_bytes(ref)
    log = [json.loads(line) for line in (b / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3, 4, 5, 6]  # no step logged twice
    assert len(json.loads((b / "manifest.json").read_text())["resumed"]) == 2
    assert not list((b / "checkpoints").glob(".staging-*"))


def test_resume_anyway_and_restart(tmp_path, tiny_model_dir, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", MEMO)
    out = tmp_path / "run"
    assert harness(overrides(tiny_model_dir, data, out), kill_at_step=3).returncode == -9
    changed = [*overrides(tiny_model_dir, data, out), "train.max_steps=4"]
    with pytest.raises(SystemExit) as e:
        main(["recipe", "run", "lora-sentiment", *changed, "--resume-anyway"])
    assert e.value.code == 0
    assert "resuming from" in capsys.readouterr().out
    assert json.loads((out / "manifest.json").read_text())["metrics"]["steps"] == 4
    # Completed: the same command is refused; --restart trains again from scratch.
    with pytest.raises(SystemExit) as e:
        main(["recipe", "run", "lora-sentiment", *changed])
    assert e.value.code == 2 and "completed run" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["recipe", "run", "lora-sentiment", *changed, "--restart"])
    assert e.value.code == 0 and "resuming" not in capsys.readouterr().out
    assert "resumed" not in json.loads((out / "manifest.json").read_text())


def test_resume_does_not_wrap_the_adapter_twice(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "d.jsonl", MEMO)
    out = tmp_path / "run"
    assert harness(overrides(tiny_model_dir, data, out), kill_at_step=3).returncode == -9
    recipe, src = load_recipe("lora-sentiment", overrides(tiny_model_dir, data, out))
    result = run(recipe, src, echo=False)
    names = [n for n, _ in result.model.named_parameters()]
    assert all(n.count("base_model") == 1 for n in names), names[:3]
    assert all(n.count("lora_A") <= 1 for n in names)


class InjectNaN(TrainerCallback):
    """Corrupts one adapter weight after step 3, as a diverging run would."""

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == 3:
            with torch.no_grad():
                next(p for n, p in model.named_parameters() if "lora_B" in n).fill_(float("nan"))


def test_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "d.jsonl", MEMO)
    out = tmp_path / "run"
    recipe, src = load_recipe("lora-sentiment", overrides(tiny_model_dir, data, out))
    with pytest.raises(TrainingStopped) as e:
        run(recipe, src, echo=False, callbacks=[InjectNaN()])
    message = str(e.value)
    assert "step 4" in message and "the training loss is nan" in message
    assert "checkpoint-2, is kept" in message and e.value.exit_code == 3
    assert not (out / "model").exists()
    assert sorted(p.name for p in (out / "checkpoints").glob("checkpoint-*")) == ["checkpoint-2"]
    from safetensors.torch import load_file  # the kept checkpoint holds finite weights

    weights = load_file(out / "checkpoints" / "checkpoint-2" / "adapter_model.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values())
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "failed" and "nan" in manifest["error"]


def test_disk_full_while_saving_the_final_model_loses_nothing(tmp_path, tiny_model_dir, monkeypatch, capsys):
    from adapterkit import rundir

    real_publish = rundir.publish_dir

    def full_disk(tmp, final):
        if final.name == "model":
            raise OSError(errno.ENOSPC, "No space left on device")
        real_publish(tmp, final)

    monkeypatch.setattr(rundir, "publish_dir", full_disk)
    data = write_jsonl(tmp_path / "d.jsonl", MEMO)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        main(["recipe", "run", "lora-sentiment", *overrides(tiny_model_dir, data, out)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "No space left on device" in err and "Traceback" not in err
    assert not (out / "model").exists() and not list(out.glob(".model.*"))
    assert (out / "checkpoints" / "checkpoint-6").is_dir()
    # Space freed: the same command finishes from the last checkpoint.
    monkeypatch.setattr(rundir, "publish_dir", real_publish)
    with pytest.raises(SystemExit) as e:
        main(["recipe", "run", "lora-sentiment", *overrides(tiny_model_dir, data, out)])
    assert e.value.code == 0 and (out / "model" / "adapter_model.safetensors").is_file()
