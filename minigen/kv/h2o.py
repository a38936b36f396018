"""The `h2o` policy (Heavy-Hitter Oracle, Zhang et al. 2023): of the k tokens the budget keeps
(minigen/kv/budget.py), the r = ceil(k/2) most recent tokens plus the k - r "heavy hitters": the
tokens with the largest accumulated attention probability acc (summed over every query that
attended the token and over the query heads of its KV group).
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

Cost: the probabilities are computed in torch, i.e. one more q.k over the kept rows per sparse
layer and step, and one more causal QK^T per prompt.
"""
from __future__ import annotations

import torch

from minigen.kv.budget import BudgetKV, kept_count, kept_count_no_sync

RING = 3    # list copies: the step at p reads p % 3 and writes (p + 1) % 3 (two warm-up steps)


class H2OKV(BudgetKV):
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

    def prefill_state(self, meta) -> list:
        """Each prefilling sequence's accumulated attention, kept lists and last position."""
        slots = meta.slot_idx.long()
        return [(self.acc, (slice(None), slots)), (self.ring_idx, (slice(None), slots)),
                (self.ring_acc, (slice(None), slots)), (self.last_pos, (slots,))]

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

    def _kept_idx(self, j, B, q):
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
