"""Training throughput: adapterkit's shipped recipes against the trl script a user would write.

    python benchmarks/throughput.py                  # LoRA and QLoRA at ~10M and ~100M parameters
    python benchmarks/throughput.py --sizes 10M      # only the small model (a few minutes)

Writes benchmarks/results/throughput.json and throughput.md.

Both sides train the same Llama-style model (random init, built here; no download) with the same
tokenizer on the same rows, for one epoch: a mix of short SST-2 sentiment rows and long SQuAD-style
question-answering rows from ../shared/data, as prompt/completion pairs, with the same learning
rate, micro-batch (8), max length (512) and LoRA adapter (r 16, alpha 32, dropout 0.05, all linear
layers). Each configuration runs in its own process, one after another, so neither shares the CPU
with the other and the peak memory of one is not the next one's starting point.

- baseline: trl's SFTTrainer as its documentation shows it (`SFTConfig` defaults apart from lr,
  batch, epochs and max length; `peft_config=LoraConfig(...)`; for QLoRA a model loaded with
  `BitsAndBytesConfig(load_in_4bit=True, nf4, double quant)`). On a machine without CUDA a user has to
  pass `use_cpu=True`, and where the hardware has no fast bf16 `bf16=False` (trl's default bf16 would
  run in software, hundreds of times slower, which would flatter adapterkit); both are set here.
- adapterkit: `lora-sentiment` (LoRA) and `qlora-qa` (QLoRA) with their defaults, pointed at the same
  model and rows (`data.task=generation` with the prompt/completion columns).

Both read every row once, so they do the same useful work and only the time differs (adapterkit
packs several rows into one sequence, so it takes fewer, fuller steps). `--impls` adds adapterkit
with gradient checkpointing forced on (`adapterkit-ckpt`) and with packing off (`adapterkit-grouped`:
length-grouped padded batches; transformers' sampler sorts windows of min(rows / 32, 50) batches, so
96 rows give windows of 3 batches and a data set of 1,600 rows or more windows of 50).

Measured in each process, the same way for all: useful tokens (non-padding tokens the model reads:
from each batch's attention mask, or for packed rows, which carry none, every token but the pad
token at the end of a row; through a forward hook) and all tokens (padding included),
over the wall time from the first step to the last; peak memory as the process's peak resident set
(VmHWM) above its resident set before the model is loaded; model FLOPs per token as
adapterkit.perf counts them (matrix multiplies: 2 forward + 2 input-gradient FLOPs per weight, + 2 for
weights that train; causal attention at each example's own mean context); MFU = FLOPs per token x useful
tokens/s / the matmul peak of this CPU in the training dtype, measured by this script at its start.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
SHARED = ROOT.parent / "shared" / "data"

SIZES: dict[str, dict[str, Any]] = {
    "10M": dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=4),
    "100M": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                 num_key_value_heads=12),
}
ROWS = {"10M": 400, "100M": 96}  # examples per run: one epoch, 50 / 12 steps of 8 (the 100M baseline takes ~10 min)
VOCAB = 16384
LR, BATCH, MAX_LENGTH = 2e-4, 8, 512
LORA = dict(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear")
RECIPES = {"lora": "lora-sentiment", "qlora": "qlora-qa"}
# adapterkit as shipped; with gradient checkpointing forced on (what `auto` picks when memory is short); with
# packing off (length-grouped padded batches instead).
IMPLS: dict[str, tuple[str, ...]] = {"adapterkit": (), "adapterkit-ckpt": ("train.gradient_checkpointing=true",),
                                     "adapterkit-grouped": ("data.packing=false",)}


def _open(path: Path):
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8")


def write_mix(out: Path, n: int, seed: int = 0) -> Path:
    """n prompt/completion rows, half SST-2 sentiment (short) and half QA with its context (long)."""
    rng = random.Random(seed)
    sentiment = [json.loads(line) for line in _open(SHARED / "sentiment" / "train.jsonl")]
    qa = [json.loads(line) for line in _open(SHARED / "qa" / "train.jsonl")]
    rows = [{"prompt": f"Classify the sentiment of the text as negative or positive.\n\nText: {r['text']}\nSentiment:",
             "completion": f" {r['label']}"} for r in rng.sample(sentiment, n // 2)]
    rows += [{"prompt": f"Context: {r['context']}\n\nQuestion: {r['question']}\nAnswer:", "completion": f" {r['answer']}"}
             for r in rng.sample(qa, n - n // 2)]
    rng.shuffle(rows)
    out.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return out


def build_model(root: Path, size: str, corpus: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM, set_seed

    from adapterkit.models import train_tokenizer

    texts = [r["prompt"] + r["completion"] for r in map(json.loads, corpus.read_text().splitlines())]
    tok = train_tokenizer(texts, vocab_size=VOCAB)
    set_seed(0)
    config = LlamaConfig(vocab_size=len(tok), max_position_embeddings=1024, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **SIZES[size])
    out = root / f"llama-{size}"
    LlamaForCausalLM(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _rss(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


class Meter:
    """Counts what the model reads (a forward pre-hook) and times training (a TrainerCallback)."""

    def __init__(self, pad_token_id: int) -> None:
        from transformers import TrainerCallback

        meter = self

        class Callback(TrainerCallback):
            def on_train_begin(self, args, state, control, model=None, **kwargs):
                meter.hook = model.register_forward_pre_hook(meter.count, with_kwargs=True)
                meter.model = model
                meter.t0 = time.perf_counter()

            def on_train_end(self, args, state, control, **kwargs):
                meter.seconds = time.perf_counter() - meter.t0
                meter.hook.remove()

        self.callback = Callback()
        self.pad_token_id = pad_token_id
        self.useful = self.total = 0
        self.context_sum = 0.0
        self.seconds = 0.0

    def count(self, module, args, kwargs) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None or not torch.is_grad_enabled():
            return
        mask = kwargs.get("attention_mask")
        if mask is None:  # packed rows: no mask, and only the rows' padded tails hold the pad token
            mask = (ids != self.pad_token_id).long()
        positions = kwargs.get("position_ids")
        if positions is None:  # right-padded rows, one example each
            positions = torch.arange(ids.shape[-1]).expand_as(ids)
        self.useful += int(mask.sum())
        self.total += ids.numel()
        # A token at position i attends to i + 1 positions (causal, within its own example).
        self.context_sum += float(((positions + 1) * mask).sum())


def run_baseline(model_dir: Path, data: Path, method: str, out: Path, meter: Meter) -> dict[str, Any]:
    """trl's SFTTrainer as its docs show it, with LoRA (and a 4-bit model for QLoRA)."""
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from trl import SFTConfig, SFTTrainer

    from adapterkit.models import bf16_supported

    bf16 = bf16_supported(torch.device("cpu"))
    dataset = load_dataset("json", data_files=str(data), split="train")
    quant = None
    if method == "qlora":
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=torch.bfloat16 if bf16 else torch.float32)
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=quant)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    args = SFTConfig(output_dir=str(out), learning_rate=LR, per_device_train_batch_size=BATCH, num_train_epochs=1,
                     max_length=MAX_LENGTH, use_cpu=True, bf16=bf16, report_to="none", save_strategy="no",
                     logging_steps=5, disable_tqdm=True)
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=LoraConfig(task_type="CAUSAL_LM", **LORA), callbacks=[meter.callback])
    result = trainer.train()
    return {"train_loss": result.training_loss, "steps": result.global_step, "precision": "bf16" if bf16 else "fp32",
            "gradient_checkpointing": bool(args.gradient_checkpointing)}


