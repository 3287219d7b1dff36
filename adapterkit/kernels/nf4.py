"""Dequantising bitsandbytes' 4-bit weights (NF4 and FP4, with or without double quantisation) in one
Triton kernel, bit for bit what `bitsandbytes.functional.dequantize_4bit` returns.

bitsandbytes' storage, as read from its reference implementation (backends/default/ops.py):
- `weight` is uint8, two 4-bit codes per byte, the first value of each pair in the high nibble;
- value i is `code[nibble_i] * absmax[i // blocksize]`, computed in float32, then cast to the output dtype;
- with double quantisation `absmax` is itself uint8: the float32 absmax of block j is
  `code2[absmax[j]] * absmax2[j // blocksize2]`, then `+ offset`, rounded after each step.

bitsandbytes dequantises the absmax in a separate pass and then the weight in another; here one
kernel does both, so the dense float32 absmax is never written. Floating-point contraction is off
(`enable_fp_fusion=False`): a fused multiply-add of the double-quantised absmax would round once where
bitsandbytes rounds twice, and the result would no longer be bit-exact.

Triton runs on a CUDA GPU, or on the CPU under its interpreter (TRITON_INTERPRET=1, for testing: slow).
Elsewhere `dequantize` is bitsandbytes' own function, so callers need not care where they run.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import torch

BLOCK = 1024
"""Output values per Triton program."""


def triton_runs_on(device: torch.device) -> bool:
    """Whether a Triton kernel can run on tensors of `device`: a CUDA GPU, or the CPU under Triton's
    interpreter (TRITON_INTERPRET=1). False when Triton is not installed."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def _kernel() -> Any:
    # Built on first use, not at import: Triton decides between the compiler and its interpreter when
    # a kernel is defined, and triton is an optional dependency.
    import triton
    import triton.language as tl

    @triton.jit
    def dequantize_4bit_kernel(packed, code, absmax, code2, absmax2, offset, out, n,
                               blocksize: tl.constexpr, blocksize2: tl.constexpr, nested: tl.constexpr,
                               OUT_BF16: tl.constexpr, BLOCK: tl.constexpr):
        i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        inside = i < n
        byte = tl.load(packed + i // 2, mask=inside, other=0).to(tl.int32)
        nibble = tl.where(i % 2 == 0, byte >> 4, byte & 15)
        value = tl.load(code + nibble, mask=inside, other=0.0)
        block = i // blocksize
        if nested:
            q = tl.load(absmax + block, mask=inside, other=0).to(tl.int32)
            scale = tl.load(code2 + q, mask=inside, other=0.0) * tl.load(absmax2 + block // blocksize2,
                                                                          mask=inside, other=0.0)
            scale = scale + tl.load(offset)
        else:
            scale = tl.load(absmax + block, mask=inside, other=0.0)
        result = value * scale
        if OUT_BF16:
            # float32 -> bfloat16 rounded to nearest, ties to even, in integer ops: Triton's interpreter
            # truncates in its own cast, and bitsandbytes (torch's cast) rounds.
            bits = result.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
            tl.store(out + i, bits.to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=inside)
        else:
            tl.store(out + i, result.to(out.dtype.element_ty), mask=inside)

    return dequantize_4bit_kernel


@functools.cache
def _code(quant_type: str, device: torch.device) -> torch.Tensor:
    from bitsandbytes.functional import get_4bit_type

    return get_4bit_type(quant_type, device=device).float().contiguous()


def dequantize_triton(packed: torch.Tensor, state: Any, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The dense weight (shape `state.shape`) of a bitsandbytes 4-bit tensor, by the Triton kernel.
    `packed` is `Linear4bit.weight` (any storage dtype, viewed as bytes). Like bitsandbytes the values
    are rounded to `state.dtype` (the weight's dtype before quantisation) first, then cast to `dtype`."""
    out = torch.empty(tuple(state.shape), dtype=state.dtype, device=packed.device)
    n = out.numel()
    nested = bool(state.nested)
    if nested:
        s2 = state.state2
        absmax, code2, absmax2 = state.absmax.contiguous(), s2.code.float().contiguous(), s2.absmax.float().contiguous()
        offset = torch.as_tensor(state.offset, dtype=torch.float32, device=packed.device).reshape(1)
        blocksize2 = s2.blocksize
    else:
        absmax = state.absmax.float().contiguous()
        code2 = absmax2 = offset = absmax  # not read
        blocksize2 = 1
    _kernel()[(-(-n // BLOCK),)](
        packed.contiguous().view(torch.uint8).reshape(-1), _code(state.quant_type, packed.device), absmax, code2,
        absmax2, offset, out.reshape(-1), n, blocksize=state.blocksize, blocksize2=blocksize2, nested=nested,
        OUT_BF16=out.dtype == torch.bfloat16, BLOCK=BLOCK, enable_fp_fusion=False)
    return out if dtype in (None, out.dtype) else out.to(dtype)


def dequantize_reference(packed: torch.Tensor, state: Any) -> torch.Tensor:
    """The dense weight by the storage format's arithmetic in plain torch ops, as bitsandbytes' own
    reference implementation computes it: slow, and the same on every machine (what the kernel and
    bitsandbytes' native kernels are checked against)."""
    from bitsandbytes.functional import dequantize_blockwise

    n = int(torch.Size(state.shape).numel())
    absmax = state.absmax
    if state.nested:
        absmax = dequantize_blockwise(absmax, state.state2) + state.offset
    nibbles = torch.stack([packed.reshape(-1) >> 4, packed.reshape(-1) & 15], dim=1).reshape(-1)[:n].long()
    values = _code(state.quant_type, packed.device)[nibbles]  # float32
    blocks = torch.arange(n, device=packed.device) // state.blocksize
    return (values * absmax.float()[blocks]).reshape(tuple(state.shape)).to(state.dtype)


def dequantize(packed: torch.Tensor, state: Any, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The dense weight of a bitsandbytes 4-bit tensor in `dtype`: by the Triton kernel where Triton runs
    (`triton_runs_on`), else by bitsandbytes. Both give the same bits."""
    if triton_runs_on(packed.device):
        return dequantize_triton(packed, state, dtype)
    from bitsandbytes.functional import dequantize_4bit

    dense = dequantize_4bit(packed, state)
    return dense if dtype is None else dense.to(dtype)
