"""DPO in adapterkit against the plain trl script, from the same SFT starting point, over several seeds.

    python benchmarks/preference_vs_trl.py                 # 3 seeds x 150 steps, both tools (see below: slow)
    python benchmarks/preference_vs_trl.py --quick         # smoke test: 1 seed, 20 steps
    python benchmarks/preference_vs_trl.py --only trl --seeds 0

Writes benchmarks/results/preference_vs_trl.md and .json (`--quick`: preference_vs_trl-quick.*).

- Starting point, shared by both: one SFT LoRA run of the shipped `lora-sentiment` recipe, 30 steps, on
  `builtin:tiny` (built on first use and cached, see adapterkit/builtin.py), made once per invocation.
- Data: the first 1,803 pairs of ../shared/data/preference/train.jsonl (HH-RLHF harmless, raw
  prompt/chosen/rejected text), and as held-out set the first 150 pairs of dev.jsonl whose prompt does not
  occur in those training pairs.
- trl: the script a trl user writes. The SFT adapter is merged into its base (peft `merge_and_unload`); the
  merged model is the start, and a NEW LoRA adapter (r 16, alpha 32, all linear layers) passed as
  `peft_config` trains on it, so the reference is the merged model (adapter disabled). `DPOConfig` with
  lr 1e-3, beta 0.1, batch 8, max_steps, max_length 256, `use_cpu=True`, `bf16=False`, otherwise trl's
  defaults; the dataset's own text, no template.
- adapterkit: the shipped `dpo-preference` recipe with `model.from_run=<the SFT run>` (its adapter is merged
  into the base and a new one trains on top, `preference.start_adapter: auto`), the same pairs, lr, beta,
  batch, steps, max_length, seed, fp32.
- One independent scorer for both (neither tool's own metric): for each held-out pair, the summed
  log-probability of the chosen and of the rejected reply (plus the EOS both tools append) given the RAW
  prompt text (joined with a space, no template, no cue), under the tuned policy and under the model that
  tool started from (trl: the merged SFT model; adapterkit: the SFT run, `load_trained(sft_run)`); at most
  512 tokens (the model's context), keeping the start of the reply (up to 384 tokens) and the end of the
  prompt. Implicit-reward accuracy = share of pairs with
  logp_pol(chosen) - logp_ref(chosen) > logp_pol(rejected) - logp_ref(rejected).
  Each tool's own held-out number is reported beside it: trl's `eval_rewards/accuracies`
  (`trainer.evaluate` on the held-out pairs after training) and adapterkit's `reward_accuracy` (its run
  with `data.eval=<held-out>`), each computed in that tool's own formatting and truncation.

`--causes` adds the cause table: adapterkit as it was when issue 19 was filed (`before`: the SFT adapter
continued, the SFT template's cue after every prompt, trl's own cut at max_length, a cosine schedule
with 3% warmup), and `before` with one change at a time (the VARIANTS table below). trl runs without
gradient checkpointing (`gradient_checkpointing=False`; the math is the same, dropout being off in both
tools; 150 steps took 934 s with trl's default checkpointing and 210-240 s without it here).

Every training run is its own process; `--jobs` of them run at a time (default 2 on 2 or more cores, each
with cores/jobs torch threads: trl and adapterkit of one seed side by side, under the same load). Wall
time: the trainer's train loop (first to last step), and the whole process (imports, data, train, the
tool's own held-out scoring).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
DATA = ROOT.parent / "shared" / "data" / "preference"

TRAIN_PAIRS, HELDOUT_PAIRS = 1803, 150
SFT_STEPS = 30
LR, BETA, BATCH, MAX_LENGTH = 1e-3, 0.1, 8, 256
LORA = dict(r=16, lora_alpha=32, target_modules="all-linear")
SCORE_CAP, REPLY_CAP = 512, 384  # tokens scored per sequence (the model's context), of which the reply keeps up to
SCORE_BATCH = 8


# -- shared pieces ------------------------------------------------------------------------------------

def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def timer_callback(record: dict[str, Any]) -> Any:
    """A TrainerCallback that times the train loop and notes the settings that ran."""
    from transformers import TrainerCallback

    class Timer(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            record["t0"] = time.perf_counter()
            record["settings"] = {k: getattr(args, k, None) for k in (
                "learning_rate", "lr_scheduler_type", "warmup_steps", "warmup_ratio", "weight_decay", "max_grad_norm",
                "optim", "seed", "per_device_train_batch_size", "max_length", "truncation_mode", "beta",
                "loss_type", "gradient_checkpointing", "activation_checkpointing", "precompute_ref_log_probs")}
            record["settings"] = {k: (v if isinstance(v, (int, float, str, bool, list, type(None))) else str(v))
                                  for k, v in record["settings"].items()}
            peft_cfg = getattr(model, "peft_config", {}) or {}
            record["adapters"] = {name: {"r": c.r, "alpha": c.lora_alpha, "dropout": c.lora_dropout,
                                         "targets": sorted(c.target_modules) if c.target_modules else None}
                                  for name, c in peft_cfg.items() if hasattr(c, "r")}

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                record.setdefault("losses", []).append((state.global_step, logs["loss"]))

        def on_train_end(self, args, state, control, **kwargs):
            record["train_s"] = time.perf_counter() - record.pop("t0")
            record["steps"] = state.global_step

    return Timer()


# -- one training run, in its own process -------------------------------------------------------------

def run_trl(seed: int, steps: int, merged: Path, train: Path, heldout: Path, out: Path) -> dict[str, Any]:
    """The plain trl script: the merged SFT model, a new LoRA adapter, DPOTrainer with DPOConfig."""
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    record: dict[str, Any] = {}
    model = AutoModelForCausalLM.from_pretrained(merged)
    tokenizer = AutoTokenizer.from_pretrained(merged)
    train_dataset = load_dataset("json", data_files=str(train), split="train")
    eval_dataset = load_dataset("json", data_files=str(heldout), split="train")
    args = DPOConfig(output_dir=str(out), learning_rate=LR, beta=BETA, per_device_train_batch_size=BATCH,
                     max_steps=steps, max_length=MAX_LENGTH, use_cpu=True, bf16=False, report_to="none",
                     save_strategy="no", seed=seed, logging_steps=10, disable_tqdm=True,
                     gradient_checkpointing=False)
    trainer = DPOTrainer(model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                         processing_class=tokenizer, peft_config=LoraConfig(task_type="CAUSAL_LM", **LORA),
                         callbacks=[timer_callback(record)])
    record["train_rows_kept"] = len(trainer.train_dataset)
    record["eval_rows_kept"] = len(trainer.eval_dataset)
    result = trainer.train()
    record["train_loss"] = result.training_loss
    t = time.perf_counter()
    own = trainer.evaluate()
    record["own_eval_s"] = time.perf_counter() - t
    record["own_reward_accuracy"] = 100 * own.get("eval_rewards/accuracies", float("nan"))
    record["own_eval"] = {k: v for k, v in own.items() if isinstance(v, (int, float))}
    trainer.save_model(str(out / "adapter"))  # the new adapter only (peft), on top of the merged model
    return record


BEFORE = ["data.truncation=end", "data.max_dropped=0.3", "train.schedule=cosine", "train.warmup_ratio=0.03",
          "preference.start_adapter=continue", 'data.template="{prompt}\\nResponse:"']
"""adapterkit as it was when issue 19 was filed (besides the shipped recipe's own keys): the SFT adapter
continued, and the SFT template's cue was added after every prompt (HH-RLHF's end in 'Assistant:')."""

VARIANTS: dict[str, list[str]] = {
    "adapterkit": [],  # the shipped dpo-preference recipe as it is now
    "before": BEFORE,
    "fit long pairs (input)": [*BEFORE, "data.truncation=input"],
    "no cue": [*BEFORE, "data.template='{prompt}'"],
    "linear, no warmup": [*BEFORE, "train.schedule=linear", "train.warmup_ratio=0"],
    "new adapter on merged SFT": [*BEFORE, "preference.start_adapter=merge"],
    "new adapter, no cue": [*BEFORE, "preference.start_adapter=merge", "data.template='{prompt}'"],
}
"""adapterkit runs: the shipped recipe, the recipe as it was, and the recipe as it was with ONE change
(each row of the cause table; the last row is two). A later override of a key wins over BEFORE's."""


