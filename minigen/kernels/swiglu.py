"""SwiGLU gate (Llama MLP): y = silu(gate) * up, elementwise over (N, F).

Math, per element, in fp32, rounded once to gate.dtype:
    silu(g) = g * sigmoid(g) = g / (1 + exp(-g))
    y       = silu(g) * u

Grid: (rows, blocks of BLOCK_F columns); rows may be strided, e.g. the two halves of a fused
gate_up projection (N, 2F).

Cost per call: reads 2*N*F*sizeof(gate), writes N*F*sizeof(gate).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from minigen.kernels.launch import output, rows_2d


@triton.jit
def _swiglu_kernel(
    # pointers
    G, U, Y,
    # sizes
    F,
    # strides (elements; the last dim is contiguous)
    stride_gn, stride_un, stride_yn,
    # constexprs
    BLOCK_F: tl.constexpr,
):
    # ---- which tile: row (int64 so row * stride cannot overflow) and a block of columns
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    mask = cols < F
    # ---- load both operands in fp32
    g = tl.load(G + row * stride_gn + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + row * stride_un + cols, mask=mask, other=0.0).to(tl.float32)
    # ---- silu(g) * u, store in the output dtype
    y = g * tl.sigmoid(g) * u
    tl.store(Y + row * stride_yn + cols, y.to(Y.dtype.element_ty), mask=mask)


def _launch_config(N: int, F: int) -> tuple[int, int]:
    """(BLOCK_F, num_warps): 1024-wide tiles (8 elements a thread) when there are enough rows;
    few rows (decode) get 256-wide tiles so that more SMs take part."""
    block = min(triton.next_power_of_2(F), 1024 if N >= 16 else 256)
    return block, min(4, max(1, block // 256))


def swiglu(gate: torch.Tensor, up: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """silu(gate) * up for gate, up (N, F) (or (..., F)); returns out (same shape, gate.dtype)."""
    # ---- check shapes
    if gate.shape != up.shape:
        raise ValueError(f"swiglu: gate {tuple(gate.shape)} and up {tuple(up.shape)} must have the same shape")
    Fdim = gate.shape[-1]
    # rare column-strided inputs: one copy keeps the kernel vectorized
    gate = gate if gate.stride(-1) == 1 else gate.contiguous()
    up = up if up.stride(-1) == 1 else up.contiguous()
    g2, u2 = rows_2d(gate, Fdim, "swiglu gate"), rows_2d(up, Fdim, "swiglu up")    # (N, F)
    # ---- allocate or take out=
    out = output(out, gate.shape, gate.dtype, gate.device, "swiglu")
    y2 = rows_2d(out, Fdim, "swiglu out")                                            # (N, F)
    N = g2.shape[0]
    if N == 0 or Fdim == 0:
        return out
    # ---- launch: rows on axis 0 (up to 2^31), column blocks on axis 1 (few)
    BLOCK_F, num_warps = _launch_config(N, Fdim)
    _swiglu_kernel[(N, triton.cdiv(Fdim, BLOCK_F))](
        g2, u2, y2,
        Fdim,
        g2.stride(0), u2.stride(0), y2.stride(0),
        BLOCK_F=BLOCK_F, num_warps=num_warps,
    )
    return out


def swiglu_ref(gate: torch.Tensor, up: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Plain-torch silu(gate) * up in fp32, rounded once to gate.dtype."""
    y = (torch.nn.functional.silu(gate.float()) * up.float()).to(gate.dtype)
    if out is None:
        return y
    out.copy_(y)
    return out
