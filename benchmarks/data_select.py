"""Does training on rows a small model selected reach a held-out loss in fewer steps than a random subset
of the same size? Measured on real data, over 3 seeds, and reported either way.

    python benchmarks/data_select.py                 # about 20 minutes on 2 CPU cores
    python benchmarks/data_select.py --steps 60 --seeds 0

For SST-2 (../shared/data/sentiment) and the instruction set (../shared/data/instruction): the train rows
are scored once by `builtin:tiny` (`adapterkit data select`, rules lowest_loss and middle, keep 0.5); a
random half of the same size is drawn per seed. Each subset trains the shipped `lora-sentiment` recipe
(the generation task for the instruction set) on builtin:tiny for --steps steps, measuring the loss on
200 held-out dev rows every --eval-every steps. "Steps to target" is the first eval step at which a run's
held-out loss is at or below the target: the random subset's final loss, averaged over the seeds. For
SST-2 the held-out accuracy after training is reported too. Writes benchmarks/results/data_select.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
RESULTS = Path(__file__).resolve().parent / "results"
DATASETS = {"sst2": ("sentiment", "sentiment"), "instruction": ("instruction", "generation")}
RULES = ("lowest_loss", "middle")


def lines(path: Path) -> list[str]:
    return [x for x in path.read_text(encoding="utf-8").split("\n") if x]


def train(subset: Path, dev: Path, task: str, seed: int, steps: int, eval_every: int, out: Path) -> dict[str, Any]:
    from adapterkit.config import load_recipe
    from adapterkit.stages import run

    recipe, src = load_recipe("lora-sentiment", [
        f"data.task={task}", f"data.train={subset}", f"data.eval={dev}", f"train.max_steps={steps}",
        f"train.eval_every={eval_every}", "train.save_every=null", f"train.seed={seed}", "train.log_every=10",
        # the task metrics: accuracy on all 200 dev rows for SST-2; generating completions is slow, so 20 rows
        f"eval.limit={200 if task == 'sentiment' else 20}", f"output_dir={out}",
        # instruction completions run long: 256 tokens keep 95% of them whole (the rest is dropped)
        *([] if task == "sentiment" else ["data.max_length=256", "data.max_dropped=0.1", "eval.max_new_tokens=32"])])
    result = run(recipe, src, echo=False)
    logged = [json.loads(x) for x in (result.out / "train_log.jsonl").read_text().splitlines()]
    curve = [(r["step"], r["eval_loss"]) for r in logged if "eval_loss" in r]
    metrics = result.metrics
    return {"curve": curve, "final": metrics.get("eval_loss_after"),
            "task_after": metrics.get("task_after"), "task_before": metrics.get("task_before")}


def steps_to(curve: list[tuple[int, float]], target: float) -> int | None:
    return next((step for step, loss in curve if loss <= target), None)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--eval-every", type=int, default=15)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--keep", type=float, default=0.5)
    parser.add_argument("--datasets", nargs="+", choices=list(DATASETS), default=list(DATASETS))
    args = parser.parse_args(argv)
    started = time.time()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="data-select-") as tmp:
        root = Path(tmp)
        for name, (folder, task) in ((n, DATASETS[n]) for n in args.datasets):
            train_rows, dev = SHARED / folder / "train.jsonl", SHARED / folder / "dev.jsonl"
            if not train_rows.is_file():
                sys.exit(f"{train_rows} is absent: the real datasets live in ../shared/data beside the checkout")
            dev_small = root / f"{name}-dev.jsonl"
            dev_small.write_text("\n".join(lines(dev)[:200]) + "\n", encoding="utf-8")
            subsets: dict[str, Path] = {}
            for rule in RULES:
                out = root / f"{name}-{rule}.jsonl"
                t0 = time.time()
                done = subprocess.run([sys.executable, "-m", "adapterkit", "data", "select", str(train_rows), "--task",
                                       task, "--scorer", "builtin:tiny", "--keep", str(args.keep), "--rule", rule,
                                       "--out", str(out), *([] if task == "sentiment" else ["--max-length", "256"])],
                                      capture_output=True, text=True)
                if done.returncode:
                    sys.exit(done.stderr[-3000:])
                print(f"{name}: selected by {rule} in {time.time() - t0:.0f} s", flush=True)
                subsets[rule] = out
            size = len(lines(subsets[RULES[0]]))
            runs: dict[str, list[dict[str, Any]]] = {arm: [] for arm in ("random", *RULES)}
            for seed in args.seeds:
                pool = lines(train_rows)
                chosen = sorted(random.Random(seed).sample(range(len(pool)), size))
                random_subset = root / f"{name}-random-{seed}.jsonl"
                random_subset.write_text("\n".join(pool[i] for i in chosen) + "\n", encoding="utf-8")
                for arm, subset in (("random", random_subset), *subsets.items()):
                    got = train(subset, dev_small, task, seed, args.steps, args.eval_every,
                                root / f"run-{name}-{arm}-{seed}")
                    runs[arm].append(got)
                    print(f"{name} {arm} seed {seed}: final held-out loss {got['final']:.4f}", flush=True)
            target = statistics.mean(r["final"] for r in runs["random"])
            summary = {}
            for arm, rs in runs.items():
                reached = [steps_to(r["curve"], target) for r in rs]
                summary[arm] = {"final": [round(r["final"], 4) for r in rs],
                                "steps_to_target": reached,
                                "accuracy": [r["task_after"].get("accuracy") for r in rs] if rs[0]["task_after"]
                                and "accuracy" in rs[0]["task_after"] else None}
            results[name] = {"task": task, "rows": len(lines(train_rows)), "subset": size, "target": round(target, 4),
                             "arms": summary, "runs": runs}
    results["meta"] = {"steps": args.steps, "eval_every": args.eval_every, "seeds": args.seeds, "keep": args.keep,
                       "seconds": round(time.time() - started)}
    md = ["# Small-model data selection against a random subset of the same size", "",
          f"Regenerate with `python benchmarks/data_select.py`. builtin:tiny scores and trains (LoRA, "
          f"{args.steps} steps, seeds {args.seeds}); keep {args.keep}; held-out loss on 200 dev rows every "
          f"{args.eval_every} steps. Target: the random subsets' mean final held-out loss.", ""]
    for name in args.datasets:
        r = results[name]
        md += [f"## {name} ({r['task']}: {r['subset']:,} of {r['rows']:,} rows; target {r['target']})", "",
               "| subset | final held-out loss per seed | mean | steps to target per seed | accuracy per seed |",
               "|---|---|---|---|---|"]
        for arm, a in r["arms"].items():
            acc = ", ".join(f"{x:.3f}" for x in a["accuracy"]) if a["accuracy"] else "-"
            reached = ", ".join("not reached" if s is None else str(s) for s in a["steps_to_target"])
            md.append(f"| {arm} | {', '.join(f'{x:.4f}' for x in a['final'])} | {statistics.mean(a['final']):.4f} | "
                      f"{reached} | {acc} |")
        md.append("")
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = "data_select" if args.datasets == list(DATASETS) else "data_select_" + "_".join(args.datasets)
    (RESULTS / f"{stem}.md").write_text("\n".join(md))
    (RESULTS / f"{stem}.json").write_text(json.dumps(results, indent=2) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