def run_adapterkit(model_dir: Path, data: Path, method: str, out: Path, meter: Meter,
                   extra: tuple[str, ...] = ()) -> dict[str, Any]:
    """The shipped recipe with its defaults (and `extra` overrides), on the same model and rows."""
    from adapterkit.config import load_recipe, packs
    from adapterkit.stages import run

    recipe, src = load_recipe(RECIPES[method], [
        f"model.name_or_path={model_dir}", "data.task=generation", f"data.train={data}", "data.eval=null",
        "data.columns={instruction: prompt, output: completion}", f"data.max_length={MAX_LENGTH}",
        "data.truncation=end",  # cut long rows at max_length as trl does, so both train the same tokens
        f"adapter.lora.r={LORA['r']}", f"adapter.lora.alpha={LORA['lora_alpha']}",
        f"adapter.lora.dropout={LORA['lora_dropout']}", f"train.lr={LR}", f"train.batch_size={BATCH}",
        "train.epochs=1", "train.save_every=null", "train.log_every=5", f"output_dir={out}", *extra])
    run(recipe, src, echo=False, callbacks=[meter.callback])
    manifest = json.loads((out / "manifest.json").read_text())
    return {"train_loss": manifest["metrics"]["train_loss"], "steps": manifest["metrics"]["steps"],
            "precision": manifest["precision"], "gradient_checkpointing": manifest["gradient_checkpointing"],
            "packing": packs(recipe), "group_by_length": recipe.data.group_by_length and not packs(recipe)}


