"""The architecture matrix: every architecture in tests/architectures.py through the same checks.

    python -m pytest -q -rf tests/test_architectures.py

Cells, per architecture (each a test id `[arch-cell]`):
  method   lora, dora, qlora, prompt_tuning, prefix_tuning, p_tuning, full: 2 steps through a shipped
           recipe; the run completes, exactly the intended parameters train and all of them change
           (QLoRA: every decoder linear layer is 4-bit)
  chat     the full-chat recipe on the shipped chat sample, 2 steps
  labels   the formatter on multi-turn conversations (one with a system message): supervised tokens are
           exactly each assistant reply plus its end-of-turn token(s); the whole text is the template's
  packing  what the lora run fed the model: packed rows whose examples never attend to each other, or
           (for architectures whose attention ignores position ids) unpacked rows; the manifest says which
  export   lora and qlora runs merged by `adapterkit.export` pass parity (float32, greedy identical)
  plan     `adapterkit.plan.architecture` reads the shape, and counts the loaded model's parameters and
           4-bit matrices
  refused  combinations in REFUSED raise AdapterkitError saying why (exit code 2 via the CLI)

Models and finished runs are built once per session / module and shared between the cells.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from architectures import ARCHS, FFN, HIDDEN, LAYERS, TEMPLATES, build
from transformers import TrainerCallback

from adapterkit.config import load_recipe
from adapterkit.errors import AdapterkitError

NAMES = list(ARCHS)

# Combinations adapterkit is expected to refuse (AdapterkitError, exit code 2), with a piece of the
# message that says why. A refused run cell asserts the refusal instead of a finished run.
REFUSED: dict[tuple[str, str], str] = {
    # Falcon's FalconLinear subclasses nn.Linear, and bitsandbytes replaces only exact nn.Linear / Conv1D.
    ("falcon", "qlora"): "no layer of",
}

# Architectures whose attention ignores position ids (the mask is built from the attention mask alone),
# so packed rows would attend across examples: adapterkit must train them unpacked.
UNPACKED = {"opt": "OPT builds its causal mask without position_ids"}

COMMON = ["train.max_steps=2", "train.precision=fp32", "data.eval=null", "train.save_every=null",
          "train.warmup_ratio=0", "train.schedule=constant", "train.log_every=1"]
# cell: (shipped recipe, overrides); every adapter cell at a learning rate that visibly moves the logits.
RUNS: dict[str, tuple[str, list[str]]] = {
    "lora": ("lora-sentiment", ["train.lr=1e-2", "adapter.lora.dropout=0", "data.max_length=512"]),  # packs several
    "dora": ("lora-sentiment", ["train.lr=1e-2", "adapter.lora.dora=true"]),
    "qlora": ("qlora-qa", ["train.lr=1e-2"]),
    "prompt_tuning": ("prompt-tuning-translation", ["train.lr=1e-1"]),
    "prefix_tuning": ("prefix-tuning-summarization", ["train.lr=1e-1"]),
    "p_tuning": ("p-tuning-sentiment", ["train.lr=1e-2"]),
    "full": ("lora-sentiment", ["adapter.method=full", "train.lr=1e-3"]),
    "chat": ("full-chat", ["train.lr=1e-3"]),
}
METHODS = ["lora", "dora", "qlora", "prompt_tuning", "prefix_tuning", "p_tuning", "full"]
INTENDED = {"lora": "lora_", "dora": "lora_", "qlora": "lora_", "prompt_tuning": "prompt_encoder",
            "prefix_tuning": "prompt_encoder", "p_tuning": "prompt_encoder", "full": ""}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """64-wide matmuls are too small to split across threads (see test_export.py)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def arch_dir(tmp_path_factory):
    """arch_dir(name) -> the saved tiny model of that architecture (built on first use)."""
    root = tmp_path_factory.mktemp("archs")
    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in built:
            built[name] = build(name, root / name)
        return built[name]

    return get


class Probe(TrainerCallback):
    """What training did: trainable and changed parameter names, 4-bit layers, the first batch fed."""

    def __init__(self):
        self.first_batch: dict[str, torch.Tensor] | None = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        import bitsandbytes as bnb

        self.trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        self.before = {n: p.detach().clone() for n, p in model.named_parameters()}
        self.linear4bit = sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
        loader = kwargs.get("train_dataloader")
        self.collator = type(getattr(loader, "collate_fn", None)).__name__

        def hook(module, a, kw):
            if torch.is_grad_enabled() and self.first_batch is None:
                self.first_batch = {k: v.detach().clone() for k, v in kw.items() if torch.is_tensor(v)}
        self.handle = model.register_forward_pre_hook(hook, with_kwargs=True)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.handle.remove()
        self.changed = {n for n, p in model.named_parameters() if not torch.equal(self.before[n], p.detach())}
        del self.before


