"""The `infinigen` policy: KV in pinned host memory, and per decode step only the tokens that the
next layer will attend to are fetched (Lee et al., OSDI 2024).

Per layer i >= dense_layers ("pooled" layers), per decode step:
    speculate   at layer i-1 (pre_attention hook), on the side stream:
                  q~   = skew(RoPE(h_{i-1} W_q^(i)))[:, sel] / sqrt(D)  (B, H, R)  partial queries
                  s    = q~ . pk_i                                      (B, H, T)  partial_qk kernel
                  idx  = {t : max over the KV head's group of s - rowmax > -alpha}, at most
                         ceil(budget * n) per (sequence, KV head)       select kernel
                  K,V  = pool_i[slot, idx]  straight from pinned memory gather_kv kernel
    attend      at layer i, main waits on the side stream's event, then attends over the
                gathered rows plus the current token (sparse_attention kernel), writes the new
                token's K/V to the pool (append_kv) and its partial key to pk_i.
Layers < dense_layers keep their whole KV on the GPU (DenseKV): layer 0 has no earlier layer to
speculate from and its attention is nearly dense.

Skewing (minigen/skew.py) makes a few columns of q and k carry most of q.k; `sel` picks R of them
per (sequence, KV head) at prefill from the prompt's |q| + |k| column sums. For OPT the skew is
folded into W_q/W_k, so the columns are read off directly (identity here).

GPU state per pooled layer: pk (S, Hkv, T, R) partial keys, a_sel (S, Hkv, D, R) the skew's
selected columns, plus double-buffered idx/count/K/V for the gathered rows.
"""
from __future__ import annotations

import math

import torch

from minigen.kv import DenseKV
from minigen.offload import PooledKV

DEFAULT_ALPHA = {"llama": 5.0, "opt": 4.0}   # the artifact's thresholds


