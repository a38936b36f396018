"""gather_kv: Triton kernel vs the torch reference vs a per-row Python loop, bit for bit.

Every case poisons the outputs (NaN) and fills idx past count with an index far outside the
pool, so a kernel that writes rows past count, or dereferences idx entries past count, fails.
"""
from __future__ import annotations

import pytest
import torch

import minigen.kernels.gather_kv as mod
from minigen.kernels.gather_kv import gather_kv, gather_kv_ref
from tests.helpers import BAD_IDX, gpu_selection, pinned_pools, poison

DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# id: (B, Hkv, D, slots S, Tcap, max_select N)
CASES = {
    "B1-Hkv1-D64-N5":  (1, 1, 64, 2, 37, 5),
    "B3-Hkv2-D48-N17": (3, 2, 48, 5, 37, 17),
    "B3-Hkv3-D80-N17": (3, 3, 80, 4, 37, 17),
    "B1-Hkv2-D64-N37": (1, 2, 64, 1, 37, 37),     # N = Tcap: a full selection
}


def make_selection(B, Hkv, S, Tcap, N, seed=0):
    """Random ascending idx (distinct tokens of [0, Tcap)) with counts in [1, N], the first head
    at count 1 and the last at N; permuted distinct slots. Entries past count are BAD_IDX."""
    gen = torch.Generator().manual_seed(seed)
    count = torch.randint(1, N + 1, (B, Hkv), generator=gen, dtype=torch.int32)
    count[0, 0], count[-1, -1] = 1, N
    idx = torch.full((B, Hkv, N), BAD_IDX, dtype=torch.int32)
    for b in range(B):
        for g in range(Hkv):
            n = int(count[b, g])
            idx[b, g, :n] = torch.randperm(Tcap, generator=gen)[:n].sort().values.to(torch.int32)
    slot_idx = torch.randperm(S, generator=gen)[:B].to(torch.int32)
    return idx, count, slot_idx


def make_inputs(case, dtype, seed=0, device="cpu"):
    B, Hkv, D, S, Tcap, N = case
    gen = torch.Generator().manual_seed(seed + 100)
    k_pool = torch.randn(S, Hkv, Tcap, D, generator=gen).to(dtype)
    v_pool = torch.randn(S, Hkv, Tcap, D, generator=gen).to(dtype)
    idx, count, slot_idx = make_selection(B, Hkv, S, Tcap, N, seed)
    return k_pool, v_pool, idx.to(device), count.to(device), slot_idx.to(device)


def loop_oracle(k_pool, v_pool, idx, count, slot_idx):
    """Row by row in Python: {(b, g, j): (k row, v row)} for j < count."""
    rows = {}
    for b, slot in enumerate(slot_idx.tolist()):
        for g in range(k_pool.shape[1]):
            for j in range(int(count[b, g])):
                t = int(idx[b, g, j])
                rows[b, g, j] = (k_pool[slot, g, t], v_pool[slot, g, t])
    return rows


def bits(t: torch.Tensor) -> torch.Tensor:
    """Raw storage as integers: equality of these is bit equality (NaN, -0 included)."""
    return t.view({1: torch.int8, 2: torch.int16, 4: torch.int32}[t.element_size()])


def assert_rows(out_k, out_v, want_k, want_v, count, what):
    """Rows j < count bit-identical to want; rows past count still NaN (poison untouched)."""
    N = out_k.shape[2]
    valid = (torch.arange(N, device=count.device) < count[..., None]).cpu()        # (B, Hkv, N)
    for name, got, want in (("k", out_k, want_k), ("v", out_v, want_v)):
        got, want = got.cpu(), want.cpu()
        same = (bits(got) == bits(want)).all(-1)                                   # (B, Hkv, N)
        bad = valid & ~same
        assert not bad.any(), f"{what} {name}: {int(bad.sum())} selected rows differ, first at " \
                              f"{tuple(bad.nonzero()[0].tolist())}"
        touched = ~valid & ~torch.isnan(got.float()).all(-1)
        assert not touched.any(), f"{what} {name}: {int(touched.sum())} rows past count were " \
                                  f"written, first at {tuple(touched.nonzero()[0].tolist())}"


def small_blocks(monkeypatch):
    """BLOCK_J 4: several blocks per head, most of the later ones past count (early exit)."""
    real = mod._launch_config
    monkeypatch.setattr(mod, "_launch_config", lambda d, dtype: {**real(d, dtype), "BLOCK_J": 4})


