"""The task table: each task's fields and how a row becomes a prompt and a completion.

One row per task, readable in one screen. `prompt` renders the plain-template prompt (used when the
tokenizer has no chat template); `user` renders the user message (used with a chat template).
The completion is always the `target` field. Optional fields may be empty.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

Row = dict[str, str]

LANGUAGES = {
    "en": "English", "de": "German", "fr": "French", "es": "Spanish", "it": "Italian", "pt": "Portuguese",
    "nl": "Dutch", "ru": "Russian", "zh": "Chinese", "ja": "Japanese", "ko": "Korean", "ar": "Arabic",
    "cs": "Czech", "pl": "Polish", "tr": "Turkish", "hi": "Hindi", "sv": "Swedish", "uk": "Ukrainian",
}


def _lang(code: str) -> str:
    return LANGUAGES.get(code.strip().lower(), code.strip())


def _qa(row: Row, labels: list[str]) -> str:
    if row.get("context"):
        return (f"Answer the question using the context.\n\nContext: {row['context']}\n\n"
                f"Question: {row['question']}")
    return f"Answer the question.\n\nQuestion: {row['question']}"


def _summarization(row: Row, labels: list[str]) -> str:
    return f"Summarize the document.\n\nDocument: {row['document']}"


def _translation(row: Row, labels: list[str]) -> str:
    src, tgt = row.get("source_lang"), row.get("target_lang")
    if src and tgt:
        return f"Translate from {_lang(src)} to {_lang(tgt)}.\n\n{_lang(src)}: {row['source']}"
    if tgt:
        return f"Translate to {_lang(tgt)}.\n\nText: {row['source']}"
    return f"Translate the text.\n\nText: {row['source']}"


def _generation(row: Row, labels: list[str]) -> str:
    if row.get("input"):
        return f"{row['instruction']}\n\nInput: {row['input']}"
    return row["instruction"]


def _prompt(row: Row, labels: list[str]) -> str:
    return row["prompt"]


def _sentiment(row: Row, labels: list[str]) -> str:
    choices = ", ".join(labels[:-1]) + f" or {labels[-1]}" if len(labels) > 1 else labels[0]
    return f"Classify the sentiment of the text as {choices}.\n\nText: {row['text']}"


@dataclass(frozen=True)
class TaskSpec:
    """How one task reads its rows. `fields` lists required fields first, then optional ones."""

    name: str
    kind: Literal["prompt_completion", "text", "chat", "preference", "unpaired"]
    fields: tuple[str, ...]
    required: tuple[str, ...]
    target: str | None = None
    """The field that is the completion (supervised)."""
    user: Callable[[Row, list[str]], str] | None = None
    """Renders the request: the user message with a chat template, the prompt body without one."""
    cue: str = ""
    """Plain template only: the line that ends the prompt, e.g. `Answer:`; the completion follows a space."""
    long_fields: tuple[str, ...] = ()
    """Input fields that `data.truncation: input` may shorten, in order, to fit the completion whole."""


TASKS: dict[str, TaskSpec] = {
    "qa": TaskSpec("qa", "prompt_completion", ("question", "answer", "context"), ("question", "answer"),
                   target="answer", user=_qa, cue="Answer:", long_fields=("context",)),
    "summarization": TaskSpec("summarization", "prompt_completion", ("document", "summary"), ("document", "summary"),
                              target="summary", user=_summarization, cue="Summary:",
                              long_fields=("document",)),
    "translation": TaskSpec("translation", "prompt_completion", ("source", "target", "source_lang", "target_lang"),
                            ("source", "target"), target="target", user=_translation, cue="Translation:",
                            long_fields=("source",)),
    "generation": TaskSpec("generation", "prompt_completion", ("instruction", "output", "input"),
                           ("instruction", "output"), target="output", user=_generation, cue="Response:",
                           long_fields=("input", "instruction")),
    "sentiment": TaskSpec("sentiment", "prompt_completion", ("text", "label"), ("text", "label"),
                          target="label", user=_sentiment, cue="Sentiment:", long_fields=("text",)),
    "text": TaskSpec("text", "text", ("text",), ("text",)),
    "chat": TaskSpec("chat", "chat", ("messages",), ("messages",)),
    # Preference data (stages dpo and kto): a prompt and completions judged better or worse. `chosen` and
    # `rejected` may also be whole conversations (lists of messages ending in the assistant's reply).
    "preference": TaskSpec("preference", "preference", ("chosen", "rejected", "prompt"), ("chosen", "rejected"),
                           user=_prompt, cue="Response:"),
    "unpaired": TaskSpec("unpaired", "unpaired", ("prompt", "completion", "label"), ("prompt", "completion", "label"),
                         target="completion", user=_prompt, cue="Response:"),
}
