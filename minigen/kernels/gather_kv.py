"""Gather the selected K/V rows of one layer from the (pinned host) pool into GPU buffers.

Math, for sequence b in slot s = slot_idx[b], kv head g, selected entry j < count[b, g]:
    k_sel[b, g, j, :] = k_pool[s, g, idx[b, g, j], :]
    v_sel[b, g, j, :] = v_pool[s, g, idx[b, g, j], :]
Rows j >= count[b, g] are neither read from the pool nor written (whatever out_k/out_v held
stays; sparse_attention masks them), and idx is not read past count. A pure copy: bit-exact.

Where the bytes come from: on CUDA the pools are PINNED HOST tensors (S, Hkv, Tcap, D) and the
kernel dereferences their data_ptr() directly (unified virtual addressing: the SM loads go over
PCIe). No staging buffer, no host-side indexing, no copy engine: one kernel, graph-capturable.
SM loads of this kind come close to one big pinned memcpy's bandwidth for long rows and fall
somewhat short for 256 B rows (one fp16 head row at D=128; docs/kernels.md). What keeps PCIe busy
is the number of read requests in flight, so each program copies BLOCK_J whole rows of K AND V
(2 x ~8 KiB of independent loads, issued before any store), every row a contiguous run of D
elements that the compiler turns into 16-byte vector loads (row starts are 16-byte aligned
whenever D * elem is: D in {64, 128} always), and there are thousands of programs.

Grid (B * Hkv, cdiv(max_select, BLOCK_J)): program (b*Hkv + g, blk) owns rows
[blk*BLOCK_J, blk*BLOCK_J + BLOCK_J) of head (b, g); a block starting at or past count exits
after one 4-byte load, so the grid can be sized for max_select (shapes only: capturable) while
the traffic follows the real counts.

With a resident set (src, cache_k, cache_v from minigen/kernels/reuse.py: plan_reuse): entry j
with src[b, g, j] >= 0 is read from cache_k/v[s, g, src] (HBM) instead of the pool, and an entry
with src < 0 is read from the pool and also written to cache_k/v[s, g, -1 - src]. The rows
returned are the same bits either way (the cache holds copies of pool rows); only misses cross PCIe.

Cost per call (bytes; elem = pool element size, N_bg = count[b, g]):
    reads   sum_bg N_bg * D * elem * 2   over PCIe (K and V rows)
            + sum_bg N_bg * 4 (idx) + B*Hkv*4 (count) + B*4 (slot_idx)   from HBM
    writes  sum_bg N_bg * D * elem * 2   to HBM
Example: B=8, Hkv=32, D=128, fp16, every head at the max_select=3277 cap (10% of 32768 tokens):
838,912 rows of 256 B per tensor = 214.8 MB of K + 214.8 MB of V = 429.5 MB over PCIe, the same
429.5 MB written to HBM, 3.4 MB of idx (time at a PCIe bandwidth: docs/kernels.md).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from minigen.kernels.launch import interpreting, output


@triton.jit
def _gather_kv_kernel(
    # pointers
    K_pool, V_pool, Idx, Count, SlotIdx, Out_k, Out_v, Src, Cache_k, Cache_v,
    # sizes
    num_kv_heads, max_select,
    # strides (elements; the head dim is contiguous everywhere)
    stride_kps, stride_kph, stride_kpt,
    stride_vps, stride_vph, stride_vpt,
    stride_ib, stride_ih,
    stride_cb, stride_ch,
    stride_okb, stride_okh, stride_okj,
    stride_ovb, stride_ovh, stride_ovj,
    stride_sb, stride_sh, stride_rs, stride_rh, stride_rc,
    # constexprs
    HEAD_DIM: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr, REUSE: tl.constexpr,
):
    # ---- which (sequence, kv head, block of selected rows): int64 before any stride multiply
    pid = tl.program_id(0).to(tl.int64)
    b = pid // num_kv_heads
    g = pid % num_kv_heads
    blk0 = tl.program_id(1)
    num_blk_progs = tl.num_programs(1)

    # ---- how many rows this head selected; clamped to the buffer so a bad count cannot write
    # out of bounds. The program walks blocks blk0, blk0 + P, ... below it (P = grid dim 1):
    # a small, persistent grid leaves most SMs to the compute stream it overlaps with.
    n_sel = tl.minimum(tl.load(Count + b * stride_cb + g * stride_ch), max_select)
    slot = tl.load(SlotIdx + b).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    for j0 in range(blk0 * BLOCK_J, n_sel, num_blk_progs * BLOCK_J):
        # ---- the block's token indices (never read past count: entries there may be stale)
        offs_j = j0 + tl.arange(0, BLOCK_J)
        j_mask = offs_j < n_sel
        tok = tl.load(Idx + b * stride_ib + g * stride_ih + offs_j, mask=j_mask, other=0).to(tl.int64)
        mask = j_mask[:, None] & (offs_d[None, :] < HEAD_DIM)               # (BLOCK_J, BLOCK_D)

        # ---- issue every K and V row load of the block before any store: 2 * BLOCK_J independent
        # contiguous rows in flight per program (the PCIe round trip is ~1-2 us; only many
        # outstanding requests hide it). Masked rows issue no request at all.
        k_src = K_pool + slot * stride_kps + g * stride_kph + tok[:, None] * stride_kpt + offs_d[None, :]
        v_src = V_pool + slot * stride_vps + g * stride_vph + tok[:, None] * stride_vpt + offs_d[None, :]
        if REUSE:   # hits come from the GPU cache, only misses cross PCIe (and then fill the cache)
            s = tl.load(Src + b * stride_sb + g * stride_sh + offs_j, mask=j_mask, other=0)
            hit = (s >= 0)[:, None]
            crow = tl.where(s >= 0, s, -1 - s).to(tl.int64)
            c_off = slot * stride_rs + g * stride_rh + crow[:, None] * stride_rc + offs_d[None, :]
            k = tl.load(k_src, mask=mask & ~hit)
            v = tl.load(v_src, mask=mask & ~hit)
            k = tl.where(hit, tl.load(Cache_k + c_off, mask=mask & hit), k)
            v = tl.where(hit, tl.load(Cache_v + c_off, mask=mask & hit), v)
            tl.store(Cache_k + c_off, k, mask=mask & ~hit)
            tl.store(Cache_v + c_off, v, mask=mask & ~hit)
        else:
            k = tl.load(k_src, mask=mask)
            v = tl.load(v_src, mask=mask)

        # ---- write the rows to the dense (B, Hkv, max_select, D) buffers in HBM, unchanged bits
        rows = offs_j.to(tl.int64)[:, None]
        tl.store(Out_k + b * stride_okb + g * stride_okh + rows * stride_okj + offs_d[None, :], k, mask=mask)
        tl.store(Out_v + b * stride_ovb + g * stride_ovh + rows * stride_ovj + offs_d[None, :], v, mask=mask)


# Programs in flight for one gather: 64 x 2 x ~8 KiB = ~1 MiB of outstanding PCIe reads, ten times
# the latency-bandwidth product, while leaving the SMs to the overlapped compute stream.
MAX_PROGRAMS = 64


def _launch_config(head_dim: int, dtype: torch.dtype) -> dict:
    """Rows per program: ~8 KiB of K plus ~8 KiB of V in flight per program (32 rows at D=128
    fp16, 64 at D=64), 4 warps = 16-64 bytes of each tensor per thread, i.e. 1-4 16-byte loads.
    Chosen from the PCIe latency x bandwidth product (~100 KB for the whole GPU) with a wide
    margin, not tuned on the device; the copy has no math, so only bytes in flight matter."""
    block_d = max(16, triton.next_power_of_2(head_dim))
    block_j = max(8, min(128, 8192 // (block_d * dtype.itemsize)))
    return dict(BLOCK_J=block_j, BLOCK_D=block_d, num_warps=4)


def _check_devices(k_pool, v_pool, idx, count, slot_idx, out_k, out_v) -> None:
    """CUDA: pools on the GPU or pinned host memory, the rest on the GPU. CPU: interpreter only."""
    small = (idx, count, slot_idx, out_k, out_v)
    if idx.is_cuda:
        if not all(t.is_cuda for t in small):
            raise ValueError("gather_kv: idx, count, slot_idx and the outputs must all be CUDA tensors")
        # is_pinned() asks the CUDA runtime about the pointer; skip it while a graph is being
        # captured (the same tensors were checked by the eager warm-up call before capture)
        if not torch.cuda.is_current_stream_capturing():
            for name, pool in (("k_pool", k_pool), ("v_pool", v_pool)):
                if not (pool.is_cuda or pool.is_pinned()):
                    raise ValueError(f"gather_kv: {name} is in pageable host memory; allocate the pool "
                                     "with pin_memory=True (the kernel reads it over PCIe) or on the GPU")
    elif not interpreting():
        raise ValueError("gather_kv: CPU tensors need TRITON_INTERPRET=1; on the CPU path call gather_kv_ref")
    elif any(t.device.type != "cpu" for t in (k_pool, v_pool, *small)):
        raise ValueError("gather_kv: under the interpreter every tensor must be on the CPU")


def gather_kv(k_pool: torch.Tensor, v_pool: torch.Tensor, idx: torch.Tensor, count: torch.Tensor,
              slot_idx: torch.Tensor, out_k: torch.Tensor | None = None, out_v: torch.Tensor | None = None,
              src: torch.Tensor | None = None, cache_k: torch.Tensor | None = None,
              cache_v: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Copy the selected rows: pools (S, Hkv, Tcap, D) (pinned host or CUDA), idx (B, Hkv, N)
    int32 token indices, count (B, Hkv) int32 valid entries per row (1..N), slot_idx (B,) int32.
    Returns (k_sel, v_sel), each (B, Hkv, N, D) in the pools' dtype on idx's device; rows past
    count are left as they were (uninitialized when allocated here). No host syncs.
    src (B, Hkv, N) int32 with cache_k/cache_v (S, Hkv, C, D) on idx's device: the resident set
    (plan_reuse's plan; see the module docstring).
    """
    # ---- check shapes (metadata only: no device reads)
    S, Hkv, Tcap, D = k_pool.shape
    if v_pool.shape != k_pool.shape or v_pool.dtype != k_pool.dtype:
        raise ValueError(f"gather_kv: pools {tuple(k_pool.shape)} {k_pool.dtype} / "
                         f"{tuple(v_pool.shape)} {v_pool.dtype} must match, both (S, Hkv, Tcap, D)")
    if idx.dim() != 3 or idx.shape[1] != Hkv:
        raise ValueError(f"gather_kv: idx {tuple(idx.shape)} must be (B, Hkv={Hkv}, max_select)")
    B, _, N = idx.shape
    if count.shape != (B, Hkv) or slot_idx.shape != (B,):
        raise ValueError(f"gather_kv: count {tuple(count.shape)} must be ({B}, {Hkv}) and slot_idx "
                         f"{tuple(slot_idx.shape)} ({B},)")
    if idx.dtype != torch.int32 or count.dtype != torch.int32 or slot_idx.dtype != torch.int32:
        raise ValueError(f"gather_kv: idx/count/slot_idx must be int32, got "
                         f"{idx.dtype}/{count.dtype}/{slot_idx.dtype}")
    if k_pool.stride(-1) != 1 or v_pool.stride(-1) != 1 or idx.stride(-1) != 1:
        raise ValueError("gather_kv: the pools' head dim and idx's last dim must be contiguous (stride 1)")
    # ---- allocate or take out=
    out_k = output(out_k, (B, Hkv, N, D), k_pool.dtype, idx.device, "gather_kv out_k")
    out_v = output(out_v, (B, Hkv, N, D), k_pool.dtype, idx.device, "gather_kv out_v")
    _check_devices(k_pool, v_pool, idx, count, slot_idx, out_k, out_v)
    reuse = _check_reuse(src, cache_k, cache_v, idx, k_pool)
    if B * Hkv * N == 0:
        return out_k, out_v
    # ---- launch: (sequence x kv head, blocks of selected rows)
    cfg = _launch_config(D, k_pool.dtype)
    # block programs per head: enough for ~MAX_PROGRAMS in all (bytes in flight for PCIe), no more
    per_head = max(1, min(triton.cdiv(N, cfg["BLOCK_J"]), triton.cdiv(MAX_PROGRAMS, B * Hkv)))
    grid = (B * Hkv, per_head)
    _gather_kv_kernel[grid](
        k_pool, v_pool, idx, count, slot_idx, out_k, out_v,
        *((src, cache_k, cache_v) if reuse else (idx, out_k, out_v)),   # (placeholders without reuse)
        Hkv, N,
        k_pool.stride(0), k_pool.stride(1), k_pool.stride(2),
        v_pool.stride(0), v_pool.stride(1), v_pool.stride(2),
        idx.stride(0), idx.stride(1),
        count.stride(0), count.stride(1),
        out_k.stride(0), out_k.stride(1), out_k.stride(2),
        out_v.stride(0), out_v.stride(1), out_v.stride(2),
        *((src.stride(0), src.stride(1), cache_k.stride(0), cache_k.stride(1), cache_k.stride(2))
          if reuse else (0,) * 5),
        HEAD_DIM=D, REUSE=reuse, **cfg,
    )
    return out_k, out_v


