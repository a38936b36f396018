"""Decode attention over gathered (sparse) KV plus the current token, split-K ("flash-decoding").

Math, for sequence b, query head h, kv head g = h // G, N_bg = count[b, g] selected rows:
    s_j   = sm_scale * q[b, h] . k_sel[b, g, j]        j = 0 .. N_bg - 1   (the gathered rows)
    s_cur = sm_scale * q[b, h] . k_cur[b, g]                               (the current token)
    o     = softmax([s_0 .. s_{N-1}, s_cur]) . [v_sel[b, g, 0 .. N-1], v_cur[b, g]]
No other mask: the selection already decided which tokens count; rows j >= N_bg of k_sel/v_sel
are stale (gather_kv leaves them) and are never loaded, so even NaN there cannot leak.

Split-K: the rows of head (b, g) are cut into num_splits contiguous chunks of
chunk = ceil(ceil(N_bg / num_splits) / BLOCK_N) * BLOCK_N rows, computed on the device from count,
so the splits share each head's real work while the grid stays fixed (capturable). Split k
returns the unnormalized partial, in the log2 domain s' = s * log2(e):
    m_k = max s'_t,   l_k = sum 2^(s'_t - m_k),   acc_k = sum 2^(s'_t - m_k) V_t
and the reduce kernel (minigen/kernels/split_k.py) combines them exactly:
    M = max_k m_k,   o = sum_k 2^(m_k - M) acc_k / sum_k 2^(m_k - M) l_k
THE CURRENT TOKEN IS FOLDED INTO SPLIT 0: split 0 starts its online softmax from
(m = s'_cur, l = 1, acc = v_cur) instead of (-inf, 0, 0). So split 0 is never empty, M is always
finite, and a split past its head's count (count small, num_splits large) writes the empty
partial (acc 0, m -inf, l 0), which weighs 2^-inf = 0 in the reduce: no NaN, no special case,
and count = 0 would even be harmless (the output is then v_cur). With one split the kernel
writes out directly (l >= 1 because the max term contributes 2^0) and the reduce is skipped.

Kernel 1, grid (B, Hkv, num_splits): one program streams its chunk of ONE kv head in BLOCK_N x D
tiles and serves all G query heads of that head with tl.dot (q padded to >= 16 rows, the MMA
minimum), so each gathered byte is read from HBM once whatever G (the structure of
minigen/kernels/decode_attention.py, where tensor cores beat the CUDA-core forms at every G tried).
Kernel 2, grid (B, H): split_k.reduce_splits combines the splits (skipped when num_splits == 1).

Cost per call (bytes; elem = element size, N_bg = count[b, g], all traffic in HBM):
    reads   sum_bg N_bg * D * elem * 2   (K and V rows)  + B*H*D*elem (q) + B*Hkv*D*elem*2 (cur)
            + B*H*num_splits*(D + 2)*4 fp32 partials (written once, read once, L2-resident)
    writes  B*H*D*elem (out)
Example: B=8, Hkv=32, D=128, fp16, every head at max_select=3277: 429.5 MB of K+V rows from HBM,
the same bytes gather_kv brings over the far slower PCIe link (times: docs/kernels.md).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from minigen.kernels.launch import num_sms, output
from minigen.kernels.split_k import attention_tiles, reduce_splits, split_scratch

_LOG2E = 1.4426950408889634


@triton.jit
def _sparse_attention_kernel(
    # pointers
    Q, K_sel, V_sel, Count, K_cur, V_cur, Out, PartAcc, PartMax, PartSum,
    # sizes and scalars
    num_splits, max_select, qk_scale,
    # strides (elements; the head dim is contiguous everywhere)
    stride_qb, stride_qh,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_cb, stride_ch,
    stride_kcb, stride_kch,
    stride_vcb, stride_vch,
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

    # ---- this split's rows [lo, hi) of the head's selection (count clamped to the buffer, so a
    # bad count cannot read past it); chunk sized from the real count, whole blocks
    n_sel = tl.minimum(tl.load(Count + b * stride_cb + kv_head * stride_ch), max_select)
    chunk = tl.cdiv(tl.cdiv(n_sel, num_splits), BLOCK_N) * BLOCK_N
    lo = split * chunk
    hi = tl.minimum(lo + chunk, n_sel)

    # ---- the G query heads of this kv head, padded to BLOCK_G >= 16 rows (pad rows: q = 0,
    # never stored), and this kv head's current-token key/value
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    g_mask = offs_g < GROUP
    d_mask = offs_d < HEAD_DIM
    heads = kv_head * GROUP + offs_g                                         # (BLOCK_G,) int64
    q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=g_mask[:, None] & d_mask[None, :], other=0.0)          # (BLOCK_G, BLOCK_D)
    k_cur = tl.load(K_cur + b * stride_kcb + kv_head * stride_kch + offs_d, mask=d_mask, other=0.0)
    v_cur = tl.load(V_cur + b * stride_vcb + kv_head * stride_vch + offs_d, mask=d_mask, other=0.0)

    # ---- online-softmax state. Split 0 starts from the current token (m = s'_cur, l = 1,
    # acc = v_cur), the others from empty (-inf, 0, 0). fp32 CUDA-core dot: G x D MACs, free.
    s_cur = tl.sum(q.to(tl.float32) * k_cur.to(tl.float32)[None, :], axis=1) * qk_scale  # (BLOCK_G,)
    first = split == 0
    m_i = tl.where(first, s_cur, float("-inf"))
    l_i = tl.where(first, 1.0, 0.0) + tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.where(first, 1.0, 0.0) * v_cur.to(tl.float32)[None, :] \
        + tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)

    K_head = K_sel + b * stride_kb + kv_head * stride_kh
    V_head = V_sel + b * stride_vb + kv_head * stride_vh

    # ---- stream the chunk: one BLOCK_N x D tile of K and of V per step
    for n0 in range(lo, hi, BLOCK_N):
        rows = n0 + offs_n
        n_mask = rows < hi
        kv_mask = n_mask[:, None] & d_mask[None, :]
        # rows past count are stale (maybe NaN): load them as 0, since 0 * NaN = NaN in the p.V dot
        k = tl.load(K_head + rows[:, None] * stride_kt + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(V_head + rows[:, None] * stride_vt + offs_d[None, :], mask=kv_mask, other=0.0)

        # ---- scores of the G heads, log2 domain: s' = (q . k) * sm_scale * log2(e)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale    # (BLOCK_G, BLOCK_N)
        s = tl.where(n_mask[None, :], s, float("-inf"))

        # ---- online softmax (each block has >= 1 real row, so m_new is finite)
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.math.exp2(m_i - m_new)                                    # 2^-inf = 0 when empty
        p = tl.math.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    # ---- epilogue: normalized output (one split) or the split's partial (acc, m, l)
    gd_mask = g_mask[:, None] & d_mask[None, :]
    if not SPLIT_K:
        out = acc / l_i[:, None]                           # l_i >= 1: split 0 holds the max term
        tl.store(Out + b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :],
                 out.to(Out.dtype.element_ty), mask=gd_mask)
    else:
        part = (b * num_heads + heads) * num_splits + split                 # rows of (B, H, splits)
        tl.store(PartAcc + part[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=gd_mask)
        tl.store(PartMax + part, m_i, mask=g_mask)
        tl.store(PartSum + part, l_i, mask=g_mask)


def sparse_num_splits(batch: int, num_kv_heads: int, max_select: int, tile_bytes: int,
                      block_n: int, num_sms: int = 132) -> int:
    """Splits per (sequence, kv head), from shapes only (never count: graph capture).

    Target: about one wave of programs holding ~64 KB of K+V tiles per SM (2 programs per SM at
    D=128, 4 at D=64: what saturated HBM for decode_attention). Unlike dense decode, the
    per-head counts are ragged (selection sizes differ a lot between heads), so this rounds UP:
    spare splits cost only a few reduce bytes, while a long head on one program sets the step
    time. Each split keeps >= 2 tiles at the cap; at most 64 splits. Not yet tuned on the device.
    """
    programs = num_sms * max(1, 65536 // (2 * tile_bytes))
    want = triton.cdiv(programs, batch * num_kv_heads)
    most = min(64, max_select // (2 * block_n))
    return max(1, min(want, most))


def sparse_attention(q: torch.Tensor, k_sel: torch.Tensor, v_sel: torch.Tensor, count: torch.Tensor,
                     k_cur: torch.Tensor, v_cur: torch.Tensor, sm_scale: float,
                     num_splits: int | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """One query token per sequence, q (B, H, D), over the gathered rows k_sel/v_sel
    (B, Hkv, max_select, D)[:, :, :count] plus the current token k_cur/v_cur (B, Hkv, D);
    count (B, Hkv) int32 in [1, max_select]. Returns out (B, H, D). No host syncs: capturable.
    """
    # ---- check shapes (metadata only: no device reads)
    B, H, D = q.shape
    if k_sel.dim() != 4 or k_sel.shape[0] != B or k_sel.shape[3] != D or v_sel.shape != k_sel.shape:
        raise ValueError(f"sparse_attention: k_sel {tuple(k_sel.shape)} / v_sel {tuple(v_sel.shape)} "
                         f"must both be (B={B}, Hkv, max_select, D={D})")
    Hkv, N = k_sel.shape[1], k_sel.shape[2]
    if H % Hkv:
        raise ValueError(f"sparse_attention: {H} query heads are not a multiple of {Hkv} kv heads")
    if k_cur.shape != (B, Hkv, D) or v_cur.shape != (B, Hkv, D):
        raise ValueError(f"sparse_attention: k_cur {tuple(k_cur.shape)} / v_cur {tuple(v_cur.shape)} "
                         f"must be ({B}, {Hkv}, {D})")
    if count.shape != (B, Hkv) or count.dtype != torch.int32:
        raise ValueError(f"sparse_attention: count must be ({B}, {Hkv}) int32, got "
                         f"{tuple(count.shape)} {count.dtype}")
    if any(t.dtype != q.dtype for t in (k_sel, v_sel, k_cur, v_cur)):
        raise ValueError(f"sparse_attention: q {q.dtype}, k_sel/v_sel {k_sel.dtype}/{v_sel.dtype} and "
                         f"k_cur/v_cur {k_cur.dtype}/{v_cur.dtype} must share one dtype")
    if any(t.stride(-1) != 1 for t in (q, k_sel, v_sel, k_cur, v_cur)):
        raise ValueError("sparse_attention: q, k_sel, v_sel, k_cur, v_cur need a contiguous head dim")
    if N * max(k_sel.stride(2), v_sel.stride(2)) >= 2**31:
        raise ValueError("sparse_attention: one head's selection spans >= 2^31 elements; lower max_select")
    # ---- allocate or take out=
    out = output(out, (B, H, D), q.dtype, q.device, "sparse_attention")
    if B == 0:
        return out
    G = H // Hkv
    cfg = attention_tiles(D, G, q.dtype)
    if num_splits is None:
        tile_bytes = cfg["BLOCK_N"] * cfg["BLOCK_D"] * q.element_size()
        num_splits = sparse_num_splits(B, Hkv, N, tile_bytes, cfg["BLOCK_N"], num_sms(q.device))
    if num_splits < 1:
        raise ValueError(f"sparse_attention: num_splits must be >= 1, got {num_splits}")
    part_acc, part_max, part_sum = split_scratch(B, H, D, num_splits, out)   # scratch partials
    # ---- launch kernel 1: (sequences, kv heads, splits)
    _sparse_attention_kernel[(B, Hkv, num_splits)](
        q, k_sel, v_sel, count, k_cur, v_cur, out, part_acc, part_max, part_sum,
        num_splits, N, float(sm_scale) * _LOG2E,
        q.stride(0), q.stride(1),
        k_sel.stride(0), k_sel.stride(1), k_sel.stride(2),
        v_sel.stride(0), v_sel.stride(1), v_sel.stride(2),
        count.stride(0), count.stride(1),
        k_cur.stride(0), k_cur.stride(1),
        v_cur.stride(0), v_cur.stride(1),
        out.stride(0), out.stride(1),
        GROUP=G, HEAD_DIM=D, SPLIT_K=num_splits > 1,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32", **cfg,
    )
    # ---- launch kernel 2: combine the splits (a no-op with one split)
    reduce_splits(part_acc, part_max, part_sum, out, num_splits, cfg["BLOCK_D"])
    return out


def sparse_attention_ref(q: torch.Tensor, k_sel: torch.Tensor, v_sel: torch.Tensor, count: torch.Tensor,
                         k_cur: torch.Tensor, v_cur: torch.Tensor, sm_scale: float,
                         num_splits: int | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Plain-torch version, fp32 math, all heads at once (num_splits is ignored). Masks by count
    on the device (no host reads on a GPU, so it is capturable too). Rows past count may hold
    anything: their scores are overwritten with -inf (masked_fill replaces NaN too) and their V
    rows are zeroed before p @ V, where 0 * NaN would otherwise leak. On the CPU (the runtime's path
    there) each sequence goes alone over its own widest count of rows, so its sums do not depend on
    the other sequences in the batch nor on how wide the caller's buffer is."""
    if q.device.type != "cpu":
        return _sparse_ref_all(q, k_sel, v_sel, count, k_cur, v_cur, sm_scale, out)
    out = output(out, q.shape, q.dtype, q.device, "sparse_attention_ref")
    widest = count.amax(-1).clamp(0, k_sel.shape[2]).tolist()              # sync: CPU-path reference
    for b, n in enumerate(widest):
        _sparse_ref_all(q[b:b + 1], k_sel[b:b + 1, :, :n], v_sel[b:b + 1, :, :n], count[b:b + 1],
                        k_cur[b:b + 1], v_cur[b:b + 1], sm_scale, out[b:b + 1])
    return out