# ---------------------------------------------------------------- kernel vs reference vs loop
@pytest.mark.parametrize("blocks", ["default", "4", "4-persistent"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_gather_matches_ref_bit_exact(case, dtype, blocks, monkeypatch):
    if blocks != "default":
        small_blocks(monkeypatch)
    if blocks == "4-persistent":   # one block program per head: it must walk every block
        monkeypatch.setattr(mod, "MAX_PROGRAMS", 1)
    args = make_inputs(case, dtype)
    B, Hkv, D, S, Tcap, N = case
    out_k, out_v = poison((B, Hkv, N, D), dtype), poison((B, Hkv, N, D), dtype)
    got_k, got_v = gather_kv(*args, out_k=out_k, out_v=out_v)
    assert got_k is out_k and got_v is out_v
    ref_k, ref_v = gather_kv_ref(*args, out_k=poison((B, Hkv, N, D), dtype),
                                 out_v=poison((B, Hkv, N, D), dtype))
    assert_rows(out_k, out_v, ref_k, ref_v, args[3], "kernel vs ref")
    assert_rows(ref_k, ref_v, out_k, out_v, args[3], "ref vs kernel")


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_gather_ref_matches_loop(case):
    """The reference against an independent row-by-row Python loop."""
    args = make_inputs(case, torch.float16, seed=1)
    B, Hkv, D, S, Tcap, N = case
    ref_k, ref_v = gather_kv_ref(*args, out_k=poison((B, Hkv, N, D), torch.float16),
                                 out_v=poison((B, Hkv, N, D), torch.float16))
    want_k, want_v = poison((B, Hkv, N, D), torch.float16), poison((B, Hkv, N, D), torch.float16)
    for (b, g, j), (k_row, v_row) in loop_oracle(*args).items():
        want_k[b, g, j], want_v[b, g, j] = k_row, v_row
    assert_rows(ref_k, ref_v, want_k, want_v, args[3], "ref vs loop")


def test_gather_allocates_outputs():
    """out_k/out_v omitted: fresh (B, Hkv, N, D) buffers in the pools' dtype, selected rows exact."""
    case = CASES["B3-Hkv2-D48-N17"]
    args = make_inputs(case, torch.bfloat16, seed=2)
    k_sel, v_sel = gather_kv(*args)
    assert k_sel.shape == v_sel.shape == (3, 2, 17, 48) and k_sel.dtype == torch.bfloat16
    rows = loop_oracle(*args)
    assert all(torch.equal(bits(k_sel[key]), bits(k)) and torch.equal(bits(v_sel[key]), bits(v))
               for key, (k, v) in rows.items())


def test_gather_strided_pool_views():
    """Pools that are one layer of a (L, S, Hkv, Tcap, D) stack, outputs slices of wider buffers."""
    B, Hkv, D, S, Tcap, N = CASES["B3-Hkv3-D80-N17"]
    gen = torch.Generator().manual_seed(3)
    stack = torch.randn(2, 2, S, Hkv, Tcap, D, generator=gen)                     # (k|v, L, ...)
    idx, count, slot_idx = make_selection(B, Hkv, S, Tcap, N, seed=3)
    wide_k, wide_v = poison((B, Hkv + 1, N, D), torch.float32), poison((B, Hkv + 1, N, D), torch.float32)
    gather_kv(stack[0, 1], stack[1, 1], idx, count, slot_idx, out_k=wide_k[:, 1:], out_v=wide_v[:, 1:])
    want_k, want_v = gather_kv_ref(stack[0, 1].contiguous(), stack[1, 1].contiguous(), idx, count,
                                   slot_idx, out_k=poison((B, Hkv, N, D), torch.float32),
                                   out_v=poison((B, Hkv, N, D), torch.float32))
    assert_rows(wide_k[:, 1:], wide_v[:, 1:], want_k, want_v, count, "strided")
    assert torch.isnan(wide_k[:, 0]).all() and torch.isnan(wide_v[:, 0]).all(), "wrote outside out="


def test_gather_rejects_bad_inputs():
    k_pool, v_pool, idx, count, slot_idx = make_inputs(CASES["B3-Hkv2-D48-N17"], torch.float32)
    with pytest.raises(ValueError, match="int32"):
        gather_kv(k_pool, v_pool, idx.long(), count, slot_idx)
    with pytest.raises(ValueError, match="count"):
        gather_kv(k_pool, v_pool, idx, count[:, :1], slot_idx)
    with pytest.raises(ValueError, match="pools"):
        gather_kv(k_pool, v_pool.half(), idx, count, slot_idx)
    with pytest.raises(ValueError, match="out_k"):
        gather_kv(k_pool, v_pool, idx, count, slot_idx, out_k=torch.empty(1))


# ---------------------------------------------------------------- GPU, pinned host pool
REAL = dict(B=8, Hkv=32, D=128, S=8, Tcap=32768, N=3277)     # Llama-2-7B heads, 10% of 32K


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_gather_gpu_pinned_realistic(dtype):
    B, Hkv, D, S, Tcap, N = REAL.values()
    k_pool, v_pool = pinned_pools(S, Hkv, Tcap, D, dtype, seed=0)
    assert k_pool.is_pinned()
    idx, count, slot_idx = gpu_selection(B, Hkv, S, Tcap, N, seed=0)
    out_k, out_v = poison((B, Hkv, N, D), dtype, "cuda"), poison((B, Hkv, N, D), dtype, "cuda")
    gather_kv(k_pool, v_pool, idx, count, slot_idx, out_k=out_k, out_v=out_v)
    ref_k, ref_v = gather_kv_ref(k_pool, v_pool, idx, count, slot_idx,
                                 out_k=poison((B, Hkv, N, D), dtype, "cuda"),
                                 out_v=poison((B, Hkv, N, D), dtype, "cuda"))
    assert_rows(out_k, out_v, ref_k, ref_v, count, "pinned gather")


@pytest.mark.gpu
def test_gather_gpu_rejects_pageable_pool():
    k_pool = torch.zeros(1, 1, 8, 64, dtype=torch.float16)                          # pageable
    idx = torch.zeros(1, 1, 4, dtype=torch.int32, device="cuda")
    count = torch.ones(1, 1, dtype=torch.int32, device="cuda")
    slot_idx = torch.zeros(1, dtype=torch.int32, device="cuda")
    with pytest.raises(ValueError, match="pin_memory"):
        gather_kv(k_pool, k_pool.clone(), idx, count, slot_idx)
