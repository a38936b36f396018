"""The `infinigen` policy: KV in pinned host memory, and per decode step only the tokens that the
next layer will attend to are fetched (Lee et al., OSDI 2024).

Per layer i >= dense_layers ("pooled" layers), per decode step:
    speculate   at layer i-1 (pre_attention hook), on the speculation stream:
                  q    = RoPE(norm_i(x_{i-1}) W_q^(i))                  (B, H, D)
                         queries from the residual x_{i-1} entering layer i-1, through layer
                         i's own input norm (its gain differs from layer i-1's: using layer
                         i-1's normalized input instead costs accuracy, measured)
                  s    = (q . skew[:, sel] / sqrt(D)) . pk_i            (B, H, T)  partial_qk kernel
                         (the projection on the R kept skew columns happens inside the kernel)
                  idx  = {t : max over the KV head's group of s - rowmax > -alpha}, at most
                         ceil(budget * n) per (sequence, KV head)       select kernel
                         plus the last min(recent, cap // 2) cached tokens, ranked first
                         (always fetched, inside the cap; see DEFAULT_RECENT)
    gather      on the gather stream, after layer i's speculation (so it overlaps layer i+1's):
                  K,V  = pool_i[slot, idx]  straight from pinned memory gather_kv kernel
    attend      at layer i, main waits on the gather stream's event, then attends over the
                gathered rows plus the current token (sparse_attention kernel), writes the new
                token's K/V to the pool (append_kv) and its partial key to pk_i.
Layers < dense_layers keep their whole KV on the GPU (DenseKV): layer 0 has no earlier layer to
speculate from and its attention is nearly dense.

Skewing (minigen/kv/skew.py) makes a few columns of q and k carry most of q.k; `sel` picks R of them
per (sequence, KV head) at prefill from the prompt's |q| + |k| column sums (over all of its
prefill chunks). For OPT the skew is folded into W_q/W_k, so the columns are read off directly
(identity here).

GPU state per pooled layer: pk (S, Hkv, R, T) partial keys (token-minor: one contiguous run of
tokens per column, the token stride padded to 16 elements), a_sel (S, Hkv, D, R) the skew's
selected columns, col_score (S, Hkv, D) fp32 the prompt's column sums behind them, plus
double-buffered idx/count/K/V for the gathered rows.

Reuse (reuse > 0, minigen/kv/reuse.py): a GPU-resident set of recently fetched rows per (pooled
layer, slot, KV head); the gather reads the selected rows that are resident from there and fetches
only the others over PCIe. The gathered rows, so the attention, are the same bits either way.
The prompt's columns and partial keys: minigen/kv/partial_keys.py.

Host-memory limit (cpu_kv_limit, paper section 5): the pool and pk then hold P < T rows per
(layer, slot), indexed by row; minigen/kv/eviction.py says which rows a prompt keeps and which row
each new token overwrites (RowEviction: counter and row_pos (Lp, S, P) on the GPU).

Names: `layer` is a model layer, `j = layer - dense_layers` the pooled layer (the pool's index),
`x` the residual stream entering a layer.
"""
from __future__ import annotations

import math

import torch

from minigen.config import ModelConfig
from minigen.kernels.partial_qk import token_stride
from minigen.kv.dense import DenseKV
from minigen.kv.eviction import HostLimit, RowEviction, host_limit
from minigen.kv.partial_keys import PrefillColumns
from minigen.kv.pool import PooledKV
from minigen.kv.reuse import ResidentRows

# Defaults: each KV head's top 4.9% by speculated logit (under 5% read from 8K tokens on), no
# threshold: at the same read that beat the artifact's alpha 5 / 4 on both real models (docs/design.md)
DEFAULT_ALPHA, DEFAULT_BUDGET = math.inf, 0.049
# The last cached tokens always fetched (at most half the cap), which the paper does not do:
# speculation ranks the newest tokens poorly while the next layers attend to them (docs/design.md).
# 0 reproduces the paper; a --cpu-kv-limit pool (rows reused) runs without it.
DEFAULT_RECENT = 64


def default_partial_ratio(head_dim: int) -> float:
    """Skewed columns kept per head, as a fraction of D: half of them. The artifact's 0.2 scores too
    coarsely on both real models: with D = 64 (the default model) 12 columns miss the few tokens
    passkey retrieval copies, 32 find them; with D = 128 (Qwen2.5-1.5B) RULER at 8K drops several
    points with 25 columns and not with 64 (docs/design.md, docs/results.md)."""
    return 0.5


