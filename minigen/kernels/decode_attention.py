"""Dense decode attention, split-K over the context ("flash-decoding").

Math, for sequence b (one new token, its K/V already cached), query head h, kv head j = h // G:
    s_t = sm_scale * q[b, h] . K[slot_b, j, t]          t = 0 .. seq_lens[b] - 1
    o   = sum_t softmax(s)_t * V[slot_b, j, t]
Split-K: the keys of sequence b are cut into num_splits contiguous chunks of
chunk_b = ceil(ceil(seq_lens[b] / num_splits) / BLOCK_N) * BLOCK_N tokens, computed on the device
from seq_lens, so every split has work at every length while the grid stays fixed (capturable).
Split k returns the unnormalized partial, in the log2 domain s' = s * log2(e):
    m_k = max_t s'_t,   l_k = sum_t 2^(s'_t - m_k),   acc_k = sum_t 2^(s'_t - m_k) V_t
and the reduce kernel (minigen/kernels/split_k.py) combines them exactly:
    M = max_k m_k,   o = sum_k 2^(m_k - M) acc_k / sum_k 2^(m_k - M) l_k
A split past the end of its sequence writes (acc 0, m -inf, l 0), which weighs 2^-inf = 0;
split 0 always holds key 0 (seq_lens[b] >= 1), so M is finite and nothing is NaN.

Kernel 1, grid (B, Hkv, num_splits): one program streams its chunk of ONE kv head in BLOCK_N x D
tiles and serves all G query heads of that head with tl.dot, q padded to 16 rows (MMA minimum):
each K/V byte is read from HBM once, whatever G. Tensor cores beat the CUDA-core
broadcast-multiply-sum forms at every G tried, G = 1 included (docs/kernels.md): MMA operands
live in shared memory, where the pipeliner (num_stages) overlaps the next tiles' loads with this
tile's math; the broadcast forms keep tiles in registers and stall on each load.
Kernel 2, grid (B, H): split_k.reduce_splits combines the splits (skipped when num_splits == 1:
kernel 1 writes out).

Cost per call (bytes; the K/V stream is everything, the rest is noise):
    reads   sum_b Hkv * seq_lens[b] * D * 2 * elem   (K and V)   + B*H*D*elem (q)
            + B*H*num_splits*(D + 2)*4 fp32 partials (written once, read once, L2-resident)
    writes  B*H*D*elem (out)
Example: Llama-2-7B (Hkv 32, D 128, fp16), 8192 tokens, batch 1: 134 MB per layer; on top of
that stream a call pays a fixed cost (launch, ramp, the reduce). Times: docs/kernels.md.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from minigen.kernels.launch import num_sms, output
from minigen.kernels.split_k import attention_tiles, reduce_splits, split_scratch

_LOG2E = 1.4426950408889634


@triton.jit
def _decode_attention_kernel(
    # pointers
    Q, K_cache, V_cache, SeqLens, SlotIdx, Out, PartAcc, PartMax, PartSum,
    # sizes and scalars
    num_splits, qk_scale,
    # strides (elements; the head dim is contiguous everywhere)
    stride_qb, stride_qh,
    stride_ks, stride_kh, stride_kt,
    stride_vs, stride_vh, stride_vt,
    stride_ob, stride_oh,
    # constexprs
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, SPLIT_K: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # ---- which (sequence, kv head, split): int64 before any stride multiply
    b = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)
    num_heads = tl.num_programs(1) * GROUP

    # ---- this split's keys [lo, hi): chunk sized from the real length, a whole number of blocks
    kv_len = tl.load(SeqLens + b)
    slot = tl.load(SlotIdx + b).to(tl.int64)
    chunk = tl.cdiv(tl.cdiv(kv_len, num_splits), BLOCK_N) * BLOCK_N
    lo = split * chunk
    hi = tl.minimum(lo + chunk, kv_len)

    # ---- the G query heads of this kv head, padded to BLOCK_G >= 16 rows (the smallest MMA M;
    # pad rows are q = 0 and never stored). Tensor cores make the padding free: the kernel is
    # bound by the K/V stream, and MMA keeps the tiles in shared memory where the pipeliner
    # (num_stages) overlaps the next tiles' loads with this tile's math.
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    g_mask = offs_g < GROUP
    d_mask = offs_d < HEAD_DIM
    heads = kv_head * GROUP + offs_g                                         # (BLOCK_G,) int64
    q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=g_mask[:, None] & d_mask[None, :], other=0.0)          # (BLOCK_G, BLOCK_D)

    K_head = K_cache + slot * stride_ks + kv_head * stride_kh
    V_head = V_cache + slot * stride_vs + kv_head * stride_vh

    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)

    # ---- stream the chunk: one BLOCK_N x D tile of K and of V per step
    for n0 in range(lo, hi, BLOCK_N):
        keys = n0 + offs_n
        n_mask = keys < hi
        kv_mask = n_mask[:, None] & d_mask[None, :]
        # masked keys load as 0: cache rows past seq_lens are garbage (maybe NaN) and 0 * NaN = NaN
        k = tl.load(K_head + keys[:, None] * stride_kt + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(V_head + keys[:, None] * stride_vt + offs_d[None, :], mask=kv_mask, other=0.0)

        # ---- scores of the G heads, log2 domain: s = (q . k) * sm_scale * log2(e)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale    # (BLOCK_G, BLOCK_N)
        s = tl.where(n_mask[None, :], s, float("-inf"))

        # ---- online softmax (each block has >= 1 real key, so m_new is finite)
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    # ---- epilogue
    gd_mask = g_mask[:, None] & d_mask[None, :]
    if not SPLIT_K:
        out = acc / l_i[:, None]                             # l_i >= 1 since seq_lens[b] >= 1
        tl.store(Out + b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :],
                 out.to(Out.dtype.element_ty), mask=gd_mask)
    else:
        part = (b * num_heads + heads) * num_splits + split                 # (BLOCK_G,) row of (B, H, S)
        tl.store(PartAcc + part[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=gd_mask)
        tl.store(PartMax + part, m_i, mask=g_mask)
        tl.store(PartSum + part, l_i, mask=g_mask)


def decode_num_splits(batch: int, num_kv_heads: int, capacity: int, tile_bytes: int,
                      block_n: int, num_sms: int = 132) -> int:
    """Splits per (sequence, kv head), from shapes only (never seq_lens: graph capture).

    The stream saturates HBM once each SM has ~64 KB of K+V tiles in flight: with one stage of
    K and V (2 * tile_bytes) per program that is one wave of 2 programs per SM at D=128 and 4 at
    D=64. More splits only add tail and reduce traffic (a small cost), fewer leave SMs idle (a
    large one: one split at batch 1 leaves most of the HBM bandwidth unused; docs/kernels.md).
    Chunks are kept >= 2 tiles at full capacity, <= 64 splits.
    """
    programs = num_sms * max(1, 65536 // (2 * tile_bytes))
    want = round(programs / (batch * num_kv_heads))
    most = min(64, capacity // (2 * block_n))
    return max(1, min(want, most))


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     seq_lens: torch.Tensor, slot_idx: torch.Tensor, sm_scale: float,
                     num_splits: int | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """One query token per sequence, q (B, H, D), over keys [0, seq_lens[b]) of slot slot_idx[b] of
    the caches (S, Hkv, T, D); returns out (B, H, D). seq_lens[b] >= 1 (it counts the new token).
    No host syncs (the scratch partials come from torch.empty): capturable in a CUDA graph.
    """
    # ---- check shapes (metadata only: no device reads)
    B, H, D = q.shape
    S, Hkv, T, Dk = k_cache.shape
    if v_cache.shape != k_cache.shape or Dk != D:
        raise ValueError(f"decode_attention: caches {tuple(k_cache.shape)} / {tuple(v_cache.shape)} "
                         f"must both be (S, Hkv, T, D={D})")
    if H % Hkv:
        raise ValueError(f"decode_attention: {H} query heads are not a multiple of {Hkv} kv heads")
    if seq_lens.shape != (B,) or slot_idx.shape != (B,):
        raise ValueError(f"decode_attention: seq_lens {tuple(seq_lens.shape)} and slot_idx "
                         f"{tuple(slot_idx.shape)} must be ({B},)")
    if seq_lens.dtype != torch.int32 or slot_idx.dtype != torch.int32:
        raise ValueError(f"decode_attention: seq_lens/slot_idx must be int32, "
                         f"got {seq_lens.dtype}/{slot_idx.dtype}")
    if k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise ValueError(f"decode_attention: q {q.dtype} and caches {k_cache.dtype}/{v_cache.dtype} "
                         f"differ; store the cache in the model dtype")
    if q.stride(-1) != 1 or k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("decode_attention: q and the caches need a contiguous head dim (stride 1)")
    if T * max(k_cache.stride(2), v_cache.stride(2)) >= 2**31:
        raise ValueError("decode_attention: one head's cache spans >= 2^31 elements; use a smaller T")
    # ---- allocate or take out=
    out = output(out, (B, H, D), q.dtype, q.device, "decode_attention")
    if B == 0:
        return out
    G = H // Hkv
    cfg = attention_tiles(D, G, q.dtype)
    if num_splits is None:
        tile_bytes = cfg["BLOCK_N"] * cfg["BLOCK_D"] * q.element_size()
        num_splits = decode_num_splits(B, Hkv, T, tile_bytes, cfg["BLOCK_N"], num_sms(q.device))
    if num_splits < 1:
        raise ValueError(f"decode_attention: num_splits must be >= 1, got {num_splits}")
    part_acc, part_max, part_sum = split_scratch(B, H, D, num_splits, out)
    # ---- launch kernel 1: (sequences, kv heads, splits)
    _decode_attention_kernel[(B, Hkv, num_splits)](
        q, k_cache, v_cache, seq_lens, slot_idx, out, part_acc, part_max, part_sum,
        num_splits, float(sm_scale) * _LOG2E,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        out.stride(0), out.stride(1),
        GROUP=G, HEAD_DIM=D, SPLIT_K=num_splits > 1,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32", **cfg,
    )
    # ---- launch kernel 2: combine the splits (a no-op with one split)
    reduce_splits(part_acc, part_max, part_sum, out, num_splits, cfg["BLOCK_D"])
    return out


def decode_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                         seq_lens: torch.Tensor, slot_idx: torch.Tensor, sm_scale: float,
                         num_splits: int | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Plain-torch decode attention, fp32 math, one sequence at a time (num_splits is ignored).

    Reads the lengths to the host (fine on the CPU path it serves; not capturable on a GPU) and
    touches only each sequence's own keys, so garbage past seq_lens cannot leak in.
    """
    B, H, D = q.shape
    Hkv = k_cache.shape[1]
    G = H // Hkv
    out = output(out, (B, H, D), q.dtype, q.device, "decode_attention_ref")
    for b, (slot, P) in enumerate(zip(slot_idx.tolist(), seq_lens.tolist())):   # sync: CPU-path reference
        qb = q[b].float().reshape(Hkv, G, 1, D)                             # (Hkv, G, 1, D)
        kb = k_cache[slot, :, :P].float().unsqueeze(1)                     # (Hkv, 1, P, D)
        vb = v_cache[slot, :, :P].float().unsqueeze(1)                     # (Hkv, 1, P, D)
        scores = (qb @ kb.transpose(-1, -2)) * sm_scale                    # (Hkv, G, 1, P)
        out[b] = (scores.softmax(dim=-1) @ vb).reshape(H, D).to(out.dtype)  # (H, D)
    return out
