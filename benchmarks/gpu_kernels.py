"""The training kernels on a GPU: tokens/s and peak memory of QLoRA and LoRA training with
`train.kernels` off, liger, adapterkit and both, and each of our kernels alone against bitsandbytes'
and peft's path at realistic shapes.

    python benchmarks/gpu_kernels.py           # one CUDA GPU, about 6-8 minutes: writes results/gpu_kernels.{md,json}
    python benchmarks/gpu_kernels.py --tiny --out /tmp/k.md   # tiny shapes on a CPU under TRITON_INTERPRET=1:
                                               # checks that the script runs and the kernels agree; measures nothing

Training: two models built here from their configs with random weights (a Llama-3.2-1B-shaped and a
Qwen2.5-1.5B-shaped one, bf16, saved once), trained by `adapterkit recipe run`'s own code (pretraining
stage, packed 1,024-token blocks, so every micro-batch is full) for a few steps; each configuration in
its own process, since Liger patches transformers' modules process-wide. Tokens/s is the median of
the logged steps after the first two (compilation and warm-up); peak memory is
`torch.cuda.max_memory_allocated` over training. Ratios are against `off` of the same model and method.

Kernels alone, in this process: our NF4 dequantisation against `bitsandbytes.functional.dequantize_4bit`
(bits compared), and the fused LoRA projection and MLP, forward plus backward, against peft's
`Linear4bit` modules on the same weights (outputs and gradients compared), timed with CUDA events
(median of 20 after 5 warm-ups) with their peak memory.
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
import time
from pathlib import Path
from typing import Any

os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
if "--tiny" in sys.argv:  # before anything defines a Triton kernel
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"

MODELS: dict[str, dict[str, Any]] = {
    "llama-1b": dict(config="LlamaConfig", vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                     num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                     tie_word_embeddings=True),
    "qwen2-1.5b": dict(config="Qwen2Config", vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                       num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                       tie_word_embeddings=True),
}
TINY: dict[str, dict[str, Any]] = {
    "llama-tiny": dict(config="LlamaConfig", vocab_size=1024, hidden_size=64, intermediate_size=128,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
}
# (method, kernels) per model; adapterkit's kernels are for a 4-bit base only.
RUNS = [("qlora", "off"), ("qlora", "liger"), ("qlora", "adapterkit"), ("qlora", "both"),
        ("lora", "off"), ("lora", "liger")]
TINY_RUNS = [("qlora", "off"), ("qlora", "adapterkit"), ("qlora", "both")]


def build_model(root: Path, name: str, shape: dict[str, Any]) -> Path:
    """Random weights from the config (bf16 on a GPU), with a small BPE tokenizer trained on the
    sample corpus (its ids are a subset of the model's vocabulary: the LM head keeps its full size)."""
    import transformers

    from adapterkit.data.loading import SAMPLES
    from adapterkit.models import train_tokenizer

    out = root / name
    if (out / "config.json").is_file():
        return out
    tokenizer = train_tokenizer((SAMPLES / "text" / "train.txt").read_text(encoding="utf-8").split("\n\n"), 1024)
    shape = dict(shape)
    config = getattr(transformers, shape.pop("config"))(
        **shape, max_position_embeddings=4096, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    transformers.set_seed(0)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(dev):
        model = transformers.AutoModelForCausalLM.from_config(
            config, dtype=torch.bfloat16 if dev == "cuda" else torch.float32)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    del model
    return out


def train_one(model_dir: Path, method: str, kernels: str, steps: int, seq: int, batch: int, out: Path) -> dict:
    """One training run in this process; returns tokens/s per logged step, peak memory and what ran."""
    from transformers import TrainerCallback

    from adapterkit.config import load_recipe
    from adapterkit.stages import run

    class CudaPeak(TrainerCallback):
        peak = 0

        def on_train_begin(self, args, state, control, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()

        def on_train_end(self, args, state, control, **kwargs):
            if torch.cuda.is_available():
                self.peak = torch.cuda.max_memory_allocated()

    recipe, src = load_recipe("pretrain-tiny", [
        "model.init=pretrained", f"model.name_or_path={model_dir}", f"adapter.method={method}",
        "data.eval=null", f"data.max_length={seq}", "data.packing=true", f"train.batch_size={batch}",
        f"train.max_steps={steps}", "train.log_every=1", "train.save_every=null", "train.lr=1e-4",
        "train.gradient_checkpointing=false", f"train.kernels={kernels}", f"output_dir={out}"])
    probe = CudaPeak()
    run(recipe, src, echo=False, callbacks=[probe])
    logged = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    manifest = json.loads((out / "manifest.json").read_text())
    return {"tokens_per_s": [r["tokens_per_s"] for r in logged if "tokens_per_s" in r],
            "losses": [r["loss"] for r in logged if "loss" in r], "peak": probe.peak,
            "kernels": manifest["auto"]["kernels"]}


def train_apart(model_dir: Path, method: str, kernels: str, steps: int, seq: int, batch: int, root: Path) -> dict:
    out = root / f"run-{model_dir.name}-{method}-{kernels}"
    done = subprocess.run([sys.executable, __file__, "--train-one", json.dumps(
        [str(model_dir), method, kernels, steps, seq, batch, str(out)])], capture_output=True, text=True)
    line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"{model_dir.name} {method} {kernels} failed:\n{done.stderr[-4000:]}")
    return json.loads(line[len("RESULT "):])


# ---------------------------------------------------------------------------------------------
# Kernels alone


def _timed(fn: Any, warmup: int, repeat: int) -> tuple[float, int]:
    """(median milliseconds, peak bytes above what was allocated before) of fn()."""
    cuda = torch.cuda.is_available()
    for _ in range(warmup):
        fn()
    times = []
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    for _ in range(repeat):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1000)
    peak = torch.cuda.max_memory_allocated() - base if cuda else 0
    return statistics.median(times), peak


def kernels_alone(tiny: bool) -> list[dict[str, Any]]:
    import bitsandbytes as bnb
    import bitsandbytes.functional as F
    from peft import LoraConfig, get_peft_model

    from adapterkit.kernels import lora_4bit, nf4

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    warmup, repeat = (1, 2) if tiny else (5, 20)
    rows: list[dict[str, Any]] = []
    hidden, inter, tokens = (64, 128, 64) if tiny else (2048, 8192, 8192)

    # Dequantisation: one 4-bit weight to bf16, NF4 with double quantisation.
    for out_f, in_f in ([(inter, hidden)] if tiny else [(hidden, hidden), (inter, hidden), (151936, 1536)]):
        w = torch.randn(out_f, in_f, device=dev, dtype=torch.bfloat16)
        packed, state = F.quantize_4bit(w, quant_type="nf4", compress_statistics=True)
        ours = nf4.dequantize_triton(packed, state)
        theirs = F.dequantize_4bit(packed, state)
        t_ours, _ = _timed(lambda: nf4.dequantize_triton(packed, state), warmup, repeat)
        t_bnb, _ = _timed(lambda: F.dequantize_4bit(packed, state), warmup, repeat)
        rows.append(dict(kernel=f"NF4 dequantise {out_f}x{in_f} -> bf16", ours_ms=t_ours, baseline_ms=t_bnb,
                         baseline="bitsandbytes dequantize_4bit", same=bool(torch.equal(ours, theirs))))

    # A LoRA projection and a gated MLP (transformers' LlamaMLP) on a 4-bit base, forward + backward,
    # against peft's modules on the same weights.
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    from adapterkit.models import standard_4bit_layout

    def quantized(module: torch.nn.Module) -> torch.nn.Module:
        for name, child in list(module.named_children()):
            if isinstance(child, torch.nn.Linear):
                q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=False,
                                      compute_dtype=torch.bfloat16, quant_type="nf4", compress_statistics=True)
                q.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, quant_type="nf4",
                                             compress_statistics=True)
                setattr(module, name, q)
        module = module.to(dev)
        standard_4bit_layout(module)
        return module

    def block(what: str) -> torch.nn.Module:
        torch.manual_seed(0)
        if what == "gated MLP":
            base = LlamaMLP(LlamaConfig(hidden_size=hidden, intermediate_size=inter))
        else:
            base = torch.nn.ModuleDict({"q_proj": torch.nn.Linear(hidden, hidden, bias=False)})
        wrapped = get_peft_model(quantized(base), LoraConfig(
            r=16, lora_alpha=32, lora_dropout=0.0, target_modules=["gate_proj", "up_proj", "down_proj", "q_proj"]))
        for n, p in wrapped.named_parameters():
            if "lora_B" in n:
                p.data.normal_(0, 0.02)
        return wrapped

    for what in ("LoRA projection", "gated MLP"):
        plain, fused = block(what), block(what)
        lora_4bit.fuse(fused)
        x = torch.randn(tokens, hidden, device=dev, requires_grad=True)

        def step(model: torch.nn.Module, what: str = what) -> tuple[torch.Tensor, torch.Tensor]:
            x.grad = None
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
                inner = model.base_model.model
                y = inner(x) if what == "gated MLP" else inner["q_proj"](x)
            y.float().square().mean().backward()
            return y.detach(), x.grad.detach()

        (y0, g0), (y1, g1) = step(plain), step(fused)
        t_plain, m_plain = _timed(lambda: step(plain), warmup, repeat)
        t_fused, m_fused = _timed(lambda: step(fused), warmup, repeat)
        width = inter if what == "gated MLP" else hidden
        rows.append(dict(kernel=f"{what} fwd+bwd, {tokens} tokens, {hidden}->{width}, r16", ours_ms=t_fused,
                         baseline_ms=t_plain, baseline="peft + bitsandbytes",
                         same=bool(torch.allclose(y1.float(), y0.float(), rtol=2e-2, atol=2e-2)
                                   and torch.allclose(g1.float(), g0.float(), rtol=2e-2, atol=2e-2)),
                         ours_peak=m_fused, baseline_peak=m_plain))
    return rows


