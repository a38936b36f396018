"""Plan a gather against a GPU-resident set of recently fetched K/V rows: which selected rows are
already on the GPU (hits) and which cache row each missed one will be fetched into.

State per (slot s, kv head g) of one layer, all int32 on the GPU:
    loc[s, g, t]    the cache row holding pool row t, or -1 (not resident)        (S, Hkv, T)
    tag[s, g, c]    the pool row cache row c holds, or -1 (empty)                  (S, Hkv, C)
    stamp[s, g, c]  the last step cache row c was used (hit or filled), -1 never   (S, Hkv, C)
Invariant: loc[s, g, t] = c >= 0  implies  tag[s, g, c] = t (a tag may be stale: the caller clears
loc when it overwrites a pool row, and eviction only clears a loc that still points at its row).

Math, for sequence b in slot s = slot_idx[b], kv head g, selected rows t_j = idx[b, g, j], j < n:
    hit_j  = loc[s, g, t_j] >= 0;   every hit row's stamp becomes `step`
    victims: the cache rows by age (step - stamp, clamped to AGE_CAP) descending, ties by higher row
             index: the k-th missed row (in j order) takes the k-th; hit rows (age 0) come after
             every other row, so with C >= n no hit row is ever a victim (least recently used)
    for each miss: the victim's old row t' loses its loc (if loc[t'] still points at the victim),
             then loc[t_j] = victim, tag[victim] = t_j, stamp[victim] = step
    src[b, g, j] = loc (>= 0) for a hit, -1 - victim for a miss   (gather_kv's `src`)
    hits += number of hits
Rows j >= n are neither read nor written. The selected rows of one head must be distinct (select's
are). Then gather_kv(..., src, cache) reads hits from the cache and misses from the pool, and
writes the misses into the cache: the gathered rows are the pool's, bit for bit.

Grid (B * Hkv,): one program per head; its cache rows are sorted in registers (bitonic tl.sort of
next_pow2(C) int32 keys), so C at most MAX_CACHE_ROWS (8192) per head. Sync-free and graph-capturable:
`step` and `hits` are device scalars.

Cost per call: reads B*Hkv*(4n (idx) + 4n (loc) + 8C (stamp, tag)) bytes, writes about as much;
tiny next to the rows themselves (n*D*elem*2).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from minigen.kernels.launch import interpreting, output


# The most cache rows per head one program sorts (8192 int32 keys over 16 warps: 16 per thread)
MAX_CACHE_ROWS = 8192


def age_cap(block_c: int) -> int:
    """The largest age a sort key can hold: (age + 1) * BLOCK_C + c < 2**31."""
    return 2**31 // block_c - 2


@triton.jit
def _plan_reuse_kernel(
    Idx, Count, SlotIdx, Loc, Tag, Stamp, Step, Src, Hits,
    num_kv_heads, max_select, cache_rows,
    stride_ib, stride_ih, stride_cb, stride_ch,
    stride_ls, stride_lh, stride_ts, stride_th, stride_ss, stride_sh,
    stride_ob, stride_oh,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, AGE_CAP: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    b = pid // num_kv_heads
    g = pid % num_kv_heads
    n = tl.minimum(tl.load(Count + b * stride_cb + g * stride_ch), max_select)
    slot = tl.load(SlotIdx + b).to(tl.int64)
    step = tl.load(Step)
    loc = Loc + slot * stride_ls + g * stride_lh
    tag = Tag + slot * stride_ts + g * stride_th
    stamp = Stamp + slot * stride_ss + g * stride_sh

    # ---- hits: the selected rows already resident; their cache rows are stamped with this step
    offs_j = tl.arange(0, BLOCK_M)
    jm = offs_j < n
    tok = tl.load(Idx + b * stride_ib + g * stride_ih + offs_j, mask=jm, other=0)
    cs = tl.load(loc + tok, mask=jm, other=-1)
    hit = jm & (cs >= 0)
    miss = jm & (cs < 0)
    tl.store(stamp + cs, step, mask=hit)
    tl.debug_barrier()   # the stamps above are read back below by other threads of the program

    # ---- victims: cache rows by age, oldest first (rows past C sort last, hit rows just before)
    offs_c = tl.arange(0, BLOCK_C)
    st = tl.load(stamp + offs_c, mask=offs_c < cache_rows, other=0)
    age = tl.minimum(tl.maximum(step - st, 0), AGE_CAP)
    age = tl.where(offs_c < cache_rows, age, -1)
    key = tl.sort((age + 1) * BLOCK_C + offs_c, descending=True)
    order = key % BLOCK_C                                    # cache rows, the best victim first
    rank = tl.cumsum(miss.to(tl.int32), 0) - 1               # the k-th miss takes order[k]
    victim = tl.gather(order, tl.maximum(rank, 0), 0)

    # ---- evict: the victim's old row is no longer resident (unless loc moved on: a stale tag)
    old = tl.load(tag + victim, mask=miss, other=-1)
    has_old = miss & (old >= 0)
    old_loc = tl.load(loc + old, mask=has_old, other=-1)
    tl.store(loc + old, -1, mask=has_old & (old_loc == victim))
    tl.debug_barrier()   # clears before the new rows' locs

    # ---- fill: the missed rows will be fetched into their victims
    tl.store(loc + tok, victim, mask=miss)
    tl.store(tag + victim, tok, mask=miss)
    tl.store(stamp + victim, step, mask=miss)
    tl.store(Src + b * stride_ob + g * stride_oh + offs_j, tl.where(hit, cs, -1 - victim), mask=jm)
    tl.atomic_add(Hits, tl.sum(hit.to(tl.int64), 0))


def _check(idx, count, slot_idx, loc, tag, stamp, step, hits) -> tuple[int, int, int, int]:
    if idx.dim() != 3 or loc.dim() != 3 or tag.dim() != 3 or stamp.shape != tag.shape:
        raise ValueError(f"plan_reuse: idx {tuple(idx.shape)} must be (B, Hkv, M), loc (S, Hkv, T), "
                         f"tag and stamp (S, Hkv, C), got loc {tuple(loc.shape)} tag {tuple(tag.shape)} "
                         f"stamp {tuple(stamp.shape)}")
    B, Hkv, M = idx.shape
    C = tag.shape[2]
    if loc.shape[1] != Hkv or tag.shape[1] != Hkv or loc.shape[0] != tag.shape[0]:
        raise ValueError(f"plan_reuse: loc {tuple(loc.shape)} and tag {tuple(tag.shape)} must have "
                         f"the same slots and Hkv={Hkv}")
    if C < M:
        raise ValueError(f"plan_reuse: {C} cache rows per head cannot hold a selection of {M}")
    if C > MAX_CACHE_ROWS:
        raise ValueError(f"plan_reuse: {C} cache rows per head, more than the {MAX_CACHE_ROWS} one program sorts")
    if count.shape != (B, Hkv) or slot_idx.shape != (B,) or step.numel() != 1 or hits.numel() != 1:
        raise ValueError("plan_reuse: count must be (B, Hkv), slot_idx (B,), step and hits one element")
    for name, t in (("idx", idx), ("count", count), ("slot_idx", slot_idx), ("loc", loc), ("tag", tag),
                    ("stamp", stamp), ("step", step)):
        if t.dtype != torch.int32 or (t.dim() and t.stride(-1) != 1):
            raise ValueError(f"plan_reuse: {name} must be int32 with a contiguous last dim, got {t.dtype}")
    if hits.dtype != torch.int64:
        raise ValueError(f"plan_reuse: hits must be int64, got {hits.dtype}")
    if not idx.is_cuda and not interpreting():
        raise ValueError("plan_reuse: CPU tensors need TRITON_INTERPRET=1; on the CPU path call plan_reuse_ref")
    return B, Hkv, M, C


def plan_reuse(idx: torch.Tensor, count: torch.Tensor, slot_idx: torch.Tensor, loc: torch.Tensor,
               tag: torch.Tensor, stamp: torch.Tensor, step: torch.Tensor, hits: torch.Tensor,
               out_src: torch.Tensor | None = None) -> torch.Tensor:
    """Update the resident set of one layer for a selection (idx (B, Hkv, M) int32 pool rows, count
    (B, Hkv) valid entries, slot_idx (B,)) and return src (B, Hkv, M) int32 for gather_kv: >= 0 a
    hit at that cache row, < 0 a miss to fetch into cache row -1 - src. Entries past count are
    left as they were. loc, tag, stamp are updated in place; hits (int64 scalar) counts the hits;
    step (int32 scalar) is the caller's step counter."""
    B, Hkv, M, C = _check(idx, count, slot_idx, loc, tag, stamp, step, hits)
    src = output(out_src, (B, Hkv, M), torch.int32, idx.device, "plan_reuse out_src")
    if B * Hkv * M == 0:
        return src
    block_c = triton.next_power_of_2(C)
    _plan_reuse_kernel[(B * Hkv,)](
        idx, count, slot_idx, loc, tag, stamp, step, src, hits,
        Hkv, M, C,
        idx.stride(0), idx.stride(1), count.stride(0), count.stride(1),
        loc.stride(0), loc.stride(1), tag.stride(0), tag.stride(1), stamp.stride(0), stamp.stride(1),
        src.stride(0), src.stride(1),
        BLOCK_M=triton.next_power_of_2(M), BLOCK_C=block_c, AGE_CAP=age_cap(block_c),
        num_warps=min(16, max(4, block_c // 256)),
    )
    return src


def plan_reuse_ref(idx: torch.Tensor, count: torch.Tensor, slot_idx: torch.Tensor, loc: torch.Tensor,
                   tag: torch.Tensor, stamp: torch.Tensor, step: torch.Tensor, hits: torch.Tensor,
                   out_src: torch.Tensor | None = None) -> torch.Tensor:
    """Plain-torch plan_reuse, same contract and the same victims (one head at a time)."""
    B, Hkv, M, C = idx.shape[0], idx.shape[1], idx.shape[2], tag.shape[2]
    src = output(out_src, (B, Hkv, M), torch.int32, idx.device, "plan_reuse_ref out_src")
    block_c = triton.next_power_of_2(C)
    now = int(step.reshape(()))
    rows = torch.arange(C, device=idx.device)
    for b in range(B):
        s = int(slot_idx[b])
        for g in range(Hkv):
            n = min(int(count[b, g]), M)
            tok = idx[b, g, :n].long()
            cs = loc[s, g, tok]
            hit = cs >= 0
            stamp[s, g, cs[hit].long()] = now
            age = (now - stamp[s, g].long()).clamp(0, age_cap(block_c))
            order = ((age + 1) * block_c + rows).argsort(descending=True)
            victim = order[:int((~hit).sum())]
            old = tag[s, g, victim].long()
            evict = (old >= 0) & (loc[s, g, old.clamp(min=0)] == victim)
            loc[s, g, old[evict]] = -1
            loc[s, g, tok[~hit]] = victim.to(torch.int32)
            tag[s, g, victim] = tok[~hit].to(torch.int32)
            stamp[s, g, victim] = now
            out = cs.clone()
            out[~hit] = (-1 - victim).to(torch.int32)
            src[b, g, :n] = out
            hits += hit.sum()
    return src
