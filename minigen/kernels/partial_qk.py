"""InfiniGen speculation scores: queries projected onto each head's kept skew columns, against the
GPU-resident partial key cache.

Math, for sequence b (cache slot s = slot_idx[b], n = seq_lens[b] valid tokens), query head h and its
kv head j = h // G (G = H // Hkv), over the R skewed columns kept per (slot, kv head):
    pq[b, h, r]     = scale * sum_d q[b, h, d] * cols[s, j, d, r]     partial query, fp32
    scores[b, h, t] = sum_r pq[b, h, r] * pk[s, j, r, t]               t < n
    scores[b, h, t] = -inf                                             n <= t < T
q is the layer's query (post-RoPE for Llama), cols the R columns of the head's skew matrix in use
(so pq is the kept part of the skewed query) and scale the attention's 1/sqrt(D): scores are in
attention-logit units, the units of select's threshold alpha. No softmax. Every element of
scores is written, so a reused buffer never holds a stale row.

Layout: the partial keys are stored token-minor, pk (S, Hkv, R, T): each of a head's R columns is
one contiguous run of tokens, so a tile (R rows x BLOCK_T tokens) is R coalesced 16-byte-vector
streams (a token-major (T, R) layout has 2R-byte rows, not 16-byte aligned for R = 25: scalar
loads). Allocate the cache with token_stride(T) (a multiple of 16 elements) and pass the [..., :T]
view, so that every column's run starts 16-byte aligned.

Grid (cdiv(T, tokens_per_prog), H, B): a program projects its query head's query onto the kv
head's columns (D x R multiply-adds, from L2), then walks its run of tokens_per_prog tokens tile by
tile: load the (BLOCK_R, BLOCK_T) key tile and score it (fp32 multiply + sum over R on CUDA cores:
R is 12..32, far below what tensor cores need, and the op is bound by the key stream). With GQA
(G > 1) the G programs of a kv head read the same tiles, the later ones mostly from L2. One query
head per program rather than the G heads of a kv head looped in one program (fewer programs, the
G passes serial) or each tile scored for all G heads while it is loaded: per head was as fast or
faster in all but two of the shapes compared, and much faster for small calls (docs/kernels.md).
Tiles wholly below n load without a token mask (a runtime per-token mask would split every
16-byte load into 8 scalar ones); the tile holding n masks rows t >= n (no traffic for them).

Cost per call (bytes):
    reads   sum_b Hkv * min(n_b, T) * R * elem(pk)        partial keys (the whole cost)
            + programs * D * R * elem(cols) + B * H * D * elem(q)   (L2: noise; so are the
                                                  G - 1 re-reads of a kv head's keys, from L2)
    writes  B * H * T * 4                                 fp32 scores, -inf tails included
Example: B=8, H=Hkv=32 (Llama-2-7B), T=n=32768, R=25, fp16: 419 MB read + 34 MB written; with
GQA (Hkv=8) the reads drop to 105 MB. Times: docs/kernels.md.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from minigen.kernels.launch import output

# Tokens per tile, programs aimed at, warps: from a sweep over tiles 128..2048 x
# 256..1024 programs x 1..8 warps (docs/kernels.md): 1024-token tiles over 4 warps were the
# fastest at B=1 and B=8 with 8K tokens and at B=1 with 32K; 8 warps or smaller tiles were much
# slower, 2048-token tiles spill registers.
# Several tiles per program once there are more than ~1024 programs: the projection is amortized.
_BLOCK_T = 1024
_TARGET_PROGRAMS = 1024
_NUM_WARPS = 4


def token_stride(T: int) -> int:
    """The token stride to allocate a (.., R, T) partial key cache with: T rounded up to 16."""
    return -(-T // 16) * 16


@triton.jit
def _partial_qk_kernel(
    # pointers
    Q, Cols, PK, SeqLens, SlotIdx, Out,
    # sizes and scalars
    T, tokens_per_prog, scale,
    # strides (elements; the last dim is contiguous everywhere)
    stride_qb, stride_qh,
    stride_cs, stride_ch, stride_cd,
    stride_ks, stride_kh, stride_kr,
    stride_ob, stride_oh,
    # constexprs
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, R: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr,
):
    # ---- which (run of tokens, query head, sequence): int64 before any stride multiply
    run = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)             # the query head; its kv head:
    kv_head = h // GROUP
    b = tl.program_id(2).to(tl.int64)
    n_in = tl.minimum(tl.load(SeqLens + b), T)     # a bad seq_lens > T reads nothing past the buffer
    slot = tl.load(SlotIdx + b).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    offs_r = tl.arange(0, BLOCK_R)
    d_mask = offs_d < HEAD_DIM                                             # D = 64, 128 (or odd)
    r_mask = offs_r < R                                                    # R = 12, 25: pad to 16, 32

    # ---- the kv head's kept skew columns: (BLOCK_D, BLOCK_R) fp32
    cols = tl.load(Cols + slot * stride_cs + kv_head * stride_ch + offs_d[:, None] * stride_cd + offs_r[None, :],
                   mask=d_mask[:, None] & r_mask[None, :], other=0.0).to(tl.float32)
    k_rows = PK + slot * stride_ks + kv_head * stride_kh + offs_r[:, None] * stride_kr   # (BLOCK_R, 1)
    t_start = run * tokens_per_prog
    t_stop = tl.minimum(t_start + tokens_per_prog, T)

    # ---- partial query: the query's projection on the kept columns, scaled to logit units
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_d, mask=d_mask, other=0.0).to(tl.float32)
    pq = tl.sum(q[:, None] * cols, axis=0) * scale                     # (BLOCK_R,) fp32
    out_row = Out + b * stride_ob + h * stride_oh
    for t0 in range(t_start, t_stop, BLOCK_T):
        offs_t = tl.max_contiguous(tl.multiple_of(t0 + tl.arange(0, BLOCK_T), BLOCK_T), BLOCK_T)
        if t0 + BLOCK_T <= n_in:
            # ---- a whole tile of cached tokens: a mask only along R (constant along the
            # tokens), so each thread's 8 tokens of a column are one 16-byte load
            k = tl.load(k_rows + offs_t[None, :], mask=r_mask[:, None], other=0.0).to(tl.float32)
            s = tl.sum(k * pq[:, None], axis=0)                        # (BLOCK_T,) fp32
            tl.store(out_row + offs_t, s)
        else:
            # ---- the tile holding seq_len (or past it): rows t >= n are masked, since the
            # cache there is garbage (maybe NaN) and would poison the sums
            t_store = offs_t < T                                       # the ragged last tile
            t_valid = offs_t < n_in
            k = tl.load(k_rows + offs_t[None, :], mask=r_mask[:, None] & t_valid[None, :],
                        other=0.0).to(tl.float32)                      # (BLOCK_R, BLOCK_T)
            s = tl.sum(k * pq[:, None], axis=0)
            s = tl.where(t_valid, s, float("-inf"))                    # -inf past the sequence
            tl.store(out_row + offs_t, s, mask=t_store)


def _launch_config(T: int, heads: int, batch: int) -> dict:
    """BLOCK_T tokens per tile; whole tiles per program so that about _TARGET_PROGRAMS run (at
    least one tile each, at most 16: beyond that the projection is amortized anyway)."""
    block_t = _BLOCK_T
    tiles = triton.cdiv(T, block_t)
    per_prog = max(1, min(16, tiles * heads * batch // _TARGET_PROGRAMS))
    return dict(BLOCK_T=block_t, tokens_per_prog=per_prog * block_t, num_warps=_NUM_WARPS)


def _check(q, cols, pk_cache, seq_lens, slot_idx) -> tuple[int, int, int, int, int, int]:
    """Shape/dtype checks (metadata only: no device reads); returns (B, H, D, Hkv, R, T)."""
    if q.dim() != 3 or cols.dim() != 4 or pk_cache.dim() != 4:
        raise ValueError(f"partial_qk: q {tuple(q.shape)} must be (B, H, D), cols {tuple(cols.shape)} "
                         f"(S, Hkv, D, R), pk_cache {tuple(pk_cache.shape)} (S, Hkv, R, T)")
    B, H, D = q.shape
    S, Hkv, R, T = pk_cache.shape
    if cols.shape != (S, Hkv, D, R):
        raise ValueError(f"partial_qk: cols {tuple(cols.shape)} must be (S={S}, Hkv={Hkv}, D={D}, R={R}) to "
                         f"match pk_cache {tuple(pk_cache.shape)} (S, Hkv, R, T) and q {tuple(q.shape)}")
    if H % Hkv:
        raise ValueError(f"partial_qk: {H} query heads are not a multiple of {Hkv} kv heads")
    if seq_lens.shape != (B,) or slot_idx.shape != (B,):
        raise ValueError(f"partial_qk: seq_lens {tuple(seq_lens.shape)} and slot_idx "
                         f"{tuple(slot_idx.shape)} must be ({B},)")
    if seq_lens.dtype != torch.int32 or slot_idx.dtype != torch.int32:
        raise ValueError(f"partial_qk: seq_lens/slot_idx must be int32, got {seq_lens.dtype}/{slot_idx.dtype}")
    if not all(t.dtype.is_floating_point for t in (q, cols, pk_cache)):
        raise ValueError(f"partial_qk: q {q.dtype}, cols {cols.dtype} and pk_cache {pk_cache.dtype} must be float")
    return B, H, D, Hkv, R, T


def partial_qk(q: torch.Tensor, cols: torch.Tensor, pk_cache: torch.Tensor, seq_lens: torch.Tensor,
               slot_idx: torch.Tensor, scale: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """Speculated logits (B, H, T) fp32 of queries q (B, H, D) projected on cols (S, Hkv, D, R) and
    scaled, against the partial key cache pk_cache (S, Hkv, R, T); -inf at t >= seq_lens[b].
    Any float dtypes, fp32 math. seq_lens/slot_idx (B,) int32. No host syncs: capturable.
    """
    B, H, D, Hkv, R, T = _check(q, cols, pk_cache, seq_lens, slot_idx)
    if q.stride(-1) != 1 or cols.stride(-1) != 1 or pk_cache.stride(-1) != 1:
        raise ValueError("partial_qk: q, cols and pk_cache need a contiguous last dim (stride 1); "
                         "call .contiguous() once when you build them")
    if R * pk_cache.stride(2) >= 2**31 or D * cols.stride(2) >= 2**31:
        raise ValueError("partial_qk: one head's partial keys span >= 2^31 elements; use a smaller T")
    # ---- allocate or take out=
    out = output(out, (B, H, T), torch.float32, q.device, "partial_qk")
    if B == 0 or T == 0:
        return out
    # ---- launch: (runs of tokens, query heads, sequences)
    cfg = _launch_config(T, H, B)
    grid = (triton.cdiv(T, cfg["tokens_per_prog"]), H, B)
    _partial_qk_kernel[grid](
        q, cols, pk_cache, seq_lens, slot_idx, out,
        T, cfg["tokens_per_prog"], float(scale),
        q.stride(0), q.stride(1),
        cols.stride(0), cols.stride(1), cols.stride(2),
        pk_cache.stride(0), pk_cache.stride(1), pk_cache.stride(2),
        out.stride(0), out.stride(1),
        GROUP=H // Hkv, HEAD_DIM=D, R=R, BLOCK_D=max(16, triton.next_power_of_2(D)),
        BLOCK_R=max(16, triton.next_power_of_2(R)), BLOCK_T=cfg["BLOCK_T"], num_warps=cfg["num_warps"],
    )
    return out


def partial_qk_ref(q: torch.Tensor, cols: torch.Tensor, pk_cache: torch.Tensor, seq_lens: torch.Tensor,
                   slot_idx: torch.Tensor, scale: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """Plain-torch speculation scores, fp32 math, no host syncs (gathers, multiply-adds, a mask).

    Both sums are elementwise multiply-adds rather than matmuls, so they stay true fp32 on CUDA
    whatever torch's TF32 switches say.
    """
    B, H, D, Hkv, R, T = _check(q, cols, pk_cache, seq_lens, slot_idx)
    G, slots = H // Hkv, slot_idx.long()
    c = cols[slots].float()                                                  # (B, Hkv, D, R)
    qg = q.float().reshape(B, Hkv, G, D)
    pq = (qg[..., None] * c[:, :, None]).sum(-2) * scale                     # (B, Hkv, G, R)
    pk = pk_cache[slots].float()                                             # (B, Hkv, R, T)
    s = torch.zeros((B, Hkv, G, T), dtype=torch.float32, device=q.device)
    for r in range(R):
        s += pq[..., r, None] * pk[:, :, None, r, :]                         # (B, Hkv, G, T)
    s = s.reshape(B, H, T)
    valid = torch.arange(T, device=q.device) < seq_lens[:, None]             # (B, T)
    s = torch.where(valid[:, None, :], s, float("-inf"))                     # garbage (even NaN) masked
    if out is None:
        return s
    out.copy_(s)
    return out
