"""Data selection with a small model: `adapterkit data select IN --scorer MODEL_OR_RUN --keep 0.7 --out OUT`.

    adapterkit data select sst2.jsonl --task sentiment --scorer builtin:tiny --keep 0.5 --out sst2.half.jsonl
    adapterkit data select instr.jsonl --task generation --scorer runs/small --rule middle --keep 0.8 --out sel.jsonl

Every row is scored by a small reference model: the mean loss (nats per token) of its completion given
its prompt, formatted as training formats it (a run's own format.json when the scorer is a run). Then a
fraction `--keep` is kept by a rule:

- `lowest_loss`: the rows the scorer finds most predictable (clean, typical, on-distribution);
- `middle`: drop the outliers at both ends, (1 - keep) / 2 from each: the noise at the top (mislabelled,
  garbled) and the trivial at the bottom (duplicated boilerplate);
- `learnability`: loss under the scorer minus loss under the same scorer briefly tuned (LoRA) on a held-out
  slice of the rows (`--holdout`, not selected): the rows whose loss the tuning lowered most, which the
  task can teach, not the ones already known (low loss) or unlearnable (high loss under both).

Scoring runs in chunks of CHUNK rows (batched inside, longest last), and each chunk's scores are appended
to OUT.scores.jsonl as it finishes, after a header that fingerprints the input, the scorer and the
settings. Killed and re-run with the same command, it reads the scores it has, skips those chunks and
goes on; a chunk is scored by the same batches either way, so the output is identical to an
uninterrupted run's. The selected rows are written (in their input order) to a temporary file and
renamed to OUT at the end.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal


from adapterkit import rundir, stages, trained
from adapterkit.config import DataConfig, load_recipe
from adapterkit.data.formatter import Formatter, FormatSpec, TemplateRejected, check_columns, label_set
from adapterkit.data.loading import RawRow, iter_rows
from adapterkit.errors import ConfigError, DataError, Problem
from adapterkit.evaluation import Progress, sequence_logprobs

Rule = Literal["lowest_loss", "middle", "learnability"]
RULES: tuple[str, ...] = ("lowest_loss", "middle", "learnability")
CHUNK = 512
"""Rows scored per chunk, the unit of resumption."""


@dataclass
class SelectReport:
    source: str
    scorer: str
    rule: str
    keep: float
    rows_read: int = 0
    scored: int = 0
    held_out: int = 0
    unscorable: Counter = field(default_factory=Counter)
    kept: int = 0
    threshold: tuple[float | None, float | None] = (None, None)
    """The kept scores' range (low, high)."""
    resumed_chunks: int = 0
    score_quantiles: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "unscorable": dict(self.unscorable)}

    def summary(self) -> str:
        low, high = self.threshold
        span = f"scores {low:.3f} to {high:.3f}" if low is not None else "nothing kept"
        q = ", ".join(f"{k} {v:.3f}" for k, v in self.score_quantiles.items())
        text = (f"{self.source}: {self.rows_read:,} rows, {self.scored:,} scored by {self.scorer} ({q}); "
                f"kept {self.kept:,} by {self.rule} (keep {self.keep}): {span}")
        if self.held_out:
            text += f"\n    {self.held_out:,} rows held out to tune the learnability reference (not selectable)"
        for reason, n in self.unscorable.items():
            text += f"\n    not scored, dropped {n}: {reason}"
        if self.resumed_chunks:
            text += f"\n    resumed: {self.resumed_chunks} chunk(s) of scores read back from the last run"
        return text


class Scorer:
    """A model that scores rows: mean loss of the completion given the prompt, in nats per token."""

    def __init__(self, source: str, task: str, columns: dict[str, str], labels: list[str], max_length: int,
                 batch_size: int) -> None:
        self.model, tok, spec = _load_scorer(source)
        self.tokenizer = tok
        if spec is not None and spec.task == task:  # a run scores in its own template
            spec = FormatSpec(**{**spec.__dict__, "max_length": max_length})
            self.formatter = Formatter(spec, tok, columns)
        else:
            cfg = DataConfig(task=task, columns=columns, max_length=max_length)
            self.formatter = Formatter.for_training(cfg, tok, labels)
        self.batch_size = batch_size

    def pairs(self, rows: list[RawRow], unscorable: Counter) -> list[tuple[int, list[int], list[int]]]:
        """(index in `rows`, prompt ids, completion ids) of each scorable row; the others counted by reason."""
        out = []
        for i, raw in enumerate(rows):
            fields, reason = self.formatter.fields(raw)
            if fields is None:
                unscorable[reason] += 1
                continue
            try:
                fields, fitted, _ = self.formatter.fit(fields)
                if fitted == "too_long":
                    unscorable["the completion alone does not fit max_length"] += 1
                    continue
                prompt, completion = self.formatter.split_for_eval(self.formatter.record(fields))
            except TemplateRejected as e:
                unscorable[f"the chat template rejects the conversation ({e})"] += 1
                continue
            if not completion:
                unscorable["no completion tokens"] += 1
                continue
            out.append((i, prompt, completion))
        return out

    def score(self, pairs: list[tuple[int, list[int], list[int]]]) -> list[float]:
        logps = sequence_logprobs(self.model, [(p, c) for _, p, c in pairs], self.tokenizer.pad_token_id,
                                  self.batch_size)
        return [-lp / len(c) for lp, (_, _, c) in zip(logps, pairs)]


