"""The shared formatter: each task's template, the loss mask, column mapping and chat templates."""

from __future__ import annotations

import pytest

from adapterkit.config import DataConfig
from adapterkit.data.formatter import FALLBACK_CHAT_TEMPLATE, IGNORE, Formatter, encode_rows
from adapterkit.data.loading import RawRow
from adapterkit.errors import DataError
from adapterkit.models import train_tokenizer

CORPUS = [
    "the film was great and the acting was wonderful", "a dull and boring movie", "Paris is the capital of France",
    "Translate from English to German. The cat sleeps. Die Katze schläft.", "Summarize the document. Answer the question.",
    "Classify the sentiment of the text as negative or positive. Sentiment: positive negative",
] * 20

ROWS = {
    "qa": {"question": "What is the capital of France?", "context": "Paris is the capital of France.", "answer": "Paris"},
    "summarization": {"document": "The film was long. The acting was great.", "summary": "A long film, well acted."},
    "translation": {"source": "The cat sleeps.", "target": "Die Katze schläft.", "source_lang": "en", "target_lang": "de"},
    "generation": {"instruction": "Give a synonym.", "input": "happy", "output": "glad"},
    "sentiment": {"text": "a dull and boring movie", "label": "negative"},
}
EXPECTED_PROMPTS = {
    "qa": "Answer the question using the context.\n\nContext: Paris is the capital of France.\n\n"
          "Question: What is the capital of France?\nAnswer:",
    "summarization": "Summarize the document.\n\nDocument: The film was long. The acting was great.\nSummary:",
    "translation": "Translate from English to German.\n\nEnglish: The cat sleeps.\nTranslation:",
    "generation": "Give a synonym.\n\nInput: happy\nResponse:",
    "sentiment": "Classify the sentiment of the text as negative or positive.\n\nText: a dull and boring movie\nSentiment:",
}
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(CORPUS, vocab_size=400)


def make(tok, task: str, labels=("negative", "positive"), **cfg) -> Formatter:
    return Formatter.for_training(DataConfig(task=task, **cfg), tok, list(labels) if task == "sentiment" else [])


def supervised_text(tok, enc) -> str:
    return tok.decode([i for i, lbl in zip(enc.input_ids, enc.labels) if lbl != IGNORE])


@pytest.mark.parametrize("task", sorted(ROWS))
def test_plain_template_and_mask(tok, task):
    f = make(tok, task)
    fields, reason = f.fields(RawRow(ROWS[task], "x:1"))
    assert reason is None
    record = f.record(fields)
    assert record["prompt"] == EXPECTED_PROMPTS[task]
    target = ROWS[task][f.task.target]
    assert record["completion"] == " " + target
    enc = f.encode(record)
    # Only the completion and the EOS after it carry loss; the EOS is the very last token.
    assert supervised_text(tok, enc) == " " + target + tok.eos_token
    assert enc.input_ids[-1] == tok.eos_token_id and enc.labels[-1] == tok.eos_token_id
    n_prompt = len(tok(record["prompt"], add_special_tokens=False).input_ids)
    assert enc.labels[:n_prompt] == [IGNORE] * n_prompt


def test_train_on_prompt_supervises_everything(tok):
    f = make(tok, "qa", train_on_prompt=True)
    enc = f.encode(f.record(ROWS["qa"]))
    assert enc.labels == enc.input_ids


