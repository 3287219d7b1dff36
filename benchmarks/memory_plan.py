"""The memory plan against measurement: peak tensor memory of real adapterkit training steps on this CPU.

    python benchmarks/memory_plan.py                 # every configuration (about 15 minutes on 2 busy cores)
    python benchmarks/memory_plan.py --only S-lora   # the configurations whose id starts with S-lora

Writes benchmarks/results/memory_plan.json and memory_plan.md (predicted vs measured, and their ratio).

Each configuration is `adapterkit recipe run`'s own training (adapterkit.stages.run: trl's
SFTTrainer, the real loss, the real optimizer) for 2 optimizer steps, on one of two Llama-style models
built here (no download). The data makes every micro-batch (batch, max_length) with padding: the batch
is the whole data set, one row longer than max_length (truncated) and the others shorter (see
write_data for the gradient-accumulation configuration).

How the peak is measured: torch's profiler with `profile_memory=True` records every allocation and
free of the CPU allocator, from the start of training to its end; their running sum, plus the tensors
alive when training starts (weights, 4-bit quantisation state, buffers: every tensor the garbage
collector can reach, each storage once), is the tensor memory at every moment, and its maximum is the
peak. Nothing is sampled and nothing is left out: parameters, gradients, optimizer state, activations,
the LM head's buffers and every temporary are in it. The plan is `adapterkit.plan.estimate(recipe,
device="cpu")`, computed from the model's config alone.

This CPU has no bf16 instructions, so adapterkit refuses `train.precision=bf16` here; the `bf16`
configurations let it through (torch computes bf16 in software, slowly), because memory, not speed,
is measured, and bf16 autocast is what a GPU runs.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")

import torch  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"

# Two Llama-style models: S (tied embeddings, multi-head attention) and M (untied, grouped-query).
SIZES: dict[str, dict[str, Any]] = {
    # 704, not Llama's 8/3 x 256 = 688: bitsandbytes' CPU 4-bit kernel misreads rows that are not whole
    # 64-value blocks (adapterkit refuses qlora on such a model on a CPU).
    "S": dict(vocab_size=4096, hidden_size=256, intermediate_size=704, num_hidden_layers=8, num_attention_heads=4,
              num_key_value_heads=4, tie_word_embeddings=True),
    "M": dict(vocab_size=8192, hidden_size=512, intermediate_size=1408, num_hidden_layers=12, num_attention_heads=8,
              num_key_value_heads=4, tie_word_embeddings=False),
}

# (id, size, method, max_length, batch, extra overrides). fp32 is what `precision: auto` picks on a CPU
# for models under 50M parameters.
CONFIGS: list[tuple[str, str, str, int, int, list[str]]] = [
    (f"{size}-{method}-{seq}", size, method, seq, 2, [])
    for size in SIZES for method in ("full", "lora", "qlora") for seq in (128, 512)
] + [
    ("M-lora-512-checkpointing", "M", "lora", 512, 2, ["train.gradient_checkpointing=true"]),
    ("M-qlora-512-checkpointing", "M", "qlora", 512, 2, ["train.gradient_checkpointing=true"]),
    ("S-lora-128-dora", "S", "lora", 128, 2, ["adapter.lora.dora=true"]),
    ("S-prompt_tuning-512", "S", "prompt_tuning", 512, 2, []),
    ("S-full-128-bf16", "S", "full", 128, 2, ["train.precision=bf16"]),
    ("S-full-128-bf16-checkpointing", "S", "full", 128, 2,
     ["train.precision=bf16", "train.gradient_checkpointing=true"]),
    ("S-qlora-128-bf16", "S", "qlora", 128, 2, ["train.precision=bf16"]),
    ("S-full-128-grad_accum", "S", "full", 128, 2, ["train.grad_accum=2"]),
    # train.kernels=adapterkit: the fused 4-bit LoRA functions (dequantising with bitsandbytes here: the
    # same tensors as the Triton kernel's), against the qlora rows above.
    ("S-qlora-512-kernels", "S", "qlora", 512, 2, ["train.kernels=adapterkit"]),
    ("M-qlora-512-kernels", "M", "qlora", 512, 2, ["train.kernels=adapterkit"]),
    ("M-qlora-512-checkpointing-kernels", "M", "qlora", 512, 2,
     ["train.gradient_checkpointing=true", "train.kernels=adapterkit"]),
    ("S-qlora-128-bf16-kernels", "S", "qlora", 128, 2, ["train.precision=bf16", "train.kernels=adapterkit"]),
]


def live_tensor_bytes() -> int:
    """Bytes of every tensor storage the garbage collector can reach, each storage counted once."""
    storages: dict[int, int] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # some library objects warn when isinstance() probes them
        for obj in gc.get_objects():
            try:
                if not torch.is_tensor(obj) or obj.device.type == "meta":
                    continue
                storage = obj.untyped_storage()
                pointer = storage.data_ptr()  # a FakeTensor (left by torch.compile) has none: it raises
            except (RuntimeError, NotImplementedError):
                continue
            if pointer:
                storages[pointer] = storage.nbytes()
    return sum(storages.values())


class PeakMemory(TrainerCallback):
    """Peak tensor memory of the training loop: live tensors at its start plus the running sum of
    every allocation and free the profiler records until its end."""

    def on_train_begin(self, args, state, control, **kwargs):
        gc.collect()
        self.baseline = live_tensor_bytes()
        self.profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True)
        self.profiler.start()

    def on_train_end(self, args, state, control, **kwargs):
        self.profiler.stop()
        events = [e for e in self.profiler.profiler.kineto_results.events() if e.name() == "[memory]"]
        running = peak = 0
        for e in sorted(events, key=lambda e: e.start_ns()):
            running += e.nbytes()
            peak = max(peak, running)
        self.peak = self.baseline + peak
        del self.profiler


def build_model(root: Path, size: str) -> Path:
    """A randomly initialised Llama of preset `size` with a BPE tokenizer trained on the sample corpus."""
    from transformers import LlamaConfig, LlamaForCausalLM, set_seed

    from adapterkit.data.loading import SAMPLES
    from adapterkit.models import train_tokenizer

    out = root / f"model-{size}"
    if (out / "config.json").is_file():
        return out
    tokenizer = train_tokenizer((SAMPLES / "text" / "train.txt").read_text(encoding="utf-8").split("\n\n"), 2048)
    set_seed(0)
    config = LlamaConfig(max_position_embeddings=2048, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **SIZES[size])
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def grad_accum(extra: list[str]) -> int:
    return int(next((o.partition("=")[2] for o in extra if o.startswith("train.grad_accum=")), 1))


def write_data(path: Path, seq: int, batch: int, accum: int = 1) -> Path:
    """`batch` generation rows: the first longer than `seq` tokens (cut to exactly `seq`), the others
    about a quarter as long, so the one micro-batch per step is (batch, seq) and padded. With gradient
    accumulation, `batch * accum` rows all cut to `seq` (shuffled rows could not promise every
    micro-batch one long row): micro-batches of (batch, seq) without padding."""
    from adapterkit.data.loading import SAMPLES

    words = (SAMPLES / "text" / "train.txt").read_text(encoding="utf-8").split()
    rows = [{"instruction": f"Continue text {i}.", "input": "",
             "output": " ".join(words[i * 50: i * 50 + (4 * seq if i == 0 or accum > 1 else seq // 4)])}
            for i in range(batch * accum)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def overrides_for(model_dir: Path, data: Path, method: str, seq: int, batch: int, extra: list[str], out: Path
                  ) -> list[str]:
    return [f"model.name_or_path={model_dir}", f"adapter.method={method}", "data.task=generation",
            f"data.train={data}", "data.eval=null", "data.packing=false", f"data.max_length={seq}",
            "data.truncation=end",  # the long row must fill max_length exactly, as the plan assumes
            f"train.batch_size={batch}",
            "train.max_steps=2", "train.save_every=null", "train.log_every=1", f"output_dir={out}", *extra]


@contextlib.contextmanager
def software_bf16(extra: list[str]) -> Iterator[None]:
    """Let adapterkit take train.precision=bf16 on a CPU without bf16 instructions (see the docstring)."""
    from adapterkit import models

    supported = models.bf16_supported
    if "train.precision=bf16" in extra:
        models.bf16_supported = lambda dev: True
    try:
        yield
    finally:
        models.bf16_supported = supported


def measure(model_dir: Path, method: str, seq: int, batch: int, extra: list[str], work: Path) -> dict[str, int]:
    """Train 2 steps through adapterkit and return the measured peak and the memory live at the start."""
    from adapterkit.config import load_recipe
    from adapterkit.stages import run

    out = work / "run"
    shutil.rmtree(out, ignore_errors=True)
    data = write_data(work / "data.jsonl", seq, batch, grad_accum(extra))
    recipe, src = load_recipe("lora-sentiment", overrides_for(model_dir, data, method, seq, batch, extra, out))
    probe = PeakMemory()
    with software_bf16(extra):
        run(recipe, src, echo=False, callbacks=[probe])
    return {"peak": probe.peak, "baseline": probe.baseline}


def predict(model_dir: Path, method: str, seq: int, batch: int, extra: list[str], work: Path) -> Any:
    from adapterkit import plan
    from adapterkit.config import load_recipe

    data = write_data(work / "data.jsonl", seq, batch, grad_accum(extra))
    recipe, _ = load_recipe("lora-sentiment", overrides_for(model_dir, data, method, seq, batch, extra, work / "run"))
    config, name = plan.model_config(recipe)
    with software_bf16(extra):
        return plan.estimate(recipe, plan.ModelFacts.of(config, name), device="cpu", padded=grad_accum(extra) == 1)


def measure_apart(cid: str, root: Path) -> dict[str, int]:
    """`measure` in a fresh process, so that no allocation of an earlier configuration (seen by an earlier
    profiler session, and freed during this one) can lower the running sum."""
    done = subprocess.run([sys.executable, __file__, "--measure", cid, "--root", str(root)], capture_output=True,
                          text=True, check=False)
    for line in done.stdout.splitlines():
        if line.startswith("MEASURED "):
            return json.loads(line.removeprefix("MEASURED "))
    sys.exit(f"{cid}: the measuring process failed:\n{done.stderr[-3000:]}")


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| configuration | method | model | tokens (batch x seq) | precision | checkpointing | weights "
             "predicted / measured (MiB) | peak predicted (MiB) | peak measured (MiB) | predicted / measured |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['id']} | {r['method']} | {r['size']} | {r['batch']} x {r['seq']} | {r['precision']} | "
                     f"{'on' if r['checkpointing'] else 'off'} | {r['weights_predicted'] / 2**20:.1f} / "
                     f"{r['weights_measured'] / 2**20:.1f} | {r['predicted'] / 2**20:.1f} | "
                     f"{r['measured'] / 2**20:.1f} | {r['ratio']:.3f} |")
    return "\n".join(lines) + "\n"


def _versions() -> dict[str, str]:
    from importlib.metadata import version

    return {name: version(name) for name in ("torch", "transformers", "peft", "trl", "bitsandbytes")}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="run the configurations whose id starts with this")
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # one configuration, in this process (see measure_apart)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    table = {c[0]: c[1:] for c in CONFIGS}
    if args.measure:
        size, method, seq, batch, extra = table[args.measure]
        root = Path(args.root)
        print("MEASURED " + json.dumps(measure(build_model(root, size), method, seq, batch, extra, root)), flush=True)
        return

    rows = []
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="memory-plan-") as tmp:
        root = Path(tmp)
        for cid in [c for c in table if c.startswith(args.only)]:
            size, method, seq, batch, extra = table[cid]
            model_dir = build_model(root, size)
            t0 = time.time()
            got = measure_apart(cid, root)
            p = predict(model_dir, method, seq, batch, extra, root)
            rows.append(dict(id=cid, size=size, method=method, seq=seq, batch=batch,
                             precision=p.setting["precision"], checkpointing=p.setting["gradient_checkpointing"],
                             extra=extra, predicted=p.peak, measured=got["peak"], ratio=p.peak / got["peak"],
                             weights_predicted=p.weights_total, weights_measured=got["baseline"],
                             seconds=round(time.time() - t0, 1)))
            r = rows[-1]
            print(f"{cid:28s} predicted {r['predicted'] / 2**20:8.1f} MiB  measured {r['measured'] / 2**20:8.1f} MiB"
                  f"  ratio {r['ratio']:.3f}  ({r['seconds']} s)", flush=True)
    if not rows:
        sys.exit(f"no configuration id starts with {args.only!r}")
    ratios = [r["ratio"] for r in rows]
    summary = {"configurations": len(rows), "ratio_min": round(min(ratios), 4), "ratio_max": round(max(ratios), 4),
               "within_20_percent": sum(abs(x - 1) <= 0.2 for x in ratios), "seconds": round(time.time() - started),
               "versions": _versions(), "machine": platform.machine(), "cpus": os.cpu_count()}
    if not args.only:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "memory_plan.json").write_text(json.dumps({"summary": summary, "rows": rows}, indent=2) + "\n")
        (RESULTS / "memory_plan.md").write_text(
            "# Memory plan: predicted vs measured peak tensor memory (CPU)\n\n"
            "Regenerate with `python benchmarks/memory_plan.py`.\n\n" + markdown(rows))
        print(f"wrote {RESULTS / 'memory_plan.json'} and {RESULTS / 'memory_plan.md'}")
    print(markdown(rows))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
