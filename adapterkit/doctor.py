"""The training doctor: what a run's log and reports say went wrong, and what to try, ranked.

    adapterkit doctor runs/s1        # exit code 0: nothing found; 1: findings (printed)

The same checks run during training (`DoctorCallback`): each finding is printed once, as a warning line
beside the progress output, when the log first shows it.

Every check reads what the run already writes: train_log.jsonl (loss, learning rate, gradient norm,
tokens/s per logging step; eval losses), the recipe and manifest (method, stage, learning rate), and
data_report.json (supervised tokens, rows whose EOS is supervised). A check that lacks the evidence it
needs (too few logging steps, no eval during training) stays silent rather than guess.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from adapterkit import rundir
from adapterkit.adapters import METHODS
from adapterkit.config import load_recipe
from adapterkit.errors import AdapterkitError, Problem

MIN_LOGS = 8
"""Logging steps a trend check needs before it speaks."""

LR_RANGES = {"lora": (1e-5, 5e-3), "full": (1e-6, 1e-3), "soft_prompt": (1e-4, 1.0)}
"""Peak learning rates usually used per method family (pretraining from scratch: `PRETRAIN_LR`)."""
PRETRAIN_LR = (1e-5, 1e-2)


@dataclass
class Finding:
    check: str
    saw: str
    """What the log shows: numbers and steps."""
    fixes: list[str]
    """What to try, most likely first."""
    severity: str = "warning"

    def render(self) -> str:
        fixes = "\n".join(f"    {i}. {fix}" for i, fix in enumerate(self.fixes, 1))
        return f"{self.severity}: {self.check}: {self.saw}\n{fixes}"


@dataclass
class Evidence:
    """What a run wrote, as the checks read it."""

    train: list[dict[str, Any]] = field(default_factory=list)
    """Logging steps: step, loss, lr, grad_norm, tokens_per_s."""
    evals: list[dict[str, Any]] = field(default_factory=list)
    """Eval losses: step, phase (before, train, after), eval_loss."""
    family: str = "lora"
    stage: str = "sft"
    lr: float | None = None
    reports: list[dict[str, Any]] = field(default_factory=list)
    trainable: int | None = None
    stopped: str | None = None
    """The guard's message when it stopped the run (a non-finite loss or gradient)."""

    @classmethod
    def of_rows(cls, rows: list[dict[str, Any]], **kw: Any) -> Evidence:
        return cls(train=[r for r in rows if "loss" in r], evals=[r for r in rows if "eval_loss" in r], **kw)


def read_run(run_dir: Path) -> Evidence:
    """The evidence a finished or interrupted run left in `run_dir`."""
    if not (run_dir / rundir.MANIFEST).is_file():
        raise AdapterkitError(Problem(str(run_dir), "is not an adapterkit run (no manifest.json)",
                                      fix="pass a run's output_dir"))
    manifest = rundir.read_manifest(run_dir)
    log = run_dir / "train_log.jsonl"
    rows = [json.loads(line) for line in log.read_text(encoding="utf-8").splitlines() if line.strip()] \
        if log.is_file() else []
    recipe, _ = load_recipe(str(run_dir / "recipe.yaml"))
    report = run_dir / "data_report.json"
    return Evidence.of_rows(rows, family=METHODS[manifest["method"]].family, stage=manifest.get("stage", "sft"),
                            lr=recipe.train.lr, reports=json.loads(report.read_text()) if report.is_file() else [],
                            trainable=(manifest.get("metrics") or {}).get("trainable_parameters"),
                            stopped=_guard_message(manifest))


def _guard_message(manifest: dict[str, Any]) -> str | None:
    error = manifest.get("error") or ""
    if manifest.get("status") != "failed" or not error.startswith("TrainingStopped"):
        return None
    return error.split("\n", 1)[0].removeprefix("TrainingStopped: ")


# -- the checks ---------------------------------------------------------------------------------------------

def _losses(ev: Evidence) -> list[tuple[int, float]]:
    return [(r["step"], float(r["loss"])) for r in ev.train if r.get("loss") is not None]


def check_learning_rate(ev: Evidence) -> Finding | None:
    if ev.lr is None:
        return None
    low, high = PRETRAIN_LR if ev.stage == "pretrain" else LR_RANGES[ev.family]
    what = {"lora": "LoRA/QLoRA/DoRA", "full": "full fine-tuning", "soft_prompt": "soft prompts"}[ev.family]
    if ev.stage == "pretrain":
        what = "pretraining"
    if ev.lr < low:
        return Finding("learning rate far too low", f"train.lr={ev.lr:g}, below the {low:g}-{high:g} usually used for "
                       f"{what}", [f"raise train.lr into {low:g}-{high:g} (adapterkit's recipes: lora 2e-3 on "
                                   "builtin:tiny, 1e-4 to 3e-4 on real models)"])
    if ev.lr > high:
        return Finding("learning rate far too high", f"train.lr={ev.lr:g}, above the {low:g}-{high:g} usually used for "
                       f"{what}", [f"lower train.lr into {low:g}-{high:g}", "keep train.max_grad_norm at 1.0 and add "
                                   "warmup (train.warmup_ratio=0.03)"])
    return None


