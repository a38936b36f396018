"""Host-memory limit of the infinigen pool (`--cpu-kv-limit`, InfiniGen section 5): which row of a
full pool each new token overwrites.

With a limit the pooled layers' pool and partial keys hold P < T ROWS per (layer, slot) and are
indexed by row, not by position. Until a sequence has P cached tokens, row = position. After that
each decode step's token overwrites a victim row, chosen per (pooled layer, sequence) on the device:
    eligible  rows whose token is older than the last W cached tokens (evict_window)
    counter   (default) the eligible row selected least often (counter: +1 per KV head that
              selected it, every step), ties -> the oldest token;   fifo: the oldest token
row_pos (P,) per (layer, slot) holds the position in each row (-1 = empty). A row always holds
exactly one live token, so only live tokens are ever evicted. Speculation scores rows
[0, min(n - 1, P)), all live. A prompt longer than P keeps its first P - W and last W tokens
(attention sinks and the recent window); prefill attention itself still sees the whole prompt.
"""
from __future__ import annotations

import math

import torch

from minigen.device import parse_size

EVICT_POLICIES = ("counter", "fifo")


def evict_policy(evict: str | None, cpu_kv_limit) -> str:
    """The eviction rule in effect: `evict` (None = counter), checked; asking for one without a
    host limit is an error (nothing is ever overwritten then), not silently ignored."""
    if evict is not None and cpu_kv_limit is None:
        raise ValueError("--evict chooses the row a full host pool overwrites: it needs --cpu-kv-limit")
    evict = "counter" if evict is None else evict
    if evict not in EVICT_POLICIES:
        raise ValueError(f"evict must be one of {', '.join(EVICT_POLICIES)}, got {evict!r}")
    return evict


def host_limit(cpu_kv_limit, evict: str | None, evict_window: int, recent: int | None) -> tuple:
    """The checked host-limit settings (limit or None, eviction rule, window). A limited pool reuses
    rows, so its last rows are not its last tokens: a recent window (--recent) cannot run on it."""
    limit = None if cpu_kv_limit is None else parse_cpu_kv_limit(cpu_kv_limit)
    rule = evict_policy(evict, limit)
    if isinstance(evict_window, bool) or not isinstance(evict_window, int) or evict_window < 0:
        raise ValueError(f"evict_window must be an int >= 0, got {evict_window!r}")
    if limit is not None and recent:
        raise NotImplementedError("--recent with --cpu-kv-limit is not supported: a limited pool reuses rows, "
                                  "so the last rows are not the last tokens (leave --recent unset or 0)")
    return limit, rule, evict_window


def parse_cpu_kv_limit(text) -> int | float:
    """`--cpu-kv-limit`: bytes as an int (suffixes K/M/G/T, powers of 1024, e.g. "2G") or a
    fraction of the full pool in (0, 1] (a number with a decimal point, e.g. "0.5")."""
    return parse_size(text, "--cpu-kv-limit", "the full pool")


def pool_rows(limit, *, max_seq_len: int, num_slots: int, row_bytes: int, evict_window: int) -> int:
    """Rows P per (pooled layer, slot) under `limit` (a parse_cpu_kv_limit value; None: no limit,
    max_seq_len). row_bytes: K and V of one token of one slot over the pooled layers."""
    W = evict_window
    if limit is None:
        return max_seq_len
    if isinstance(limit, float):
        P, what = math.floor(limit * max_seq_len), f"{limit} of {max_seq_len} tokens"
    else:
        P, what = limit // (row_bytes * num_slots), f"{limit} bytes / ({row_bytes} bytes per token x {num_slots} sequences)"
    if P < W + 1:
        raise ValueError(f"--cpu-kv-limit leaves {P} host KV tokens per sequence ({what}), fewer than the "
                         f"eviction window + 1 = {W + 1}: raise --cpu-kv-limit (or lower evict_window)")
    return min(P, max_seq_len)


