"""Trying a model: `adapterkit chat` (a conversation, or one prompt from stdin) and `adapterkit generate`
(completions for a file of prompts), each with the run's own template and stop tokens.

    adapterkit chat runs/s1                          # type a line, the reply streams back; Ctrl-D ends
    echo "a gripping, funny film" | adapterkit chat runs/s1
    adapterkit generate runs/s1 --data prompts.jsonl --out completions.jsonl

A run (adapter, full, soft prompt, 4-bit base) or an exported model directory is loaded as it was trained
(`trained.load_trained`); its format.json says how a row becomes a prompt. A model that adapterkit did not
train is asked with its own chat template, or given the text as it is.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any, TextIO

import torch

from adapterkit import rundir
from adapterkit.config import DataConfig
from adapterkit.data.formatter import Formatter, TemplateRejected
from adapterkit.data.loading import RawRow, read_rows
from adapterkit.data.tasks import TASKS
from adapterkit.errors import DataError, Problem
from adapterkit.evaluation import Progress, generate
from adapterkit.trained import Trained, load_trained

DEFAULT_NEW_TOKENS = {"qa": 32, "sentiment": 8, "summarization": 128, "translation": 128}
"""Generation length by task when not given (as evaluation's); others 256."""


def formatter_of(trained: Trained, task: str | None, columns: dict[str, str] | None = None) -> Formatter:
    """How rows become prompts for this model: its run's format, or for another model the task given,
    asked with the tokenizer's chat template when it has one."""
    if trained.spec is not None:
        if task is not None and task != trained.spec.task:
            raise DataError(Problem("--task", f"'{task}' differs from the task the model was trained on "
                                    f"('{trained.spec.task}')", fix="leave --task out for a run's model"))
        columns = {**trained.spec.columns, **(trained.recipe.data.columns if trained.recipe else {}),
                   **(columns or {})}
        return Formatter(trained.spec, trained.tokenizer, columns)
    if task is None or task not in TASKS:
        raise DataError(Problem("--task", f"{task!r} is not a task" if task else "this model was not trained by "
                                "adapterkit, so its task is not known", fix=f"pass --task, one of: {', '.join(TASKS)}"))
    max_length = min(getattr(trained.model.config, "max_position_embeddings", 2048) or 2048, 4096)
    return Formatter.for_training(DataConfig(task=task, columns=dict(columns or {}), max_length=max_length),
                                  trained.tokenizer, [])


def _placeholder(formatter: Formatter) -> Any:
    """A stand-in for the answer a prompt row does not have (it is cut off again before generating)."""
    return formatter.spec.labels[0] if formatter.task.name == "sentiment" and formatter.spec.labels else "x"


def prompt_ids(formatter: Formatter, values: dict[str, Any]) -> list[int] | str:
    """The prompt of one row as the model was trained to read it (token ids), or why there is none. The
    row needs the task's inputs only; its answer (or the conversation's last assistant turn) is not used."""
    task = formatter.task
    values = dict(values)
    if task.kind == "chat":
        col = formatter.columns.get("messages", "messages")
        messages = list(values.get(col) or [])
        if messages and isinstance(messages[-1], dict) and messages[-1].get("role") != "assistant":
            values[col] = [*messages, {"role": "assistant", "content": "x"}]
    elif task.kind == "text":
        text = values.get(formatter.columns.get("text", "text"))
        return formatter.tokenizer(str(text), add_special_tokens=True).input_ids if text else "empty text"
    else:
        target = "completion" if task.kind in ("preference", "unpaired") else task.target
        if task.kind == "preference":
            for f in ("chosen", "rejected"):
                values.setdefault(formatter.columns.get(f, f), "x")
        elif target is not None:
            values.setdefault(formatter.columns.get(target, target), _placeholder(formatter))
        if task.kind == "unpaired":
            values.setdefault(formatter.columns.get("label", "label"), True)
    fields, reason = formatter.fields(RawRow(values, "prompt"))
    if fields is None:
        return reason or "unusable row"
    try:
        fields, fitted, _ = formatter.fit(fields)
        prompt, _ = formatter.split_for_eval(formatter.record(fields))
    except TemplateRejected as e:
        return f"the chat template rejects the conversation ({e})"
    return prompt if prompt else "empty prompt"


def new_tokens(formatter: Formatter, given: int | None) -> int:
    return given or DEFAULT_NEW_TOKENS.get(formatter.task.name, 256)


def generate_file(path: str, data: str, out: Path, task: str | None = None, columns: dict[str, str] | None = None,
                  max_new_tokens: int | None = None, batch_size: int = 8, limit: int | None = None,
                  say: Callable[..., None] = print) -> dict[str, Any]:
    """Completions for every row of `data`, written to `out` (JSONL: each row's own fields and
    `completion`), atomically. Rows without a usable prompt are skipped and counted."""
    trained = load_trained(path)
    formatter = formatter_of(trained, task, columns)
    rows = read_rows(data, "validation" if trained.recipe is None else trained.recipe.data.eval_split, "--data")
    if limit is not None:
        rows = rows[:limit]
    answers = {formatter.task.target, "chosen", "rejected", "completion", "label"}
    formatter.check_columns(rows, data, "--column", None if trained.spec is not None else "--task", tuple(f for f in formatter.task.required
                                                                    if f not in answers or formatter.task.kind == "chat"))
    kept: list[tuple[RawRow, list[int]]] = []
    skipped: dict[str, int] = {}
    for raw in rows:
        ids = prompt_ids(formatter, raw.values)
        if isinstance(ids, str):
            skipped[ids] = skipped.get(ids, 0) + 1
        else:
            kept.append((raw, ids))
    if not kept:
        reasons = "; ".join(f"{n} {r}" for r, n in skipped.items()) or "no rows"
        raise DataError(Problem(data, f"no row gives a prompt ({reasons})", "--data",
                                fix=f"give the fields of task '{formatter.task.name}' ({', '.join(formatter.task.required)})"
                                    " or map them with --column FIELD=COLUMN"))
    tokens = new_tokens(formatter, max_new_tokens)
    say(f"generate: {len(kept)} prompts ({formatter.task.name}, {formatter.spec.mode} template), up to {tokens} "
        f"new tokens each" + (f"; {sum(skipped.values())} rows skipped" if skipped else ""))
    progress = Progress(say, "generating", len(kept))
    outputs = generate(trained.model, [ids for _, ids in kept], trained.tokenizer, tokens, batch_size, progress,
                       formatter.stop_ids)
    stops = set(formatter.stop_ids)
    lines = []
    for (raw, _), new in zip(kept, outputs):
        text = trained.tokenizer.decode([t for t in new if t not in stops], skip_special_tokens=True).strip()
        lines.append(json.dumps({**raw.values, "completion": text}, ensure_ascii=False))
    out.parent.mkdir(parents=True, exist_ok=True)
    rundir.write_atomic(out, "".join(line + "\n" for line in lines))
    return {"prompts": len(kept), "skipped": skipped, "out": str(out)}


def _streamer(tokenizer: Any, stream: TextIO) -> Any:
    """transformers' TextStreamer writing the reply's text to `stream` as tokens arrive (no stop tokens)."""
    from transformers import TextStreamer

    class Streamer(TextStreamer):
        started = False

        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            if not self.started:  # a plain template puts a space between the cue and the reply
                text = text.lstrip()
                self.started = bool(text)
            stream.write(text + ("\n" if stream_end else ""))
            stream.flush()

    return Streamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


def reply(trained: Trained, formatter: Formatter, history: list[dict[str, str]], line: str, max_new_tokens: int,
          stream: TextIO) -> str:
    """The model's reply to `line` after `history` (chat runs keep the conversation; other tasks take the
    line as their main input, one turn at a time), streamed to `stream` as it is generated."""
    from transformers import GenerationConfig

    task = formatter.task
    if task.kind == "chat":
        values: dict[str, Any] = {formatter.columns.get("messages", "messages"):
                                  [*history, {"role": "user", "content": line}]}
    else:
        field = "prompt" if task.kind in ("preference", "unpaired") else task.required[0]
        values = {formatter.columns.get(field, field): line}
    ids = prompt_ids(formatter, values)
    if isinstance(ids, str):
        raise DataError(Problem("chat", f"the model cannot be asked that: {ids}", fix="type another line"))
    model = trained.model
    dev = next(model.parameters()).device
    stops = formatter.stop_ids
    config = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=max_new_tokens, eos_token_id=stops,
                              pad_token_id=trained.tokenizer.pad_token_id)
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([ids], device=dev), attention_mask=torch.ones(1, len(ids),
                             dtype=torch.long, device=dev), generation_config=config,
                             streamer=_streamer(trained.tokenizer, stream))
    new = out[0, len(ids):].tolist()
    end = next((i for i, t in enumerate(new) if t in stops), len(new))
    return trained.tokenizer.decode(new[:end], skip_special_tokens=True).strip()