@dataclass
class Outcome:
    out: Path
    error: BaseException | None = None
    probe: Probe | None = None
    model: Any = None
    tokenizer: Any = None
    losses: list[float] = field(default_factory=list)

    def result(self) -> Outcome:
        if self.error is not None:
            raise self.error
        return self


@pytest.fixture(scope="module")
def runs(tmp_path_factory, arch_dir):
    """runs(arch, cell) -> the Outcome of that run (trained on first use; a failure is kept and re-raised)."""
    from adapterkit.stages import run

    root = tmp_path_factory.mktemp("arch-runs")
    done: dict[tuple[str, str], Outcome] = {}

    def get(name: str, cell: str) -> Outcome:
        if (name, cell) not in done:
            out = root / f"{name}-{cell}"
            recipe_name, extra = RUNS[cell]
            probe = Probe()
            try:
                recipe, src = load_recipe(recipe_name, [f"model.name_or_path={arch_dir(name)}", *COMMON, *extra,
                                                        f"output_dir={out}"])
                result = run(recipe, src, echo=False, callbacks=[probe])
            except Exception as e:  # kept: every cell that needs this run reports it
                done[name, cell] = Outcome(out, error=e, probe=probe)
            else:
                log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
                keep = cell == "lora"  # the packing cell runs the trained model again
                done[name, cell] = Outcome(out, probe=probe, model=result.model if keep else None,
                                           tokenizer=result.tokenizer,
                                           losses=[r["loss"] for r in log if "loss" in r])
        return done[name, cell]

    return get


def _decoder_linears(name: str, arch_dir) -> int:
    """Linear layers bitsandbytes should make 4-bit: every nn.Linear / Conv1D of the model but its head."""
    from transformers import AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    model = AutoModelForCausalLM.from_pretrained(arch_dir(name))
    head = model.get_output_embeddings()
    return sum(isinstance(m, (torch.nn.Linear, Conv1D)) and m is not head for m in model.modules())


# ---------------------------------------------------------------------------------------------
# method cells


@pytest.mark.parametrize("cell", METHODS)
@pytest.mark.parametrize("name", NAMES)
def test_method_trains_the_intended_parameters(runs, arch_dir, name, cell):
    outcome = runs(name, cell)
    if (name, cell) in REFUSED:
        assert isinstance(outcome.error, AdapterkitError), f"expected a refusal, got {outcome.error!r}"
        assert REFUSED[name, cell] in str(outcome.error)
        return
    outcome.result()
    probe = outcome.probe
    assert (outcome.out / "model").is_dir() and json.loads((outcome.out / "manifest.json").read_text())[
        "status"] == "completed"
    assert outcome.losses and all(map(math.isfinite, outcome.losses)), outcome.losses
    assert probe.trainable and all(INTENDED[cell] in n for n in probe.trainable), sorted(probe.trainable)[:5]
    assert probe.changed <= probe.trainable, sorted(probe.changed - probe.trainable)[:5]  # the base stays frozen
    assert probe.changed == probe.trainable, f"did not change: {sorted(probe.trainable - probe.changed)[:5]}"
    if cell == "qlora":
        expected = _decoder_linears(name, arch_dir)
        assert probe.linear4bit == expected, f"{probe.linear4bit} 4-bit layers, expected {expected}"


# ---------------------------------------------------------------------------------------------
# chat: a run, and the supervised tokens of each template style


@pytest.mark.parametrize("name", NAMES)
def test_chat_sft_runs(runs, name):
    outcome = runs(name, "chat").result()
    assert outcome.losses and (outcome.out / "model" / "format.json").is_file()


CONVERSATIONS = [
    [{"role": "system", "content": "You are a concise assistant."},
     {"role": "user", "content": "What is the capital of France?"},
     {"role": "assistant", "content": "The capital of France is Paris."},
     {"role": "user", "content": "And of Italy?"},
     {"role": "assistant", "content": "Rome is the capital of Italy."}],
    [{"role": "user", "content": "Hello!"},
     {"role": "assistant", "content": "Hello! How can I help you today?"},
     {"role": "user", "content": "Just saying hi."},
     {"role": "assistant", "content": "Hi there! Ask me anything."}],
]
THINK = "<think>\n\n</think>\n\n"


