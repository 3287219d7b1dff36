"""Recipes: every shipped YAML validates, overrides follow YAML rules, and every problem is
reported together with its file line or override, the bad value and the fix."""

from __future__ import annotations

import pytest

from adapterkit.config import (
    Recipe,
    apply_overrides,
    dump_recipe,
    load_recipe,
    parse_recipe,
    read_recipe_yaml,
    recipe_to_dict,
    shipped,
    summary,
)
from adapterkit.errors import ConfigError
from adapterkit.stages.pipeline import is_pipeline, load_pipeline, resolve

ALL_METHODS = {"full", "lora", "qlora", "prompt_tuning", "prefix_tuning", "p_tuning"}
ALL_TASKS = {"qa", "summarization", "translation", "generation", "sentiment", "text", "chat", "preference",
             "unpaired"}
PIPELINES = {n for n, p in shipped().items() if is_pipeline(p)}
RECIPES = sorted(set(shipped()) - PIPELINES)


def parse(text: str, *overrides: str) -> Recipe:
    src = read_recipe_yaml(text, "r.yaml", "r")
    apply_overrides(src, list(overrides))
    return parse_recipe(src)


def problems(text: str, *overrides: str) -> list[str]:
    with pytest.raises(ConfigError) as e:
        parse(text, *overrides)
    return [str(p) for p in e.value.problems]


@pytest.mark.parametrize("name", RECIPES)
def test_shipped_recipe_validates_and_opens_with_its_command(name):
    path = shipped()[name]
    recipe, _ = load_recipe(name)
    assert recipe.output_dir == f"runs/{name}"
    first = path.read_text().splitlines()[0]
    assert first == f"# adapterkit recipe run {name}"
    assert summary(path)["description"]


@pytest.mark.parametrize("name", sorted(PIPELINES))
def test_shipped_pipeline_validates_every_stage_and_opens_with_its_command(name):
    path = shipped()[name]
    assert path.read_text().splitlines()[0] == f"# adapterkit recipe run {name}"
    last = load_pipeline(path, []).stages[-1].name
    stages = resolve(load_pipeline(path, ["train.max_steps=5", f"{last}.train.seed=7"]))
    assert [r.train.max_steps for _, r, _, _ in stages] == [5] * len(stages)
    assert stages[-1][1].train.seed == 7 and stages[0][1].train.seed == 42  # a stage's own override
    # Each stage starts from the one before: whole weights after pretraining, the run after an adapter;
    # a distill stage takes it as its teacher.
    for (_, prev, _, _), (_, recipe, _, came_from) in zip(stages, stages[1:]):
        assert came_from == prev.output_dir
        assert (recipe.model.from_run == prev.output_dir or recipe.model.name_or_path == f"{prev.output_dir}/model"
                or recipe.distill.teacher == prev.output_dir)


@pytest.mark.parametrize("name", RECIPES)
@pytest.mark.parametrize("method", sorted(ALL_METHODS))
def test_saved_recipe_reads_back_as_the_same_recipe(name, method):
    # The run directory's recipe.yaml is how eval, export and later stages know what was trained.
    recipe, _ = load_recipe(name)
    if recipe.model.init == "scratch" and method != "full":
        pytest.skip("scratch models train with full only")
    try:
        recipe, _ = load_recipe(name, [f"adapter.method={method}", "train.gradient_checkpointing=false",
                                       "data.packing=false"])
    except ConfigError:
        pytest.skip("not a valid combination of this recipe's settings")
    saved = dump_recipe(recipe)
    again = parse(saved)
    assert dump_recipe(again) == saved
    assert recipe_to_dict(again)["train"] == recipe_to_dict(recipe)["train"]


def test_shipped_recipes_cover_every_method_and_task():
    rows = [summary(shipped()[n]) for n in RECIPES]
    assert {r["method"] for r in rows} == ALL_METHODS
    assert {r["task"] for r in rows} == ALL_TASKS


