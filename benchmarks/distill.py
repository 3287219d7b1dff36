"""Does distillation bring a student closer to its teacher than the labels alone, and does a weak teacher's
strong student end better than its teacher (weak-to-strong)? Measured on real data and reported either way.

    python benchmarks/distill.py                  # about 20 minutes on 2 CPU cores
    python benchmarks/distill.py --seeds 0 --student-steps 40

1. Distillation against labels only, on the instruction set (../shared/data/instruction, task
   generation): the teacher is builtin:tiny fully fine-tuned for --teacher-steps steps; each student is
   builtin:tiny with a rank-8 LoRA adapter trained for --student-steps steps on the same rows, once on the
   labels alone (stage sft) and once distilled (stage distill: forward KL, T=1, label_weight 0.5, the
   teacher's top-50 cached once and reused by every seed). The held-out loss is measured on 200 dev rows.
2. Weak-to-strong, on SST-2 (../shared/data/sentiment): the weak teacher is builtin:tiny with LoRA, trained
   on the first 1,000 train rows' labels. The strong model is a wider, deeper model with builtin:tiny's
   tokenizer, pretrained here on the sample corpus and wikitext-2. On the next 2,000 rows it is trained
   (LoRA) on the teacher's distributions alone (label_weight 0), with and without the auxiliary
   confidence loss (0.75), and, as the ceiling, on the true labels. Accuracy is on 400 dev rows;
   "performance gap recovered" is (student - teacher) / (ceiling - teacher), as in Burns et al. (2023).

Writes benchmarks/results/distill.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
RESULTS = Path(__file__).resolve().parent / "results"


def lines(path: Path) -> list[str]:
    return [x for x in path.read_text(encoding="utf-8").split("\n") if x]


def write(path: Path, rows: list[str]) -> Path:
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


def run_recipe(name: str, overrides: list[str]) -> dict[str, Any]:
    from adapterkit.config import load_recipe
    from adapterkit.stages import run

    recipe, src = load_recipe(name, overrides)
    t = time.time()
    result = run(recipe, src, echo=False)
    metrics = dict(result.metrics)
    metrics["seconds"] = round(time.time() - t, 1)
    metrics["out"] = str(result.out)
    return metrics


def distill_vs_labels(root: Path, seeds: list[int], teacher_steps: int, student_steps: int,
                      method: str = "lora") -> dict[str, Any]:
    folder = SHARED / "instruction"
    train = write(root / "instruction-train.jsonl", lines(folder / "train.jsonl")[:2000])
    dev = write(root / "instruction-dev.jsonl", lines(folder / "dev.jsonl")[:200])
    common = ["data.task=generation", f"data.train={train}", f"data.eval={dev}", "data.max_length=256", "data.max_dropped=0.1",
              "train.save_every=null", "train.log_every=20", "train.batch_size=8", "eval.limit=4",
              "eval.max_new_tokens=8"]
    print(f"instruction: teacher, builtin:tiny fully fine-tuned for {teacher_steps} steps", flush=True)
    teacher = run_recipe("lora-sentiment", [*common, "adapter.method=full", "train.lr=1e-3",
                                            f"train.max_steps={teacher_steps}", f"output_dir={root / 'teacher'}"])
    out: dict[str, Any] = {"teacher_eval_loss": teacher["eval_loss_after"], "teacher_seconds": teacher["seconds"],
                           "labels": {}, "distilled": {}}
    student = [*common, f"train.max_steps={student_steps}",
               *(["adapter.lora.r=8", "adapter.lora.alpha=16", "train.lr=2e-3"] if method == "lora"
                 else ["adapter.method=full", "train.lr=1e-3"])]
    for seed in seeds:
        labels = run_recipe("lora-sentiment", [*student, f"train.seed={seed}", f"output_dir={root / f'labels-{seed}'}"])
        distilled = run_recipe("distill-sentiment", [
            *student, f"train.seed={seed}", f"distill.teacher={root / 'teacher'}", "distill.temperature=1.0",
            "distill.label_weight=0.5", "distill.top_k=50", "distill.cache=true",
            f"output_dir={root / f'distilled-{seed}'}"])
        out["labels"][seed] = {"eval_loss": labels["eval_loss_after"], "seconds": labels["seconds"]}
        out["distilled"][seed] = {"eval_loss": distilled["eval_loss_after"], "seconds": distilled["seconds"]}
        print(f"  seed {seed}: teacher {teacher['eval_loss_after']:.4f}, labels {labels['eval_loss_after']:.4f}, "
              f"distilled {distilled['eval_loss_after']:.4f}", flush=True)
    return out


def strong_base(root: Path, steps: int) -> Path:
    """A wider, deeper model than builtin:tiny with its tokenizer, pretrained on more text."""
    from adapterkit.stages import build_builtin

    tiny = build_builtin("tiny")
    print(f"weak-to-strong: pretraining the strong base ({steps} steps)", flush=True)
    run_recipe("pretrain-tiny", [
        f"model.tokenizer={tiny}", "model.architecture.hidden_size=192", "model.architecture.num_layers=6",
        "model.architecture.num_heads=6", "model.architecture.num_kv_heads=2",
        "model.architecture.intermediate_size=512",
        f"data.train=[sample:text/train, sample:text/tasks, {SHARED / 'pretrain' / 'wikitext2.txt'}]",
        f"train.max_steps={steps}", "train.save_every=null", "train.log_every=50", f"output_dir={root / 'strong'}"])
    return root / "strong" / "model"


def weak_to_strong(root: Path, seeds: list[int], steps: int, pretrain_steps: int) -> dict[str, Any]:
    folder = SHARED / "sentiment"
    rows = lines(folder / "train.jsonl")
    weak_rows = write(root / "sst2-weak.jsonl", rows[:1000])
    strong_rows = write(root / "sst2-strong.jsonl", rows[1000:3000])
    dev = write(root / "sst2-dev.jsonl", lines(folder / "dev.jsonl")[:400])
    common = [f"data.eval={dev}", "eval.limit=400", "train.save_every=null", "train.log_every=25",
              "train.batch_size=8", f"train.max_steps={steps}"]
    print("weak-to-strong: the weak teacher (builtin:tiny, LoRA, true labels of 1,000 rows)", flush=True)
    teacher = run_recipe("lora-sentiment", [*common, f"data.train={weak_rows}", f"output_dir={root / 'weak'}"])
    strong = strong_base(root, pretrain_steps)
    out: dict[str, Any] = {"teacher": {"accuracy": teacher["task_after"]["accuracy"],
                                       "eval_loss": teacher["eval_loss_after"]},
                           "ceiling": {}, "w2s": {}, "w2s_confidence": {}}
    on_strong = [*common, f"model.name_or_path={strong}", f"data.train={strong_rows}"]
    for seed in seeds:
        ceiling = run_recipe("lora-sentiment", [*on_strong, f"train.seed={seed}", f"output_dir={root / f'ceil-{seed}'}"])
        out["ceiling"][seed] = {"accuracy": ceiling["task_after"]["accuracy"], "eval_loss": ceiling["eval_loss_after"]}
        for name, confidence in (("w2s", 0.0), ("w2s_confidence", 0.75)):
            got = run_recipe("distill-sentiment", [
                *on_strong, "adapter.lora.r=16", "adapter.lora.alpha=32", f"train.seed={seed}",
                f"distill.teacher={root / 'weak'}", "distill.label_weight=0", "distill.temperature=1.0",
                f"distill.confidence={confidence}", "distill.cache=true", f"output_dir={root / f'{name}-{seed}'}"])
            out[name][seed] = {"accuracy": got["task_after"]["accuracy"], "eval_loss": got["eval_loss_after"]}
        print(f"  seed {seed}: teacher {out['teacher']['accuracy']:.2f}, ceiling {out['ceiling'][seed]['accuracy']:.2f}, "
              f"w2s {out['w2s'][seed]['accuracy']:.2f}, w2s+confidence {out['w2s_confidence'][seed]['accuracy']:.2f}",
              flush=True)
    return out


def mean(values: list[float]) -> float:
    return statistics.fmean(values)


def report_part1(part1: dict[str, Any], args: Any) -> list[str]:
    seeds = list(part1["labels"])
    t = part1["teacher_eval_loss"]
    lab = [part1["labels"][s]["eval_loss"] for s in seeds]
    dis = [part1["distilled"][s]["eval_loss"] for s in seeds]
    student = "+ LoRA r8 (lr 2e-3)" if args.student_method == "lora" else "fully fine-tuned (lr 1e-3)"
    out = ["## Distilled student against the same student on labels alone (instruction set)", "",
           f"Teacher: builtin:tiny fully fine-tuned, {args.teacher_steps} steps; held-out loss **{t:.4f}**. "
           f"Students: builtin:tiny {student}, {args.student_steps} steps on the same 2,000 rows; held-out loss on "
           "200 dev rows, and the gap to the teacher.", "",
           "| student | " + " | ".join(f"seed {s}" for s in seeds) + " | mean | gap to teacher |",
           "|---|" + "---|" * (len(seeds) + 2)]
    for name, vals in (("labels only (sft)", lab), ("distilled (forward KL, label_weight 0.5, top-50 cache)", dis)):
        out.append(f"| {name} | " + " | ".join(f"{v:.4f}" for v in vals) + f" | {mean(vals):.4f} | "
                   f"{mean(vals) - t:+.4f} |")
    closer = sum(d < lab_ for d, lab_ in zip(dis, lab))
    out += ["", f"The distilled student is closer to the teacher on {closer} of {len(seeds)} seeds "
            f"(mean gap {mean(dis) - t:+.4f} against {mean(lab) - t:+.4f}).", ""]
    return out


def report_part2(part2: dict[str, Any], args: Any) -> list[str]:
    seeds = list(part2["ceiling"])
    out = ["## Weak-to-strong (SST-2)", "",
           "Weak teacher: builtin:tiny + LoRA on the true labels of 1,000 rows. Strong model: 192 wide, 6 layers, "
           f"builtin:tiny's tokenizer, pretrained {args.pretrain_steps} steps on the sample corpus and wikitext-2. "
           f"Students: the strong model + LoRA, {args.w2s_steps} steps on 2,000 other rows; accuracy on 400 dev rows.",
           "", "| model | " + " | ".join(f"seed {s}" for s in seeds) + " | mean | gap recovered |",
           "|---|" + "---|" * (len(seeds) + 2)]
    weak = part2["teacher"]["accuracy"]
    ceiling = mean([part2["ceiling"][s]["accuracy"] for s in seeds])
    out.append(f"| weak teacher | {weak:.2f} " + "| " * (len(seeds) - 1) + f"| {weak:.2f} | 0 |")
    for name, key in (("strong on the true labels (ceiling)", "ceiling"),
                      ("strong on the teacher alone", "w2s"), ("strong on the teacher + confidence 0.75", "w2s_confidence")):
        vals = [part2[key][s]["accuracy"] for s in seeds]
        # Only defined when the ceiling is above the teacher: there is a gap to recover.
        pgr = f"{(mean(vals) - weak) / (ceiling - weak):.2f}" if ceiling > weak else "n/a"
        out.append(f"| {name} | " + " | ".join(f"{v:.2f}" for v in vals) + f" | {mean(vals):.2f} | {pgr} |")
    best = max(mean([part2[k][s]["accuracy"] for s in seeds]) for k in ("w2s", "w2s_confidence"))
    out += ["", ("A strong student ends better than its weak teacher." if best > weak else
                 "No strong student ends better than its weak teacher here."), ""]
    return out


def report(part1: dict[str, Any] | None, part2: dict[str, Any] | None, args: Any, minutes: float) -> str:
    command = " ".join(["python benchmarks/distill.py", *sys.argv[1:]])
    out = ["# Distillation", "", f"`{command}` ({minutes:.0f} minutes on this machine's CPU).", ""]
    if part1 is not None:
        out += report_part1(part1, args)
    if part2 is not None:
        out += report_part2(part2, args)
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--teacher-steps", type=int, default=300)
    parser.add_argument("--student-steps", type=int, default=80)
    parser.add_argument("--w2s-steps", type=int, default=150)
    parser.add_argument("--pretrain-steps", type=int, default=400)
    parser.add_argument("--student-method", choices=["lora", "full"], default="lora",
                        help="how the students of part 1 train (LoRA r8, or full fine-tuning)")
    parser.add_argument("--parts", nargs="+", type=int, choices=[1, 2], default=[1, 2])
    args = parser.parse_args(argv)
    for folder in ("instruction", "sentiment", "pretrain"):
        if not (SHARED / folder).is_dir():
            sys.exit(f"{SHARED / folder} is absent: the real datasets live in ../shared/data beside the checkout")
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="distill-") as tmp:
        root = Path(tmp)
        part1 = (distill_vs_labels(root, args.seeds, args.teacher_steps, args.student_steps, args.student_method)
                 if 1 in args.parts else None)
        part2 = weak_to_strong(root, args.seeds, args.w2s_steps, args.pretrain_steps) if 2 in args.parts else None
    minutes = (time.time() - started) / 60
    RESULTS.mkdir(exist_ok=True)
    stem = "distill" if args.parts == [1, 2] and args.student_method == "lora" else (
        f"distill_part{'_'.join(map(str, args.parts))}_{args.student_method}")
    (RESULTS / f"{stem}.json").write_text(json.dumps({"settings": vars(args), "distill_vs_labels": part1,
                                                      "weak_to_strong": part2, "minutes": round(minutes, 1)},
                                                     indent=2) + "\n")
    text = report(part1, part2, args, minutes)
    (RESULTS / f"{stem}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
