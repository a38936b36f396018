"""InfiniGen token selection: threshold the speculated logits, cap the count, compact the indices.

Math, for sequence b (n = seq_lens[b] tokens) and kv head g (query heads h = g*G .. g*G+G-1):
    m_h   = max_{t<n} scores[b, h, t]
    ns_t  = max_h (scores[b, h, t] - m_h)           <= 0; the group's union: any head may want t
    w     = min(recent, cap // 2)                   the recent window, at most half the cap
    ns_t  = 1 + t  for the last w tokens, n - w <= t < n: above every other token
    C     = { t < n : ns_t > -alpha }               never empty: the argmax token has ns = 0
    cap   = min(max_select, max(1, ceil(budget * n)))   product in fp32, on the device
    sel   = C                                       if |C| <= cap
          = the cap tokens of C with the largest (ns_t, -t)   otherwise (ties: lower t wins)
    count[b, g] = |sel|;  idx[b, g, :count] = sel ascending;  idx[b, g, count:] = 0
alpha = inf with budget >= 1 and max_select >= n selects every token t < n (the dense check).
recent > 0 keeps the last `recent` cached tokens whatever the speculation says, as long as they take
at most half the cap (the rest stays with the speculation); 0 = the paper's selection.
Scores must be finite for t < n (what lies past n is never read: -inf, garbage, anything).

Algorithm, one program per (b, g), every pass a loop over BLOCK_T-token blocks of the G score rows
(ns is recomputed from the scores each pass: no scratch buffer, nothing to write back):
    pass 1   m_h per head (running max).
    pass 2   ns, |C|, and an optimistic compaction of C into idx (block prefix sum + running
             offset, stores below cap only). When |C| <= cap (the usual case: real attention is
             sparse) the answer is already written: two passes in all.
             alpha = inf (a fixed fetch fraction): no pass 2, |C| = n; if n <= cap, idx = 0..n-1
             is written without a second read of the scores, else straight to the radix select.
    else     exact radix select of the cap-th largest ns. For ns <= 0, larger ns <=> smaller
             |ns| <=> smaller float bits of |ns|; "mag" = those bits + w (-0 and +0 agree),
             and n - 1 - t for the recent tokens, an int in [0, 2^31); the cap-th SMALLEST mag:
             up to six 6-bit digit passes (_DIGIT), each a 64-bin tl.histogram of the digit
             over tokens whose higher digits match the prefix found so far, then a prefix sum
             picks the digit. Bit-exact, no float bisection. Early exit:
             when every token of the chosen digit's bucket is needed, the lower digits cannot
             change the answer (kth = the bucket's largest mag, all its tokens kept), so the
             remaining passes are skipped (after 18-24 bits the bucket is usually one token).
             Then one compaction pass: keep mag < kth, plus the first `need` tokens with mag == kth
             in index order (need = cap - #{mag < kth}: the tie rule, lower t wins).
    tail     idx[count:max_select] = 0; count; total += count (atomic) when a total is given.

Cost per call (bytes; scores are fp32, rows re-read per pass mostly hit L2):
    reads   passes * sum_b G * Hkv * n_b * 4   (passes = 2 without the cap; up to 9 when it binds:
                                               max, candidates, six digits, compaction)
    writes  B * Hkv * (max_select + 1) * 4     (indices, zero tail, counts)
Grid (B, Hkv): one program streams its G rows serially, so with few programs the work is bound
by one SM per row (the 64-bin histogram of a 6-bit digit: ~22 instructions per token per pass,
an estimate from its lowering: a ballot per bit, then 2 bins per lane), not by bytes. A binding
cap costs several times the uncapped call (times, and the digit-width sweep: docs/kernels.md).
"""
from __future__ import annotations

import math
import struct

import torch
import triton
import triton.language as tl

from minigen.kernels.launch import output

# Score elements per loaded tile (BLOCK_G x BLOCK_T): 16384 fp32 over 16 warps, 64 KB in flight
# per program; the warps grow with BLOCK_T so the 1-D per-token work stays at 16 per thread (no
# spills on sm_90). Bigger blocks mean fewer serial steps per pass, a row's latency when there are
# few programs (B = 1). Tests lower both to exercise the block loops.
_TILE = 16384
_MAX_BLOCK_T = 8192
# Zero-tail block of idx.
_BLOCK_OUT = 1024
# Radix digit width (bits) of the select: a 2^w-bin tl.histogram costs about w + 2^w / 32 * (w + 2)
# instructions per token (a ballot per bit, then 2^w / 32 bins per lane), so narrower digits make
# each pass much cheaper (8 bits: ~88, 6 bits: ~22) for one or two more passes at most; the early
# exit usually ends the select after the digits that separate the cap-th token anyway.
_DIGIT = 6