class InfiniGenKV(PrefillColumns, HostLimit, PooledKV):
    name = "infinigen"
    graph_safe = True     # the decode step reads only device tensors: capturable, streams and all
    # CUDA priority of the speculation and gather streams (lower = higher, main is 0): their kernels
    # are on the step's critical path, so the block scheduler should place them first
    side_priority = -1

    def __init__(self, cfg: ModelConfig, *, project_q, dtype, device, ops, alpha: float | None = None,
                 budget: float = DEFAULT_BUDGET, partial_ratio: float | None = None, dense_layers: int = 2,
                 recent: int | None = None, skew=None, cpu_kv_limit: int | float | str | None = None,
                 evict: str | None = None, evict_window: int = 64, reuse: float = 0.0):
        """project_q(layer, x, positions) -> that layer's post-RoPE queries (N, H, D) for the
        residual stream x (N, C): the model's, handed in by the engine (speculation needs it)."""
        super().__init__(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, dtype=dtype, device=device,
                         ops=ops, sm_scale=cfg.sm_scale)
        if not 1 <= dense_layers < cfg.num_layers:
            raise ValueError(f"--dense-layers must be in [1, {cfg.num_layers - 1}] (layer 0 has nothing to "
                             f"speculate from), got {dense_layers}")
        # the settings' own ranges: minigen.kv.check_policy_opts (make_policy runs it)
        if partial_ratio is None:
            partial_ratio = default_partial_ratio(cfg.head_dim)
        self.alpha = DEFAULT_ALPHA if alpha is None else alpha
        self.budget, self.dense_layers = budget, dense_layers
        self.cpu_kv_limit, self.evict, self.evict_window = host_limit(cpu_kv_limit, evict, evict_window, recent)
        self.recent = recent if recent is not None else 0 if self.cpu_kv_limit is not None else DEFAULT_RECENT
        self.evictor: RowEviction | None = None   # set by allocate: a limit below the slot capacity
        self.reuse_factor, self.reuse = reuse, None   # resident rows per head / cap (minigen/kv/reuse.py)
        self.R = max(1, int(cfg.head_dim * partial_ratio))
        self.group, self.project_q, self.pool_layers = cfg.group_size, project_q, cfg.num_layers - dense_layers
        self.dense = DenseKV(dense_layers, cfg.num_kv_heads, cfg.head_dim, dtype=dtype, device=device,
                             ops=ops, sm_scale=cfg.sm_scale)
        D, Hkv = cfg.head_dim, cfg.num_kv_heads
        if skew is None or skew.folded:   # OPT folded (or no skew): columns read off directly
            eye = torch.eye(D, dtype=torch.float32, device=self.device)
            self.skew = eye.expand(cfg.num_layers, Hkv, D, D)
        else:
            self.skew = skew.matrices.to(self.device, torch.float32)        # (L, Hkv, D, D)
        self._num_fetched = torch.zeros((), dtype=torch.int64, device=self.device)     # rows gathered
        self._num_candidates = torch.zeros((), dtype=torch.int64, device=self.device)  # rows cached
        self._x_keep: dict[int, torch.Tensor] = {}
        self._undo: list | None = None   # during the engine's warm-up steps: what they overwrote

    # -- allocation -----------------------------------------------------------------------------
    def allocate(self, num_slots: int, max_seq_len: int) -> None:
        self.dense.allocate(num_slots, max_seq_len)
        P = self._pool_rows(num_slots, max_seq_len)
        self.rows = P
        self.whole_prompt_over = P if P < max_seq_len else None
        self._alloc_pool(num_slots, P)
        self._capacity = max_seq_len       # tokens a sequence may reach (the pool keeps P of them)
        self.prefill_k = self._gpu((num_slots, max_seq_len, self.num_kv_heads, self.head_dim))   # prefill staging
        self.prefill_v = self._gpu(self.prefill_k.shape)
        Lp, S, Hkv, D, R, dev = self.pool_layers, num_slots, self.num_kv_heads, self.head_dim, self.R, self.device
        # partial key cache, by row, token-minor; a token stride of a multiple of 16 elements keeps
        # every column's run 16-byte aligned for partial_qk's vector loads
        self.pk = self._gpu((Lp, S, Hkv, R, token_stride(P)))[..., :P]
        self.a_sel = self._gpu((Lp, S, Hkv, D, R))                             # skew columns in use
        # each sequence's column scores summed over its prompt so far (the choice behind a_sel)
        self.col_score = torch.zeros((Lp, S, Hkv, D), dtype=torch.float32, device=dev)
        self.max_select = max(1, min(P, math.ceil(self.budget * P)))
        if P < max_seq_len:   # rows are reused: counters and positions per row
            self.evictor = RowEviction(Lp, S, P, capacity=max_seq_len, window=self.evict_window,
                                       rule=self.evict, device=dev)
        self.sel_k = self._gpu((2, S, Hkv, self.max_select, D))               # gathered rows, by parity
        self.sel_v = self._gpu((2, S, Hkv, self.max_select, D))
        self.idx = torch.zeros((2, S, Hkv, self.max_select), dtype=torch.int32, device=dev)
        self.count = torch.zeros((2, S, Hkv), dtype=torch.int32, device=dev)
        if self.reuse_factor:
            self.reuse = ResidentRows(self.reuse_factor, layers=Lp, slots=S, kv_heads=Hkv, rows=P, head_dim=D,
                                      max_select=self.max_select, dtype=self.dtype, device=dev, ops=self.ops,
                                      alloc=self._gpu)
        if self.is_cuda:
            self.side = torch.cuda.Stream(self.device, priority=self.side_priority)            # speculation
            self.gather_stream = torch.cuda.Stream(self.device, priority=self.side_priority)   # PCIe gathers
            self.spec_done = [torch.cuda.Event() for _ in range(self.num_layers)]
            self.x_ready = [torch.cuda.Event() for _ in range(self.num_layers)]
            self.ready = [torch.cuda.Event() for _ in range(self.num_layers)]

    def begin(self, meta) -> None:
        super().begin(meta)
        self.dense.begin(meta)
        if meta.is_prefill:
            if self.evictor:
                self.evictor.plan_prefill(meta)
            if self.reuse:   # the pool rows of these sequences are written: their resident rows go
                self.reuse.clear(list(meta.host_slots))
            return
        if self.reuse:
            self.reuse.next_step()
        # the same for every pooled layer of this step: built (and counted) once, not per layer
        self._n_valid = torch.clamp(meta.seq_lens - 1, max=self.rows)            # cached rows, all live
        # rows scored and rows a selection can hold: all on CUDA (fixed shapes for the graph); on the
        # CPU the live ones, from the host lengths (the cap grows with n: ceil(budget * n) <= M)
        self._live, self._m = self.rows, self.max_select
        if not self.is_cuda:
            self._live = max(1, min(self.rows, max(meta.host_start)))
            self._m = min(self.max_select, math.ceil(self.budget * self._live) + 1)
        self._num_candidates += self._n_valid.sum() * (self.num_kv_heads * self.pool_layers)

    # -- speculation: runs at layer i-1 for layer i ----------------------------------------------
    def pre_attention(self, layer: int, x: torch.Tensor) -> None:
        """Speculate layer+1 from the residual x entering this layer, then gather its rows.
        Two side streams, so that layer i's gather (PCIe-bound) overlaps layer i+1's speculation
        (compute): main -> spec stream (h_ready) -> gather stream (spec_done) -> main (ready)."""
        nxt = layer + 1
        if self.meta.is_prefill or nxt < self.dense_layers or nxt >= self.num_layers:
            return
        if not self.is_cuda:
            self._speculate(nxt, x)
            self._gather(nxt)
            return
        main = torch.cuda.current_stream(self.device)
        self.x_ready[nxt].record(main)            # spec waits: x and the previous step's writes
        self.side.wait_event(self.x_ready[nxt])
        # x was allocated on main: hold a reference so its memory cannot be reused while the side
        # stream reads it (works under CUDA-graph capture too, where record_stream does not)
        self._x_keep[nxt] = x
        with torch.cuda.stream(self.side):
            self._speculate(nxt, x)
        self.spec_done[nxt].record(self.side)     # gather waits: idx/count of layer nxt written
        self.gather_stream.wait_event(self.spec_done[nxt])
        with torch.cuda.stream(self.gather_stream):
            self._gather(nxt)
        self.ready[nxt].record(self.gather_stream)   # main waits on it in attend(nxt)

    def _speculate(self, layer: int, x: torch.Tensor) -> None:
        meta, ops, j, buf = self.meta, self.ops, layer - self.dense_layers, layer % 2
        B, G = x.shape[0], self.group
        q = self.project_q(layer, x, meta.positions)                           # (B, H, D) post-RoPE
        n_valid = self._n_valid                                                # (B,) from begin
        # projected on the kept skew columns and scaled like the real attention logits inside the
        # kernel, so alpha is a gap in logit units (as in the paper)
        scores = ops.partial_qk(q, self.a_sel[j], self.pk[j][..., :self._live], n_valid, meta.slot_idx,
                                self.sm_scale)                                 # (B, H, P) fp32
        idx, count = ops.select(scores, n_valid, self.alpha, self.budget, G, self._m,
                                out_idx=self.idx[buf, :B, :, :self._m], out_count=self.count[buf, :B],
                                total=self._num_fetched, recent=self.recent)   # counts rows fetched
        if self.evictor:
            self.evictor.count_selected(j, meta, idx, count)

    def _gather(self, layer: int) -> None:
        """The layer's selected K/V rows from the pinned pool into sel_k/sel_v[layer % 2]."""
        meta, j, buf, B, M = self.meta, layer - self.dense_layers, layer % 2, self.meta.num_seqs, self._m
        args = (*self.pool.heads(j), self.idx[buf, :B, :, :M], self.count[buf, :B], meta.slot_idx)
        out = dict(out_k=self.sel_k[buf, :B, :, :M], out_v=self.sel_v[buf, :B, :, :M])
        if self.reuse:   # only the rows not already resident cross PCIe
            self.reuse.gather(j, *args, **out)
        else:
            self.ops.gather_kv(*args, **out)

    # -- attention ------------------------------------------------------------------------------
    def attend(self, layer, q, k, v):
        if layer < self.dense_layers:
            return self.dense.attend(layer, q, k, v)
        meta, j, buf = self.meta, layer - self.dense_layers, layer % 2
        if meta.is_prefill:   # attention first: it stages each sequence's earlier keys on the GPU
            out = self._prefill_attend_limited(j, q, k, v) if self.evictor else self.prefill_attend(j, q, k, v)
            self._prefill_partial_keys(layer, q, k)
            return out
        B = q.shape[0]
        if self.is_cuda:
            torch.cuda.current_stream(self.device).wait_event(self.ready[layer])  # main waits: rows gathered
        # the current token's partial key joins the partial cache for later steps
        pk_cur = torch.einsum("bgd,bgdr->bgr", k, self.a_sel[j, meta.token_slot].to(k.dtype))  # (B, Hkv, R)
        rows = self._decode_rows(j)                                            # (B,) int64
        if self._undo is not None:   # a warm-up step on a limited pool: keep the rows it overwrites
            self._undo.append(self._saved_rows(j, rows))
        self.pk[j][meta.token_slot, :, :, rows] = pk_cur
        out = self.ops.sparse_attention(q, self.sel_k[buf, :B, :, :self._m], self.sel_v[buf, :B, :, :self._m],
                                        self.count[buf, :B], k, v, self.sm_scale)
        self.ops.append_kv(k, v, self.pool.k[j], self.pool.v[j], meta.token_slot, rows)
        if self.evictor:
            self.evictor.took_rows(j, meta, rows)
        if self.reuse:
            self.reuse.written(j, meta.token_slot, rows)
        return out

    def warmup(self, on: bool) -> None:
        """The engine's warm-up steps before a capture leave no trace: on a full limited pool each
        overwrites a victim row per layer and sequence, saved here (K/V, partial keys) and written
        back newest first with the counters and row positions; every pool puts back its fetch
        counters. Device work only, on the engine's warm-up stream."""
        if not on and self._undo:
            for j, slot, rows, k, v, pk in reversed(self._undo):   # newest first: a row hit twice ends as it was
                self.ops.append_kv(k, v, self.pool.k[j], self.pool.v[j], slot, rows)
                self.pk[j][slot, :, :, rows] = pk
        self._undo = [] if on and self.evictor else None
        if not on and self.reuse:   # the warm-up's fetches are not counted, nor are its resident rows kept
            self.reuse.clear()
        super().warmup(on)                           # counters, row positions, fetch counts

    def prefill_state(self, meta) -> list:
        """Column scores and columns, a limited pool's rows. Not the earlier tokens' partial keys an
        interrupted prompt-ending chunk rewrote: the next one rewrites them before a decode reads them."""
        at = (slice(None), meta.slot_idx.long())                              # [:, slots]
        rows = [(t, at) for t in self.evictor.warm_state()] if self.evictor else []
        return [(self.col_score, at), (self.a_sel, at)] + rows

    def warm_state(self) -> tuple:
        stats = (self._num_fetched, self._num_candidates)   # fetched_fraction counts real steps only
        stats += (self.reuse.hits,) if self.reuse else ()
        return stats + (self.evictor.warm_state() if self.evictor else ())

    def stats(self) -> dict:
        total = int(self._num_candidates.item())   # sync: stats are read after a run, not in a step
        fetched = int(self._num_fetched.item())    # sync: the same
        hits = int(self.reuse.hits.item()) if self.reuse else 0   # sync: the same
        row = 2 * self.head_dim * self.dtype.itemsize                # K and V of one head
        return {"fetched_fraction": fetched / total if total else 0.0, "pcie_bytes": (fetched - hits) * row,
                **({"reuse_hit_rate": hits / fetched if fetched else 0.0} if self.reuse else {}),
                "host_pool_gib": self.pool.nbytes / 2**30 if self.pool else 0.0,
                "host_kv_tokens": self.rows if self.pool else 0}

    def close(self) -> None:
        super().close()
        self.dense.close()
        self.pk = self.a_sel = self.col_score = self.sel_k = self.sel_v = None
        self.evictor = self.reuse = None