def chat(path: str, lines: Iterable[str], stream: TextIO, task: str | None = None, max_new_tokens: int | None = None,
         system: str | None = None, interactive: bool = True) -> list[tuple[str, str]]:
    """A conversation with the model at `path`: each line of `lines` is a user turn (an empty line is
    skipped; `/reset` forgets the conversation). Returns the (line, reply) pairs."""
    trained = load_trained(path)
    formatter = formatter_of(trained, task or ("chat" if trained.spec is None else None))
    if system is not None:
        formatter = Formatter(replace(formatter.spec, system_prompt=system), trained.tokenizer, formatter.columns)
    tokens = new_tokens(formatter, max_new_tokens)
    if interactive:
        what = ("a conversation" if formatter.task.kind == "chat" else
                f"task {formatter.task.name}: each line is its "
                f"'{'prompt' if formatter.task.kind in ('preference', 'unpaired') else formatter.task.required[0]}'")
        stream.write(f"chat with {path} ({what}, {formatter.spec.mode} template); /reset forgets, Ctrl-D ends\n")
        stream.flush()
    history: list[dict[str, str]] = []
    said = []
    for line in lines:
        line = line.strip()
        if not line:
            continue
        if line == "/reset":
            history = []
            stream.write("(conversation reset)\n")
            continue
        if interactive:
            stream.write("model> ")
            stream.flush()
        answer = reply(trained, formatter, history, line, tokens, stream)
        said.append((line, answer))
        if formatter.task.kind == "chat":
            history += [{"role": "user", "content": line}, {"role": "assistant", "content": answer}]
    return said


def stdin_lines(interactive: bool) -> Iterable[str]:
    """Lines typed at a prompt (interactive), or all of stdin as one prompt (a script's pipe)."""
    if not interactive:
        yield sys.stdin.read()
        return
    while True:
        try:
            yield input("you> ")
        except EOFError:
            sys.stdout.write("\n")
            return

