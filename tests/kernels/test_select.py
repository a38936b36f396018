"""select: Triton kernel (TRITON_INTERPRET=1 on CPU) == select_ref == a brute-force Python oracle,
exactly (indices and counts), plus the properties InfiniGen relies on: ties to the lower index,
the cap, the GQA union, nothing past seq_lens, alpha=inf + budget=1 selects everything.

Scores past each sequence's length are filled with a huge value (not -inf), so a kernel that
reads past seq_lens selects them and fails loudly.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import minigen.kernels.select as mod
from minigen.kernels.partial_qk import partial_qk_ref
from minigen.kernels.select import select, select_ref

GARBAGE = 1.0e9
POISON = -7                                     # out= buffers start as this: every slot must be rewritten


# ---------------------------------------------------------------- helpers
def make_scores(lens, H, T, kind="randn", seed=0, device="cpu"):
    """(B, H, T) fp32 scores: `kind` inside each sequence, GARBAGE past it."""
    gen = torch.Generator().manual_seed(seed)
    B = len(lens)
    if kind == "randn":
        s = torch.randn(B, H, T, generator=gen) * 3
    elif kind == "ints":                       # many exact ties
        s = torch.randint(0, 4, (B, H, T), generator=gen).float()
    elif kind == "ulps":                       # values a few ulps apart: exercises the low radix digits
        base = np.float32(1.5)
        steps = torch.randint(0, 40, (B, H, T), generator=gen).numpy()
        vals = np.full(steps.shape, base, dtype=np.float32)
        for _ in range(40):
            vals = np.where(steps > 0, np.nextafter(vals, np.float32(0)), vals)
            steps = steps - 1
        s = torch.from_numpy(vals)
    else:
        raise ValueError(kind)
    for b, n in enumerate(lens):
        s[b, :, n:] = GARBAGE
    return s.to(device), torch.tensor(lens, dtype=torch.int32, device=device)


def oracle(scores, lens, alpha, budget, G, max_select, recent=0):
    """Brute force from the spec, Python loops over (b, g, t); fp32 arithmetic via numpy."""
    s = scores.cpu().numpy().astype(np.float32)
    B, H, T = s.shape
    idx = np.zeros((B, H // G, max_select), dtype=np.int64)
    count = np.zeros((B, H // G), dtype=np.int64)
    neg_alpha = np.float32(-alpha) if alpha < 3.5e38 else np.float32(-np.inf)
    for b in range(B):
        n = min(lens[b], T)
        cap = int(np.ceil(np.float32(n) * np.float32(budget)))
        cap = min(max_select, max(1, cap))
        for g in range(H // G):
            heads = range(g * G, (g + 1) * G)
            m = {h: max(s[b, h, t] for t in range(n)) for h in heads}
            ns = [max(np.float32(s[b, h, t] - m[h]) for h in heads) for t in range(n)]
            w = min(recent, cap // 2)                       # the recent window: at most half the cap
            ns = [np.float32(1 + t) if t >= n - w else ns[t] for t in range(n)]   # above all others
            cand = [t for t in range(n) if ns[t] > neg_alpha]
            chosen = sorted(sorted(cand, key=lambda t: (-ns[t], t))[:cap])
            count[b, g] = len(chosen)
            idx[b, g, :len(chosen)] = chosen
    return torch.from_numpy(idx).int(), torch.from_numpy(count).int()


def run_both(scores, seq_lens, alpha, budget, G, max_select, recent=0):
    """Kernel (into poisoned out= buffers) and ref; asserts they are identical; returns ref's."""
    B, H, _ = scores.shape
    out_idx = torch.full((B, H // G, max_select), POISON, dtype=torch.int32, device=scores.device)
    out_count = torch.full((B, H // G), POISON, dtype=torch.int32, device=scores.device)
    start = 1000 + int(seq_lens.sum())                   # the running total starts anywhere
    total = torch.tensor(start, dtype=torch.int64, device=scores.device)
    ref_total = total.clone()
    idx, count = select(scores, seq_lens, alpha, budget, G, max_select, out_idx=out_idx, out_count=out_count,
                        total=total, recent=recent)
    assert idx is out_idx and count is out_count
    ref_idx, ref_count = select_ref(scores, seq_lens, alpha, budget, G, max_select, total=ref_total, recent=recent)
    assert total.item() == ref_total.item() == start + int(ref_count.sum()), "total != start + sum(count)"
    assert ref_idx.dtype == torch.int32 and ref_count.dtype == torch.int32
    assert torch.equal(count, ref_count), f"counts differ:\nkernel {count.tolist()}\nref    {ref_count.tolist()}"
    bad = (idx != ref_idx).nonzero().tolist()
    assert not bad, f"indices differ at {bad[:8]}: kernel {[idx[tuple(i)].item() for i in bad[:8]]}, " \
                    f"ref {[ref_idx[tuple(i)].item() for i in bad[:8]]}"
    return ref_idx, ref_count


def small_tiles(monkeypatch, block_t=32):
    """block_t-token blocks: the running offsets, radix passes and zero tail cross block edges."""
    monkeypatch.setattr(mod, "_MAX_BLOCK_T", block_t)
    monkeypatch.setattr(mod, "_BLOCK_OUT", 16)


# id: (seq_lens, H, G, T)
CASES = {
    "mha-ragged":   ([37, 5, 1], 4, 1, 37),
    "gqa3-long":    ([300, 129, 64], 6, 3, 300),
    "gqa2-cap>T":   ([100, 1], 4, 2, 120),
}
# id: (alpha, budget, max_select); the cap binds for the small budgets, not for the wide ones
KNOBS = {
    "binds":        (4.0, 0.1, 64),
    "tight":        (2.0, 0.02, 16),
    "loose":        (2.0, 1.0, 400),
    "maxsel-binds": (30.0, 1.0, 8),
    "all":          (float("inf"), 1.0, 300),
    "inf-binds":    (float("inf"), 0.1, 64),      # threshold off, fixed fraction: radix straight away
}


# ---------------------------------------------------------------- (a) kernel == ref, (b) ref == oracle
@pytest.mark.parametrize("kind", ["randn", "ints", "ulps"])
@pytest.mark.parametrize("tiles", ["default", "32"])
@pytest.mark.parametrize("knobs", KNOBS.values(), ids=KNOBS.keys())
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_select_matches_ref_and_oracle(case, knobs, tiles, kind, monkeypatch):
    if tiles == "32":
        small_tiles(monkeypatch)
    lens, H, G, T = case
    alpha, budget, max_select = knobs
    scores, seq_lens = make_scores(lens, H, T, kind, seed=len(lens) + H)
    idx, count = run_both(scores, seq_lens, alpha, budget, G, max_select)
    want_idx, want_count = oracle(scores, lens, alpha, budget, G, max_select)
    assert torch.equal(count, want_count), f"ref counts {count.tolist()} != oracle {want_count.tolist()}"
    assert torch.equal(idx, want_idx), "ref indices != oracle"


@pytest.mark.parametrize("tiles", ["default", "32"])
@pytest.mark.parametrize("kind", ["randn", "ulps"])
@pytest.mark.parametrize("digit", [5, 8])
def test_select_digit_widths(digit, kind, tiles, monkeypatch):
    # the radix digit width is a speed choice, not semantics: 5 bits (seven passes, the last one
    # bit wide) and 8 bits (four) select exactly what the ref and the oracle select
    monkeypatch.setattr(mod, "_DIGIT", digit)
    if tiles == "32":
        small_tiles(monkeypatch)
    lens, H, G, T = CASES["gqa3-long"]
    scores, seq_lens = make_scores(lens, H, T, kind, seed=11)
    for alpha, budget, max_select in (KNOBS["binds"], KNOBS["tight"], KNOBS["inf-binds"]):
        idx, count = run_both(scores, seq_lens, alpha, budget, G, max_select)
        want_idx, want_count = oracle(scores, lens, alpha, budget, G, max_select)
        assert torch.equal(count, want_count) and torch.equal(idx, want_idx)


@pytest.mark.parametrize("tiles", ["default", "32"])
@pytest.mark.parametrize("recent", [1, 7, 500])
@pytest.mark.parametrize("knobs", ["binds", "loose", "all", "inf-binds"])
def test_select_recent_matches_ref_and_oracle(knobs, recent, tiles, monkeypatch):
    # recent > 0: the last min(recent, cap // 2) tokens rank above all others (500: longer than every row)
    if tiles == "32":
        small_tiles(monkeypatch)
    lens, H, G, T = CASES["gqa3-long"]
    alpha, budget, max_select = KNOBS[knobs]
    scores, seq_lens = make_scores(lens, H, T, "randn", seed=13)
    idx, count = run_both(scores, seq_lens, alpha, budget, G, max_select, recent=recent)
    want_idx, want_count = oracle(scores, lens, alpha, budget, G, max_select, recent=recent)
    assert torch.equal(count, want_count) and torch.equal(idx, want_idx)


def test_select_recent_keeps_the_last_tokens():
    # the last 5 tokens score far below everything else, yet with recent=5 all of them are kept
    # next to the 5 best-scoring others; with recent=0 none of them is; recent=12 is cut to half
    # the cap (5): the same selection as recent=5
    n, G = 100, 2
    s = torch.randn(1, 2 * G, n) * 3
    s[..., n - 5:] = -1.0e4
    got = {}
    for recent, want_last in ((5, 5), (0, 0), (12, 5)):
        idx, count = run_both(s, torch.tensor([n], dtype=torch.int32), float("inf"), 0.1, G, 10, recent=recent)
        assert count.tolist() == [[10, 10]]
        assert [int((row >= n - 5).sum()) for row in idx[0]] == [want_last] * 2
        got[recent] = idx
    assert torch.equal(got[12], got[5])


def test_select_cases_cover_both_branches():
    # |C| > cap (the radix path) for "binds"/"tight", |C| <= cap for "loose" on the long case
    lens, H, G, T = CASES["gqa3-long"]
    scores, seq_lens = make_scores(lens, H, T, "randn", seed=len(lens) + H)
    num_c = lambda alpha: select_ref(scores, seq_lens, alpha, 1.0, G, T)[1]   # cap n: count = |C|
    n = torch.tensor(lens)[:, None]
    assert (num_c(4.0) > torch.ceil(0.1 * n)).all()                        # "binds"
    assert (num_c(2.0) > torch.ceil(0.02 * n)).all()                       # "tight"
    assert (num_c(2.0) < n).all()                                          # "loose": threshold only


# ---------------------------------------------------------------- (c) ties go to the lower index
@pytest.mark.parametrize("tiles", ["default", "32"])
def test_select_ties_lower_index_wins(tiles, monkeypatch):
    if tiles == "32":
        small_tiles(monkeypatch)
    # one head, n=100: the max 5 at t=90; value 4 at every t % 7 == 3 (14 tokens); the rest 0.
    # alpha 2 -> C = {90} + the 14 fours; budget 0.06 -> cap 6: 90 plus the 5 LOWEST fours.
    n = 100
    s = torch.zeros(1, 1, n)
    fours = [t for t in range(n) if t % 7 == 3]
    s[0, 0, fours] = 4.0
    s[0, 0, 90] = 5.0
    idx, count = run_both(s, torch.tensor([n], dtype=torch.int32), 2.0, 0.06, 1, 10)
    assert count.item() == 6
    assert idx[0, 0, :6].tolist() == sorted(fours[:5] + [90])
    assert idx[0, 0, 6:].tolist() == [0] * 4
    # integer scores, cap inside a big tie group, several heads and sequences: oracle agrees
    scores, seq_lens = make_scores([200, 77], 4, 200, "ints", seed=3)
    for budget in (0.05, 0.13, 0.3):
        got = run_both(scores, seq_lens, 1.5, budget, 2, 64)
        want = oracle(scores, [200, 77], 1.5, budget, 2, 64)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_select_negative_zero_ties_positive_zero():
    # -0.0 and +0.0 are equal: they tie (lower index first), they do not order by sign bit
    s = torch.tensor([[[-0.0, 0.0, -0.0, 0.0, -3.0]]])
    idx, count = run_both(s, torch.tensor([5], dtype=torch.int32), 1.0, 0.4, 1, 4)   # cap 2 of 4 ties
    assert idx[0, 0].tolist() == [0, 1, 0, 0] and count.item() == 2


# ---------------------------------------------------------------- (d) alpha=inf, budget 1: dense
@pytest.mark.parametrize("alpha", [float("inf"), 1e30, 1e40])
@pytest.mark.parametrize("tiles", ["default", "32"])
def test_select_everything(alpha, tiles, monkeypatch):
    if tiles == "32":
        small_tiles(monkeypatch)
    lens, H, G, T = [300, 129, 1], 6, 3, 300
    scores, seq_lens = make_scores(lens, H, T, "randn", seed=5)
    scores[:, :, 7] *= 1e6                                 # wild logits do not matter either
    idx, count = run_both(scores, seq_lens, alpha, 1.0, G, T)
    for b, n in enumerate(lens):
        assert (count[b] == n).all()
        assert (idx[b, :, :n] == torch.arange(n, dtype=torch.int32)).all()
        assert (idx[b, :, n:] == 0).all()


# ---------------------------------------------------------------- (e) the cap
@pytest.mark.parametrize("budget", [0.0, 0.05, 0.2, 0.25, 0.5])
def test_select_cap_respected(budget):
    # alpha 50 makes every token a candidate, so the cap decides the count exactly. The cap's
    # product is fp32 (like the kernel's): ceil(fp32(0.05) * 300) = 15 where float64 says 16.
    lens, H, G, T = [300, 129, 64, 3], 4, 2, 300
    scores, seq_lens = make_scores(lens, H, T, "randn", seed=6)
    for max_select in (5, 300):
        idx, count = run_both(scores, seq_lens, 50.0, budget, G, max_select)
        for b, n in enumerate(lens):
            cap32 = min(max_select, max(1, int(np.ceil(np.float32(budget) * np.float32(n)))))
            assert (count[b] == cap32).all()
            assert (count[b] <= min(max_select, max(1, math.ceil(budget * n)))).all()


# ---------------------------------------------------------------- (f) GQA union
def test_select_gqa_union():
    # 3 heads in one group; each head peaks at its own token, everything else far below
    n = 40
    s = torch.full((1, 3, n), -100.0)
    s[0, 0, 5], s[0, 1, 9], s[0, 2, 20] = 2.0, 7.0, -50.0   # different row maxima on purpose
    s[0, 1, 30] = 6.5                                       # within alpha of head 1's max only
    idx, count = run_both(s, torch.tensor([n], dtype=torch.int32), 1.0, 1.0, 3, 8)
    assert count.item() == 4 and idx[0, 0, :4].tolist() == [5, 9, 20, 30]
    # the same heads as separate kv heads (G=1): each keeps only its own
    idx, count = run_both(s, torch.tensor([n], dtype=torch.int32), 1.0, 1.0, 1, 8)
    assert count[0].tolist() == [1, 2, 1] and idx[0, 1, :2].tolist() == [9, 30]


# ---------------------------------------------------------------- (g) nothing past seq_lens
def test_select_never_past_seq_lens():
    # GARBAGE past n (and -inf from real partial_qk output) is never selected, even with alpha inf
    lens, H, G, T = [37, 5, 1], 6, 2, 37
    scores, seq_lens = make_scores(lens, H, T, "randn", seed=7)
    for alpha, budget in ((float("inf"), 1.0), (3.0, 0.5), (3.0, 0.01)):
        idx, count = run_both(scores, seq_lens, alpha, budget, G, T)
        for b, n in enumerate(lens):
            for g in range(H // G):
                assert (idx[b, g, :count[b, g]] < n).all()
    # through partial_qk's -inf tails
    q, cols, pk = torch.randn(3, H, 16), torch.randn(3, H // G, 16, 12), torch.randn(3, H // G, 12, T)
    s = partial_qk_ref(q, cols, pk, seq_lens, torch.tensor([2, 0, 1], dtype=torch.int32), 0.25)
    idx, count = run_both(s, seq_lens, float("inf"), 1.0, G, T)
    assert count.tolist() == [[37] * 3, [5] * 3, [1] * 3]


# ---------------------------------------------------------------- (h) n = 1, clamps, errors
def test_select_single_token_and_clamp():
    s, seq_lens = make_scores([1, 1], 2, 9, "randn", seed=8)
    idx, count = run_both(s, seq_lens, 0.5, 0.0, 1, 4)
    assert count.tolist() == [[1, 1], [1, 1]] and (idx == 0).all()
    # seq_lens past the row width is clamped to T (memory safety), ref and kernel agree
    s, _ = make_scores([9], 2, 9, "randn", seed=8)
    idx, count = run_both(s, torch.tensor([50], dtype=torch.int32), float("inf"), 1.0, 2, 16)
    assert count.item() == 9


def test_select_bad_args():
    s, seq_lens = make_scores([5], 4, 5, "randn")
    with pytest.raises(ValueError, match="alpha"):
        select(s, seq_lens, 0.0, 0.2, 1, 4)
    with pytest.raises(ValueError, match="budget"):
        select(s, seq_lens, 4.0, float("nan"), 1, 4)
    with pytest.raises(ValueError, match="group_size"):
        select(s, seq_lens, 4.0, 0.2, 3, 4)
    with pytest.raises(ValueError, match="max_select"):
        select(s, seq_lens, 4.0, 0.2, 1, 0)
    with pytest.raises(ValueError, match="float32"):
        select(s.half(), seq_lens, 4.0, 0.2, 1, 4)
    with pytest.raises(ValueError, match="out_idx"):
        select(s, seq_lens, 4.0, 0.2, 1, 4, out_idx=torch.empty(1, 4, 5, dtype=torch.int32))
    with pytest.raises(ValueError, match="total"):
        select(s, seq_lens, 4.0, 0.2, 1, 4, total=torch.zeros(1, dtype=torch.int64))
    for bad in (-1, 2.0, True):
        with pytest.raises(ValueError, match="recent"):
            select(s, seq_lens, 4.0, 0.2, 1, 4, recent=bad)


# ---------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["randn", "ints", "ulps"])
@pytest.mark.parametrize("knobs", KNOBS.values(), ids=KNOBS.keys())
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_select_cuda_small(case, knobs, kind):
    # the interpreter cases on the GPU: tiny blocks, few warps, slice layouts into tl.histogram
    lens, H, G, T = case
    scores, seq_lens = make_scores(lens, H, T, kind, seed=len(lens) + H, device="cuda")
    run_both(scores, seq_lens, *knobs[:2], G, knobs[2])


@pytest.mark.gpu
@pytest.mark.parametrize("knobs", [(5.0, 0.2), (5.0, 0.001), (float("inf"), 1.0), (1.5, 0.01)],
                         ids=["infinigen", "cap-binds", "all", "ties"])
@pytest.mark.parametrize("recent", [0, 16])
@pytest.mark.parametrize("T", [8192, 32768])
@pytest.mark.parametrize("Hkv", [32, 8])
def test_select_cuda(Hkv, T, recent, knobs):
    B, H = 8, 32
    alpha, budget = knobs
    lens = [T, T - 1, T // 2 + 3, 1, 4097, T // 3, 257, T - 64]
    scores, seq_lens = make_scores(lens, H, T, "ints" if alpha == 1.5 else "randn", device="cuda")
    max_select = T if budget == 1.0 else math.ceil(budget * T) + 1
    idx, count = run_both(scores, seq_lens, alpha, budget, H // Hkv, max_select, recent=recent)
    if budget == 1.0:
        assert count[:, 0].tolist() == lens
