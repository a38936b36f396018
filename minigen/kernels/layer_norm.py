"""LayerNorm (OPT): y = (x - mean) / sqrt(var + eps) * weight + bias, one program per row.

Math, per row x of C elements, all in fp32, output rounded once to x.dtype:
    mean = sum(x_c) / C
    var  = sum((x_c - mean)^2) / C          biased, centered (two passes: no cancellation)
    y    = (x - mean) * rsqrt(var + eps) * weight + bias      (bias optional)

Cost per call: reads N*C*sizeof(x) + C*(sizeof(weight) + sizeof(bias)), writes N*C*sizeof(x)
when a row fits in one block (C <= _MAX_BLOCK_C). Wider rows take three passes over x (mean,
centered variance, output); the second and third reads mostly hit L2.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from minigen.kernels.launch import output, row_launch_config, rows_2d

# Widest row held in registers in one block; wider rows loop over chunks of this size.
# Tests lower it to exercise the loop.
_MAX_BLOCK_C = 8192


@triton.jit
def _layer_norm_kernel(
    # pointers
    X, W, B, Y,
    # sizes (C is a model constant: one compile per width, exact masks and loop bounds)
    C: tl.constexpr, eps,
    # strides (elements; the last dim is contiguous)
    stride_xn, stride_yn,
    # constexprs
    BLOCK_C: tl.constexpr, ONE_BLOCK: tl.constexpr, HAS_BIAS: tl.constexpr,
):
    # ---- which row: int64 so row * stride cannot overflow on big activations
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * stride_xn
    y_row = Y + row * stride_yn
    cols = tl.arange(0, BLOCK_C)

    if ONE_BLOCK:
        # ---- phase 1: load the row once; mean, then centered variance (masked lanes -> 0)
        mask = cols < C
        x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        mean = tl.sum(x, axis=0) / C
        xc = tl.where(mask, x - mean, 0.0)
        rstd = tl.math.rsqrt(tl.sum(xc * xc, axis=0) / C + eps)
        # ---- phase 2: normalize, affine, store in the output dtype
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        y = xc * rstd * w
        if HAS_BIAS:
            y += tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_row + cols, y.to(Y.dtype.element_ty), mask=mask)
    else:
        # ---- phase 1: mean over chunks
        acc = tl.zeros([BLOCK_C], dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            mask = c0 + cols < C
            acc += tl.load(x_row + c0 + cols, mask=mask, other=0.0).to(tl.float32)
        mean = tl.sum(acc, axis=0) / C
        # ---- phase 2: centered variance over chunks (second read, L2)
        acc = tl.zeros([BLOCK_C], dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            mask = c0 + cols < C
            x = tl.load(x_row + c0 + cols, mask=mask, other=0.0).to(tl.float32)
            xc = tl.where(mask, x - mean, 0.0)
            acc += xc * xc
        rstd = tl.math.rsqrt(tl.sum(acc, axis=0) / C + eps)
        # ---- phase 3: normalize, affine, store (third read, L2)
        for c0 in range(0, C, BLOCK_C):
            mask = c0 + cols < C
            x = tl.load(x_row + c0 + cols, mask=mask, other=0.0).to(tl.float32)
            w = tl.load(W + c0 + cols, mask=mask, other=0.0).to(tl.float32)
            y = (x - mean) * rstd * w
            if HAS_BIAS:
                y += tl.load(B + c0 + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(y_row + c0 + cols, y.to(Y.dtype.element_ty), mask=mask)


def _launch_config(C: int) -> tuple[int, bool, int]:
    """(BLOCK_C, ONE_BLOCK, num_warps): a whole row per block when it fits, else chunks."""
    return row_launch_config(C, _MAX_BLOCK_C)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """LayerNorm over the last dim of x (N, C) (or (..., C)); returns out (same shape, x.dtype)."""
    # ---- check shapes
    C = x.shape[-1]
    if weight.shape != (C,) or (bias is not None and bias.shape != (C,)):
        raise ValueError(f"layer_norm: weight {tuple(weight.shape)} / bias "
                         f"{None if bias is None else tuple(bias.shape)} must be ({C},) for x {tuple(x.shape)}")
    if x.stride(-1) != 1:
        x = x.contiguous()   # rare: column-strided input; one copy keeps the kernel vectorized
    weight = weight.contiguous()
    bias = bias.contiguous() if bias is not None else None
    x2 = rows_2d(x, C, "layer_norm x")                                 # (N, C)
    # ---- allocate or take out=
    out = output(out, x.shape, x.dtype, x.device, "layer_norm")
    y2 = rows_2d(out, C, "layer_norm out")                            # (N, C)
    N = x2.shape[0]
    if N == 0:
        return out
    # ---- launch: one program per row (no bias: weight stands in for the unused pointer)
    BLOCK_C, ONE_BLOCK, num_warps = _launch_config(C)
    _layer_norm_kernel[(N,)](
        x2, weight, bias if bias is not None else weight, y2,
        C, float(eps),
        x2.stride(0), y2.stride(0),
        BLOCK_C=BLOCK_C, ONE_BLOCK=ONE_BLOCK, HAS_BIAS=bias is not None, num_warps=num_warps,
    )
    return out


def layer_norm_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """Plain-torch LayerNorm computed in fp32, rounded once to x.dtype."""
    y = F.layer_norm(x.float(), (x.shape[-1],), weight.float(),
                     None if bias is None else bias.float(), eps).to(x.dtype)
    if out is None:
        return y
    out.copy_(y)
    return out
