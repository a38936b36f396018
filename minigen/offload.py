"""KV in host memory: the pinned pool, and the `offload` policy that fetches every layer's whole
KV to the GPU each decode step (what FlexGen and transformers' offloaded cache do), overlapped
with compute. InfiniGen (minigen/infinigen.py) shares the pool and the prefill path.

Pool layout (L, S, T, Hkv, D): one token of one slot is a contiguous row of Hkv*D elements, so a
sequence's first n tokens of a layer are ONE contiguous block (one memcpy at full PCIe speed),
and a single head's row (D elements) is reachable through strides for sparse gathers.

Streams (CUDA). The engine's compute runs on the current ("main") stream; the copy stream
moves pool -> GPU staging. Two staging buffers alternate by layer parity:
    begin(step)      main records buf_free[0/1]; copy waits on them, fetches layers 0 and 1
    attend(layer i)  main waits fetched[i]; attention reads staging[i % 2]; main appends the new
                     token's K/V to the pool; main records buf_free[i % 2]; copy waits on it
                     and fetches layer i + 2 into the same buffer
so layer i+2's transfer overlaps layers i+1 and i+2's compute, and no device-wide sync happens.

Two ways to fetch (`fetch=`), measured end to end (H100, Llama-2-7B shape fp16, batch 1, step
ms against the PCIe floor of the same run; bench/results/issue3/fetch/):
    copy     the copy engine: one cudaMemcpyAsync per sequence and tensor, sized by the host's
             lengths, so the step runs eagerly: a 7B step is ~580 launches from Python (353
             Triton, 225 linear: host_profile_int4_offload_b1_2048.txt), tens of ms of host
             time, the bound whenever the PCIe transfer is shorter than that
    kernel   gather_kv (kernels/gather_kv.py) reads the pinned pool over PCIe with the lengths
             on the device, every token's row cut into chunks of <= 512 bytes as if they were
             heads, so the decode step is captured in a CUDA graph like dense's; its SM loads
             reach ~94% of the copy engine's bandwidth
                         2048 tokens      8192 tokens      32000 tokens
    offload  copy        36.48 (x1.81)    81.08 (x1.04)    316.87 (x1.02)
             kernel      21.78 (x1.06)    85.07 (x1.07)    334.43 (x1.07)
    int4     copy        38.49 (x7.00)    39.52 (x1.79)     88.67 (x0.99)
             kernel       8.68 (x1.58)    24.51 (x1.06)     94.45 (x1.10)
offload keeps the copy engine by default: it is for contexts whose KV does not fit on the GPU,
where its transfer outlasts the host's launches and the copy engine is 4.7-5.5% faster. int4
moves 0.28x the bytes, so the host bound reaches far longer contexts: on CUDA it defaults to the
kernel. On the CPU both default to copy: the kernel fetch pays for the whole capacity there
(gather_kv_ref and the attention run over every slot row) and nothing is captured to repay it.
"""
from __future__ import annotations

import torch

from kernels import Ops
from minigen.kv import KVPolicy


class HostKVPool:
    """K and V of `num_layers` layers, (L, S, T, Hkv, D), pinned when a GPU will read them."""

    def __init__(self, num_layers: int, num_slots: int, capacity: int, num_kv_heads: int, head_dim: int,
                 *, dtype: torch.dtype, pin: bool):
        shape = (num_layers, num_slots, capacity, num_kv_heads, head_dim)
        nbytes = 2 * torch.Size(shape).numel() * dtype.itemsize
        try:
            self.k = torch.empty(shape, dtype=dtype, pin_memory=pin)
            self.v = torch.empty(shape, dtype=dtype, pin_memory=pin)
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

    def _alloc_pool(self, num_slots: int, max_seq_len: int) -> None:
        self._capacity = max_seq_len
        self.pool = HostKVPool(self.pool_layers, num_slots, max_seq_len, self.num_kv_heads, self.head_dim,
                               dtype=self.dtype, pin=self.is_cuda)
        # prefill staging: one layer of the batch, (S, T, Hkv, D), rows indexed by batch row
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
        if self.prefill_k is None:
            self.prefill_k = self._gpu((self._num_slots, self._capacity, self.num_kv_heads, self.head_dim))
            self.prefill_v = self._gpu(self.prefill_k.shape)
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


FETCHES = ("copy", "kernel")


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