def run_adapterkit(seed: int, steps: int, sft: Path, train: Path, heldout: Path, out: Path,
                   variant: str = "adapterkit") -> dict[str, Any]:
    """The shipped dpo-preference recipe, continuing the SFT run, with the same settings (and the
    variant's overrides)."""
    from adapterkit.config import load_recipe
    from adapterkit.stages import run

    record: dict[str, Any] = {}
    extra = VARIANTS[variant]
    recipe, src = load_recipe("dpo-preference", [
        f"model.from_run={sft}", f"data.train={train}", f"data.eval={heldout}", f"train.max_steps={steps}",
        f"train.lr={LR}", f"preference.beta={BETA}", f"train.batch_size={BATCH}", f"data.max_length={MAX_LENGTH}",
        f"train.seed={seed}", "train.precision=fp32", "train.save_every=null", "train.log_every=10",
        f"output_dir={out}", *extra])
    record["overrides"] = extra
    run(recipe, src, echo=False, callbacks=[timer_callback(record)])
    metrics = json.loads((out / "manifest.json").read_text())["metrics"]
    record["train_loss"] = metrics.get("train_loss")
    after = metrics.get("pref_after", {})
    record["own_reward_accuracy"] = after.get("reward_accuracy")
    record["own_eval"] = {"pref_before": metrics.get("pref_before"), "pref_after": after}
    train_report = json.loads((out / "data_report.json").read_text())[0]
    record["data_report"] = {k: train_report[k] for k in ("rows_read", "examples", "dropped", "truncated", "notes")}
    return record


