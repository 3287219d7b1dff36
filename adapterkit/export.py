"""Export a run as a standalone model directory (or as its adapter), checked numerically.

    adapterkit export runs/s1 --out exported/s1                   # merged: plain transformers loads it
    adapterkit export runs/s1 --out exported/s1-adapter --no-merge
    adapterkit export runs/q1 --out exported/q1 --dtype bfloat16   # QLoRA: merged into the dequantised NF4 base
    adapterkit export runs/q1 --out exported/q1 --base original    # ... or into the original full-precision base

Top to bottom: check the arguments and the run before anything is loaded; load the model as it was
trained (`trained.load_trained`) and record its logits and greedy continuations on a fixed batch of
the run's own data; turn that same model into the export (LoRA merged by peft into the base in the
target dtype, a QLoRA base dequantised by bitsandbytes first, a full model cast) and save it in a temp
dir beside --out; free it, load the saved directory the way a user would, and compare the numbers.
Only an export that passes the comparison (or is forced) is renamed into place, with the numbers in
export.json and the lineage in a model card (README.md). At most one full copy of the weights is
held at a time.
"""

from __future__ import annotations

import gc
import json
import math
import os
import shutil
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from adapterkit import models, rundir
from adapterkit.adapters import METHODS, MethodSpec, soft_prompt
from adapterkit.config import dump_recipe
from adapterkit.data.formatter import Formatter, TemplateRejected
from adapterkit.data.loading import read_rows
from adapterkit.errors import AdapterkitError, DataError, Problem, did_you_mean
from adapterkit.trained import Trained, load_trained, locate

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MERGE_BASES = ("quantized", "original")
"""QLoRA: merge into the NF4 base the adapter trained against (dequantised), or into the original weights."""

# The parity check fails when max|Δlogits| exceeds RTOL[dtype] x max(1, largest |logit| of the trained model).
# float32: a merge only reorders float32 sums (measured: 3e-7 to 3e-6 of the logit scale on tiny models), while
# merging a QLoRA adapter into the original base instead of its NF4 weights moved the logits by 5% to 90% of it.
# Half precision rounds every merged weight to 8 (bf16) or 11 (fp16) significant bits; that alone moved the
# logits of builtin:tiny by 0.5% (bf16) and 0.06% (fp16) of the scale, and of a random 2-layer model by 10% and
# 1.7%. So half-precision bounds catch a lost adapter or a wrong base model, not an NF4-sized drift: export in
# float32 to check that tightly.
RTOL = {"float32": 1e-4, "bfloat16": 5e-2, "float16": 1e-2}
# In float32 every greedy continuation must also be identical. In half precision a near-tie flipped by
# rounding changes the rest of a continuation, so agreement there is reported, and the logits decide.
GREEDY_MUST_MATCH = {"float32": True, "bfloat16": False, "float16": False}
ROWS = 8
"""Rows in the parity batch: the first usable ones of data.eval, else data.train."""
KEEP_POSITIONS = 32
"""Logits compared per row: the last 32 positions (the end of the prompt and the answer), which bounds
the memory the reference takes for a large vocabulary (8 x 32 x vocab floats)."""
MAX_TOKENS = 256
"""Longer rows are cut to their first 256 tokens: a fixed input is all the check needs."""
GREEDY_TOKENS = 16
"""Length of each greedy continuation compared."""


class ParityFailed(AdapterkitError):
    """The exported model does not compute what the trained one did; nothing was written."""

    exit_code = 3

    def __init__(self, problem: Problem, parity: Parity):
        super().__init__(problem)
        self.parity = parity


# -- the fixed batch and what a model computes on it ------------------------------------------------------

@dataclass
class ParityBatch:
    sequences: list[list[int]]
    """Prompt + reference ids of each row, tokenized exactly as in training."""
    prompts: list[list[int]]
    source: str


@dataclass
class Outputs:
    logits: list[torch.Tensor]
    """Per row, the last KEEP_POSITIONS positions: (positions, vocab), float32 on the CPU."""
    greedy: list[list[int]]