def _check_reuse(src, cache_k, cache_v, idx, k_pool) -> bool:
    """Whether a resident set is given, checked: all three or none, shapes matching idx and the pool."""
    given = [t is not None for t in (src, cache_k, cache_v)]
    if not any(given):
        return False
    if not all(given):
        raise ValueError("gather_kv: give src, cache_k and cache_v together (the resident set) or none of them")
    S, Hkv, _, D = k_pool.shape
    if src.shape != idx.shape or src.dtype != torch.int32 or src.stride(-1) != 1:
        raise ValueError(f"gather_kv: src must be int32 {tuple(idx.shape)} like idx, got {src.dtype} {tuple(src.shape)}")
    for name, c in (("cache_k", cache_k), ("cache_v", cache_v)):
        if (c.dim() != 4 or c.shape[:2] != (S, Hkv) or c.shape[3] != D or c.dtype != k_pool.dtype
                or c.stride(-1) != 1 or c.device != idx.device):
            raise ValueError(f"gather_kv: {name} {tuple(c.shape)} {c.dtype} must be (S={S}, Hkv={Hkv}, C, D={D}) "
                             f"{k_pool.dtype} on {idx.device}")
    if cache_v.stride() != cache_k.stride():
        raise ValueError("gather_kv: cache_k and cache_v must have the same strides")
    return True


