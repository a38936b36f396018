"""Rotary position embedding, rotate-half convention (Hugging Face Llama / GPT-NeoX), q and k in
one launch.

Math, for a head vector x of D elements at position p, with i < D/2 and
theta_i = p * inv_freq[i] (tables: cos[p, i] = cos(theta_i), sin[p, i] = sin(theta_i)):
    out[i]       = x[i]       * cos - x[i + D/2] * sin
    out[i + D/2] = x[i + D/2] * cos + x[i]       * sin
i.e. the pair (x[i], x[i + D/2]) is rotated by theta_i. Computed in fp32, stored in x.dtype.

Grid: one program per token; it loads that token's cos/sin row once and rotates all H query
heads, then all Hkv key heads, BLOCK_H heads at a time. Each program reads a head's two halves
before writing them, so in-place (out=(q, k)) is safe.

Cost per call: reads N*(H + Hkv)*D*sizeof(x) + N*D*4 (cos and sin rows, fp32) + N*8 (positions),
writes N*(H + Hkv)*D*sizeof(x).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from minigen.kernels.launch import output


@triton.jit
def _rope_kernel(
    # pointers
    Q, K, QO, KO, POS, COS, SIN,
    # sizes (head counts are model constants: one compile per model, constant loop bounds)
    H: tl.constexpr, HKV: tl.constexpr, HALF,
    # strides (elements; the head dim is contiguous)
    stride_qn, stride_qh, stride_kn, stride_kh,
    stride_qon, stride_qoh, stride_kon, stride_koh,
    stride_cos, stride_sin,
    # constexprs
    BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    # ---- which token: int64 so token * stride cannot overflow
    n = tl.program_id(0).to(tl.int64)
    # ---- this token's angle row: cos/sin (HALF,), fp32, shared by every head
    pos = tl.load(POS + n).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_HALF)
    mask_d = offs_d < HALF
    cos = tl.load(COS + pos * stride_cos + offs_d, mask=mask_d, other=0.0)[None, :]   # (1, BLOCK_HALF)
    sin = tl.load(SIN + pos * stride_sin + offs_d, mask=mask_d, other=0.0)[None, :]
    offs_h = tl.arange(0, BLOCK_H)
    # ---- query heads, then key heads: same rotation, different base pointers and counts
    _rope_rotate_heads(Q + n * stride_qn, QO + n * stride_qon, stride_qh, stride_qoh, H,
                       cos, sin, offs_h, offs_d, mask_d, HALF, BLOCK_H)
    _rope_rotate_heads(K + n * stride_kn, KO + n * stride_kon, stride_kh, stride_koh, HKV,
                       cos, sin, offs_h, offs_d, mask_d, HALF, BLOCK_H)


@triton.jit
def _rope_rotate_heads(x_tok, o_tok, stride_xh, stride_oh, num_heads: tl.constexpr,
                       cos, sin, offs_h, offs_d, mask_d, HALF, BLOCK_H: tl.constexpr):
    """Rotate num_heads heads of one token, a (BLOCK_H, BLOCK_HALF) tile per half at a time."""
    for h0 in range(0, num_heads, BLOCK_H):
        heads = h0 + offs_h
        mask = (heads < num_heads)[:, None] & mask_d[None, :]
        # ---- load both halves of BLOCK_H heads before any store (in-place safe)
        x_lo_ptr = x_tok + heads[:, None] * stride_xh + offs_d[None, :]
        x1 = tl.load(x_lo_ptr, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(x_lo_ptr + HALF, mask=mask, other=0.0).to(tl.float32)
        # ---- rotate each (x1, x2) pair by theta in fp32, store in the output dtype
        o_lo_ptr = o_tok + heads[:, None] * stride_oh + offs_d[None, :]
        tl.store(o_lo_ptr, (x1 * cos - x2 * sin).to(o_tok.dtype.element_ty), mask=mask)
        tl.store(o_lo_ptr + HALF, (x2 * cos + x1 * sin).to(o_tok.dtype.element_ty), mask=mask)


def _launch_config(num_heads: int, half: int) -> tuple[int, int, int]:
    """(BLOCK_H, BLOCK_HALF, num_warps): a half-head tile of at most 2048 elements."""
    block_half = triton.next_power_of_2(half)
    block_h = max(1, min(triton.next_power_of_2(num_heads), 2048 // block_half))
    num_warps = min(4, max(1, block_h * block_half // 256))
    return block_h, block_half, num_warps


def rope(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor,
         sin: torch.Tensor, out: tuple[torch.Tensor, torch.Tensor] | None = None
         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q (N, H, D) and k (N, Hkv, D) at `positions` (N,); returns (q_out, k_out).

    Positions are not range-checked (that would sync): they must be < cos.shape[0].
    """
    # ---- check shapes
    if q.dim() != 3 or k.dim() != 3 or k.shape[0] != q.shape[0] or k.shape[2] != q.shape[2]:
        raise ValueError(f"rope: q must be (N, H, D) and k (N, Hkv, D), got {tuple(q.shape)} / {tuple(k.shape)}")
    N, H, D = q.shape
    Hkv = k.shape[1]
    if D % 2:
        raise ValueError(f"rope: head dim D={D} must be even")
    if positions.shape != (N,) or positions.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"rope: positions must be ({N},) int64/int32, got {tuple(positions.shape)} {positions.dtype}")
    if cos.shape != sin.shape or cos.dim() != 2 or cos.shape[1] != D // 2:
        raise ValueError(f"rope: cos/sin must be (max_pos, {D // 2}) tables from rope_tables(), "
                         f"got {tuple(cos.shape)} / {tuple(sin.shape)}")
    if q.stride(-1) != 1 or k.stride(-1) != 1 or cos.stride(-1) != 1 or sin.stride(-1) != 1:
        raise ValueError("rope: q, k, cos and sin need a contiguous last dim (.contiguous() them)")
    # ---- allocate or take out= (may alias q and k: in-place)
    q_out, k_out = (None, None) if out is None else out
    q_out = output(q_out, q.shape, q.dtype, q.device, "rope out q")
    k_out = output(k_out, k.shape, k.dtype, k.device, "rope out k")
    if N == 0:
        return q_out, k_out
    # ---- launch: one program per token, q heads then k heads
    BLOCK_H, BLOCK_HALF, num_warps = _launch_config(max(H, Hkv), D // 2)
    _rope_kernel[(N,)](
        q, k, q_out, k_out, positions, cos, sin,
        H, Hkv, D // 2,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        q_out.stride(0), q_out.stride(1), k_out.stride(0), k_out.stride(1),
        cos.stride(0), sin.stride(0),
        BLOCK_H=BLOCK_H, BLOCK_HALF=BLOCK_HALF, num_warps=num_warps,
    )
    return q_out, k_out


def rope_ref(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor,
             sin: torch.Tensor, out: tuple[torch.Tensor, torch.Tensor] | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-torch rotate-half RoPE in fp32, rounded once to the input dtype."""
    c = cos[positions].float()[:, None, :]                                # (N, 1, D/2)
    s = sin[positions].float()[:, None, :]

    def rotate(x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.float().chunk(2, dim=-1)                               # (N, h, D/2) each
        return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype)

    q_rot, k_rot = rotate(q), rotate(k)        # computed fully before out (may alias q, k) is written
    if out is None:
        return q_rot, k_rot
    out[0].copy_(q_rot)
    out[1].copy_(k_rot)
    return out[0], out[1]


def rope_tables(inv_freq: torch.Tensor, max_pos: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables (max_pos, D/2) fp32 with cos[p, i] = cos(p * inv_freq[i]).

    theta = p * inv_freq is one fp32 multiply, as in transformers' rotary embedding.
    """
    t = torch.arange(max_pos, dtype=torch.float32, device=inv_freq.device)
    theta = torch.outer(t, inv_freq.float())                              # (max_pos, D/2)
    return theta.cos(), theta.sin()
