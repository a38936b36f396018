"""The `int4` policy: the FlexGen+INT4 baseline of the InfiniGen paper.

FlexGen (Sheng et al., ICML 2023) keeps the KV cache in CPU memory and streams it to the GPU for
every decode step; its compression option stores K and V as group-wise asymmetric 4-bit integers
(groups of 64 along the head dim, an fp16 scale and min per group), so the PCIe transfer, which
sets the step time, carries ~0.28x the bytes of fp16. Every cached token is still attended to,
just slightly perturbed: InfiniGen's answer to the same bandwidth problem is to fetch FEWER tokens
exactly rather than ALL tokens approximately, and this baseline is what it is compared with.

What this does: `offload`'s schedule (minigen/kv/offload.py: whole-layer fetches on the copy stream
into double-buffered GPU staging, events only) over a pool of quantized token records.
    prefill   exact dense attention over the prompt (a continued prefill dequantizes the earlier
              tokens back first); then the new K/V are quantized on the GPU and written to the pool
    decode    main waits for layer i's packed records, dequantizes them (minigen/kernels/quant_kv.py) into
              a model-dtype buffer, frees the staging buffer for layer i + 2's fetch, attends over
              the cached tokens plus the current token at full precision (sparse_attention with
              count = cached tokens), then quantizes the current token and appends it to the pool

Record layout: one token of one head is R = D/2 + 4 D/G bytes,
    [ codes: D/2 uint8 (two 4-bit values each) | scale: D/G fp16 | min: D/G fp16 ]
and the pool is (L, S, T, Hkv, R) uint8 for K and again for V, so a sequence's cached tokens of a
layer are one contiguous block of n * Hkv * R bytes per K and V, as in `offload`. The quantize and
dequantize kernels read/write the three fields through strided views of the records.
Fetch (minigen/kv/offload.py): `kernel` by default on CUDA, gather_kv reading the pinned records
with the lengths on the device and dequantize_kv masking by them, so the decode step is captured in
a CUDA graph; `copy` (the copy engine, sized by host lengths) runs eagerly, and then a 7B step is
bound by the host's launches rather than by its short PCIe transfer.
"""
from __future__ import annotations

import torch

from minigen.config import ModelConfig
from minigen.kernels import quant_kv
from minigen.kv.offload import OffloadKV
from minigen.kv.pool import HostKVPool


