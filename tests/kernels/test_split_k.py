"""split_k: the reduce kernel vs its torch reference vs an fp64 softmax over the keys the partials
came from, the no-op with one split, and the shared scratch layout.

The partials are built from real keys (scores and values, a few per split, some splits empty),
so the oracle is the attention itself, not the combine formula: o = sum_t 2^s'_t V_t / sum_t 2^s'_t
over every key of the row. Every split that holds keys moves the answer well past the tolerances
(test_dropping_a_split_is_caught), so a reduce that skipped one would fail.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from minigen.kernels.split_k import attention_tiles, reduce_splits, reduce_splits_ref, split_scratch
from tests.helpers import TOLERANCES, assert_close, poison

# id: (B, H, num_splits, D)
CASES = {
    "S3-D80":  (2, 5, 3, 80),
    "S7-D64":  (3, 2, 7, 64),
    "S7-D80":  (1, 3, 7, 80),
    "S2-D48":  (2, 3, 2, 48),
}
KEYS = 4            # keys per split (fewer where a split is partly filled, none where empty)


def make_partials(B, H, S, D, seed=0, only_first=False):
    """Random keys per (b, h, split) and the fp32 partials (acc, m, l) of each split, plus the
    fp64 oracle (B, H, D). About 30% of the splits are empty, split 0 of row (0, 0) among them;
    every row keeps at least one split with keys, and in the last row all of them hold keys (so
    each split matters somewhere). only_first: split 0 alone holds keys (a short
    row: the later splits are past its end). Scores s' = randn + a per-row offset in [-200, 200]
    (log2 domain): 2^s' would overflow or vanish in fp32 without the rescale to the max, while
    within a row the keys' weights stay within a few powers of 2, so every split counts."""
    gen = torch.Generator().manual_seed(seed)
    offset = 400 * torch.rand(B, H, 1, 1, generator=gen, dtype=torch.float64) - 200
    s = torch.randn(B, H, S, KEYS, generator=gen, dtype=torch.float64) + offset
    v = torch.randn(B, H, S, KEYS, D, generator=gen, dtype=torch.float64)
    n = torch.randint(1, KEYS + 1, (B, H, S), generator=gen)              # keys per split
    if only_first:
        n[:, :, 1:] = 0
    else:
        n = torch.where(torch.rand(B, H, S, generator=gen) < 0.3, 0, n)
        n[0, 0, 0] = 0
        n[-1, -1] = n[-1, -1].clamp(min=1)                                # every split holds keys here
        rescue = torch.randint(1 if S > 1 else 0, S, (B, H), generator=gen)   # rows left empty
        n = torch.where((n == 0).all(-1, keepdim=True) & F.one_hot(rescue, S).bool(), 1, n)
    valid = torch.arange(KEYS) < n[..., None]                             # (B, H, S, KEYS)

    # ---- partials, as kernel 1 leaves them: (acc 0, m -inf, l 0) for an empty split
    m = torch.where(valid, s, float("-inf")).amax(-1)                     # (B, H, S)
    p = torch.where(valid, torch.exp2(s - m[..., None]), 0.0)             # (B, H, S, KEYS)
    l = p.sum(-1)
    acc = (p[..., None] * v).sum(-2)                                      # (B, H, S, D)

    # ---- oracle: softmax in base 2 over all keys of the row, fp64
    sr, vr, okr = s.reshape(B, H, -1), v.reshape(B, H, -1, D), valid.reshape(B, H, -1)
    top = torch.where(okr, sr, float("-inf")).amax(-1, keepdim=True)
    w = torch.where(okr, torch.exp2(sr - top), 0.0)                       # (B, H, S * KEYS)
    want = (w[..., None] * vr).sum(-2) / w.sum(-1, keepdim=True)         # (B, H, D)
    return acc.float(), m.float(), l.float(), want


def scratch_with(acc, m, l, out):
    """The partials copied into split_scratch's buffers; every other scratch element is NaN, so a
    read outside the documented rows shows up."""
    B, H, S, D = acc.shape
    part_acc, part_max, part_sum = split_scratch(B, H, D, S, out)
    rows = B * H * S
    part_acc.fill_(float("nan"))
    part_max.fill_(float("nan"))                    # the max piece runs on over the pad and sums
    part_acc.copy_(acc.reshape(-1))
    part_max[:rows].copy_(m.reshape(-1))
    part_sum[:rows].copy_(l.reshape(-1))
    return part_acc, part_max, part_sum


def block_d(D):
    return attention_tiles(D, 1, torch.float16)["BLOCK_D"]


