"""KV in pinned host memory: the pool, and PooledKV, the machinery every policy that keeps its KV
there shares (offload, int4, infinigen): allocation, GPU staging, prefill over the pool.

Pool layout (L, S, T, Hkv, D): one token of one slot is a contiguous row of Hkv*D elements, so a
sequence's first n tokens of a layer are ONE contiguous block (one memcpy at full PCIe speed),
and a single head's row (D elements) is reachable through strides for sparse gathers.

Prefill of a pooled layer runs on the GPU: each sequence's earlier tokens (a continued chat) come
back from the pool to a GPU staging buffer (S, T, Hkv, D), the new tokens join them there, causal
prefill attention reads it, and the new K/V are appended to the pool.

Index names: `layer` is a model layer; `j` is a pooled layer, the pool's first index (offload and
int4 pool every layer, so j == layer there; infinigen pools layers >= dense_layers).
"""
from __future__ import annotations

import sys
import time

import torch

from minigen.kernels.ops import Ops
from minigen.kv.base import KVPolicy


PIN_NOTE_BYTES = 4 * 2**30   # pools from this size say on stderr that pinning is under way


class HostKVPool:
    """K and V of `num_layers` layers, (L, S, T, Hkv, D), pinned when a GPU will read them; on the
    meta device when the policy's is (a memory plan, minigen/memory.py)."""

    def __init__(self, num_layers: int, num_slots: int, capacity: int, num_kv_heads: int, head_dim: int,
                 *, dtype: torch.dtype, pin: bool, device: str = "cpu"):
        shape = (num_layers, num_slots, capacity, num_kv_heads, head_dim)
        nbytes = 2 * torch.Size(shape).numel() * dtype.itemsize
        # pinning locks every page (about 2-10 GB/s): say so before a long wait, and when it is done
        loud = pin and device == "cpu" and nbytes >= PIN_NOTE_BYTES
        t0 = time.perf_counter()
        if loud:
            print(f"pinning {nbytes / 2**30:.1f} GiB of host memory for the KV pool ({num_slots} sequences x "
                  f"{capacity} tokens x {num_layers} layers) ...", file=sys.stderr, flush=True)
        try:
            self.k = torch.empty(shape, dtype=dtype, pin_memory=pin, device=device)
            if loud:
                print(f"  K: {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
            self.v = torch.empty(shape, dtype=dtype, pin_memory=pin, device=device)
            if loud:
                print(f"  K and V pinned in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
        except (RuntimeError, MemoryError) as e:
            self.k = self.v = None
            raise MemoryError(
                f"the {'pinned ' if pin else ''}host KV pool of {nbytes / 2**30:.1f} GiB ({num_slots} sequences x "
                f"{capacity} tokens x {num_layers} layers) could not be allocated ({str(e).splitlines()[0]}); "
                f"lower the batch or --max-seq-len") from None
        self.nbytes = nbytes

    def heads(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer views (S, Hkv, T, D) over the (S, T, Hkv, D) storage (strided, no copy)."""
        return self.k[layer].permute(0, 2, 1, 3), self.v[layer].permute(0, 2, 1, 3)

    def close(self) -> None:
        self.k = self.v = None


class PooledKV(KVPolicy):
    """Shared machinery: the host pool, the copy stream, and prefill over fetched KV."""

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, *, dtype: torch.dtype,
                 device: torch.device | str, ops: Ops, sm_scale: float):
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.dtype, self.device, self.ops, self.sm_scale = dtype, torch.device(device), ops, sm_scale
        self.is_cuda = self.device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(self.device) if self.is_cuda else None
        self.pool: HostKVPool | None = None
        self.pool_layers = num_layers     # subclasses may keep some layers elsewhere
        self._capacity = 0

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def host_device(self) -> str:
        """Where the pool goes: host memory, or the meta device when the policy is (a memory plan)."""
        return "meta" if self.device.type == "meta" else "cpu"

    def _alloc_pool(self, num_slots: int, max_seq_len: int) -> None:
        self._capacity = max_seq_len
        self.pool = HostKVPool(self.pool_layers, num_slots, max_seq_len, self.num_kv_heads, self.head_dim,
                               dtype=self.dtype, pin=self.is_cuda, device=self.host_device)
        # prefill staging, one layer of the batch (S, T, Hkv, D), rows indexed by batch row: each
        # policy allocates it in `allocate` (so a memory plan counts it)
        self.prefill_k = self.prefill_v = None
        self._num_slots = num_slots

    def _gpu(self, shape, dtype: torch.dtype | None = None, zero: bool = False) -> torch.Tensor:
        try:
            make = torch.zeros if zero else torch.empty
            return make(shape, dtype=dtype or self.dtype, device=self.device)
        except torch.OutOfMemoryError:
            raise torch.OutOfMemoryError(
                f"GPU staging buffer {tuple(shape)} does not fit; lower the batch or --max-seq-len") from None

    def begin(self, meta) -> None:
        self.meta = meta
        if meta.is_prefill:   # the same for every layer of this forward: built once
            dev = meta.positions.device
            B = len(meta.host_new)
            self._prefill_rows = torch.repeat_interleave(torch.arange(B), torch.tensor(meta.host_new)).to(dev)
            self._prefill_slots = torch.arange(B, dtype=torch.int32, device=dev)   # staging row = batch row

    def prefill_attend(self, pool_layer: int, q, k, v) -> torch.Tensor:
        """Prefill for a pooled layer: attention on the GPU (prefill_attention_from_pool), then
        the new tokens' K/V go to the pool at their positions."""
        out = self.prefill_attention_from_pool(pool_layer, q, k, v)
        meta = self.meta
        self.ops.append_kv(k, v, self.pool.k[pool_layer], self.pool.v[pool_layer], meta.token_slot, meta.positions)
        return out

    def prefill_attention_from_pool(self, pool_layer: int, q, k, v) -> torch.Tensor:
        """Causal prefill attention for a pooled layer: each sequence's earlier tokens (the first
        host_start pool rows) come back to a GPU staging buffer, the new tokens are added there."""
        meta, ops = self.meta, self.ops
        sk, sv = self.prefill_k, self.prefill_v                              # (S, T, Hkv, D)
        self._restore_prefix(pool_layer)
        sk[self._prefill_rows, meta.positions] = k
        sv[self._prefill_rows, meta.positions] = v
        return ops.prefill_attention(q, sk.permute(0, 2, 1, 3), sv.permute(0, 2, 1, 3), meta.cu_seqlens_q,
                                     meta.start_pos, self._prefill_slots, self.sm_scale, meta.max_seqlen_q)

    def _restore_prefix(self, pool_layer: int) -> None:
        """A continued conversation: each sequence's cached tokens come back to the prefill
        staging buffer (S, T, Hkv, D) before its new tokens join them."""
        for b, (slot, n0) in enumerate(zip(self.meta.host_slots, self.meta.host_start)):
            if n0:
                self.prefill_k[b, :n0].copy_(self.pool.k[pool_layer, slot, :n0], non_blocking=True)
                self.prefill_v[b, :n0].copy_(self.pool.v[pool_layer, slot, :n0], non_blocking=True)

    def close(self) -> None:
        if self.is_cuda:
            torch.cuda.synchronize(self.device)   # no transfer may still read the pool
        if self.pool is not None:
            self.pool.close()
        self.pool = None
        self.prefill_k = self.prefill_v = None
        if self.is_cuda and hasattr(torch._C, "_host_emptyCache"):
            torch._C._host_emptyCache()   # pinned blocks go back to the OS, not to torch's cache


def chunk_elems(row_elems: int, elem_bytes: int) -> int:
    """The largest divisor of a token's row (row_elems elements) of at most 512 bytes, or the whole
    row when it is that small: gather_kv's "head" size for a whole-prefix fetch (rows of a few
    hundred bytes keep many PCIe reads in flight)."""
    if row_elems * elem_bytes <= 512:
        return row_elems
    return max(d for d in range(1, 512 // elem_bytes + 1) if row_elems % d == 0)


def row_chunks(t: torch.Tensor, c: int) -> torch.Tensor:
    """(S, T, ...) whose token rows are contiguous -> a (S, W/c, T, c) view: each row's chunks of c
    elements as if they were heads (the layout gather_kv copies)."""
    S, T = t.shape[:2]
    return t.view(S, T, -1, c).permute(0, 2, 1, 3)
