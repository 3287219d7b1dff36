"""GGUF export for llama.cpp, Ollama and LM Studio: one .gguf file of the merged model, written offline by
the `gguf` package (llama.cpp's own Python writer), and checked against the trained model.

    adapterkit export runs/s1 --out exported/s1-gguf --format gguf               # f16
    adapterkit export runs/s1 --out exported/s1-q8 --format gguf --quant q8_0

Top to bottom: check the arguments, the architecture and the tokenizer before anything is loaded; load
the model as trained and record its logits and greedy continuations on the run's parity batch (as the
merged export does); merge in float32; write the tensors under llama.cpp's names and layout (Llama and
Mistral attention rows permuted as llama.cpp's RoPE expects, Gemma norms stored as 1 + w), quantised
by the `gguf` package, with the model's hyperparameters, the tokenizer (vocabulary, merges, token types,
special ids, BOS habit, chat template) and an Ollama Modelfile beside it. Then two checks, both
against the source rather than one loader against another:
- the file: load it back with transformers (which dequantises and undoes the permutation) and compare
  with the merged weights rounded exactly as the file rounds them: this is a float32 comparison at
  every quant type, so a wrong layout or a missing permutation fails it;
- the quantisation: the same reloaded model against the model as trained (max |Δlogits|, greedy
  agreement), with a bound per quant type; and the tokenizer read from the file must give the same
  ids and EOS.
Only an export that passes both (or is forced) is moved into place, with the numbers in export.json.
"""

from __future__ import annotations

import contextlib
import gc
import io
import json
import math
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from adapterkit import export as hf_export
from adapterkit import models, rundir
from adapterkit.adapters import METHODS
from adapterkit.config import load_recipe
from adapterkit.data.formatter import Formatter
from adapterkit.errors import AdapterkitError, ConfigError, Problem, did_you_mean
from adapterkit.trained import Trained, load_trained, locate

QUANTS = ("f32", "f16", "bf16", "q8_0", "q4_0")
"""What the `gguf` package writes itself. K-quants (q4_k_m, ...) need llama.cpp's llama-quantize."""
DEFAULT_QUANT = "f16"
LLAMA_QUANTIZE = "llama-quantize {file} {stem}-{kind}.gguf {kind}   (from llama.cpp), starting from a --quant f16 or f32 export"

# The file must hold the merged weights as rounded by its quant type: reloaded, it reproduces them to float32
# precision (measured: 0.0 for f32 on tiny models; reordered sums elsewhere), whatever the quant type.
FILE_RTOL = 1e-4
# Against the model as trained, rounding to a float type costs this much at most (x max(1, largest |logit|)):
# measured on 64-wide random test models (wide init), f16 0.6% and bf16 up to 6% of the logit scale; the
# bounds leave room for that and catch a lost adapter or a wrong base, not rounding. The block quants (q8_0, q4_0) are reported, not bounded: what they cost
# depends on the model (64-wide random test models lose 15% of the logit scale at q8_0; see the README), and
# their file is still checked exactly by the first comparison.
QUANT_RTOL = {"f32": 1e-4, "f16": 3e-2, "bf16": 1.5e-1, "q8_0": float("inf"), "q4_0": float("inf")}


@dataclass(frozen=True)
class GgufArch:
    """How one transformers architecture is written as llama.cpp expects it."""

    name: str
    """llama.cpp's architecture (gguf.MODEL_ARCH member)."""
    permute_qk: bool = False
    """Llama-family attention: q/k rows reordered from HF's rotate-half RoPE to llama.cpp's interleaved pairs."""
    norm_plus_one: bool = False
    """Gemma: RMSNorm computes x * (1 + w); llama.cpp stores 1 + w."""
    writes_output: bool = True
    """Whether an untied lm_head is written (Gemma 2's is always the embedding)."""