class OffloadKV(PooledKV):
    """All K/V in the host pool; each decode step fetches every layer's whole KV."""

    name = "offload"
    default_fetch = "copy"     # on CUDA; the CPU path always defaults to copy (nothing is captured there)

    def __init__(self, *args, fetch: str | None = None, **kw):
        super().__init__(*args, **kw)
        if fetch is None:
            fetch = self.default_fetch if self.is_cuda else "copy"
        if fetch not in FETCHES:
            raise ValueError(f"{self.name}: fetch must be one of {', '.join(FETCHES)}, got {fetch!r}")
        self.fetch = fetch
        self.graph_safe = fetch == "kernel"   # lengths read on the device only: capturable

    def allocate(self, num_slots: int, max_seq_len: int) -> None:
        self._alloc_pool(num_slots, max_seq_len)
        shape = (2, num_slots, max_seq_len, self.num_kv_heads, self.head_dim)   # double buffer
        self.stage_k, self.stage_v = self._gpu(shape), self._gpu(shape)
        self.prefill_k, self.prefill_v = self.stage_k[0], self.stage_v[0]   # prefill reuses buffer 0
        self._make_events()
        self._prepare_kernel_fetch(max_seq_len)

    def _prepare_kernel_fetch(self, max_seq_len: int) -> None:
        """fetch=kernel: token indices 0..T-1 (gather_kv's idx for a whole prefix) and the chunk
        size each token's row is cut into."""
        if self.fetch == "kernel":
            self._iota = torch.arange(max_seq_len, dtype=torch.int32, device=self.device)
            self._chunk = chunk_elems(self.pool.k[0, 0, 0].numel(), self.pool.k.element_size())

    def _make_events(self) -> None:
        if self.is_cuda:
            self.fetched = [torch.cuda.Event() for _ in range(self.num_layers)]   # layer i's KV staged
            self.buf_free = [torch.cuda.Event(), torch.cuda.Event()]              # main done with buffer

    def begin(self, meta) -> None:
        super().begin(meta)
        if meta.is_prefill:
            return
        # every layer attends over the fetched tokens [0, n-1) of each sequence, plus the current one
        B = meta.num_seqs
        self._count = (meta.seq_lens - 1).to(torch.int32)[:, None].expand(B, self.num_kv_heads).contiguous()
        self._slot_idx = meta.slot_idx
        if self.is_cuda:
            main = torch.cuda.current_stream(self.device)
            for ev in self.buf_free:      # copy stream starts after everything main did so far
                ev.record(main)
        for layer in range(min(2, self.num_layers)):
            self._fetch(layer)

    def _fetch(self, layer: int) -> None:
        """Pool -> staging[layer % 2] for every sequence's cached tokens, on the copy stream."""
        buf = layer % 2
        if self.is_cuda:
            cs = self.copy_stream
            cs.wait_event(self.buf_free[buf])    # copy waits: main is done reading this buffer
            with torch.cuda.stream(cs):
                self._fetch_rows(layer, buf)
            self.fetched[layer].record(cs)       # main waits on it in attend(layer)
        else:
            self._fetch_rows(layer, buf)

    def _fetch_rows(self, layer: int, buf: int) -> None:
        """Decode: every sequence's cached rows of `layer` -> staging[buf], by the chosen fetch."""
        if self.fetch == "copy":
            self._copy_rows(layer, buf)
            return
        B, T, c = self._count.shape[0], self._iota.shape[0], self._chunk
        ks, vs = row_chunks(self.pool.k[layer], c), row_chunks(self.pool.v[layer], c)            # (S, H, T, c)
        kd, vd = row_chunks(self.stage_k[buf, :B], c), row_chunks(self.stage_v[buf, :B], c)    # (B, H, T, c)
        H = ks.shape[1]
        self.ops.gather_kv(ks, vs, self._iota.expand(B, H, T), self._count[:, :1].expand(B, H), self._slot_idx,
                           kd, vd)

    def _copy_rows(self, layer: int, buf: int) -> None:
        meta = self.meta
        for b, (slot, n) in enumerate(zip(meta.host_slots, meta.host_start)):
            if n:
                self.stage_k[buf, b, :n].copy_(self.pool.k[layer, slot, :n], non_blocking=True)
                self.stage_v[buf, b, :n].copy_(self.pool.v[layer, slot, :n], non_blocking=True)

    def attend(self, layer, q, k, v):
        if self.meta.is_prefill:
            return self.prefill_attend(layer, q, k, v)
        meta, buf, B = self.meta, layer % 2, q.shape[0]
        if self.is_cuda:
            main = torch.cuda.current_stream(self.device)
            main.wait_event(self.fetched[layer])  # main waits: layer's KV is on the GPU
        out = self.ops.sparse_attention(q, self.stage_k[buf, :B].permute(0, 2, 1, 3),
                                        self.stage_v[buf, :B].permute(0, 2, 1, 3), self._count, k, v, self.sm_scale)
        self.ops.append_kv(k, v, self.pool.k[layer], self.pool.v[layer], meta.token_slot, meta.positions)
        if self.is_cuda:
            self.buf_free[buf].record(main)       # copy may now overwrite staging[buf]
        if layer + 2 < self.num_layers:
            self._fetch(layer + 2)
        return out

    def stats(self) -> dict:
        return {"fetched_fraction": 1.0, "host_pool_gib": self.pool.nbytes / 2**30 if self.pool else 0.0}

    def close(self) -> None:
        super().close()
        self.stage_k = self.stage_v = None