def _load_scorer(source: str) -> tuple[Any, Any, FormatSpec | None]:
    """(model in eval mode, tokenizer, the run's format spec or None) for a run, a model directory,
    `builtin:NAME` (built first if need be) or a hub id."""
    if source.startswith("builtin:"):
        source = str(stages.build_builtin(source.removeprefix("builtin:")))
    return trained.load_reference(source, "--scorer")


def _fingerprint(source: str, parts: list[Any]) -> str:
    h = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode())
    path = Path(source)
    if path.is_file():
        st = path.stat()
        h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def _read_scores(path: Path, header: dict[str, Any]) -> dict[int, list[Any]]:
    """Chunks already scored by the same input, scorer and settings (chunk index -> its records)."""
    if not path.is_file():
        return {}
    lines = path.read_text(encoding="utf-8").split("\n")
    try:
        if json.loads(lines[0]) != header:
            return {}
        chunks = {}
        for line in lines[1:]:
            if line:
                record = json.loads(line)
                chunks[record["chunk"]] = record
        return chunks
    except (json.JSONDecodeError, KeyError):  # a line cut by the kill: that chunk is scored again
        return {}


def _chunks(rows: Iterator[RawRow], size: int) -> Iterator[list[RawRow]]:
    chunk: list[RawRow] = []
    for row in rows:
        chunk.append(row)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def keep_indices(scores: dict[int, float], keep: float, rule: str) -> set[int]:
    """The rows (by index) a rule keeps: a fraction `keep` of the scored ones (ties broken by index)."""
    order = sorted(scores, key=lambda i: (scores[i], i))
    n = round(keep * len(order))
    if rule == "middle":
        start = (len(order) - n) // 2
        return set(order[start:start + n])
    if rule == "learnability":  # score = loss before - loss after tuning: the largest drops
        return set(order[len(order) - n:])
    return set(order[:n])


def score_file(source: str, scorer: Scorer, scores_path: Path, header: dict[str, Any], report: SelectReport,
               skip: set[int], say: Callable[..., None], key: str, chunk_rows: int = CHUNK) -> dict[int, float]:
    """Scores of every row of `source` (row index -> score), resuming from `scores_path`."""
    done = _read_scores(scores_path, header)
    report.resumed_chunks = len(done)
    total = sum(1 for _ in iter_rows(source, "train", key))
    progress = Progress(say, f"scoring with {report.scorer}", total)
    scores: dict[int, float] = {}
    mode = "a" if done else "w"
    with open(scores_path, mode, encoding="utf-8") as f:
        if not done:
            f.write(json.dumps(header) + "\n")
        start = 0
        for c, chunk in enumerate(_chunks(iter_rows(source, "train", key), chunk_rows)):
            if c in done:
                record = done[c]
            else:
                unscorable: Counter = Counter()
                pairs = [p for p in scorer.pairs(chunk, unscorable) if start + p[0] not in skip]
                record = {"chunk": c, "index": [start + i for i, _, _ in pairs],
                          "score": scorer.score(pairs) if pairs else [], "unscorable": dict(unscorable)}
                f.write(json.dumps(record) + "\n")
                f.flush()
                os.fsync(f.fileno())
            scores.update(zip(record["index"], record["score"]))
            report.unscorable.update(record["unscorable"])
            start += len(chunk)
            progress.update(start)
    report.rows_read = total
    report.scored = len(scores)
    return scores


