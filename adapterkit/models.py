"""Models and tokenizers: loading them (hub id or local dir), building them from scratch, and the
device/precision defaults.

Weights are loaded from safetensors only and model code from a hub repository runs only when
the recipe sets `model.trust_remote_code`.
"""

from __future__ import annotations

import functools

from pathlib import Path
from typing import Any, Iterable

import torch

from adapterkit import builtin
from adapterkit.adapters import METHODS
from adapterkit.config.schema import ModelConfig, QuantSettings
from adapterkit.data import chat_templates
from adapterkit.errors import AdapterkitError, ConfigError, Problem
from adapterkit.kernels import nf4

# Llama-style size presets for `model.init: scratch` (parameters excluding embeddings in brackets).
SIZES: dict[str, dict[str, int]] = {
    "tiny": dict(hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=4, intermediate_size=384,
                 max_position_embeddings=512),  # (0.8M)
    "small": dict(hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=8, intermediate_size=1408,
                  max_position_embeddings=1024),  # (26M)
    "base": dict(hidden_size=768, num_layers=12, num_heads=12, num_kv_heads=12, intermediate_size=2048,
                 max_position_embeddings=2048),  # (85M)
}

EOS_TOKEN, PAD_TOKEN = "<|endoftext|>", "<|pad|>"


def processes() -> Any:
    """accelerate's `PartialState` of this run: one process, or several under `accelerate launch` or
    torchrun (DDP, FSDP, DeepSpeed). The first call joins the process group, with the backend the
    Trainer will use (nccl on GPUs, gloo on CPUs)."""
    from datetime import timedelta

    from accelerate import PartialState

    if torch.cuda.is_available():
        return PartialState(timeout=timedelta(seconds=1800))  # the Trainer's ddp_timeout
    return PartialState(cpu=True)


def device() -> torch.device:
    """The device training runs on: the CUDA GPU of this process if there is one (the first GPU, or
    cuda:LOCAL_RANK under `accelerate launch`), else the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    state = processes()
    return state.device if state.num_processes > 1 else torch.device("cuda")


def bf16_supported(dev: torch.device) -> bool:
    """Whether bfloat16 math is fast and supported: Ampere+ GPUs, or CPUs with AVX512-BF16/AMX."""
    if dev.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


# Below this size, bf16 autocast on a CPU costs more in casts than it saves in matmuls (measured on
# the 1.4M-parameter builtin:tiny: 1.4 s per step with autocast, 0.6 s without).
CPU_AUTOCAST_MIN_PARAMS = 50_000_000


def resolve_precision(precision: str, dev: torch.device, n_params: int | None = None) -> str:
    """`auto` -> bf16 where supported (on a CPU only for models of 50M+ parameters), fp16 on older
    GPUs, else fp32. Rejects what the device cannot do."""
    if precision == "auto":
        if dev.type == "cuda":
            return "bf16" if bf16_supported(dev) else "fp16"
        big = n_params is None or n_params >= CPU_AUTOCAST_MIN_PARAMS
        return "bf16" if big and bf16_supported(dev) else "fp32"
    if precision == "fp16" and dev.type != "cuda":
        raise ConfigError(Problem("train.precision", "'fp16' needs a CUDA GPU, and none was found",
                                  fix="use train.precision=auto (bf16 or fp32 on this machine)"))
    if precision == "bf16" and not bf16_supported(dev):
        raise ConfigError(Problem("train.precision", f"'bf16' is not supported on this {dev.type}",
                                  fix="use train.precision=auto"))
    return precision


# Trainer `optim` names of train.optimizer.
OPTIM = {"adamw": "adamw_torch_fused", "adamw_8bit": "adamw_bnb_8bit", "paged_adamw_8bit": "paged_adamw_8bit"}


def resolve_optimizer(name: str, method: str, dev_type: str) -> str:
    """`auto` -> paged 8-bit AdamW for QLoRA on a GPU (QLoRA's own recipe), else AdamW."""
    if name != "auto":
        return name
    return "paged_adamw_8bit" if METHODS[method].quantized_base and dev_type == "cuda" else "adamw"


def resolve_dtype(name: str, trains_base: bool, precision: str) -> torch.dtype:
    """`auto`: float32 when the base itself trains (master weights); a frozen base takes the
    precision's half type (bf16/fp16), or float32 when training in fp32."""
    if name != "auto":
        return getattr(torch, name)
    if trains_base:
        return torch.float32
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)


