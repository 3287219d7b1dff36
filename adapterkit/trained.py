"""Trained models back from disk, exactly as they were trained: used by eval, export and later stages.

    trained = load_trained("runs/s1")            # a run directory (recipe.yaml, manifest.json, model/)
    trained = load_trained("runs/s1/model")      # the same, from its model directory
    trained = load_trained("path/to/any-model")  # a plain transformers model, or a peft adapter

An adapter run is rebuilt from the base it was trained on, loaded the way training loaded it (the
same dtype, and 4-bit with the same bitsandbytes settings for QLoRA), with the saved adapter on top.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from adapterkit import models, rundir
from adapterkit.adapters import METHODS, MethodSpec, soft_prompt
from adapterkit.config import ModelConfig, Recipe, load_recipe
from adapterkit.data.formatter import FormatSpec
from adapterkit.errors import AdapterkitError, Problem

ADAPTER_CONFIG = "adapter_config.json"


@dataclass
class Trained:
    """A trained model in eval mode, with what is needed to use it the way it was trained."""

    model: Any
    """A PeftModel (adapter methods) or a transformers model (full runs, plain models)."""
    tokenizer: Any
    model_dir: Path
    run_dir: Path | None = None
    recipe: Recipe | None = None
    manifest: dict[str, Any] = field(default_factory=dict)
    spec: FormatSpec | None = None
    """The run's format.json: task, template, labels; None for a model that adapterkit did not train."""
    method: MethodSpec | None = None
    base_source: str | None = None
    """Where the base weights came from (adapter runs)."""
    dtype: torch.dtype = torch.float32

    @property
    def is_adapter(self) -> bool:
        return (self.model_dir / ADAPTER_CONFIG).is_file()


def locate(path: str | Path) -> tuple[Path | None, Path]:
    """(run dir or None, model dir) for a run directory, a run's model dir, or any model directory."""
    p = Path(path).expanduser()
    if (p / rundir.MANIFEST).is_file():
        if not (p / "model").is_dir():
            status = rundir.read_manifest(p).get("status", "unknown")
            raise AdapterkitError(Problem(str(p), f"this run has no final model (status: {status})",
                                          fix="finish the run first: re-run its command to resume it"))
        return p, p / "model"
    if (p / "config.json").is_file() or (p / ADAPTER_CONFIG).is_file():
        run = p.parent if (p.parent / rundir.MANIFEST).is_file() else None
        return run, p
    what = "does not exist" if not p.exists() else "is neither a run directory nor a model directory"
    raise AdapterkitError(Problem(str(p), what, fix="pass a run's output_dir (with manifest.json) or a model "
                                  "directory saved by transformers or peft"))


def load_trained(path: str | Path, dev: torch.device | None = None, dtype: torch.dtype | None = None) -> Trained:
    """Load a run's (or a directory's) model for inference, base and adapter as they were trained.

    `dtype` overrides the base's dtype; by default it is the one training used."""
    from transformers import AutoTokenizer

    run_dir, model_dir = locate(path)
    dev = dev or models.device()
    recipe, manifest, spec, method = None, {}, None, None
    if run_dir is not None:
        recipe, _ = load_recipe(str(run_dir / "recipe.yaml"))
        manifest = rundir.read_manifest(run_dir)
        method = METHODS[recipe.adapter.method]
    spec = format_spec(model_dir)
    model_cfg = recipe.model if recipe else ModelConfig()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token

    if not (model_dir / ADAPTER_CONFIG).is_file():
        dtype = dtype or _saved_dtype(model_dir)
        model = models.load_base(model_cfg, str(model_dir), "fp32", dtype=dtype).to(dev)
        model.eval()
        return Trained(model, tokenizer, model_dir, run_dir, recipe, manifest, spec, method, None, dtype)

    from peft import PeftModel

    base_source = manifest.get("model_source") or json.loads(
        (model_dir / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    if not base_source or not (Path(base_source).is_dir() or not models._looks_local(base_source)):
        raise AdapterkitError(Problem(str(model_dir / ADAPTER_CONFIG), f"the adapter's base model '{base_source}' "
                                      "cannot be found", fix="restore the base model at that path, or retrain"))
    quantized = method is not None and method.quantized_base
    precision = manifest.get("precision", "fp32")
    dtype = dtype or (models.resolve_dtype(model_cfg.dtype, False, precision) if recipe else torch.float32)
    base = models.load_base(model_cfg, base_source, precision, quant=recipe.adapter.quant if quantized else None,
                            dtype=dtype, dev=dev)
    if not quantized:
        base = base.to(dev)
    model = soft_prompt.fix_generation(PeftModel.from_pretrained(base, str(model_dir), is_trainable=False))
    model.eval()
    return Trained(model, tokenizer, model_dir, run_dir, recipe, manifest, spec, method, base_source, dtype)


def format_spec(model_dir: Path) -> FormatSpec | None:
    """The format.json adapterkit saved with a model (None for a model it did not train)."""
    path = model_dir / "format.json"
    return FormatSpec(**json.loads(path.read_text())) if path.is_file() else None


def load_reference(source: str, key: str, dev: torch.device | None = None) -> tuple[Any, Any, FormatSpec | None]:
    """(model in eval mode, tokenizer, the run's format spec or None) for a model that supervises or
    scores another: a run, a model directory, a built `builtin:NAME` or a hub id. `key` names the
    setting it came from, for errors."""
    if Path(source).expanduser().exists():
        t = load_trained(source, dev)
        return t.model, t.tokenizer, t.spec
    cfg = ModelConfig(name_or_path=source)
    where = models.model_source(cfg) if source.startswith("builtin:") else _hub_source(source, key)
    tokenizer = models.load_tokenizer(cfg, where)
    model = models.load_model(cfg, where, torch.float32).to(dev or models.device())
    return model.eval(), tokenizer, None


def reference_tokenizer(source: str, key: str) -> tuple[Any, FormatSpec | None]:
    """The tokenizer (and format spec) of what `load_reference` would load, without its weights."""
    from transformers import AutoTokenizer

    if Path(source).expanduser().exists():
        _, model_dir = locate(source)
        spec = format_spec(model_dir)
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return tokenizer, spec
    cfg = ModelConfig(name_or_path=source)
    where = models.model_source(cfg) if source.startswith("builtin:") else _hub_source(source, key)
    return models.load_tokenizer(cfg, where), None


def _hub_source(source: str, key: str) -> str:
    if models._looks_local(source):
        raise AdapterkitError(Problem(key, f"'{source}' does not exist", fix="pass a run directory, a model "
                                      "directory or a hub id"))
    return source


def _saved_dtype(model_dir: Path) -> torch.dtype:
    """The dtype a full model was saved in (config.json's `dtype`), float32 if it does not say."""
    cfg = json.loads((model_dir / "config.json").read_text())
    name = cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
    return getattr(torch, name, torch.float32)
