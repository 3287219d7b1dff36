"""Full fine-tuning: every weight trains. Nothing to wrap."""

from __future__ import annotations

from typing import Any


def wrap(model: Any, adapter: Any, *, tokenizer_source: str | None = None, checkpointing: bool = False) -> Any:
    model.requires_grad_(True)
    return model
