"""Reuse of fetched rows (infinigen's `reuse`): a GPU-resident set of recently fetched K/V rows per
(pooled layer, slot, KV head), so that a decode step fetches over PCIe only the selected rows that
are not already on the GPU.

Consecutive decode steps select largely the same tokens; a set of C = reuse x (the selection cap)
rows per head, replaced least recently used first, keeps them. Per pooled layer and step, on the
gather stream: plan_reuse (minigen/kernels/reuse.py) finds the hits and assigns each miss a cache
row, then gather_kv reads hits from the cache and misses from the pool (filling the cache). The
gathered rows are the pool's bit for bit: reuse changes where a row is read from, never what.

A cached row is a copy of a pool row, so every write to the pool invalidates: a decode step clears
the loc of the row it appends (a limited pool overwrites victim rows), a prefill clears its
sequences' whole sets (a new sequence in a slot, or a continued one), and the engine's warm-up on a
limited pool (which writes rows back) clears everything.

GPU memory per pooled layer and slot: Hkv x (C x D x 2 x elem (K, V) + T x 4 (loc) + C x 8 (tag,
stamp)) bytes; planned with the rest (minigen/memory.py builds the policy on the meta device).
"""
from __future__ import annotations

import math

import torch

from minigen.kernels.reuse import MAX_CACHE_ROWS


class ResidentRows:
    """The resident set of every pooled layer: loc (Lp, S, Hkv, T), tag and stamp (Lp, S, Hkv, C)
    int32, the rows k, v (Lp, S, Hkv, C, D); step (the decode step counter) and hits on the device."""

    def __init__(self, factor: float, *, layers: int, slots: int, kv_heads: int, rows: int, max_select: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device, ops, alloc):
        self.ops = ops
        if max_select > MAX_CACHE_ROWS:
            raise ValueError(f"--reuse: the selection cap of {max_select} rows per KV head is more than the "
                             f"{MAX_CACHE_ROWS} a resident set holds; lower --budget or --max-seq-len, or leave --reuse out")
        # F x the cap, at most the pool's rows and MAX_CACHE_ROWS (never below the cap)
        self.cache_rows = C = max(max_select, min(rows, MAX_CACHE_ROWS, math.ceil(factor * max_select)))
        i32 = dict(dtype=torch.int32, device=device)
        self.loc = torch.full((layers, slots, kv_heads, rows), -1, **i32)
        self.tag = torch.full((layers, slots, kv_heads, C), -1, **i32)
        self.stamp = torch.full((layers, slots, kv_heads, C), -1, **i32)
        self.k = alloc((layers, slots, kv_heads, C, head_dim))
        self.v = alloc((layers, slots, kv_heads, C, head_dim))
        self.src = torch.zeros((slots, kv_heads, max_select), **i32)   # one plan at a time (gather stream)
        self.step = torch.zeros((), **i32)
        self.hits = torch.zeros((), dtype=torch.int64, device=device)

    def next_step(self) -> None:
        """A decode step begins (a device add: replayed by the captured graph)."""
        self.step += 1

    def clear(self, slots=slice(None)) -> None:
        """Forget what `slots` hold (a list of slots, or all), in every layer."""
        for t in (self.loc, self.tag, self.stamp):
            t[:, slots] = -1

    def written(self, j: int, token_slot: torch.Tensor, rows: torch.Tensor) -> None:
        """Pool rows `rows[b]` of slots `token_slot[b]` in pooled layer j were (over)written."""
        self.loc[j][token_slot, :, rows] = -1

    def gather(self, j: int, k_pool, v_pool, idx, count, slot_idx, out_k, out_v) -> None:
        """gather_kv of pooled layer j through the resident set."""
        B, _, M = idx.shape
        src = self.ops.plan_reuse(idx, count, slot_idx, self.loc[j], self.tag[j], self.stamp[j], self.step,
                                  self.hits, out_src=self.src[:B, :, :M])
        self.ops.gather_kv(k_pool, v_pool, idx, count, slot_idx, out_k=out_k, out_v=out_v, src=src,
                           cache_k=self.k[j], cache_v=self.v[j])
