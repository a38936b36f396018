"""Causal flash attention for prefill: packed new tokens of B sequences against the paged KV cache.

Math, for new token i of sequence b (absolute position p = start_pos[b] + i), query head h and its
kv head j = h // G (G = H // Hkv):
    s_t  = sm_scale * q[i, h] . K[slot_b, j, t]        for t = 0 .. p (causal, cache keys only)
    o    = sum_t softmax(s)_t * V[slot_b, j, t]
The new tokens' K/V are already in the cache, so one formula covers a fresh prompt (start_pos 0)
and a continued one (a chat turn appended to a cached conversation).

Algorithm (FlashAttention-2, online softmax in fp32, exp2 with log2(e) folded into the scale):
one program owns BLOCK_M rows of one (sequence, kv head), where a row is a (token, query head)
pair taken token-major, m = i * G + g. Folding the G query heads that share a kv head into M loads
each K/V block once for all of them (GQA: G times less K/V traffic, and G times the rows per MMA for
short prompts). The key loop runs in two phases: blocks that every row of the program sees in full
(no masks at all), then the few blocks on the causal diagonal (masked, bounded by the last row).

Cost per call (elements; x2 bytes for fp16/bf16), L_b new tokens, P_b = start_pos[b] + L_b keys:
    reads   N*H*D (q) + sum_b ceil(L_b*G / BLOCK_M) * P_b * Hkv * D * 2 (K and V blocks; the
            programs of one sequence re-read the same blocks, mostly from L2; HBM sees ~P_b*Hkv*D*2)
    writes  N*H*D (out)
    flops   ~ 2 * 2 * sum_b H * D * (L_b * start_pos[b] + L_b^2 / 2)   (QK^T and PV, causal half)
Long prompts are compute bound (tensor cores); short chat turns are bound by reading the cache.
Times against torch SDPA: docs/kernels.md.
Limitation: one program walks all keys of its rows, so a short turn over a long cache with few
kv heads has few programs (SmolLM2, 64 new tokens at 4000: 9 programs for 1 MB of K/V, far from
the HBM floor); splitting the keys as decode does would fix that if chat-turn latency ever matters.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from minigen.kernels.launch import output

_LOG2E = 1.4426950408889634


@triton.jit
def _prefill_attention_block(
    acc, m_i, l_i, q, K_head, V_head, n0, key_hi, pos,
    offs_n, offs_d, d_mask, stride_kt, stride_vt, qk_scale,
    CAUSAL_MASK: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One key block [n0, n0 + BLOCK_N) folded into the running (acc, m_i, l_i) of all rows."""
    keys = n0 + offs_n                                                    # (BLOCK_N,) key positions
    k_ptrs = K_head + keys[:, None] * stride_kt + offs_d[None, :]
    v_ptrs = V_head + keys[:, None] * stride_vt + offs_d[None, :]
    if CAUSAL_MASK:
        # diagonal block: keys past the last row's position are never written (garbage, maybe
        # NaN) -> load them as 0 so that p = 0 times garbage cannot poison the PV product
        kv_mask = (keys < key_hi)[:, None] & d_mask[None, :]
        k = tl.load(k_ptrs, mask=kv_mask, other=0.0)                      # (BLOCK_N, BLOCK_D)
        v = tl.load(v_ptrs, mask=kv_mask, other=0.0)
    else:
        k = tl.load(k_ptrs, mask=d_mask[None, :], other=0.0)
        v = tl.load(v_ptrs, mask=d_mask[None, :], other=0.0)

    # ---- scores in the log2 domain: s = (q . k) * sm_scale * log2(e)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale   # (BLOCK_M, BLOCK_N) fp32
    if CAUSAL_MASK:
        s = tl.where(keys[None, :] <= pos[:, None], s, float("-inf"))

    # ---- online softmax: rescale what we have by 2^(m_old - m_new), add this block
    # (every row saw key 0 in its first block, so m_i is finite from then on: no -inf - -inf)
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.math.exp2(m_i - m_new)
    p = tl.math.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, m_new, l_i