@triton.jit
def _group_ns(rows, offs_t, n, lo, g_mask, m):
    """ns over one block: max over the group's heads of (score - m_h), -inf at t >= n, 1 for the
    recent tokens lo <= t < n (a candidate for any alpha; _mag ranks them first by ns > 0).
    rows: (BLOCK_G, 1) row pointers; m: (BLOCK_G,) per-head maxima, finite (0 on padding rows),
    so the -inf that masked loads give (t >= n, padding rows) stays -inf through the subtraction."""
    s = tl.load(rows + offs_t[None, :], mask=g_mask[:, None] & (offs_t < n)[None, :],
                other=float("-inf"))                                        # (BLOCK_G, BLOCK_T)
    ns = tl.max(s - m[:, None], axis=0)                                     # (BLOCK_T,)
    return tl.where((offs_t >= lo) & (offs_t < n), 1.0, ns)


@triton.jit
def _mag(ns, t, n, w):
    """The radix select's key: smaller = ranked first. The w recent tokens first (the only ones
    with ns > 0, set by _group_ns: n - 1 - t < w); then the others by the bits of |ns| (ns <= 0:
    an int order that is |ns|'s, -0 and +0 agree) plus w. Finite |ns| bits + w < 2^31
    (w <= recent < 2^23)."""
    return tl.where(ns > 0, n - 1 - t, (ns.to(tl.int32, bitcast=True) & 0x7FFFFFFF) + w)