@dataclass
class Parity:
    """How closely the exported model reproduces the trained one on the parity batch (export.json)."""

    rows: int
    source: str
    dtype: str
    max_abs_logit_diff: float
    logit_scale: float
    """The largest |logit| of the trained model on the batch; the tolerance is relative to it."""
    tolerance: float
    greedy_identical: int
    """Rows whose greedy continuation (GREEDY_TOKENS tokens) is the same token for token."""
    greedy_token_agreement: float
    """Position-aligned matching tokens over all continuation positions."""
    greedy_must_match: bool
    passed: bool

    def summary(self) -> str:
        return (f"max|Δlogits| {self.max_abs_logit_diff:.3g} (tolerance {self.tolerance:.3g} for {self.dtype}), "
                f"greedy continuations identical in {self.greedy_identical}/{self.rows} rows "
                f"(token agreement {self.greedy_token_agreement:.1%})")


def parity_batch(trained: Trained, rows: int = ROWS) -> ParityBatch:
    """The first `rows` usable rows of the run's eval data (else its train data), through its own formatter."""
    d = trained.recipe.data
    formatter = Formatter(trained.spec, trained.tokenizer, d.columns)
    for key, source, split in (("data.eval", d.eval, d.eval_split), ("data.train", d.train, d.train_split)):
        if source is None:
            continue
        sequences, prompts = [], []
        for raw in read_rows(source, split, key):
            fields, _ = formatter.fields(raw)
            if fields is None:
                continue
            try:
                fields, fitted, _ = formatter.fit(fields)
                prompt, reference = formatter.split_for_eval(formatter.record(fields))
            except TemplateRejected:
                continue
            if prompt and reference:
                sequences.append((prompt + reference)[:MAX_TOKENS])
                prompts.append(prompt[:MAX_TOKENS])
            if len(sequences) == rows:
                break
        if sequences:
            return ParityBatch(sequences, prompts, f"{key} ({source if isinstance(source, str) else ', '.join(source)})")
    raise DataError(Problem(str(trained.run_dir / "recipe.yaml"), "neither data.eval nor data.train has a usable row "
                            "for the parity check", "data", fix="restore the run's data files at their paths"))


@torch.no_grad()
def model_outputs(model: Any, batch: ParityBatch, tokenizer: Any) -> Outputs:
    """Logits on each sequence and the greedy continuation of each prompt, one row at a time (no padding,
    so soft prompts and plain models see exactly the same input)."""
    from transformers import GenerationConfig

    dev = next(model.parameters()).device
    config = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=GREEDY_TOKENS,
                              eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model.eval()
    logits, greedy = [], []
    for ids, prompt in zip(batch.sequences, batch.prompts):
        out = model(input_ids=torch.tensor([ids], device=dev)).logits[0]  # (T, vocab), T counts virtual tokens
        logits.append(out[-KEEP_POSITIONS:].float().cpu())
        prompt_ids = torch.tensor([prompt], device=dev)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Position ids are not supported")  # peft, soft prompts
            generated = model.generate(input_ids=prompt_ids, attention_mask=torch.ones_like(prompt_ids),
                                       generation_config=config)
        greedy.append(generated[0, len(prompt):].tolist())
    return Outputs(logits, greedy)


def compare(reference: Outputs, exported: Outputs, dtype: str, source: str, rtol: float | None = None,
            greedy_must_match: bool | None = None) -> Parity:
    """The parity numbers, and whether they are within the tolerance for `dtype` (or `rtol` x the logit
    scale, and greedy continuations required identical or not, where the caller decides)."""
    shapes_match = all(a.shape == b.shape for a, b in zip(reference.logits, exported.logits))
    diff = max((a - b).abs().max().item() for a, b in zip(reference.logits, exported.logits)) if shapes_match \
        else math.inf
    scale = max(a.abs().max().item() for a in reference.logits)
    tolerance = (RTOL[dtype] if rtol is None else rtol) * max(1.0, scale)
    identical = sum(g == h for g, h in zip(reference.greedy, exported.greedy))
    positions = sum(max(len(g), len(h)) for g, h in zip(reference.greedy, exported.greedy))
    matching = sum(x == y for g, h in zip(reference.greedy, exported.greedy) for x, y in zip(g, h))
    rows = len(reference.greedy)
    must_match = GREEDY_MUST_MATCH[dtype] if greedy_must_match is None else greedy_must_match
    passed = diff <= tolerance and (identical == rows or not must_match)  # a NaN diff fails too
    return Parity(rows, source, dtype, diff, scale, tolerance, identical, matching / max(positions, 1), must_match,
                  passed)


