"""GPU kernels for training, chosen by one setting, `train.kernels`:

- `adapterkit`: our own path for a 4-bit base (`lora_4bit`): each QLoRA projection, and each gated MLP,
  as one autograd function that dequantises the NF4/FP4 weight with our Triton kernel (`nf4`) in forward
  and again in backward, and keeps less for backward than peft and bitsandbytes do;
- `liger`: Liger-Kernel's RoPE, RMSNorm and SwiGLU/GEGLU, on the architectures Liger supports;
- `both`; `off`; `auto`: on a CUDA GPU, what benchmarks/gpu_kernels.py has measured to help there
  (`AUTO_ON_CUDA`); nothing yet, since no GPU has been lent to measure on; off on a CPU.

The loss needs no kernel of its own: trl's trainers (SFT, DPO, KTO) already score the vocabulary in
tiles through their fused LM head and never build the (batch, seq, vocab) logits, and on a GPU that
head is a Triton kernel of trl's. Liger's fused linear cross-entropy would replace the model's forward
that trl patches, so trl refuses it, and so does this module.

A kernel that does not apply to a run (a method, an architecture, a device) is left out with one line
saying why; nothing fails for it. What ran is returned for the run's manifest.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Any

import torch

from adapterkit.kernels import lora_4bit
from adapterkit.kernels.nf4 import triton_runs_on

SETTINGS = ("auto", "off", "adapterkit", "liger", "both")

LIGER_LAYER_KERNELS = ("rope", "rms_norm", "swiglu", "geglu")
"""The Liger kernels applied (the arguments of its `apply_liger_kernel_to_*` functions; each family has
its own subset: Gemma's MLP is GEGLU, Phi-3's has no SwiGLU module)."""
LIGER_UNDER_INTERPRETER = ("rope",)
"""The ones that run under Triton's interpreter on a CPU: Liger 0.8.5's RMSNorm, SwiGLU and GEGLU fail
there ("'float' object has no attribute 'to'"), measured with triton 3.9.0."""


def liger_installed() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


@dataclass
class KernelsRan:
    """What `apply` put into a model, for the manifest and the run's output."""

    setting: str
    adapterkit: dict[str, Any] | None = None
    """Our fused 4-bit LoRA path: layers and MLPs fused, layers kept on peft's path by reason, and
    what dequantised (triton or bitsandbytes)."""
    liger: list[str] | None = None
    """The Liger kernels applied."""
    notes: list[str] = field(default_factory=list)
    """One line per kernel left out, and why."""

    def to_dict(self) -> dict[str, Any]:
        return {"setting": self.setting, "adapterkit": self.adapterkit, "liger": self.liger, "notes": self.notes}

    def summary(self) -> str:
        parts = []
        if self.adapterkit:
            a = self.adapterkit
            parts.append(f"fused 4-bit LoRA on {a['layers']} projections ({a['mlps']} gated MLPs as one "
                         f"function), dequantised by {a['dequantise']}")
        if self.liger:
            parts.append("liger " + ", ".join(self.liger))
        return f"kernels ({self.setting}): " + ("; ".join(parts) if parts else "none")


AUTO_ON_CUDA: tuple[str, ...] = ()
"""What `auto` turns on on a CUDA GPU: the kernels benchmarks/gpu_kernels.py has measured to help there.
Empty: no GPU has been lent to this project yet, so nothing has been measured and `auto` is off."""


def wanted(setting: str, device_type: str) -> tuple[bool, bool]:
    """(our fused 4-bit path, Liger) for a `train.kernels` setting on a device type."""
    if setting == "auto":
        on = AUTO_ON_CUDA if device_type == "cuda" else ()
        return "adapterkit" in on, "liger" in on and liger_installed()
    return setting in ("adapterkit", "both"), setting in ("liger", "both")


def apply(model: Any, setting: str, quantized_base: bool, device: torch.device) -> KernelsRan:
    """Put the kernels `setting` asks for into a peft (or plain) model, in place."""
    ran = KernelsRan(setting)
    ours, liger = wanted(setting, device.type)
    fused_mlps = False
    if ours and not quantized_base:
        ran.notes.append("train.kernels: the adapterkit kernels are for a 4-bit base (adapter.method=qlora); "
                         "this run keeps peft's path")
    elif ours:
        done = lora_4bit.fuse(model)
        fused_mlps = done.mlps > 0
        ran.adapterkit = done.to_dict() | {"dequantise": "triton" if triton_runs_on(device) else "bitsandbytes"}
        for why, n in done.kept.items():
            ran.notes.append(f"train.kernels: {n} projection(s) keep peft's path: {why}")
        if not done.layers:
            ran.notes.append("train.kernels: no 4-bit LoRA projection could take the fused path")
        if not triton_runs_on(device):
            ran.notes.append("train.kernels: Triton runs on a CUDA GPU (or on a CPU with TRITON_INTERPRET=1, for "
                             "testing); the fused functions dequantise with bitsandbytes here")
    if liger:
        ran.liger = _apply_liger(model, device, skip_mlp=fused_mlps, notes=ran.notes)
    return ran


def _apply_liger(model: Any, device: torch.device, skip_mlp: bool, notes: list[str]) -> list[str] | None:
    import inspect

    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    from transformers.integrations.liger import apply_liger_kernel

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        notes.append(f"train.kernels: Liger has no kernels for {model_type!r} models; the plain path runs")
        return None
    if not triton_runs_on(device):
        notes.append("train.kernels: Liger's kernels are Triton kernels and need a CUDA GPU (or TRITON_INTERPRET=1 "
                     "on a CPU, for testing); the plain path runs")
        return None
    takes = inspect.signature(MODEL_TYPE_TO_APPLY_LIGER_FN[model_type]).parameters
    names = [k for k in LIGER_LAYER_KERNELS if k in takes]
    if skip_mlp:
        names = [k for k in names if k not in ("swiglu", "geglu")]
    if device.type == "cpu":
        left = [k for k in names if k not in LIGER_UNDER_INTERPRETER]
        if left:
            notes.append(f"train.kernels: Liger's {', '.join(left)} fail under Triton's interpreter; only "
                         f"{', '.join(k for k in names if k in LIGER_UNDER_INTERPRETER) or 'nothing'} runs on this CPU")
        names = [k for k in names if k in LIGER_UNDER_INTERPRETER]
    config = {k: k in names for k in LIGER_LAYER_KERNELS if k in takes}
    # trl's fused LM head already keeps the logits from being built; Liger's would replace the forward it patches.
    config.update(cross_entropy=False, fused_linear_cross_entropy=False)
    apply_liger_kernel(model, config)
    return names