def check_stagnation(ev: Evidence) -> Finding | None:
    """The loss did not fall: the mean of the last quarter of the logs within 1% of the first quarter's
    (comparing means, since one batch's loss differs from the next by more than that)."""
    losses = [(s, v) for s, v in _losses(ev) if math.isfinite(v)]
    if len(losses) < MIN_LOGS:
        return None
    k = max(2, len(losses) // 4)
    early, late = statistics.mean(v for _, v in losses[:k]), statistics.mean(v for _, v in losses[-k:])
    if abs(late - early) <= 0.01 * max(abs(early), 1e-9):
        return Finding("loss stagnant", f"the mean loss was {early:.4f} over the first {k} logs and {late:.4f} over "
                       f"the last {k} (to step {losses[-1][0]}): it did not fall",
                       ["raise train.lr (a learning rate too low leaves the loss where it started)",
                        "check that something trains: `adapterkit data preview` shows the supervised tokens",
                        "check that the gradient norm is not 0 (train_log.jsonl)"])
    return None


def check_rising(ev: Evidence) -> Finding | None:
    losses = _losses(ev)
    finite = [(s, v) for s, v in losses if math.isfinite(v)]
    if len(losses) >= 2 and len(finite) < len(losses):
        step = next(s for s, v in losses if not math.isfinite(v))
        return Finding("loss not finite", f"the loss became {next(v for s, v in losses if s == step)} at step {step}",
                       ["lower train.lr", "use train.precision=bf16 or fp32 instead of fp16",
                        "check the data rows near that step for empty or extreme examples"], "error")
    if len(finite) < MIN_LOGS:
        return None
    k = max(2, len(finite) // 4)
    early, late = statistics.mean(v for _, v in finite[:k]), statistics.mean(v for _, v in finite[-k:])
    if late > early * 1.1 and late - early > 0.05:
        return Finding("loss rising", f"the mean loss rose from {early:.4f} (first {k} logs) to {late:.4f} (last {k}, "
                       f"to step {finite[-1][0]})", ["lower train.lr", "add warmup (train.warmup_ratio=0.03)",
                                                     "keep train.max_grad_norm at 1.0"])
    for i in range(5, len(finite)):
        before = statistics.median(v for _, v in finite[i - 5:i])
        step, v = finite[i]
        if v > 3 * before and v - before > 1.0:
            return Finding("loss spike", f"the loss jumped to {v:.4f} at step {step} from a median {before:.4f} over "
                           "the 5 logs before", ["lower train.lr or add warmup",
                                                 "look at the training rows of that step (data preview) for outliers"])
    return None


def check_gradients(ev: Evidence) -> Finding | None:
    if ev.stopped:
        return Finding("training stopped", ev.stopped, ["lower train.lr (the usual cause)", "use train.precision=bf16 "
                       "or fp32 instead of fp16", "check the data for extreme rows; then re-run with --resume-anyway "
                       "(from the last checkpoint, new settings) or --restart"], "error")
    norms = [(r["step"], r["grad_norm"]) for r in ev.train if r.get("grad_norm") is not None]
    if len(norms) >= 3 and all(n == 0 for _, n in norms):
        return Finding("gradient zero", f"the gradient norm was 0 at every one of {len(norms)} logging steps (to step "
                       f"{norms[-1][0]})", ["check that the supervised tokens are there (`adapterkit data preview`)",
                                           "check that the adapter's parameters train (`trainable parameters` in the "
                                           "run's first lines)"], "error")
    finite = [(s, n) for s, n in norms if math.isfinite(n)]
    if len(finite) < len(norms):
        step = next(s for s, n in norms if not math.isfinite(n))
        return Finding("gradient exploding", f"the gradient norm was not finite at step {step}",
                       ["lower train.lr", "use train.precision=bf16 or fp32"], "error")
    if len(finite) >= 4:
        base = statistics.median(n for _, n in finite[:3])
        step, top = max(finite[3:], key=lambda x: x[1])
        if base > 0 and top > 100 * base:
            return Finding("gradient exploding", f"the gradient norm reached {top:.3g} at step {step}, "
                           f"{top / base:.0f} times its first logs' median {base:.3g}",
                           ["lower train.lr", "keep train.max_grad_norm at 1.0", "add warmup"])
    return None


def check_data(ev: Evidence) -> list[Finding]:
    found = []
    train = next((r for r in ev.reports if r.get("split") == "train"), None)
    if train is None:
        return found
    if train.get("tokens") and not train.get("supervised_tokens"):
        found.append(Finding("nothing supervised", f"{train['tokens']:,} training tokens, none of them supervised",
                             ["check data.columns maps the completion field", "data.train_on_prompt=true trains on "
                              "the whole text"], "error"))
    examples = train.get("examples") or 0
    if ev.stage == "sft" and train.get("tokens") and examples and train.get("eos_supervised") == 0:
        found.append(Finding("end of turn never supervised", f"none of {examples:,} examples has its EOS or end-of-turn "
                             "token supervised, so the model does not learn to stop",
                             ["raise data.max_length (truncated examples lose their end)",
                              "check the tokenizer's EOS and the chat template's end-of-turn token"]))
    if ev.trainable == 0:
        found.append(Finding("nothing trains", "0 trainable parameters", ["check adapter.method and its target "
                             "modules (adapter.lora.target_modules)"], "error"))
    return found


def check_overfitting(ev: Evidence) -> Finding | None:
    during = [(r["step"], r["eval_loss"]) for r in ev.evals if r.get("phase") == "train"]
    losses = _losses(ev)
    if len(during) < 3 or len(losses) < 2:
        return None
    best_step, best = min(during, key=lambda x: x[1])
    last_step, last = during[-1]
    train_at_best = next((v for s, v in reversed(losses) if s <= best_step), losses[0][1])
    if last > best * 1.05 and last_step > best_step and losses[-1][1] < train_at_best:
        return Finding("overfitting", f"eval loss rose from {best:.4f} (step {best_step}) to {last:.4f} (step "
                       f"{last_step}) while the training loss fell from {train_at_best:.4f} to {losses[-1][1]:.4f}",
                       [f"train for fewer steps (about {best_step})", "add training data",
                        "lower train.lr or raise adapter.lora.dropout"])
    return None


def check_throughput(ev: Evidence) -> Finding | None:
    rates = [(r["step"], r["tokens_per_s"]) for r in ev.train if r.get("tokens_per_s")]
    if len(rates) < MIN_LOGS:
        return None
    typical = statistics.median(v for _, v in rates[1:])
    k = max(2, len(rates) // 5)
    recent = statistics.mean(v for _, v in rates[-k:])
    if recent < 0.3 * typical:
        return Finding("throughput collapsed", f"{recent:,.0f} tokens/s over the last {k} logs against a median "
                       f"{typical:,.0f} before (to step {rates[-1][0]})",
                       ["check for memory pressure (swap, or a GPU near its limit: `adapterkit plan`)",
                        "check for other processes on the same device", "check the device's temperature"])
    return None


CHECKS = (check_learning_rate, check_stagnation, check_rising, check_gradients, check_overfitting,
          check_throughput)


def diagnose(ev: Evidence) -> list[Finding]:
    found = [f for check in CHECKS if (f := check(ev)) is not None] + check_data(ev)
    return sorted(found, key=lambda f: f.severity != "error")  # errors first


# -- during training ---------------------------------------------------------------------------------------

class DoctorCallback(TrainerCallback):
    """Runs the trend checks on the log so far at every logging step and prints each new finding once."""

    def __init__(self, family: str, stage: str, lr: float, echo: bool = True, say: Any = print,
                 phase: Any = lambda: "train"):
        self.ev = Evidence(family=family, stage=stage, lr=lr)
        self.seen: set[str] = set()
        self.echo, self.say, self.phase = echo, say, phase

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or not state.is_world_process_zero:
            return
        row = {"step": state.global_step, **{k: logs.get(k) for k in ("loss", "grad_norm")},
               "lr": logs.get("learning_rate")}
        if "eval_loss" in logs:
            self.ev.evals.append({"step": state.global_step, "phase": self.phase(), "eval_loss": logs["eval_loss"]})
        elif "loss" in logs:
            self.ev.train.append(row)
        else:
            return
        for check in (check_stagnation, check_rising, check_gradients, check_overfitting):
            finding = check(self.ev)
            if finding is not None and finding.check not in self.seen:
                self.seen.add(finding.check)
                if self.echo:
                    self.say(f"doctor: {finding.severity}: {finding.check}: {finding.saw} (try: {finding.fixes[0]})")


def report(run_dir: Path) -> tuple[list[Finding], str]:
    """The findings for a run, and the text `adapterkit doctor` prints."""
    ev = read_run(run_dir)
    found = diagnose(ev)
    head = (f"{run_dir}: {len(ev.train)} logging steps, {len(ev.evals)} eval points, {ev.family} "
            f"({ev.stage}), train.lr={ev.lr:g}")
    if not found:
        return found, head + "\nno problems found"
    return found, head + "\n" + "\n".join(f.render() for f in found)


def to_json(found: list[Finding]) -> str:
    return json.dumps([asdict(f) for f in found], indent=2)