# -- the export ----------------------------------------------------------------------------------------------

def export(path: str | Path, out: str | Path, merge: bool | None = None, dtype: str | None = None,
           base: str | None = None, force: bool = False, say: Callable[..., None] = print) -> dict[str, Any]:
    """Export the run at `path` to `out`, check it against the model as trained, and return export.json.

    merge: merge the adapter into the weights (default; soft prompts cannot merge and default to the
    adapter). dtype: of the merged weights, default the base model's. base (QLoRA): "quantized" merges
    into the dequantised NF4 weights the adapter trained against (default), "original" into the
    full-precision base. force: replace an earlier export at `out`, and write despite a failed check."""
    run_dir, model_dir = locate(path)
    if run_dir is None:
        raise AdapterkitError(Problem(str(path), "is a model directory, not an adapterkit run: export checks parity "
                                      "on the run's own data and records its lineage",
                                      fix="pass the run's output_dir (the folder with manifest.json)"))
    method = METHODS[rundir.read_manifest(run_dir)["method"]]
    out = Path(out).expanduser()
    _check_arguments(method, merge, dtype, base, out, force, run_dir)
    merging = method.family != "soft_prompt" if merge is None else merge
    if method.family == "soft_prompt":
        say(f"note: {method.name} cannot be merged into the weights (its virtual tokens are inputs, not a change "
            "to a weight); exporting the adapter, which peft loads on its base")

    trained = load_trained(run_dir)
    if trained.spec is None:
        raise AdapterkitError(Problem(str(model_dir), "has no format.json, so the run's data cannot be formatted "
                                      "for the parity check", fix="re-run the recipe to write the final model again"))
    target = DTYPES[dtype] if dtype else _base_dtype(trained) if merging else trained.dtype
    target_name = str(target).removeprefix("torch.")
    batch = parity_batch(trained)
    say(f"parity batch: {len(batch.sequences)} rows of {batch.source}")
    reference = model_outputs(trained.model, batch, trained.tokenizer)
    dev = next(trained.model.parameters()).device

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = rundir.make_temp_dir(out.parent, f".{out.name}.export-")
    try:
        if merging:
            merged, weights = _merge(trained, target, base or "quantized", dev)
            say(f"weights: {weights}")
            _save_merged(merged, trained, tmp)
            del merged
            gc.collect()
            exported = _load_merged(tmp, target, dev)
        else:
            weights = None
            shutil.copytree(model_dir, tmp, dirs_exist_ok=True)
            exported = _load_adapter(trained, tmp)
        parity = compare(reference, model_outputs(exported, batch, trained.tokenizer), target_name, batch.source)
        del exported
        gc.collect()
        info = _record(trained, run_dir, out, merging, weights, base, target_name, parity, force)
        rundir.write_json(tmp / "export.json", info)
        rundir.write_atomic(tmp / "README.md", model_card(info, trained))
        if not parity.passed and not force:
            raise ParityFailed(Problem(str(out), f"the exported model does not reproduce the trained one: "
                                       f"{parity.summary()}; nothing was written", fix=_parity_fix(method, base, target_name)),
                               parity)
        rundir.publish_dir(tmp, out)
        rundir.fsync_dir(out.parent)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        failure = write_failure(e, out)
        if failure is None:
            raise
        raise failure from None
    say(f"parity ({'passed' if parity.passed else 'FAILED, written because of --force'}): {parity.summary()}")
    what = f"{method.name} adapter" if not merging else "merged model" if method.family == "lora" else "model"
    say(f"exported {what} ({target_name}) to {out}")
    return info


