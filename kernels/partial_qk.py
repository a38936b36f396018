"""InfiniGen speculation scores: partial queries against the GPU-resident partial key cache.

Math, for sequence b (cache slot slot_idx[b], n = seq_lens[b] valid tokens), query head h and its
kv head j = h // G (G = H // Hkv), over the R skewed columns kept per head:
    scores[b, h, t] = sum_r pq[b, h, r] * pk_cache[slot_idx[b], j, t, r]     t < n
    scores[b, h, t] = -inf                                                  n <= t < Tcap
Raw logits: no 1/sqrt(D) scale, no softmax (the selection thresholds them against the row max).
Every element of scores is written, so a reused buffer never holds a stale row.

Grid (cdiv(Tcap, BLOCK_T), Hkv, B): one program loads one BLOCK_T x R tile of one kv head's partial
keys ONCE and scores all G query heads of the group against it (fp32 multiply + row sum on CUDA
cores: R is 12..32, far below what tensor cores need, and the op is bound by the key stream).
Consecutive programs take consecutive tiles of the same head, i.e. one contiguous stream per head.
A tile wholly past seq_lens[b] reads nothing and only writes -inf.

Cost per call (bytes):
    reads   sum_b Hkv * min(n_b, Tcap) * R * elem(pk)        partial keys (the whole cost)
            + B * H * R * elem(pq)                           (noise)
    writes  B * H * Tcap * 4                                 fp32 scores, -inf tails included
Example: B=8, H=Hkv=32 (Llama-2-7B), Tcap=n=32768, R=25, fp16: 419 MB read + 34 MB written,
~150 us at the ~3 TB/s an H100 streams; with GQA (Hkv=8) the reads drop to 105 MB (~45 us).
(Estimates from bytes, not measured; sm_90 builds checked offline: no spills.)
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# Elements of one partial-key tile (BLOCK_T x BLOCK_R) held in registers by one program: 4096
# over 4 warps = 32 fp32 per thread. Rows of R = 25 halves are not 16-byte aligned, so loads are
# scalar and every element carries a 64-bit address: sm_90 builds take 72-94 registers at this size
# (no spills; 140-219 at 8192), i.e. 5+ programs and ~32 KB of keys in flight per SM.
_TILE = 4096


@triton.jit
def _partial_qk_kernel(
    # pointers
    PQ, PK, SeqLens, SlotIdx, Out,
    # sizes
    T_cap,
    # strides (elements; the R dim is contiguous everywhere)
    stride_qb, stride_qh,
    stride_ks, stride_kh, stride_kt,
    stride_ob, stride_oh,
    # constexprs
    GROUP: tl.constexpr, R: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr,
):
    # ---- which (token block, kv head, sequence): int64 before any stride multiply
    t_block = tl.program_id(0)
    kv_head = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)

    offs_t = t_block * BLOCK_T + tl.arange(0, BLOCK_T)                     # (BLOCK_T,) int32
    offs_r = tl.arange(0, BLOCK_R)
    t_store = offs_t < T_cap                                               # the ragged last block
    r_mask = offs_r < R                                                    # R = 12, 25: pad to 16, 32
    n = tl.load(SeqLens + b)
    out_row = Out + b * stride_ob + (kv_head * GROUP) * stride_oh           # head kv_head*G of seq b

    if t_block * BLOCK_T >= n:
        # ---- the whole block is past the sequence: no key reads, just the -inf tail
        neg_inf = tl.full([BLOCK_T], float("-inf"), dtype=tl.float32)
        for g in tl.static_range(GROUP):
            tl.store(out_row + g * stride_oh + offs_t, neg_inf, mask=t_store)
    else:
        # ---- load this kv head's partial-key tile once, fp32. Rows t >= n are masked (read as
        # 0, no traffic): the cache past seq_lens is garbage (maybe NaN) and would poison the sums.
        slot = tl.load(SlotIdx + b).to(tl.int64)
        t_valid = (offs_t < n) & t_store            # & t_store: a bad seq_lens > Tcap reads nothing
        k_ptrs = (PK + slot * stride_ks + kv_head * stride_kh
                  + offs_t[:, None] * stride_kt + offs_r[None, :])
        k = tl.load(k_ptrs, mask=t_valid[:, None] & r_mask[None, :], other=0.0).to(tl.float32)
        # (BLOCK_T, BLOCK_R)

        # ---- score every query head of the group against it: s_t = sum_r k[t, r] * q[r]
        q_row = PQ + b * stride_qb + (kv_head * GROUP) * stride_qh
        for g in tl.static_range(GROUP):
            q = tl.load(q_row + g * stride_qh + offs_r, mask=r_mask, other=0.0).to(tl.float32)
            s = tl.sum(k * q[None, :], axis=1)                             # (BLOCK_T,) fp32
            s = tl.where(t_valid, s, float("-inf"))                        # -inf past the sequence
            tl.store(out_row + g * stride_oh + offs_t, s, mask=t_store)


def _launch_config(R: int) -> dict:
    """BLOCK_R: R padded to a power of two; BLOCK_T: as many tokens as fill _TILE elements."""
    block_r = triton.next_power_of_2(R)
    return dict(BLOCK_R=block_r, BLOCK_T=max(16, _TILE // block_r), num_warps=4)


def partial_qk(pq: torch.Tensor, pk_cache: torch.Tensor, seq_lens: torch.Tensor,
               slot_idx: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Speculated logits scores (B, H, Tcap) fp32 of partial queries pq (B, H, R) against the
    partial key cache (S, Hkv, Tcap, R), -inf at t >= seq_lens[b]. Any float dtypes, fp32 math.
    seq_lens/slot_idx (B,) int32. No host syncs: capturable in a CUDA graph.
    """
    # ---- check shapes (metadata only: no device reads)
    B, H, R = pq.shape
    S, Hkv, T, Rk = pk_cache.shape
    if Rk != R:
        raise ValueError(f"partial_qk: pk_cache {tuple(pk_cache.shape)} must be (S, Hkv, T, R={R}) "
                         f"to match pq {tuple(pq.shape)}")
    if H % Hkv:
        raise ValueError(f"partial_qk: {H} query heads are not a multiple of {Hkv} kv heads")
    if seq_lens.shape != (B,) or slot_idx.shape != (B,):
        raise ValueError(f"partial_qk: seq_lens {tuple(seq_lens.shape)} and slot_idx "
                         f"{tuple(slot_idx.shape)} must be ({B},)")
    if seq_lens.dtype != torch.int32 or slot_idx.dtype != torch.int32:
        raise ValueError(f"partial_qk: seq_lens/slot_idx must be int32, got {seq_lens.dtype}/{slot_idx.dtype}")
    if not (pq.dtype.is_floating_point and pk_cache.dtype.is_floating_point):
        raise ValueError(f"partial_qk: pq {pq.dtype} and pk_cache {pk_cache.dtype} must be float tensors")
    if pq.stride(-1) != 1 or pk_cache.stride(-1) != 1:
        raise ValueError("partial_qk: pq and pk_cache need a contiguous R dim (stride 1); "
                         "call .contiguous() once when you build them")
    if T * pk_cache.stride(2) >= 2**31:
        raise ValueError("partial_qk: one head's partial keys span >= 2^31 elements; use a smaller T")
    # ---- allocate or take out=
    if out is None:
        out = torch.empty((B, H, T), dtype=torch.float32, device=pq.device)
    elif out.shape != (B, H, T) or out.dtype != torch.float32 or out.stride(-1) != 1:
        raise ValueError(f"partial_qk: out must be ({B}, {H}, {T}) float32 with stride(-1) 1, "
                         f"got {tuple(out.shape)} {out.dtype} strides {out.stride()}")
    if B == 0 or T == 0:
        return out
    # ---- launch: (token blocks, kv heads, sequences)
    cfg = _launch_config(R)
    grid = (triton.cdiv(T, cfg["BLOCK_T"]), Hkv, B)
    _partial_qk_kernel[grid](
        pq, pk_cache, seq_lens, slot_idx, out,
        T,
        pq.stride(0), pq.stride(1),
        pk_cache.stride(0), pk_cache.stride(1), pk_cache.stride(2),
        out.stride(0), out.stride(1),
        GROUP=H // Hkv, R=R, **cfg,
    )
    return out