# -- the independent scorer ---------------------------------------------------------------------------

def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def score_ids(tokenizer: Any, prompt: str, reply: str) -> tuple[list[int], list[int], bool]:
    """(prompt ids, reply ids, capped?) for the raw prompt and reply joined with a space, the reply ending in EOS."""
    sep = "" if prompt[-1:].isspace() or reply[:1].isspace() else " "
    p = tokenizer(prompt).input_ids
    full = tokenizer(prompt + sep + reply).input_ids + [tokenizer.eos_token_id]
    k = common_prefix(p, full)
    prompt_ids, reply_ids = full[:k], full[k:]
    capped = len(prompt_ids) + len(reply_ids) > SCORE_CAP
    reply_ids = reply_ids[:REPLY_CAP]
    prompt_ids = prompt_ids[-(SCORE_CAP - len(reply_ids)):]
    return prompt_ids, reply_ids, capped


def sequences(tokenizer: Any, pairs: list[dict[str, Any]]) -> tuple[list[tuple[list[int], list[int]]], int]:
    """Chosen and rejected of each pair in turn; and how many sequences hit the cap."""
    seqs, capped = [], 0
    for row in pairs:
        for key in ("chosen", "rejected"):
            p, r, c = score_ids(tokenizer, row["prompt"], row[key])
            seqs.append((p, r))
            capped += c
    return seqs, capped


def summed_logprobs(model: Any, seqs: list[tuple[list[int], list[int]]], pad_id: int) -> list[float]:
    """Sum over each reply's tokens of log p(token | everything before it), in fp32, no dropout."""
    import torch

    model.eval()
    out = [0.0] * len(seqs)
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i][0]) - len(seqs[i][1]))
    with torch.no_grad():
        for start in range(0, len(order), SCORE_BATCH):
            idx = order[start:start + SCORE_BATCH]
            rows = [seqs[i][0] + seqs[i][1] for i in idx]
            width = max(map(len, rows))
            ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for j, r in enumerate(rows):
                ids[j, :len(r)] = torch.tensor(r)
                mask[j, :len(r)] = 1
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
            logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None])[..., 0]
            for j, i in enumerate(idx):
                p, r = len(seqs[i][0]), len(seqs[i][1])
                out[i] = float(logp[j, p - 1:p - 1 + r].sum())
    return out


def accuracies(policy: list[float], ref: list[float]) -> dict[str, float]:
    pc, pr, rc, rr = policy[0::2], policy[1::2], ref[0::2], ref[1::2]
    n = len(pc)
    return {"implicit_reward_accuracy": 100 * sum((a - c) > (b - d) for a, b, c, d in zip(pc, pr, rc, rr)) / n,
            "implicit_reward_margin": sum((a - c) - (b - d) for a, b, c, d in zip(pc, pr, rc, rr)) / n,
            "policy_preference_accuracy": 100 * sum(a > b for a, b in zip(pc, pr)) / n,
            "reference_preference_accuracy": 100 * sum(c > d for c, d in zip(rc, rr)) / n}