def one(impl: str, method: str, size: str, model_dir: Path, data: Path, out: Path) -> dict[str, Any]:
    """One configuration, in this process: train, then report throughput and memory."""
    from transformers.utils import logging as hf_logging

    from adapterkit import perf

    hf_logging.set_verbosity_error()
    if impl == "baseline":
        # adapterkit turns on PyTorch's huge-page allocation when imported (see adapterkit/__init__.py);
        # the plain trl script does not have it.
        os.environ["THP_MEM_ALLOC_ENABLE"] = "0"
    # Import what either side imports, so the memory measured from here on is training's, not code's.
    import bitsandbytes  # noqa: F401
    import datasets  # noqa: F401
    import matplotlib.pyplot  # noqa: F401
    import peft  # noqa: F401
    import trl  # noqa: F401
    from transformers import AutoTokenizer

    import adapterkit.stages  # noqa: F401

    pad_token_id = AutoTokenizer.from_pretrained(model_dir).pad_token_id
    rss0 = _rss("VmRSS")
    meter = Meter(pad_token_id)
    if impl == "baseline":
        extra = run_baseline(model_dir, data, method, out, meter)
    else:
        extra = run_adapterkit(model_dir, data, method, out, meter, IMPLS[impl])
    flops = perf.flops_per_token(meter.model, meter.context_sum / max(meter.useful, 1))
    return dict(impl=impl, method=method, size=size, seconds=meter.seconds, useful_tokens=meter.useful,
                all_tokens=meter.total, useful_tok_s=meter.useful / meter.seconds, all_tok_s=meter.total / meter.seconds,
                padding=1 - meter.useful / max(meter.total, 1), flops_per_token=flops,
                parameters=sum(p.numel() for p in meter.model.parameters()),
                peak_mib=(_rss("VmHWM") - rss0) / 2**20, **extra)