@triton.jit
def _prefill_attention_kernel(
    # pointers
    Q, K_cache, V_cache, Out, CuSeqlensQ, StartPos, SlotIdx,
    # sizes and scalars
    qk_scale,
    # strides (elements; the head dim is contiguous everywhere)
    stride_qn, stride_qh,
    stride_ks, stride_kh, stride_kt,
    stride_vs, stride_vh, stride_vt,
    stride_on, stride_oh,
    # constexprs
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # ---- which rows: heaviest (last) M blocks first, so the long causal rows do not form the tail.
    # b and kv_head multiply big strides: int64. Token and key indices stay int32 (cheaper address
    # math; the launcher checks that one head's cache span fits) and widen where a stride needs it.
    m_block = tl.num_programs(0) - 1 - tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    kv_head = tl.program_id(2).to(tl.int64)

    q_start = tl.load(CuSeqlensQ + b)
    q_len = tl.load(CuSeqlensQ + b + 1) - q_start
    row0 = m_block * BLOCK_M
    if row0 >= q_len * GROUP:           # this sequence is shorter than the longest one: nothing to do
        return
    start = tl.load(StartPos + b)
    slot = tl.load(SlotIdx + b).to(tl.int64)

    # ---- rows m = token * G + g of this program (token-major so one token's heads sit together)
    offs_m = row0 + tl.arange(0, BLOCK_M)                                 # (BLOCK_M,)
    tok = offs_m // GROUP
    head = kv_head * GROUP + offs_m % GROUP
    row_mask = offs_m < q_len * GROUP
    pos = start + tok                                                     # absolute query position
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM                                            # D padded to a power of 2
    offs_n = tl.arange(0, BLOCK_N)

    # ---- load the Q tile once (rows past the sequence read as 0, never stored)
    q_rows = (q_start + tok).to(tl.int64)                                 # packed token index
    q_ptrs = Q + q_rows[:, None] * stride_qn + head[:, None] * stride_qh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_mask[:, None] & d_mask[None, :], other=0.0)   # (BLOCK_M, BLOCK_D)

    K_head = K_cache + slot * stride_ks + kv_head * stride_kh
    V_head = V_cache + slot * stride_vs + kv_head * stride_vh

    # ---- key ranges: [0, full_hi) is visible to every row (no masks); [full_hi, key_hi) is the
    # diagonal, where row m sees keys <= pos[m]; key_hi bounds the last real row of the block
    first_tok = row0 // GROUP
    last_tok = tl.minimum((row0 + BLOCK_M - 1) // GROUP, q_len - 1)
    full_hi = ((start + first_tok + 1) // BLOCK_N) * BLOCK_N
    key_hi = start + last_tok + 1

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # ---- phase 1: full blocks (the bulk of a continued prompt's cached context)
    for n0 in range(0, full_hi, BLOCK_N):
        acc, m_i, l_i = _prefill_attention_block(
            acc, m_i, l_i, q, K_head, V_head, n0, key_hi, pos, offs_n, offs_d, d_mask,
            stride_kt, stride_vt, qk_scale, CAUSAL_MASK=False, DOT_PRECISION=DOT_PRECISION)
    # ---- phase 2: diagonal blocks, masked per row (ceil((BLOCK_M / G) / BLOCK_N) + 1 at most)
    for n0 in range(full_hi, key_hi, BLOCK_N):
        acc, m_i, l_i = _prefill_attention_block(
            acc, m_i, l_i, q, K_head, V_head, n0, key_hi, pos, offs_n, offs_d, d_mask,
            stride_kt, stride_vt, qk_scale, CAUSAL_MASK=True, DOT_PRECISION=DOT_PRECISION)

    # ---- epilogue: normalize and store the real rows (l_i >= 1: the row max contributes 2^0)
    out = acc / l_i[:, None]
    o_ptrs = Out + q_rows[:, None] * stride_on + head[:, None] * stride_oh + offs_d[None, :]
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_mask[:, None] & d_mask[None, :])


def _launch_config(rows: int, head_dim: int, dtype: torch.dtype) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_D, num_warps, num_stages) for `rows` = max_seqlen_q * G.

    16-bit: 64 x 64 tiles, one warpgroup (4 warps, one m64 wgmma), 3 stages: against 128-row
    tiles with 8 warps, BLOCK_N 32/128 and 2/4 stages, the best or close to it on every shape
    tried (4K prompts at D=128 MHA/GQA and D=64, 8 x 512 batches, chat turns continued at 4K;
    docs/kernels.md). Runs shorter than 64 rows shrink BLOCK_M to the 16 rows of one MMA.
    fp32 (tests) halves the tiles to stay inside shared memory.
    """
    block_d = max(16, triton.next_power_of_2(head_dim))
    if dtype == torch.float32:
        return min(32, max(16, triton.next_power_of_2(rows))), 32, block_d, 4, 2
    return min(64, max(16, triton.next_power_of_2(rows))), 64, block_d, 4, 3


def prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      cu_seqlens_q: torch.Tensor, start_pos: torch.Tensor, slot_idx: torch.Tensor,
                      sm_scale: float, max_seqlen_q: int,
                      out: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention of packed new tokens q (N, H, D) over the cache; returns out (N, H, D).

    k_cache, v_cache (S, Hkv, T, D) already hold the new tokens' K/V at positions
    start_pos[b] .. start_pos[b] + L_b - 1 of slot slot_idx[b]. cu_seqlens_q (B+1,) int32,
    start_pos (B,) int32, slot_idx (B,) int32 stay on the device; max_seqlen_q is a host int (grid
    size; a larger value is harmless, a smaller one drops tokens). No host syncs: capturable.
    """
    # ---- check shapes (metadata only: no device reads)
    N, H, D = q.shape
    S, Hkv, T, Dk = k_cache.shape
    B = slot_idx.shape[0]
    if v_cache.shape != k_cache.shape or Dk != D:
        raise ValueError(f"prefill_attention: caches {tuple(k_cache.shape)} / {tuple(v_cache.shape)} "
                         f"must both be (S, Hkv, T, D={D})")
    if H % Hkv:
        raise ValueError(f"prefill_attention: {H} query heads are not a multiple of {Hkv} kv heads")
    if cu_seqlens_q.shape != (B + 1,) or start_pos.shape != (B,):
        raise ValueError(f"prefill_attention: cu_seqlens_q {tuple(cu_seqlens_q.shape)} must be "
                         f"({B + 1},) and start_pos {tuple(start_pos.shape)} ({B},) for {B} sequences")
    for name, t in (("cu_seqlens_q", cu_seqlens_q), ("start_pos", start_pos), ("slot_idx", slot_idx)):
        if t.dtype != torch.int32:
            raise ValueError(f"prefill_attention: {name} must be int32, got {t.dtype}")
    if k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise ValueError(f"prefill_attention: q {q.dtype} and caches {k_cache.dtype}/{v_cache.dtype} "
                         f"differ; store the cache in the model dtype")
    if q.stride(-1) != 1 or k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("prefill_attention: q and the caches need a contiguous head dim (stride 1)")
    if T * max(k_cache.stride(2), v_cache.stride(2)) >= 2**31:
        raise ValueError("prefill_attention: one head's cache spans >= 2^31 elements; use a smaller T")
    # ---- allocate or take out=
    out = output(out, (N, H, D), q.dtype, q.device, "prefill_attention")
    if N == 0 or B == 0 or max_seqlen_q <= 0:
        return out
    # ---- launch: (M blocks of the longest run, sequences, kv heads)
    G = H // Hkv
    BLOCK_M, BLOCK_N, BLOCK_D, num_warps, num_stages = _launch_config(max_seqlen_q * G, D, q.dtype)
    grid = (triton.cdiv(max_seqlen_q * G, BLOCK_M), B, Hkv)
    _prefill_attention_kernel[grid](
        q, k_cache, v_cache, out, cu_seqlens_q, start_pos, slot_idx,
        float(sm_scale) * _LOG2E,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        out.stride(0), out.stride(1),
        GROUP=G, HEAD_DIM=D, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=num_warps, num_stages=num_stages,
    )
    return out


