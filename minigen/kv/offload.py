"""`offload`: all K/V in the host pool (minigen/kv/pool.py); each decode step fetches every layer's
whole KV to the GPU, overlapped with compute (what FlexGen and transformers' offloaded cache do).

Streams (CUDA). The engine's compute runs on the current ("main") stream; the copy stream
moves pool -> GPU staging. Two staging buffers alternate by layer parity:
    begin(step)      main records buf_free[0/1]; copy waits on them, fetches layers 0 and 1
    attend(layer i)  main waits fetched[i]; attention reads staging[i % 2]; main appends the new
                     token's K/V to the pool; main records buf_free[i % 2]; copy waits on it
                     and fetches layer i + 2 into the same buffer
so layer i+2's transfer overlaps layers i+1 and i+2's compute, and no device-wide sync happens.

Two ways to fetch (`fetch=`):
    copy     the copy engine: one cudaMemcpyAsync per sequence and tensor, sized by the host's
             lengths, so the step runs eagerly: a 7B step is several hundred launches from Python,
             tens of ms of host time, the bound whenever the PCIe transfer is shorter than that
    kernel   gather_kv (minigen/kernels/gather_kv.py) reads the pinned pool over PCIe with the
             lengths on the device, every token's row cut into chunks of <= 512 bytes as if they
             were heads, so the decode step is captured in a CUDA graph like dense's; SM loads
             reach a little less bandwidth than the copy engine
offload keeps the copy engine by default: it is for contexts whose KV does not fit on the GPU,
where its transfer outlasts the host's launches and the copy engine is the faster mover. int4
moves 0.28x the bytes, so the host bound reaches far longer contexts: on CUDA it defaults to the
kernel. On the CPU both default to copy: the kernel fetch pays for the whole capacity there
(gather_kv_ref and the attention run over every slot row) and nothing is captured to repay it.
The measurements behind these defaults are in docs/design.md.
"""
from __future__ import annotations

import torch

from minigen.kv.pool import PooledKV, chunk_elems, row_chunks

FETCHES = ("copy", "kernel")


class OffloadKV(PooledKV):
    """All K/V in the host pool; each decode step fetches every layer's whole KV."""

    name = "offload"
    default_fetch = "copy"     # on CUDA; the CPU path always defaults to copy (nothing is captured there)

    def __init__(self, *args, fetch: str | None = None, **kw):
        super().__init__(*args, **kw)
        if fetch is None:
            fetch = self.default_fetch if self.is_cuda else "copy"
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