def markdown(result: dict[str, Any]) -> str:
    peaks = ", ".join(f"{v / 1e9:.0f} GFLOP/s in {k}" for k, v in result["peak_flops"].items())
    lines = [f"Machine: {result['machine']}. Matmul peak (2048x2048) measured in this run: {peaks}.", "",
             "| model | method | run | precision | useful tok/s | all tok/s | padding | peak memory (MiB) | MFU | train loss |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["runs"]:
        lines.append(f"| {r['size']} | {r['method']} | {r['impl']} | {r['precision']} | {r['useful_tok_s']:,.0f} | {r['all_tok_s']:,.0f} | "
                     f"{r['padding']:.0%} | {r['peak_mib']:,.0f} | {r['mfu']:.1%} | {r['train_loss']:.3f} |")
    lines += ["", "| model | method | run | run / baseline useful tok/s | run / baseline peak memory |",
              "|---|---|---|---|---|"]
    for key, ratio in result["ratios"].items():
        if "speedup" in ratio:
            lines.append(f"| {key.replace('/', ' | ')} | {ratio['speedup']:.2f}x | {ratio['memory']:.2f}x |")
    lines += ["", "| model | run | QLoRA / LoRA peak memory | QLoRA / LoRA useful tok/s |",
              "|---|---|---|---|"]
    for key, ratio in result["ratios"].items():
        if "qlora_memory" in ratio:
            lines.append(f"| {key.replace('/', ' | ')} | {ratio['qlora_memory']:.2f}x | {ratio['qlora_speed']:.2f}x |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--methods", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--one", nargs=5, metavar=("IMPL", "METHOD", "SIZE", "MODEL", "DATA"), help=argparse.SUPPRESS)
    parser.add_argument("--impls", nargs="+", default=["baseline", "adapterkit"], choices=["baseline", *IMPLS])
    parser.add_argument("--rows", type=int, help="examples per run (default: 400 at 10M, 96 at 100M)")
    parser.add_argument("--json", type=Path, default=RESULTS / "throughput.json")
    args = parser.parse_args(argv)
    if args.one:
        impl, method, size, model_dir, data = args.one
        with tempfile.TemporaryDirectory() as out:
            print(json.dumps(one(impl, method, size, Path(model_dir), Path(data), Path(out) / "run")))
        return
    if not (SHARED / "sentiment").is_dir() or not (SHARED / "qa").is_dir():
        sys.exit(f"needs ../shared/data/sentiment and ../shared/data/qa beside the checkout ({SHARED} is missing)")

    from adapterkit import perf

    cpu = torch.device("cpu")
    peaks = {"fp32": perf.matmul_peak(cpu, torch.float32, n=2048)}
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for size in args.sizes:
            data = write_mix(root / f"mix-{size}.jsonl", args.rows or ROWS[size])
            model_dir = build_model(root, size, data)
            for method in args.methods:
                for impl in args.impls:
                    print(f"{size} {method} {impl} ...", flush=True)
                    proc = subprocess.run([sys.executable, __file__, "--one", impl, method, size, str(model_dir),
                                           str(data)], capture_output=True, text=True, cwd=ROOT)
                    if proc.returncode:
                        sys.exit(f"{size} {method} {impl} failed:\n{proc.stderr[-4000:]}")
                    r = json.loads(proc.stdout.strip().splitlines()[-1])
                    if r["precision"] not in peaks:
                        peaks[r["precision"]] = perf.matmul_peak(cpu, perf.compute_dtype(r["precision"]), n=2048)
                    r["mfu"] = perf.mfu(r["useful_tok_s"], r["flops_per_token"], peaks[r["precision"]])
                    runs.append(r)
                    print(f"  {r['useful_tok_s']:,.0f} useful tok/s ({r['padding']:.0%} padding), "
                          f"{r['peak_mib']:,.0f} MiB, MFU {r['mfu']:.1%}, loss {r['train_loss']:.3f}", flush=True)
    ratios: dict[str, dict[str, float]] = {}
    by = {(r["size"], r["method"], r["impl"]): r for r in runs}
    for size in args.sizes:
        for impl in [i for i in args.impls if i != "baseline"]:
            for method in args.methods:
                if (size, method, "baseline") in by:
                    b, a = by[size, method, "baseline"], by[size, method, impl]
                    ratios[f"{size}/{method}/{impl}"] = {"speedup": a["useful_tok_s"] / b["useful_tok_s"],
                                                         "memory": a["peak_mib"] / b["peak_mib"]}
            if {"lora", "qlora"} <= set(args.methods):
                lo, q = by[size, "lora", impl], by[size, "qlora", impl]
                ratios[f"{size}/{impl}"] = {"qlora_memory": q["peak_mib"] / lo["peak_mib"],
                                            "qlora_speed": q["useful_tok_s"] / lo["useful_tok_s"]}
    from importlib import metadata

    result = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                         f"torch {torch.__version__}, trl {metadata.version('trl')}, "
                         f"transformers {metadata.version('transformers')}, peft {metadata.version('peft')}",
              "peak_flops": peaks, "runs": runs, "ratios": ratios}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    args.json.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
