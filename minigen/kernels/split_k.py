"""What the two split-K ("flash-decoding") attention kernels share: kernel 2, the reduce that
combines the splits' partials, its scratch, and the tiles of kernel 1 (decode_attention.py,
sparse_attention.py).

Math, for one (sequence b, query head h) row cut into num_splits = S splits of keys. Split k
leaves the unnormalized partial of its keys t, in the log2 domain s'_t = sm_scale * log2(e) * q.k_t:
    m_k = max_t s'_t,   l_k = sum_t 2^(s'_t - m_k),   acc_k = sum_t 2^(s'_t - m_k) V_t
and the reduce combines them exactly:
    M = max_k m_k,   o = sum_k 2^(m_k - M) acc_k / sum_k 2^(m_k - M) l_k
An empty split (no keys) holds (acc 0, m -inf, l 0) and weighs 2^-inf = 0. Both callers keep
split 0 non-empty, so M is finite and the denominator >= 1 (the max term contributes 2^0):
nothing is NaN.

Scratch (split_scratch): one fp32 allocation, row r = (b * H + h) * S + k of
    part_acc (B, H, S, D)    part_max (B, H, S)    part_sum (B, H, S)
each piece 16-byte aligned. With one split kernel 1 writes out itself and there is no reduce.

Kernel 2, grid (B, H): one program loads all S partials of its row at once (BLOCK_S >= S, pad
rows masked to the empty partial), rescales them to the global max and normalizes.

Cost per call (bytes):
    reads   B*H*S*(D + 2)*4   fp32 partials (written by kernel 1 just before: mostly L2)
    writes  B*H*D*elem        out
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _reduce_splits_kernel(
    # pointers
    PartAcc, PartMax, PartSum, Out,
    # sizes
    num_splits,
    # strides (elements; the head dim of out is contiguous, the partials are dense)
    stride_ob, stride_oh,
    # constexprs
    HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # ---- which (sequence, query head): int64 before any stride multiply
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    row = b * tl.num_programs(1) + h
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_mask = offs_s < num_splits
    d_mask = offs_d < HEAD_DIM

    # ---- all splits' partials of this head: (BLOCK_S,) maxima and sums, (BLOCK_S, BLOCK_D) acc
    part = row * num_splits + offs_s
    m = tl.load(PartMax + part, mask=s_mask, other=float("-inf"))
    l = tl.load(PartSum + part, mask=s_mask, other=0.0)
    acc = tl.load(PartAcc + part[:, None] * HEAD_DIM + offs_d[None, :],
                  mask=s_mask[:, None] & d_mask[None, :], other=0.0)

    # ---- rescale to the global max (finite: split 0 is never empty) and normalize
    w = tl.math.exp2(m - tl.max(m, axis=0))                                 # empty split: 2^-inf = 0
    out = tl.sum(w[:, None] * acc, axis=0) / tl.sum(w * l, axis=0)
    tl.store(Out + b * stride_ob + h * stride_oh + offs_d, out.to(Out.dtype.element_ty), mask=d_mask)


def attention_tiles(head_dim: int, group: int, dtype: torch.dtype) -> dict:
    """Kernel 1's tiles (both split-K kernels): the G query heads of a kv head padded to BLOCK_G
    >= 16 rows (the smallest MMA M); one K (or V) tile of BLOCK_N x BLOCK_D is 16 KB at D=128
    fp16/bf16 (8 KB at D=64), 3 stages deep: the fastest of BLOCK_N 32/64/128, 4/8 warps and
    2/3/4 stages in the sweep recorded in docs/kernels.md. fp32 (tests) halves BLOCK_N to keep
    the same bytes per tile."""
    block_d = max(16, triton.next_power_of_2(head_dim))
    block_n = 64 if dtype != torch.float32 else 32
    return dict(BLOCK_G=max(16, triton.next_power_of_2(group)), BLOCK_N=block_n, BLOCK_D=block_d,
                num_warps=4, num_stages=3)


def split_scratch(B: int, H: int, D: int, num_splits: int, out: torch.Tensor):
    """Scratch partials of a split-K launch, one fp32 allocation: (B, H, S, D) acc, then (B, H, S)
    max and sum (flat; the max piece runs on into the sum's). With one split the kernel writes
    `out` directly and these are unused aliases of it."""
    if num_splits == 1:
        return out, out, out
    rows = B * H * num_splits
    pad = triton.cdiv(rows, 4) * 4                              # keep each piece 16-byte aligned
    part = torch.empty(rows * D + 2 * pad, dtype=torch.float32, device=out.device)
    return part[:rows * D], part[rows * D:], part[rows * D + pad:]


def _check(part_acc, part_max, part_sum, out: torch.Tensor, num_splits: int, what: str) -> None:
    """Metadata only: dense fp32 partials of B*H*num_splits rows for out (B, H, D)."""
    if num_splits < 1:
        raise ValueError(f"{what}: num_splits must be >= 1, got {num_splits}")
    if num_splits == 1:
        return                                  # no partials: kernel 1 wrote out (aliases allowed)
    B, H, D = out.shape
    rows = B * H * num_splits
    for name, t, n in (("part_acc", part_acc, rows * D), ("part_max", part_max, rows),
                       ("part_sum", part_sum, rows)):
        if t.numel() < n or t.dtype != torch.float32 or not t.is_contiguous():
            raise ValueError(f"{what}: {name} must be >= {n} contiguous float32 elements for out "
                             f"{tuple(out.shape)} and {num_splits} splits, got {tuple(t.shape)} {t.dtype}")
    if out.stride(-1) != 1:
        raise ValueError(f"{what}: out needs a contiguous head dim (stride 1), got strides {out.stride()}")


def reduce_splits(part_acc: torch.Tensor, part_max: torch.Tensor, part_sum: torch.Tensor,
                  out: torch.Tensor, num_splits: int, block_d: int) -> None:
    """Kernel 2: combine the splits' partials (from split_scratch) into out (B, H, D), in place.
    block_d: kernel 1's BLOCK_D (>= D, a power of 2). A no-op with one split. No host syncs."""
    _check(part_acc, part_max, part_sum, out, num_splits, "reduce_splits")
    B, H, D = out.shape
    if num_splits == 1 or B * H == 0:
        return
    # ---- launch: (sequences, query heads)
    _reduce_splits_kernel[(B, H)](
        part_acc, part_max, part_sum, out,
        num_splits,
        out.stride(0), out.stride(1),
        HEAD_DIM=D, BLOCK_S=triton.next_power_of_2(num_splits),
        BLOCK_D=block_d, num_warps=1 if D <= 64 else 2,
    )


def reduce_splits_ref(part_acc: torch.Tensor, part_max: torch.Tensor, part_sum: torch.Tensor,
                      out: torch.Tensor, num_splits: int, block_d: int) -> None:
    """Plain-torch reduce, fp32, the module docstring's formula over all rows at once (block_d is
    ignored). A no-op with one split."""
    _check(part_acc, part_max, part_sum, out, num_splits, "reduce_splits_ref")
    if num_splits == 1:
        return
    B, H, D = out.shape
    rows = B * H * num_splits
    acc = part_acc.reshape(-1)[:rows * D].view(B, H, num_splits, D)         # (B, H, S, D)
    m = part_max.reshape(-1)[:rows].view(B, H, num_splits)                  # (B, H, S)
    l = part_sum.reshape(-1)[:rows].view(B, H, num_splits)
    w = torch.exp2(m - m.amax(-1, keepdim=True))                            # empty split: 2^-inf = 0
    o = (w[..., None] * acc).sum(2) / (w * l).sum(-1)[..., None]            # (B, H, D)
    out.copy_(o)