def _spans(labels: list[int]) -> list[list[int]]:
    """Maximal runs of supervised labels."""
    out: list[list[int]] = []
    for supervised, group in itertools.groupby(labels, key=lambda x: x != -100):
        if supervised:
            out.append(list(group))
    return out


@pytest.mark.parametrize("name", NAMES)
def test_chat_labels_are_the_assistant_replies(arch_dir, name):
    """Each conversation becomes one example supervising every reply, or (for a template that rewrites
    earlier turns) one example per reply; either way each example is the template's own rendering of the
    conversation up to its last reply, and its supervised tokens are exactly the replies it supervises,
    each with its end of turn."""
    from adapterkit.config import DataConfig
    from adapterkit.data.formatter import Formatter, encode_rows
    from adapterkit.data.loading import RawRow
    from adapterkit.models import load_tokenizer

    recipe, _ = load_recipe("full-chat", [f"model.name_or_path={arch_dir(name)}"])
    tok = load_tokenizer(recipe.model, str(arch_dir(name)))
    style = ARCHS[name]["chat"]
    end = TEMPLATES[style][3] or tok.eos_token
    formatter = Formatter.for_training(DataConfig(task="chat", max_length=512), tok, [])

    def text(ids):
        return tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    for i, conv in enumerate(CONVERSATIONS):
        try:
            encoded, report = encode_rows([RawRow({"messages": conv}, f"conv:{i}")], formatter, "train", "conv")
        except AdapterkitError as e:  # a template that cannot render a system turn may be refused, saying so
            assert style == "gemma" and "system" in str(e).lower(), str(e)
            continue
        turns = [k for k, m in enumerate(conv) if m["role"] == "assistant"]
        if len(encoded) == 1:  # (messages shown, replies supervised) of each example
            groups = [(conv, turns)]
        else:
            assert len(encoded) == len(turns), report.summary()
            groups = [(conv[:k + 1], [k]) for k in turns]
        for enc, (shown, supervised) in zip(encoded, groups):
            spans = [text(s) for s in _spans(enc["labels"])]
            assert len(spans) == len(supervised), (spans, report.summary())
            for span, k in zip(spans, supervised):
                reply, last = conv[k]["content"], k == len(shown) - 1
                # The reply, its end of turn, and what the template itself renders after it (a newline;
                # Phi-3's EOS at the very end). Qwen3 renders an empty reasoning block before a last reply.
                tails = {end, end + "\n"} | ({end + "\n" + tok.eos_token} if last and style == "phi3" else set())
                body = span.removeprefix(THINK) if style == "qwen3" else span
                assert body.startswith(reply) and body[len(reply):] in tails, (span, reply, sorted(tails))
            # The model sees what the template renders for these turns, nothing added or lost.
            try:
                rendered = tok.apply_chat_template(shown, tokenize=False)
            except Exception:  # gemma's own template refuses the system turn: no reference to compare with
                assert all(m["content"] in text(enc["input_ids"]) for m in shown), text(enc["input_ids"])
                continue
            assert text(enc["input_ids"]) == rendered


# ---------------------------------------------------------------------------------------------
# packing: what the lora run fed the model


def _fed_packed(outcome: Outcome) -> tuple[bool, torch.Tensor | None]:
    """Whether the first batch the run fed was packed (position ids, no attention mask), and the number
    of examples in each of its rows."""
    batch, pad = outcome.probe.first_batch, outcome.tokenizer.pad_token_id
    ids, pos = batch["input_ids"], batch.get("position_ids")
    starts = None if pos is None else ((pos == 0) & (ids != pad)).sum(-1)
    return "attention_mask" not in batch and starts is not None, starts


@pytest.mark.parametrize("name", NAMES)
def test_packed_rows_never_attend_across_examples(runs, name):
    outcome = runs(name, "lora").result()
    batch, pad = outcome.probe.first_batch, outcome.tokenizer.pad_token_id
    ids, pos = batch["input_ids"], batch.get("position_ids")
    packed, starts = _fed_packed(outcome)
    if name in UNPACKED:
        assert not packed, (f"{UNPACKED[name]}, but the run packed ({outcome.probe.collator}): rows hold "
                            f"{starts.tolist()} examples with no attention mask")
        return
    assert packed, f"packing was off ({outcome.probe.collator}; batch keys {sorted(batch)})"
    assert int(starts.max()) > 1, f"no row holds two examples ({starts.tolist()}): the check needs shorter ones"
    model = outcome.model.eval()
    worst = 0.0
    with torch.no_grad():
        together = model(input_ids=ids, position_ids=pos).logits
        for row in range(ids.shape[0]):
            begins = [i for i in range(ids.shape[1]) if pos[row, i] == 0] + [ids.shape[1]]
            for b, e in itertools.pairwise(begins):
                if ids[row, b] == pad:
                    continue  # the row's padded tail
                alone = model(input_ids=ids[row, b:e][None]).logits[0]
                worst = max(worst, (together[row, b:e] - alone).abs().max().item())
    assert worst < 1e-4, f"packed examples' logits differ from their logits alone by up to {worst:.3g}"


