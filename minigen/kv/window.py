"""The `window` policy (StreamingLLM, Xiao et al. 2024): the first `sinks` tokens (attention sinks)
plus the k - sinks most recent ones, k the budget's kept count (minigen/kv/budget.py). When k <= sinks the budget goes to the first k tokens: the sinks are
what keeps StreamingLLM stable, and the current token is attended in any case. Stateless: the
indices are a formula of seq_lens, recomputed on the device every step.
"""
from __future__ import annotations

import torch

from minigen.config import ModelConfig
from minigen.kv.budget import BudgetKV


class WindowKV(BudgetKV):
    """StreamingLLM: attention sinks + a recent window (see the module docstring)."""

    name = "window"

    def __init__(self, cfg: ModelConfig, *, dtype, device, ops, budget: float = 0.2, sinks: int = 4,
                 dense_layers: int = 2):
        super().__init__(cfg, dtype=dtype, device=device, ops=ops, budget=budget, dense_layers=dense_layers)
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

    def _kept_idx(self, j, B, q):
        return self.idx[:B]