def load_config(cfg: ModelConfig, source: str) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(source, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as e:
        raise _hub_error("name_or_path", source, e) from None


def max_positions(config: Any) -> int | None:
    """The longest sequence the model's position embeddings cover, from its config (None: it does not say)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(text, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def model_problems(recipe: Any, config: Any, quantized_matrices: int) -> list[Problem]:
    """Why the recipe's method and data.max_length cannot train the model of `config` (none when they
    can), known from the config alone, before any weight is loaded. `quantized_matrices`: the linear layers
    bitsandbytes would make 4-bit."""
    method = METHODS[recipe.adapter.method]
    name = type(config).__name__.removesuffix("Config")
    problems = length_problems(recipe.data.max_length, config, method.virtual_tokens(recipe.adapter))
    if method.quantized_base and quantized_matrices == 0:
        problems.append(Problem("adapter.method", f"'{method.name}': transformers quantises no layer of {name} "
                                "models (bitsandbytes replaces only plain nn.Linear and Conv1D layers), so there "
                                "would be no 4-bit base to train on", fix="use adapter.method=lora (the same "
                                "adapters on the unquantised base)"))
    return problems


def length_problems(max_length: int, config: Any, extra: int = 0) -> list[Problem]:
    """data.max_length (plus `extra` virtual tokens) against the positions the model has."""
    limit = max_positions(config)
    if limit is None or max_length + extra <= limit:
        return []
    virtual = f" plus {extra} virtual tokens" if extra else ""
    return [Problem("data.max_length", f"{max_length}{virtual} is longer than the {limit} positions the model has "
                    f"({type(config).__name__}: max_position_embeddings)",
                    fix=f"use data.max_length={limit - extra} or less")]


def count_parameters(config: Any, trust_remote_code: bool = False) -> int:
    """Parameters of a model, from its config alone (built on the meta device: no memory, no weights)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    return sum(p.numel() for p in model.parameters())


def _looks_local(name: str) -> bool:
    return name.startswith((".", "/", "~")) or Path(name).expanduser().exists() or name.count("/") > 1


def model_source(cfg: ModelConfig) -> str:
    """The directory or hub id weights come from (for a `builtin:` base, its cache directory: the stage
    dispatcher builds it first, `adapterkit.stages.ensure_base`)."""
    if cfg.name_or_path.startswith("builtin:"):
        built = builtin.model_dir(cfg.name_or_path.removeprefix("builtin:"))
        if built is None:
            raise ConfigError(Problem("model.name_or_path", f"'{cfg.name_or_path}' has not been built yet",
                                      fix="run any recipe on it once (it is built on first use), e.g. "
                                          "`adapterkit recipe run lora-sentiment`"))
        return str(built)
    if _looks_local(cfg.name_or_path):
        path = Path(cfg.name_or_path).expanduser()
        if not (path / "config.json").is_file():
            what = "does not exist" if not path.exists() else "has no config.json"
            raise ConfigError(Problem("model.name_or_path", f"'{cfg.name_or_path}' {what}",
                                      fix="pass a model directory saved by transformers, or a hub id like "
                                          "Qwen/Qwen2.5-0.5B"))
        return str(path)
    return cfg.name_or_path


def _hub_error(what: str, name: str, err: Exception) -> AdapterkitError:
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return AdapterkitError(Problem(f"model.{what}", f"could not load '{name}': {first}",
                                   fix="check the hub id or path; without network use a local directory"))


