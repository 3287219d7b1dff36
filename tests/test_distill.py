"""The distill stage: its loss against trl's, its top-k form, the cache, the teacher forms, the refusals."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import architectures
import pytest
import torch
from safetensors import safe_open

from adapterkit.config import DistillConfig, load_recipe
from adapterkit.errors import ConfigError
from adapterkit.stages import run
from adapterkit.stages.distill import (
    divergence,
    position_losses,
    positions_logits,
    sparse_of,
    supervised,
)


def _logits(n: int = 12, v: int = 40, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, v, generator=g) * 3, torch.randn(n, v, generator=g) * 3


@pytest.mark.parametrize("loss,beta", [("forward_kl", 0.0), ("reverse_kl", 1.0), ("jsd", 0.5), ("jsd", 0.2)])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_divergences_are_trls_generalised_jsd(loss, beta, temperature):
    from trl.experimental.gkd import GKDTrainer

    student, teacher = _logits()
    targets = torch.zeros(student.size(0), dtype=torch.long)
    settings = DistillConfig(teacher="t", loss=loss, jsd_beta=beta if loss == "jsd" else 0.5,
                             temperature=temperature, label_weight=0.0, top_k=None)
    ours = position_losses(student, targets, teacher, settings, 0.0)["distill"].mean() / temperature ** 2
    theirs = GKDTrainer.generalized_jsd_loss(student[None], teacher[None], beta=beta, temperature=temperature,
                                             reduction="sum") / student.size(0)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-5)


def test_top_k_form_is_exact_at_full_k_and_a_lower_bound_below_it():
    student, teacher = _logits(v=30)
    dense_t = torch.log_softmax(teacher, -1)
    s = torch.log_softmax(student, -1)
    exact = divergence(s, dense_t, "forward_kl", 0.5)
    full = sparse_of(teacher, 29, 1.0)  # 29 tokens and the one left over: the whole distribution
    settings = DistillConfig(teacher="t", label_weight=0.0)
    targets = torch.zeros(student.size(0), dtype=torch.long)
    assert torch.allclose(position_losses(student, targets, full, settings, 0.0)["distill"], exact, atol=1e-5)
    # Folding outcomes together can only lose information: the k + 1 bucket divergence is at most the full one.
    for k in (1, 5, 10):
        coarse = position_losses(student, targets, sparse_of(teacher, k, 1.0), settings, 0.0)["distill"]
        assert (coarse <= exact + 1e-5).all() and coarse.sum() > 0
    # and it still pulls the student toward the teacher's top tokens
    student.requires_grad_(True)
    position_losses(student, targets, sparse_of(teacher, 5, 1.0), settings, 0.0)["total"].sum().backward()
    assert student.grad.abs().sum() > 0


def test_the_mix_of_labels_teacher_and_confidence():
    student, teacher = _logits()
    targets = torch.randint(0, student.size(1), (student.size(0),), generator=torch.Generator().manual_seed(1))
    settings = DistillConfig(teacher="t", label_weight=0.3, top_k=None, temperature=2.0)
    parts = position_losses(student, targets, teacher, settings, 0.6)
    expected = 0.3 * parts["label"] + 0.7 * (0.4 * parts["distill"] + 0.6 * parts["confidence"])
    assert torch.allclose(parts["total"], expected)
    assert torch.allclose(parts["label"], torch.nn.functional.cross_entropy(student, targets, reduction="none"))
    # the confidence term is the cross-entropy against the student's own argmax
    own = torch.nn.functional.cross_entropy(student, student.argmax(-1), reduction="none")
    assert torch.allclose(parts["confidence"], own)


@pytest.mark.parametrize("name", sorted(architectures.ARCHS))
def test_logits_at_supervised_positions_only_on_every_family(name):
    from transformers import AutoModelForCausalLM

    tok = architectures.build_tokenizer(name)
    model = AutoModelForCausalLM.from_config(architectures.build_config(name, tok)).eval()
    ids = torch.randint(0, len(tok), (2, 10), generator=torch.Generator().manual_seed(0))
    labels = torch.full_like(ids, -100)
    labels[0, 4:8], labels[1, 6:10] = ids[0, 4:8], ids[1, 6:10]
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    mask = supervised(labels)
    with torch.no_grad():
        full = model(input_ids=ids).logits
        assert torch.allclose(positions_logits(model, batch, mask), full[mask], atol=1e-5)


def test_logits_positions_skip_a_soft_prompts_virtual_tokens(tiny_model_dir):
    from peft import PromptTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5)).eval()
    ids = torch.randint(0, 500, (2, 9), generator=torch.Generator().manual_seed(0))
    labels = torch.full_like(ids, -100)
    labels[:, 5:] = ids[:, 5:]
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    mask = supervised(labels)
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=batch["attention_mask"]).logits[:, 5:]
        assert torch.allclose(positions_logits(model, batch, mask, virtual=5), full[mask], atol=1e-5)


FAST = ["train.save_every=null", "train.log_every=1", "eval.limit=4"]


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory, fast_builtin) -> Path:
    """A LoRA sentiment run on builtin:tiny: a teacher on the same base with an adapter."""
    out = tmp_path_factory.mktemp("teacher") / "run"
    recipe, src = load_recipe("lora-sentiment", [*FAST, "train.max_steps=6", f"output_dir={out}"])
    run(recipe, src, echo=False)
    return out


def _distill(out: Path, teacher: Path, *overrides: str) -> dict:
    recipe, src = load_recipe("distill-sentiment", [*FAST, "train.max_steps=3", f"distill.teacher={teacher}",
                                                    f"output_dir={out}", *overrides])
    result = run(recipe, src, echo=False)
    manifest = json.loads((result.out / "manifest.json").read_text())
    log = [json.loads(x) for x in (result.out / "train_log.jsonl").read_text().splitlines()]
    return {"manifest": manifest, "log": log, "metrics": result.metrics}


def test_cached_teacher_trains_as_the_teacher_on_the_fly_and_is_reused(teacher_run, tmp_path, offline_env):
    cached = _distill(tmp_path / "cached", teacher_run, "distill.cache=true")
    live = _distill(tmp_path / "live", teacher_run, "distill.cache=false")
    cache = Path(cached["manifest"]["distill"]["cache"])
    assert cache.is_file() and cache.is_relative_to(offline_env) and live["manifest"]["distill"]["cache"] is None
    with safe_open(str(cache), "pt") as f:
        assert f.get_slice("index").get_shape()[1] == 20 and f.get_slice("logprob").get_shape()[1] == 21
        # every supervised position of the 96 rows (a label token and EOS each)
        assert f.get_tensor("offsets")[-1].item() == 96 * 2
    # The same losses whether the teacher ran once (top-20 in float16) or on every batch.
    train = [(r["loss"], r["distill_loss"]) for r in cached["log"] if "loss" in r]
    again = [(r["loss"], r["distill_loss"]) for r in live["log"] if "loss" in r]
    assert len(train) == 3 and all(t == pytest.approx(a, abs=2e-3) for t, a in zip(train, again))
    for run_ in (cached, live):
        m = run_["metrics"]
        assert m["eval_loss_after"] < m["eval_loss_before"]
        assert m["teacher_eval_loss"] < m["eval_loss_before"]  # the teacher knows the task; the base does not
        assert "accuracy" in m["task_teacher"]
    mtime = cache.stat().st_mtime_ns
    reused = _distill(tmp_path / "reused", teacher_run, "distill.cache=true", "adapter.lora.r=2")
    assert reused["manifest"]["distill"]["cache"] == str(cache) and cache.stat().st_mtime_ns == mtime
    assert "teacher" in (tmp_path / "cached" / "report.md").read_text()


def test_weak_to_strong_trains_on_the_teacher_alone_with_confidence(teacher_run, tmp_path):
    got = _distill(tmp_path / "w2s", teacher_run, "distill.label_weight=0", "distill.confidence=0.75",
                   "distill.loss=jsd", "train.max_steps=5", "adapter.method=prompt_tuning", "train.lr=0.05")
    assert got["manifest"]["status"] == "completed" and got["manifest"]["method"] == "prompt_tuning"
    rows = [r for r in got["log"] if "loss" in r]
    assert len(rows) == 5 and all(r["distill_loss"] > 0 for r in rows)


def test_a_teacher_with_another_tokenizer_is_refused_before_anything_is_written(tiny_model_dir, tmp_path,
                                                                              fast_builtin):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "adapterkit", "recipe", "run", "distill-sentiment",
                           f"distill.teacher={tiny_model_dir}", f"output_dir={out}", "train.max_steps=2"],
                          capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    assert "distill.teacher" in proc.stderr and "tokenizer" in proc.stderr and "vocabularies differ" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (out / "manifest.json").exists() and not (out / "model").exists()


@pytest.mark.parametrize("overrides,key", [
    (["distill.teacher=null"], "distill.teacher"),
    (["distill.cache=true", "distill.top_k=null"], "distill.cache"),
    (["distill.label_weight=1.5"], "distill.label_weight"),
    (["distill.label_weight=1"], "distill.label_weight"),
    (["distill.temperature=0"], "distill.temperature"),
    (["distill.loss=jsd", "distill.jsd_beta=1"], "distill.jsd_beta"),
    (["distill.confidence=1"], "distill.confidence"),
    (["data.packing=true"], "data.packing"),
])
def test_bad_distill_settings_name_the_key(overrides, key):
    with pytest.raises(ConfigError) as e:
        load_recipe("distill-sentiment", overrides)
    assert any(p.key == key for p in e.value.problems), [str(p) for p in e.value.problems]


def test_a_distill_section_outside_the_distill_stage_is_refused():
    with pytest.raises(ConfigError) as e:
        load_recipe("lora-sentiment", ["distill.teacher=runs/t"])
    assert any(p.key == "distill" and "stage: distill" in p.fix for p in e.value.problems)


def test_the_distill_pipeline_takes_the_stage_before_as_teacher():
    from adapterkit.config import shipped
    from adapterkit.stages.pipeline import load_pipeline, resolve

    stages = resolve(load_pipeline(shipped()["pipeline-distill"], ["train.max_steps=5"]))
    (_, teacher, _, _), (_, student, _, came_from) = stages
    assert student.stage == "distill" and student.distill.teacher == teacher.output_dir == came_from
    assert student.model.name_or_path == "builtin:tiny" and student.model.from_run is None


@pytest.mark.parametrize("method", ["full", "qlora", "prefix_tuning", "p_tuning"])
def test_every_method_can_be_the_student(teacher_run, tmp_path, method):
    from adapterkit import doctor

    got = _distill(tmp_path / method, teacher_run, f"adapter.method={method}", "train.max_steps=2",
                   *(["train.lr=1e-4"] if method == "full" else []))
    assert got["manifest"]["status"] == "completed" and got["manifest"]["method"] == method
    assert all(r["distill_loss"] >= 0 and r["label_loss"] > 0 for r in got["log"] if "loss" in r)
    assert (tmp_path / method / "model").is_dir()
    assert doctor.report(tmp_path / method)[0] == []  # a healthy run raises nothing


def test_a_plain_model_directory_teaches_and_a_missing_teacher_is_named(fast_builtin, tmp_path):
    got = _distill(tmp_path / "plain", fast_builtin, "train.max_steps=2", "distill.cache=false")
    assert got["manifest"]["distill"]["teacher_source"] == str(fast_builtin)
    assert got["metrics"]["teacher_eval_loss"] > 0
    proc = subprocess.run([sys.executable, "-m", "adapterkit", "recipe", "run", "distill-sentiment",
                           f"distill.teacher={tmp_path / 'missing'}", f"output_dir={tmp_path / 'run'}"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "missing" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
