"""The shared dataset formatter: a task row -> TRL's vocabulary -> token ids with a loss mask.

    row (task fields) --record()--> {"prompt", "completion"} | {"messages"} | {"text"}
                      --encode()--> input_ids, labels (-100 where no loss)

Training, `adapterkit data preview` and evaluation all go through this one class, so the text a
model is trained on and the text it is asked at inference cannot drift apart. The settings that
decide the text (task, mode, template, labels, system prompt) are a `FormatSpec`, saved with the run.

Masking rules: prompt tokens get no loss unless `train_on_prompt`; every completion ends with the
tokenizer's EOS, which is supervised. Labels are built here from segment boundaries, never by
comparing token ids with the pad id, so a pad token equal to EOS cannot mask EOS.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from adapterkit.config import DataConfig
from adapterkit.data.loading import RawRow
from adapterkit.data.tasks import TASKS, TaskSpec
from adapterkit.errors import DataError, Problem, did_you_mean

IGNORE = -100
FOLDED_SYSTEM = "system message folded into the first user turn (the chat template rejects the system role)"
SPLIT_TURNS = ("conversation split into one example per assistant turn (the chat template rewrites earlier turns, "
               "so they do not render as a growing prefix)")


class TemplateRejected(Exception):
    """The chat template cannot render this conversation (it raised, or renders it inconsistently)."""


class _NotGrowing(Exception):
    """The chat template does not render this conversation as a growing prefix."""

# Used for `chat` data when the tokenizer has no chat template; saved with the model so inference
# renders conversations the same way.
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


@dataclass
class FormatSpec:
    """Everything that decides the training text; stored in the run as `format.json`."""

    task: str
    mode: Literal["plain", "chat_template"]
    labels: list[str] = field(default_factory=list)
    template: str | None = None
    system_prompt: str | None = None
    train_on_prompt: bool = False
    max_length: int = 512
    chat_template: str | None = None
    truncation: str = "input"
    """data.truncation: input | end | drop."""
    columns: dict[str, str] = field(default_factory=dict)
    """data.columns the model was trained with: an export (which has no recipe) reads new rows the same way."""

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, ensure_ascii=False)


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    truncated: bool
    length: int = 0
    """Tokens before any cut at max_length."""


@dataclass
class DataReport:
    """What happened to the rows of one split: shown before training and saved with the run."""

    split: str
    source: str
    rows_read: int = 0
    examples: int = 0
    dropped: Counter = field(default_factory=Counter)
    truncated: int = 0
    """Examples cut at max_length (data.truncation: end, and conversations)."""
    inputs_shortened: int = 0
    """Examples whose long input field was shortened so that the completion fits whole (truncation: input)."""
    needed: list[int] = field(default_factory=list, repr=False)
    """The fewest tokens each kept or length-dropped row needs (its input shortened as far as allowed)."""
    eos_supervised: int = 0
    """Examples whose completion ends in a supervised EOS (all of them but the truncated ones)."""
    tokens: int = 0
    supervised_tokens: int = 0
    labels: Counter = field(default_factory=Counter)
    notes: Counter = field(default_factory=Counter)
    """Rows the formatter had to adapt to the chat template, by what it did."""
    cleaned: Counter = field(default_factory=Counter)
    """Rows `data.clean` dropped before formatting, by reason (not in rows_read or max_dropped)."""
    mixed: list[str] = field(default_factory=list)
    """How data.weights mixed the sources, one line each."""
    streamed: bool = False
    """data.streaming: these are the first rows of the stream, read ahead to check it (or, after training,
    every row the run read)."""

    def summary(self) -> str:
        dropped = sum(self.dropped.values())
        cut = f", {self.inputs_shortened} inputs shortened to fit" if self.inputs_shortened else ""
        # Preference data is tokenized (and fitted into max_length) by the trainer, after this is first shown.
        truncated = f", {self.truncated} truncated" if self.tokens or self.truncated else ""
        what = "first rows streamed" if self.streamed else "rows"
        text = (f"{self.split}: {self.rows_read} {what} from {self.source} -> {self.examples} examples "
                f"({dropped} dropped{truncated}{cut})")
        if self.tokens:  # preference data is tokenized by trl, so it has no token counts here
            text += (f", {self.tokens:,} tokens ({self.supervised_tokens:,} supervised; EOS supervised in "
                     f"{self.eos_supervised} rows)")
        for reason, n in sorted(self.dropped.items()):
            text += f"\n    dropped {n}: {reason}"
        for note, n in sorted(self.notes.items()):
            text += f"\n    {n} rows: {note}"
        for line in self.mixed:
            text += f"\n    mixed: {line}"
        for reason, n in self.cleaned.items():
            text += f"\n    data.clean dropped {n} first: {reason}"
        if self.labels:
            text += "\n    labels: " + ", ".join(f"{k} {v}" for k, v in sorted(self.labels.items()))
        return text

    def add(self, other: DataReport) -> None:
        """Count `other` (a later part of the same stream) in too; lengths (`needed`) are not kept."""
        for name in ("rows_read", "examples", "truncated", "inputs_shortened", "eos_supervised", "tokens",
                     "supervised_tokens"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for name in ("dropped", "labels", "notes"):
            getattr(self, name).update(getattr(other, name))

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["dropped"], out["labels"], out["notes"] = dict(self.dropped), dict(self.labels), dict(self.notes)
        out["cleaned"] = dict(self.cleaned)
        out.pop("needed")
        return out

    def max_length_keeping(self, share: float) -> int | None:
        """The smallest max_length at which `share` of the rows measured would fit (None: none measured)."""
        if not self.needed:
            return None
        ordered = sorted(self.needed)
        return ordered[min(len(ordered) - 1, max(0, math.ceil(share * len(ordered)) - 1))]


REPLY_CUES = frozenset({"assistant", "ai", "bot", "chatbot", "gpt", "model", "response", "answer", "reply", "output",
                        "a"})
"""Speaker names and answer labels that end a prompt written for its reply ("...\n\nAssistant:" in HH-RLHF)."""

OWN_CUE = "prompt ends in its own reply cue (such as 'Assistant:'), so no template cue was added"


def ends_in_cue(text: str) -> bool:
    """Whether the last line of `text` is a reply cue such as 'Assistant:' or '### Response:'."""
    last = text.rstrip().rsplit("\n", 1)[-1].strip().lstrip("#").strip()
    return last.endswith(":") and last[:-1].strip().lower() in REPLY_CUES


def lookup(values: dict[str, Any], column: str) -> Any:
    """A row's value for `column`: the column itself, else a dotted path into nested fields
    (`answers.text`, `meta.0.title`: a number indexes a list). None when there is no such value."""
    if column in values or "." not in column:
        return values.get(column)
    node: Any = values
    for part in column.split("."):
        if isinstance(node, dict):
            node = node.get(part)
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return None
    return node


def _text(value: Any) -> str | None:
    """A field value as text; None when missing. Numbers and booleans are accepted as their text; a list
    gives its first item and a {text: ...} record its text (SQuAD's `answers`), where one text is needed."""
    if isinstance(value, dict) and "text" in value:
        value = value["text"]
    if isinstance(value, list):
        value = value[0] if value else None
    if value is None:
        return None
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, str):
        return value
    return None