def load_trl_policy(merged: Path, adapter: Path) -> Any:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(merged), str(adapter))


# -- how each tool sees the data ----------------------------------------------------------------------

def length_stats(tokenizer: Any, records: list[dict[str, Any]]) -> dict[str, Any]:
    """Under trl's tokenization (prompt + reply + EOS, prompt ids = the common prefix) and its keep_start cut
    at MAX_LENGTH: pairs dropped (prompt alone fills max_length), pairs whose chosen or rejected reply is cut,
    and the reply tokens that remain."""
    eos = tokenizer.eos_token
    dropped = cut = short = 0
    prompt_lens, kept_reply = [], []
    for r in records:
        p = tokenizer(r["prompt"]).input_ids
        lens = []
        for key in ("chosen", "rejected"):
            reply = r[key] if r[key].endswith(eos) else r[key] + eos
            full = tokenizer(r["prompt"] + reply).input_ids
            lens.append((common_prefix(p, full), len(full)))
        k = min(a for a, _ in lens)
        prompt_lens.append(k)
        if k >= MAX_LENGTH:
            dropped += 1
            continue
        if any(n > MAX_LENGTH for _, n in lens):
            cut += 1
        left = [min(n, MAX_LENGTH) - k for _, n in lens]
        kept_reply.extend(left)
        short += any(x < 8 for x in left)
    prompt_lens.sort()
    return {"pairs": len(records), "dropped_prompt_fills_max_length": dropped, "reply_cut": cut,
            "a_reply_under_8_tokens_left": short, "prompt_tokens_median": prompt_lens[len(prompt_lens) // 2],
            "prompt_tokens_max": prompt_lens[-1],
            "kept_reply_tokens_mean": sum(kept_reply) / max(1, len(kept_reply))}


def data_views(sft: Path, train: Path, heldout: Path, tokenizer: Any) -> dict[str, Any]:
    """One formatted example as each tool trains on it, and length statistics of both views."""
    from adapterkit.config import load_recipe
    from adapterkit.stages.preference import prepare_data, starting_point

    recipe, _ = load_recipe("dpo-preference", [f"model.from_run={sft}", f"data.train={train}", f"data.eval={heldout}",
                                                f"data.max_length={MAX_LENGTH}"])
    formatter, ak_train, ak_eval, _ = prepare_data(recipe, tokenizer, starting_point(recipe))
    raw_train, raw_eval = read_jsonl(train), read_jsonl(heldout)
    eos = tokenizer.eos_token
    ex = raw_train[0]
    return {
        "adapterkit_template_mode": formatter.spec.mode,
        "example_trl": {"prompt": ex["prompt"], "chosen": ex["chosen"] + eos, "rejected": ex["rejected"] + eos},
        "example_adapterkit": ak_train[0],
        "trl_train": length_stats(tokenizer, raw_train), "trl_heldout": length_stats(tokenizer, raw_eval),
        "adapterkit_train": length_stats(tokenizer, ak_train),
        "adapterkit_heldout": length_stats(tokenizer, ak_eval or []),
    }


# -- the benchmark ------------------------------------------------------------------------------------

def prepare(work: Path) -> tuple[Path, Path, dict[str, Any]]:
    train_all = read_jsonl(DATA / "train.jsonl")
    train = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in train_all[:TRAIN_PAIRS]]
    seen_prompts = {r["prompt"] for r in train}
    seen = {(r["prompt"], r["chosen"], r["rejected"]) for r in train}
    heldout, skipped = [], 0
    for r in read_jsonl(DATA / "dev.jsonl"):
        if r["prompt"] in seen_prompts or (r["prompt"], r["chosen"], r["rejected"]) in seen:
            skipped += 1
            continue
        heldout.append({k: r[k] for k in ("prompt", "chosen", "rejected")})
        if len(heldout) == HELDOUT_PAIRS:
            break
    info = {"train_pairs": len(train), "heldout_pairs": len(heldout), "dev_rows_skipped_as_in_train": skipped}
    return write_jsonl(work / "train.jsonl", train), write_jsonl(work / "heldout.jsonl", heldout), info