def prefill_plan(meta, P: int, W: int, device) -> dict:
    """Which new tokens of a prefill a limited pool keeps, and in which rows (host lengths only):
    all of them at row = position while the sequence fits in P rows; a new prompt longer than P
    keeps its first P - W and last W tokens in rows 0..P-1. Returns device int64 tensors tok (index
    into the prefill's tokens), slot and row (one per kept token) and new_slots (fresh sequences)."""
    tok, slot, row, new_slots, start = [], [], [], [], 0
    for s, n0, n in zip(meta.host_slots, meta.host_start, meta.host_new):
        if n0 + n <= P:
            keep, rows = range(n), range(n0, n0 + n)
        elif n0:
            raise NotImplementedError(
                f"a continued prefill (a chat turn) to {n0 + n} tokens past the host KV limit of {P} tokens "
                f"per sequence is not supported: raise --cpu-kv-limit")
        else:
            keep, rows = [*range(P - W), *range(n - W, n)], range(P)
        if n0 == 0:
            new_slots.append(s)
        tok += [start + t for t in keep]
        slot += [s] * len(rows)
        row += rows
        start += n
    i64 = torch.int64
    return dict(tok=torch.tensor(tok, dtype=i64).to(device), slot=torch.tensor(slot, dtype=i64).to(device),
                row=torch.tensor(row, dtype=i64).to(device), new_slots=torch.tensor(new_slots, dtype=i64).to(device))


def victim_rows(row_pos: torch.Tensor, counter: torch.Tensor, meta, *, rows: int, evict_window: int,
                evict: str, capacity: int) -> torch.Tensor:
    """The row each decode step's new token takes in one pooled layer, (B,) int64 on the device: its
    position while the slot has free rows, else the victim. row_pos / counter: that layer's
    (S, P) positions held and selection counts; capacity: the most tokens a sequence may reach."""
    rp = row_pos[meta.token_slot]                                            # (B, P) positions held
    # live and older than the last W cached tokens (the new token sits at positions[b])
    eligible = (rp >= 0) & (rp < (meta.positions - evict_window)[:, None])
    key = rp if evict == "fifo" else counter[meta.token_slot].long() * capacity + rp
    victim = key.masked_fill(~eligible, torch.iinfo(torch.int64).max).argmin(-1)    # ties: oldest
    full = meta.seq_lens.long() - 1 >= rows                                  # P tokens cached already
    return torch.where(full, victim, meta.positions)


class RowEviction:
    """The row bookkeeping of a limited pool, all on the device: counter (Lp, S, P) int32 (selections
    per row) and row_pos (Lp, S, P) int64 (the position each row holds, -1 empty). The infinigen
    policy calls it at each point of a step where rows are planned, selected or taken."""

    def __init__(self, num_pool_layers: int, num_slots: int, rows: int, *, capacity: int, window: int,
                 rule: str, device):
        self.rows, self.capacity, self.window, self.rule, self.device = rows, capacity, window, rule, device
        shape = (num_pool_layers, num_slots, rows)
        self.counter = torch.zeros(shape, dtype=torch.int32, device=device)
        self.row_pos = torch.full(shape, -1, dtype=torch.int64, device=device)
        self.plan: dict | None = None

    def warm_state(self) -> tuple:
        """What a decode step changes in place (the engine's warm-up puts it back)."""
        return self.counter, self.row_pos

    def plan_prefill(self, meta) -> None:
        """Which new tokens of this prefill are kept, in which rows (prefill_plan)."""
        self.plan = prefill_plan(meta, self.rows, self.window, self.device)

    def prefill_rows(self, j: int, meta) -> None:
        """After pooled layer j's prefill wrote the planned tokens: a new sequence starts with every
        row empty; each kept token's row holds its position with a zero counter."""
        plan = self.plan
        self.row_pos[j, plan["new_slots"]] = -1
        self.counter[j, plan["new_slots"]] = 0
        self.row_pos[j][plan["slot"], plan["row"]] = meta.positions[plan["tok"]]
        self.counter[j][plan["slot"], plan["row"]] = 0

    def count_selected(self, j: int, meta, idx: torch.Tensor, count: torch.Tensor) -> None:
        """+1 to the counter of every row a KV head selected this step; idx (B, Hkv, M) rows, count
        (B, Hkv) live entries."""
        live = torch.arange(idx.shape[-1], device=idx.device) < count[..., None]      # (B, Hkv, M)
        flat = meta.slot_idx.long()[:, None, None] * self.rows + idx.long()           # into counter[j] (S, P)
        # one atomic add per entry (integers: exact in any order); index_put_ with accumulate
        # sorts the indices first, several kernels per layer
        self.counter[j].view(-1).scatter_add_(0, flat.view(-1), live.view(-1).to(torch.int32))

    def victim_rows(self, j: int, meta) -> torch.Tensor:
        """The row each decoding sequence's new token takes in pooled layer j (B,) int64."""
        return victim_rows(self.row_pos[j], self.counter[j], meta, rows=self.rows, evict_window=self.window,
                           evict=self.rule, capacity=self.capacity)

    def took_rows(self, j: int, meta, rows: torch.Tensor) -> None:
        """The new tokens now hold `rows` (B,) of pooled layer j, with fresh counters."""
        self.row_pos[j][meta.token_slot, rows] = meta.positions
        self.counter[j][meta.token_slot, rows] = torch.zeros_like(rows, dtype=torch.int32)   # a tensor: capturable