ARCHS: dict[str, GgufArch] = {
    "llama": GgufArch("LLAMA", permute_qk=True),
    "mistral": GgufArch("LLAMA", permute_qk=True),  # llama.cpp reads Mistral as llama
    "qwen2": GgufArch("QWEN2"),
    "qwen3": GgufArch("QWEN3"),
    "gemma2": GgufArch("GEMMA2", norm_plus_one=True, writes_output=False),
    "gemma3_text": GgufArch("GEMMA3", norm_plus_one=True),
    "phi3": GgufArch("PHI3"),
}
SUPPORTED = "llama, mistral, qwen2, qwen3, gemma2, gemma3 (text), phi3"


# -- checks before any work ------------------------------------------------------------------------------

def check_quant(quant: str) -> str:
    q = quant.lower()
    if q in QUANTS:
        return q
    if q.startswith(("q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "q8_k", "iq")):
        raise ConfigError(Problem("--quant", f"'{quant}' is a llama.cpp K-quant (or i-quant), which the gguf "
                                  "package can read but not write",
                                  fix="export --quant f16 (or f32), then quantise with llama.cpp: "
                                      + LLAMA_QUANTIZE.format(file="model-f16.gguf", stem="model", kind=q.upper())))
    hint = did_you_mean(q, QUANTS)
    raise ConfigError(Problem("--quant", f"'{quant}' is not a GGUF type adapterkit writes" + (f" ({hint})" if hint else ""),
                              fix=f"use one of: {', '.join(QUANTS)}"))


def check_model(config: Any, tokenizer: Any, where: str) -> GgufArch:
    """The architecture's writer, or exit 2 naming what cannot be written."""
    model_type = getattr(config, "model_type", None)
    arch = ARCHS.get(model_type)  # "gemma3" is the multimodal wrapper; its text model is "gemma3_text"
    problems = []
    if arch is None:
        problems.append(Problem(where, f"architecture '{model_type}' cannot be exported to GGUF by adapterkit",
                                "--format", fix=f"supported: {SUPPORTED}. For others, export the merged model "
                                "(adapterkit export RUN --out DIR) and convert it with llama.cpp's "
                                "convert_hf_to_gguf.py"))
    rope = _rope(config)
    if arch is not None and rope.get("rope_type", "default") not in ("default", None, "linear", "llama3"):
        problems.append(Problem(where, f"RoPE scaling '{rope.get('rope_type')}' is not written to GGUF yet",
                                "--format", fix="export the merged model (adapterkit export RUN --out DIR) and "
                                "convert it with llama.cpp's convert_hf_to_gguf.py"))
    why = tokenizer_problem(tokenizer)
    if why:
        problems.append(Problem(where, f"the tokenizer cannot be written to GGUF: {why}", "--format",
                                fix="export the merged model (adapterkit export RUN --out DIR) and convert it "
                                    "with llama.cpp's convert_hf_to_gguf.py, which reads SentencePiece models"))
    if problems:
        raise ConfigError(problems)
    return arch


def _rope(config: Any) -> dict[str, Any]:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if isinstance(params, dict) and "full_attention" in params:  # per layer type (Gemma 3): the global one
        params = params["full_attention"]
    return dict(params) if isinstance(params, dict) else {}


def _tokenizer_json(tokenizer: Any) -> dict[str, Any] | None:
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    return json.loads(backend.to_str()) if backend is not None else None


def tokenizer_problem(tokenizer: Any) -> str | None:
    """Why the tokenizer cannot be written as llama.cpp's byte-level BPE ("gpt2") vocabulary, or None."""
    spec = _tokenizer_json(tokenizer)
    if spec is None:
        return "it has no tokenizers (fast) backend"
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        return f"it is a {model.get('type')} model, and adapterkit writes byte-level BPE vocabularies only"
    if model.get("byte_fallback") or not _byte_level(spec):
        return "it is a SentencePiece-style BPE (byte fallback, no byte-level pre-tokenizer), as Llama 2, Mistral " \
               "7B, Gemma and Phi-3 ship; adapterkit writes byte-level BPE vocabularies only"
    return None


def _byte_level(spec: dict[str, Any]) -> bool:
    def walk(node: Any) -> bool:
        if isinstance(node, dict):
            return node.get("type") == "ByteLevel" or any(walk(v) for v in node.values())
        if isinstance(node, list):
            return any(walk(v) for v in node)
        return False

    return walk(spec.get("pre_tokenizer")) or walk(spec.get("decoder"))


# -- writing -------------------------------------------------------------------------------------------------

def _qtype(quant: str) -> Any:
    import gguf

    return {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
            "bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0,
            "q4_0": gguf.GGMLQuantizationType.Q4_0}[quant]


def _file_type(quant: str) -> int:
    import gguf

    return int({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
                "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[quant])


def permute(w: np.ndarray, heads: int) -> np.ndarray:
    """HF's rotate-half q/k rows to llama.cpp's interleaved RoPE pairs: within each head, row i of the first
    half and row i of the second half become rows 2i and 2i + 1."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tensor_type(name: str, array: np.ndarray, quant: str) -> str:
    """llama.cpp's choice per tensor: 1-D tensors and norms stay f32; with q4_0 the embedding and output
    matrices keep q8_0 (llama-quantize keeps them at 6 bits or more); a row not divisible by the 32-value
    block falls back to f16."""
    if array.ndim < 2 or name.endswith("_norm.weight") or quant == "f32":
        return "f32"
    if quant in ("q8_0", "q4_0") and array.shape[-1] % 32:
        return "f16"
    if quant == "q4_0" and name.split(".")[0] in ("token_embd", "output"):
        return "q8_0"
    return quant


def _stored(array: np.ndarray, kind: str) -> tuple[np.ndarray, Any, np.ndarray]:
    """(what add_tensor takes, its raw dtype or None, the float32 values the file will hold)."""
    import gguf

    if kind == "f32":
        a = np.ascontiguousarray(array, dtype=np.float32)
        return a, None, a
    if kind == "f16":
        a = array.astype(np.float16)
        return a, None, a.astype(np.float32)
    qtype = _qtype(kind)
    q = gguf.quants.quantize(array, qtype)
    return q, qtype, gguf.quants.dequantize(q, qtype).reshape(array.shape).astype(np.float32)


def write_gguf(model: Any, trained: Trained, arch: GgufArch, quant: str, path: Path,
               name: str) -> tuple[dict[str, str], dict[str, Any]]:
    """Write `model` (merged, float32) to `path`. Rewrites every weight of `model` in place to the values the
    file holds (rounded as its type rounds them), for the file check. Returns each tensor's type, and the
    metadata written."""
    import gguf

    config = model.config
    text = getattr(config, "text_config", None) or config
    mapping = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch.name), text.num_hidden_layers)
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[getattr(gguf.MODEL_ARCH, arch.name)])
    meta = _hyperparameters(writer, text, arch, quant, name)
    meta.update(_tokenizer(writer, trained, text.vocab_size))
    heads, kv_heads = text.num_attention_heads, getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    tied = bool(getattr(config, "tie_word_embeddings", False))
    types: dict[str, str] = {}
    with torch.no_grad():
        for key, param in model.state_dict(keep_vars=True).items():
            if key.endswith("lm_head.weight") and (tied or not arch.writes_output):
                continue
            target = mapping.get_name(key, try_suffixes=(".weight", ".bias"))
            if target is None:
                raise AdapterkitError(Problem(key, f"has no llama.cpp tensor name for {arch.name.lower()}",
                                              fix="report this model to adapterkit; export the merged model and "
                                                  "convert it with llama.cpp's convert_hf_to_gguf.py meanwhile"))
            values = param.detach().float().cpu().numpy()
            if arch.norm_plus_one and key.endswith("norm.weight"):
                values = values + 1.0
            if arch.permute_qk and (".q_proj." in key or ".k_proj." in key):
                values = permute(values, heads if ".q_proj." in key else kv_heads)
            kind = _tensor_type(target, values, quant)
            data, raw, held = _stored(values, kind)
            writer.add_tensor(target, data, raw_dtype=raw)
            types[target] = kind
            # The model now computes with what the file holds: undo the layout changes on the rounded values.
            if arch.permute_qk and (".q_proj." in key or ".k_proj." in key):
                held = unpermute(held, heads if ".q_proj." in key else kv_heads)
            if arch.norm_plus_one and key.endswith("norm.weight"):
                held = held - 1.0
            param.data.copy_(torch.from_numpy(np.ascontiguousarray(held)).to(param.dtype))
    factors = llama3_rope_factors(text)
    if factors is not None:  # llama.cpp divides each RoPE frequency by these (Llama 3.1's long context)
        writer.add_tensor("rope_freqs.weight", factors)
        types["rope_freqs.weight"] = "f32"
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return types, meta


def llama3_rope_factors(text: Any) -> np.ndarray | None:
    """Llama 3's RoPE scaling as llama.cpp takes it: per frequency, the divisor (1 for short wavelengths,
    `factor` for long ones, smoothly in between), or None for another RoPE."""

    rope = _rope(text)
    if rope.get("rope_type") != "llama3":
        return None
    theta = rope.get("rope_theta", getattr(text, "rope_theta", 10000.0))
    dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    old = rope["original_max_position_embeddings"]
    out = []
    for i in range(0, dim, 2):
        wavelen = 2 * math.pi * theta ** (i / dim)
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(float(factor))
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _hyperparameters(writer: Any, text: Any, arch: GgufArch, quant: str, name: str) -> dict[str, Any]:
    import gguf

    heads = text.num_attention_heads
    kv = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    rope = _rope(text)
    theta = rope.get("rope_theta", getattr(text, "rope_theta", 10000.0))
    meta: dict[str, Any] = {
        "context_length": text.max_position_embeddings, "embedding_length": text.hidden_size,
        "block_count": text.num_hidden_layers, "feed_forward_length": text.intermediate_size,
        "head_count": heads, "head_count_kv": kv, "rope_freq_base": float(theta),
        "layer_norm_rms_eps": float(text.rms_norm_eps), "key_length": head_dim, "value_length": head_dim,
        "rope_dimension_count": int(head_dim * rope.get("partial_rotary_factor",
                                                        getattr(text, "partial_rotary_factor", 1.0))),
        "vocab_size": text.vocab_size,
    }
    writer.add_name(name)
    writer.add_context_length(meta["context_length"])
    writer.add_embedding_length(meta["embedding_length"])
    writer.add_block_count(meta["block_count"])
    writer.add_feed_forward_length(meta["feed_forward_length"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_freq_base(meta["rope_freq_base"])
    writer.add_rope_dimension_count(meta["rope_dimension_count"])
    writer.add_layer_norm_rms_eps(meta["layer_norm_rms_eps"])
    writer.add_vocab_size(meta["vocab_size"])
    kind = rope.get("rope_type", "default")
    if kind == "linear":
        meta["rope_scaling"] = {"type": "linear", "factor": float(rope["factor"])}
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    window = getattr(text, "sliding_window", None)
    if arch.name in ("GEMMA2", "GEMMA3", "PHI3"):  # as llama.cpp's converter writes them
        meta["sliding_window"] = int(window or 0)
        writer.add_sliding_window(meta["sliding_window"])
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        value = getattr(text, key, None)
        if value:
            meta[key] = float(value)
            getattr(writer, f"add_{key}")(float(value))
    if arch.name == "PHI3" and getattr(text, "original_max_position_embeddings", None):
        meta["rope_scaling_orig_ctx_len"] = text.original_max_position_embeddings
        writer.add_rope_scaling_orig_ctx_len(text.original_max_position_embeddings)
    writer.add_file_type(_file_type(quant))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    return meta


def _tokenizer(writer: Any, trained: Trained, n_vocab: int) -> dict[str, Any]:
    """llama.cpp's byte-level BPE vocabulary: every id up to the embedding's rows (unused ones padded), the
    merges, token types, special ids, whether BOS is added, and the chat template."""
    import gguf

    tok = trained.tokenizer
    spec = _tokenizer_json(tok)
    vocab = tok.get_vocab()
    by_id = {i: t for t, i in vocab.items()}
    added = {a.content: a for a in tok.added_tokens_decoder.values()}
    tokens, types = [], []
    for i in range(max(n_vocab, max(by_id) + 1)):
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(int(gguf.TokenType.UNUSED))
        else:
            tokens.append(token)
            a = added.get(token)
            types.append(int(gguf.TokenType.CONTROL if a is not None and a.special else
                             gguf.TokenType.USER_DEFINED if a is not None else gguf.TokenType.NORMAL))
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    pre = _pre_tokenizer(spec)
    if pre:
        writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    eos = tok.eos_token_id
    ids = {"bos": tok.bos_token_id, "eos": eos, "pad": tok.pad_token_id, "unk": tok.unk_token_id}
    for what, value in ids.items():
        if value is not None:
            getattr(writer, {"unk": "add_unk_token_id"}.get(what, f"add_{what}_token_id"))(int(value))
    adds_bos = _adds_bos(tok)
    writer.add_add_bos_token(adds_bos)
    writer.add_add_eos_token(False)
    template = (trained.spec.chat_template if trained.spec is not None and trained.spec.mode == "chat_template"
                else None) or getattr(tok, "chat_template", None)
    if isinstance(template, str) and template:
        writer.add_chat_template(template)
    return {"tokenizer": {"model": "gpt2", "pre": pre, "tokens": len(tokens), "merges": len(merges),
                          **{f"{k}_token_id": v for k, v in ids.items()}, "add_bos_token": adds_bos,
                          "chat_template": bool(template)}}


def _adds_bos(tok: Any) -> bool:
    bos = tok.bos_token_id
    return bos is not None and tok("a").input_ids[:1] == [bos]


def _pre_tokenizer(spec: dict[str, Any]) -> str | None:
    """llama.cpp's name for the pre-tokenizer, where its split regex is one of the named ones (the table
    transformers reads GGUF files with, keyed by llama.cpp's names); GPT-2's for a plain ByteLevel split."""
    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS
    except ImportError:
        GGUF_PRE_TOKENIZER_SPLITS = {}  # noqa: N806

    def nodes(node: Any) -> list[dict[str, Any]]:
        if not isinstance(node, dict):
            return []
        return [node, *(n for child in node.get("pretokenizers", []) for n in nodes(child))]

    found = nodes(spec.get("pre_tokenizer"))
    for node in found:
        pattern = node.get("pattern", {}).get("Regex") if node.get("type") == "Split" else None
        for name, regex in GGUF_PRE_TOKENIZER_SPLITS.items():
            if pattern is not None and pattern == regex:
                return name
    if any(n.get("type") == "ByteLevel" and n.get("use_regex", True) for n in found):
        return "gpt-2"
    return None


# -- Ollama ----------------------------------------------------------------------------------------------------

def modelfile(trained: Trained, gguf_name: str, context: int, stop_ids: list[int]) -> str:
    """An Ollama Modelfile: the file, the prompt template the fine-tune learned, its stop tokens."""
    tok = trained.tokenizer
    lines = ["# Ollama: ollama create NAME -f Modelfile && ollama run NAME", f"FROM ./{gguf_name}"]
    spec = trained.spec
    stops = []
    if spec is not None and spec.mode == "chat_template":
        template = getattr(tok, "chat_template", None) or spec.chat_template or ""
        if "<|im_start|>" in template:
            lines.append('TEMPLATE """{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}'
                         '<|im_start|>user\n{{ .Prompt }}<|im_end|>\n<|im_start|>assistant\n"""')
            stops.append("<|im_end|>")
        else:
            lines.append("# TEMPLATE: Ollama takes the chat template from the GGUF file (tokenizer.chat_template)")
    elif spec is not None:
        lines += _plain_template(Formatter(spec, tok, trained.recipe.data.columns))
    for token_id in stop_ids:
        text = tok.convert_ids_to_tokens(token_id)
        if text and text not in stops:
            stops.append(text)
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    lines.append(f"PARAMETER num_ctx {context}")
    return "\n".join(lines) + "\n"


SLOT = "\u0000PROMPT\u0000"


def _plain_template(formatter: Formatter) -> list[str]:
    """The run's plain prompt around what the user types: the task's instruction, labels and cue, with
    the one input field as `{{ .Prompt }}` (a task with several inputs, such as qa, gets the cue only)."""
    task = formatter.task
    inputs = [f for f in task.required if f != task.target and f not in ("chosen", "rejected", "label")]
    if len(inputs) == 1:
        row = {f: "" for f in task.fields} | {inputs[0]: SLOT}
        try:
            text = formatter.prompt_text(row)
        except (KeyError, TypeError, ValueError):
            text = None
        if text and text.count(SLOT) == 1:
            return [f'TEMPLATE """{text.replace(SLOT, "{{ .Prompt }}")}"""']
    system = f"{formatter.spec.system_prompt}\n\n" if formatter.spec.system_prompt else ""
    return [f"# the run's prompts have several fields ({', '.join(inputs)}): type them as its template writes them",
            f'TEMPLATE """{system}{{{{ .Prompt }}}}' + (f"\n{task.cue}" if task.cue else "") + '"""']


def _stop_ids(trained: Trained) -> list[int]:
    gen = getattr(trained.model, "generation_config", None) if trained.model is not None else None
    eos = getattr(gen, "eos_token_id", None) if gen is not None else None
    if eos is None:
        eos = trained.tokenizer.eos_token_id
    return [e for e in (eos if isinstance(eos, list) else [eos]) if e is not None]


# -- the export ----------------------------------------------------------------------------------------------

@dataclass
class GgufParity:
    file: hf_export.Parity
    """The reloaded file against the merged weights as the file rounds them: must hold at float32 precision."""
    trained: hf_export.Parity
    """The reloaded file against the model as trained: what the quantisation costs."""
    tokenizer_identical: bool
    eos_identical: bool
    llama_cpp: dict[str, Any]

    @property
    def passed(self) -> bool:
        return self.file.passed and self.trained.passed and self.tokenizer_identical and self.eos_identical


def export_gguf(path: str | Path, out: str | Path, quant: str = DEFAULT_QUANT, base: str | None = None,
                force: bool = False, say: Callable[..., None] = print) -> dict[str, Any]:
    """Export the run at `path` as one GGUF file in the directory `out` (with a Modelfile and export.json),
    checked against the model as trained; return export.json."""
    run_dir, model_dir = locate(path)
    if run_dir is None:
        raise AdapterkitError(Problem(str(path), "is a model directory, not an adapterkit run: export checks parity "
                                      "on the run's own data and records its lineage",
                                      fix="pass the run's output_dir (the folder with manifest.json)"))
    quant = check_quant(quant)
    method = METHODS[rundir.read_manifest(run_dir)["method"]]
    out = Path(out).expanduser()
    problems = hf_export._check_out(out, force, run_dir)
    if method.family == "soft_prompt":
        problems.append(Problem("--format", f"a {method.name} adapter cannot be merged into the weights, and a GGUF "
                                "file holds weights only", fix="export it as an adapter (--no-merge)"))
    if base is not None and base not in hf_export.MERGE_BASES:
        problems.append(Problem("--base", f"'{base}' is not a merge base",
                                fix=f"use one of: {', '.join(hf_export.MERGE_BASES)}"))
    if problems:
        raise AdapterkitError(problems)
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(str(model_dir)) if (model_dir / "config.json").is_file() else None
    if config is None:
        manifest = rundir.read_manifest(run_dir)
        recipe, _ = load_recipe(str(run_dir / "recipe.yaml"))
        config = models.load_config(recipe.model, manifest["model_source"])
    arch = check_model(config, AutoTokenizer.from_pretrained(str(model_dir)), str(run_dir))

    trained = load_trained(run_dir)
    if trained.spec is None:
        raise AdapterkitError(Problem(str(model_dir), "has no format.json, so the run's data cannot be formatted "
                                      "for the parity check", fix="re-run the recipe to write the final model again"))
    batch = hf_export.parity_batch(trained)
    say(f"parity batch: {len(batch.sequences)} rows of {batch.source}")
    reference = hf_export.model_outputs(trained.model, batch, trained.tokenizer)
    dev = next(trained.model.parameters()).device
    stops = _stop_ids(trained)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = rundir.make_temp_dir(out.parent, f".{out.name}.export-")
    gguf_name = f"model-{quant}.gguf"
    try:
        merged, weights = hf_export._merge(trained, torch.float32, base or "quantized", dev)
        say(f"weights: {weights}")
        merged = merged.float().cpu()
        text = getattr(merged.config, "text_config", None) or merged.config
        types, meta = write_gguf(merged, trained, arch, quant, tmp / gguf_name, run_dir.name)
        size = (tmp / gguf_name).stat().st_size
        say(f"wrote {gguf_name}: {size / 2**20:,.1f} MiB, {len(types)} tensors ({_count(types)})")
        held = hf_export.model_outputs(merged, batch, trained.tokenizer)  # the merged model, rounded as the file is
        source_config = merged.config
        del merged
        gc.collect()
        reloaded = _load_gguf(tmp, gguf_name, source_config)
        outputs = hf_export.model_outputs(reloaded, batch, trained.tokenizer)
        del reloaded
        gc.collect()
        parity = GgufParity(
            file=hf_export.compare(held, outputs, "file", batch.source, rtol=FILE_RTOL, greedy_must_match=True),
            trained=hf_export.compare(reference, outputs, quant, batch.source, rtol=QUANT_RTOL[quant],
                                      greedy_must_match=quant == "f32"),
            **_tokenizer_round_trip(trained, batch, tmp, gguf_name, stops),
            llama_cpp=_llama_cpp(tmp / gguf_name, batch, held))
        info = {
            "format": "gguf", "quant": quant, "file": gguf_name, "bytes": size, "architecture": arch.name.lower(),
            "model_type": text.model_type, "tensor_types": _count(types), "weights": weights,
            "metadata": meta, "run": str(run_dir.resolve()), "method": method.name,
            "parity": {"file": _finite(asdict(parity.file)), "trained": _finite(asdict(parity.trained)),
                       "tokenizer_identical": parity.tokenizer_identical, "eos_identical": parity.eos_identical,
                       "llama_cpp": parity.llama_cpp, "passed": parity.passed},
            "forced": bool(force and not parity.passed), "versions": rundir.versions(),
        }
        rundir.write_json(tmp / "export.json", info)
        rundir.write_atomic(tmp / "Modelfile", modelfile(trained, gguf_name, int(meta["context_length"]), stops))
        if not parity.passed and not force:
            raise hf_export.ParityFailed(Problem(str(out), "the GGUF file does not reproduce the trained model: "
                                                 + _failure(parity) + "; nothing was written",
                                                 fix=_fix(parity, quant)), parity.trained)
        rundir.publish_dir(tmp, out)
        rundir.fsync_dir(out.parent)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        failure = hf_export.write_failure(e, out)
        if failure is None:
            raise
        raise failure from None
    say(f"file check ({'passed' if parity.file.passed else 'FAILED'}): {parity.file.summary()}")
    cost = parity.trained.summary()
    if parity.trained.tolerance == float("inf"):
        cost = cost.replace(f"(tolerance inf for {quant})", f"(reported, not bounded, for {quant})")
    say(f"against the trained model ({'passed' if parity.trained.passed else 'FAILED'}): {cost}")
    say(f"tokenizer from the file: {'same ids and EOS' if parity.tokenizer_identical and parity.eos_identical else 'DIFFERS'}"
        f"; llama.cpp: {parity.llama_cpp.get('status')}")
    if not parity.passed:
        say("written because of --force")
    say(f"exported {out / gguf_name} ({quant}); run it: llama-cli -m {out / gguf_name}, or "
        f"cd {out} && ollama create {run_dir.name} -f Modelfile")
    return info


def _finite(numbers: dict[str, Any]) -> dict[str, Any]:
    """export.json is standard JSON: an unbounded tolerance is null, not Infinity."""
    return {k: None if isinstance(v, float) and math.isinf(v) else v for k, v in numbers.items()}


def _count(types: dict[str, str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for kind in types.values():
        counts[kind] = counts.get(kind, 0) + 1
    return counts


def _load_gguf(directory: Path, name: str, config: Any) -> Any:
    """The file as transformers reads it (dequantised to float32, the permutation and norm offsets undone),
    into the source's own config: transformers' GGUF reader does not restore every hyperparameter (Qwen 3's
    head_dim, Gemma 2's query scaling), and the comparison is about the tensors."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    if config.model_type == "mistral":  # written as llama (as llama.cpp reads it), and read back as such
        from transformers import LlamaConfig

        config = LlamaConfig.from_dict({**config.to_dict(), "model_type": "llama"})
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        # Its plain tqdm bar ("Converting and de-quantizing GGUF tensors") is not shown: the export says what
        # it does. An error still propagates.
        with contextlib.redirect_stderr(io.StringIO()):
            return AutoModelForCausalLM.from_pretrained(str(directory), gguf_file=name, config=config,
                                                        dtype=torch.float32).eval()
    finally:
        hf_logging.set_verbosity(level)


def _tokenizer_round_trip(trained: Trained, batch: hf_export.ParityBatch, directory: Path, name: str,
                          stops: list[int]) -> dict[str, bool]:
    """The tokenizer rebuilt from the file must give the parity rows' ids and the same EOS."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        rebuilt = AutoTokenizer.from_pretrained(str(directory), gguf_file=name)
    finally:
        hf_logging.set_verbosity(level)
    tok = trained.tokenizer
    same = True
    for ids in batch.sequences:
        text = tok.decode(ids, skip_special_tokens=False)
        same &= rebuilt(text, add_special_tokens=False).input_ids == tok(text, add_special_tokens=False).input_ids
    eos_same = rebuilt.eos_token_id == tok.eos_token_id and (tok.eos_token_id in stops or not stops)
    return {"tokenizer_identical": bool(same), "eos_identical": bool(eos_same)}


def _llama_cpp(file: Path, batch: hf_export.ParityBatch, held: hf_export.Outputs) -> dict[str, Any]:
    """llama.cpp itself (llama-cpp-python) on the parity rows, where it is installed."""
    try:
        import llama_cpp
    except ImportError:
        return {"status": "skipped: llama-cpp-python is not installed (pip install llama-cpp-python)"}
    llm = llama_cpp.Llama(model_path=str(file), logits_all=True, verbose=False, n_ctx=hf_export.MAX_TOKENS + 8)
    diff = 0.0
    for ids, expected in zip(batch.sequences, held.logits):
        llm.reset()
        llm.eval(ids)
        got = torch.tensor(np.array(llm.scores[: len(ids)]))[-expected.shape[0]:]
        diff = max(diff, (got - expected).abs().max().item())
    scale = max(a.abs().max().item() for a in held.logits)
    return {"status": f"max|Δlogits| {diff:.3g} against the rounded weights", "max_abs_logit_diff": diff,
            "logit_scale": scale}


def _failure(parity: GgufParity) -> str:
    parts = []
    if not parity.file.passed:
        parts.append(f"the file differs from the weights it should hold: {parity.file.summary()}")
    if not parity.trained.passed:
        parts.append(f"against the trained model: {parity.trained.summary()}")
    if not parity.tokenizer_identical:
        parts.append("the tokenizer read from the file splits the parity rows differently")
    if not parity.eos_identical:
        parts.append("the tokenizer read from the file has another EOS")
    return "; ".join(parts)


def _fix(parity: GgufParity, quant: str) -> str:
    if not parity.file.passed or not (parity.tokenizer_identical and parity.eos_identical):
        return "this is a bug in adapterkit's GGUF writer for this model: please report it with export.json " \
               "(pass --force to write the file anyway)"
    return (f"{quant} moved the logits further than rounding to {quant} should: check the run's base dtype, or "
            "export --quant f32 to compare (or pass --force to write it anyway)")