def write_failure(e: BaseException, out: Path) -> AdapterkitError | None:
    """The error to raise when writing an export failed for lack of storage (a full disk, no permission),
    its temp dir already removed; None for any other failure, which propagates as it is."""
    what = rundir.storage_error(e)
    if what is None:
        return None
    return AdapterkitError(Problem(str(out), f"could not write the export: {what}; nothing was written",
                                   fix="free disk space (or choose an --out on another disk), then run the export "
                                       "again"))


def _check_arguments(method: MethodSpec, merge: bool | None, dtype: str | None, base: str | None, out: Path,
                     force: bool, run_dir: Path) -> None:
    """Every problem with the arguments, reported together before anything is loaded."""
    problems = []
    merging = method.family != "soft_prompt" if merge is None else merge
    if dtype is not None and dtype not in DTYPES:
        short = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}.get(dtype)
        hint = f"did you mean '{short}'?" if short else did_you_mean(dtype, DTYPES)
        problems.append(Problem("--dtype", f"'{dtype}' is not a dtype adapterkit exports"
                                + (f" ({hint})" if hint else ""), fix=f"use one of: {', '.join(DTYPES)}"))
    if base is not None and base not in MERGE_BASES:
        problems.append(Problem("--base", f"'{base}' is not a merge base", fix=f"use one of: {', '.join(MERGE_BASES)}"))
    if method.family == "soft_prompt" and merge:
        problems.append(Problem("--merge", f"a {method.name} adapter cannot be merged into the weights: its virtual "
                                "tokens are extra inputs, not a change to any weight",
                                fix="leave --merge out (or pass --no-merge) to export the adapter"))
    if method.family == "full" and merge is False:
        problems.append(Problem("--no-merge", "a full run has no adapter: its model is the weights themselves",
                                fix="leave --no-merge out"))
    if base is not None and not method.quantized_base:
        problems.append(Problem("--base", f"only QLoRA runs have a choice of merge base; this run is {method.name}",
                                fix="leave --base out"))
    elif base is not None and not merging:
        problems.append(Problem("--base", "an adapter export (--no-merge) merges into nothing",
                                fix="leave --base out, or drop --no-merge"))
    if dtype is not None and not merging:
        problems.append(Problem("--dtype", "an adapter export keeps the adapter and its base as trained; --dtype "
                                "sets the dtype of merged weights", fix="leave --dtype out, or drop --no-merge"))
    problems += _check_out(out, force, run_dir)
    if problems:
        raise AdapterkitError(problems)


def _check_out(out: Path, force: bool, run_dir: Path) -> list[Problem]:
    resolved, run = out.resolve(), run_dir.resolve()
    if resolved == run or run.is_relative_to(resolved) or resolved.is_relative_to(run / "model"):
        return [Problem("--out", f"'{out}' would replace the run itself (or its model)",
                        fix="export to a new directory, e.g. exported/" + run.name)]
    if out.exists() and not out.is_dir():
        return [Problem("--out", f"'{out}' is a file", fix="choose a new directory")]
    if out.is_dir() and any(out.iterdir()):
        if not (out / "export.json").is_file():
            return [Problem("--out", f"'{out}' is not empty and is not an adapterkit export, so it is not replaced "
                            "even with --force", fix="choose a new or empty directory")]
        if not force:
            return [Problem("--out", f"'{out}' already holds an export", fix="choose another --out, or pass --force "
                            "to replace it")]
    parent = next(p for p in [out.parent, *out.parent.parents] if p.exists())
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        return [Problem("--out", f"cannot create '{out}': '{parent}' is not a writable directory",
                        fix="choose another --out")]
    return []


def _base_dtype(trained: Trained) -> torch.dtype:
    """The dtype of the model the run started from (its config), else the one it was trained in."""
    source = trained.base_source or trained.manifest.get("model_source")
    if source and source != "scratch":
        try:
            saved = getattr(models.load_config(trained.recipe.model, source), "dtype", None)
        except AdapterkitError:  # a hub id not in the local cache: fall back to the trained dtype
            saved = None
        saved = getattr(torch, saved, None) if isinstance(saved, str) else saved
        if saved in DTYPES.values():
            return saved
    return trained.dtype