class Int4KV(OffloadKV):
    """All K/V in the host pool as 4-bit records; each decode step fetches and dequantizes every layer."""

    name = "int4"

    default_fetch = "kernel"   # on CUDA (see minigen/kv/offload.py); copy on the CPU

    def __init__(self, cfg: ModelConfig, *, dtype, device, ops, group_size: int = quant_kv.DEFAULT_GROUP,
                 fetch: str | None = None):
        super().__init__(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, dtype=dtype, device=device, ops=ops,
                         sm_scale=cfg.sm_scale, fetch=fetch)
        D = cfg.head_dim
        self.group_size = quant_kv.kv_group_size(D, group_size)
        if D % 4:   # the fp16 scale must start on an even byte of the record
            raise ValueError(f"int4 KV: head dim {D} must be a multiple of 4; use another KV policy")
        self.num_groups = D // self.group_size
        self.record_bytes = D // 2 + 4 * self.num_groups
        self.quantize, self.dequantize = ops.quantize_kv, ops.dequantize_kv

    def fields(self, rec: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(..., R) uint8 records -> views (codes (..., D/2) uint8, scale, min (..., D/G) fp16)."""
        c, g = self.head_dim // 2, self.num_groups
        return rec[..., :c], rec[..., c:c + 2 * g].view(torch.float16), rec[..., c + 2 * g:].view(torch.float16)

    # -- allocation -----------------------------------------------------------------------------
    def allocate(self, num_slots: int, max_seq_len: int) -> None:
        L, S, T, Hkv, R = self.num_layers, num_slots, max_seq_len, self.num_kv_heads, self.record_bytes
        self._capacity, self._num_slots = max_seq_len, num_slots
        self.pool = HostKVPool(L, S, T, Hkv, R, dtype=torch.uint8, pin=self.is_cuda,   # (L, S, T, Hkv, R) records
                               device=self.host_device)
        # zero-filled byte buffers: with fetch=copy stale rows get dequantized too (never read), and
        # garbage fp16 scales there would be NaN/inf
        self.stage_k = self._gpu((2, S, T, Hkv, R), torch.uint8, zero=True)   # packed, double buffer (copy stream)
        self.stage_v = self._gpu((2, S, T, Hkv, R), torch.uint8, zero=True)
        self.prefill_k = self._gpu((S, T, Hkv, self.head_dim))      # one dequantized layer (main stream),
        self.prefill_v = self._gpu((S, T, Hkv, self.head_dim))      # for prefill and decode alike
        self._rec_decode = self._gpu((2, S, Hkv, R), torch.uint8, zero=True)   # current tokens' K/V records
        self._make_events()
        self._prepare_kernel_fetch(max_seq_len)

    def begin(self, meta) -> None:
        super().begin(meta)     # offload: counts, then layers 0 and 1 start fetching (decode)
        if meta.is_prefill:     # this forward's new tokens' records, shared by all layers
            self._rec = self._gpu((2, meta.positions.shape[0], self.num_kv_heads, self.record_bytes), torch.uint8,
                                  zero=True)
        else:
            self._rec = self._rec_decode[:, :meta.num_seqs]
            self._max_cached = max(meta.host_start)   # host ints: rows worth dequantizing (fetch=copy)

    # -- attention ------------------------------------------------------------------------------
    def _dequantize_staged(self, buf: int, B: int, n: int, counts=None) -> tuple[torch.Tensor, torch.Tensor]:
        """staging[buf][:B, :n] records -> prefill_k/v[:B, :n] (B, n, Hkv, D) in the model dtype,
        only each sequence's first counts[b] rows when counts (B,) is given (device lengths).
        Rows past a sequence's own length are stale; attention never reads them."""
        kd, vd = self.prefill_k[:B, :n], self.prefill_v[:B, :n]
        self.dequantize(*self.fields(self.stage_k[buf, :B, :n]), out=kd, counts=counts)
        self.dequantize(*self.fields(self.stage_v[buf, :B, :n]), out=vd, counts=counts)
        return kd, vd

    def _store(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Quantize the new tokens' K/V (N, Hkv, D) into GPU records, then append_kv writes them to
        their pool rows (pinned memory on CUDA: stores over PCIe, no sync)."""
        rk, rv = self._rec[0], self._rec[1]                                  # (N, Hkv, R)
        self.quantize(k, self.group_size, out=self.fields(rk))
        self.quantize(v, self.group_size, out=self.fields(rv))
        meta = self.meta
        self.ops.append_kv(rk, rv, self.pool.k[layer], self.pool.v[layer], meta.token_slot, meta.positions)

    def prefill_attend(self, layer: int, q, k, v) -> torch.Tensor:
        out = self.prefill_attention_from_pool(layer, q, k, v)
        self._store(layer, k, v)
        return out

    def _restore_prefix(self, layer: int) -> None:
        """A continued conversation's earlier tokens come back as records to staging buffer 0
        (main stream; the copy stream is idle in prefill) and are dequantized into prefill_k/v."""
        n = max(self.meta.host_start)
        if n:
            self._copy_rows(layer, 0)
            self._dequantize_staged(0, len(self.meta.host_start), n)

    def attend(self, layer, q, k, v):
        if self.meta.is_prefill:
            return self.prefill_attend(layer, q, k, v)
        buf, B = layer % 2, q.shape[0]
        if self.is_cuda:
            main = torch.cuda.current_stream(self.device)
            main.wait_event(self.fetched[layer])  # main waits: layer's records are on the GPU
        if self.fetch == "kernel":   # lengths on the device: the whole buffer's shape, counts masking
            kd, vd = self._dequantize_staged(buf, B, self._capacity, self._count[:, 0])
        else:
            kd, vd = self._dequantize_staged(buf, B, self._max_cached)      # (B, n, Hkv, D)
        if self.is_cuda:
            self.buf_free[buf].record(main)       # copy may overwrite staging[buf]: dequantized already
        if layer + 2 < self.num_layers:
            self._fetch(layer + 2)                # so layer i+2's transfer also overlaps this attention
        out = self.ops.sparse_attention(q, kd.permute(0, 2, 1, 3), vd.permute(0, 2, 1, 3), self._count, k, v,
                                        self.sm_scale)
        self._store(layer, k, v)
        return out

    def stats(self) -> dict:
        # bytes per (token, head) fetched vs the fp16 K/V row: (D/2 + 2 * 2 * D/G) / (2 * D)
        return {"fetched_fraction": self.record_bytes / (2 * self.head_dim),
                "host_pool_gib": self.pool.nbytes / 2**30 if self.pool else 0.0}

    def close(self) -> None:
        super().close()
        self._rec = self._rec_decode = None
