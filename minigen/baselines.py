"""The `h2o` and `window` policies: the sparse-attention baselines InfiniGen is compared against,
on the same axis: a budget = the fraction of a sequence's cached tokens each KV head attends to.

Kept count. With n tokens cached before the current one, each (sequence, KV head) of a sparse
layer attends to k(n) = min(n, ceil(budget * n)) of them (>= 1 once n >= 1) plus the current
token: H2O's ratio form (its reference code sizes the heavy and recent sets as ratios of the
sequence length). budget * n is one float64 product on the host and on the device alike, so the
two always agree on k. Layers < dense_layers attend densely (the paper's baselines keep layers
0-1 full), and prefill is dense everywhere, as in every minigen policy: policies differ at decode.

window (StreamingLLM, Xiao et al. 2024): the first `sinks` tokens (attention sinks) plus the
k - sinks most recent ones. When k <= sinks the budget goes to the first k tokens: the sinks are
what keeps StreamingLLM stable, and the current token is attended in any case. Stateless: the
indices are a formula of seq_lens, recomputed on the device every step.

h2o (Heavy-Hitter Oracle, Zhang et al. 2023): the r = ceil(k/2) most recent tokens plus the
k - r "heavy hitters", the tokens with the largest accumulated attention probability acc (summed
over every query that attended the token and over the query heads of its KV group).
    prefill  per sequence, the probabilities of the chunk's queries (causal; torch, in query
             chunks so an 8K prompt never needs an 8K x 8K x H buffer) are added to
             acc (Lsp, S, Hkv, T), and the kept list is rebuilt: the last r tokens plus the
             top k - r of the others by acc.
    decode   attend over the kept list + the current token; add the step's probabilities to the
             kept tokens' acc; the current token joins (acc = its own probability); if the list
             then holds more than k(n + 1), the kept token with the lowest acc outside the recent
             window is evicted for good. k grows by at most 1 per step: one eviction at most.
A continued prefill (a chat turn, or a prompt longer than the prefill chunk) rebuilds the list
from acc over ALL cached tokens, so a token evicted during decode may come back: the dense
prefill attention just saw every token and added its mass. An evicted token's acc is its mass at
eviction; positions at or past the continued prefill's start (a turn that drops tokens) restart
at 0.

CUDA graphs. The engine captures a decode step after running it twice for warm-up, then rewinds
positions: state updated in place would keep those two phantom steps. So the h2o list (indices
and per-entry acc) of the step at position p lives in ring slot p % 3: a step reads slot p % 3
and writes (p + 1) % 3, so a rewound step reads exactly what it read the first time. Counts are
k(n), a function of seq_lens, computed on the device; no step reads a device value on the host.

Limitations (honest): memory is the whole dense cache (L, S, Hkv, T, D) on the GPU, as DenseKV
(a compacted cache is not implemented): these policies reproduce the baselines' accuracy and
attention work, not their memory savings. h2o computes its probabilities in torch, i.e. one more
q.k over the kept rows per sparse layer and step, and one more causal QK^T per prompt. As for
infinigen, fetched_fraction counts real steps only: warmup puts the counts back after the
capture's two warm-up steps.
"""
from __future__ import annotations

import math

import torch

from minigen.kv import DenseKV, KVPolicy

RING = 3    # h2o list copies: the step at p reads p % 3 and writes (p + 1) % 3 (two warm-up steps)


def kept_count(n: int, budget: float) -> int:
    """Tokens kept out of n cached ones (host ints)."""
    return min(n, math.ceil(budget * n))


def kept_count_no_sync(n: torch.Tensor, budget: float) -> torch.Tensor:
    """kept_count on the device (int64): the same float64 product as on the host."""
    return torch.minimum(n, torch.ceil(n.double() * budget).long())


