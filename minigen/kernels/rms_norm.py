"""RMSNorm (Llama): y = weight * (x / sqrt(mean(x^2) + eps)), one program per row.

Math, per row x of C elements (Hugging Face LlamaRMSNorm order, so fp32 matches it bit for bit
up to the rsqrt rounding):
    ms     = sum(x_c^2) / C                       fp32
    normed = (x * rsqrt(ms + eps)).to(x.dtype)    rounded to the input dtype first ...
    y      = (normed * weight).to(x.dtype)        ... then scaled by the weight

Cost per call: reads N*C*sizeof(x) + C*sizeof(weight), writes N*C*sizeof(x); no other traffic
when a row fits in one block (C <= _MAX_BLOCK_C). Wider rows take two passes and read x twice
(the second read mostly hits L2).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from minigen.kernels.launch import output, row_launch_config, rows_2d

# Widest row held in registers in one block; wider rows loop over chunks of this size.
# (8192 fp32 over 8 warps = 32 registers per thread.) Tests lower it to exercise the loop.
_MAX_BLOCK_C = 8192


@triton.jit
def _rms_norm_kernel(
    # pointers
    X, W, Y,
    # sizes (C is a model constant: one compile per width, exact masks and loop bounds)
    C: tl.constexpr, eps,
    # strides (elements; the last dim is contiguous)
    stride_xn, stride_yn,
    # constexprs
    BLOCK_C: tl.constexpr, ONE_BLOCK: tl.constexpr,
):
    # ---- which row: int64 so row * stride cannot overflow on big activations
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * stride_xn
    y_row = Y + row * stride_yn
    cols = tl.arange(0, BLOCK_C)

    if ONE_BLOCK:
        # ---- phase 1: load the row once, mean of squares in fp32
        mask = cols < C
        x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.math.rsqrt(tl.sum(x * x, axis=0) / C + eps)
        # ---- phase 2: normalize, round to the input dtype (HF order), scale, store
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        normed = (x * rstd).to(X.dtype.element_ty).to(tl.float32)
        tl.store(y_row + cols, (normed * w).to(Y.dtype.element_ty), mask=mask)
    else:
        # ---- phase 1: sum of squares over chunks (elementwise fp32 partials, one reduction)
        acc = tl.zeros([BLOCK_C], dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            mask = c0 + cols < C
            x = tl.load(x_row + c0 + cols, mask=mask, other=0.0).to(tl.float32)
            acc += x * x
        rstd = tl.math.rsqrt(tl.sum(acc, axis=0) / C + eps)
        # ---- phase 2: second read of the row (L2), normalize, scale, store
        for c0 in range(0, C, BLOCK_C):
            mask = c0 + cols < C
            x = tl.load(x_row + c0 + cols, mask=mask, other=0.0).to(tl.float32)
            w = tl.load(W + c0 + cols, mask=mask, other=0.0).to(tl.float32)
            normed = (x * rstd).to(X.dtype.element_ty).to(tl.float32)
            tl.store(y_row + c0 + cols, (normed * w).to(Y.dtype.element_ty), mask=mask)


def _launch_config(C: int) -> tuple[int, bool, int]:
    """(BLOCK_C, ONE_BLOCK, num_warps): a whole row per block when it fits, else chunks."""
    return row_launch_config(C, _MAX_BLOCK_C)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             out: torch.Tensor | None = None) -> torch.Tensor:
    """RMSNorm over the last dim of x (N, C) (or (..., C)); returns out (same shape, x.dtype)."""
    # ---- check shapes
    C = x.shape[-1]
    if weight.shape != (C,):
        raise ValueError(f"rms_norm: weight shape {tuple(weight.shape)} != ({C},) (x is {tuple(x.shape)})")
    if x.stride(-1) != 1:
        x = x.contiguous()   # rare: column-strided input; one copy keeps the kernel vectorized
    weight = weight.contiguous()
    x2 = rows_2d(x, C, "rms_norm x")                                   # (N, C)
    # ---- allocate or take out=
    out = output(out, x.shape, x.dtype, x.device, "rms_norm")
    y2 = rows_2d(out, C, "rms_norm out")                              # (N, C)
    N = x2.shape[0]
    if N == 0:
        return out
    # ---- launch: one program per row
    BLOCK_C, ONE_BLOCK, num_warps = _launch_config(C)
    _rms_norm_kernel[(N,)](
        x2, weight, y2,
        C, float(eps),
        x2.stride(0), y2.stride(0),
        BLOCK_C=BLOCK_C, ONE_BLOCK=ONE_BLOCK, num_warps=num_warps,
    )
    return out


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """Plain-torch RMSNorm in the exact order of transformers' LlamaRMSNorm."""
    xf = x.float()
    var = xf.pow(2).mean(-1, keepdim=True)
    normed = (xf * torch.rsqrt(var + eps)).to(x.dtype)   # round to the input dtype first (HF)
    y = (weight * normed).to(x.dtype)
    if out is None:
        return y
    out.copy_(y)
    return out
