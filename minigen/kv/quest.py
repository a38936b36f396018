"""The `quest` policy (Quest, Tang et al., ICML 2024): query-aware page selection, the strongest
selector baseline in the sparse-attention literature. The cache is cut into pages of `page_size`
consecutive tokens; per (layer, slot, KV head, page) the elementwise min and max of the page's keys
bound every query's logit on the page from above:

    q . k  <=  sum_d max(q_d * min_d, q_d * max_d)  =  relu(q) . max + min(q, 0) . min

At decode each KV head scores every full page by that bound (the max over its group's query
heads, for GQA), keeps the best ones within the budget plus the newest page (the page of the last
cached token: 1..P tokens, like a small recent window), and attends over their tokens.

Kept count, for n cached tokens: r = n - P * floor((n - 1) / P) of them in the newest page, k(n)
the budget's count (minigen/kv/budget.py), and floor(max(k - r, 0) / P) full pages: pages * P + r
tokens, at most max(k, r). Pages are whole, so the read is the budget's rounded down to a page,
but never less than the newest page (on short contexts that can be more than the budget; the
fetched fraction reports what was read); the same count for every head and layer, as h2o and window.

Bounds. Prefill (dense attention, as every policy) recomputes the bounds of the pages its new
tokens touch from the cache; a decode step folds its token into its page (a new page starts from
it). The engine's warm-up steps before a CUDA-graph capture fold phantom tokens into pages: their
updates are saved and written back by warmup(False), so a captured run equals an eager one.

Like h2o and window, the whole cache stays on the GPU (this reproduces Quest's accuracy and
attention work, not a memory saving); the bounds add 2 x D values per page (2 / P of the keys).
"""
from __future__ import annotations

import math

import torch

from minigen.config import ModelConfig
from minigen.kv.budget import BudgetKV, kept_count_no_sync

DEFAULT_PAGE = 16   # Quest's page (its "chunk") size


