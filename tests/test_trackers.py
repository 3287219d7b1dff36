"""train.report_to through transformers' own integrations, for real: tensorboard's event files read back."""

from __future__ import annotations

import json

import pytest

from adapterkit.cli import main
from adapterkit.config import load_recipe
from adapterkit.stages import run


def test_tensorboard_gets_the_loss_and_adapterkits_own_figures(tmp_path, fast_builtin):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    recipe, src = load_recipe("lora-sentiment", ["train.max_steps=4", "train.log_every=1", "train.save_every=null",
                                                 "train.report_to=[tensorboard]", f"output_dir={tmp_path / 'run'}"])
    out = run(recipe, src, echo=False).out
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/learning_rate", "train/grad_norm", "train/tokens_per_s", "eval/loss"} <= tags, tags
    logged = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    train = [r for r in logged if "loss" in r]
    assert [(e.step, round(e.value, 5)) for e in events.Scalars("train/loss")] == \
        [(r["step"], round(r["loss"], 5)) for r in train]
    assert [round(e.value, 1) for e in events.Scalars("train/tokens_per_s")] == [r["tokens_per_s"] for r in train]


@pytest.mark.parametrize("value, needle", [("tensorbord", "did you mean 'tensorboard'?"),
                                           ("[none, comet]", "'comet' is not a tracker")])
def test_an_unknown_tracker_is_refused(capsys, value, needle):
    with pytest.raises(SystemExit) as e:
        main(["recipe", "run", "lora-sentiment", f"train.report_to={value}", "--dry-run"])
    assert e.value.code == 2 and needle in capsys.readouterr().err


def test_a_run_shorter_than_log_every_logs_its_last_step_and_plots_lr_and_grad_norm(tmp_path, fast_builtin):
    import matplotlib.image

    recipe, src = load_recipe("lora-sentiment", ["train.max_steps=3", "train.log_every=10", "train.save_every=null",
                                                 f"output_dir={tmp_path / 'run'}"])
    out = run(recipe, src, echo=False).out
    logged = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "loss" in r] == [3]
    assert [r["phase"] for r in logged if "eval_loss" in r] == ["before", "after"]
    height = matplotlib.image.imread(out / "loss.png").shape[0]
    assert height == round((2.2 + 1.6 * 3) * 110)  # three panels: loss, learning rate, gradient norm