# ---------------------------------------------------------------- kernel vs reference vs oracle
@pytest.mark.parametrize("dtype,atol,rtol", TOLERANCES, ids=lambda x: str(x).replace("torch.", ""))
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_reduce_matches_ref_and_oracle(case, dtype, atol, rtol):
    B, H, S, D = case
    acc, m, l, want = make_partials(B, H, S, D, seed=S * 100 + D)
    assert (m == float("-inf")).any() and (m[:, :, 0] == float("-inf")).any(), "no empty splits"
    out_k, out_r = poison((B, H, D), dtype), poison((B, H, D), dtype)
    reduce_splits(*scratch_with(acc, m, l, out_k), out_k, S, block_d(D))
    reduce_splits_ref(*scratch_with(acc, m, l, out_r), out_r, S, block_d(D))
    assert_close(out_r, want, atol, rtol, f"reduce_splits_ref vs fp64 oracle, {dtype}")
    assert_close(out_k, want, atol, rtol, f"reduce_splits vs fp64 oracle, {dtype}")
    assert_close(out_k, out_r, atol, rtol, f"reduce_splits vs reduce_splits_ref, {dtype}")


def test_reduce_only_first_split_holds_keys():
    """The usual short-row case: every split after 0 is past the end of the row (empty)."""
    B, H, S, D = 2, 3, 7, 64
    acc, m, l, want = make_partials(B, H, S, D, seed=7, only_first=True)
    for fn in (reduce_splits, reduce_splits_ref):
        out = poison((B, H, D), torch.float32)
        fn(*scratch_with(acc, m, l, out), out, S, block_d(D))
        assert_close(out, want, 1e-4, 1e-4, f"{fn.__name__}, only split 0")


def test_reduce_strided_out():
    """out as a slice of a wider buffer: written through its strides, nothing outside it."""
    B, H, S, D = CASES["S3-D80"]
    acc, m, l, want = make_partials(B, H, S, D, seed=3)
    for fn in (reduce_splits, reduce_splits_ref):
        wide = poison((B, H + 1, D), torch.float16)
        fn(*scratch_with(acc, m, l, wide[:, 1:]), wide[:, 1:], S, block_d(D))
        assert_close(wide[:, 1:], want, 2e-3, 2e-3, f"{fn.__name__}, strided out")
        assert torch.isnan(wide[:, 0]).all(), f"{fn.__name__} wrote outside out"


def test_single_split_is_a_noop():
    """num_splits 1: kernel 1 wrote out itself and the scratch aliases out; nothing to combine."""
    B, H, D = 2, 3, 64
    for fn in (reduce_splits, reduce_splits_ref):
        out = poison((B, H, D), torch.float32)
        parts = split_scratch(B, H, D, 1, out)
        assert all(p is out for p in parts)
        fn(*parts, out, 1, block_d(D))
        assert torch.isnan(out).all(), f"{fn.__name__} touched out with one split"


# ---------------------------------------------------------------- the test can fail
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_dropping_a_split_is_caught(case):
    """Emptying any one split that holds keys (what a reduce that skipped it would compute) puts
    the result outside even the loosest tolerance of the comparison above."""
    B, H, S, D = case
    acc, m, l, want = make_partials(B, H, S, D, seed=S * 100 + D)
    _, atol, rtol = TOLERANCES[-1]
    held = m != float("-inf")                                             # (B, H, S)
    tried = 0
    for k in range(S):
        # rows where split k holds keys besides another split (alone, dropping it leaves 0 / 0)
        drop = held[:, :, k] & (held.sum(-1) > 1)
        if not drop.any():
            continue
        a, mk, lk = acc.clone(), m.clone(), l.clone()
        a[:, :, k][drop], mk[:, :, k][drop], lk[:, :, k][drop] = 0.0, float("-inf"), 0.0
        out = poison((B, H, D), torch.float32)
        reduce_splits_ref(*scratch_with(a, mk, lk, out), out, S, block_d(D))
        with pytest.raises(AssertionError):
            assert_close(out, want, atol, rtol, f"split {k} dropped")
        tried += 1
    assert tried == S, f"only {tried} of {S} splits could be dropped"


def test_reduce_rejects_bad_partials():
    B, H, S, D = CASES["S3-D80"]
    acc, m, l, _ = make_partials(B, H, S, D)
    out = torch.empty(B, H, D)
    parts = scratch_with(acc, m, l, out)
    with pytest.raises(ValueError, match="num_splits"):
        reduce_splits(*parts, out, 0, block_d(D))
    with pytest.raises(ValueError, match="part_acc"):
        reduce_splits(parts[0][:-1], *parts[1:], out, S, block_d(D))
    with pytest.raises(ValueError, match="part_sum"):
        reduce_splits(*parts[:2], parts[2].double(), out, S, block_d(D))
