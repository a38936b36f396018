"""KV policies: where the KV cache lives and how attention over it is computed.

A model knows nothing about caching. Each attention layer hands (layer, q, k, v) to the policy
object that the engine passes into `model.forward`; the policy stores the new K/V and returns the
attention output. Policies differ only in placement and selection (dense on the GPU here; the
offloaded and sparse ones build on the same interface).

Token layout is packed ("ragged"): a forward over B sequences carries N tokens in one (N, ...)
tensor. Prefill: N = sum of new tokens, sequence b owns q rows cu_seqlens_q[b]:cu_seqlens_q[b+1].
Decode: N = B, one token per sequence.

Cache layout per layer: (S, Hkv, T, D), S sequence slots, T the slot capacity. A head's keys are
contiguous rows of D elements, which is what decode attention streams and what the sparse
policies gather.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(slots=True)
class StepMeta:
    """What one forward pass needs to know about its batch. All tensors live on the model device
    and are built by the engine from host-side lengths it already knows (no device reads)."""
    is_prefill: bool
    positions: torch.Tensor        # (N,) int64   absolute position of every token
    token_slot: torch.Tensor       # (N,) int64   cache slot of every token
    slot_idx: torch.Tensor         # (B,) int32   cache slot of every sequence
    seq_lens: torch.Tensor         # (B,) int32   tokens in cache after this step (incl. new ones)
    cu_seqlens_q: torch.Tensor | None = None   # (B+1,) int32, prefill only
    start_pos: torch.Tensor | None = None      # (B,) int32 cached tokens before this step, prefill
    max_seqlen_q: int = 1                      # host int: longest new-token run (grid size)
    # the same lengths as host ints, for policies that size copies (no device reads needed)
    host_slots: list[int] | None = None        # cache slot of every sequence
    host_start: list[int] | None = None        # tokens cached before this step
    host_new: list[int] | None = None          # new tokens this step
    host_done: list[bool] | None = None        # prefill: the sequence's prompt ends in this chunk

    @property
    def num_seqs(self) -> int:
        return self.slot_idx.shape[0]


class KVPolicy:
    """Base class. Subclasses implement `allocate`, `attend`; the rest are optional hooks."""

    name = "base"
    graph_safe = False     # True: a decode step can be captured in a CUDA graph
    # a host pool of fewer rows than the context (infinigen --cpu-kv-limit) sets its row count: a
    # prompt longer than that is prefilled in one chunk, since the rows it drops cannot come back
    # to a later chunk's attention
    whole_prompt_over: int | None = None

    def allocate(self, num_slots: int, max_seq_len: int) -> None:
        raise NotImplementedError

    @property
    def capacity(self) -> int:
        """Tokens one slot can hold."""
        raise NotImplementedError

    def begin(self, meta: StepMeta) -> None:
        """Called by the engine before each forward pass."""
        self.meta = meta

    def pre_attention(self, layer: int, x: torch.Tensor) -> None:
        """Called with the residual stream x (N, C) entering each layer, before its attention: the
        hook speculative policies use to prefetch the next layer's KV (model.project_q turns it
        into any layer's queries)."""

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q (N, H, D), k/v (N, Hkv, D) after RoPE -> attention output (N, H, D)."""
        raise NotImplementedError

    def stats(self) -> dict:
        return {}

    def prefill_state(self, meta: StepMeta) -> list[tuple[torch.Tensor, tuple]]:
        """What a prefill of meta's sequences changes in place besides the K/V at the new tokens'
        positions, as (tensor, index) pairs: the engine copies them before the forward and writes
        them back if it is interrupted (Ctrl-C, an error), so an interrupted chunk leaves no trace.
        K/V past a sequence's cached length need no copy: they are overwritten before being read."""
        return []

    _warm_saved: list | None = None

    def warm_state(self) -> tuple:
        """Device tensors that a decode step changes in place and that the engine's warm-up steps
        must leave as they were (counters behind stats, eviction state): none by default, since
        K/V written past the live lengths is overwritten before it is read."""
        return ()

    def warmup(self, on: bool) -> None:
        """The engine runs a few decode steps before it captures a CUDA graph (kernels compiled,
        allocations settled): warmup(True) before them, warmup(False) after, on the same stream.
        warm_state() is copied before and written back after; a policy that changes more (a full
        host pool overwriting a row) extends this."""
        if on:
            self._warm_saved = [t.clone() for t in self.warm_state()]
        elif self._warm_saved is not None:
            for t, old in zip(self.warm_state(), self._warm_saved):
                t.copy_(old)
            self._warm_saved = None

    def close(self) -> None:
        """Release the cache memory."""