@pytest.mark.parametrize("name", NAMES)
def test_packing_decision_is_recorded(runs, name):
    outcome = runs(name, "lora").result()
    packed, _ = _fed_packed(outcome)
    recorded = json.loads((outcome.out / "manifest.json").read_text()).get("packing")
    assert recorded is packed, f"the manifest records packing {recorded!r}; the run fed packed={packed}"


# ---------------------------------------------------------------------------------------------
# export


@pytest.mark.parametrize("cell", ["lora", "qlora"])
@pytest.mark.parametrize("name", NAMES)
def test_export_passes_parity(runs, tmp_path, name, cell):
    from adapterkit.export import export

    if (name, cell) in REFUSED:
        pytest.skip(f"{name} {cell} is refused")
    run_dir = runs(name, cell).result().out
    info = export(run_dir, tmp_path / "export", say=lambda *a: None)
    p = info["parity"]
    assert p["passed"] and info["format"] == "merged" and info["dtype"] == "float32", p
    assert p["greedy_identical"] == p["rows"] and p["max_abs_logit_diff"] <= p["tolerance"], p


# ---------------------------------------------------------------------------------------------
# plan


@pytest.fixture(scope="module")
def loaded(arch_dir):
    """loaded(name, quantized) -> the model as adapterkit loads it: float32, or 4-bit for qlora (cached)."""
    from adapterkit import models
    from adapterkit.models import quantization_config

    cache: dict[tuple[str, bool], Any] = {}

    def get(name: str, quantized: bool) -> Any:
        if (name, quantized) not in cache:
            recipe, _ = load_recipe("qlora-qa", [f"model.name_or_path={arch_dir(name)}"])
            quant = quantization_config(recipe.adapter.quant, torch.float32) if quantized else None
            cache[name, quantized] = models.load_model(recipe.model, str(arch_dir(name)), torch.float32, quant,
                                                       torch.device("cpu"))
        return cache[name, quantized]

    return get


def _expected_kv_heads(name: str) -> int:
    shape = ARCHS[name]["shape"]
    if shape.get("multi_query") and not shape.get("new_decoder_architecture"):
        return 1  # Falcon-7B style: one key/value head
    return shape.get("num_key_value_heads", 4)


@pytest.mark.parametrize("name", NAMES)
def test_plan_reads_the_shape(arch_dir, name):
    """The sizes the memory formula uses: every architecture here is 64 wide, 2 layers, 4 heads of 16,
    a 128-wide MLP."""
    from transformers import AutoConfig

    from adapterkit import plan

    a = plan.architecture(AutoConfig.from_pretrained(arch_dir(name)))
    got = dict(hidden=a.hidden, layers=a.layers, heads=a.heads, kv_heads=a.kv_heads, head_dim=a.head_dim,
               intermediate=a.intermediate)
    assert got == dict(hidden=HIDDEN, layers=LAYERS, heads=4, kv_heads=_expected_kv_heads(name), head_dim=16,
                       intermediate=FFN)


@pytest.mark.parametrize("name", NAMES)
def test_plan_counts_the_parameters(arch_dir, loaded, name):
    from transformers import AutoConfig

    from adapterkit import plan

    arch = plan.architecture(AutoConfig.from_pretrained(arch_dir(name)))
    assert arch.parameters == sum(p.numel() for p in loaded(name, False).parameters())


@pytest.mark.parametrize("name", NAMES)
def test_plan_counts_the_4bit_matrices(arch_dir, loaded, name):
    import bitsandbytes as bnb
    from transformers import AutoConfig

    from adapterkit import plan

    arch = plan.architecture(AutoConfig.from_pretrained(arch_dir(name)))
    if (name, "qlora") in REFUSED:  # nothing is quantised: the plan says so, and loading in 4-bit is refused
        assert arch.quantized_matrices == 0
        with pytest.raises(AdapterkitError, match=REFUSED[name, "qlora"]):
            loaded(name, True)
        return
    actual = sum(isinstance(m, bnb.nn.Linear4bit) for m in loaded(name, True).modules())
    assert arch.quantized_matrices == actual, f"planned {arch.quantized_matrices}, loaded {actual}"