@triton.jit
def _select_kernel(
    # pointers
    Scores, SeqLens, Idx, Count, Total,
    # sizes and scalars
    T, max_select, neg_alpha, budget, recent,
    # strides (elements; the token dim is contiguous)
    stride_sb, stride_sh, stride_ib, stride_ig, stride_cb,
    # constexprs
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_OUT: tl.constexpr,
    ALL_CANDIDATES: tl.constexpr, HAS_TOTAL: tl.constexpr, DIGIT: tl.constexpr,
):
    # ---- which (sequence, kv head): int64 before any stride multiply
    b = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1).to(tl.int64)
    n = tl.minimum(tl.load(SeqLens + b), T)          # clamp: a bad seq_lens must not read past a row

    # ---- cap = min(max_select, max(1, ceil(budget * n))), fp32 product (the ref does the same)
    # (clamped to 2^24 >= max_select before the int conversion, so it cannot overflow)
    cap_f = tl.math.ceil(n.to(tl.float32) * budget)
    cap = tl.minimum(tl.minimum(tl.maximum(cap_f, 1.0), 16777216.0).to(tl.int32), max_select)
    w = tl.minimum(recent, cap // 2)                 # the recent window: at most half the cap
    lo = n - w                                       # tokens t >= lo rank first

    offs_g = tl.arange(0, BLOCK_G)
    offs_t = tl.arange(0, BLOCK_T)
    g_mask = offs_g < GROUP                                                 # G = 3, 6: padding rows
    rows = Scores + b * stride_sb + (g * GROUP + offs_g)[:, None] * stride_sh   # (BLOCK_G, 1)
    idx_row = Idx + b * stride_ib + g * stride_ig

    # ---- pass 1: per-head max over the valid tokens (elementwise running max, one reduction)
    m_tile = tl.full([BLOCK_G, BLOCK_T], float("-inf"), dtype=tl.float32)
    for t0 in range(0, n, BLOCK_T):
        t = t0 + offs_t
        s = tl.load(rows + t[None, :], mask=g_mask[:, None] & (t < n)[None, :], other=float("-inf"))
        m_tile = tl.maximum(m_tile, s)
    m = tl.max(m_tile, axis=1)                                              # (BLOCK_G,)
    m = tl.where(g_mask, m, 0.0)       # padding rows: -inf - 0 = -inf, never -inf - -inf = NaN

    if ALL_CANDIDATES:
        # ---- alpha = inf: every valid token is a candidate (ns is finite for t < n), |C| = n.
        # When they all fit, idx = 0..n-1 without reading a score; else the radix select decides.
        num_c = n
        if n <= cap:
            for t0 in range(0, n, BLOCK_T):
                t = t0 + offs_t
                tl.store(idx_row + t, t, mask=t < n)
    else:
        # ---- pass 2: candidates ns > -alpha; count them and compact them optimistically (pos < cap)
        num_c = tl.zeros([1], dtype=tl.int32).sum(0)  # int32 scalar carried through the loop
        for t0 in range(0, n, BLOCK_T):
            t = t0 + offs_t
            ns = _group_ns(rows, t, n, lo, g_mask, m)
            keep = (ns > neg_alpha).to(tl.int32)                            # -inf never passes
            pos = num_c + tl.cumsum(keep, 0) - 1                            # slot in idx
            tl.store(idx_row + pos, t, mask=(keep != 0) & (pos < cap))
            num_c += tl.sum(keep, 0)
    count = tl.minimum(num_c, cap)

    # Pass 2 and the re-compaction below write the same idx slots from different threads:
    # the barrier orders them (global writes before it are visible to the CTA after it).
    tl.debug_barrier()

    if num_c > cap:
        # ---- radix select: kth = the cap-th smallest mag = |ns| bits over t < n (C is an upper
        # set of ns and |C| > cap, so the cap-th largest ns of the row lies in C). Invariant:
        # `k` (1-based) indexes into the tokens whose mag matches `prefix` on the digits so far.
        bins = tl.arange(0, 1 << DIGIT)
        prefix = tl.zeros([1], dtype=tl.int32).sum(0)
        k = cap
        done = tl.zeros([1], dtype=tl.int32).sum(0)
        for p in tl.static_range((31 + DIGIT - 1) // DIGIT):
            # digit p covers bits [SHIFT, HI) of the 31-bit mag, top-aligned (constexprs); the
            # last one is narrower when DIGIT does not divide 31
            HI = 31 - DIGIT * p
            SHIFT = HI - DIGIT
            if SHIFT < 0:
                SHIFT = 0
            if done == 0:
                hist = tl.zeros([1 << DIGIT], dtype=tl.int32)
                for t0 in range(0, n, BLOCK_T):
                    t = t0 + offs_t
                    ns = _group_ns(rows, t, n, lo, g_mask, m)
                    mag = _mag(ns, t, n, w)
                    match = t < n
                    if p > 0:
                        match = match & ((mag >> HI) == (prefix >> HI))
                    hist += tl.histogram((mag >> SHIFT) & ((1 << (HI - SHIFT)) - 1), 1 << DIGIT, mask=match)
                # smallest digit d whose inclusive count reaches k; drop the tokens below it
                cum = tl.cumsum(hist, 0)
                d = tl.sum((cum < k).to(tl.int32), 0)
                k -= tl.sum(tl.where(bins < d, hist, 0), 0)
                prefix = prefix | (d << SHIFT)
                if tl.sum(tl.where(bins == d, hist, 0), 0) == k:
                    # the whole bucket is kept: every lower digit may be anything, so kth = the
                    # bucket's largest mag and its k tokens all pass (ties included). Usually
                    # saves the last pass or two: a bucket of one token is common after 16 bits.
                    prefix = prefix | ((1 << SHIFT) - 1)
                    done = 1
        kth = prefix                # mag of the cap-th largest ns (or the kept bucket's largest)
        need = k                    # how many tokens with mag == kth to keep (>= 1): lowest t first

        # ---- re-compaction: mag < kth, plus the first `need` ties in index order
        num_sel = tl.zeros([1], dtype=tl.int32).sum(0)
        num_tie = tl.zeros([1], dtype=tl.int32).sum(0)
        for t0 in range(0, n, BLOCK_T):
            t = t0 + offs_t
            t_valid = t < n
            ns = _group_ns(rows, t, n, lo, g_mask, m)
            mag = _mag(ns, t, n, w)
            tie = (t_valid & (mag == kth)).to(tl.int32)
            tie_rank = num_tie + tl.cumsum(tie, 0) - 1
            keep = (t_valid & ((mag < kth) | ((tie != 0) & (tie_rank < need)))).to(tl.int32)
            pos = num_sel + tl.cumsum(keep, 0) - 1
            tl.store(idx_row + pos, t, mask=keep != 0)
            num_sel += tl.sum(keep, 0)
            num_tie += tl.sum(tie, 0)

    # ---- count, and zeros after it (disjoint from every slot written above: no barrier needed)
    tl.store(Count + b * stride_cb + g, count)
    if HAS_TOTAL:                   # running total of rows selected (the fetched-fraction counter)
        tl.atomic_add(Total, count.to(tl.int64))
    offs_o = tl.arange(0, BLOCK_OUT)
    zeros = tl.zeros([BLOCK_OUT], dtype=tl.int32)
    for j0 in range((count // BLOCK_OUT) * BLOCK_OUT, max_select, BLOCK_OUT):
        j = j0 + offs_o
        tl.store(idx_row + j, zeros, mask=(j >= count) & (j < max_select))


def _launch_config(T: int, group_size: int) -> tuple[int, int, int]:
    """(BLOCK_G, BLOCK_T, num_warps). BLOCK_T >= 32 * num_warps: per-token tensors must not wrap
    around the CTA (a wrapped, replicated element would be counted twice by tl.histogram)."""
    block_g = triton.next_power_of_2(group_size)
    block_t = max(32, min(triton.next_power_of_2(max(T, 1)), _TILE // block_g, _MAX_BLOCK_T))
    # <= 16 per-token (1-D) elements and <= 32 tile (2-D) elements per thread
    num_warps = min(16, block_t // 32, max(4, block_t // 512, block_g * block_t // 1024))
    return block_g, block_t, num_warps


def _to_f32(x: float) -> float:
    """x rounded to fp32 (+-inf past the fp32 range, as torch rounds it), as a Python float: the
    kernel and the ref compare against exactly the same threshold and multiply by the same budget."""
    try:
        return struct.unpack("f", struct.pack("f", x))[0]
    except OverflowError:
        return math.copysign(math.inf, x)


def _check_args(scores, seq_lens, alpha, budget, group_size, max_select, recent) -> tuple[int, int, int, int]:
    """Shapes and scalars (metadata only); returns (B, H, T, Hkv)."""
    if scores.dim() != 3 or scores.dtype != torch.float32:
        raise ValueError(f"select: scores must be (B, H, T) float32, got {tuple(scores.shape)} {scores.dtype}")
    B, H, T = scores.shape
    if group_size < 1 or H % group_size:
        raise ValueError(f"select: group_size {group_size} must divide the {H} query heads")
    if seq_lens.shape != (B,) or seq_lens.dtype != torch.int32:
        raise ValueError(f"select: seq_lens must be ({B},) int32, got {tuple(seq_lens.shape)} {seq_lens.dtype}")
    if not alpha > 0:
        raise ValueError(f"select: alpha must be > 0 (a logit margin, 4-5 typical; inf keeps all), got {alpha}")
    if not budget >= 0:
        raise ValueError(f"select: budget must be >= 0 (a share of the context, 0.2 typical), got {budget}")
    if not 1 <= max_select <= 2**24:
        raise ValueError(f"select: max_select must be in [1, 2^24], got {max_select}")
    if isinstance(recent, bool) or not isinstance(recent, int) or not 0 <= recent < 2**23:
        raise ValueError(f"select: recent must be an int >= 0 (tokens always kept), got {recent!r}")
    return B, H, T, H // group_size


def _check_out(out_idx, out_count, total, B, Hkv, max_select, device):
    """(idx, count) outputs, allocated or checked; total must be an int64 scalar on the device."""
    if total is not None and (total.shape != () or total.dtype != torch.int64 or total.device != device):
        raise ValueError(f"select: total must be an int64 scalar tensor on {device}, got "
                         f"{tuple(total.shape)} {total.dtype} on {total.device}")
    return (output(out_idx, (B, Hkv, max_select), torch.int32, device, "select out_idx"),
            output(out_count, (B, Hkv), torch.int32, device, "select out_count"))


def select(scores: torch.Tensor, seq_lens: torch.Tensor, alpha: float, budget: float,
           group_size: int, max_select: int, out_idx: torch.Tensor | None = None,
           out_count: torch.Tensor | None = None, total: torch.Tensor | None = None, recent: int = 0
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens to fetch per (sequence, kv head) from speculated logits scores (B, H, T) fp32:
    returns idx (B, Hkv, max_select) int32 (ascending, zero-padded) and count (B, Hkv) int32.
    Hkv = H // group_size. alpha, budget: Python floats; max_select: the idx buffer width.
    total: an optional int64 scalar tensor that count.sum() is added to (a running counter).
    recent: the last min(recent, cap // 2) tokens of each row rank above all others (always kept).
    No host syncs: capturable in a CUDA graph. seq_lens[b] > T is clamped to T.
    """
    # ---- check shapes and scalars (metadata only: no device reads)
    B, H, T, Hkv = _check_args(scores, seq_lens, alpha, budget, group_size, max_select, recent)
    if scores.stride(-1) != 1:
        raise ValueError("select: scores need a contiguous token dim (stride(-1) 1)")
    # ---- allocate or take out=
    out_idx, out_count = _check_out(out_idx, out_count, total, B, Hkv, max_select, scores.device)
    if B == 0 or Hkv == 0:
        return out_idx, out_count
    # ---- launch: one program per (sequence, kv head)
    block_g, block_t, num_warps = _launch_config(T, group_size)
    neg_alpha = _to_f32(-float(alpha))
    _select_kernel[(B, Hkv)](
        scores, seq_lens, out_idx, out_count, out_count if total is None else total,
        T, max_select, neg_alpha, _to_f32(min(float(budget), 2.0**31)), recent,
        scores.stride(0), scores.stride(1), out_idx.stride(0), out_idx.stride(1), out_count.stride(0),
        GROUP=group_size, BLOCK_G=block_g, BLOCK_T=block_t, BLOCK_OUT=_BLOCK_OUT,
        ALL_CANDIDATES=neg_alpha == -math.inf, HAS_TOTAL=total is not None, DIGIT=_DIGIT,
        num_warps=num_warps,
    )
    return out_idx, out_count


def select_ref(scores: torch.Tensor, seq_lens: torch.Tensor, alpha: float, budget: float,
               group_size: int, max_select: int, out_idx: torch.Tensor | None = None,
               out_count: torch.Tensor | None = None, total: torch.Tensor | None = None, recent: int = 0
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-torch selection with the kernel's exact semantics (fp32 ns, fp32 cap product, ties
    to the lower index), vectorized over (B, Hkv) with stable sorts: no host syncs. O(T log T)
    per row and a few (B, H, T) temporaries: meant for the CPU path and for tests."""
    B, H, T, Hkv = _check_args(scores, seq_lens, alpha, budget, group_size, max_select, recent)
    out_idx, out_count = _check_out(out_idx, out_count, total, B, Hkv, max_select, scores.device)
    dev = scores.device
    if T == 0:                                                               # nothing to select
        return out_idx.zero_(), out_count.zero_()
    neg_inf = float("-inf")
    n = seq_lens.long().clamp(max=T)                                        # (B,)
    t = torch.arange(T, device=dev)
    valid = (t < n[:, None])[:, None, :]                                     # (B, 1, T)
    # ---- normalized scores of the group: max over its heads of (s - m_h); -inf past n
    s = torch.where(valid, scores.float(), neg_inf)                          # (B, H, T)
    m = s.amax(-1, keepdim=True)                                             # (B, H, 1)
    ns = (s - m).reshape(B, Hkv, group_size, T).amax(2)                      # (B, Hkv, T)
    ns = torch.where(valid, ns, neg_inf)                                     # (B, Hkv, T)
    # ---- candidates and the cap
    # fp32 n times the fp32-rounded budget: one correctly rounded product, as in the kernel
    cap = torch.ceil(n.float() * _to_f32(min(float(budget), 2.0**31)))     # (B,) fp32
    cap = cap.clamp(min=1.0).clamp(max=float(max_select)).long()             # (B,)
    # the recent tokens (at most half the cap) above all others (1 + t is exact in fp32 below 2^24)
    w = torch.clamp(cap // 2, max=recent)                                    # (B,)
    ns = torch.where(valid & (t >= n[:, None] - w[:, None])[:, None, :], 1.0 + t.float(), ns)
    cand = ns > _to_f32(-float(alpha))                                       # (B, Hkv, T)
    # ---- rank of each token in the order (ns desc, t asc): a stable descending sort
    order = torch.sort(ns, dim=-1, descending=True, stable=True).indices    # (B, Hkv, T)
    rank = torch.empty_like(order).scatter_(-1, order, t.expand_as(order))   # (B, Hkv, T)
    sel = cand & (rank < cap[:, None, None])                                 # (B, Hkv, T)
    # ---- compact ascending: selected tokens first (stable keeps t order), zeros after count
    count = sel.sum(-1)                                                      # (B, Hkv)
    first = torch.sort((~sel).to(torch.uint8), dim=-1, stable=True).indices  # (B, Hkv, T)
    w = min(T, max_select)
    j = torch.arange(max_select, device=dev)
    idx = torch.zeros((B, Hkv, max_select), dtype=torch.long, device=dev)
    idx[..., :w] = first[..., :w]
    idx = torch.where(j < count[..., None], idx, 0)
    out_idx.copy_(idx)
    out_count.copy_(count)
    if total is not None:
        total += count.sum()
    return out_idx, out_count