class Formatter:
    """Turns rows of one task into records and token ids, with one fixed `FormatSpec`."""

    def __init__(self, spec: FormatSpec, tokenizer: Any, columns: dict[str, str] | None = None):
        self.spec = spec
        self.task: TaskSpec = TASKS[spec.task]
        self.tokenizer = tokenizer
        self.columns = dict(columns or {})
        if spec.chat_template:
            tokenizer.chat_template = spec.chat_template
        if tokenizer.eos_token_id is None:
            raise DataError(Problem("tokenizer", "has no EOS token, so completions could not be ended",
                                    fix="use a tokenizer with an eos_token"))
        with_special = tokenizer("a").input_ids
        without = tokenizer("a", add_special_tokens=False).input_ids
        # Tokens the tokenizer puts in front of plain text (usually BOS); kept in plain mode.
        self.prefix_ids = with_special[: len(with_special) - len(without)] if with_special[-len(without):] == without else []
        self.notes: Counter = Counter()
        self.folds_system = False
        self.end_of_turn: int | None = None
        """The special token that closes an assistant turn in the chat template, when it is not EOS
        (Gemma's <end_of_turn>, Phi-3's <|end|>, Llama 3's <|eot_id|>): supervised, and a stop token."""
        if spec.mode == "chat_template" and getattr(tokenizer, "chat_template", None):
            self.folds_system = self._rejects_system()
            self.end_of_turn = self._end_of_turn()

    @property
    def stop_ids(self) -> list[int]:
        """Token ids that end a reply: EOS, and the template's end-of-turn token if it has its own."""
        eos = self.tokenizer.eos_token_id
        return [eos] + ([self.end_of_turn] if self.end_of_turn is not None else [])

    def _rejects_system(self) -> bool:
        """Whether the chat template refuses a system message but renders the same conversation without it
        (Gemma's templates raise 'System role not supported')."""
        from jinja2 import TemplateError

        probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
        try:
            self.tokenizer.apply_chat_template([{"role": "system", "content": "Be brief."}, *probe], tokenize=False)
            return False
        except TemplateError:
            pass
        try:
            self.tokenizer.apply_chat_template(probe, tokenize=False)
        except TemplateError as e:
            raise DataError(Problem("chat template", f"cannot render a plain user/assistant exchange: {e}",
                                    fix="use a tokenizer whose chat template renders user and assistant turns")) from None
        return True

    def _end_of_turn(self) -> int | None:
        """The first special token the template puts after an assistant reply, if it is not EOS."""
        user = [{"role": "user", "content": "Hi"}]
        try:
            before = self._render(user, generation_prompt=True)
            after = self._render(user + [{"role": "assistant", "content": "Hello"}])
        except TemplateRejected:
            return None
        if not after.startswith(before):
            return None
        tok = self.tokenizer
        special = set(tok.all_special_ids) | {i for i, t in tok.added_tokens_decoder.items() if t.special}
        tail = after[len(before):]
        tail = tail[tail.find("Hello") + len("Hello"):] if "Hello" in tail else tail
        for i in tok(tail, add_special_tokens=False).input_ids:
            if i in special:
                return None if i == tok.eos_token_id else i
        return None

    @classmethod
    def for_training(cls, cfg: DataConfig, tokenizer: Any, labels: list[str], conversational: bool = False
                     ) -> "Formatter":
        """Pick the mode from the tokenizer: its chat template if it has one, else the plain template.
        Conversations (chat data, or preference pairs given as conversations) always use a chat template."""
        task = TASKS[cfg.task]
        has_template = bool(getattr(tokenizer, "chat_template", None))
        conversational = conversational or task.kind == "chat"
        chat_template = None
        if conversational and not has_template:
            chat_template = FALLBACK_CHAT_TEMPLATE
        mode = "chat_template" if (has_template or conversational) and task.kind != "text" else "plain"
        spec = FormatSpec(task=cfg.task, mode=mode, labels=labels, template=cfg.template,
                          system_prompt=cfg.system_prompt, train_on_prompt=cfg.train_on_prompt,
                          max_length=cfg.max_length, chat_template=chat_template, truncation=cfg.truncation,
                          columns=dict(cfg.columns))
        return cls(spec, tokenizer, cfg.columns)

    # -- rows -> task fields -------------------------------------------------------------------

    def column(self, field: str, values: dict[str, Any] | set[str]) -> str:
        """The column a field is read from (see `column_of`)."""
        return column_of(self.columns, field, values)

    def check_columns(self, rows: list[RawRow], source: str, option: str = "data.columns",
                      task_option: str | None = "data.task", required: tuple[str, ...] | None = None) -> None:
        """Fail early, with the columns that do exist, when a required field has no column (see
        `check_columns`)."""
        check_columns(self.task.name, self.columns, rows, source, option, task_option, required)

    def fields(self, raw: RawRow) -> tuple[dict[str, Any] | None, str | None]:
        """The task fields of a row, or (None, reason) when the row must be dropped."""
        if self.task.kind == "preference":
            conversation = _split_conversations(*(lookup(raw.values, self.column(f, raw.values))
                                                  for f in ("chosen", "rejected")))
            if conversation is not None:
                return conversation
        out: dict[str, Any] = {}
        for f in self.task.fields:
            value = lookup(raw.values, self.column(f, raw.values))
            if self.task.kind == "unpaired" and f == "label":
                label = _judgement(value)
                if label is None:
                    return None, "label is not true or false"
                out[f] = label
                continue
            if f == "messages":
                shared = _sharegpt(value)
                if shared is not None:
                    value = shared
                    self.notes[SHAREGPT] += 1
                if not _valid_messages(value):
                    return None, ("messages are not a list of {role, content} (or ShareGPT's {from, value}) with "
                                  "an assistant turn")
                out[f] = [{"role": m["role"], "content": m["content"]} for m in value]
                continue
            text = _text(value)
            if isinstance(value, (list, dict)) and text is not None:
                self.notes[FIRST_ITEM.format(field=f)] += 1
            if f in self.task.required:
                if text is None:
                    return None, f"missing or non-text '{f}'"
                if not text.strip():
                    return None, f"empty '{f}'"
            out[f] = (text or "").strip() if f != "text" else text
        if self.task.kind == "preference" and not out.get("prompt"):
            return None, "missing or empty 'prompt' (or give chosen and rejected as conversations)"
        if self.task.name == "sentiment" and self.spec.labels and out["label"] not in self.spec.labels:
            return None, f"label not in the label set ({', '.join(self.spec.labels)})"
        return out, None

    # -- fitting long inputs into max_length ------------------------------------------------------

    MARK = "…"
    """Put where a shortened input was cut."""

    def fit(self, fields: dict[str, Any], length: int | None = None) -> tuple[dict[str, Any], str, int | None]:
        """(fields, what happened, fewest tokens the row needs) for `data.truncation: input`.

        What happened: "fits" (unchanged), "shortened" (a long input field was cut so that the example,
        completion whole, fits max_length) or "too_long" (even with the input fields cut away the
        completion does not fit; the row should be dropped). Other truncation settings, and tasks
        without long input fields, return the fields unchanged ("fits") with their full length.
        `length`: the row's length in tokens, when the caller has already encoded it."""
        if not self.task.long_fields:  # chat, text, preference data: nothing to shorten, nothing to measure
            return fields, "fits", None
        length = self._length(fields) if length is None else length
        limit = self.spec.max_length
        if length <= limit or self.spec.truncation != "input":
            return fields, "fits", length
        out = dict(fields)
        for name in self.task.long_fields:
            text = out.get(name) or ""
            if not text:
                continue
            ids = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            offsets = ids["offset_mapping"]
            keep = len(offsets) - (length - limit) - 2  # room for the marks
            for _ in range(4):  # tokens of a cut text do not add up exactly: adjust to the real length
                out[name] = self._window(text, offsets, max(keep, 0), out) if keep > 0 else self.MARK
                length = self._length(out)
                if length <= limit or keep <= 0:
                    break
                keep -= length - limit
            if length <= limit:
                return out, "shortened", length
        return fields, "too_long", length  # with every long field cut to its mark: the fewest it needs

    def _window(self, text: str, offsets: list[tuple[int, int]], keep: int, fields: dict[str, Any]) -> str:
        """`keep` tokens of `text` with "…" where it was cut: its start, or for a QA context the part
        around the answer when the answer occurs in it."""
        start = 0
        answer = fields.get("answer") if self.task.name == "qa" else None
        at = text.find(answer) if answer else -1
        if at >= 0:
            first = next((i for i, (a, b) in enumerate(offsets) if b > at), 0)
            start = max(0, min(first - keep // 2, len(offsets) - keep))
        end = min(len(offsets), start + keep)
        piece = text[offsets[start][0]:offsets[end - 1][1]]
        return (self.MARK if start > 0 else "") + piece + (self.MARK if end < len(offsets) else "")

    def _length(self, fields: dict[str, Any]) -> int:
        return sum(len(piece) for piece, _ in self._pieces(self.record(fields)))

    # -- task fields -> TRL vocabulary -----------------------------------------------------------

    def record(self, row: dict[str, Any]) -> dict[str, Any]:
        """TRL's dataset vocabulary: prompt/completion (text or messages), messages, or text."""
        kind = self.task.kind
        if kind == "text":
            return {"text": row["text"]}
        if kind == "chat":
            messages = list(row["messages"])
            if self.spec.system_prompt and messages[0]["role"] != "system":
                messages.insert(0, {"role": "system", "content": self.spec.system_prompt})
            return {"messages": self._fold(messages)}
        prompt, reply = self._prompt(row)
        if kind == "preference":
            return {"prompt": prompt, "chosen": reply(row["chosen"]), "rejected": reply(row["rejected"])}
        if kind == "unpaired":
            return {"prompt": prompt, "completion": reply(row["completion"]), "label": row["label"]}
        return {"prompt": prompt, "completion": reply(row[self.task.target])}

    def _prompt(self, row: dict[str, Any]) -> tuple[Any, Any]:
        """(prompt, a function that renders a reply to it): messages with a chat template, else text."""
        if isinstance(row.get("prompt"), list):  # a conversation (preference rows given as conversations)
            messages = list(row["prompt"])
        elif self.spec.mode == "chat_template":
            messages = [{"role": "user", "content": self._user_text(row)}]
        else:
            prompt = self._user_text(row)
            prompt = prompt if self.spec.template or ends_in_cue(prompt) else f"{prompt}\n{self.task.cue}"
            if self.spec.system_prompt:
                prompt = f"{self.spec.system_prompt}\n\n{prompt}"
            sep = "" if prompt[-1:].isspace() else " "
            return prompt, lambda text: sep + text
        if self.spec.system_prompt and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": self.spec.system_prompt})
        return self._fold(messages), lambda text: [{"role": "assistant", "content": text}]

    def keeps_own_cue(self, row: dict[str, Any]) -> bool:
        """Whether this row's text prompt already ends in a reply cue, so that no template cue is added."""
        return (self.spec.mode != "chat_template" and not self.spec.template and not isinstance(row.get("prompt"), list)
                and ends_in_cue(self._user_text(row)))

    def _fold(self, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Messages the template can render: where it rejects the system role, each system message is
        put in front of the next user message (or becomes a user message if none follows)."""
        if not self.folds_system or not any(m["role"] == "system" for m in messages):
            return messages
        out: list[dict[str, Any]] = []
        pending: list[str] = []
        for m in messages:
            if m["role"] == "system":
                pending.append(m["content"])
            elif m["role"] == "user" and pending:
                out.append({"role": "user", "content": "\n\n".join([*pending, m["content"]])})
                pending = []
            else:
                if pending:
                    out.append({"role": "user", "content": "\n\n".join(pending)})
                    pending = []
                out.append(m)
        if pending:
            out.append({"role": "user", "content": "\n\n".join(pending)})
        return out

    def split_for_eval(self, record: dict[str, Any]) -> tuple[list[int], list[int]]:
        """(prompt ids, reference ids) of a record, the prompt tokenized exactly as in training.

        The reference is the last supervised piece (the completion, or the last assistant turn) with
        its EOS; everything before it is the prompt. Raw text is split in the middle of its tokens."""
        if "messages" in record:  # the last assistant turn is the reference, everything before it the prompt
            messages = record["messages"]
            last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
            record = {"prompt": messages[:last], "completion": [messages[last]]}
        pieces = self._pieces(record)
        if "text" in record:
            ids = [i for piece, _ in pieces for i in piece]
            ids = ids[: self.spec.max_length]
            cut = len(ids) // 2
            return ids[:cut], ids[cut:]
        last = max(i for i, (_, supervised) in enumerate(pieces) if supervised)
        return [i for piece, _ in pieces[:last] for i in piece], pieces[last][0]

    def prompt_text(self, row: dict[str, Any]) -> str:
        """The exact text a model is given at inference for this row (used by evaluation)."""
        rec = self.record(row)
        if self.spec.mode == "plain":
            return rec["prompt"]
        return self._render(rec["prompt"], generation_prompt=True)

    def _user_text(self, row: dict[str, Any]) -> str:
        if self.spec.template:
            return self.spec.template.format(**{f: row.get(f) or "" for f in self.task.fields})
        return self.task.user(row, self.spec.labels)

    # -- TRL vocabulary -> segments -> token ids -------------------------------------------------

    def segments(self, record: dict[str, Any]) -> list[tuple[str, bool]]:
        """The record as text pieces, each marked supervised (True) or not. A preference pair reads as
        its prompt and chosen reply (what evaluation and the export's parity check use)."""
        if "chosen" in record:
            record = {"prompt": record["prompt"], "completion": record["chosen"]}
        if "text" in record:
            return [(record["text"], True)]
        if self.spec.mode == "plain":
            return [(record["prompt"], False), (record["completion"], True)]
        if "messages" in record:
            return self._chat_segments(record["messages"])
        # A conversational prompt and its reply: only the reply is supervised, as it follows the prompt
        # rendered with the generation prompt (exactly what the model is given at inference).
        before = self._render(record["prompt"], generation_prompt=True)
        after = self._render(record["prompt"] + record["completion"])
        if not after.startswith(before):
            raise TemplateRejected("it renders the reply's turn differently from the prompt with "
                                   "add_generation_prompt, so the reply cannot be located")
        return [(text, sup) for text, sup in [(before, False), (after[len(before):], True)] if text]

    def examples(self, record: dict[str, Any]) -> list[dict[str, Any]]:
        """The training examples of one record: itself, or, for a conversation the chat template does not
        render as a growing prefix (Qwen3 drops earlier turns' reasoning, Phi-3 ends a conversation with
        EOS), one prompt/completion example per assistant turn, each rendered as at inference."""
        if "messages" not in record or self.spec.mode != "chat_template":
            return [record]
        try:
            self._chat_segments(record["messages"])
            return [record]
        except _NotGrowing:
            pass
        self.notes[SPLIT_TURNS] += 1
        messages = record["messages"]
        return [{"prompt": messages[:i], "completion": [m]} for i, m in enumerate(messages)
                if m["role"] == "assistant" and i > 0]

    def _render(self, messages: list[dict[str, Any]], generation_prompt: bool = False) -> str:
        from jinja2 import TemplateError

        try:
            return self.tokenizer.apply_chat_template(self._fold(messages), tokenize=False,
                                                      add_generation_prompt=generation_prompt)
        except TemplateError as e:
            raise TemplateRejected(str(e)) from None

    def _chat_segments(self, messages: list[dict[str, str]]) -> list[tuple[str, bool]]:
        """Every assistant turn supervised, found by rendering the conversation turn by turn: the text
        up to a turn with the generation prompt, then with the turn. Raises _NotGrowing if the template
        does not render the conversation as a growing prefix."""
        segments: list[tuple[str, bool]] = []
        done = ""
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = self._render(messages[:i], generation_prompt=True)
            after = self._render(messages[: i + 1])
            if not before.startswith(done) or not after.startswith(before):
                raise _NotGrowing()
            segments += [(before[len(done):], False), (after[len(before):], True)]
            done = after
        return [(text, sup) for text, sup in segments if text]

    def _pieces(self, record: dict[str, Any]) -> list[tuple[list[int], bool]]:
        """The record's token ids, one piece per segment (plus the plain-mode prefix), each marked
        supervised or not. Every supervised piece ends with EOS."""
        tok = self.tokenizer
        eos = tok.eos_token_id
        pieces = [(list(self.prefix_ids), False)] if self.spec.mode == "plain" and self.prefix_ids else []
        for text, supervised in self.segments(record):
            piece = tok(text, add_special_tokens=False).input_ids
            if supervised and not any(i in piece for i in self.stop_ids):
                piece = piece + [eos]
            pieces.append((piece, supervised))
        return pieces

    def encode(self, record: dict[str, Any]) -> Encoded:
        """Token ids and labels for one record, cut at max_length."""
        ids: list[int] = []
        labels: list[int] = []
        for piece, supervised in self._pieces(record):
            ids += piece
            labels += piece if (supervised or self.spec.train_on_prompt) else [IGNORE] * len(piece)
        limit = self.spec.max_length
        truncated = len(ids) > limit and "text" not in record
        length = len(ids)
        if truncated and self.spec.truncation == "drop" and "messages" not in record:
            return Encoded([], [], True, length)
        if truncated:
            ids, labels = ids[:limit], labels[:limit]
        return Encoded(ids, labels, truncated, length)


def _split_conversations(chosen: Any, rejected: Any) -> tuple[dict[str, Any] | None, str | None] | None:
    """Preference rows whose chosen and rejected are whole conversations: (fields, None) with the shared
    turns as the prompt, (None, reason) if they do not fit that form, or None if they are plain text."""
    if not isinstance(chosen, list) and not isinstance(rejected, list):
        return None
    if not (_valid_messages(chosen) and _valid_messages(rejected)):
        return None, "chosen/rejected conversations are not lists of {role, content} with an assistant turn"
    if chosen[-1]["role"] != "assistant" or rejected[-1]["role"] != "assistant":
        return None, "chosen/rejected conversations do not end with the assistant's reply"
    if chosen[:-1] != rejected[:-1]:
        return None, "chosen and rejected conversations differ before the last reply"
    if not chosen[-1]["content"].strip() or not rejected[-1]["content"].strip():
        return None, "empty chosen or rejected reply"
    prompt = [{"role": m["role"], "content": m["content"]} for m in chosen[:-1]]
    return {"prompt": prompt, "chosen": chosen[-1]["content"].strip(), "rejected": rejected[-1]["content"].strip()}, None


_TRUE, _FALSE = {"true", "1", "yes", "good", "desirable"}, {"false", "0", "no", "bad", "undesirable"}


def check_columns(task_name: str, columns: dict[str, str], rows: list[RawRow], source: str,
              option: str = "data.columns", task_option: str | None = "data.task",
              required: tuple[str, ...] | None = None) -> None:
    """Fail early, with the columns that do exist, when a required field has no column. `option` is how
    the command being run maps a field to a column (`data.columns` in a recipe, `--column` on the
    command line), `task_option` how it names the task (None: the task is the model's own)."""
    task = TASKS[task_name]
    present: set[str] = set()
    for row in rows[:1000]:
        present.update(row.values)
    missing = [f for f in (task.required if required is None else required)
               if column_of(columns, f, present).split(".")[0] not in present]
    if not missing:
        return
    problems = []
    claimed = {columns.get(f, f) for f in task.fields}
    # A column that no other field uses is a candidate only if its values have the field's kind
    # (a conversation for messages, text for the rest): `label=messages` would be no help.
    unclaimed = [c for c in sorted(present - claimed) if all(_kind_fits(f, r.values.get(c)) for f in missing
                                                               for r in rows[:20] if c in r.values)]
    other = next((t.name for t in TASKS.values() if t.name != task.name and t.kind != "text"
                  and set(t.required) <= present), None)
    suggested: set[str] = set()
    for f in missing:
        col = columns.get(f, f)
        guess = did_you_mean(col, sorted(present))
        # A close name, else the one column no other field uses (once), else a placeholder.
        free = [c for c in unclaimed if c not in suggested]
        suggestion = guess.split("'")[1] if guess else free[0] if len(unclaimed) == 1 and free else "YOUR_COLUMN"
        suggested.add(suggestion)
        mapping = f"--column {f}={suggestion}" if option == "--column" else f"{option}.{f}={suggestion}"
        fix = f"map it with {mapping}"
        if other is not None and suggestion == "YOUR_COLUMN":
            theirs = f"these rows have the fields of task '{other}' ({', '.join(TASKS[other].required)})"
            fix = (f"{theirs}, not those of '{task.name}', the task this model was trained on: give it "
                   f"{task.name} rows" if task_option is None else
                   f"{theirs}: use {task_option}{' ' if task_option.startswith('--') else '='}{other}, or {fix}")
        problems.append(Problem(source, f"task '{task.name}' needs field '{f}', but there is no column "
                                f"'{col}' (columns: {', '.join(sorted(present)) or 'none'})",
                                f"{option} {f}" if option == "--column" else f"{option}.{f}", fix))
    raise DataError(problems)


def column_of(columns: dict[str, str], field: str, values: dict[str, Any] | set[str]) -> str:
    """The column a field is read from: data.columns, else the field's own name; for chat messages,
    ShareGPT's `conversations` when the rows have no `messages`."""
    if field in columns:
        return columns[field]
    if field == "messages" and "messages" not in values and "conversations" in values:
        return "conversations"
    return field


def _kind_fits(field: str, value: Any) -> bool:
    """Whether a column's value could be task field `field`: a list of turns for messages, else text."""
    if field == "messages":
        return isinstance(value, list)
    return isinstance(value, (str, int, float)) and not isinstance(value, bool) or value is None


def _judgement(value: Any) -> bool | None:
    """An unpaired row's label as a bool: true/false, 1/0, yes/no, good/bad; None if it is none of them."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    return None


SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bot": "assistant", "model": "assistant", "system": "system"}
"""ShareGPT speaker names (`from`) and the chat roles they are."""

FIRST_ITEM = "'{field}' read from a list (or a {{text: [...]}} record) as its first item"

SHAREGPT = "ShareGPT turns ({from, value}) read as chat messages (human: user, gpt: assistant)"


def _sharegpt(value: Any) -> list[dict[str, str]] | None:
    """ShareGPT's `[{from: human, value: ...}, {from: gpt, value: ...}]` as `[{role, content}]`, or None
    when `value` is not that shape (or names a speaker with no chat role)."""
    if not isinstance(value, list) or not value or not all(isinstance(m, dict) and "from" in m for m in value):
        return None
    out = []
    for m in value:
        role = SHAREGPT_ROLES.get(str(m.get("from")).strip().lower())
        if role is None or not isinstance(m.get("value"), str):
            return None
        out.append({"role": role, "content": m["value"]})
    return out


def _valid_messages(value: Any) -> bool:
    if not isinstance(value, list) or not value:
        return False
    for m in value:
        if not (isinstance(m, dict) and m.get("role") in ("system", "user", "assistant")
                and isinstance(m.get("content"), str)):
            return False
    return any(m["role"] == "assistant" and m["content"].strip() for m in value)


def label_set(rows: list[RawRow], cfg: DataConfig) -> list[str]:
    """Sentiment labels as they appear in the training data, sorted; empty for other tasks."""
    if cfg.task != "sentiment":
        return []
    col = cfg.columns.get("label", "label")
    return sorted({t.strip() for r in rows if (t := _text(r.values.get(col))) and t.strip()})


def encode_rows(rows: list[RawRow], formatter: Formatter, split: str, source: str) -> tuple[list[dict], DataReport]:
    """Format and tokenize rows; drop (and count) rows that cannot train. Raw text is chunked, not cut."""
    if not rows:
        raise DataError(Problem(source, f"the {split} data is empty (no rows)", f"data.{split}",
                                fix="check the file (or the hub split) holds rows"))
    report = DataReport(split=split, source=source, rows_read=len(rows))
    formatter.check_columns(rows, source)
    limit = formatter.spec.max_length
    examples: list[dict] = []
    seen: set[str] = set()
    notes_before = Counter(formatter.notes)
    stop = set(formatter.stop_ids)
    for raw in rows:
        fields, reason = formatter.fields(raw)
        if fields is None and reason.startswith("label not in") and split == "eval":
            col = formatter.columns.get("label", "label")
            raise DataError(Problem(raw.where, f"label {raw.values.get(col)!r} is not in the training label set "
                                    f"({', '.join(formatter.spec.labels)})", f"data.{split}",
                                    fix="fix the label, or add training rows that use it"))
        if fields is None:
            report.dropped[reason] += 1
            continue
        record = formatter.record(fields)
        key = (json.dumps(record, sort_keys=True, ensure_ascii=False), raw.copy)  # a mix's repeat is no duplicate
        if key in seen:
            report.dropped["duplicate of an earlier row"] += 1
            continue
        seen.add(key)
        if formatter.folds_system and (formatter.spec.system_prompt or any(
                m.get("role") == "system" for f in ("messages", "prompt") if isinstance(fields.get(f), list)
                for m in fields[f])):
            formatter.notes[FOLDED_SYSTEM] += 1
        try:
            encoded = [formatter.encode(one) for one in formatter.examples(record)]
            fitted = "fits"
            needed = sum(enc.length for enc in encoded) if formatter.task.long_fields else None
            if formatter.task.long_fields and formatter.spec.truncation == "input" and encoded[0].truncated:
                # Only a row that does not fit is measured again while its long input is shortened.
                fields, fitted, needed = formatter.fit(fields, needed)
                if fitted == "shortened":
                    encoded = [formatter.encode(formatter.record(fields))]
        except TemplateRejected as e:
            report.dropped[f"the chat template rejects the conversation ({e})"] += 1
            continue
        if fitted == "too_long":
            report.needed.append(needed)
            report.dropped[f"the completion alone does not fit max_length={limit}"] += 1
            continue
        supervised = sum(lbl != IGNORE for enc in encoded for lbl in enc.labels)
        if needed is not None:
            report.needed.append(needed)
        if supervised == 0 and formatter.spec.truncation == "drop" and any(enc.truncated for enc in encoded):
            report.dropped[f"longer than max_length={limit} (data.truncation: drop)"] += 1
            continue
        if supervised == 0:
            report.dropped[f"no supervised token within max_length={limit}"] += 1
            continue
        report.inputs_shortened += fitted == "shortened"
        report.truncated += any(enc.truncated for enc in encoded)
        report.eos_supervised += all(any(lbl in stop for lbl in enc.labels if lbl != IGNORE) for enc in encoded)
        report.tokens += sum(len(enc.input_ids) for enc in encoded)
        report.supervised_tokens += supervised
        if formatter.task.name == "sentiment":
            report.labels[fields["label"]] += 1
        for enc in encoded:
            for i in range(0, len(enc.input_ids), limit):
                ids, labels = enc.input_ids[i:i + limit], enc.labels[i:i + limit]
                if any(lbl != IGNORE for lbl in labels):
                    examples.append({"input_ids": ids, "labels": labels})
    report.examples = len(examples)
    report.notes = formatter.notes - notes_before
    return examples, report