def load_tokenizer(cfg: ModelConfig, source: str) -> Any:
    """The tokenizer at `source` (hub id or dir); gives it a pad token when it has none."""
    from transformers import AutoTokenizer

    name = source
    try:
        tok = AutoTokenizer.from_pretrained(name, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as e:
        raise _hub_error("tokenizer", name, e) from None
    if tok.pad_token is None:
        # Labels come from segment masks, not from pad ids, so pad == eos cannot hide EOS from the loss.
        tok.pad_token = tok.eos_token
    if cfg.chat_template:
        chat_templates.apply(tok, cfg.chat_template)
    return tok


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Any:
    """A byte-level BPE tokenizer trained on `texts` (no unknown tokens), wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS_TOKEN, PAD_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS_TOKEN, eos_token=EOS_TOKEN,
                                   pad_token=PAD_TOKEN, model_max_length=1_000_000)


def scratch_config(cfg: ModelConfig, tokenizer: Any) -> Any:
    """A Llama config from `model.size`, with `model.architecture` fields overriding the preset."""
    from transformers import LlamaConfig

    arch = dict(SIZES[cfg.size])
    arch.update({k: v for k, v in vars(cfg.architecture).items() if v is not None})
    if "num_kv_heads" not in {k for k, v in vars(cfg.architecture).items() if v is not None}:
        arch["num_kv_heads"] = min(arch["num_kv_heads"], arch["num_heads"])
    problems = []
    if arch["hidden_size"] % arch["num_heads"]:
        problems.append(Problem("model.architecture", f"hidden_size {arch['hidden_size']} is not divisible by "
                                f"num_heads {arch['num_heads']}", fix="pick num_heads that divides hidden_size"))
    if arch["num_heads"] % arch["num_kv_heads"]:
        problems.append(Problem("model.architecture", f"num_heads {arch['num_heads']} is not divisible by "
                                f"num_kv_heads {arch['num_kv_heads']}", fix="pick num_kv_heads that divides num_heads"))
    if problems:
        raise ConfigError(problems)
    return LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=arch["hidden_size"], intermediate_size=arch["intermediate_size"],
        num_hidden_layers=arch["num_layers"], num_attention_heads=arch["num_heads"],
        num_key_value_heads=arch["num_kv_heads"], max_position_embeddings=arch["max_position_embeddings"],
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
    )


def load_model(cfg: ModelConfig, source: str, dtype: torch.dtype, quantization_config: Any = None,
               dev: torch.device | None = None) -> Any:
    """A pretrained causal LM from a hub id or directory (safetensors only)."""
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = dict(dtype=dtype, trust_remote_code=cfg.trust_remote_code, use_safetensors=True)
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
        kwargs["device_map"] = {"": str(dev or device())}
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as e:
        raise _hub_error("name_or_path", source, e) from None
    except Exception as e:
        if type(e).__name__ != "SafetensorError":
            raise
        raise AdapterkitError(Problem("model.name_or_path", f"the weights of '{source}' are corrupt or cut short "
                                      f"({str(e).strip()})", fix="download or copy the model again")) from None
    if quantization_config is not None:
        if not standard_4bit_layout(model):
            raise ConfigError(Problem("adapter.method", f"'qlora': transformers quantised no layer of "
                                      f"{type(model).__name__} (bitsandbytes replaces only plain nn.Linear and "
                                      "Conv1D layers), so there is no 4-bit base to train on",
                                      fix="use adapter.method=lora (the same adapters on the unquantised base)"))
        layers = set(linear_4bit_layers(model))
        misread = [(n, m) for n, m in model.named_modules()
                   if m in layers and m.weight.device.type == "cpu" and _partial_rows(m)]
        if misread and cpu_4bit_misreads_partial_rows():
            name, layer = misread[0]
            raise ConfigError(Problem("adapter.method", f"'qlora' on a CPU: this bitsandbytes' CPU 4-bit kernel "
                                      f"misreads weights whose rows are not a whole number of its "
                                      f"{layer.weight.quant_state.blocksize}-value blocks, and {len(misread)} layer(s) "
                                      f"of '{source}' have such rows ({name}: {layer.out_features}x{layer.in_features})"
                                      "; the 4-bit base would silently compute with wrong weights",
                                      fix="train this model with qlora on a CUDA GPU, or use adapter.method=lora on "
                                          "the CPU"))
    return model


def _partial_rows(layer: Any) -> bool:
    state = layer.weight.quant_state
    return layer.out_features > 1 and layer.in_features % 2 == 0 and layer.in_features % state.blocksize != 0


@functools.cache
def cpu_4bit_misreads_partial_rows() -> bool:
    """Whether bitsandbytes' CPU `dequantize_4bit` gets a weight whose rows are not whole blocks wrong.

    bitsandbytes 0.50.2's C++ CPU kernel indexes the block scales per row while the storage numbers
    the blocks over the whole flattened weight: a 2x96 NF4 weight (blocks of 64) comes back with
    errors 2-5x the quantisation's, where its reference implementation is right. Asked of the library
    itself (a 2x96 weight, microseconds) rather than of its version number."""
    import bitsandbytes.functional as F

    weight = torch.linspace(-1, 1, 2 * 96).reshape(2, 96)
    packed, state = F.quantize_4bit(weight, blocksize=64, quant_type="nf4")
    return not torch.equal(F.dequantize_4bit(packed, state), nf4.dequantize_reference(packed, state))


def quantization_config(quant: QuantSettings, compute_dtype: torch.dtype) -> Any:
    """bitsandbytes 4-bit settings for a QLoRA base (`adapter.quant`)."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant.type,
        bnb_4bit_use_double_quant=quant.double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_quant_storage=torch.uint8,
    )


