"""plan_reuse and gather_kv with a resident set: kernel vs reference, bit for bit, over several
steps of overlapping selections; the gathered rows always equal a plain gather from the pool."""
from __future__ import annotations

import pytest
import torch

from minigen.kernels.gather_kv import gather_kv, gather_kv_ref
from minigen.kernels.reuse import plan_reuse, plan_reuse_ref
from tests.helpers import BAD_IDX, poison


def empty_state(S, Hkv, T, C, device="cpu"):
    loc = torch.full((S, Hkv, T), -1, dtype=torch.int32, device=device)
    tag = torch.full((S, Hkv, C), -1, dtype=torch.int32, device=device)
    stamp = torch.full((S, Hkv, C), -1, dtype=torch.int32, device=device)
    return loc, tag, stamp


def selections(B, Hkv, T, M, steps, seed, keep=0.6):
    """Per step: idx (B, Hkv, M) of distinct rows, about `keep` of each head's previous selection
    again (consecutive decode steps overlap), counts in [1, M]; entries past count are BAD_IDX."""
    gen = torch.Generator().manual_seed(seed)
    prev = [[torch.randperm(T, generator=gen)[:M] for _ in range(Hkv)] for _ in range(B)]
    out = []
    for _ in range(steps):
        count = torch.randint(1, M + 1, (B, Hkv), generator=gen, dtype=torch.int32)
        idx = torch.full((B, Hkv, M), BAD_IDX, dtype=torch.int32)
        for b in range(B):
            for g in range(Hkv):
                n = int(count[b, g])
                old = prev[b][g][torch.rand(len(prev[b][g]), generator=gen) < keep]
                fresh = torch.randperm(T, generator=gen)
                fresh = fresh[~torch.isin(fresh, old)]
                rows = torch.cat([old, fresh])[:n]
                idx[b, g, :n] = rows[torch.randperm(n, generator=gen)].to(torch.int32)
                prev[b][g] = rows
        out.append((idx, count))
    return out


CASES = {   # (B, Hkv, S, T, M, C, D)
    "B1-Hkv1-C=M": (1, 1, 2, 40, 7, 7, 16),
    "B2-Hkv3-C2.3M": (2, 3, 3, 61, 9, 21, 48),
    "B3-Hkv2-C4M": (3, 2, 4, 50, 5, 20, 80),
}


@pytest.mark.parametrize("case", CASES)
def test_plan_kernel_matches_reference_and_gather_is_exact(case):
    B, Hkv, S, T, M, C, D = CASES[case]
    gen = torch.Generator().manual_seed(3)
    k_pool, v_pool = (torch.randn((S, Hkv, T, D), generator=gen, dtype=torch.float16) for _ in range(2))
    slot_idx = torch.randperm(S, generator=gen)[:B].to(torch.int32)
    state = {impl: empty_state(S, Hkv, T, C) for impl in ("kernel", "ref")}
    caches = {impl: (poison((S, Hkv, C, D), torch.float16), poison((S, Hkv, C, D), torch.float16))
              for impl in state}
    hits = {impl: torch.zeros((), dtype=torch.int64) for impl in state}
    total_hits = 0
    for t, (idx, count) in enumerate(selections(B, Hkv, T, M, steps=6, seed=5)):
        step = torch.tensor(t, dtype=torch.int32)
        want_k, want_v = gather_kv_ref(k_pool, v_pool, idx, count, slot_idx,
                                       poison((B, Hkv, M, D), torch.float16), poison((B, Hkv, M, D), torch.float16))
        srcs = {}
        for impl, plan, gather in (("kernel", plan_reuse, gather_kv), ("ref", plan_reuse_ref, gather_kv_ref)):
            loc, tag, stamp = state[impl]
            src = plan(idx, count, slot_idx, loc, tag, stamp, step, hits[impl],
                       out_src=torch.full((B, Hkv, M), 7777, dtype=torch.int32))
            got_k, got_v = gather(k_pool, v_pool, idx, count, slot_idx,
                                  poison((B, Hkv, M, D), torch.float16), poison((B, Hkv, M, D), torch.float16),
                                  src=src, cache_k=caches[impl][0], cache_v=caches[impl][1])
            valid = torch.arange(M) < count[..., None]
            for got, want in ((got_k, want_k), (got_v, want_v)):
                assert torch.equal(got[valid], want[valid]), f"{impl} step {t}: gathered rows differ from the pool"
                assert got[~valid].isnan().all(), f"{impl} step {t}: wrote past count"
            assert (src[~valid] == 7777).all(), f"{impl}: src written past count"
            srcs[impl] = src
            # invariants: every resident row's cache row holds it, and its K/V there are the pool's
            for s in range(S):
                for g in range(Hkv):
                    rows = (loc[s, g] >= 0).nonzero().flatten()
                    crow = loc[s, g, rows].long()
                    assert torch.equal(tag[s, g, crow].long(), rows), f"{impl}: loc and tag disagree"
                    assert torch.equal(caches[impl][0][s, g, crow], k_pool[s, g, rows]), f"{impl}: stale cache row"
        assert torch.equal(srcs["kernel"], srcs["ref"]), f"step {t}: different plans"
        for a, b in zip(state["kernel"], state["ref"]):
            assert torch.equal(a, b), f"step {t}: different bookkeeping"
        n_hit = int(((srcs["ref"] >= 0) & (torch.arange(M) < count[..., None])).sum())
        total_hits += n_hit
        if t > 0 and C > M:
            assert n_hit > 0, "overlapping selections must hit the resident set"
    assert int(hits["kernel"]) == int(hits["ref"]) == total_hits