def markdown(training: list[dict[str, Any]], alone: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = ["# Training kernels on a GPU", "", f"Regenerate with `python benchmarks/gpu_kernels.py`. {meta['device']}; "
             f"{meta['versions']}.", "", "## Training (tokens/s and peak memory; ratios against `off`)", "",
             "| model | method | kernels | tokens/s | x off | peak GiB | x off | what ran |",
             "|---|---|---|---|---|---|---|---|"]
    for r in training:
        ran = r["kernels"]
        what = "; ".join(filter(None, [f"fused {ran['adapterkit']['layers']} proj, {ran['adapterkit']['mlps']} MLP"
                                       if ran["adapterkit"] else "", "liger " + ", ".join(ran["liger"])
                                       if ran["liger"] else ""])) or "none"
        memory = f"{r['peak'] / 2**30:.2f} | {r['memory_ratio']:.3f}" if r["peak"] else "- | -"  # CPU: not measured
        lines.append(f"| {r['model']} | {r['method']} | {r['kernels_setting']} | {r['tokens_per_s']:,.0f} | "
                     f"{r['speed_ratio']:.3f} | {memory} | {what} |")
    lines += ["", "## Kernels alone", "", "| kernel | ours ms | baseline ms | x baseline | baseline | same result |"
              " ours peak MiB | baseline peak MiB |", "|---|---|---|---|---|---|---|---|"]
    for r in alone:
        peaks = (f"{r['ours_peak'] / 2**20:.1f} | {r['baseline_peak'] / 2**20:.1f}" if r.get("ours_peak") else "- | -")
        lines.append(f"| {r['kernel']} | {r['ours_ms']:.3f} | {r['baseline_ms']:.3f} | "
                     f"{r['baseline_ms'] / max(r['ours_ms'], 1e-9):.2f} | {r['baseline']} | {r['same']} | {peaks} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny shapes on a CPU (TRITON_INTERPRET=1): a check")
    parser.add_argument("--out", type=Path, help="where to write the markdown (default: results/gpu_kernels.md)")
    parser.add_argument("--steps", type=int, default=None, help="training steps per configuration")
    parser.add_argument("--train-one", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.train_one:
        model_dir, method, kernels, steps, seq, batch, out = json.loads(args.train_one)
        print("RESULT " + json.dumps(train_one(Path(model_dir), method, kernels, steps, seq, batch, Path(out))))
        return
    if not args.tiny and not torch.cuda.is_available():
        sys.exit("no CUDA GPU: this benchmark measures GPU kernels (run with --tiny to check it on a CPU)")
    from importlib.metadata import version

    started = time.time()
    steps = args.steps or (2 if args.tiny else 10)
    seq, batch = (64, 2) if args.tiny else (1024, 4)
    training: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="gpu-kernels-") as tmp:
        root = Path(tmp)
        for name, shape in (TINY if args.tiny else MODELS).items():
            model_dir = build_model(root, name, shape)
            for method, kernels in (TINY_RUNS if args.tiny else RUNS):
                got = train_apart(model_dir, method, kernels, steps, seq, batch, root)
                speeds = got["tokens_per_s"][2:] or got["tokens_per_s"]
                training.append(dict(model=name, method=method, kernels_setting=kernels,
                                     tokens_per_s=statistics.median(speeds), peak=got["peak"], losses=got["losses"],
                                     kernels=got["kernels"]))
                print(f"{name} {method} {kernels}: {training[-1]['tokens_per_s']:,.0f} tokens/s, "
                      f"peak {got['peak'] / 2**30:.2f} GiB", flush=True)
    for r in training:
        off = next(o for o in training if o["model"] == r["model"] and o["method"] == r["method"]
                   and o["kernels_setting"] == "off")
        r["speed_ratio"] = r["tokens_per_s"] / off["tokens_per_s"]
        r["memory_ratio"] = r["peak"] / off["peak"] if off["peak"] else None
    alone = kernels_alone(args.tiny)
    meta = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.machine()}, "
            "Triton interpreter: nothing here is a speed)",
            "versions": ", ".join(f"{p} {version(p)}" for p in ("torch", "transformers", "peft", "bitsandbytes",
                                                                 "triton", "liger-kernel")),
            "seconds": round(time.time() - started), "steps": steps, "seq": seq, "batch": batch}
    out = args.out or RESULTS / "gpu_kernels.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(markdown(training, alone, meta))
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "training": training, "alone": alone}, indent=2))
    print(out.read_text())


if __name__ == "__main__":
    main()