def load_base(cfg: ModelConfig, source: str, precision: str, trains_base: bool = False,
              quant: QuantSettings | None = None, dtype: torch.dtype | None = None,
              dev: torch.device | None = None) -> Any:
    """The base model, loaded the same way on every path (training, the preference step, reloading a
    run, export, evaluation): in `model.dtype` resolved for the run's precision (float32 when the base
    itself trains), or `dtype` when the caller needs another; 4-bit with `quant`'s settings (QLoRA) on
    `dev`, else on the CPU for the caller to move."""
    dtype = dtype or resolve_dtype(cfg.dtype, trains_base, precision)
    bnb = quantization_config(quant, resolve_dtype(quant.compute_dtype, False, precision)) if quant else None
    return load_model(cfg, source, dtype, bnb, dev)


def linear_4bit_layers(model: Any) -> list[Any]:
    """The bitsandbytes 4-bit linear layers of a model (inside peft's LoRA wrappers too)."""
    import bitsandbytes as bnb

    return [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]


def standard_4bit_layout(model: Any) -> int:
    """Keep every 4-bit weight of `model` in bitsandbytes' standard layout; returns how many layers it has.

    On CPUs with AVX512-BF16, bitsandbytes 0.50 repacks a 4-bit weight in place into a CPU-only layout
    the first time it runs in eval mode without grad (`Linear4bit.forward`). Anything that then reads
    the weight itself (dequantising it for a merge) reads garbage, training after such a pass gets wrong
    gradients (the repacked path has no autograd kernel), and the repacking asserts on dimensions not
    divisible by 32. So layers already repacked are converted back, and repacking is switched off: one
    layout on every machine, the one training, saving and merging expect."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    layers = linear_4bit_layers(model)
    for layer in layers:
        weight = layer.weight
        if getattr(weight.quant_state, "packing_format_for_cpu", False):
            weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, weight.quant_state)
            layer.quant_state = weight.quant_state
        layer.support_avx512bf16_for_cpu = False
    return len(layers)


def build_model(config: Any, seed: int) -> Any:
    """A freshly initialised causal LM (float32) from a config."""
    from transformers import AutoModelForCausalLM, set_seed

    set_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)
