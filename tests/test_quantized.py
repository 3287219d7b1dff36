"""4-bit bases read the same on every CPU: bitsandbytes' CPU repacking never reaches training, merging or
export, whichever layout a machine's bitsandbytes would choose.

On CPUs with AVX512-BF16, bitsandbytes 0.50 repacks a 4-bit weight in place into a CPU-only layout the
first time it runs in eval mode without grad. CI machines differ, so the repacked layout is produced here
with bitsandbytes' own conversion (which runs on any CPU), never inherited from the machine.

    python -m pytest -q tests/test_quantized.py
"""

from __future__ import annotations

import pytest
import torch

from adapterkit import models
from adapterkit.adapters.lora import lora_config
from adapterkit.models import quantization_config
from adapterkit.config import LoraSettings, ModelConfig, QuantSettings


def _load_4bit(model_dir):
    quant = quantization_config(QuantSettings(), torch.float32)
    return models.load_model(ModelConfig(), str(model_dir), torch.float32, quant, torch.device("cpu"))


def _dequantized(model) -> dict[str, torch.Tensor]:
    from bitsandbytes.functional import dequantize_4bit

    return {name: dequantize_4bit(m.weight.data, m.weight.quant_state).clone()
            for name, m in model.named_modules() if m in models.linear_4bit_layers(model)}


def _repack_as_avx512bf16_cpus_do(model) -> int:
    """What `Linear4bit.forward` does to each weight on an AVX512-BF16 CPU, done explicitly."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu

    n = 0
    for layer in models.linear_4bit_layers(model):
        if layer.weight.shape[0] and layer.out_features % 32 == 0:
            layer.weight.data, layer.weight.quant_state = _convert_weight_packed_for_cpu(
                layer.weight.data, layer.weight.quant_state)
            n += 1
    return n


def _lora_grads(model, batch) -> dict[str, torch.Tensor]:
    model.train()
    model.zero_grad()
    model(**batch, labels=batch["input_ids"]).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_loaded_4bit_layers_never_repack(tiny_model_dir):
    model = _load_4bit(tiny_model_dir)
    layers = models.linear_4bit_layers(model)
    assert layers and all(not layer.support_avx512bf16_for_cpu for layer in layers)
    before = _dequantized(model)
    model.eval()
    with torch.no_grad():
        model(input_ids=torch.tensor([[1, 2, 3, 4]]))
    assert not any(getattr(layer.weight.quant_state, "packing_format_for_cpu", False) for layer in layers)
    after = _dequantized(model)
    assert all(torch.equal(before[n], after[n]) for n in before)


def test_lora_gradients_are_the_same_before_and_after_an_eval_pass(tiny_model_dir):
    """The shipped qlora-qa recipe scores the model before training: that pass must not change training."""
    from peft import get_peft_model

    model = get_peft_model(_load_4bit(tiny_model_dir), lora_config(LoraSettings(r=4, dropout=0.0)))
    torch.manual_seed(0)
    batch = {"input_ids": torch.randint(3, 500, (2, 12))}
    before = _lora_grads(model, batch)
    model.eval()
    with torch.no_grad():
        model(**batch)
    after = _lora_grads(model, batch)
    assert before.keys() == after.keys() and any(g.abs().sum() > 0 for g in before.values())
    for name in before:
        assert torch.equal(before[name], after[name]), name


def test_a_repacked_base_is_read_back_in_the_standard_layout(tiny_model_dir):
    from bitsandbytes.functional import dequantize_4bit

    model = _load_4bit(tiny_model_dir)
    reference = _dequantized(model)
    assert _repack_as_avx512bf16_cpus_do(model) == len(reference)
    # What code that dequantises the weight itself read before the fix: garbage.
    name, layer = next((n, m) for n, m in model.named_modules() if m in models.linear_4bit_layers(model))
    packed = layer.weight.data
    assert packed.shape != layer.weight.quant_state.original_qshape
    assert models.standard_4bit_layout(model) == len(reference)
    restored = _dequantized(model)
    for n, w in reference.items():
        # The repacking keeps absmax in bfloat16, so the round trip is close, not exact.
        rel = (restored[n] - w).norm() / w.norm()
        assert rel < 1e-2, (n, rel.item())
    assert not getattr(layer.weight.quant_state, "packing_format_for_cpu", False)
    assert dequantize_4bit(layer.weight.data, layer.weight.quant_state).shape == reference[name].shape


@pytest.mark.parametrize("repacked", [False, True], ids=["standard", "repacked"])
def test_qlora_merge_reads_the_trained_weights_whatever_the_layout(tmp_path, tiny_model_dir, repacked):
    """The export's merge into the dequantised NF4 base gives the same weights when bitsandbytes repacked
    the base before it (an eval pass on an AVX512-BF16 CPU) as when it did not."""
    from adapterkit.config import load_recipe
    from adapterkit.export import _merge
    from adapterkit.stages import run
    from adapterkit.trained import load_trained

    out = tmp_path / "q"
    recipe, src = load_recipe("qlora-qa", [f"model.name_or_path={tiny_model_dir}", "train.max_steps=2",
                                           "train.lr=1e-2", "train.precision=fp32", "data.eval=null",
                                           "train.save_every=null", f"output_dir={out}"])
    run(recipe, src, echo=False)
    clean, _ = _merge(load_trained(out), torch.float32, "quantized", torch.device("cpu"))
    trained = load_trained(out)
    if repacked:
        assert _repack_as_avx512bf16_cpus_do(trained.model) > 0
    merged, _ = _merge(trained, torch.float32, "quantized", torch.device("cpu"))
    expected = clean.state_dict()
    for name, w in merged.state_dict().items():
        tol = 1e-2 * expected[name].norm() if repacked else 0
        assert (w - expected[name]).norm() <= tol, name


def test_qlora_on_a_cpu_refuses_weights_bitsandbytes_cpu_kernel_misreads(tmp_path):
    """bitsandbytes 0.50.2's CPU kernel dequantises rows that are not whole 64-value blocks wrongly; a
    4-bit base with such a layer (here an MLP 96 wide) is refused on a CPU instead of training on it."""
    import bitsandbytes.functional as F
    from transformers import LlamaConfig, LlamaForCausalLM

    from adapterkit.errors import ConfigError
    from adapterkit.kernels.nf4 import dequantize_reference

    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=4)
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    weight = torch.randn(64, 96, generator=torch.Generator().manual_seed(0))
    packed, state = F.quantize_4bit(weight, blocksize=64, quant_type="nf4")
    reference = dequantize_reference(packed, state)
    kernel_error = (F.dequantize_4bit(packed, state) - weight).abs().max().item()
    reference_error = (reference - weight).abs().max().item()
    assert models.cpu_4bit_misreads_partial_rows() == (not torch.equal(F.dequantize_4bit(packed, state), reference))
    if models.cpu_4bit_misreads_partial_rows():
        assert kernel_error > 2 * reference_error  # wrong, not merely rounded differently
        with pytest.raises(ConfigError) as e:
            _load_4bit(tmp_path)
        assert "up_proj: 96x64" not in str(e.value) and "x96)" in str(e.value) and "adapter.method=lora" in str(e.value)
    else:  # a bitsandbytes that reads them right loads the model
        assert models.linear_4bit_layers(_load_4bit(tmp_path))