def prefill_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                          cu_seqlens_q: torch.Tensor, start_pos: torch.Tensor, slot_idx: torch.Tensor,
                          sm_scale: float, max_seqlen_q: int,
                          out: torch.Tensor | None = None) -> torch.Tensor:
    """Plain-torch causal prefill attention, fp32 math, one sequence at a time.

    Reads the lengths to the host (fine on the CPU path it serves; not capturable on a GPU).
    Only each sequence's own keys are touched, so garbage past them cannot leak in.
    """
    N, H, D = q.shape
    Hkv = k_cache.shape[1]
    G = H // Hkv
    out = output(out, (N, H, D), q.dtype, q.device, "prefill_attention_ref")
    cu, starts, slots = cu_seqlens_q.tolist(), start_pos.tolist(), slot_idx.tolist()   # sync: CPU-path reference
    for b, slot in enumerate(slots):
        q0, q1, p0 = cu[b], cu[b + 1], starts[b]
        L, P = q1 - q0, p0 + q1 - q0                                     # new tokens, keys seen
        if L == 0:
            continue
        qb = q[q0:q1].float().reshape(L, Hkv, G, D).permute(1, 2, 0, 3)  # (Hkv, G, L, D)
        kb = k_cache[slot, :, :P].float().unsqueeze(1)                   # (Hkv, 1, P, D)
        vb = v_cache[slot, :, :P].float().unsqueeze(1)                   # (Hkv, 1, P, D)
        scores = (qb @ kb.transpose(-1, -2)) * sm_scale                  # (Hkv, G, L, P)
        qpos = torch.arange(p0, P, device=q.device)[:, None]             # (L, 1)
        kpos = torch.arange(P, device=q.device)[None, :]                 # (1, P)
        scores = scores.masked_fill(kpos > qpos, float("-inf"))
        ob = scores.softmax(dim=-1) @ vb                                 # (Hkv, G, L, D)
        out[q0:q1] = ob.permute(2, 0, 1, 3).reshape(L, H, D).to(out.dtype)
    return out