class InfiniGenKV(PooledKV):
    name = "infinigen"
    graph_safe = True     # the decode step reads only device tensors: capturable, streams and all
    skip_gather = False   # benchmarks set it to time a step without the PCIe gather (compute alone)

    def __init__(self, model, *, dtype, device, ops, alpha: float | None = None, budget: float = 0.2,
                 partial_ratio: float = 0.2, dense_layers: int = 2, skew=None):
        cfg = model.config
        super().__init__(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, dtype=dtype, device=device,
                         ops=ops, sm_scale=model.sm_scale)
        if not 1 <= dense_layers < cfg.num_layers:
            raise ValueError(f"--dense-layers must be in [1, {cfg.num_layers - 1}] (layer 0 has nothing to "
                             f"speculate from), got {dense_layers}")
        if not 0.0 < budget <= 1.0:
            raise ValueError(f"--budget must be in (0, 1], got {budget}")
        if not 0.0 < partial_ratio <= 1.0:
            raise ValueError(f"--partial-ratio must be in (0, 1], got {partial_ratio}")
        self.alpha = DEFAULT_ALPHA[cfg.arch] if alpha is None else alpha
        if not self.alpha > 0:
            raise ValueError(f"--alpha must be > 0, got {self.alpha}")
        self.budget, self.dense_layers = budget, dense_layers
        self.R = max(1, int(cfg.head_dim * partial_ratio))
        self.group = cfg.group_size
        self.project_q = model.project_q
        self.pool_layers = cfg.num_layers - dense_layers
        self.dense = DenseKV(dense_layers, cfg.num_kv_heads, cfg.head_dim, dtype=dtype, device=device,
                             ops=ops, sm_scale=model.sm_scale)
        D, Hkv = cfg.head_dim, cfg.num_kv_heads
        if skew is None or skew.folded:   # OPT folded (or no skew): columns read off directly
            eye = torch.eye(D, dtype=torch.float32, device=self.device)
            self.skew = eye.expand(cfg.num_layers, Hkv, D, D)
        else:
            self.skew = skew.matrices.to(self.device, torch.float32)        # (L, Hkv, D, D)
        self._num_fetched = torch.zeros((), dtype=torch.int64, device=self.device)     # rows gathered
        self._num_candidates = torch.zeros((), dtype=torch.int64, device=self.device)  # rows cached
        self._h_keep: dict[int, torch.Tensor] = {}

    # -- allocation -----------------------------------------------------------------------------
    def allocate(self, num_slots: int, max_seq_len: int) -> None:
        self.dense.allocate(num_slots, max_seq_len)
        self._alloc_pool(num_slots, max_seq_len)
        Lp, S, Hkv, D, R, dev = self.pool_layers, num_slots, self.num_kv_heads, self.head_dim, self.R, self.device
        self.pk = self._gpu((Lp, S, Hkv, max_seq_len, R))                     # partial key cache
        self.a_sel = self._gpu((Lp, S, Hkv, D, R))                             # skew columns in use
        self.max_select = max(1, min(max_seq_len, math.ceil(self.budget * max_seq_len)))
        self.sel_k = self._gpu((2, S, Hkv, self.max_select, D))               # gathered rows, by parity
        self.sel_v = self._gpu((2, S, Hkv, self.max_select, D))
        self.idx = torch.zeros((2, S, Hkv, self.max_select), dtype=torch.int32, device=dev)
        self.count = torch.zeros((2, S, Hkv), dtype=torch.int32, device=dev)
        if self.is_cuda:
            self.side = torch.cuda.Stream(self.device)
            self.h_ready = [torch.cuda.Event() for _ in range(self.num_layers)]
            self.ready = [torch.cuda.Event() for _ in range(self.num_layers)]

    def begin(self, meta) -> None:
        self.meta = meta
        self.dense.begin(meta)

    # -- speculation: runs at layer i-1 for layer i ----------------------------------------------
    def pre_attention(self, layer: int, h: torch.Tensor) -> None:
        nxt = layer + 1
        if self.meta.is_prefill or nxt < self.dense_layers or nxt >= self.num_layers:
            return
        if not self.is_cuda:
            self._speculate(nxt, h)
            return
        main = torch.cuda.current_stream(self.device)
        self.h_ready[nxt].record(main)            # side waits: h and the previous step's writes
        self.side.wait_event(self.h_ready[nxt])
        # h was allocated on main: hold a reference so its memory cannot be reused while the side
        # stream reads it (works under CUDA-graph capture too, where record_stream does not)
        self._h_keep[nxt] = h
        with torch.cuda.stream(self.side):
            self._speculate(nxt, h)
        self.ready[nxt].record(self.side)         # main waits on it in attend(nxt)

    def _speculate(self, i: int, h: torch.Tensor) -> None:
        meta, ops, j, buf = self.meta, self.ops, i - self.dense_layers, i % 2
        B, G, R = h.shape[0], self.group, self.R
        q = self.project_q(i, h, meta.positions)                               # (B, H, D) post-RoPE
        a = self.a_sel[j, meta.token_slot]                                     # (B, Hkv, D, R)
        # scaled like the real attention logits, so alpha is a gap in logit units (as in the paper)
        pq = torch.einsum("bgjd,bgdr->bgjr", q.view(B, self.num_kv_heads, G, -1), a).reshape(B, -1, R) * self.sm_scale
        n_prev = meta.seq_lens - 1                                             # cached tokens
        scores = ops.partial_qk(pq, self.pk[j], n_prev, meta.slot_idx)         # (B, H, T) fp32
        idx, count = ops.select(scores, n_prev, self.alpha, self.budget, G, self.max_select,
                                out_idx=self.idx[buf, :B], out_count=self.count[buf, :B])
        if not self.skip_gather:
            kp, vp = self.pool.heads(j)                                        # (S, Hkv, T, D) views
            ops.gather_kv(kp, vp, idx, count, meta.slot_idx, out_k=self.sel_k[buf, :B], out_v=self.sel_v[buf, :B])
        self._num_fetched += count.sum()
        self._num_candidates += n_prev.sum() * self.num_kv_heads

    # -- attention ------------------------------------------------------------------------------
    def attend(self, layer, q, k, v):
        if layer < self.dense_layers:
            return self.dense.attend(layer, q, k, v)
        meta, j, buf = self.meta, layer - self.dense_layers, layer % 2
        if meta.is_prefill:
            self._prefill_partial_keys(layer, q, k)
            return self.prefill_attend(j, q, k, v)
        B = q.shape[0]
        if self.is_cuda:
            torch.cuda.current_stream(self.device).wait_event(self.ready[layer])  # main waits: rows gathered
        # the current token's partial key joins the partial cache for later steps
        pk_cur = torch.einsum("bgd,bgdr->bgr", k, self.a_sel[j, meta.token_slot].to(k.dtype))  # (B, Hkv, R)
        self.pk[j][meta.token_slot, :, meta.positions] = pk_cur
        out = self.ops.sparse_attention(q, self.sel_k[buf, :B], self.sel_v[buf, :B], self.count[buf, :B],
                                        k, v, self.sm_scale)
        self.ops.append_kv(k, v, self.pool.k[j], self.pool.v[j], meta.token_slot, meta.positions)
        return out

    def _prefill_partial_keys(self, layer: int, q: torch.Tensor, k: torch.Tensor) -> None:
        """Pick each new sequence's R skewed columns per KV head from its prompt (column sums of
        |skewed q| + |skewed k|) and write the partial keys of the new tokens."""
        meta, j, G = self.meta, layer - self.dense_layers, self.group
        A = self.skew[layer]                                                   # (Hkv, D, D)
        start = 0
        for slot, n0, n in zip(meta.host_slots, meta.host_start, meta.host_new):
            qs = q[start:start + n].float().view(n, self.num_kv_heads, G, -1)  # (n, Hkv, G, D)
            ks = k[start:start + n].float()                                    # (n, Hkv, D)
            if n0 == 0:   # a new sequence: choose its columns; a continued one keeps them
                q_sk = torch.einsum("ngjd,gde->ngje", qs, A)                   # skewed q
                k_sk = torch.einsum("ngd,gde->nge", ks, A)                     # skewed k
                score = q_sk.abs().sum((0, 2)) + k_sk.abs().sum(0)             # (Hkv, D)
                sel = score.topk(self.R, dim=-1).indices.sort(-1).values       # (Hkv, R)
                self.a_sel[j, slot] = torch.gather(A, 2, sel[:, None, :].expand(-1, A.shape[1], -1)).to(self.dtype)
            pk = torch.einsum("ngd,gdr->ngr", ks, self.a_sel[j, slot].float())  # (n, Hkv, R)
            self.pk[j, slot, :, n0:n0 + n] = pk.transpose(0, 1).to(self.dtype)
            start += n

    # -- measurement helpers (benchmarks) --------------------------------------------------------
    def gather_all(self) -> None:
        """Every pooled layer's gather with the last step's selections: the transfer alone."""
        meta, B = self.meta, self.meta.num_seqs
        for j in range(self.pool_layers):
            buf = (j + self.dense_layers) % 2
            kp, vp = self.pool.heads(j)
            self.ops.gather_kv(kp, vp, self.idx[buf, :B], self.count[buf, :B], meta.slot_idx,
                               out_k=self.sel_k[buf, :B], out_v=self.sel_v[buf, :B])

    def gather_bytes(self) -> int:
        """Bytes gather_all moves over PCIe (reads the counts: not for the decode path)."""
        B, rows = self.meta.num_seqs, 0
        for j in range(self.pool_layers):
            rows += int(self.count[(j + self.dense_layers) % 2, :B].sum())
        return 2 * rows * self.head_dim * (torch.finfo(self.dtype).bits // 8)

    def stats(self) -> dict:
        total = int(self._num_candidates.item())       # read after the run, never inside a step
        return {"fetched_fraction": int(self._num_fetched.item()) / total if total else 0.0,
                "host_pool_gib": self.pool.nbytes / 2**30 if self.pool else 0.0}

    def close(self) -> None:
        super().close()
        self.dense.close()
        self.pk = self.a_sel = self.sel_k = self.sel_v = None
