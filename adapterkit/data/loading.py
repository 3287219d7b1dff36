"""Reading rows from local files, the shipped samples, or the datasets hub.

Local files are read here rather than through `datasets.load_dataset` so that a bad line is
reported as `file:line` with the fix, instead of an Arrow stack trace. Hub ids go to `datasets`.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Iterator

from adapterkit.errors import DataError, Problem, did_you_mean

SAMPLES = Path(str(resources.files("adapterkit.data") / "samples"))
FORMATS = (".jsonl", ".json", ".csv", ".tsv", ".parquet", ".txt")
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


@dataclass
class RawRow:
    """One input row and where it came from (`file:line`), for messages that point at it."""

    values: dict[str, Any]
    where: str
    copy: int = 0
    """data.weights: 0 for a row's first use in the mix, k for its k-th repeat (a repeat is not a duplicate)."""


def resolve_sample(source: str) -> Path:
    """`sample:TASK/SPLIT` -> the shipped file."""
    name = source.removeprefix("sample:")
    task, _, split = name.partition("/")
    folder = SAMPLES / task
    candidates = sorted(folder.glob(f"{split}.*")) if split and folder.is_dir() else []
    if not candidates:
        available = sorted(f"sample:{p.parent.name}/{p.name.split('.')[0]}" for p in SAMPLES.glob("*/*.*"))
        hint = did_you_mean(source, available)
        raise DataError(Problem(source, "no such shipped sample" + (f" ({hint})" if hint else ""),
                                fix=f"use one of: {', '.join(available)}"))
    return candidates[0]


def _open_text(path: Path) -> io.TextIOBase:
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8-sig")
    # utf-8-sig: Excel's "CSV UTF-8" and some JSONL exports start with a byte-order mark, which is not data.
    return open(path, encoding="utf-8-sig", newline="")