class _BudgetKV(KVPolicy):
    """Shared part: the dense cache, the budget, the per-step count, gather + sparse attention."""

    graph_safe = True     # a decode step reads only device tensors (see the module docstring)

    def __init__(self, model, *, dtype, device, ops, budget: float = 0.2, dense_layers: int = 2):
        cfg = model.config
        if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0.0 < budget <= 1.0:
            raise ValueError(f"--budget must be in (0, 1], got {budget!r}")
        if isinstance(dense_layers, bool) or not isinstance(dense_layers, int) \
                or not 0 <= dense_layers < cfg.num_layers:
            raise ValueError(f"--dense-layers must be in [0, {cfg.num_layers - 1}] (at least one layer sparse), "
                             f"got {dense_layers!r}")
        self.budget, self.dense_layers = float(budget), dense_layers
        self.num_layers, self.num_kv_heads, self.head_dim = cfg.num_layers, cfg.num_kv_heads, cfg.head_dim
        self.sparse_layers = cfg.num_layers - dense_layers
        self.group, self.sm_scale, self.ops = cfg.group_size, model.sm_scale, ops
        self.dtype, self.device = dtype, torch.device(device)
        # storage and prefill are DenseKV's, for every layer
        self.dense = DenseKV(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, dtype=dtype, device=device,
                             ops=ops, sm_scale=model.sm_scale)
        self._num_kept = torch.zeros((), dtype=torch.int64, device=self.device)     # rows attended
        self._num_cached = torch.zeros((), dtype=torch.int64, device=self.device)   # rows cached

    def allocate(self, num_slots: int, max_seq_len: int) -> None:
        self.dense.allocate(num_slots, max_seq_len)
        S, Hkv, D, dev = num_slots, self.num_kv_heads, self.head_dim, self.device
        # M: k(n) <= ceil(budget * T) for n < T, plus the token h2o adds before it evicts
        self.max_kept = M = math.ceil(self.budget * max_seq_len) + 1
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
        k = kept_count_no_sync(n, self.budget)                        # (B,)
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
        idx, count = self._kept_idx(j, B), self.count[:B]                   # (B, Hkv, M), (B, Hkv)
        sel_k, sel_v = self.ops.gather_kv(kc, vc, idx, count, meta.slot_idx,
                                          out_k=self.sel_k[:B], out_v=self.sel_v[:B])
        out = self.ops.sparse_attention(q, sel_k, sel_v, count, k, v, self.sm_scale)
        self._decoded(j, q, k, idx, sel_k)
        return out

    # subclass hooks
    def _plan(self, n: torch.Tensor, k: torch.Tensor) -> None:
        """Per-step state from n, k (B,) int64 (decode, in begin)."""

    def _kept_idx(self, j: int, B: int) -> torch.Tensor:
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


class WindowKV(_BudgetKV):
    """StreamingLLM: attention sinks + a recent window (see the module docstring)."""

    name = "window"

    def __init__(self, model, *, dtype, device, ops, budget: float = 0.2, sinks: int = 4, dense_layers: int = 2):
        if isinstance(sinks, bool) or not isinstance(sinks, int) or sinks < 0:
            raise ValueError(f"--sinks must be an integer >= 0, got {sinks!r}")
        super().__init__(model, dtype=dtype, device=device, ops=ops, budget=budget, dense_layers=dense_layers)
        self.sinks = sinks

    def allocate(self, num_slots: int, max_seq_len: int) -> None:
        super().allocate(num_slots, max_seq_len)
        self.idx = torch.zeros((num_slots, self.num_kv_heads, self.max_kept), dtype=torch.int32, device=self.device)

    def _plan(self, n, k):
        B, j = n.shape[0], self.arange_m                                     # j: (M,)
        s = k.clamp(max=self.sinks)[:, None]                                  # (B, 1) sinks kept
        # entry j < s: token j; entry j in [s, k): token n - k + j (the last k - s); past k: unread
        idx = torch.where(j < s, j, (n - k)[:, None] + j)                    # (B, M)
        self.idx[:B].copy_(idx[:, None].expand(B, self.num_kv_heads, -1))   # same for every head

    def _kept_idx(self, j, B):
        return self.idx[:B]