def select_file(source: str, out: Path, scorer_source: str, task: str, keep: float, rule: str = "lowest_loss",
                columns: dict[str, str] | None = None, max_length: int = 512, batch_size: int = 16,
                holdout: float = 0.05, tune_steps: int = 40, say: Callable[..., None] = print,
                chunk_rows: int = CHUNK) -> SelectReport:
    """Score `source` with `scorer_source` and write the kept rows to `out` (see the module docstring)."""
    columns = columns or {}
    # A task field with no column would leave every row unscored: say so, with the mapping, instead.
    check_columns(task, columns, list(itertools.islice(iter_rows(source, "train", "IN"), 1000)), source,
                  "--column", "--task")
    report = SelectReport(source, scorer_source, rule, keep)
    labels = label_set(iter_rows(source, "train", "IN"), DataConfig(task=task, columns=columns))  # type: ignore[arg-type]
    if rule == "learnability":
        _, model_dir = trained.locate(scorer_source) if Path(scorer_source).expanduser().exists() else (None, None)
        if model_dir is not None and (model_dir / "adapter_config.json").is_file():
            raise ConfigError(Problem("--scorer", f"'{scorer_source}' is an adapter run; learnability tunes the "
                                      "scorer itself with a new adapter", fix="export the run first (`adapterkit "
                                      "export RUN --out DIR`) and pass DIR, or use --rule lowest_loss or middle"))
    # What the scores depend on: a re-run with other settings scores again instead of reusing them.
    settings = {"task": task, "columns": columns, "max_length": max_length, "batch_size": batch_size,
                "chunk": chunk_rows, "held_out": holdout if rule == "learnability" else None}
    base = Scorer(scorer_source, task, columns, labels, max_length, batch_size)
    scores_path = out.with_name(out.name + ".scores.jsonl")
    header = {"scorer": scorer_source, "fingerprint": _fingerprint(source, [scorer_source, settings])}
    skip: set[int] = set()
    if rule == "learnability":
        total = sum(1 for _ in iter_rows(source, "train", "IN"))
        skip = _holdout(total, holdout)
        report.held_out = len(skip)
    scores = score_file(source, base, scores_path, header, report, skip, say, "IN", chunk_rows)
    if rule == "learnability":
        tuned_dir = _tune_reference(source, out, scorer_source, task, columns, max_length, skip, tune_steps, say)
        tuned = Scorer(str(tuned_dir), task, columns, labels, max_length, batch_size)
        tuned_header = {"scorer": str(tuned_dir), "fingerprint": _fingerprint(source, [str(tuned_dir), settings])}
        tuned_report = SelectReport(source, "the tuned reference", rule, keep)
        after = score_file(source, tuned, out.with_name(out.name + ".scores-tuned.jsonl"), tuned_header,
                           tuned_report, skip, say, "IN", chunk_rows)
        scores = {i: scores[i] - after[i] for i in scores if i in after}
    kept = keep_indices(scores, keep, rule)
    if scores:
        values = sorted(scores.values())
        report.score_quantiles = {q: values[min(len(values) - 1, int(p * len(values)))]
                                  for q, p in (("p10", 0.1), ("median", 0.5), ("p90", 0.9))}
        chosen = sorted(scores[i] for i in kept) or [math.nan]
        report.threshold = (chosen[0], chosen[-1]) if kept else (None, None)
    report.kept = len(kept)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for i, row in enumerate(iter_rows(source, "train", "IN")):
                if i in kept:
                    f.write(json.dumps(row.values, ensure_ascii=False) + "\n")
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    rundir.write_atomic(out.with_name(out.name + ".report.json"), json.dumps(report.to_dict(), indent=2) + "\n")
    return report


def _holdout(total: int, share: float) -> set[int]:
    """A fixed, spread-out slice of the row indices (every k-th row), so that it is the same on a re-run."""
    if not 0 < share < 1:
        raise DataError(Problem("--holdout", f"{share!r} is not a share in (0, 1)", fix="e.g. --holdout 0.05"))
    step = max(2, round(1 / share))
    return set(range(0, total, step))


def _tune_reference(source: str, out: Path, scorer: str, task: str, columns: dict[str, str], max_length: int,
                    holdout: set[int], steps: int, say: Callable[..., None]) -> Path:
    """Tune a LoRA adapter on the held-out rows (the learnability reference), once: a finished run beside
    OUT is reused by a re-run."""
    run_dir = out.with_name(out.name + ".reference-run")
    if (run_dir / "model").is_dir():
        return run_dir
    slice_path = out.with_name(out.name + ".holdout.jsonl")
    with open(slice_path, "w", encoding="utf-8") as f:
        for i, row in enumerate(iter_rows(source, "train", "IN")):
            if i in holdout:
                f.write(json.dumps(row.values, ensure_ascii=False) + "\n")
    say(f"learnability: tuning a LoRA reference on {len(holdout):,} held-out rows for {steps} steps")
    if Path(scorer).expanduser().exists():
        scorer = str(trained.locate(scorer)[1])  # a full run's model directory
    overrides = [f"model.name_or_path={scorer}", f"data.task={task}", f"data.train={slice_path}", "data.eval=null",
                 f"data.max_length={max_length}", f"train.max_steps={steps}", "train.save_every=null",
                 "train.log_every=10", f"output_dir={run_dir}", "data.max_dropped=1"]
    overrides += [f"data.columns.{k}={v}" for k, v in columns.items()]
    recipe, src = load_recipe("lora-sentiment", overrides)
    stages.run(recipe, src, echo=False)
    return run_dir