class HostLimit:
    """What InfiniGenKV (minigen/kv/infinigen.py) does differently when its host pool holds fewer rows
    than the slot capacity: pool sizes, the rows new tokens take, prefill into planned rows, and the
    rows a warm-up step overwrites. A mixin over InfiniGenKV's state (pool, pk, evictor, meta, ops)."""

    @property
    def limited(self) -> bool:
        """The host pool holds fewer rows than the slot capacity (rows are reused)."""
        return self.evictor is not None

    def _pool_rows(self, num_slots: int, max_seq_len: int) -> int:
        """Rows P per (pooled layer, slot) under cpu_kv_limit (max_seq_len without one); a row is K
        and V of one token of one slot over the pooled layers."""
        row = 2 * self.pool_layers * self.num_kv_heads * self.head_dim * (torch.finfo(self.dtype).bits // 8)
        return pool_rows(self.cpu_kv_limit, max_seq_len=max_seq_len, num_slots=num_slots, row_bytes=row,
                         evict_window=self.evict_window)

    def _saved_rows(self, j: int, rows: torch.Tensor) -> tuple:
        """Pool row `rows[b]` of each decoding sequence in pooled layer j as it is now: K, V
        (B, Hkv, D) through gather_kv (one row per kv head) and the partial keys (B, Hkv, R)."""
        meta, Hkv = self.meta, self.num_kv_heads
        B = rows.shape[0]
        idx = rows.to(torch.int32)[:, None, None].expand(B, Hkv, 1).contiguous()
        one = torch.ones((B, Hkv), dtype=torch.int32, device=rows.device)
        k, v = self.ops.gather_kv(*self.pool.heads(j), idx, one, meta.slot_idx)
        return j, meta.token_slot.clone(), rows.clone(), k[:, :, 0], v[:, :, 0], self.pk[j][meta.token_slot, :, :, rows]

    def _decode_rows(self, j: int) -> torch.Tensor:
        """The pool row of each sequence's new token in pooled layer j (B,) int64, on the device:
        its position while the slot has free rows, else the victim (minigen/kv/eviction.py)."""
        if not self.evictor:
            return self.meta.positions
        return self.evictor.victim_rows(j, self.meta)

    def _prefill_attend_limited(self, j: int, q, k, v) -> torch.Tensor:
        """PooledKV.prefill_attend for a limited pool: attention over every token of the prompt
        (GPU staging of the full capacity), then only the planned tokens go to the pool rows.
        A continued sequence fits in P rows (the plan checked it), so its rows are its positions."""
        plan = self.evictor.plan
        out = self.prefill_attention_from_pool(j, q, k, v)
        self.ops.append_kv(k[plan["tok"]], v[plan["tok"]], self.pool.k[j], self.pool.v[j], plan["slot"], plan["row"])
        self.evictor.prefill_rows(j, self.meta)
        return out