def _format_of(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    return suffixes[-1] if suffixes else ""


def _read_jsonl(path: Path) -> Iterator[RawRow]:
    with _open_text(path) as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(Problem(f"{path}:{number}", f"not valid JSON ({e.msg} at column {e.colno}): "
                                        f"{line.strip()[:80]!r}",
                                        fix="each line of a .jsonl file must be one JSON object")) from None
            if not isinstance(value, dict):
                raise DataError(Problem(f"{path}:{number}", f"expected a JSON object, got {type(value).__name__}",
                                        fix='write each row as {"field": "value", ...}'))
            yield RawRow(value, f"{path}:{number}")


def _read_json(path: Path) -> Iterator[RawRow]:
    with _open_text(path) as f:
        try:
            value = json.load(f)
        except json.JSONDecodeError as e:
            raise DataError(Problem(f"{path}:{e.lineno}", f"not valid JSON ({e.msg})",
                                    fix="fix the JSON, or use one object per line in a .jsonl file")) from None
    if isinstance(value, dict) and len(value) == 1 and isinstance(next(iter(value.values())), list):
        value = next(iter(value.values()))  # {"data": [...]}
    if not isinstance(value, list):
        raise DataError(Problem(str(path), f"expected a list of objects, got {type(value).__name__}",
                                fix='write the file as [{"field": "value"}, ...] or use .jsonl'))
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            raise DataError(Problem(f"{path}: item {i}", f"expected an object, got {type(item).__name__}",
                                    fix='write each row as {"field": "value", ...}'))
        yield RawRow(item, f"{path}: item {i}")


def _read_csv(path: Path, delimiter: str) -> Iterator[RawRow]:
    with _open_text(path) as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        try:
            for row in reader:
                if None in row:
                    raise DataError(Problem(f"{path}:{reader.line_num}", "row has more values than the header",
                                            fix="quote values that contain the delimiter"))
                yield RawRow(dict(row), f"{path}:{reader.line_num}")
        except csv.Error as e:
            raise DataError(Problem(f"{path}:{reader.line_num}", f"not valid CSV ({e})",
                                    fix="check quoting on that line")) from None


def _read_parquet(path: Path) -> Iterator[RawRow]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for a broken file
        raise DataError(Problem(str(path), f"not a readable parquet file ({e})", fix="re-export the file")) from None
    for i, row in enumerate(table.to_pylist()):
        yield RawRow(row, f"{path}: row {i}")


def _read_txt(path: Path) -> Iterator[RawRow]:
    """Raw text: one document per paragraph (blank-line separated)."""
    with _open_text(path) as f:
        paragraph: list[str] = []
        start = 1
        for number, line in enumerate(f, start=1):
            if line.strip():
                if not paragraph:
                    start = number
                paragraph.append(line.rstrip("\n"))
            elif paragraph:
                yield RawRow({"text": "\n".join(paragraph)}, f"{path}:{start}")
                paragraph = []
        if paragraph:
            yield RawRow({"text": "\n".join(paragraph)}, f"{path}:{start}")


def _read_hub(source: str, split: str, streaming: bool = False, folder: bool = False) -> Iterator[RawRow]:
    """A hub dataset (or a folder of data files) through `datasets`; loaded here, so that a bad id fails
    before the first row. `streaming`: nothing is downloaded ahead, rows arrive as they are read."""
    import datasets

    what = "a folder of data files" if folder else "a datasets hub id"
    try:
        ds = datasets.load_dataset(source, split=split, streaming=streaming)
    except Exception as e:  # offline, unknown id, unknown split, no data files: all user-fixable
        raise DataError(Problem(source, f"could not load it as {what}, split '{split}' ({type(e).__name__}: "
                                f"{str(e).splitlines()[0] if str(e) else ''})",
                                fix="check the folder holds .jsonl/.json/.csv/.parquet/.txt files" if folder else
                                "check the id, the split (data.train_split / data.eval_split) and the network, "
                                "or pass a local file")) from None
    return _hub_rows(ds, source, split, folder)


def _hub_rows(ds: Any, source: str, split: str, folder: bool) -> Iterator[RawRow]:
    i = -1
    try:
        for i, row in enumerate(ds):
            yield RawRow(dict(row), f"{source}[{split}] row {i}")
    except Exception as e:  # a stream read over the network can fail at any row
        raise DataError(Problem(f"{source}[{split}] row {i + 1}", f"reading the data failed ({type(e).__name__}: "
                                f"{str(e).splitlines()[0] if str(e) else ''})",
                                fix="fix the file it names" if folder else "check the network and run the same "
                                "command again (a run resumes from its last checkpoint)")) from None


def read_rows(source: str | list[str], split: str, key: str) -> list[RawRow]:
    """Read every row of a data source (file, sample, hub id, or a list of them)."""
    if isinstance(source, list):
        return [row for one in source for row in read_rows(one, split, key)]
    return list(iter_rows(source, split, key))


def read_training_rows(source: str | list[str], split: str, weights: list[float] | None, seed: int,
                       prepare: Callable[[list[RawRow]], list[RawRow]] | None = None
                       ) -> tuple[list[RawRow], list[str]]:
    """data.train's rows (through `prepare`, e.g. data.clean, which keeps a subset), and how they were mixed:
    with `weights` (one per source), as many rows as the sources hold together, drawn from each in
    proportion to its weight (without repeats while a source has enough rows, repeated in turn once it
    does not: each repeat marked by `copy`), in a seeded shuffled order."""
    prepare = prepare or (lambda rows: rows)
    if not weights:
        return prepare(read_rows(source, split, "data.train")), []
    import dataclasses
    import random

    sources = [source] if isinstance(source, str) else list(source)
    parts = [read_rows(one, split, "data.train") for one in sources]
    kept = {id(row) for row in prepare([row for part in parts for row in part])}
    parts = [[row for row in part if id(row) in kept] for part in parts]
    total = sum(len(p) for p in parts)
    share = [w / sum(weights) for w in weights]
    counts = [round(s * total) for s in share]
    rng = random.Random(seed)
    rows: list[RawRow] = []
    mixed = []
    for one, part, n, s in zip(sources, parts, counts, share):
        if not part:
            continue
        picked = [dataclasses.replace(row, copy=k) for k in range(n // len(part)) for row in part]
        picked += [dataclasses.replace(row, copy=n // len(part)) for row in rng.sample(part, n % len(part))]
        rows += picked
        repeated = max(0, n - len(part))
        mixed.append(f"{one}: {n} of the mix ({s:.0%}) from {len(part)} rows"
                     + (f", {repeated} repeated" if repeated else f", {len(part) - n} left out" if n < len(part)
                        else ""))
    rng.shuffle(rows)
    return rows, mixed


def stream_rows(source: str | list[str], split: str, weights: list[float] | None, seed: int,
                prepare: Callable[[Iterator[RawRow]], Iterator[RawRow]] | None = None) -> Iterator[RawRow]:
    """data.train read as a stream (data.streaming), each source through `prepare` (e.g. data.clean) as
    it is read. Without `weights` the sources follow each other. With them, each row comes from a source
    drawn with its weight's probability (seeded); a source that runs out starts again (its rows then
    marked by `copy`), and the stream ends once every source has run out at least once."""
    sources = [source] if isinstance(source, str) else list(source)
    prepare = prepare or (lambda rows: rows)

    def opened(i: int) -> Iterator[RawRow]:
        return prepare(iter_rows(sources[i], split, "data.train", streaming=True))

    if not weights:
        for i in range(len(sources)):
            yield from opened(i)
        return
    import dataclasses
    import random

    rng = random.Random(seed)
    rows, passes, read = [opened(i) for i in range(len(sources))], [0] * len(sources), [0] * len(sources)
    ended: set[int] = set()
    while True:
        i = rng.choices(range(len(sources)), weights)[0]
        row = next(rows[i], None)
        if row is None:
            if not read[i]:
                raise DataError(Problem(sources[i], "holds no rows (after data.clean, if it is on)", "data.train",
                                        fix="check the source, or remove it from data.train and data.weights"))
            ended.add(i)
            if len(ended) == len(sources):
                return
            passes[i] += 1
            rows[i] = opened(i)
            row = next(rows[i], None)
            if row is None:  # emptied since its first pass
                continue
        read[i] += 1
        yield dataclasses.replace(row, copy=passes[i]) if passes[i] else row


def iter_rows(source: str, split: str, key: str, streaming: bool = False) -> Iterator[RawRow]:
    """The rows of one data source, one at a time (a file is never read whole; a hub dataset, or a folder
    of data files, which datasets reads, is downloaded or converted first unless `streaming`). Problems
    with the source are raised before the first row."""
    if source.startswith("sample:"):
        path = resolve_sample(source)
    else:
        path = Path(source).expanduser()
        if not path.exists():
            if HUB_ID.fullmatch(source) and _format_of(path) not in FORMATS:
                return _read_hub(source, split, streaming)
            siblings = [p.name for p in path.parent.glob("*")] if path.parent.is_dir() else []
            hint = did_you_mean(path.name, siblings)
            raise DataError(Problem(source, "file not found" + (f" ({hint})" if hint else ""), key,
                                    fix="check the path (relative paths start from the current directory)"))
        if path.is_dir():  # shards of one dataset, as `hf download` or a data pipeline leaves them
            return _read_hub(str(path), split, streaming, folder=True)
        if not path.is_file():  # a FIFO or a device would block, or never end
            raise DataError(Problem(source, "is not a regular file (a pipe, socket or device)", key,
                                    fix="write the data to a file first, then pass that file"))
    fmt = _format_of(path)
    readers = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": lambda p: _read_csv(p, ","),
               ".tsv": lambda p: _read_csv(p, "\t"), ".parquet": _read_parquet, ".txt": _read_txt}
    if fmt not in readers:
        raise DataError(Problem(str(path), f"unsupported file type '{fmt or path.name}'", key,
                                fix=f"use one of {', '.join(FORMATS)} (optionally .gz)"))
    return _reading(readers[fmt](path), path, fmt, key)


def _reading(rows: Iterator[RawRow], path: Path, fmt: str, key: str) -> Iterator[RawRow]:
    try:
        yield from rows
    except UnicodeDecodeError:
        raise DataError(Problem(str(path), "is not UTF-8 text", key,
                                fix=f"save it as UTF-8, or check it really is a {fmt} file")) from None
    except (gzip.BadGzipFile, EOFError):
        raise DataError(Problem(str(path), "is not a readable gzip file", key, fix="re-compress it")) from None