def test_overrides_follow_yaml_scalar_rules():
    r = parse("stage: sft\n", "train.lr=1e-4", "train.max_steps=7", "data.eval=null", "data.packing=true",
              "adapter.lora.target_modules=[q_proj, v_proj]")
    assert r.train.lr == pytest.approx(1e-4) and isinstance(r.train.lr, float)
    assert r.train.max_steps == 7
    assert r.data.eval is None and r.data.packing is True
    assert r.adapter.lora.target_modules == ["q_proj", "v_proj"]


def test_unknown_keys_get_line_numbers_and_did_you_mean():
    text = "stage: sft\ntrain:\n  lr: 0.001\n  batch_szie: 4\nmodle:\n  dtype: auto\n"
    found = problems(text)
    assert any("r.yaml:4" in p and "batch_szie" in p and "did you mean 'batch_size'" in p for p in found)
    assert any("r.yaml:5" in p and "did you mean 'model'" in p for p in found)


def test_all_problems_are_reported_together():
    found = problems("stage: sft\n", "adapter.method=qlra", "train.lr=abc", "adapter.lora.r=0",
                     "data.columns.txt=review")
    assert len(found) == 4
    joined = "\n".join(found)
    assert "override 'adapter.method=qlra'" in joined and "did you mean 'qlora'" in joined
    assert "train.lr" in joined and "'abc'" in joined and "expected a number" in joined
    assert "adapter.lora.r" in joined and ">= 1" in joined
    assert "'txt' is not a field of task 'sentiment'" in joined


@pytest.mark.parametrize("overrides, needle", [
    (["stage=pretrain", "data.task=sentiment"], "stage 'pretrain' trains on raw text"),
    (["stage=pretrain", "data.task=text", "model.init=scratch", "adapter.method=lora"], "needs pretrained weights"),
    (["adapter.method=prompt_tuning", "data.packing=true"], "packing cannot be combined"),
    (["adapter.method=prefix_tuning", "train.gradient_checkpointing=true"], "gradient checkpointing"),
    (["model.init=scratch"], "only makes sense for stage 'pretrain'"),
    (["data.template=Review: {txt}"], "unknown placeholder"),
    (["data.template=Review: {text} -> {label}"], "must not contain the answer field"),
    (["adapter.lora.dropout=1.5"], "out of range"),
    (["train.precision=fp8"], "'fp8' is not allowed"),
    (["adapter.method=lora", "adapter.prompt.num_virtual_tokens=8"], "adapter.prompt: is set but adapter.method"),
])
def test_incompatible_combinations_are_rejected(overrides, needle):
    assert any(needle in p for p in problems("stage: sft\n", *overrides)), problems("stage: sft\n", *overrides)


def test_switching_method_by_override_ignores_the_files_other_method_section():
    r = parse("adapter:\n  method: lora\n  lora:\n    r: 8\n", "adapter.method=p_tuning")
    assert r.adapter.method == "p_tuning"


def test_bad_yaml_names_the_line():
    found = problems("stage: sft\ntrain:\n  lr: [1,\n")
    assert "r.yaml:" in found[0] and "not valid YAML" in found[0]


def test_duplicate_keys_are_an_error():
    found = problems("stage: sft\nstage: pretrain\n")
    assert "r.yaml:2" in found[0] and "set twice" in found[0]


def test_unknown_recipe_name_suggests_the_shipped_one():
    with pytest.raises(ConfigError) as e:
        load_recipe("lora-sentimnt")
    assert "did you mean 'lora-sentiment'" in str(e.value)


def test_optimizer_auto_is_paged_8bit_adamw_for_qlora_on_a_gpu_only():
    from adapterkit.models import OPTIM, resolve_optimizer

    assert resolve_optimizer("auto", "qlora", "cuda") == "paged_adamw_8bit"
    assert resolve_optimizer("auto", "qlora", "cpu") == "adamw"  # bitsandbytes' 8-bit optimizers need CUDA
    assert resolve_optimizer("auto", "lora", "cuda") == "adamw"
    assert resolve_optimizer("adamw_8bit", "full", "cuda") == "adamw_8bit"
    assert set(OPTIM) == {"adamw", "adamw_8bit", "paged_adamw_8bit"}
