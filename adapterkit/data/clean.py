"""Data cleaning: `adapterkit data clean IN --task T --out OUT`, streaming, with a report of what went and why.

    adapterkit data clean sst2.jsonl --task sentiment --out sst2.clean.jsonl
    adapterkit data clean corpus.txt --task text --out clean.jsonl --min-tokens 8 --tokenizer gpt2 --language en

Every row is read, cleaned and written one at a time, so a file larger than memory works; only the
hashes of the rows kept stay in memory (16 bytes each), and the near-duplicate index of those rows.
In order, each row is:

1. normalised: Unicode NFC, line ends to \\n, other Unicode spaces to a space, runs of spaces and tabs
   to one, trailing spaces of each line and runs of 3+ newlines cut, the ends stripped (in every text
   value, nested ones such as chat messages included);
2. dropped when a required field of the task is empty after that, or when it holds control characters
   (other than tab and newline) or U+FFFD, the mark of text decoded with the wrong encoding;
3. dropped when its task fields are exactly those of a row kept before (hashed);
4. dropped when it is a near duplicate of a row kept before: MinHash over word 3-grams (character
   5-grams for short texts) with locality-sensitive hashing, from datasketch, at a Jaccard similarity of
   `near_duplicates` (0.85 by default);
5. dropped when shorter or longer than the token limits (a tokenizer is needed for those);
6. dropped when py3langid names a language outside `languages` with at least `language_confidence`
   (a row it is unsure of stays).

The output is JSONL (the rows' own keys, cleaned), written to a temporary file beside OUT and renamed
into place at the end: an interrupted run leaves OUT as it was. The report (counts per reason, the
first few examples of each with where they came from) goes to OUT.report.json and is printed as a table.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import os
import re
import time
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adapterkit import rundir
from adapterkit.config.schema import CleanConfig, DataConfig
from adapterkit.data import language
from adapterkit.data.formatter import check_columns, lookup
from adapterkit.data.loading import RawRow, iter_rows
from adapterkit.data.tasks import TASKS
from adapterkit.errors import ConfigError, Problem

REASONS = {
    "empty": "a required field is empty",
    "control": "control characters or U+FFFD (text decoded with the wrong encoding)",
    "duplicate": "an exact duplicate of a row kept before",
    "near_duplicate": "a near duplicate of a row kept before",
    "short": "fewer tokens than min_tokens",
    "long": "more tokens than max_tokens",
    "language": "in another language",
}
"""Why a row is dropped, in the order the checks run."""
EXAMPLES = 3
"""Examples kept in the report per reason."""
NUM_PERM = 64
"""MinHash permutations: enough to tell 0.85 from 0.5 similarity reliably, cheap to hash."""

_SPACES = re.compile(r"[^\S\n]+")
_NEWLINES = re.compile(r"\n{3,}")
_UNTIDY = re.compile(r"[^\S\n ]|  | \n|\n{3,}")  # whitespace that normalising would change
_BAD = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\ufffd]")


def normalise(value: Any) -> Any:
    """A value with every text in it normalised (NFC, whitespace); other values as they are."""
    if isinstance(value, str):
        if unicodedata.is_normalized("NFC", value) and not _UNTIDY.search(value):
            return value.strip()  # the common case, without rebuilding the text line by line
        text = unicodedata.normalize("NFC", value).replace("\r\n", "\n").replace("\r", "\n")
        text = "\n".join(_SPACES.sub(" ", line).rstrip() for line in text.split("\n"))
        return _NEWLINES.sub("\n\n", text).strip()
    if isinstance(value, list):
        return [normalise(v) for v in value]
    if isinstance(value, dict):
        return {k: normalise(v) for k, v in value.items()}
    return value


def _texts(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, list):
        for v in value:
            yield from _texts(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _texts(v)
    elif value is not None:
        yield str(value)


@dataclass
class CleanReport:
    """What cleaning did: rows read and kept, drops per reason with examples."""

    source: str
    rows_read: int = 0
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)
    examples: dict[str, list[dict[str, str]]] = field(default_factory=dict)
    normalised: int = 0
    """Rows kept whose text normalising changed."""
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "rows_read": self.rows_read, "kept": self.kept, "normalised": self.normalised,
                "dropped": {r: self.dropped[r] for r in REASONS if self.dropped[r]},
                "why": {r: REASONS[r] for r in REASONS if self.dropped[r]}, "examples": self.examples,
                "seconds": round(self.seconds, 1)}

    def reasons(self) -> Counter:
        """The drops by reason, in words, in the order the checks run."""
        return Counter({REASONS[r]: self.dropped[r] for r in REASONS if self.dropped[r]})

    def table(self) -> str:
        lines = [f"{self.source}: {self.rows_read:,} rows read, {self.kept:,} kept, "
                 f"{self.rows_read - self.kept:,} dropped ({self.normalised:,} kept rows had their text normalised)"]
        if not sum(self.dropped.values()):
            return lines[0]
        lines += ["", "| reason | rows | share | example |", "|---|---|---|---|"]
        for reason in REASONS:
            n = self.dropped[reason]
            if n:
                first = self.examples[reason][0]
                lines.append(f"| {REASONS[reason]} | {n:,} | {n / max(self.rows_read, 1):.1%} | "
                             f"{first['where']}: {first['text']} |")
        return "\n".join(lines)


class Cleaner:
    """The checks of one cleaning pass, applied to rows in order; holds what the pass has kept."""

    def __init__(self, task: str, columns: dict[str, str], settings: CleanConfig, tokenizer: Any = None) -> None:
        spec = TASKS[task]
        self.fields, self.required = spec.fields, spec.required
        self.columns, self.settings, self.tokenizer = columns, settings, tokenizer
        self.seen: set[bytes] = set()
        self.lsh = self.identifier = None
        if settings.near_duplicates:
            from datasketch import MinHashLSH

            self.lsh = MinHashLSH(threshold=settings.near_duplicates, num_perm=NUM_PERM)
        if settings.languages:
            self.identifier = language.identifier()
        self.kept = 0

    def _content(self, values: dict[str, Any]) -> list[str]:
        return [" ".join(_texts(lookup(values, self.columns.get(f, f)))) for f in self.fields]

    def check(self, values: dict[str, Any]) -> str | None:
        """Why the (normalised) row is dropped, or None to keep it (then it counts as kept)."""
        s = self.settings
        if any(not "".join(_texts(lookup(values, self.columns.get(f, f)))).strip() for f in self.required):
            return "empty"
        content = self._content(values)
        if any(_BAD.search(text) for text in content):
            return "control"
        joined = "\n\x1f".join(content)
        digest = hashlib.blake2b(joined.encode(), digest_size=16).digest()
        if s.dedup and digest in self.seen:
            return "duplicate"
        minhash = None
        if self.lsh is not None:
            minhash = _minhash(joined)
            if self.lsh.query(minhash):
                return "near_duplicate"
        if s.min_tokens or s.max_tokens:
            n = len(self.tokenizer(joined, add_special_tokens=False)["input_ids"])
            if s.min_tokens and n < s.min_tokens:
                return "short"
            if s.max_tokens and n > s.max_tokens:
                return "long"
        if self.identifier is not None:
            language, p = self.identifier.classify(" ".join(content))
            if language not in s.languages and p >= s.language_confidence:
                return "language"
        self.seen.add(digest)
        if minhash is not None:
            self.lsh.insert(str(self.kept), minhash)
        self.kept += 1
        return None


@functools.cache
def _template() -> Any:
    from datasketch import MinHash

    return MinHash(num_perm=NUM_PERM, seed=1)


def _minhash(text: str) -> Any:
    from datasketch import MinHash

    words = text.lower().split()
    if len(words) >= 8:
        shingles = {" ".join(words[i:i + 3]) for i in range(len(words) - 2)}
    else:
        flat = " ".join(words)
        shingles = {flat[i:i + 5] for i in range(max(len(flat) - 4, 1))}
    template = _template()  # its permutations are the same for every row: made once
    m = MinHash(num_perm=NUM_PERM, seed=1, permutations=template.permutations, scheme=template.scheme)
    m.update_batch([s.encode() for s in shingles])
    return m


def _preview(values: dict[str, Any], limit: int = 80) -> str:
    text = " | ".join(t for t in _texts(values) if t)
    text = text.encode("unicode_escape").decode("ascii") if _BAD.search(text) else text.replace("\n", " ")
    return text[:limit] + ("..." if len(text) > limit else "")


def _lines(path: Path) -> int | None:
    """Lines in a plain-text file (fast: counts newlines in 1 MiB blocks), for the ETA; None for others."""
    if path.suffix.lower() not in (".jsonl", ".csv", ".tsv", ".txt"):
        return None
    n = 0
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            n += block.count(b"\n")
    return n


def clean_rows(rows: Iterator[RawRow], cleaner: Cleaner, report: CleanReport) -> Iterator[RawRow]:
    """The rows `cleaner` keeps, normalised, counting into `report`."""
    for row in rows:
        report.rows_read += 1
        values = normalise(row.values)
        reason = cleaner.check(values)
        if reason is None:
            report.kept += 1
            report.normalised += values != row.values
            yield RawRow(values, row.where)
            continue
        report.dropped[reason] += 1
        shown = report.examples.setdefault(reason, [])
        if len(shown) < EXAMPLES:
            shown.append({"where": row.where, "text": _preview(row.values)})


def clean_file(source: str, out: Path, task: str, columns: dict[str, str], settings: CleanConfig,
               tokenizer: Any = None, say: Callable[[str], None] = print, split: str = "train",
               every: float = 10.0) -> CleanReport:
    """Clean `source` (a file, sample or hub id) into `out` (JSONL) and `out`.report.json; print progress
    every `every` seconds (rows, rows/s, ETA where the row count can be known)."""
    if (settings.min_tokens or settings.max_tokens) and tokenizer is None:
        raise ConfigError(Problem("--min-tokens/--max-tokens", "token limits need a tokenizer to count with",
                                  fix="add --tokenizer NAME_OR_PATH (the model you will train)"))
    path = Path(source)
    if out.resolve() == path.resolve() if path.exists() else False:
        raise ConfigError(Problem("--out", f"'{out}' is the input file", fix="write the cleaned rows to a new file"))
    total = _lines(path) if path.is_file() else None
    # A task field with no column would drop every row as empty: say so, with the mapping, instead.
    check_columns(task, columns, list(itertools.islice(iter_rows(source, split, "IN"), 1000)), source,
                  "--column", "--task")
    rows = iter_rows(source, split, "IN")
    cleaner = Cleaner(task, columns, settings, tokenizer)
    report = CleanReport(source)
    started = last = time.time()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for row in clean_rows(rows, cleaner, report):
                f.write(json.dumps(row.values, ensure_ascii=False) + "\n")
                now = time.time()
                if now - last >= every:
                    last = now
                    rate = report.rows_read / (now - started)
                    eta = f", eta {rundir.duration((total - report.rows_read) / rate)}" if total and rate else ""
                    done = f"/{total:,}" if total else ""
                    say(f"clean {report.rows_read:,}{done} rows | {report.kept:,} kept | {rate:,.0f} rows/s{eta}")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    report.seconds = time.time() - started
    rundir.write_atomic(out.with_name(out.name + ".report.json"), json.dumps(report.to_dict(), indent=2,
                                                                            ensure_ascii=False) + "\n")
    return report


class RecipeCleaning:
    """A recipe's `data.clean` as a step on its training rows (before data.weights mixes the sources):
    calling it keeps the clean rows (all of them when data.clean is off); `reasons` says what went."""

    def __init__(self, d: DataConfig, tokenizer: Any, source: str) -> None:
        self.d, self.tokenizer, self.source = d, tokenizer, source
        self.report: CleanReport | None = None

    def __call__(self, rows: list[RawRow]) -> list[RawRow]:
        return list(self.stream(iter(rows))) if self.d.clean else rows

    def stream(self, rows: Iterator[RawRow]) -> Iterator[RawRow]:
        """The same on rows as they are read (data.streaming): each call is a new pass with its own memory
        of what it kept (so a source read again is not all duplicates); the report adds up every pass."""
        if not self.d.clean:
            return rows
        settings = self.d.clean if isinstance(self.d.clean, CleanConfig) else CleanConfig()
        self.report = self.report or CleanReport(self.source)
        return clean_rows(rows, Cleaner(self.d.task, self.d.columns, settings, self.tokenizer), self.report)

    def reasons(self) -> Counter:
        """What data.clean dropped, by reason (empty when it is off)."""
        return self.report.reasons() if self.report is not None else Counter()