def partial_qk_ref(pq: torch.Tensor, pk_cache: torch.Tensor, seq_lens: torch.Tensor,
                   slot_idx: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Plain-torch speculation scores, fp32 math, no host syncs (a gather, R multiply-adds, a mask).

    The sum over r is R elementwise multiply-adds rather than a matmul, so it stays true fp32 on
    CUDA whatever torch's TF32 switches say.
    """
    B, H, R = pq.shape
    Hkv, T = pk_cache.shape[1], pk_cache.shape[2]
    G = H // Hkv
    pk = pk_cache[slot_idx.long()].float()                                  # (B, Hkv, T, R)
    q = pq.float().reshape(B, Hkv, G, R)                                     # (B, Hkv, G, R)
    s = torch.zeros((B, Hkv, G, T), dtype=torch.float32, device=pq.device)
    for r in range(R):
        s += q[..., r, None] * pk[:, :, None, :, r]                          # (B, Hkv, G, T)
    s = s.reshape(B, H, T)                                                   # (B, H, T)
    valid = torch.arange(T, device=pq.device) < seq_lens[:, None]            # (B, T)
    s = torch.where(valid[:, None, :], s, float("-inf"))                     # garbage (even NaN) masked
    if out is None:
        return s
    out.copy_(s)
    return out