def gather_kv_ref(k_pool: torch.Tensor, v_pool: torch.Tensor, idx: torch.Tensor, count: torch.Tensor,
                  slot_idx: torch.Tensor, out_k: torch.Tensor | None = None, out_v: torch.Tensor | None = None,
                  src: torch.Tensor | None = None, cache_k: torch.Tensor | None = None,
                  cache_v: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-torch gather, same contract: rows j < count copied, rows past count untouched.

    Indexes on the pools' device (moving idx there is a sync when the pools are pinned host
    memory and idx is on the GPU: fine for the CPU path and tests it serves). Entries of idx past
    count are replaced by 0 before indexing, so stale indices cannot fault.
    """
    S, Hkv, Tcap, D = k_pool.shape
    B, _, N = idx.shape
    out_k = output(out_k, (B, Hkv, N, D), k_pool.dtype, idx.device, "gather_kv_ref out_k")
    out_v = output(out_v, (B, Hkv, N, D), v_pool.dtype, idx.device, "gather_kv_ref out_v")
    dev = k_pool.device
    valid = torch.arange(N, device=dev) < count.to(dev).clamp(max=N)[..., None]   # (B, Hkv, N)
    tok = torch.where(valid, idx.to(dev), 0).long()                                 # (B, Hkv, N)
    slot = slot_idx.to(dev).long()[:, None, None]                                   # (B, 1, 1)
    head = torch.arange(Hkv, device=dev)[None, :, None]                             # (1, Hkv, 1)
    keep = valid.to(out_k.device)[..., None]                                        # (B, Hkv, N, 1)
    reuse = _check_reuse(src, cache_k, cache_v, idx, k_pool)
    for pool, out, cache in ((k_pool, out_k, cache_k), (v_pool, out_v, cache_v)):
        rows = pool[slot, head, tok].to(out.device)                                  # (B, Hkv, N, D)
        if reuse:   # hits read from the cache, misses written to it
            s = torch.where(valid.to(src.device), src, 0).long()
            crow, hit = torch.where(s >= 0, s, -1 - s), (s >= 0) & valid.to(src.device)
            at = (slot.to(cache.device), head.to(cache.device), crow)
            rows = torch.where(hit[..., None], cache[at], rows)
            miss = valid.to(src.device) & ~hit
            cache[at[0].expand_as(crow)[miss], at[1].expand_as(crow)[miss], crow[miss]] = rows[miss]
        out.copy_(torch.where(keep, rows, out))
    return out_k, out_v
