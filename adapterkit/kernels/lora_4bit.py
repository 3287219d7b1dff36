"""LoRA on a 4-bit base as one autograd function per layer, and the gated MLP as one for its three.

peft computes a QLoRA layer as bitsandbytes' 4-bit matmul plus a LoRA branch of separate modules,
and autograd keeps what each op needs: the input cast for lora_A (one copy per projection: q, k and
v each cast the same input), a dropout mask and the dropped input, and in the MLP the gate output,
its activation, the up output and their product. Here (after Unsloth's published design, no code
taken) the forward dequantises W, runs `x @ W.T + s * (drop(x) @ A.T) @ B.T` and keeps only:

- the input itself (shared by every projection that reads it), a bool dropout mask, and `drop(x) @ A.T`
  (rank r wide);
- for the MLP, the gate and up outputs: `act(gate) * up` is recomputed in backward, and the down
  projection's input is never kept.

The backward dequantises W again (the dense weight is never saved) and computes the gradients of
the input and of A and B only: the base is frozen. Its dtype rules are peft's and bitsandbytes':
under autocast every matmul runs in the autocast dtype; without it the base matmul runs in the
layer's compute dtype and the LoRA branch in the adapter's dtype; the output has the input's dtype.

`fuse` swaps the forward of each eligible peft `Linear4bit` (and of each Llama-style gated MLP whose
three projections are eligible) on a model instance. A layer it cannot take (DoRA, a LoRA bias, a
trained base bias, several adapters) keeps peft's forward, and the reason is counted. At call time
the fused forward steps aside for peft's whenever peft would do something else: adapters disabled
(the DPO reference pass), merged, a mixed-adapter batch.
"""

from __future__ import annotations

import types
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch

from adapterkit.kernels.nf4 import dequantize

GATED_MLPS = {"llama": "LlamaMLP", "mistral": "MistralMLP", "qwen2": "Qwen2MLP", "qwen3": "Qwen3MLP",
              "gemma2": "Gemma2MLP", "gemma3_text": "Gemma3MLP"}
"""Model type: its MLP class, whose forward is `down_proj(act_fn(gate_proj(x)) * up_proj(x))` (checked
against the eager forward for each in tests/test_kernels.py). Phi-3's MLP fuses gate and up in one
matrix: its projections are fused one by one, as are GPT-2's, GPT-NeoX's and OPT's."""


@dataclass
class Projection:
    """One LoRA-on-4-bit linear layer's frozen parts and settings, for the functions below."""

    packed: torch.Tensor
    state: Any
    bias: torch.Tensor | None
    scaling: float
    dropout: float
    compute_dtype: torch.dtype | None

    def dtypes(self, x: torch.Tensor, lora_dtype: torch.dtype) -> tuple[torch.dtype, torch.dtype]:
        """(base matmul dtype, LoRA branch dtype) for input `x`, as bitsandbytes and peft choose them in
        forward. Backward runs outside autocast, so the functions keep what forward chose."""
        if torch.is_autocast_enabled(x.device.type):
            half = torch.get_autocast_dtype(x.device.type)
            return half, half
        return self.compute_dtype or x.dtype, lora_dtype


Dtypes = tuple[torch.dtype, torch.dtype]


def _forward(x: torch.Tensor, p: Projection, a: torch.Tensor, b: torch.Tensor, training: bool
             ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, Dtypes]:
    """(output in x's dtype, dropout mask or None, drop(x) @ A.T, the dtypes used) for x of shape (N, in)."""
    base_dtype, lora_dtype = dtypes = p.dtypes(x, a.dtype)
    with torch.autocast(x.device.type, enabled=False):
        y = x.to(base_dtype) @ dequantize(p.packed, p.state, base_dtype).t()  # (N, out)
        if p.bias is not None:
            y = y + p.bias.to(base_dtype)
        xl = x.to(lora_dtype)
        mask = None
        if p.dropout > 0 and training:
            xl, mask = torch.native_dropout(xl, p.dropout, True)  # the same mask as nn.Dropout draws
        xa = xl @ a.to(lora_dtype).t()  # (N, r)
        y = y.to(x.dtype) + ((xa @ b.to(lora_dtype).t()) * p.scaling).to(x.dtype)
    return y, mask, xa, dtypes