def test_eos_stays_supervised_when_pad_equals_eos(tok):
    """The collator trl uses must not mask EOS even when the pad token is EOS."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    f = make(tok, "sentiment")
    short = f.encode(f.record(ROWS["sentiment"]))
    long = f.encode(f.record({**ROWS["sentiment"], "text": ROWS["sentiment"]["text"] + " and far too long"}))
    batch = DataCollatorForLanguageModeling(pad_token_id=tok.eos_token_id)(
        [{"input_ids": short.input_ids, "labels": short.labels}, {"input_ids": long.input_ids, "labels": long.labels}])
    n = len(short.input_ids)
    assert batch["labels"][0, n - 1] == tok.eos_token_id  # EOS supervised
    assert (batch["labels"][0, n:] == IGNORE).all()  # padding (also EOS ids) is not
    assert (batch["input_ids"][0, n:] == tok.eos_token_id).all()


def test_optional_fields_change_the_prompt(tok):
    f = make(tok, "qa")
    assert f.record({"question": "Who?", "answer": "me", "context": ""})["prompt"] == \
        "Answer the question.\n\nQuestion: Who?\nAnswer:"
    g = make(tok, "generation")
    assert g.record({"instruction": "Say hi.", "input": "", "output": "hi"})["prompt"] == "Say hi.\nResponse:"


def test_column_mapping_and_missing_column_message(tok):
    f = make(tok, "sentiment", columns={"text": "review", "label": "stars"})
    fields, _ = f.fields(RawRow({"review": "great", "stars": "positive"}, "x:1"))
    assert fields == {"text": "great", "label": "positive"}
    g = make(tok, "sentiment")
    with pytest.raises(DataError) as e:
        g.check_columns([RawRow({"review": "great", "label": "positive"}, "x:1")], "reviews.csv")
    msg = str(e.value)
    assert "no column 'text'" in msg and "columns: label, review" in msg and "data.columns.text=" in msg


def test_custom_template(tok):
    f = make(tok, "sentiment", template="Review: {text}\nLabel:")
    rec = f.record(ROWS["sentiment"])
    assert rec == {"prompt": "Review: a dull and boring movie\nLabel:", "completion": " negative"}


def test_system_prompt_in_plain_mode(tok):
    f = make(tok, "qa", system_prompt="Be brief.")
    assert f.record(ROWS["qa"])["prompt"].startswith("Be brief.\n\nAnswer the question")


def test_tokenizer_chat_template_is_used_for_tasks(tok):
    tok2 = train_tokenizer(CORPUS, vocab_size=400)
    tok2.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok2.chat_template = CHATML
    f = make(tok2, "qa", system_prompt="Be brief.")
    assert f.spec.mode == "chat_template"
    rec = f.record(ROWS["qa"])
    assert rec["prompt"][0] == {"role": "system", "content": "Be brief."}
    assert rec["completion"] == [{"role": "assistant", "content": "Paris"}]
    enc = f.encode(rec)
    # The assistant turn (answer, end-of-turn, newline) is supervised, the rest is not; the template's own
    # end-of-turn token ends the reply (no EOS after it), and it stops generation beside EOS.
    assert supervised_text(tok2, enc) == "Paris<|im_end|>\n"
    assert f.stop_ids == [tok2.eos_token_id, tok2.convert_tokens_to_ids("<|im_end|>")]
    assert f.prompt_text(ROWS["qa"]).endswith("<|im_start|>assistant\n")


def test_chat_masks_every_assistant_turn_and_nothing_else(tok):
    f = make(tok, "chat")
    assert f.spec.chat_template == FALLBACK_CHAT_TEMPLATE  # no template: the fallback, saved with the model
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                {"role": "user", "content": "bye"}, {"role": "assistant", "content": "goodbye"}]
    fields, _ = f.fields(RawRow({"messages": messages}, "x:1"))
    enc = f.encode(f.record(fields))
    assert supervised_text(tok, enc) == f"hello{tok.eos_token}\ngoodbye{tok.eos_token}\n"
    assert tok.decode(enc.input_ids) == ("<|user|>\nhi\n<|assistant|>\nhello" + tok.eos_token + "\n<|user|>\nbye\n"
                                         "<|assistant|>\ngoodbye" + tok.eos_token + "\n")


def test_text_is_fully_supervised_and_chunked_not_cut(tok):
    f = make(tok, "text", max_length=16)
    long = " ".join(["the film was great"] * 30)
    examples, report = encode_rows([RawRow({"text": long}, "x:1")], f, "train", "x")
    assert len(examples) > 1 and all(len(e["input_ids"]) <= 16 for e in examples)
    total = sum(len(e["input_ids"]) for e in examples)
    assert total == len(tok(long, add_special_tokens=False).input_ids) + 1  # every token kept, plus EOS
    assert report.truncated == 0


def test_rows_without_supervised_tokens_are_dropped_and_counted(tok):
    f = make(tok, "qa", max_length=40, truncation="end")
    rows = [RawRow({"question": "What is the capital of France and why is it Paris, really?",
                    "context": "Paris is the capital of France. " * 5, "answer": "Paris"}, "x:1"),
            RawRow({"question": "Who?", "context": "", "answer": "me"}, "x:2"),
            RawRow({"question": "Who?", "context": "", "answer": ""}, "x:3")]
    examples, report = encode_rows(rows, f, "train", "x")
    assert len(examples) == 1
    assert report.dropped == {"no supervised token within max_length=40": 1, "empty 'answer'": 1}
    assert all(any(lbl != IGNORE for lbl in e["labels"]) for e in examples)


def test_sentiment_label_outside_the_set_is_dropped(tok):
    f = make(tok, "sentiment")
    _, reason = f.fields(RawRow({"text": "ok", "label": "neutral"}, "x:1"))
    assert "not in the label set" in reason


# Chat templates of the real families (faithful small copies in tests/architectures.py), each with a
# system message and two assistant turns: the supervised tokens are exactly each reply and the token(s)
# its template closes the turn with, whether the template renders a growing prefix or not.
CONVERSATION = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "hi there"},
                {"role": "assistant", "content": "hello friend"}, {"role": "user", "content": "bye now"},
                {"role": "assistant", "content": "goodbye pal"}]
CHAT_STYLES = {
    # arch: (supervised spans, examples, note)
    "qwen2": (["hello friend<|im_end|>\n", "goodbye pal<|im_end|>\n"], 1, None),
    "llama": (["hello friend<|eot_id|>", "goodbye pal<|eot_id|>"], 1, None),
    # Qwen3 drops earlier turns' reasoning and Phi-3 ends a conversation with EOS: one example per turn.
    "qwen3": (["<think>\n\n</think>\n\nhello friend<|im_end|>\n", "<think>\n\n</think>\n\ngoodbye pal<|im_end|>\n"],
              2, "split"),
    "phi3": (["hello friend<|end|>\n<|endoftext|>", "goodbye pal<|end|>\n<|endoftext|>"], 2, "split"),
    # Gemma rejects the system role: it is folded into the first user turn.
    "gemma2": (["hello friend<end_of_turn>\n", "goodbye pal<end_of_turn>\n"], 1, "folded"),
    "gpt2": (["hello friend<|endoftext|>\n", "goodbye pal<|endoftext|>\n"], 1, None),  # the fallback template
}


def _supervised_spans(tok, example) -> list[str]:
    spans, current = [], []
    for i, label in zip(example["input_ids"], example["labels"]):
        if label != IGNORE:
            current.append(i)
        elif current:
            spans.append(current)
            current = []
    return [tok.decode(s) for s in spans + ([current] if current else [])]


@pytest.mark.parametrize("arch", CHAT_STYLES)
def test_chat_supervises_each_reply_and_its_end_of_turn_for_every_template_style(arch):
    from architectures import ARCHS, TEMPLATES, build_tokenizer

    from adapterkit.data.formatter import FOLDED_SYSTEM, SPLIT_TURNS

    tok = build_tokenizer(arch)
    tok.pad_token = tok.pad_token or tok.eos_token
    f = Formatter.for_training(DataConfig(task="chat"), tok, [])
    examples, report = encode_rows([RawRow({"messages": CONVERSATION}, "x:1")], f, "train", "x")
    spans, n, note = CHAT_STYLES[arch]
    assert [s for e in examples for s in _supervised_spans(tok, e)] == spans and len(examples) == n
    assert report.eos_supervised == 1 and report.dropped == {}
    assert dict(report.notes) == ({FOLDED_SYSTEM: 1} if note == "folded" else {SPLIT_TURNS: 1} if note == "split"
                                  else {})
    end = TEMPLATES[ARCHS[arch]["chat"]][3]
    if end and end != tok.eos_token:  # the template's own end of turn stops generation too
        assert f.stop_ids == [tok.eos_token_id, tok.convert_tokens_to_ids(end)]
    # Evaluation asks for the last reply after the conversation so far, rendered as at inference.
    record = f.record({"messages": CONVERSATION})
    prompt, reference = f.split_for_eval(record)
    assert tok.decode(reference) == spans[-1]
    asked = tok.apply_chat_template(record["messages"][:-1], tokenize=False, add_generation_prompt=True)
    assert prompt == tok(asked, add_special_tokens=False).input_ids


def test_a_template_error_drops_the_row_with_its_reason_never_a_traceback():
    from architectures import build_tokenizer

    tok = build_tokenizer("gemma2")
    f = Formatter.for_training(DataConfig(task="chat"), tok, [])
    bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}, {"role": "assistant", "content": "c"}]
    examples, report = encode_rows([RawRow({"messages": bad}, "x:1"), RawRow({"messages": CONVERSATION}, "x:2")],
                                   f, "train", "x")
    assert len(examples) == 1
    assert report.dropped == {"the chat template rejects the conversation (Conversation roles must alternate "
                              "user/assistant/user/assistant/...)": 1}


# -- long inputs: data.truncation --------------------------------------------------------------------------

LONG = " ".join(f"Filler sentence number {i} says nothing much." for i in range(60))


@pytest.fixture
def plain():
    """A tokenizer without a chat template (the module's `tok` gets one from the chat tests)."""
    return train_tokenizer(CORPUS, vocab_size=400)


def _only(examples):
    assert len(examples) == 1
    return examples[0]


def test_a_long_qa_context_is_shortened_around_the_answer_and_the_answer_stays_whole(plain):
    f = make(plain, "qa", max_length=96)
    row = {"question": "What is the capital of France?", "answer": "Paris is the capital",
           "context": f"{LONG} Paris is the capital of France. {LONG}"}
    examples, report = encode_rows([RawRow(row, "x:1")], f, "train", "x")
    ex = _only(examples)
    assert len(ex["input_ids"]) <= 96 and report.inputs_shortened == 1 and report.truncated == 0
    assert report.dropped == {} and report.eos_supervised == 1
    text = plain.decode(ex["input_ids"])
    context = text.split("Context: ")[1].split("\n\nQuestion:")[0]
    assert context.startswith("…") and context.endswith("…") and "Paris is the capital of France" in context
    assert plain.decode([i for i, lbl in zip(ex["input_ids"], ex["labels"]) if lbl != IGNORE]) == \
        " Paris is the capital" + plain.eos_token
    assert text.rstrip(plain.eos_token).endswith("Question: What is the capital of France?\nAnswer: Paris is the capital")


def test_a_long_document_keeps_its_start_and_is_marked_where_it_was_cut(plain):
    f = make(plain, "summarization", max_length=80)
    examples, report = encode_rows([RawRow({"document": LONG, "summary": "Nothing much."}, "x:1")], f, "train", "x")
    ex = _only(examples)
    document = plain.decode(ex["input_ids"]).split("Document: ")[1].split("\nSummary:")[0]
    assert LONG.startswith(document.removesuffix("…")) and document.endswith("…") and len(ex["input_ids"]) <= 80
    assert plain.decode([i for i, lbl in zip(ex["input_ids"], ex["labels"]) if lbl != IGNORE]).startswith(
        " Nothing much.")


def test_a_row_is_dropped_only_when_the_completion_alone_cannot_fit_and_the_fix_names_a_max_length(plain):
    from adapterkit.stages.skeleton import too_many_dropped

    f = make(plain, "summarization", max_length=64)
    rows = [RawRow({"document": LONG, "summary": f"Short summary {i}."}, f"x:{i}") for i in range(8)]
    rows += [RawRow({"document": "Tiny.", "summary": LONG[: 60 * (i + 1)]}, f"y:{i}") for i in range(2)]
    examples, report = encode_rows(rows, f, "train", "x")
    assert len(examples) == 8 and report.inputs_shortened == 8
    assert report.dropped == {"the completion alone does not fit max_length=64": 2}
    problem = too_many_dropped(report, DataConfig(task="summarization", max_length=64), "x")
    needed = sorted(report.needed)
    assert f"raise data.max_length: {needed[-1]} keeps 95% of the rows" in problem.fix
    # That max_length really keeps every row.
    g = make(plain, "summarization", max_length=needed[-1])
    assert len(encode_rows(rows, g, "train", "x")[0]) == 10


def test_truncation_end_cuts_at_max_length_and_drop_drops(plain):
    row = RawRow({"question": "What is it?", "answer": "Paris", "context": LONG}, "x:1")
    end = make(plain, "qa", max_length=64, truncation="end")
    examples, report = encode_rows([row], end, "train", "x")
    assert examples == [] and report.dropped == {"no supervised token within max_length=64": 1}
    drop = make(plain, "qa", max_length=64, truncation="drop")
    examples, report = encode_rows([row, RawRow(ROWS["qa"], "x:2")], drop, "train", "x")
    assert len(examples) == 1 and report.dropped == {"longer than max_length=64 (data.truncation: drop)": 1}


def test_real_squad_rows_train_whole_under_the_shipped_qlora_qa_settings(plain):
    """The shipped qlora-qa recipe (max_length 256) on 100 real SQuAD rows used to refuse to train (56 rows
    dropped): with data.truncation: input every row trains, its context cut around the answer."""
    from conftest import shared_data

    from adapterkit.data.loading import read_rows

    rows = read_rows(str(shared_data("qa", "train.jsonl")), "train", "data.train")[:100]
    f = make(plain, "qa", max_length=256)
    examples, report = encode_rows(rows, f, "train", "qa")
    assert report.dropped == {} and len(examples) == 100 and report.inputs_shortened > 0
    assert all(len(e["input_ids"]) <= 256 for e in examples) and report.eos_supervised == 100


def test_a_folded_system_prompt_is_counted_once_per_row():
    from architectures import build_tokenizer

    from adapterkit.data.formatter import FOLDED_SYSTEM

    tok = build_tokenizer("gemma2")
    f = Formatter.for_training(DataConfig(task="qa", system_prompt="Be brief.", max_length=96), tok, [])
    rows = [RawRow({"question": f"What is {i}?", "context": LONG, "answer": str(i)}, f"x:{i}") for i in range(3)]
    examples, report = encode_rows(rows, f, "train", "x")
    assert len(examples) == 3 and report.inputs_shortened == 3 and dict(report.notes) == {FOLDED_SYSTEM: 3}
    assert "Be brief.\n\n" in tok.decode(examples[0]["input_ids"])


@pytest.mark.parametrize("prompt, own", [
    ("Human: how do I bake bread?\n\nAssistant:", True),  # HH-RLHF
    ("Give a synonym for happy.\n### Response:", True),
    ("Q: what is 2 + 2?\nA:", True),
    ("Which fruit is yellow? Assistant:", False),  # a cue inside the last line is text, not a cue
    ("Here are my options:", False),  # a colon that is no reply cue
    ("Give a synonym for happy.", False),
])
def test_a_prompt_that_ends_in_its_own_reply_cue_gets_no_second_one(plain, prompt, own):
    f = make(plain, "preference")
    fields, reason = f.fields(RawRow({"prompt": prompt, "chosen": "yes", "rejected": "no"}, "x:1"))
    record = f.record(fields)
    assert record["prompt"] == (prompt if own else prompt + "\nResponse:")
    assert record["chosen"] == " yes" and f.keeps_own_cue(fields) == own


def test_sharegpt_conversations_are_read_as_chat_messages(plain):
    f = make(plain, "chat")
    row = RawRow({"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"},
                                    {"from": "gpt", "value": "Hello."}]}, "x:1")
    f.check_columns([row], "x")  # `conversations` stands in for `messages` when the rows have no `messages`
    fields, reason = f.fields(row)
    assert reason is None and [m["role"] for m in fields["messages"]] == ["system", "user", "assistant"]
    assert fields["messages"][2]["content"] == "Hello." and sum(f.notes.values()) == 1
    odd = RawRow({"conversations": [{"from": "human", "value": "Hi"}, {"from": "narrator", "value": "..."}]}, "x:2")
    assert f.fields(odd) == (None, "messages are not a list of {role, content} (or ShareGPT's {from, value}) "
                                   "with an assistant turn")


def test_nested_columns_by_dotted_path_and_squad_answers(plain):
    row = RawRow({"question": "Capital of France?", "context": "Paris is the capital of France.",
                  "answers": {"text": ["Paris", "paris"], "answer_start": [0, 0]},
                  "meta": {"q": [{"text": "Which city?"}]}}, "x:1")
    f = make(plain, "qa", columns={"answer": "answers"})  # SQuAD's record: its first text
    f.check_columns([row], "x")
    assert f.fields(row)[0]["answer"] == "Paris"
    assert list(f.notes) == ["'answer' read from a list (or a {text: [...]} record) as its first item"]
    g = make(plain, "qa", columns={"answer": "answers.text.1", "question": "meta.q.0.text"})
    g.check_columns([row], "x")
    fields, _ = g.fields(row)
    assert fields["answer"] == "paris" and fields["question"] == "Which city?"
    h = make(plain, "qa", columns={"answer": "answers.text.5"})  # no such item: the row is dropped, not guessed
    assert h.fields(row) == (None, "missing or non-text 'answer'")
    with pytest.raises(DataError, match="no column 'solutions.text'"):
        make(plain, "qa", columns={"answer": "solutions.text"}).check_columns([row], "x")
