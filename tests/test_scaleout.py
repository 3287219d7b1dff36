"""Scale-out: a recipe runs unchanged under `accelerate launch`. Two CPU processes (gloo) train one
LoRA adapter on their halves of the data; the run directory holds one checkpoint, one correct final
adapter and one log, all written by the main process alone.

    python -m pytest -q tests/test_scaleout.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from conftest import write_jsonl
from safetensors.torch import load_file
from test_methods import MEMO

ROOT = Path(__file__).resolve().parents[1]


def launch(args: list[str], tmp_path: Path, processes: int = 2, **env: str) -> subprocess.CompletedProcess:
    """`adapterkit recipe run ARGS` under `accelerate launch` with `processes` CPU processes."""
    return launch_script(["-m", "adapterkit", "recipe", "run", *args], tmp_path, processes, **env)


def launch_script(args: list[str], tmp_path: Path, processes: int = 2, **env: str) -> subprocess.CompletedProcess:
    """`accelerate launch ARGS` with `processes` CPU processes. `--multi_gpu` is accelerate's torchrun
    launcher; with no GPU visible its processes join a gloo group (`--cpu` would start only one)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1",
           "HF_HOME": str(tmp_path / "hf-home"),  # no accelerate config of the user's is read
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), **env}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
               *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path,
                          check=False)


def test_two_processes_train_one_adapter_with_one_checkpoint(tmp_path, tiny_model_dir):
    from peft import PeftModel, get_peft_model_state_dict
    from transformers import AutoModelForCausalLM, AutoTokenizer

    train, evaluation = write_jsonl(tmp_path / "train.jsonl", MEMO), write_jsonl(tmp_path / "eval.jsonl", MEMO[:4])
    out = tmp_path / "run"
    # 8 rows, 2 per process per step (unpacked: one row per example): an epoch is 2 steps; the only
    # checkpoint is the last step's.
    done = launch(["lora-sentiment", f"model.name_or_path={tiny_model_dir}", f"data.train={train}",
                   "data.packing=false", f"data.eval={evaluation}", "train.max_steps=4", "train.batch_size=2",
                   "train.save_every=4", "train.log_every=1", "train.lr=1e-2", "train.precision=fp32",
                   f"output_dir={out}"], tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "completed" and manifest["processes"] == 2
    # One checkpoint, holding both processes' RNG states (so it resumes), and nothing half-written.
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["checkpoint-4"]
    checkpoint = out / "checkpoints" / "checkpoint-4"
    assert {"rng_state_0.pth", "rng_state_1.pth", "trainer_state.json"} <= {p.name for p in checkpoint.iterdir()}
    # No staging, temp or .old dirs, no temp files: only the run's lock file (README: one run per output dir).
    assert [str(p.relative_to(out)) for p in out.rglob(".*")] == [".adapterkit.lock"]

    # The main process alone printed and logged: every step once, one eval before and one after.
    assert done.stdout.count("saved lora adapter") == 1 and done.stdout.count("train step     4/4") == 1
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3, 4]
    assert [r["phase"] for r in log if "eval_loss" in r] == ["before", "after"]
    # The processes trained on different halves: a process's epoch is 2 steps of 2 rows (half the
    # data), and the tokens the two saw in the first epoch are every training token once.
    assert json.loads((checkpoint / "trainer_state.json").read_text())["epoch"] == 2.0
    report = json.loads((out / "data_report.json").read_text())[0]
    assert next(r["tokens"] for r in log if r["step"] == 2 and "loss" in r) == report["tokens"]

    # One final adapter: trained (LoRA B starts at zero), the same as the last checkpoint's, and
    # loaded whole by plain peft on the base, where it changes the logits.
    saved = load_file(out / "model" / "adapter_model.safetensors")
    b = {k: t for k, t in saved.items() if "lora_B" in k}
    assert b and all(t.abs().sum() > 0 for t in b.values())
    at_checkpoint = load_file(checkpoint / "adapter_model.safetensors")
    assert saved.keys() == at_checkpoint.keys() and all(torch.equal(saved[k], at_checkpoint[k]) for k in saved)
    tok = AutoTokenizer.from_pretrained(out / "model")
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out / "model").eval()
    loaded = get_peft_model_state_dict(model)
    assert loaded.keys() == saved.keys() and all(torch.equal(loaded[k], saved[k]) for k in saved)
    batch = tok([r["text"] for r in MEMO], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**batch).logits
        with model.disable_adapter():
            base = model(**batch).logits
    assert torch.isfinite(logits).all() and not torch.allclose(logits, base, atol=1e-3)


def test_builtin_base_is_built_once_by_the_main_process(tmp_path):
    # builtin:tiny on first use under `accelerate launch`: the main process pretrains it alone (a
    # one-process run, the same model however it was first asked for) while the other waits.
    script = tmp_path / "ask.py"
    script.write_text("import sys\nfrom adapterkit.stages import build_builtin\n"
                      "print('model at', build_builtin('tiny', sys.argv[1:]))\n")
    cache = tmp_path / "cache"
    overrides = ["train.max_steps=1", "train.save_every=null", "data.eval=null", "model.vocab_size=512"]
    done = launch_script([str(script), *overrides], tmp_path, ADAPTERKIT_CACHE=str(cache))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    built = list((cache / "builtin").iterdir())  # and no half-built copy beside it
    assert len(built) == 1 and done.stdout.count(str(built[0] / "model")) == 2  # both processes got it
    assert done.stderr.count("building the built-in base model") == 1
    assert json.loads((built[0] / "manifest.json").read_text())["processes"] == 1
