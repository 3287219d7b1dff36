"""GGUF export: file size and parity per quant type, and per architecture.

    python benchmarks/gguf_export.py          # about 3 minutes on 2 CPU cores

Writes benchmarks/results/gguf_export.md and .json.

- builtin:tiny: the shipped `lora-sentiment` recipe, 30 steps, exported at every quant type.
- The tests' tiny random models (tests/architectures.py: 2 layers, 64 wide, init 0.3), one per supported
  architecture: `lora-sentiment` for 2 steps, exported at f16 and q8_0.

Each row is what export.json records: the size of the .gguf file; the file check (the file read back by
transformers against the merged weights rounded as the file rounds them: must be ~0 at every type); and
the cost of the quant type against the model as trained (max |Δlogits|, its share of the logit scale,
and how many of the 8 greedy continuations of 16 tokens are identical).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
sys.path.insert(0, str(ROOT / "tests"))

QUANTS = ["f32", "f16", "bf16", "q8_0", "q4_0"]
ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3"]


def train(work: Path, name: str, model: str | None, steps: int) -> Path:
    from adapterkit.config import load_recipe
    from adapterkit.stages import run

    out = work / f"run-{name}"
    overrides = [f"train.max_steps={steps}", "train.save_every=null", "data.eval=null", "train.precision=fp32",
                 f"output_dir={out}"]
    if model:
        overrides.append(f"model.name_or_path={model}")
    recipe, src = load_recipe("lora-sentiment", overrides)
    run(recipe, src, echo=False)
    return out


def export(run_dir: Path, out: Path, quant: str) -> dict[str, Any]:
    from adapterkit.export_gguf import export_gguf

    t = time.perf_counter()
    info = export_gguf(run_dir, out, quant, say=lambda *a: None)
    p = info["parity"]
    return {"quant": quant, "bytes": info["bytes"], "tensor_types": info["tensor_types"], "seconds": time.perf_counter() - t,
            "file_diff": p["file"]["max_abs_logit_diff"], "trained_diff": p["trained"]["max_abs_logit_diff"],
            "logit_scale": p["trained"]["logit_scale"], "greedy_identical": p["trained"]["greedy_identical"],
            "rows": p["trained"]["rows"], "token_agreement": p["trained"]["greedy_token_agreement"],
            "tokenizer_identical": p["tokenizer_identical"], "passed": p["passed"]}


def row(label: str, r: dict[str, Any]) -> str:
    return (f"| {label} | {r['quant']} | {r['bytes'] / 2**20:.2f} MiB | {r['file_diff']:.2g} | {r['trained_diff']:.3g} "
            f"({100 * r['trained_diff'] / r['logit_scale']:.2g}% of {r['logit_scale']:.1f}) | "
            f"{r['greedy_identical']}/{r['rows']} ({100 * r['token_agreement']:.0f}%) | "
            f"{'yes' if r['tokenizer_identical'] else 'NO'} | {'passed' if r['passed'] else 'FAILED'} |")


def main() -> None:
    import torch
    from architectures import build

    torch.set_num_threads(1)  # 64-wide matmuls gain nothing from a second thread
    t0 = time.perf_counter()
    results: dict[str, list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="gguf-bench-") as tmp:
        work = Path(tmp)
        run_dir = train(work, "builtin", None, 30)
        results["builtin:tiny"] = [export(run_dir, work / f"builtin-{q}", q) for q in QUANTS]
        print(f"builtin:tiny done ({time.perf_counter() - t0:.0f} s)", flush=True)
        for name in ARCHS:
            model = build(name, work / f"model-{name}")
            run_dir = train(work, name, str(model), 2)
            results[name] = [export(run_dir, work / f"{name}-{q}", q) for q in ("f16", "q8_0")]
            print(f"{name} done ({time.perf_counter() - t0:.0f} s)", flush=True)
    lines = ["# GGUF export: size and parity", "",
             f"- Command: `python benchmarks/gguf_export.py` ({time.perf_counter() - t0:.0f} s)",
             f"- Date: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}", "",
             "| model | quant | file | file check: max \\|Δlogits\\| | against the trained model: max \\|Δlogits\\| "
             "(share of the logit scale) | greedy identical (token agreement) | tokenizer | check |",
             "|---|---|---|---|---|---|---|---|"]
    for label, rs in results.items():
        lines += [row(label, r) for r in rs]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "gguf_export.json").write_text(json.dumps(results, indent=2) + "\n")
    (RESULTS / "gguf_export.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
