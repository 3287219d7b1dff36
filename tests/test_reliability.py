"""Reliability: a run killed with SIGKILL at any moment, even inside a checkpoint save, resumes on
re-run and ends bit-identical to an uninterrupted run; changed recipes are refused; NaN stops the
run without touching the last good checkpoint; a failed final save loses nothing."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback

from adapterkit.cli import main
from adapterkit.config import load_recipe
from adapterkit.errors import TrainingStopped
from adapterkit.stages import run
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


@pytest.fixture
def small_disk(tmp_path):
    """A real 16 MiB tmpfs (needs root, as these machines run; skipped otherwise) and a way to fill it."""
    mount = tmp_path / "disk"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to fill (needs root): {made.stderr.decode().strip()}")

    def fill() -> Path:
        filler = mount / "filler"
        with open(filler, "wb") as f:
            try:
                while True:
                    f.write(b"\0" * 65536)
                    f.flush()
            except OSError as e:
                assert e.errno == errno.ENOSPC
        return filler

    yield mount, fill
    subprocess.run(["umount", "-l", str(mount)], check=False)


class FillDisk(TrainerCallback):
    """Fill the disk after optimizer step `step`, or (step None) when training ends, before the final save."""

    def __init__(self, fill, step=None):
        self.fill, self.step, self.filler = fill, step, None

    def on_step_end(self, args, state, control, **kwargs):
        if self.step is not None and state.global_step == self.step:
            self.filler = self.fill()

    def on_train_end(self, args, state, control, **kwargs):
        if self.step is None:
            self.filler = self.fill()


def test_disk_full_at_the_final_save_loses_nothing_and_the_same_command_finishes(tmp_path, tiny_model_dir,
                                                                                 small_disk):
    from adapterkit.errors import AdapterkitError

    mount, fill = small_disk
    data = write_jsonl(tmp_path / "d.jsonl", MEMO)
    out = mount / "run"
    recipe, src = load_recipe("lora-sentiment", overrides(tiny_model_dir, data, out))
    filling = FillDisk(fill)
    with pytest.raises(AdapterkitError) as e:
        run(recipe, src, echo=False, callbacks=[filling])
    assert e.value.exit_code == 2 and "No space left on device" in str(e.value) and "checkpoint-6 is kept" in str(e.value)
    assert not (out / "model").exists() and not list(out.glob(".model.*"))  # nothing half-written
    assert (out / "checkpoints" / "checkpoint-6").is_dir()
    # On a full disk even the manifest cannot be rewritten: it stays whole, and says the run is unfinished.
    assert json.loads((out / "manifest.json").read_text())["status"] in ("failed", "running")
    filling.filler.unlink()  # space freed: the same command finishes from the last checkpoint
    run(recipe, src, echo=False)
    assert (out / "model" / "adapter_model.safetensors").is_file()


def test_disk_full_at_a_checkpoint_keeps_the_last_good_one(tmp_path, tiny_model_dir, small_disk):
    from adapterkit.errors import AdapterkitError

    mount, fill = small_disk
    data = write_jsonl(tmp_path / "d.jsonl", MEMO)
    out = mount / "run"
    recipe, src = load_recipe("lora-sentiment", overrides(tiny_model_dir, data, out))
    filling = FillDisk(fill, step=3)  # checkpoint-2 is written, checkpoint-4 cannot be
    with pytest.raises(AdapterkitError) as e:
        run(recipe, src, echo=False, callbacks=[filling])
    assert "could not write the checkpoint: No space left on device" in str(e.value)
    assert "checkpoint-2, is kept" in str(e.value)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-2"]  # no staging left
    filling.filler.unlink()
    run(recipe, src, echo=False)
    assert (out / "model").is_dir()


def test_disk_full_during_an_export_writes_nothing(tmp_path, tiny_model_dir, small_disk):
    from adapterkit.errors import AdapterkitError
    from adapterkit.export import export

    mount, fill = small_disk
    data = write_jsonl(tmp_path / "d.jsonl", MEMO)
    out = tmp_path / "run"
    recipe, src = load_recipe("lora-sentiment", overrides(tiny_model_dir, data, out))
    run(recipe, src, echo=False)
    fill()
    with pytest.raises(AdapterkitError) as e:
        export(out, mount / "exported", say=lambda *a: None)
    assert "could not write the export: No space left on device" in str(e.value)
    assert sorted(p.name for p in mount.iterdir()) == ["filler"]  # no export, no temp dir


def test_sigterm_and_ctrl_c_mark_the_run_interrupted_and_say_how_to_resume(tmp_path, tiny_model_dir):
    import signal

    data = write_jsonl(tmp_path / "d.jsonl", MEMO)
    for sig, code in ((signal.SIGTERM, 143), (signal.SIGINT, 130)):
        out, paused = tmp_path / sig.name, tmp_path / f"{sig.name}.paused"
        env = {**os.environ, "PAUSE_AT_STEP": "3", "PAUSED_FILE": str(paused)}
        env["PYTHONPATH"] = os.pathsep.join([str(HARNESS.parent.parent), env.get("PYTHONPATH", "")])
        # A shell without job control (a CI runner's `cmd &`) starts background jobs with SIGINT ignored,
        # and a child inherits that: the run under test gets Ctrl-C's default, as a terminal gives it.
        proc = subprocess.Popen([sys.executable, str(HARNESS), "lora-sentiment",
                                 *overrides(tiny_model_dir, data, out)], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        for _ in range(600):
            if paused.exists() or proc.poll() is not None:
                break
            time.sleep(0.2)
        assert paused.exists(), proc.communicate()[1][-2000:]
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == code, err[-2000:]
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["status"] == "interrupted" and manifest["error"] == f"interrupted by {sig.name}"
        assert f"interrupted ({sig.name}): checkpoint-2 is kept; re-run `" in err and "to resume from it" in err
        assert "Traceback" not in err
        assert not (out / "model").exists() and not list(out.glob(".model.*"))
        resumed = harness(overrides(tiny_model_dir, data, out))
        assert resumed.returncode == 0 and "checkpoint-2 (step 2)" in resumed.stdout


def test_a_second_run_on_the_same_output_dir_is_refused_while_the_first_holds_it(tmp_path, tiny_model_dir, capsys):
    """A real second process: the first holds the run dir's lock (mid-training), the second is refused with
    exit 2 naming the first one's pid and changes nothing; once the first is killed with SIGKILL, the OS has
    released the lock and the same command resumes."""
    data = write_jsonl(tmp_path / "d.jsonl", MEMO)
    out, paused = tmp_path / "run", tmp_path / "paused"
    env = {**os.environ, "PAUSE_AT_STEP": "3", "PAUSED_FILE": str(paused)}
    env["PYTHONPATH"] = os.pathsep.join([str(HARNESS.parent.parent), env.get("PYTHONPATH", "")])
    first = subprocess.Popen([sys.executable, str(HARNESS), "lora-sentiment", *overrides(tiny_model_dir, data, out)],
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(600):
            if paused.exists() or first.poll() is not None:
                break
            time.sleep(0.2)
        assert paused.exists(), "the first run never reached step 3"
        before = {str(p): p.stat().st_mtime_ns for p in out.rglob("*")}
        with pytest.raises(SystemExit) as e:
            main(["recipe", "run", "lora-sentiment", *overrides(tiny_model_dir, data, out)])
        err = capsys.readouterr().err
        assert e.value.code == 2 and f"pid {first.pid}" in err and "is in use" in err and "Traceback" not in err
        assert {str(p): p.stat().st_mtime_ns for p in out.rglob("*")} == before
    finally:
        first.kill()
        first.wait()
    assert first.returncode == -9
    with pytest.raises(SystemExit) as e:
        main(["recipe", "run", "lora-sentiment", *overrides(tiny_model_dir, data, out)])
    out_text = capsys.readouterr().out
    assert e.value.code == 0
    assert "resuming from" in out_text and (out / "model").is_dir()
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3, 4, 5, 6]