# ---------------------------------------------------------------------------------------------
# refusals through the CLI


@pytest.mark.parametrize("name, cell", sorted(REFUSED), ids=[f"{n}-{c}" for n, c in sorted(REFUSED)])
def test_refusal_exits_2_saying_why(arch_dir, tmp_path, capsys, name, cell):
    from adapterkit.cli import main

    recipe_name, extra = RUNS[cell]
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as done:
        main(["recipe", "run", recipe_name, f"model.name_or_path={arch_dir(name)}", *COMMON, *extra,
              f"output_dir={out}"])
    err = capsys.readouterr().err
    assert done.value.code == 2, err[-2000:]
    assert REFUSED[name, cell] in err and "Traceback" not in err, err[-2000:]
    assert err.startswith("error: ") and not (out.exists() and any(out.iterdir())), "the output dir was written"


# ---------------------------------------------------------------------------------------------
# GGUF export (llama.cpp, Ollama)

GGUF_NAMES = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3"]


def _gguf(run_dir, out, *flags):
    from adapterkit.cli import main

    with pytest.raises(SystemExit) as done:
        main(["export", str(run_dir), "--out", str(out), "--format", "gguf", *flags])
    return done.value.code


@pytest.mark.parametrize("name", GGUF_NAMES)
def test_gguf_export_reproduces_the_trained_model(runs, tmp_path, name, capsys):
    """The file, read back by transformers, holds the merged weights exactly as rounded (f16), stays within
    f16's bound of the model as trained, and carries the tokenizer (same ids, same EOS)."""
    run_dir = runs(name, "lora").result().out
    out = tmp_path / "gguf"
    assert _gguf(run_dir, out) == 0, capsys.readouterr().err[-3000:]
    info = json.loads((out / "export.json").read_text())
    p = info["parity"]
    assert p["passed"] and p["tokenizer_identical"] and p["eos_identical"], p
    assert p["file"]["max_abs_logit_diff"] <= p["file"]["tolerance"] and p["file"]["greedy_identical"] == p["file"]["rows"]
    assert 0 < p["trained"]["max_abs_logit_diff"] <= p["trained"]["tolerance"], p["trained"]  # f16 rounds a little
    assert (out / "model-f16.gguf").stat().st_size == info["bytes"]
    modelfile = (out / "Modelfile").read_text()
    assert "FROM ./model-f16.gguf" in modelfile and "PARAMETER stop" in modelfile
    chat = TEMPLATES[ARCHS[name]["chat"]][0]
    if chat is None:  # the plain template: the instruction and cue around what the user types
        assert 'TEMPLATE """Classify the sentiment' in modelfile and "Text: {{ .Prompt }}\nSentiment:" in modelfile
    elif "<|im_start|>" in chat:
        assert "<|im_start|>user\n{{ .Prompt }}<|im_end|>" in modelfile and 'PARAMETER stop "<|im_end|>"' in modelfile
    # The metadata llama.cpp reads, as written.
    import gguf

    reader = gguf.GGUFReader(str(out / "model-f16.gguf"))
    arch = info["architecture"]
    fields = {f.name: f for f in reader.fields.values()}
    block = fields[f"{arch}.block_count"]
    assert int(block.parts[block.data[0]][0]) == LAYERS
    assert f"{arch}.attention.head_count_kv" in fields and "tokenizer.ggml.merges" in fields
    assert ("tokenizer.chat_template" in fields) == (TEMPLATES[ARCHS[name]["chat"]][0] is not None)


@pytest.mark.parametrize("quant, kinds", [("f32", {"f32"}), ("bf16", {"f32", "bf16"}), ("q8_0", {"f32", "q8_0"}),
                                          ("q4_0", {"f32", "q4_0", "q8_0"})])
