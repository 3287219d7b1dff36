"""The training kernels (`train.kernels`), checked against their references on a CPU.

Triton kernels run here under Triton's interpreter (conftest sets TRITON_INTERPRET=1 where there is no
CUDA GPU). The NF4/FP4 dequantisation must give bitsandbytes' bits exactly; the fused 4-bit LoRA path
must compute peft's loss and gradients (float32: to 1e-5) on every family that has 4-bit layers, keep
less for backward, and step aside wherever peft does something else.

    python -m pytest -q tests/test_kernels.py
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import architectures
from adapterkit import kernels, models
from adapterkit.adapters.lora import lora_config
from adapterkit.config import LoraSettings, ModelConfig, QuantSettings, load_recipe
from adapterkit.kernels import lora_4bit, nf4
from adapterkit.stages import run

triton = pytest.importorskip("triton", reason="the kernels are Triton kernels: pip install -e '.[test]' on Linux")
pytestmark = pytest.mark.skipif(not nf4.triton_runs_on(torch.device("cuda" if torch.cuda.is_available() else "cpu")),
                                reason="Triton needs a CUDA GPU or TRITON_INTERPRET=1 (set by conftest)")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
FAMILIES_4BIT = ["llama", "qwen2", "qwen3", "gemma2", "gemma3", "mistral", "phi3", "gpt2", "gpt_neox", "opt"]


# ---------------------------------------------------------------------------------------------
# NF4 / FP4 dequantisation


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [False, True], ids=["absmax-f32", "double-quant"])
@pytest.mark.parametrize("shape, dtype, blocksize", [
    ((96, 130), torch.float32, 64),     # 12,480 values: the last block partial, not a multiple of BLOCK
    ((33, 70), torch.bfloat16, 64),     # bf16: rounded to nearest even, as torch casts
    ((256, 520), torch.float16, 128),
    ((3, 5), torch.float32, 64),        # fewer values than one block
    ((512, 600), torch.bfloat16, 256),  # 1,200 absmax values: more than one double-quant block of 256
])
def test_dequantisation_is_bitsandbytes_bit_for_bit(quant_type, nested, shape, dtype, blocksize):
    import bitsandbytes.functional as F

    gen = torch.Generator().manual_seed(0)
    weight = (torch.randn(shape, generator=gen) * torch.logspace(-2, 1, shape[1])).to(dtype).to(DEVICE)
    packed, state = F.quantize_4bit(weight, blocksize=blocksize, quant_type=quant_type, compress_statistics=nested)
    ours = nf4.dequantize_triton(packed, state)
    assert ours.dtype == dtype and ours.shape == shape
    # the storage format's arithmetic in plain torch (bitsandbytes' reference), the same on every machine
    assert torch.equal(ours, nf4.dequantize_reference(packed, state))
    if DEVICE.type == "cuda" or shape[1] % blocksize == 0:
        # bitsandbytes 0.50.2's C++ CPU kernel misreads some weights whose rows are not whole blocks
        # (64x96 and 8x32 measured: errors of 2.0 where the reference's are 0.45); elsewhere it agrees.
        assert torch.equal(ours, F.dequantize_4bit(packed, state))


def test_dequantisation_casts_after_rounding_to_the_weights_own_dtype():
    import bitsandbytes.functional as F

    packed, state = F.quantize_4bit(torch.randn(64, 128, dtype=torch.bfloat16, device=DEVICE), quant_type="nf4")
    assert torch.equal(nf4.dequantize_triton(packed, state, torch.float32), F.dequantize_4bit(packed, state).float())


# ---------------------------------------------------------------------------------------------
# The fused 4-bit LoRA path against peft's


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    cache: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in cache:
            cache[name] = architectures.build(name, tmp_path_factory.mktemp(name))
        return cache[name]

    return get


def _qlora(model_dir: Path, seed: int = 1, **lora) -> torch.nn.Module:
    from peft import get_peft_model

    quant = models.quantization_config(QuantSettings(), torch.float32)
    base = models.load_model(ModelConfig(), str(model_dir), torch.float32, quant, DEVICE)
    torch.manual_seed(seed)
    model = get_peft_model(base, lora_config(LoraSettings(**({"dropout": 0.1, "target_modules": "all-linear"} | lora))))
    for name, p in model.named_parameters():
        if "lora_B" in name:  # B starts at zero; give it values so that every gradient is exercised
            p.data.normal_(0, 0.5)
    return model


def _loss_and_grads(model, ids, train=True, autocast=False):
    model.train(train)
    model.zero_grad()
    torch.manual_seed(5)  # the same dropout masks for both paths
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=autocast):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()  # outside autocast, as the Trainer runs it
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("family", FAMILIES_4BIT)
def test_fused_path_computes_peft_loss_and_gradients(family, family_dirs):
    plain, fused = _qlora(family_dirs(family)), _qlora(family_dirs(family))
    done = lora_4bit.fuse(fused)
    from peft.tuners.lora.bnb import Linear4bit

    assert done.layers == len([m for m in fused.modules() if isinstance(m, Linear4bit)]) > 0, done
    assert not done.kept
    expected_mlps = 0 if family in ("phi3", "gpt2", "gpt_neox", "opt") else architectures.LAYERS
    assert done.mlps == expected_mlps
    ids = torch.randint(0, 500, (2, 19), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    loss, grads = _loss_and_grads(plain, ids)
    fused_loss, fused_grads = _loss_and_grads(fused, ids)
    assert fused_loss == pytest.approx(loss, rel=1e-6)
    for name, g in grads.items():
        assert torch.allclose(fused_grads[name], g, rtol=1e-4, atol=1e-5 * g.abs().max().item()), name
    assert any(g.abs().sum() > 0 for n, g in fused_grads.items() if "lora_A" in n)


def test_fused_path_under_bf16_autocast_matches_peft_within_bf16(family_dirs):
    plain, fused = _qlora(family_dirs("llama"), dropout=0.0), _qlora(family_dirs("llama"), dropout=0.0)
    lora_4bit.fuse(fused)
    ids = torch.randint(0, 500, (2, 19), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    loss, grads = _loss_and_grads(plain, ids, autocast=True)
    fused_loss, fused_grads = _loss_and_grads(fused, ids, autocast=True)
    assert fused_loss == pytest.approx(loss, rel=2e-2)
    for name, g in grads.items():
        cos = torch.nn.functional.cosine_similarity(fused_grads[name].flatten(), g.flatten(), dim=0)
        assert cos > 0.99, (name, cos.item())


def test_fused_path_steps_aside_when_the_adapter_is_off_and_in_eval(family_dirs):
    plain, fused = _qlora(family_dirs("qwen2")), _qlora(family_dirs("qwen2"))  # qwen2: q/k/v with a bias
    lora_4bit.fuse(fused)
    ids = torch.randint(0, 500, (1, 11), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    fused.eval()
    plain.eval()
    with torch.no_grad():
        on = fused(input_ids=ids).logits
        assert torch.allclose(on, plain(input_ids=ids).logits, atol=1e-5)
        with fused.disable_adapter():  # the DPO reference pass
            off = fused(input_ids=ids).logits
        with plain.disable_adapter():
            assert torch.equal(off, plain(input_ids=ids).logits)
    assert not torch.allclose(on, off, atol=1e-3)


def test_dora_and_lora_bias_keep_peft_path_and_say_why(family_dirs):
    model = _qlora(family_dirs("llama"), dora=True)
    ran = kernels.apply(model, "adapterkit", True, DEVICE)
    assert ran.adapterkit["layers"] == 0 and ran.adapterkit["mlps"] == 0
    assert any("DoRA" in note for note in ran.notes), ran.notes


def test_kernels_setting_leaves_out_what_does_not_apply(family_dirs):
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    plain_lora = get_peft_model(AutoModelForCausalLM.from_pretrained(family_dirs("llama")),
                                lora_config(LoraSettings()))
    ran = kernels.apply(plain_lora, "adapterkit", False, DEVICE)
    assert ran.adapterkit is None and "adapter.method=qlora" in ran.notes[0]
    assert kernels.apply(plain_lora, "auto", False, torch.device("cpu")).to_dict() == {
        "setting": "auto", "adapterkit": None, "liger": None, "notes": []}
    if kernels.liger_installed():
        gpt2 = get_peft_model(AutoModelForCausalLM.from_pretrained(family_dirs("gpt2")),
                              lora_config(LoraSettings(target_modules="all-linear")))
        ran = kernels.apply(gpt2, "liger", False, DEVICE)
        assert ran.liger is None and "no kernels for 'gpt2'" in ran.notes[0]


def _saved_bytes(model, ids) -> int:
    """Bytes of the distinct tensors autograd keeps for backward over one forward."""
    storages: dict[int, int] = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return sum(storages.values())


def test_fused_path_keeps_less_for_backward(family_dirs):
    ids = torch.randint(0, 500, (4, 64), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    plain, fused = _qlora(family_dirs("llama")), _qlora(family_dirs("llama"))
    lora_4bit.fuse(fused)
    kept_plain, kept_fused = _saved_bytes(plain, ids), _saved_bytes(fused, ids)
    # Per layer and token peft keeps gate, act(gate), up and their product (4 x 128 float32), three
    # copies of each LoRA input and the dropped inputs; the fused path keeps gate and up, one bool mask each.
    assert kept_fused < 0.75 * kept_plain, (kept_fused, kept_plain)


# ---------------------------------------------------------------------------------------------
# End to end: a QLoRA recipe with the kernels on, and with them off


def _qlora_run(tmp_path, name, *overrides):
    recipe, src = load_recipe("qlora-qa", ["train.max_steps=2", "train.log_every=1", "train.save_every=null",
                                           "train.precision=fp32", "data.eval=null", "train.batch_size=4",
                                           f"output_dir={tmp_path / name}", *overrides])
    out = run(recipe, src, echo=False).out
    losses = [json.loads(line)["loss"] for line in (out / "train_log.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    return losses, json.loads((out / "manifest.json").read_text())


def test_qlora_recipe_trains_the_same_with_adapterkit_kernels(tmp_path, fast_builtin):
    off, _ = _qlora_run(tmp_path, "off", "train.kernels=off")
    on, manifest = _qlora_run(tmp_path, "on", "train.kernels=adapterkit")
    assert len(on) == len(off) == 2
    assert on == pytest.approx(off, rel=1e-5)
    ran = manifest["auto"]["kernels"]
    assert ran["setting"] == "adapterkit" and ran["adapterkit"]["layers"] > 0 and ran["adapterkit"]["mlps"] > 0
    assert ran["adapterkit"]["dequantise"] == "triton"


@pytest.mark.skipif(not kernels.liger_installed(), reason="liger-kernel is not installed (pip install -e '.[gpu]')")
def test_qlora_recipe_trains_with_liger_in_its_own_process(tmp_path, fast_builtin):
    # Liger patches transformers' modules process-wide (its RoPE replaces a module function), so the run
    # gets a process of its own.
    # Short rows: Triton's interpreter runs every program of the RoPE kernel in Python.
    small = ["data.max_length=64", "train.batch_size=2"]
    args = ["recipe", "run", "qlora-qa", "train.max_steps=2", "train.log_every=1", "train.save_every=null",
            "train.precision=fp32", "data.eval=null", "train.kernels=liger", *small]
    done = subprocess.run([sys.executable, "-m", "adapterkit", *args, f"output_dir={tmp_path / 'liger'}"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "kernels (liger): liger rope" in done.stdout
    assert "fail under Triton's interpreter" in done.stdout
    assert "could not be imported" not in done.stdout + done.stderr  # Liger's optional backends, quieted
    manifest = json.loads((tmp_path / "liger" / "manifest.json").read_text())
    assert manifest["auto"]["kernels"]["liger"] == ["rope"]
    liger = [json.loads(line)["loss"] for line in (tmp_path / "liger" / "train_log.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    off, _ = _qlora_run(tmp_path, "off", "train.kernels=off", *small)
    assert liger == pytest.approx(off, rel=1e-4)


def test_gpu_benchmark_runs_at_tiny_shapes_and_its_kernels_agree(tmp_path, offline_env):
    out = tmp_path / "gpu_kernels.md"
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_kernels.py"
    done = subprocess.run([sys.executable, str(script), "--tiny", "--out", str(out)], capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.with_suffix(".json").read_text())
    assert [(r["method"], r["kernels_setting"]) for r in result["training"]] == [
        ("qlora", "off"), ("qlora", "adapterkit"), ("qlora", "both")]
    fused = result["training"][1]["kernels"]["adapterkit"]
    assert fused["layers"] > 0 and fused["mlps"] > 0
    # two steps each: the same losses with the kernels on and off
    assert result["training"][1]["losses"] == pytest.approx(result["training"][0]["losses"], rel=1e-4)
    assert result["alone"] and all(r["same"] for r in result["alone"]), result["alone"]
    assert "| llama-tiny | qlora | adapterkit |" in out.read_text()


def test_fused_path_under_gradient_accumulation_scales_the_loss_by_the_batchs_tokens(tmp_path, fast_builtin):
    # One step of 4 rows against two accumulated micro-batches of 2 with different token counts: trl's
    # fused head divides by num_items_in_batch (all supervised tokens of the step), so the gradient is
    # the same. A per-micro-batch mean would weigh the two halves equally and move the gradient norm.
    def one_step(name, batch, accum):
        recipe, src = load_recipe("qlora-qa", ["train.max_steps=1", "train.log_every=1", "train.save_every=null",
                                               "train.precision=fp32", "data.eval=null", "data.packing=false",
                                               "adapter.lora.dropout=0", "train.kernels=adapterkit",
                                               f"train.batch_size={batch}", f"train.grad_accum={accum}",
                                               f"output_dir={tmp_path / name}"])
        out = run(recipe, src, echo=False).out
        return next(json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()
                    if "grad_norm" in json.loads(line))

    whole, accumulated = one_step("whole", 4, 1), one_step("accumulated", 2, 2)
    assert accumulated["grad_norm"] == pytest.approx(whole["grad_norm"], rel=1e-4)
    assert accumulated["loss"] == pytest.approx(whole["loss"], rel=1e-4)
