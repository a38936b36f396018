"""The engine: prefill, then a decode loop, over a batch of sequences that share one KV policy.

    prefill   pending prompt tokens of every sequence, packed, in chunks of max_prefill_tokens
              (a chunk continues where the cache ends, so a chat turn prefills only its new text;
              a prompt longer than a limited host pool, kv.whole_prompt_over, gets a chunk of its own)
    decode    one token per sequence per step; on CUDA the step (model + policy) is captured once
              per batch size in a CUDA graph and replayed; static buffers hold tokens/positions
    sample    on the device; the sampled ids cross to the host once per step for streaming and
              stop checks (the one allowed sync)

Host-side lengths drive everything: the engine always knows how many tokens each slot holds, so
metadata is built without reading the GPU.
"""
from __future__ import annotations

import time
import torch

from minigen.errors import ContextOverflowError
from minigen.kv import make_policy
from minigen.kv.base import StepMeta
from minigen.sampler import SamplingParams, make_generator, sample_no_sync
from minigen.sequence import GenStats, Sequence, accept_token


class _DecodeGraph:
    """Static input buffers for a decode step of B sequences, and its CUDA graph when captured."""

    def __init__(self, B: int, device):
        self.tokens = torch.zeros(B, dtype=torch.int64, device=device)
        self.positions = torch.zeros(B, dtype=torch.int64, device=device)
        self.token_slot = torch.zeros(B, dtype=torch.int64, device=device)
        self.slot_idx = torch.zeros(B, dtype=torch.int32, device=device)
        self.seq_lens = torch.zeros(B, dtype=torch.int32, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None
        self.host_slots: list[int] = [0] * B      # host copies, for policies that size transfers
        self.host_start: list[int] = [0] * B

    def meta(self) -> StepMeta:
        return StepMeta(is_prefill=False, positions=self.positions, token_slot=self.token_slot,
                        slot_idx=self.slot_idx, seq_lens=self.seq_lens, host_slots=self.host_slots,
                        host_start=self.host_start, host_new=[1] * len(self.host_slots))


class Engine:
    def __init__(self, model, tokenizer, *, policy: str = "dense", max_batch: int = 1,
                 max_seq_len: int | None = None, cuda_graph: bool = True, max_prefill_tokens: int = 4096,
                 policy_opts: dict | None = None):
        self.model, self.tokenizer = model, tokenizer
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        ctx = model.config.max_seq_len
        if max_seq_len is not None and max_seq_len > ctx:
            raise ContextOverflowError(f"--max-seq-len {max_seq_len} exceeds the model's context of {ctx} tokens")
        self.capacity = max_seq_len or ctx
        self.max_batch, self.max_prefill_tokens = max_batch, max_prefill_tokens
        self.kv = make_policy(policy, model.config, ops=model.ops, project_q=model.project_q, device=self.device,
                              dtype=self.dtype, **(policy_opts or {}))
        self.use_graph = cuda_graph and self.device.type == "cuda" and self.kv.graph_safe
        self.kv.allocate(max_batch, self.capacity)
        self.free_slots = list(range(max_batch))
        self._graphs: dict[int, _DecodeGraph] = {}
        self.stats = GenStats()

    # -- slots ----------------------------------------------------------------------------------
    def new_sequence(self, prompt_ids: list[int]) -> Sequence:
        self.check_fits(len(prompt_ids))
        if not self.free_slots:
            raise RuntimeError(f"all {self.max_batch} sequence slots are in use; raise max_batch")
        return Sequence(slot=self.free_slots.pop(0), pending=list(prompt_ids))

    def release(self, seq: Sequence) -> None:
        self.free_slots.append(seq.slot)
        self.free_slots.sort()

    def release_all(self, seqs: list[Sequence]) -> None:
        for s in seqs:
            self.release(s)

    def check_fits(self, num_tokens: int) -> None:
        if num_tokens + 1 > self.capacity:
            raise ContextOverflowError(
                f"the prompt has {num_tokens} tokens but the context holds {self.capacity} "
                f"(prompt plus at least one new token): shorten the prompt"
                + ("" if self.capacity == self.model.config.max_seq_len else " or raise --max-seq-len"))

    def close(self) -> None:
        self._graphs.clear()
        self.kv.close()

    # -- forward passes -------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, seqs: list[Sequence], all_logits: bool = False):
        """Feed every sequence's pending tokens. Returns the last-token logits (B, V); with
        all_logits, a list per sequence of (n_pending, V) logits instead (for scoring)."""
        last: dict[int, torch.Tensor] = {}
        full: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(seqs))}
        for s in seqs:
            self.check_fits(s.num_cached + len(s.pending))
        while any(s.pending for s in seqs):
            # one chunk: take pending tokens in order until the token budget is spent
            budget, part, whole = self.max_prefill_tokens, [], self.kv.whole_prompt_over
            for i, s in enumerate(seqs):
                if s.pending and budget > 0:
                    n = min(len(s.pending), budget)
                    if whole is not None and n < len(s.pending) and s.num_cached + len(s.pending) > whole:
                        if part:       # a prompt past the host pool's rows: a chunk of its own, next
                            break
                        n = len(s.pending)
                    part.append((i, s, n))
                    budget -= n
            toks, pos, tslot, cu = [], [], [], [0]
            for _, s, n in part:
                toks += s.pending[:n]
                pos += range(s.num_cached, s.num_cached + n)
                tslot += [s.slot] * n
                cu.append(cu[-1] + n)
            dev, i32 = self.device, torch.int32
            meta = StepMeta(
                is_prefill=True,
                positions=torch.tensor(pos, dtype=torch.int64).to(dev),
                token_slot=torch.tensor(tslot, dtype=torch.int64).to(dev),
                slot_idx=torch.tensor([s.slot for _, s, _ in part], dtype=i32).to(dev),
                seq_lens=torch.tensor([s.num_cached + n for _, s, n in part], dtype=i32).to(dev),
                cu_seqlens_q=torch.tensor(cu, dtype=i32).to(dev),
                start_pos=torch.tensor([s.num_cached for _, s, _ in part], dtype=i32).to(dev),
                max_seqlen_q=max(n for _, _, n in part),
                host_slots=[s.slot for _, s, _ in part], host_start=[s.num_cached for _, s, _ in part],
                host_new=[n for _, _, n in part], host_done=[n == len(s.pending) for _, s, n in part])
            logits_idx = None if all_logits else torch.tensor(cu[1:], device=dev) - 1
            saved = [(t, i, t[i].clone()) for t, i in self.kv.prefill_state(meta)]
            try:
                self.kv.begin(meta)
                logits = self.model(torch.tensor(toks, device=dev), meta, self.kv, logits_idx)
            except BaseException:      # interrupted: the policy's per-sequence state as it was
                for t, i, old in saved:
                    t[i] = old
                raise
            for j, (i, s, n) in enumerate(part):
                s.cached_ids += s.pending[:n]
                del s.pending[:n]
                if all_logits:
                    full[i].append(logits[cu[j]:cu[j + 1]])
                elif not s.pending:
                    last[i] = logits[j]
        if all_logits:
            return [torch.cat(full[i]) if full[i] else None for i in range(len(seqs))]
        return torch.stack([last[i] for i in range(len(seqs))])

    def _decode_forward(self, g: _DecodeGraph) -> torch.Tensor:
        """One decode step from the static buffers; advances positions for the next step.
        Everything here is captured into the CUDA graph."""
        meta = g.meta()
        self.kv.begin(meta)
        logits = self.model(g.tokens, meta, self.kv, None)             # (B, V)
        # next step's positions; finished sequences stay clamped inside the slot
        g.positions.add_(1).clamp_(max=self.capacity - 1)
        g.seq_lens.add_(1).clamp_(max=self.capacity)
        g.host_start = [min(p + 1, self.capacity - 1) for p in g.host_start]   # host mirror
        return logits

    def _decode_graph(self, seqs: list[Sequence]) -> _DecodeGraph:
        B = len(seqs)
        g = self._graphs.get(B)
        if g is None:
            g = self._graphs[B] = _DecodeGraph(B, self.device)
        # load this batch's slots and lengths (host -> device, once per generate call)
        g.host_slots = [s.slot for s in seqs]
        g.host_start = [s.num_cached for s in seqs]
        g.slot_idx.copy_(torch.tensor(g.host_slots, dtype=torch.int32))
        g.token_slot.copy_(g.slot_idx)
        g.positions.copy_(torch.tensor([s.num_cached for s in seqs]))
        g.seq_lens.copy_(g.positions + 1)
        if self.use_graph and g.graph is None:
            self._capture(g)
        return g

    def _capture(self, g: _DecodeGraph) -> None:
        saved = (g.positions.clone(), g.seq_lens.clone(), list(g.host_start))
        graph = torch.cuda.CUDAGraph()
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())   # side (warm-up) waits for the buffer loads
            with torch.cuda.stream(side):
                self.kv.warmup(True)
                try:
                    for _ in range(2):                       # compile kernels, settle allocations
                        self._decode_forward(g)
                finally:
                    self.kv.warmup(False)                    # the policy undoes what they changed
            torch.cuda.current_stream().wait_stream(side)   # main waits for the warm-up
            with torch.cuda.graph(graph):
                logits = self._decode_forward(g)
        finally:
            # warm-up wrote K/V past the live lengths (overwritten before read) and advanced positions
            g.positions.copy_(saved[0])
            g.seq_lens.copy_(saved[1])
            g.host_start = saved[2]
        g.graph, g.logits = graph, logits                   # only a completed capture is ever replayed

    @torch.inference_mode()
    def decode_step(self, g: _DecodeGraph) -> torch.Tensor:
        if g.graph is not None:
            g.graph.replay()
            return g.logits
        return self._decode_forward(g)

    @torch.inference_mode()
    def teacher_force(self, seqs: list[Sequence] | Sequence, targets: list[list[int]] | list[int]) -> torch.Tensor:
        """Score `targets` after each sequence's pending tokens, every target through the policy's
        decode path: all pending tokens but the last are prefilled, then the last one and each
        target but the last are fed one decode step at a time, all B sequences in one batch (one
        decode graph of batch B serves the whole run), so the policy decides what every scored
        token sees. Returns the log-probability of every target, (B, n) on the device, n the
        longest target list; a shorter list is padded with 0.0 so a row's sum is its total. Its
        sequence keeps stepping on its last target meanwhile: junk K/V past its real end
        (positions clamp inside the slot), never read, so release such sequences afterwards.
        One Sequence and one list -> (n,). No host sync: the caller reads the result once."""
        if isinstance(seqs, Sequence):
            return self.teacher_force([seqs], [targets])[0]
        if not seqs or len(seqs) != len(targets):
            raise ValueError(f"teacher_force needs one target list per sequence, got {len(seqs)} sequences "
                             f"and {len(targets)} target lists")
        lens = [len(t) for t in targets]
        if min(lens) < 1:
            raise ValueError("teacher_force: every sequence needs at least one target token")
        for s, m in zip(seqs, lens):
            if not s.pending or s.num_cached + len(s.pending) < 2:
                raise ValueError("teacher_force: every sequence needs at least two tokens before its targets, one "
                                 "of them pending (prefilled, then one fed through the decode path)")
            if s.num_cached + len(s.pending) + m > self.capacity:
                raise ContextOverflowError(f"{s.num_cached + len(s.pending) + m} tokens exceed the {self.capacity}-"
                                           f"token slot; lower --context or raise --max-seq-len")
        B, n, dev = len(seqs), max(lens), self.device
        held = [s.pending.pop() for s in seqs]           # the last context token: the first decode step's
        try:
            padded = [list(t) + [t[-1]] * (n - len(t)) for t in targets]
            tgt = torch.tensor(padded, dtype=torch.int64).T.contiguous().to(dev)           # (n, B)
            first = torch.tensor(held, dtype=torch.int64).to(dev)                          # (B,)
            valid = (torch.arange(n)[None, :] < torch.tensor(lens)[:, None]).to(dev)     # (B, n)
            out = torch.empty((n, B), dtype=torch.float32, device=dev)
            if any(s.pending for s in seqs):
                self.prefill([s for s in seqs if s.pending])
            g = self._decode_graph(seqs)
            for t in range(n):
                # step t is fed the held token (t = 0) or target t - 1; its logits predict target t
                g.tokens.copy_(first if t == 0 else tgt[t - 1])
                logits = self.decode_step(g)                                              # (B, V)
                out[t] = torch.log_softmax(logits.float(), -1).gather(1, tgt[t, :, None])[:, 0]
        except BaseException:
            # the held token goes back last in pending (prefill takes from the front), so nothing
            # of the context is lost; cached_ids did not move, so a retry rewrites the same slots
            for s, h in zip(seqs, held):
                s.pending.append(h)
            raise
        for s, h, tg in zip(seqs, held, targets):
            s.cached_ids += [h] + tg[:-1]    # fed and cached: the held token, every target but the last
        return out.T.masked_fill(~valid, 0.0)                                         # (B, n)

    # -- generation -----------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, seqs: list[Sequence], sp: SamplingParams):
        """Run seqs to completion; yields a list of (seq, new_text) after every step."""
        t0 = time.perf_counter()
        gen = make_generator(sp.seed, self.device)
        eos = set() if sp.ignore_eos else set(self.tokenizer.eos_ids)
        for s in seqs:
            s.output_ids, s.text, s.held, s.finished, s.finish_reason = [], "", "", False, None
            s.decoder = self.tokenizer.stream_decoder()
        self.stats = st = GenStats(prompt_tokens=sum(len(s.pending) for s in seqs))
        g, t1 = None, None
        try:
            next_tok = sample_no_sync(self.prefill(seqs), sp, gen)
            while True:
                ids = next_tok.tolist()          # sync: sampled tokens to the host (stream + stop checks)
                if g is None:
                    st.prefill_s = time.perf_counter() - t0
                yield [(s, accept_token(s, t, sp, eos, self.capacity)) for s, t in zip(seqs, ids) if not s.finished]
                if all(s.finished for s in seqs):
                    break
                if g is None:
                    g = self._decode_graph(seqs)     # first decode: CUDA-graph capture, not timed
                    t1 = time.perf_counter()
                g.tokens.copy_(next_tok)
                logits = self.decode_step(g)
                for s, t in zip(seqs, ids):
                    if not s.finished:
                        s.cached_ids.append(t)
                next_tok = sample_no_sync(logits, sp, gen)
        finally:   # also when stopped early (Ctrl-C, the caller closing the generator): what did run
            st.new_tokens = sum(len(s.output_ids) for s in seqs)
            st.decode_tokens = max(0, st.new_tokens - len(seqs))   # each one's first token came from prefill
            st.decode_s = time.perf_counter() - t1 if t1 is not None else 0.0