def test_gguf_quant_types_are_checked_against_their_own_rounding(runs, tmp_path, quant, kinds, capsys):
    run_dir = runs("llama", "lora").result().out
    out = tmp_path / quant
    assert _gguf(run_dir, out, "--quant", quant) == 0, capsys.readouterr().err[-3000:]
    info = json.loads((out / "export.json").read_text())
    p = info["parity"]
    assert set(info["tensor_types"]) == kinds and p["passed"], (info["tensor_types"], p)
    # Whatever the quant type, the reloaded file equals the weights as it rounds them.
    assert p["file"]["max_abs_logit_diff"] <= 1e-4 * max(1.0, p["file"]["logit_scale"]), p["file"]
    if quant == "f32":
        assert p["trained"]["max_abs_logit_diff"] <= 1e-4 * max(1.0, p["trained"]["logit_scale"])
    if quant in ("q8_0", "q4_0"):  # what a block quant costs is reported, not bounded (null in the JSON)
        assert p["trained"]["tolerance"] is None and p["trained"]["max_abs_logit_diff"] > 0


def test_gguf_without_the_llama_permutation_fails_its_check(runs, tmp_path, monkeypatch, capsys):
    """Written without llama.cpp's q/k row order, transformers (which undoes that order) reads other weights
    than the source's: the check against the source catches it, and nothing is left at --out."""
    from adapterkit import export_gguf

    monkeypatch.setattr(export_gguf, "permute", lambda w, heads: w)
    out = tmp_path / "broken"
    assert _gguf(runs("llama", "lora").result().out, out, "--quant", "f32") == 3
    err = capsys.readouterr().err
    assert "the file differs from the weights it should hold" in err and not out.exists()


def test_gguf_refuses_what_it_cannot_write_before_any_work(runs, tmp_path, capsys):
    out = tmp_path / "no"
    assert _gguf(runs("gpt2", "lora").result().out, out) == 2
    err = capsys.readouterr().err
    assert "architecture 'gpt2' cannot be exported to GGUF" in err and "qwen3" in err and "convert_hf_to_gguf" in err
    assert _gguf(runs("llama", "lora").result().out, out, "--quant", "q4_k_m") == 2
    err = capsys.readouterr().err
    assert "K-quant" in err and "llama-quantize" in err and "Q4_K_M" in err
    assert _gguf(runs("llama", "lora").result().out, out, "--quant", "q9") == 2
    assert "not a GGUF type" in capsys.readouterr().err
    assert not out.exists()


def test_a_sentencepiece_tokenizer_is_refused_by_name():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from adapterkit.export_gguf import tokenizer_problem

    spm = Tokenizer(models.BPE(vocab={"<unk>": 0, "▁a": 1}, merges=[], byte_fallback=True, unk_token="<unk>"))
    spm.pre_tokenizer = pre_tokenizers.Metaspace()
    assert "SentencePiece" in tokenizer_problem(PreTrainedTokenizerFast(tokenizer_object=spm))


def test_llama3_rope_factors_match_transformers():
    """rope_freqs (Llama 3.1's long-context RoPE, which llama.cpp divides each frequency by) agrees with
    transformers' own llama3 RoPE frequencies."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from adapterkit.export_gguf import llama3_rope_factors

    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    config = LlamaConfig(hidden_size=512, num_attention_heads=4, max_position_embeddings=131072, rope_parameters=rope)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    plain = 1.0 / (500000.0 ** (torch.arange(0, 128, 2, dtype=torch.float64) / 128))
    factors = torch.tensor(llama3_rope_factors(config), dtype=torch.float64)
    assert factors.min() == 1.0 and factors.max() == 8.0
    assert torch.allclose(plain / factors, scaled.double(), rtol=1e-5)


def test_gguf_of_a_qlora_run_holds_the_adapter_merged_into_its_nf4_weights(runs, tmp_path, capsys):
    out = tmp_path / "qlora"
    assert _gguf(runs("llama", "qlora").result().out, out, "--quant", "f32") == 0, capsys.readouterr().err[-3000:]
    p = json.loads((out / "export.json").read_text())["parity"]
    assert p["passed"] and p["trained"]["greedy_identical"] == p["trained"]["rows"], p
    assert p["trained"]["max_abs_logit_diff"] <= 1e-4 * max(1.0, p["trained"]["logit_scale"])


def test_gguf_names_the_pre_tokenizer_llama_cpp_splits_with():
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    from adapterkit.export_gguf import _pre_tokenizer, _tokenizer_json

    def named(pre):
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre
        return _pre_tokenizer(_tokenizer_json(PreTrainedTokenizerFast(tokenizer_object=tok)))

    llama3 = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(GGUF_PRE_TOKENIZER_SPLITS["llama-bpe"]), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    assert named(llama3) in ("llama3", "llama-bpe", "llama-v3")
    assert named(pre_tokenizers.ByteLevel(add_prefix_space=False)) == "gpt-2"
    assert named(pre_tokenizers.Whitespace()) is None
