"""`adapterkit data clean` on a file larger than it should ever hold in memory: peak memory and speed.

    python benchmarks/data_clean.py              # builds a 1 GiB JSONL from ../shared/data, cleans it
    python benchmarks/data_clean.py --size-mib 64

The file repeats the real instruction set (../shared/data/instruction/train.jsonl, 2,800 rows) until it
is --size-mib large. Every copy after the first carries the problems cleaning is for, in known
numbers: most rows are exact repeats, every 10th has whitespace noise (a duplicate once normalised),
every 50th has one word added to its output (a near duplicate), every 1,000th a control character and
every 2,000th an empty output. `adapterkit data clean` runs in its own process, as a user runs it; its
peak resident memory is the child's `ru_maxrss`. Writes benchmarks/results/data_clean.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
RESULTS = Path(__file__).resolve().parent / "results"


def build(path: Path, size: int) -> dict[str, int]:
    """Write the repeated, noisy file; returns how many rows of each kind it holds."""
    source = SHARED / "instruction" / "train.jsonl"
    if not source.is_file():
        sys.exit(f"{source} is absent: the real datasets live in ../shared/data beside the checkout")
    rows = [json.loads(x) for x in source.read_text(encoding="utf-8").split("\n") if x]
    kinds = {"rows": 0, "whitespace": 0, "near": 0, "control": 0, "empty": 0}
    written = 0
    copy = 0
    with open(path, "w", encoding="utf-8") as f:
        while written < size:
            for i, row in enumerate(rows):
                row = dict(row)
                n = copy * len(rows) + i
                if copy and n % 2000 == 0:
                    row["output"], kind = "", "empty"
                elif copy and n % 1000 == 0:
                    row["output"], kind = row["output"] + " \x07", "control"
                elif copy and n % 50 == 0:
                    row["output"], kind = row["output"] + f" again{copy}", "near"
                elif copy and n % 10 == 0:
                    row["instruction"], kind = "  " + row["instruction"].replace(" ", "  ") + " \r\n", "whitespace"
                else:
                    kind = None
                line = json.dumps(row, ensure_ascii=False) + "\n"
                f.write(line)
                written += len(line.encode())
                kinds["rows"] += 1
                if kind:
                    kinds[kind] += 1
            copy += 1
    kinds["copies"] = copy
    return kinds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--out", type=Path, default=RESULTS / "data_clean.md")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="data-clean-") as tmp:
        src, out = Path(tmp) / "big.jsonl", Path(tmp) / "clean.jsonl"
        t0 = time.time()
        kinds = build(src, args.size_mib * 2**20)
        size = src.stat().st_size
        print(f"built {src} ({size / 2**20:,.0f} MiB, {kinds['rows']:,} rows) in {time.time() - t0:.0f} s", flush=True)
        t0 = time.time()
        done = subprocess.run([sys.executable, "-m", "adapterkit", "data", "clean", str(src), "--task", "generation",
                               "--out", str(out), "--json"], capture_output=True, text=True)
        seconds = time.time() - t0
        if done.returncode:
            sys.exit(done.stderr[-3000:])
        peak_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        report = json.loads(done.stdout)
    result = {"file_mib": round(size / 2**20, 1), "rows": kinds, "report": report, "seconds": round(seconds, 1),
              "rows_per_s": round(report["rows_read"] / seconds), "peak_rss_mib": round(peak_mib, 1),
              "machine": f"{platform.machine()}, {platform.python_version()}"}
    lines = ["# data clean on a file larger than memory should hold", "",
             "Regenerate with `python benchmarks/data_clean.py`.", "",
             f"- file: {result['file_mib']:,} MiB of JSONL, {kinds['rows']:,} rows ({kinds['copies']} copies of the "
             "2,800-row instruction set, with the problems below planted in every copy after the first)",
             f"- planted: {kinds['whitespace']:,} whitespace-noise repeats, {kinds['near']:,} near duplicates, "
             f"{kinds['control']:,} control characters, {kinds['empty']:,} empty outputs; the rest exact repeats",
             f"- cleaned in {seconds:,.0f} s ({result['rows_per_s']:,} rows/s), peak resident memory "
             f"{peak_mib:,.0f} MiB (the file is {result['file_mib'] / max(peak_mib, 1):.1f}x that)",
             f"- kept {report['kept']:,} rows", "", "| reason | rows |", "|---|---|"]
    lines += [f"| {report['why'][k]} | {n:,} |" for k, n in report["dropped"].items()]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