def sft_and_merge(work: Path) -> tuple[Path, Path, float]:
    """The shared start: lora-sentiment for 30 steps on builtin:tiny, and its adapter merged into its base."""
    from adapterkit.config import load_recipe
    from adapterkit.stages import run
    from adapterkit.trained import load_trained

    t = time.perf_counter()
    sft = work / "sft"
    recipe, src = load_recipe("lora-sentiment", [f"train.max_steps={SFT_STEPS}", "train.save_every=null",
                                                 "data.eval=null", f"output_dir={sft}"])
    run(recipe, src, echo=False)
    seconds = time.perf_counter() - t
    # What a trl user does with an SFT adapter: merge it into its base, and save the result as the new model.
    trained = load_trained(sft)
    merged = work / "sft-merged"
    trained.model.merge_and_unload().save_pretrained(merged)
    trained.tokenizer.save_pretrained(merged)
    return sft, merged, seconds


def mean_std(xs: list[float], fmt: str = ".1f") -> str:
    xs = [x for x in xs if x is not None]
    if not xs:
        return "n/a"
    if len(xs) == 1:
        return format(xs[0], fmt)
    return f"{format(statistics.mean(xs), fmt)} ± {format(statistics.stdev(xs), fmt)}"


def markdown(result: dict[str, Any]) -> str:
    h = result["header"]
    lines = ["# DPO: adapterkit against plain trl, from the same SFT start", "",
             *([] if result.get("complete", True) else
               [f"**Incomplete: {len(result['runs'])} runs so far (the benchmark was still running or was stopped).**", ""]),
             f"- Command: `{h['command']}`", f"- Date: {h['date']}", f"- Machine: {h['machine']}",
             f"- Versions: {h['versions']}",
             f"- Start: `lora-sentiment`, {SFT_STEPS} steps on builtin:tiny ({h['sft_s']:.0f} s); trl starts from it "
             "merged (`merge_and_unload`) with a new LoRA adapter; adapterkit runs `dpo-preference` with "
             "`model.from_run` (`preference.start_adapter: auto` merges the SFT adapter and trains a new one on "
             "top; before issue 19's fix it continued the SFT adapter).",
             f"- Data: {h['data']['train_pairs']} training pairs (first of train.jsonl), {h['data']['heldout_pairs']} "
             f"held-out pairs from dev.jsonl ({h['data']['dev_rows_skipped_as_in_train']} dev rows skipped: prompt in "
             "the training pairs).",
             f"- Both: {result['steps']} steps, lr {LR:g}, beta {BETA}, batch {BATCH}, max_length {MAX_LENGTH}, fp32.",
             "- Independent scorer: summed log-prob of each reply (+EOS) given the raw prompt (space-joined, no "
             f"template), cap {SCORE_CAP} tokens; implicit-reward accuracy against the model each tool started from "
             f"(reference scores of the merged and the unmerged SFT model differ by at most "
             f"{h['ref_max_abs_diff']:.2e} nats).", "",
             "| tool | seed | implicit-reward acc. (independent) | margin (nats) | policy pref. acc. | tool's own reward acc. "
             "| train loss | train s | process s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for tool in ("trl", "adapterkit"):
        runs = [r for r in result["runs"] if r["tool"] == tool]
        if not runs:
            continue
        for r in runs:
            own = r.get("own_reward_accuracy")
            lines.append(f"| {tool} | {r['seed']} | {r['implicit_reward_accuracy']:.1f}% | {r['implicit_reward_margin']:.2f} "
                         f"| {r['policy_preference_accuracy']:.1f}% | {'n/a' if own is None else f'{own:.1f}%'} "
                         f"| {r['train_loss']:.3f} | {r['train_s']:.0f} | {r['process_s']:.0f} |")
        lines.append(f"| **{tool}** | mean ± std | **{mean_std([r['implicit_reward_accuracy'] for r in runs])}%** "
                     f"| {mean_std([r['implicit_reward_margin'] for r in runs], '.2f')} "
                     f"| {mean_std([r['policy_preference_accuracy'] for r in runs])}% "
                     f"| {mean_std([r.get('own_reward_accuracy') for r in runs])}% "
                     f"| {mean_std([r['train_loss'] for r in runs], '.3f')} | {mean_std([r['train_s'] for r in runs])} "
                     f"| {mean_std([r['process_s'] for r in runs])} |")
    causes = [v for v in dict.fromkeys(r["tool"] for r in result["runs"]) if v not in ("trl", "adapterkit")]
    if causes:
        def runs_of(tool: str) -> list[dict[str, Any]]:
            return [r for r in result["runs"] if r["tool"] == tool]

        base = {r["seed"]: r["implicit_reward_accuracy"] for r in runs_of("before")}
        lines += ["", "## Causes: the recipe as it was, and one change at a time", "",
                  "Same steps and scorer as above. `before` is adapterkit as it was when issue 19 was filed; each "
                  "other row is `before` with one change, compared seed by seed with `before`."
                  + (f" Command: `{result['causes_command']}`." if result.get("causes_command") else ""),
                  *[line for note in result.get("cause_notes", []) for line in ("", note)], "",
                  "| adapterkit run | overrides | seeds | implicit-reward acc. (independent) | change vs before | "
                  "margin (nats) | own reward acc. | training pairs kept / fitted |", "|---|---|---|---|---|---|---|---|"]
        def r_overrides(run: dict[str, Any], tool: str) -> list[str]:
            given = run.get("overrides") or VARIANTS.get(tool, [])
            return given if tool == "before" else [o for o in given if o not in BEFORE]

        for tool in ["adapterkit", *causes] if runs_of("adapterkit") else causes:
            rs = runs_of(tool)
            accs = [r["implicit_reward_accuracy"] for r in rs]
            paired = [r["implicit_reward_accuracy"] - base[r["seed"]] for r in rs if r["seed"] in base]
            delta = f"{statistics.mean(paired):+.1f} (seeds {', '.join(str(r['seed']) for r in rs if r['seed'] in base)})" \
                if paired and tool != "before" else ""
            extra = r_overrides(rs[0], tool)
            rep = rs[0].get("data_report") or {}
            kept = f"{rep.get('examples', 'n/a')} / {rep.get('truncated', 'n/a')}" if rep else "n/a"
            lines.append(f"| {tool} | `{' '.join(extra) or '(shipped recipe)'}` | {len(rs)} | {mean_std(accs)}% | {delta} "
                         f"| {mean_std([r['implicit_reward_margin'] for r in rs], '.2f')} "
                         f"| {mean_std([r.get('own_reward_accuracy') for r in rs])}% | {kept} |")
    refs = result.get("reference_preference_accuracy", {})
    if refs:
        lines += ["", "Reference (starting model) preference accuracy, independent scorer: "
                  + ", ".join(f"{k} {v:.1f}%" for k, v in refs.items()) + "."]
    v = result.get("views")
    if v:
        lines += ["", "## How each tool sees the data", "",
                  f"adapterkit formats the prompt in the SFT run's template mode (`{v['adapterkit_template_mode']}`; a "
                  "prompt whose last line already is a reply cue such as `Assistant:` gets no second one); trl "
                  "takes the text as it is and appends EOS. Both views under trl's own cut at max_length "
                  f"{MAX_LENGTH} (`keep_start`, pairs whose prompt fills it dropped), which both tools train "
                  "through here (`data.truncation=end` in the shipped recipe):", "",
                  "| view | pairs | dropped (prompt fills max_length) | a reply cut | a reply < 8 tokens left | "
                  "median prompt tokens | mean reply tokens kept |", "|---|---|---|---|---|---|---|"]
        for key in ("trl_train", "adapterkit_train", "trl_heldout", "adapterkit_heldout"):
            s = v[key]
            lines.append(f"| {key.replace('_', ' ')} | {s['pairs']} | {s['dropped_prompt_fills_max_length']} | "
                         f"{s['reply_cut']} | {s['a_reply_under_8_tokens_left']} | {s['prompt_tokens_median']} | "
                         f"{s['kept_reply_tokens_mean']:.1f} |")
        lines += ["", f"Independent scorer: {h['scorer_capped']} of {2 * h['data']['heldout_pairs']} held-out sequences "
                  f"hit the {SCORE_CAP}-token cap.", "", "One training pair as trl gets it (tail of the prompt):", "",
                  "```", repr(v["example_trl"]["prompt"][-200:]), "chosen: " + repr(v["example_trl"]["chosen"][:120]), "```",
                  "", "The same pair as adapterkit formats it:", "", "```",
                  repr(v["example_adapterkit"]["prompt"][-200:]), "chosen: " + repr(v["example_adapterkit"]["chosen"][:120]),
                  "```"]
    settings = {r["tool"]: (r.get("settings"), r.get("adapters")) for r in result["runs"]}
    if settings:
        lines += ["", "## Settings that ran (first run of each tool)", ""]
        for tool, (s, a) in settings.items():
            lines.append(f"- {tool}: {json.dumps(s)}; adapters {json.dumps(a)}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", nargs="+", type=int, default=None, help="default: 0 1 2 (--quick: 0)")
    parser.add_argument("--steps", type=int, default=None, help="DPO steps per run (default 150, --quick 20)")
    parser.add_argument("--quick", action="store_true", help="smoke test: 20 steps, 1 seed")
    parser.add_argument("--only", nargs="+", choices=["trl", *VARIANTS], metavar="TOOL",
                        help="run only these: trl, or adapterkit variants (" + ", ".join(map(repr, VARIANTS)) + ")")
    parser.add_argument("--causes", action="store_true",
                        help="also run the cause table: the recipe as it was, and with one change at a time")
    parser.add_argument("--jobs", type=int, default=None,
                        help="training runs at a time, each with cores/jobs torch threads (default: 2 on 2+ cores)")
    parser.add_argument("--json", type=Path, help="where to write the raw numbers (the .md goes beside it)")
    parser.add_argument("--render", type=Path, metavar="JSON",
                        help="rewrite the .md beside an earlier run's JSON (with --causes-from: add its cause table)")
    parser.add_argument("--causes-from", type=Path, metavar="JSON",
                        help="with --render: the JSON of a --causes run whose adapterkit variants form the cause table")
    parser.add_argument("--one", nargs=7, metavar=("TOOL", "SEED", "STEPS", "START", "TRAIN", "HELDOUT", "OUT"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        tool, seed, steps, start, train, heldout, out = args.one
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        if tool == "trl":
            record = run_trl(int(seed), int(steps), Path(start), Path(train), Path(heldout), Path(out))
        else:
            record = run_adapterkit(int(seed), int(steps), Path(start), Path(train), Path(heldout), Path(out), tool)
        print("RESULT " + json.dumps(record))
        return
    if args.render:
        result = json.loads(args.render.read_text())
        if args.causes_from:
            earlier = json.loads(args.causes_from.read_text())
            result["runs"] += [r for r in earlier["runs"] if r["tool"] not in ("trl", "adapterkit")]
            result["cause_notes"] = earlier.get("cause_notes", [])
            result["causes_command"] = earlier["header"]["command"]
        args.render.with_suffix(".md").write_text(markdown(result))
        print(f"wrote {args.render.with_suffix('.md')}")
        return
    if not (DATA / "train.jsonl").is_file() or not (DATA / "dev.jsonl").is_file():
        sys.exit(f"skipped: needs ../shared/data/preference/train.jsonl and dev.jsonl beside the checkout "
                 f"({DATA} is missing them)")
    seeds = args.seeds if args.seeds is not None else ([0] if args.quick else [0, 1, 2])
    steps = args.steps or (20 if args.quick else 150)
    tools = args.only or ["trl", "adapterkit", *([v for v in VARIANTS if v != "adapterkit"] if args.causes else [])]
    out_json = args.json or RESULTS / ("preference_vs_trl-quick.json" if args.quick else "preference_vs_trl.json")

    import torch
    from importlib import metadata

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    jobs = args.jobs or (2 if cores >= 2 else 1)
    threads = max(1, cores // jobs)

    from adapterkit.trained import load_trained

    t_all = time.perf_counter()
    cpu_model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("model name")), platform.processor() or platform.machine())
    nproc = subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip() or str(os.cpu_count())
    header = {"command": "python benchmarks/preference_vs_trl.py" + "".join(f" {a}" for a in (argv or sys.argv[1:])),
              "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "machine": f"{cpu_model}, nproc {nproc}; {jobs} training run(s) at a time, {threads} torch "
                         f"thread(s) each",
              "versions": ", ".join(f"{p} {metadata.version(p)}" for p in ("torch", "transformers", "peft", "trl",
                                                                          "datasets"))}
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="pref-vs-trl-") as tmp:
        work = Path(tmp)
        train, heldout, header["data"] = prepare(work)
        print(f"data: {header['data']}", flush=True)
        print(f"SFT start: lora-sentiment, {SFT_STEPS} steps ...", flush=True)
        sft, merged, header["sft_s"] = sft_and_merge(work)
        print(f"  {header['sft_s']:.0f} s", flush=True)

        # Reference scores: trl's (the merged SFT model) and adapterkit's (the SFT run itself).
        ref_trained = load_trained(sft)
        tokenizer = ref_trained.tokenizer
        pad_id = tokenizer.pad_token_id
        seqs, header["scorer_capped"] = sequences(tokenizer, read_jsonl(heldout))
        from transformers import AutoModelForCausalLM

        ref = {"adapterkit": summed_logprobs(ref_trained.model, seqs, pad_id),
               "trl": summed_logprobs(AutoModelForCausalLM.from_pretrained(merged), seqs, pad_id)}
        header["ref_max_abs_diff"] = max(abs(a - b) for a, b in zip(ref["trl"], ref["adapterkit"]))
        del ref_trained
        views = data_views(sft, train, heldout, tokenizer)
        print("one pair as trl gets it (prompt tail / chosen):", repr(views["example_trl"]["prompt"][-120:]),
              repr(views["example_trl"]["chosen"][:60]), flush=True)
        print("as adapterkit formats it:", repr(views["example_adapterkit"]["prompt"][-120:]),
              repr(views["example_adapterkit"]["chosen"][:60]), flush=True)
        for key in ("trl_train", "adapterkit_train"):
            print(f"  {key}: {views[key]}", flush=True)

        def save(complete: bool) -> dict[str, Any]:
            result = {"header": header, "steps": steps, "seeds": seeds, "complete": complete, "runs": runs,
                      "views": views,
                      "reference_preference_accuracy": {t: accuracies(ref[t], ref[t])["reference_preference_accuracy"]
                                                        for t in ref},
                      "total_s": time.perf_counter() - t_all}
            out_json.parent.mkdir(parents=True, exist_ok=True)
            out_json.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
            out_json.with_suffix(".md").write_text(markdown(result))
            return result

        lock = threading.Lock()

        def one(seed: int, tool: str) -> None:
            out = work / f"{tool.replace(' ', '-').replace(',', '')}-{seed}"
            start = merged if tool == "trl" else sft
            reference = ref["trl" if tool == "trl" else "adapterkit"]
            with lock:
                print(f"{tool} seed {seed}, {steps} steps ...", flush=True)
            env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
            t = time.perf_counter()
            proc = subprocess.run([sys.executable, __file__, "--one", tool, str(seed), str(steps), str(start),
                                   str(train), str(heldout), str(out)], capture_output=True, text=True, cwd=ROOT,
                                  env=env)
            process_s = time.perf_counter() - t
            if proc.returncode:
                raise RuntimeError(f"{tool} seed {seed} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-6000:]}")
            record = json.loads(next(line for line in reversed(proc.stdout.splitlines())
                                     if line.startswith("RESULT "))[7:])
            with lock:  # one scoring at a time, in this process
                policy = (load_trl_policy(merged, out / "adapter") if tool == "trl" else load_trained(out).model)
                scores = summed_logprobs(policy, seqs, pad_id)
                del policy
                r = {"tool": tool, "seed": seed, "steps_asked": steps, "process_s": process_s, **record,
                     **accuracies(scores, reference)}
                r.pop("reference_preference_accuracy")
                runs.append(r)
                runs.sort(key=lambda x: (tools.index(x["tool"]) if x["tool"] in tools else 99, x["seed"]))
                own = r.get("own_reward_accuracy")
                print(f"  {tool} seed {seed}: independent implicit-reward acc {r['implicit_reward_accuracy']:.1f}% "
                      f"(own: {'n/a' if own is None else f'{own:.1f}%'}), loss {r['train_loss']:.3f}, "
                      f"train {r['train_s']:.0f} s, process {process_s:.0f} s", flush=True)
                save(complete=False)  # after every run, so an interrupted benchmark keeps what it measured

        torch.set_num_threads(threads)
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            futures = [pool.submit(one, seed, tool) for seed in seeds for tool in tools]
            for f in futures:
                try:
                    f.result()
                except RuntimeError as e:
                    sys.exit(str(e))

    result = save(complete=True)
    print(markdown(result))
    print(f"total {result['total_s']:.0f} s; wrote {out_json} and {out_json.with_suffix('.md')}")


if __name__ == "__main__":
    main()
