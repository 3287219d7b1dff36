"""What data.streaming buys a pretraining run: memory and time to the first step that do not grow
with the corpus. Measured against the same run reading its corpus whole, in the same session.

    python benchmarks/streaming.py                  # about 10 minutes on 2 CPU cores
    python benchmarks/streaming.py --copies 1 4

The corpus is ../shared/data/pretrain/wikitext2.txt (1.1 MB, real text), written --copies times over
into one .txt file (each paragraph of copy k prefixed "k:", so that no copy is a duplicate of another).
Each run is the shipped pretrain-tiny recipe for --steps steps with a tokenizer trained once on one copy
(model.tokenizer, so that neither mode trains one), in its own process: its peak resident memory
(ru_maxrss), its wall time, and the trainer's own runtime; "before training" is wall minus runtime
(reading, formatting, tokenizing, building the model). One unrecorded run first warms the imports. Writes benchmarks/results/streaming.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
RESULTS = Path(__file__).resolve().parent / "results"

CHILD = """
import resource, sys
from adapterkit.cli import main
try:
    main(sys.argv[1:])
except SystemExit as e:
    code = e.code or 0
print("MAXRSS_KIB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)
sys.exit(code)
"""


def write_corpus(source: Path, copies: int, out: Path) -> None:
    paragraphs = [p for p in source.read_text(encoding="utf-8").split("\n\n") if p.strip()]
    with open(out, "w", encoding="utf-8") as f:
        for k in range(copies):
            for p in paragraphs:
                f.write(f"{k}: {p.strip()}\n\n")


def one_run(corpus: Path, tokenizer: Path, streaming: bool, steps: int, out: Path) -> dict:
    args = ["recipe", "run", "pretrain-tiny", f"data.train={corpus}", "data.eval=null", f"model.tokenizer={tokenizer}",
            f"train.max_steps={steps}", "train.save_every=null", f"train.log_every={steps}",
            f"data.streaming={'true' if streaming else 'false'}", f"output_dir={out}", "data.max_dropped=1"]
    started = time.time()
    done = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True)
    wall = time.time() - started
    if done.returncode != 0:
        raise SystemExit(f"run failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    rss = int(next(line.split()[1] for line in done.stderr.splitlines() if line.startswith("MAXRSS_KIB")))
    metrics = json.loads((out / "manifest.json").read_text())["metrics"]
    return {"streaming": streaming, "peak_rss_mib": round(rss / 1024, 1), "wall_s": round(wall, 1),
            "train_s": metrics["runtime_s"], "before_training_s": round(wall - metrics["runtime_s"], 1),
            "rows_read": (metrics.get("streamed") or {}).get("rows_read"), "tokens_seen": metrics["tokens_seen"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--copies", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    source = SHARED / "pretrain" / "wikitext2.txt"
    if not source.exists():
        raise SystemExit(f"skipped: {source} is absent (the benchmark reads ../shared/data beside the checkout)")
    from adapterkit.models import train_tokenizer

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        tokenizer = tmp_path / "tokenizer"
        train_tokenizer(source.read_text(encoding="utf-8").split("\n\n"), 4096).save_pretrained(tokenizer)
        warm = tmp_path / "warm.txt"  # the first process of a session pays for cold imports; not recorded
        write_corpus(source, 1, warm)
        one_run(warm, tokenizer, False, 2, tmp_path / "warm-run")
        for copies in args.copies:
            corpus = tmp_path / f"corpus-{copies}.txt"
            write_corpus(source, copies, corpus)
            size = corpus.stat().st_size / 2**20
            for streaming in (False, True):
                row = one_run(corpus, tokenizer, streaming, args.steps, tmp_path / f"run-{copies}-{streaming}")
                row.update(copies=copies, corpus_mib=round(size, 1))
                rows.append(row)
                print(json.dumps(row), flush=True)
            corpus.unlink()
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "streaming.json").write_text(json.dumps({"steps": args.steps, "rows": rows}, indent=2) + "\n")
    lines = ["# data.streaming against reading the corpus whole (pretrain-tiny, "
             f"{args.steps} steps, one process per run)", "",
             "| corpus | mode | peak RSS | before training | training | rows the stream read |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['corpus_mib']} MiB ({r['copies']}x wikitext2) | {'streamed' if r['streaming'] else 'whole'} "
                     f"| {r['peak_rss_mib']:.0f} MiB | {r['before_training_s']:.1f} s | {r['train_s']:.1f} s | "
                     f"{r['rows_read'] if r['rows_read'] is not None else '-'} |")
    (RESULTS / "streaming.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