def _merge(trained: Trained, dtype: torch.dtype, base: str, dev: torch.device) -> tuple[Any, str]:
    """The merged model, built from the trained one's own modules where possible, and a sentence saying
    which weights the adapter was merged into. `trained.model` is released: one full copy at a time."""
    from peft import PeftModel

    name = str(dtype).removeprefix("torch.")
    method, model = trained.method, trained.model
    trained.model = None
    if method.family == "full":
        return model.to(dtype), f"the fully fine-tuned weights (nothing to merge), in {name}"
    if method.quantized_base and base == "quantized":
        # The adapter trained against the NF4 weights, not the original ones: dequantise them
        # (bitsandbytes' dequantize_4bit, layer by layer, via transformers) and merge into those.
        from transformers.utils import logging as hf_logging

        model = model.unload()  # the 4-bit base, without the LoRA layers
        models.standard_4bit_layout(model)  # read the weights in the layout bitsandbytes dequantises
        level = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # "dequantized in float32 and casted to ...": said below instead
        try:
            model.dequantize(dtype=dtype)
        finally:
            hf_logging.set_verbosity(level)
        model = PeftModel.from_pretrained(model.to(dtype), str(trained.model_dir), is_trainable=False)
        quant = trained.recipe.adapter.quant
        what = (f"the adapter merged into the {quant.type.upper()}{' double-quantised' if quant.double_quant else ''} "
                f"4-bit base it trained against ({trained.base_source}), dequantised by bitsandbytes to {name}")
        return _restore_conv1d(model.merge_and_unload(safe_merge=True)), what
    elif method.quantized_base or dtype != trained.dtype:
        del model
        gc.collect()
        fresh = models.load_base(trained.recipe.model, trained.base_source, "fp32", dtype=dtype).to(dev)
        model = PeftModel.from_pretrained(fresh, str(trained.model_dir), is_trainable=False)
        what = f"the adapter merged into the original base weights ({trained.base_source}) loaded in {name}"
        if method.quantized_base:
            what += ", not the 4-bit weights the adapter trained against"
    else:
        what = f"the adapter merged into the base it trained on ({trained.base_source}), in {name}"
    return model.merge_and_unload(safe_merge=True), what


def _restore_conv1d(model: Any) -> Any:
    """Give back GPT-2-style `Conv1D` layers their own class and orientation after a 4-bit round trip.

    bitsandbytes quantises a Conv1D (weight stored (in, out)) as a Linear4bit, and dequantising makes it
    an `nn.Linear` (weight (out, in)). Saved like that, the model's own class would read every such weight
    transposed: an error for a rectangular one, silently wrong numbers for a square one."""
    from transformers.pytorch_utils import Conv1D

    with torch.device("meta"):
        reference = type(model)(model.config)
    for name, module in reference.named_modules():
        if not isinstance(module, Conv1D):
            continue
        linear = model.get_submodule(name)
        if not isinstance(linear, torch.nn.Linear):
            continue
        conv = Conv1D(linear.out_features, linear.in_features).to(linear.weight.device, linear.weight.dtype)
        with torch.no_grad():
            conv.weight.copy_(linear.weight.t())
            if linear.bias is not None:
                conv.bias.copy_(linear.bias)
            else:
                conv.bias.zero_()
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, conv)
    return model