def _sparse_ref_all(q, k_sel, v_sel, count, k_cur, v_cur, sm_scale, out):
    """sparse_attention_ref's body over the whole batch at the width k_sel has."""
    B, H, D = q.shape
    Hkv, N = k_sel.shape[1], k_sel.shape[2]
    G = H // Hkv
    out = output(out, (B, H, D), q.dtype, q.device, "sparse_attention_ref")
    valid = (torch.arange(N, device=q.device) < count.clamp(max=N)[..., None])[:, :, None]  # (B, Hkv, 1, N)
    qf = q.float().reshape(B, Hkv, G, D)                                                  # (B, Hkv, G, D)
    v = torch.where(valid.transpose(-1, -2), v_sel.float(), 0.0)                          # (B, Hkv, N, D)
    s_sel = (qf @ k_sel.float().transpose(-1, -2)) * sm_scale                             # (B, Hkv, G, N)
    s_sel = s_sel.masked_fill(~valid, float("-inf"))
    s_cur = (qf * k_cur.float()[:, :, None]).sum(-1, keepdim=True) * sm_scale             # (B, Hkv, G, 1)
    p = torch.cat([s_sel, s_cur], dim=-1).softmax(dim=-1)                                 # (B, Hkv, G, N+1)
    o = p[..., :N] @ v + p[..., N:] * v_cur.float()[:, :, None]                           # (B, Hkv, G, D)
    out.copy_(o.reshape(B, H, D))
    return out
