"""`dense`: the whole KV cache on the model's device and exact attention; the baseline every other
policy is compared with, and the storage of the layers the sparse policies keep dense."""
from __future__ import annotations

import torch

from minigen.kernels.ops import Ops
from minigen.kv.base import KVPolicy


class DenseKV(KVPolicy):
    """Whole KV cache on the model's device; exact attention."""

    name = "dense"
    graph_safe = True

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, *, dtype: torch.dtype,
                 device: torch.device | str, ops: Ops, sm_scale: float):
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.dtype, self.device, self.ops, self.sm_scale = dtype, torch.device(device), ops, sm_scale
        self.k_cache = self.v_cache = None

    def allocate(self, num_slots: int, max_seq_len: int) -> None:
        shape = (self.num_layers, num_slots, self.num_kv_heads, max_seq_len, self.head_dim)
        nbytes = 2 * torch.Size(shape).numel() * torch.finfo(self.dtype).bits // 8
        try:
            self.k_cache = torch.empty(shape, dtype=self.dtype, device=self.device)  # (L, S, Hkv, T, D)
            self.v_cache = torch.empty(shape, dtype=self.dtype, device=self.device)
        except torch.OutOfMemoryError:
            self.k_cache = self.v_cache = None
            raise torch.OutOfMemoryError(
                f"KV cache of {nbytes / 2**30:.2f} GiB ({num_slots} sequences x {max_seq_len} tokens) "
                f"does not fit on {self.device}; lower the batch size or the context (--max-seq-len)") from None

    @property
    def capacity(self) -> int:
        return self.k_cache.shape[3]

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new tokens' K/V at (slot, :, position, :); returns the layer's caches
        (S, Hkv, T, D)."""
        meta, kc, vc = self.meta, self.k_cache[layer], self.v_cache[layer]
        kc[meta.token_slot, :, meta.positions] = k
        vc[meta.token_slot, :, meta.positions] = v
        return kc, vc

    def attend(self, layer, q, k, v):
        meta = self.meta
        kc, vc = self.store(layer, k, v)
        if meta.is_prefill:
            return self.ops.prefill_attention(
                q, kc, vc, meta.cu_seqlens_q, meta.start_pos, meta.slot_idx, self.sm_scale,
                meta.max_seqlen_q)
        return self.ops.decode_attention(q, kc, vc, meta.seq_lens, meta.slot_idx, self.sm_scale)

    def close(self):
        self.k_cache = self.v_cache = None