def _save_merged(model: Any, trained: Trained, tmp: Path) -> None:
    """Weights (safetensors), config, the run's generation config (its EOS and pad), tokenizer with its chat
    template, and format.json (so `adapterkit eval` formats prompts as training did)."""
    from transformers import GenerationConfig

    tok = trained.tokenizer
    if (trained.model_dir / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(str(trained.model_dir))
    gen = model.generation_config
    if gen.eos_token_id is None:
        gen.eos_token_id = tok.eos_token_id
    if gen.pad_token_id is None:
        gen.pad_token_id = tok.pad_token_id
    model.save_pretrained(str(tmp))
    tok.save_pretrained(str(tmp))
    if (trained.model_dir / "format.json").is_file():
        shutil.copy2(trained.model_dir / "format.json", tmp / "format.json")


def _load_merged(tmp: Path, dtype: torch.dtype, dev: torch.device) -> Any:
    """The exported directory as a user loads it: plain transformers, no peft, no adapterkit."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(tmp), dtype=dtype, use_safetensors=True).to(dev)


def _load_adapter(trained: Trained, tmp: Path) -> Any:
    """The exported adapter, loaded by peft onto the trained model's own base (freed of its adapter)."""
    from peft import PeftModel

    model, trained.model = trained.model, None
    base = model.unload() if trained.method.family == "lora" else model.get_base_model()
    return soft_prompt.fix_generation(PeftModel.from_pretrained(base, str(tmp), is_trainable=False))


def _parity_fix(method: MethodSpec, base: str | None, dtype: str) -> str:
    if method.quantized_base and base == "original":
        return ("merge into the weights the adapter trained against: leave --base out (--base quantized); or pass "
                "--force to write this export anyway")
    if dtype != "float32":
        return (f"export in float32 (--dtype float32): a {dtype} export rounds every merged weight; --force writes "
                "this export anyway")
    return ("this float32 export should match to rounding, so this is a bug: please report it with export.json "
            "(--force writes the export anyway, and keeps the numbers in it)")


# -- lineage: export.json and the model card ---------------------------------------------------------------------

def _record(trained: Trained, run_dir: Path, out: Path, merging: bool, weights: str | None, base: str | None,
            dtype: str, parity: Parity, force: bool) -> dict[str, Any]:
    """export.json: what was exported, from which run, into which base, and the parity numbers."""
    recipe, manifest, method = trained.recipe, trained.manifest, trained.method
    adapter: dict[str, Any] = {"method": method.name}
    if method.family == "lora":
        lora = recipe.adapter.lora
        adapter.update(r=lora.r, alpha=lora.alpha, dora=lora.dora, rslora=lora.rslora)
    if method.quantized_base:
        quant = recipe.adapter.quant
        compute = models.resolve_dtype(quant.compute_dtype, False, manifest.get("precision", "fp32"))
        adapter["quant"] = {"type": quant.type, "double_quant": quant.double_quant,
                            "compute_dtype": str(compute).removeprefix("torch.")}
    command = ["adapterkit", "export", str(run_dir), "--out", str(out)]
    command += [] if merging or method.family == "soft_prompt" else ["--no-merge"]
    command += [f"--dtype {dtype}"] if merging else []
    command += [f"--base {base}"] if base else []
    command += ["--force"] if force else []
    return {
        "format": "merged" if merging else "adapter",
        "dtype": dtype,
        "weights": weights,
        "merge_base": (base or "quantized") if merging and method.quantized_base else None,
        "run": str(run_dir.resolve()),
        "recipe": manifest.get("recipe"),
        "recipe_path": manifest.get("recipe_path"),
        "overrides": manifest.get("overrides"),
        "task": recipe.data.task,
        "adapter": adapter,
        "base_model": manifest.get("model_source"),
        "training": {k: manifest.get(k) for k in ("precision", "seed", "started", "finished", "metrics")},
        "parity": {**asdict(parity), "forced": force and not parity.passed,
                   "rule": f"max abs(Δlogits) <= {RTOL[dtype]:g} x max(1, logit_scale)"
                           + (" and every greedy continuation identical" if parity.greedy_must_match else "")},
        "versions": {"training": manifest.get("versions"), "export": rundir.versions()},
        "created": rundir.now(),
        "command": " ".join(command),
    }


def model_card(info: dict[str, Any], trained: Trained) -> str:
    """The exported directory's README.md: how to load it, where it came from, and how it was checked."""
    p = info["parity"]
    merged = info["format"] == "merged"
    tok = trained.tokenizer
    metrics = info["training"].get("metrics") or {}
    losses = (f"; eval loss {metrics['eval_loss_before']:.4f} -> {metrics['eval_loss_after']:.4f}"
              if "eval_loss_before" in metrics and "eval_loss_after" in metrics else "")
    if merged:
        load = ("from transformers import AutoModelForCausalLM, AutoTokenizer\n"
                "model = AutoModelForCausalLM.from_pretrained(PATH)\n"
                "tokenizer = AutoTokenizer.from_pretrained(PATH)")
    elif trained.method.quantized_base:
        q = info["adapter"]["quant"]
        load = ("import torch\nfrom peft import PeftModel\n"
                "from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig\n"
                f"quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type={q['type']!r}, "
                f"bnb_4bit_use_double_quant={q['double_quant']}, bnb_4bit_compute_dtype=torch.{q['compute_dtype']})\n"
                f"base = AutoModelForCausalLM.from_pretrained({info['base_model']!r}, quantization_config=quant, "
                f"dtype=torch.{info['dtype']})\n"
                "model = PeftModel.from_pretrained(base, PATH)\ntokenizer = AutoTokenizer.from_pretrained(PATH)")
    else:
        load = ("import torch\nfrom peft import PeftModel\n"
                "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
                f"base = AutoModelForCausalLM.from_pretrained({info['base_model']!r}, dtype=torch.{info['dtype']})\n"
                "model = PeftModel.from_pretrained(base, PATH)\ntokenizer = AutoTokenizer.from_pretrained(PATH)")
    if not merged:
        what = (f"The {trained.method.name} adapter, which peft loads on its base model"
                + (" (soft prompts cannot be merged into weights)." if trained.method.family == "soft_prompt" else "."))
    else:
        what = ("A standalone model" + (": the adapter is merged into the weights" if trained.method.family == "lora"
                                        else "") + "; plain transformers loads it (no peft, no adapterkit).")
    versions = info["versions"]
    lines = [
        f"# {Path(info['run']).name} ({info['adapter']['method']}, {info['task']})",
        "",
        what,
        "",
        "```python",
        load.replace("PATH", "path_to_this_directory"),
        "```",
        "",
        (f"- EOS token: `{tok.eos_token}` (id {tok.eos_token_id}); pad token: `{tok.pad_token}` "
         f"(id {tok.pad_token_id}); `generation_config.json` stops generation at EOS."),
        "- Chat template: " + ("saved with the tokenizer (`tokenizer.apply_chat_template`)."
                               if getattr(tok, "chat_template", None)
                               else "none; prompts use the plain template in `format.json`."),
        "",
        "## Lineage",
        "",
        f"- Run: `{info['run']}` (recipe `{info['recipe']}`"
        + (f", overrides `{' '.join(info['overrides'])}`" if info.get("overrides") else "") + ")",
        f"- Method: {json.dumps(info['adapter'])}",
        f"- Base model: `{info['base_model']}`",
        f"- Weights: {info['weights']}" if merged else "- Not merged: the adapter as trained",
        f"- dtype: {info['dtype']}",
        (f"- Training: {info['training'].get('precision')} precision, seed {info['training'].get('seed')}, "
         f"finished {info['training'].get('finished')}{losses}"),
        "- Versions at training: " + ", ".join(f"{k} {v}" for k, v in (versions["training"] or {}).items()),
        "- Versions at export: " + ", ".join(f"{k} {v}" for k, v in versions["export"].items()),
        f"- Exported {info['created']} by `{info['command']}`",
        "",
        "## Parity check",
        "",
        (f"The trained model (base and adapter as trained) and this export were run on the same {p['rows']} rows "
         f"of {p['source']}:"),
        "",
        "| check | result |",
        "|---|---|",
        f"| max \\|Δlogits\\| (last {KEEP_POSITIONS} positions of each row) | {p['max_abs_logit_diff']:.3g} |",
        f"| largest \\|logit\\| of the trained model | {p['logit_scale']:.3g} |",
        f"| tolerance: {p['rule']} | {p['tolerance']:.3g} |",
        f"| greedy continuations identical ({GREEDY_TOKENS} tokens) | {p['greedy_identical']}/{p['rows']} |",
        f"| greedy token agreement | {p['greedy_token_agreement']:.1%} |",
        f"| result | {'passed' if p['passed'] else 'FAILED (written with --force)'} |",
        "",
        "## Recipe",
        "",
        "```yaml",
        dump_recipe(trained.recipe).rstrip(),
        "```",
        "",
    ]
    return "\n".join(lines)