def _backward(dy: torch.Tensor, x: torch.Tensor, p: Projection, a: torch.Tensor, b: torch.Tensor,
              mask: torch.Tensor | None, xa: torch.Tensor, dtypes: Dtypes, needs: tuple[bool, bool, bool]
              ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(dx, dA, dB) for the output gradient dy (N, out), in forward's `dtypes`; None where `needs`
    says it is not wanted."""
    base_dtype, lora_dtype = dtypes
    dx = da = db = None
    with torch.autocast(x.device.type, enabled=False):
        dyl = dy.to(lora_dtype)
        dxa = (dyl @ b.to(lora_dtype)) * p.scaling  # (N, r)
        if needs[2]:
            db = ((dyl.t() @ xa) * p.scaling).to(b.dtype)  # (out, r)
        scale = 1.0 / (1.0 - p.dropout) if mask is not None else 1.0
        if needs[1]:
            xl = x.to(lora_dtype)
            if mask is not None:
                xl = xl.mul(mask).mul_(scale)  # native_dropout's own arithmetic
            da = (dxa.t() @ xl).to(a.dtype)  # (r, in)
        if needs[0]:
            dx = (dy.to(base_dtype) @ dequantize(p.packed, p.state, base_dtype)).to(x.dtype)
            dlora = dxa @ a.to(lora_dtype)
            if mask is not None:
                dlora = dlora.mul(mask).mul_(scale)
            dx = dx + dlora.to(x.dtype)
    return dx, da, db


class LoRA4bitLinear(torch.autograd.Function):
    """One projection: `x @ W.T (+ bias) + s * (drop(x) @ A.T) @ B.T` with W 4-bit."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, p: Projection,
                training: bool) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        y, mask, xa, ctx.dtypes = _forward(x2, p, a, b, training)
        ctx.save_for_backward(x2, a, b, mask, xa)
        ctx.p = p
        return y.reshape(*shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[Any, ...]:
        x2, a, b, mask, xa = ctx.saved_tensors
        dx, da, db = _backward(dy.reshape(-1, dy.shape[-1]), x2, ctx.p, a, b, mask, xa, ctx.dtypes,
                               ctx.needs_input_grad[:3])
        return (None if dx is None else dx.reshape(*dy.shape[:-1], x2.shape[-1])), da, db, None, None


class LoRA4bitMLP(torch.autograd.Function):
    """`down(act(gate(x)) * up(x))`, each projection LoRA on 4-bit; keeps x, gate(x) and up(x)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, ag: torch.Tensor, bg: torch.Tensor, au: torch.Tensor,
                bu: torch.Tensor, ad: torch.Tensor, bd: torch.Tensor, projections: tuple[Projection, ...],
                act: Any, training: bool) -> torch.Tensor:
        gate, up, down = projections
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        g, mask_g, xa_g, dt_g = _forward(x2, gate, ag, bg, training)  # (N, inter)
        u, mask_u, xa_u, dt_u = _forward(x2, up, au, bu, training)
        y, mask_d, xa_d, dt_d = _forward(act(g) * u, down, ad, bd, training)  # (N, hidden)
        ctx.save_for_backward(x2, g, u, ag, bg, au, bu, ad, bd, mask_g, mask_u, mask_d, xa_g, xa_u, xa_d)
        ctx.projections, ctx.act, ctx.dtypes = projections, act, (dt_g, dt_u, dt_d)
        return y.reshape(*shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[Any, ...]:
        x2, g, u, ag, bg, au, bu, ad, bd, mask_g, mask_u, mask_d, xa_g, xa_u, xa_d = ctx.saved_tensors
        gate, up, down = ctx.projections
        dt_g, dt_u, dt_d = ctx.dtypes
        needs = ctx.needs_input_grad
        with torch.enable_grad():  # the activation's derivative, whatever the activation
            g_ = g.detach().requires_grad_()
            activated = ctx.act(g_)
        h = activated.detach() * u
        dh, dad, dbd = _backward(dy.reshape(-1, dy.shape[-1]), h, down, ad, bd, mask_d, xa_d, dt_d,
                                 (True, *needs[5:7]))
        du = dh * activated.detach()
        (dg,) = torch.autograd.grad(activated, g_, dh * u)
        want_x = needs[0]
        dxg, dag, dbg = _backward(dg, x2, gate, ag, bg, mask_g, xa_g, dt_g, (want_x, *needs[1:3]))
        dxu, dau, dbu = _backward(du, x2, up, au, bu, mask_u, xa_u, dt_u, (want_x, *needs[3:5]))
        dx = (dxg + dxu).reshape(*dy.shape[:-1], x2.shape[-1]) if want_x else None
        return dx, dag, dbg, dau, dbu, dad, dbd, None, None, None


# ---------------------------------------------------------------------------------------------
# Putting them into a peft model


def _refusal(layer: Any) -> str | None:
    """Why a peft Linear4bit cannot take the fused path, or None."""
    adapters = list(layer.lora_A.keys())
    if len(adapters) != 1:
        return "several adapters on one layer"
    name = adapters[0]
    if name in getattr(layer, "lora_variant", {}):
        return "DoRA (its magnitude needs the weight norm)"
    if layer.lora_B[name].bias is not None:
        return "a LoRA bias (lora_bias)"
    if getattr(layer, "fan_in_fan_out", False):
        return "fan_in_fan_out weights"
    base = layer.get_base_layer()
    if base.bias is not None and base.bias.requires_grad:
        return "a trained base bias"
    state = getattr(base.weight, "quant_state", None)
    if state is None or getattr(state, "packing_format_for_cpu", False):
        return "a 4-bit weight not in bitsandbytes' standard layout"
    return None


def _projection(layer: Any) -> tuple[Projection, torch.Tensor, torch.Tensor]:
    name = next(iter(layer.lora_A.keys()))
    base = layer.get_base_layer()
    dropout = layer.lora_dropout[name]
    p = Projection(base.weight, base.weight.quant_state, base.bias, float(layer.scaling[name]),
                   float(dropout.p) if isinstance(dropout, torch.nn.Dropout) else 0.0, base.compute_dtype)
    return p, layer.lora_A[name].weight, layer.lora_B[name].weight


def _plain(layer: Any, kwargs: dict[str, Any]) -> bool:
    """Whether peft's own forward must run this call: the adapter off or merged, a mixed batch."""
    return (layer.disable_adapters or layer.merged or bool(kwargs)
            or list(layer.active_adapters) != list(layer.lora_A.keys()))


def _linear_forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    if args or _plain(self, kwargs):
        return type(self).forward(self, x, *args, **kwargs)
    p, a, b = _projection(self)
    return LoRA4bitLinear.apply(x, a, b, p, self.training)


def _mlp_forward(self: Any, x: torch.Tensor) -> torch.Tensor:
    layers = (self.gate_proj, self.up_proj, self.down_proj)
    if any(_plain(layer, {}) for layer in layers):
        return type(self).forward(self, x)
    (pg, ag, bg), (pu, au, bu), (pd, ad, bd) = (_projection(layer) for layer in layers)
    return LoRA4bitMLP.apply(x, ag, bg, au, bu, ad, bd, (pg, pu, pd), self.act_fn, self.training)


@dataclass
class Fused:
    """What `fuse` did to a model."""

    layers: int = 0
    """4-bit LoRA projections on the fused path (inside fused MLPs included)."""
    mlps: int = 0
    """Gated MLPs fused as one function."""
    kept: Counter = field(default_factory=Counter)
    """Projections left on peft's path, by reason."""

    def to_dict(self) -> dict[str, Any]:
        return {"layers": self.layers, "mlps": self.mlps, "kept": dict(self.kept)}


def fuse(model: torch.nn.Module) -> Fused:
    """Put every eligible 4-bit LoRA projection (and Llama-style gated MLP) of a peft model on the
    fused path, in place. Returns what was fused and what was kept on peft's path, and why."""
    from peft.tuners.lora.bnb import Linear4bit

    done = Fused()
    eligible = set()
    for module in model.modules():
        if isinstance(module, Linear4bit):
            why = _refusal(module)
            if why is None:
                eligible.add(module)
                module.forward = types.MethodType(_linear_forward, module)
                done.layers += 1
            else:
                done.kept[why] += 1
    for module in model.modules():
        if type(module).__name__ in GATED_MLPS.values() and all(
                getattr(module, name, None) in eligible for name in ("gate_proj", "up_proj", "down_proj")):
            module.forward = types.MethodType(_mlp_forward, module)
            done.mlps += 1
    return done