class H2OKV(_BudgetKV):
    """Heavy hitters + a recent window, evicting by accumulated attention (module docstring)."""

    name = "h2o"

    def allocate(self, num_slots: int, max_seq_len: int) -> None:
        super().allocate(num_slots, max_seq_len)
        Lsp, S, Hkv, M, dev = self.sparse_layers, num_slots, self.num_kv_heads, self.max_kept, self.device
        # the kept list of the step at position p, in ring slot p % RING: token indices, their acc
        self.ring_idx = torch.zeros((Lsp, S, RING, Hkv, M), dtype=torch.int32, device=dev)
        self.ring_acc = torch.zeros((Lsp, S, RING, Hkv, M), dtype=torch.float32, device=dev)
        # every cached token's acc, for prefill rebuilds; column T is a bin for masked writes
        self.acc = torch.zeros((Lsp, S, Hkv, max_seq_len + 1), dtype=torch.float32, device=dev)
        self.last_pos = torch.full((S,), -1, dtype=torch.int64, device=dev)   # last token processed
        self.heads = torch.arange(Hkv, device=dev)

    def begin(self, meta) -> None:
        self._slots = meta.slot_idx.long()
        if meta.is_prefill:
            # the newest list of each sequence is at ring (prev + 1) % RING: a continued prefill folds it
            self._prev_last = self.last_pos[self._slots]
            self.last_pos[self._slots] = meta.seq_lens.long() - 1
        super().begin(meta)

    # -- decode ---------------------------------------------------------------------------------
    def _plan(self, n, k):
        k_next = kept_count_no_sync(n + 1, self.budget)                        # after the token joins
        self._evict = (k + 1 > k_next)[:, None, None]                          # (B, 1, 1)
        self._join_at = k[:, None, None]                                       # (B, 1, 1) free entry
        self._recent = (n + 1 - (k_next + 1) // 2)[:, None, None]              # first protected position
        self._valid = (self.arange_m < k[:, None])[:, None]                    # (B, 1, M) live entries
        self._rd, self._wr = n % RING, (n + 1) % RING
        self.last_pos[self.meta.token_slot] = self.meta.positions

    def _kept_idx(self, j, B):
        return self.ring_idx[j][self._slots, self._rd]                         # (B, Hkv, M) int32

    def _decoded(self, j, q, k, idx, sel_k):
        """Accumulate this step's probabilities, let the current token join, evict at most one."""
        meta, slots = self.meta, self._slots
        B, Hkv, G, D, M = q.shape[0], self.num_kv_heads, self.group, self.head_dim, self.max_kept
        qf = q.float().reshape(B, Hkv, G, D)
        s = (qf @ sel_k.float().transpose(-1, -2)) * self.sm_scale             # (B, Hkv, G, M)
        s = s.masked_fill(~self._valid[:, :, None], float("-inf"))             # stale rows (maybe NaN) out
        s_cur = (qf * k.float()[:, :, None]).sum(-1, keepdim=True) * self.sm_scale   # (B, Hkv, G, 1)
        p = torch.cat([s, s_cur], -1).softmax(-1).sum(2)                       # (B, Hkv, M + 1) over the group
        p_cur = p[..., M:]                                                     # (B, Hkv, 1)
        acc = self.ring_acc[j][slots, self._rd] + p[..., :M]                   # (B, Hkv, M)
        # victim: the lowest acc among live entries older than the recent window
        protected = ~self._valid | (idx >= self._recent)
        victim = acc.masked_fill(protected, float("inf")).argmin(-1, keepdim=True)   # (B, Hkv, 1)
        at = torch.where(self._evict, victim, self._join_at)                   # entry the new token takes
        pos = meta.positions[:, None, None]                                    # (B, 1, 1)
        # keep acc whole for prefill rebuilds: the victim's final mass, else the new token's
        tgt = torch.where(self._evict, idx.gather(-1, victim).long(), pos)
        val = torch.where(self._evict, acc.gather(-1, victim), p_cur)
        self.acc[j][slots[:, None, None], self.heads[None, :, None], tgt] = val
        self.ring_idx[j][slots, self._wr] = idx.scatter(-1, at, pos.to(torch.int32).expand(B, Hkv, 1))
        self.ring_acc[j][slots, self._wr] = acc.scatter(-1, at, p_cur)

    # -- prefill --------------------------------------------------------------------------------
    def _prefill_done(self, layer, q):
        meta, j = self.meta, layer - self.dense_layers
        self._fold(j)
        kc, start = self.dense.k_cache[layer], 0
        for slot, n0, n in zip(meta.host_slots, meta.host_start, meta.host_new):
            A = self.acc[j, slot]                                              # (Hkv, T + 1)
            A[:, n0:].zero_()        # new tokens (and any a chat turn dropped) start from nothing
            self._add_prefill_probs(A, q[start:start + n], kc[slot], n0)
            self._rebuild(j, slot, n0 + n)
            start += n

    def _fold(self, j: int) -> None:
        """A continued sequence's newest kept list carries its decode-time acc: copy it into acc.
        Dead entries write to the bin column T; positions >= the chunk's start (all of them for
        a new sequence) are zeroed right after, in _prefill_done."""
        slots, T = self._slots, self.acc.shape[-1] - 1
        r = (self._prev_last + 1) % RING
        rows, accs = self.ring_idx[j][slots, r], self.ring_acc[j][slots, r]    # (B, Hkv, M)
        live = self.arange_m < kept_count_no_sync(self._prev_last + 1, self.budget)[:, None]   # (B, M)
        tgt = torch.where(live[:, None], rows.long(), T)
        self.acc[j][slots[:, None, None], self.heads[None, :, None], tgt] = accs

    def _add_prefill_probs(self, A: torch.Tensor, q: torch.Tensor, keys: torch.Tensor, n0: int) -> None:
        """A[:, t] += sum over the new queries (and the group) of softmax(q.k)[t], causal.
        q (n, H, D) for positions n0..n0+n-1, keys (Hkv, T, D) the slot's cache."""
        n, Hkv, G, D = q.shape[0], self.num_kv_heads, self.group, self.head_dim
        total = n0 + n
        kf = keys[:, None, :total].float()                                     # (Hkv, 1, total, D)
        t = torch.arange(total, device=q.device)
        # <= 16 MiB of fp32 scores per chunk on the CPU, 256 MiB on a GPU (fewer, larger launches)
        chunk = max(1, (2**26 if q.is_cuda else 2**22) // (Hkv * G * total))
        for c0 in range(0, n, chunk):
            qc = q[c0:c0 + chunk].float()
            c = qc.shape[0]
            qc = qc.reshape(c, Hkv, G, D).permute(1, 2, 0, 3)                   # (Hkv, G, c, D)
            s = (qc @ kf.transpose(-1, -2)) * self.sm_scale                    # (Hkv, G, c, total)
            future = t > (n0 + c0 + torch.arange(c, device=q.device))[:, None]   # (c, total)
            A[:, :total] += s.masked_fill(future, float("-inf")).softmax(-1).sum((1, 2))

    def _rebuild(self, j: int, slot: int, n: int) -> None:
        """The kept list for the next step (n tokens cached): last r tokens + top k - r by acc."""
        k = kept_count(n, self.budget)
        r = (k + 1) // 2
        A = self.acc[j, slot, :, :n]                                           # (Hkv, n)
        heavy = A[:, :n - r].topk(k - r, dim=-1).indices                       # (Hkv, k - r)
        recent = torch.arange(n - r, n, device=A.device).expand(self.num_kv_heads, r)
        idx = torch.cat([heavy, recent], -1)                                   # (Hkv, k)
        self.ring_idx[j, slot, n % RING, :, :k] = idx.to(torch.int32)
        self.ring_acc[j, slot, n % RING, :, :k] = A.gather(-1, idx)

    def close(self) -> None:
        super().close()
        self.ring_idx = self.ring_acc = self.acc = None
