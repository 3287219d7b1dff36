"""What the memory plan reads from a model: sizes from its config, and shapes from the model built on
the meta device (and wrapped by peft there), which costs no memory and loads no weights."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

import torch

from adapterkit import models
from adapterkit.adapters import METHODS
from adapterkit.adapters.lora import lora_config
from adapterkit.adapters.soft_prompt import peft_config
from adapterkit.builtin import BUILTIN, builtin_run_dir
from adapterkit.config import Recipe, load_recipe
from adapterkit.errors import AdapterkitError, Problem
from adapterkit.trained import ADAPTER_CONFIG, locate

# ---------------------------------------------------------------------------------------------
# What the plan reads from a model: sizes from its config, and shapes from the model built on the
# meta device (and wrapped by peft there), which costs no memory and loads no weights.


@dataclass(frozen=True)
class Architecture:
    """The sizes of a decoder-only causal LM that its memory depends on."""

    name: str
    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    parameters: int
    """Every parameter, tied ones once."""
    decoder_linear: int
    """Parameters of the linear layers inside the decoder blocks (what autocast copies to half precision)."""
    quantized: int
    """Parameters in the linear layers bitsandbytes quantises (all but the output head)."""
    quantized_matrices: int
    largest_linear: int
    """Values in the largest decoder linear weight (a 4-bit one is dequantised whole for each matmul)."""


@dataclass(frozen=True)
class Trainable:
    """What trains for one adapter setting, as peft wraps the model."""

    tensors: tuple[int, ...]
    """Values in each trainable tensor."""
    adapted: tuple[tuple[int, int, int], ...] = ()
    """LoRA: (in_features, out_features, r) of each adapted layer."""
    adapted_names: tuple[str, ...] = ()
    """LoRA: the module name of each adapted layer within its block (q_proj, down_proj, ...)."""
    what: str = ""

    @property
    def count(self) -> int:
        return sum(self.tensors)


def _meta_model(config: Any, trust_remote_code: bool) -> Any:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


def _kv_heads(text: Any, heads: int) -> int:
    """Key/value heads: GQA configs name them; multi-query Falcon (Falcon-7B) caches one."""
    if getattr(text, "multi_query", False) and not getattr(text, "new_decoder_architecture", False):
        return 1
    for name in ("num_key_value_heads", "num_kv_heads"):
        if getattr(text, name, None) is not None:
            return int(getattr(text, name))
    return heads


def _is_linear(module: Any) -> bool:
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, (torch.nn.Linear, Conv1D))


def _quantizable(module: Any) -> bool:
    from transformers.pytorch_utils import Conv1D

    return type(module) is torch.nn.Linear or isinstance(module, Conv1D)


def architecture(config: Any, trust_remote_code: bool = False, name: str = "") -> Architecture:
    """Sizes from the config, and parameter counts from the model built on the meta device."""
    from transformers.quantizers.base import get_keys_to_not_convert
    from transformers.quantizers.quantizers_utils import should_convert_module

    text = config.get_text_config() if hasattr(config, "get_text_config") else config

    def size(*names: str, default: int | None = None) -> int:
        for n in names:
            if getattr(text, n, None) is not None:
                return int(getattr(text, n))
        if default is None:
            raise AdapterkitError(Problem("model config", f"has none of {', '.join(names)}",
                                          fix="pass the config.json of a decoder-only causal language model"))
        return default

    hidden = size("hidden_size", "n_embd", "d_model")
    heads = size("num_attention_heads", "n_head")
    model = _meta_model(config, trust_remote_code)
    # Which linear layers bitsandbytes would quantise: transformers' own rule (the output head, tied
    # weights and the model's keep-in-fp32 modules stay as they are).
    keep = get_keys_to_not_convert(model) + list(getattr(model, "_keep_in_fp32_modules", None) or [])
    out_head = model.get_output_embeddings()
    linears = [(n, m) for n, m in model.named_modules() if _is_linear(m) and m is not out_head]
    # transformers' bitsandbytes integration (replace_with_bnb_linear) replaces exactly `nn.Linear`
    # (not subclasses such as Falcon's FalconLinear) and GPT-2's Conv1D.
    quantized = [m.weight.numel() for n, m in linears if _quantizable(m) and should_convert_module(n, keep)]
    return Architecture(
        name=name or getattr(config, "_name_or_path", "") or type(config).__name__,
        vocab=size("vocab_size"), hidden=hidden, layers=size("num_hidden_layers", "n_layer"), heads=heads,
        kv_heads=_kv_heads(text, heads), head_dim=size("head_dim", default=hidden // heads),
        intermediate=size("intermediate_size", "n_inner", "ffn_dim", "ffn_hidden_size", default=4 * hidden),
        parameters=sum(p.numel() for p in model.parameters()),
        decoder_linear=sum(m.weight.numel() for _, m in linears),
        quantized=sum(quantized), quantized_matrices=len(quantized),
        largest_linear=max((m.weight.numel() for _, m in linears), default=0),
    )


def trainable(config: Any, adapter: Any, trust_remote_code: bool = False) -> Trainable:
    """What trains for `adapter` (an AdapterConfig): peft wraps the meta-device model and counts."""
    method = METHODS[adapter.method]
    model = _meta_model(config, trust_remote_code)
    if method.family == "full":
        return Trainable(tuple(p.numel() for p in model.parameters()), what="every weight")
    from peft import get_peft_model

    if method.family == "lora":
        from peft.tuners.lora import LoraLayer

        model = get_peft_model(model, lora_config(adapter.lora))
        layers = [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]
        adapted = tuple((m.in_features, m.out_features, m.r["default"]) for _, m in layers)
        names = tuple(n.rsplit(".", 1)[-1] for n, _ in layers)
        what = f"LoRA r{adapter.lora.r} on {len(adapted)} modules" + (" + DoRA magnitudes" if adapter.lora.dora else "")
    else:
        # A text-initialised prompt has the same shape as a random one; the tokenizer is not needed here.
        shaped = dataclasses.replace(adapter, prompt=dataclasses.replace(adapter.prompt, init_text=None))
        model = get_peft_model(model, peft_config(shaped, None, config))
        adapted, names = (), ()
        what = f"{adapter.prompt.num_virtual_tokens} virtual tokens ({adapter.method})"
    return Trainable(tuple(p.numel() for p in model.parameters() if p.requires_grad), adapted, names, what)


class _Vocab:
    """Stands in for a tokenizer of `n` tokens where only its size matters (a scratch model's config)."""

    bos_token_id = eos_token_id = 0
    pad_token_id = 1

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n


def _read_config(path: str, where: str, trust_remote_code: bool) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise AdapterkitError(Problem(where, f"could not read a model config from '{path}': {first}",
                                      fix="pass a config.json of a transformers model (or the directory holding it)")
                              ) from None


def model_config(recipe: Recipe, config_path: str | None = None) -> tuple[Any, str]:
    """(config, what it is) for the recipe's model, reading nothing but a config.json: never weights,
    and never building `builtin:` bases. `config_path` (a config.json or a directory) replaces the
    recipe's model, e.g. to plan a hub model offline."""
    m = recipe.model
    if config_path is not None:
        return _read_config(config_path, "--model-config", m.trust_remote_code), config_path
    if m.init == "scratch":
        size = len(models.load_tokenizer(m, m.tokenizer)) if m.tokenizer else m.vocab_size
        return models.scratch_config(m, _Vocab(size)), f"scratch {m.size}"
    name = m.name_or_path
    if m.from_run is not None:
        _, model_dir = locate(m.from_run)
        if not (model_dir / "config.json").is_file():
            name = json.loads((model_dir / ADAPTER_CONFIG).read_text())["base_model_name_or_path"]
        else:
            name = str(model_dir)
    if name.startswith("builtin:"):
        built = builtin_run_dir(name.removeprefix("builtin:")) / "model" / "config.json"
        if built.is_file():
            return _read_config(str(built), "model.name_or_path", False), name
        builtin_recipe, _ = load_recipe(BUILTIN[name.removeprefix("builtin:")])
        return models.scratch_config(builtin_recipe.model, _Vocab(builtin_recipe.model.vocab_size)), name
    source = models.model_source(dataclasses.replace(m, name_or_path=name, from_run=None))
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(source, trust_remote_code=m.trust_remote_code), name
    except (OSError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise AdapterkitError(Problem("model.name_or_path", f"could not read the config of '{name}': {first}",
                                      fix="without network, pass its config.json: --model-config path/to/config.json "
                                          "(or set model.name_or_path to a local directory holding it)")) from None


@dataclass
class ModelFacts:
    """A model's architecture, and what trains under each adapter setting (computed once, then cached)."""

    config: Any
    arch: Architecture
    trust_remote_code: bool = False
    _trainable: dict[str, Trainable] = field(default_factory=dict)

    @classmethod
    def of(cls, config: Any, name: str = "", trust_remote_code: bool = False) -> ModelFacts:
        return cls(config, architecture(config, trust_remote_code, name), trust_remote_code)

    def trainable(self, adapter: Any) -> Trainable:
        # LoRA and QLoRA train the same adapters; each family reads only its own settings.
        family = METHODS[adapter.method].family
        settings = {"full": None, "lora": adapter.lora, "soft_prompt": adapter.prompt}[family]
        key = json.dumps([family if family != "soft_prompt" else adapter.method,
                          dataclasses.asdict(settings) if settings else None], sort_keys=True, default=str)
        if key not in self._trainable:
            self._trainable[key] = trainable(self.config, adapter, self.trust_remote_code)
        return self._trainable[key]