class QuestKV(BudgetKV):
    """Pages with the largest upper bound on the logit, plus the newest page (module docstring)."""

    name = "quest"

    def __init__(self, cfg: ModelConfig, *, dtype, device, ops, budget: float = 0.2, dense_layers: int = 2,
                 page_size: int = DEFAULT_PAGE):
        super().__init__(cfg, dtype=dtype, device=device, ops=ops, budget=budget, dense_layers=dense_layers)
        self.page = page_size
        self._undo: list | None = None

    def _max_kept(self, max_seq_len: int) -> int:
        self.num_pages = math.ceil(max_seq_len / self.page)
        self.max_full = min(self.num_pages, math.ceil(super()._max_kept(max_seq_len) / self.page))  # full pages
        return self.max_full * self.page + self.page                   # their tokens + the newest page

    def allocate(self, num_slots: int, max_seq_len: int) -> None:
        super().allocate(num_slots, max_seq_len)
        S, Hkv, D, Np, dev = num_slots, self.num_kv_heads, self.head_dim, self.num_pages, self.device
        self.idx = torch.zeros((S, Hkv, self.max_kept), dtype=torch.int32, device=dev)
        shape = (self.sparse_layers, S, Hkv, Np, D)
        self.kmin = torch.full(shape, float("inf"), dtype=self.dtype, device=dev)
        self.kmax = torch.full(shape, float("-inf"), dtype=self.dtype, device=dev)
        # constants of the idx layout: entry e of the kept pages is token e % P of page slot e // P
        e = self.arange_m                                                  # (M,) entry
        self._page_of, self._in_page = (e // self.page).clamp(max=self.max_full - 1), e % self.page
        self._page_ids = torch.arange(Np, device=dev)

    def _kept(self, n: torch.Tensor) -> torch.Tensor:
        """The count, and what every sparse layer of the step shares: which pages are candidates,
        and the idx entries of the newest page (after the full pages' kp entries)."""
        P = self.page
        r = torch.where(n > 0, n - P * ((n - 1).clamp(min=0) // P), 0)     # (B,) tokens in the newest page
        full = (kept_count_no_sync(n, self.budget) - r).clamp(min=0) // P  # (B,) full pages kept
        self._candidate = self._page_ids < ((n - r) // P)[:, None, None]   # (B, 1, Np) the full pages
        kp = (full * P)[:, None, None]                                      # (B, 1, 1) full-page entries
        e = self.arange_m
        self._from_page = e < kp                                            # (B, 1, M)
        self._tail = torch.where(e < kp + r[:, None, None], (n - r)[:, None, None] + (e - kp), 0)
        return full * P + r

    def _kept_idx(self, j: int, B: int, q: torch.Tensor) -> torch.Tensor:
        Hkv, G, M = self.num_kv_heads, self.group, self.max_kept
        slots = self.meta.slot_idx.long()
        lo, hi = self.kmin[j][slots].float(), self.kmax[j][slots].float()  # (B, Hkv, Np, D)
        qf = q.float().view(B, Hkv, G, -1)                                # (B, Hkv, G, D)
        bound = (qf.clamp(min=0) @ hi.transpose(-1, -2) + qf.clamp(max=0) @ lo.transpose(-1, -2)).amax(2)
        pages = bound.masked_fill(~self._candidate, float("-inf")).topk(self.max_full, dim=-1).indices
        from_page = pages.gather(-1, self._page_of.expand(B, Hkv, M)) * self.page + self._in_page
        self.idx[:B].copy_(torch.where(self._from_page, from_page, self._tail))
        return self.idx[:B]

    def _decoded(self, j, q, k, idx, sel_k) -> None:
        """Fold the step's token into its page's bounds (a token at a page start opens the page)."""
        meta = self.meta
        slots, pos = meta.token_slot.long(), meta.positions.long()
        page = pos // self.page
        lo, hi = self.kmin[j][slots, :, page], self.kmax[j][slots, :, page]   # (B, Hkv, D)
        if self._undo is not None:   # a warm-up step: keep what it overwrites
            self._undo.append((j, slots.clone(), page.clone(), lo.clone(), hi.clone()))
        first = (pos % self.page == 0)[:, None, None]
        self.kmin[j][slots, :, page] = torch.where(first, k, torch.minimum(lo, k))
        self.kmax[j][slots, :, page] = torch.where(first, k, torch.maximum(hi, k))

    def _prefill_done(self, layer: int, q: torch.Tensor) -> None:
        """The bounds of every page the chunk's new tokens touch, from the cache (which has them now)."""
        meta, P, j = self.meta, self.page, layer - self.dense_layers
        keys = self.dense.k_cache[layer]                                   # (S, Hkv, T, D)
        for slot, n0, n in zip(meta.host_slots, meta.host_start, meta.host_new):
            p0, end = n0 // P, n0 + n
            p1 = math.ceil(end / P)
            kk = keys[slot, :, p0 * P:end]                                 # (Hkv, m, D)
            pad = p1 * P - end
            lo = torch.cat([kk, kk.new_full((kk.shape[0], pad, kk.shape[2]), float("inf"))], 1)
            hi = torch.cat([kk, kk.new_full((kk.shape[0], pad, kk.shape[2]), float("-inf"))], 1)
            H, D = kk.shape[0], kk.shape[2]
            self.kmin[j, slot, :, p0:p1] = lo.view(H, p1 - p0, P, D).amin(2)
            self.kmax[j, slot, :, p0:p1] = hi.view(H, p1 - p0, P, D).amax(2)

    def prefill_state(self, meta) -> list:
        """The bounds of the pages a chunk rewrites: from each sequence's first new token's page on."""
        P = self.page
        return [(t, (slice(None), slot, slice(None), slice(n0 // P, None)))
                for slot, n0 in zip(meta.host_slots, meta.host_start) for t in (self.kmin, self.kmax)]

    def warmup(self, on: bool) -> None:
        """The warm-up steps' bound updates are written back, newest first."""
        if not on and self._undo:
            for j, slots, page, lo, hi in reversed(self._undo):
                self.kmin[j][slots, :, page] = lo
                self.kmax[j][slots, :, page] = hi
        self._undo = [] if on else None
        super().warmup(on)

    def close(self) -> None:
        super().close()
        self.kmin = self.kmax = self.idx = None