def test_least_recently_used_row_is_evicted():
    """C = 4 rows, one head: rows 1,2 then 3,4 fill it; at step 2 row 1 hits and row 5 evicts the
    least recently used (2, last used at step 0), not 3 or 4 (step 1) or 1 (this step)."""
    loc, tag, stamp = empty_state(1, 1, 8, 4)
    hits, slot, count = torch.zeros((), dtype=torch.int64), torch.zeros(1, dtype=torch.int32), torch.full((1, 1), 2, dtype=torch.int32)
    for step, rows in enumerate(([1, 2], [3, 4], [1, 5])):
        src = plan_reuse(torch.tensor([[rows]], dtype=torch.int32), count, slot, loc, tag, stamp,
                         torch.tensor(step, dtype=torch.int32), hits)
    assert int(hits) == 1 and int(src[0, 0, 0]) == int(loc[0, 0, 1]) >= 0
    assert int(loc[0, 0, 2]) == -1, "row 2 (least recently used) must be evicted"
    assert all(int(loc[0, 0, r]) >= 0 for r in (1, 3, 4, 5))
    assert int(src[0, 0, 1]) == -1 - int(loc[0, 0, 5])


def test_stale_tag_does_not_evict_a_moved_row():
    """A cleared loc (the pool row was overwritten) leaves a stale tag; when the row comes back in
    another cache row, evicting the stale one must not clear the new loc."""
    loc, tag, stamp = empty_state(1, 1, 8, 2)
    hits, slot = torch.zeros((), dtype=torch.int64), torch.zeros(1, dtype=torch.int32)
    one = torch.ones((1, 1), dtype=torch.int32)
    for step, (row, clear) in enumerate(((3, False), (6, True), (3, False), (7, False))):
        plan_reuse_ref(torch.tensor([[[row]]], dtype=torch.int32), one, slot, loc, tag, stamp,
                       torch.tensor(step, dtype=torch.int32), hits)
        if clear:
            loc[0, 0, 3] = -1     # pool row 3 rewritten: the caller clears its loc, its tag stays
    # step 2: row 3 is a miss again and takes the oldest cache row (its own stale one, step 0);
    # step 3: row 7 evicts row 6's cache row; row 3 stays resident
    assert int(loc[0, 0, 3]) >= 0 and int(tag[0, 0, loc[0, 0, 3]]) == 3 and int(loc[0, 0, 6]) == -1


def test_refusals():
    loc, tag, stamp = empty_state(1, 1, 8, 2)
    idx = torch.zeros((1, 1, 3), dtype=torch.int32)
    args = (torch.ones((1, 1), dtype=torch.int32), torch.zeros(1, dtype=torch.int32), loc, tag, stamp,
            torch.zeros((), dtype=torch.int32), torch.zeros((), dtype=torch.int64))
    with pytest.raises(ValueError, match="cannot hold a selection of 3"):
        plan_reuse(idx, *args)
    pool = torch.zeros((1, 1, 8, 16))
    with pytest.raises(ValueError, match="together"):
        gather_kv_ref(pool, pool, idx, args[0], args[1], src=idx)


@pytest.mark.gpu
@pytest.mark.parametrize("M,C", [(1606, 3212), (655, 655), (6554, 8192)])
def test_plan_and_gather_on_cuda(M, C):
    """Real sizes (5% of 32K tokens with twice the rows resident, 2% with C = M, 5% of 128K with
    the most rows a resident set holds):
    the CUDA kernels (tl.sort of next_pow2(C) keys, tl.gather) give the reference's plan, and the
    gather through the resident set equals a plain gather from the pinned pool."""
    from tests.helpers import pinned_pools
    B, Hkv, S, T, D = 2, 8, 3, 32 * M // 2 + 7, 128
    k_pool, v_pool = pinned_pools(S, Hkv, T, D, torch.float16, seed=1)
    slot_idx = torch.tensor([2, 0], dtype=torch.int32, device="cuda")
    state = [t.cuda() for t in empty_state(S, Hkv, T, C)]
    ref_state = [t.clone().cpu() for t in state]
    cache = [torch.full((S, Hkv, C, D), float("nan"), dtype=torch.float16, device="cuda") for _ in range(2)]
    hits, ref_hits = torch.zeros((), dtype=torch.int64, device="cuda"), torch.zeros((), dtype=torch.int64)
    gen = torch.Generator(device="cuda").manual_seed(0)
    prev = torch.rand((B, Hkv, T), device="cuda", generator=gen)
    for t in range(4):
        prev = 0.7 * prev + 0.3 * torch.rand((B, Hkv, T), device="cuda", generator=gen)   # drifting scores
        idx = prev.topk(M, dim=-1).indices.to(torch.int32)
        count = torch.randint(M // 2, M + 1, (B, Hkv), device="cuda", dtype=torch.int32, generator=gen)
        step = torch.tensor(t, dtype=torch.int32, device="cuda")
        src = plan_reuse(idx, count, slot_idx, *state, step, hits)
        ref = plan_reuse_ref(idx.cpu(), count.cpu(), slot_idx.cpu(), *ref_state, step.cpu(), ref_hits)
        valid = (torch.arange(M, device="cuda") < count[..., None]).cpu()
        assert torch.equal(src.cpu()[valid], ref[valid]), f"step {t}: plans differ"
        for a, b in zip(state, ref_state):
            assert torch.equal(a.cpu(), b), f"step {t}: bookkeeping differs"
        got = gather_kv(k_pool, v_pool, idx, count, slot_idx, src=src, cache_k=cache[0], cache_v=cache[1])
        want = gather_kv(k_pool, v_pool, idx, count, slot_idx)
        for x, y in zip(got, want):
            assert torch.equal(x[valid.cuda()], y[valid.cuda()]), f"step {t}: gathered rows differ"
    assert int(hits) == int(ref_hits) > 0
