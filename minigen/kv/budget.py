"""What the `h2o`, `window` and `quest` policies share (minigen/kv/h2o.py, window.py, quest.py), the sparse-attention
baselines InfiniGen is compared against on the same axis: a budget, the fraction of a sequence's
cached tokens each KV head attends to.

Kept count. With n tokens cached before the current one, each (sequence, KV head) of a sparse
layer attends to k(n) = min(n, ceil(budget * n)) of them (>= 1 once n >= 1) plus the current
token (quest rounds it to whole pages: see quest.py): H2O's ratio form (its reference code sizes the heavy and recent sets as ratios of the
sequence length). budget * n is one float64 product on the host and on the device alike, so the
two always agree on k. Layers < dense_layers attend densely (the paper's baselines keep layers
0-1 full), and prefill is dense everywhere, as in every minigen policy: policies differ at decode.

Limitations (honest): memory is the whole dense cache (L, S, Hkv, T, D) on the GPU, as DenseKV
(a compacted cache is not implemented): both policies reproduce the baselines' accuracy and
attention work, not their memory savings (the same for quest). As for infinigen, fetched_fraction counts real steps
only: warmup puts the counts back after the capture's two warm-up steps.
"""
from __future__ import annotations

import math

import torch

from minigen.config import ModelConfig
from minigen.kv.base import KVPolicy
from minigen.kv.dense import DenseKV

def kept_count(n: int, budget: float) -> int:
    """Tokens kept out of n cached ones (host ints)."""
    return min(n, math.ceil(budget * n))


def kept_count_no_sync(n: torch.Tensor, budget: float) -> torch.Tensor:
    """kept_count on the device (int64): the same float64 product as on the host."""
    return torch.minimum(n, torch.ceil(n.double() * budget).long())


class BudgetKV(KVPolicy):
    """Shared part: the dense cache, the budget, the per-step count, gather + sparse attention."""

    graph_safe = True     # a decode step reads only device tensors (see the module docstring)

    def __init__(self, cfg: ModelConfig, *, dtype, device, ops, budget: float = 0.2, dense_layers: int = 2):
        if isinstance(dense_layers, bool) or not isinstance(dense_layers, int) \
                or not 0 <= dense_layers < cfg.num_layers:
            raise ValueError(f"--dense-layers must be in [0, {cfg.num_layers - 1}] (at least one layer sparse), "
                             f"got {dense_layers!r}")
        self.budget, self.dense_layers = float(budget), dense_layers
        self.num_layers, self.num_kv_heads, self.head_dim = cfg.num_layers, cfg.num_kv_heads, cfg.head_dim
        self.sparse_layers = cfg.num_layers - dense_layers
        self.group, self.sm_scale, self.ops = cfg.group_size, cfg.sm_scale, ops
        self.dtype, self.device = dtype, torch.device(device)
        # storage and prefill are DenseKV's, for every layer
        self.dense = DenseKV(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, dtype=dtype, device=device,
                             ops=ops, sm_scale=cfg.sm_scale)
        self._num_kept = torch.zeros((), dtype=torch.int64, device=self.device)     # rows attended
        self._num_cached = torch.zeros((), dtype=torch.int64, device=self.device)   # rows cached

    def allocate(self, num_slots: int, max_seq_len: int) -> None:
        self.dense.allocate(num_slots, max_seq_len)
        S, Hkv, D, dev = num_slots, self.num_kv_heads, self.head_dim, self.device
        self.max_kept = M = self._max_kept(max_seq_len)
        try:
            self.sel_k = torch.empty((S, Hkv, M, D), dtype=self.dtype, device=dev)   # gathered rows
            self.sel_v = torch.empty((S, Hkv, M, D), dtype=self.dtype, device=dev)
        except torch.OutOfMemoryError:
            raise torch.OutOfMemoryError(f"the gathered-KV buffers ({S} x {Hkv} x {M} rows) do not fit on {dev}; "
                                         f"lower --budget, the batch or --max-seq-len") from None
        self.count = torch.zeros((S, Hkv), dtype=torch.int32, device=dev)
        self.arange_m = torch.arange(M, device=dev)

    @property
    def capacity(self) -> int:
        return self.dense.capacity

    def begin(self, meta) -> None:
        self.meta = meta
        self.dense.begin(meta)
        if meta.is_prefill:
            return
        # the same for every sparse layer of this step: built once
        B, Hkv = meta.num_seqs, self.num_kv_heads
        n = meta.seq_lens.long() - 1                                  # (B,) cached before this token
        k = self._kept(n)                                             # (B,)
        self.count[:B].copy_(k[:, None].expand(B, Hkv))
        self._num_kept += k.sum() * (Hkv * self.sparse_layers)
        self._num_cached += n.sum() * (Hkv * self.sparse_layers)
        self._plan(n, k)

    def attend(self, layer, q, k, v):
        meta = self.meta
        if layer < self.dense_layers or meta.is_prefill:
            out = self.dense.attend(layer, q, k, v)
            if meta.is_prefill and layer >= self.dense_layers:
                self._prefill_done(layer, q)
            return out
        B, j = q.shape[0], layer - self.dense_layers
        kc, vc = self.dense.store(layer, k, v)                              # the cache stays whole
        idx, count = self._kept_idx(j, B, q), self.count[:B]                # (B, Hkv, M), (B, Hkv)
        sel_k, sel_v = self.ops.gather_kv(kc, vc, idx, count, meta.slot_idx,
                                          out_k=self.sel_k[:B], out_v=self.sel_v[:B])
        out = self.ops.sparse_attention(q, sel_k, sel_v, count, k, v, self.sm_scale)
        self._decoded(j, q, k, idx, sel_k)
        return out

    # subclass hooks
    def _max_kept(self, max_seq_len: int) -> int:
        """Rows a step can keep: k(n) <= ceil(budget * T) for n < T, plus the token h2o adds before it evicts."""
        return math.ceil(self.budget * max_seq_len) + 1

    def _kept(self, n: torch.Tensor) -> torch.Tensor:
        """Tokens each sequence attends to out of n (B,) int64 cached ones: the budget's count."""
        return kept_count_no_sync(n, self.budget)

    def _plan(self, n: torch.Tensor, k: torch.Tensor) -> None:
        """Per-step state from n, k (B,) int64 (decode, in begin)."""

    def _kept_idx(self, j: int, B: int, q: torch.Tensor) -> torch.Tensor:
        """(B, Hkv, M) token indices sparse layer j attends to (the first count of them), given the
        step's queries q (B, H, D)."""
        raise NotImplementedError

    def _decoded(self, j, q, k, idx, sel_k) -> None:
        """After sparse layer j's decode attention."""

    def _prefill_done(self, layer: int, q: torch.Tensor) -> None:
        """After a sparse layer's prefill attention (the new K/V are in the cache)."""

    def warm_state(self) -> tuple:
        return self._num_cached, self._num_kept     # fetched_fraction counts real steps only

    def stats(self) -> dict:
        total = int(self._num_cached.item())       # sync: stats are read after a run, not in a step
        kept = int(self._num_kept.item())          # sync: the same
        return {"fetched_fraction": kept / total if total else 0.0,
                "kv_budget": self.budget}

    def close(self) -> None:
        self.dense.close()
        self.sel_k = self.sel_v = None
