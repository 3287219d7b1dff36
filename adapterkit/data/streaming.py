"""data.streaming: pretraining on a corpus that is read as training goes, never whole.

    adapterkit recipe run pretrain-tiny data.train=HuggingFaceFW/fineweb-edu data.streaming=true \\
        train.max_steps=20000

The rows come from `loading.stream_rows` (a hub id through datasets' streaming mode, a file line by
line, a folder of shards through datasets), are formatted and tokenized in blocks by the same
`encode_rows` as every other run, and reach trl's SFTTrainer as a `datasets.IterableDataset`, which
shuffles them in a buffer and packs them into max_length blocks as it reads. The first rows are read
ahead (stages/sft.py), to check the data and report on it before anything is written.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from typing import Any

from adapterkit.data.formatter import DataReport, Formatter, encode_rows
from adapterkit.data.loading import RawRow

PREVIEW_ROWS = 1000
"""Rows read ahead to check the stream: the data report, the refusals, `adapterkit data preview`..."""
PREVIEW_CHARS = 1_000_000
"""... or fewer, where they hold more text than this (long documents: their examples stay in memory)."""
BLOCK_ROWS = 256
"""Rows formatted together (duplicates are dropped within a block; data.clean drops them across the stream)."""
SHUFFLE_BUFFER = 1000
"""Examples the trainer's order is drawn from (datasets' buffer shuffle, seeded by train.seed)."""
TOKENIZER_CHARS = 200_000_000
"""A scratch model's tokenizer is trained on the stream's first rows, up to this much text."""


def preview(rows: Iterator[RawRow]) -> list[RawRow]:
    """The rows read ahead: the first PREVIEW_ROWS, or fewer where they reach PREVIEW_CHARS of text."""
    return list(itertools.islice(head(rows, PREVIEW_CHARS), PREVIEW_ROWS))


def head(rows: Iterator[RawRow], chars: int = TOKENIZER_CHARS) -> Iterator[RawRow]:
    """The first rows of `rows` holding up to `chars` characters of text values (at least one row)."""
    seen = 0
    for row in rows:
        yield row
        seen += sum(len(v) for v in row.values.values() if isinstance(v, str))
        if seen >= chars:
            return


class TrainStream:
    """data.train as training examples, made while the trainer reads them. Calling it starts the stream
    again from its first row (datasets calls it once per pass, as a generator); `report` counts every
    row read by every pass so far."""

    def __init__(self, rows: Callable[[], Iterator[RawRow]], formatter: Formatter, source: str) -> None:
        self.rows, self.formatter, self.source = rows, formatter, source
        self.report = DataReport(split="train", source=source, streamed=True)

    def __call__(self) -> Iterator[dict]:
        rows = self.rows()
        while block := list(itertools.islice(rows, BLOCK_ROWS)):
            examples, report = encode_rows(block, self.formatter, "train", self.source)
            self.report.add(report)
            yield from examples

    def dataset(self) -> Any:
        """A datasets.IterableDataset of the examples, for trl (which shuffles and packs it)."""
        import datasets

        features = datasets.Features({"input_ids": datasets.List(datasets.Value("int32")),
                                      "labels": datasets.List(datasets.Value("int64"))})
        return datasets.IterableDataset.from_generator(self, features=features)
