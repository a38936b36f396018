"""partial_qk: Triton kernel (TRITON_INTERPRET=1 on CPU) vs partial_qk_ref vs an fp64 loop oracle.

Every case fills the partial key cache past each sequence's tokens (and unused slots) with NaN
and huge values, so a masking slip shows up as NaN / a huge error rather than a rounding one.
"""
from __future__ import annotations

import pytest
import torch
import triton

import kernels.partial_qk as mod
from kernels.partial_qk import partial_qk, partial_qk_ref
from tests.helpers import TOLERANCES, assert_close, poison

# id: (seq_lens, slot_idx, num_slots S, capacity Tcap, H, Hkv, R)
CASES = {
    "T1-mha-R16":        ([1], [0], 1, 1, 4, 4, 16),
    "ragged3-gqa-R25":   ([37, 5, 1], [2, 0, 3], 4, 37, 6, 2, 25),
    "mqa-R12-cap50":     ([12, 30], [1, 0], 3, 50, 3, 1, 12),
    "mha-R25-slot1":     ([37], [1], 2, 40, 4, 4, 25),
}


def make_inputs(case, dtype, device="cpu", seed=0):
    """randn pq and partial keys for tokens [0, seq_lens[b]) of each slot; NaN / +-1e4 elsewhere."""
    lens, slots, S, T, H, Hkv, R = case
    gen = torch.Generator().manual_seed(seed)
    pq = torch.randn(len(lens), H, R, generator=gen)
    pk = torch.full((S, Hkv, T, R), float("nan"))
    pk[..., ::2] = 1.0e4                                   # a mix of NaN and huge finite garbage
    for n, slot in zip(lens, slots):
        pk[slot, :, :n] = torch.randn(Hkv, n, R, generator=gen)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=device)
    slot_idx = torch.tensor(slots, dtype=torch.int32, device=device)
    return pq.to(dtype).to(device), pk.to(dtype).to(device), seq_lens, slot_idx


def oracle(pq, pk, lens, slots):
    """Independent fp64 loops over (b, h, t): the definition, nothing vectorized."""
    B, H, R = pq.shape
    Hkv, T = pk.shape[1], pk.shape[2]
    G = H // Hkv
    out = torch.full((B, H, T), float("-inf"), dtype=torch.float64)
    q, k = pq.double(), pk.double()
    for b in range(B):
        for h in range(H):
            for t in range(lens[b]):
                out[b, h, t] = float((q[b, h] * k[slots[b], h // G, t]).sum())
    return out


def check_tails(scores, lens):
    """-inf exactly at t >= seq_lens[b], finite before."""
    for b, n in enumerate(lens):
        assert torch.isfinite(scores[b, :, :n]).all(), f"seq {b}: non-finite score before seq_len {n}"
        assert (scores[b, :, n:] == float("-inf")).all(), f"seq {b}: tail past seq_len {n} is not -inf"


# ---------------------------------------------------------------- kernel vs reference
@pytest.mark.parametrize("tiles", ["default", "16"])
@pytest.mark.parametrize("dtype,atol,rtol", TOLERANCES, ids=lambda x: str(x).replace("torch.", ""))
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_partial_qk_matches_ref(case, dtype, atol, rtol, tiles, monkeypatch):
    if tiles == "16":
        # 16-token tiles: several blocks per row, some wholly past seq_lens (the -inf-only path)
        monkeypatch.setattr(mod, "_TILE", 16 * triton.next_power_of_2(case[-1]))
        assert mod._launch_config(case[-1])["BLOCK_T"] == 16
    pq, pk, seq_lens, slot_idx = make_inputs(case, dtype)
    want = partial_qk_ref(pq, pk, seq_lens, slot_idx)
    assert want.dtype == torch.float32
    got = partial_qk(pq, pk, seq_lens, slot_idx)
    check_tails(got, case[0])
    assert_close(got, want, atol, rtol, "partial_qk")
    out = poison(want.shape, torch.float32)                                # every element written
    assert partial_qk(pq, pk, seq_lens, slot_idx, out=out) is out
    check_tails(out, case[0])
    assert_close(out, want, atol, rtol, "partial_qk out=")


def test_partial_qk_ref_is_formula():
    # the reference against fp64 loops, fp32 and fp16 inputs (fp16 products are exact in fp32)
    for dtype in (torch.float32, torch.float16):
        case = CASES["ragged3-gqa-R25"]
        pq, pk, seq_lens, slot_idx = make_inputs(case, dtype, seed=1)
        ref = partial_qk_ref(pq, pk, seq_lens, slot_idx)
        check_tails(ref, case[0])
        assert_close(ref, oracle(pq, pk, case[0], case[1]), 1e-5, 1e-5, f"ref vs fp64 loops {dtype}")


def test_partial_qk_out_of_place_views():
    # pq as a slice of a wider projection (row-strided), out as a slice of a wider buffer
    case = CASES["mqa-R12-cap50"]
    pq, pk, seq_lens, slot_idx = make_inputs(case, torch.float32, seed=2)
    B, H, R = pq.shape
    wide = torch.randn(B, H, 2 * R)
    wide[..., R:] = pq
    pq_view = wide[..., R:]
    assert not pq_view.is_contiguous()
    big = poison((B, H + 2, pk.shape[2]), torch.float32)
    out = big[:, 1:H + 1]
    partial_qk(pq_view, pk, seq_lens, slot_idx, out=out)
    assert_close(out, partial_qk_ref(pq, pk, seq_lens, slot_idx), 1e-5, 1e-5, "strided")
    assert torch.isnan(big[:, 0]).all() and torch.isnan(big[:, -1]).all(), "wrote outside out"


def test_partial_qk_bad_shapes():
    pq, pk, seq_lens, slot_idx = make_inputs(CASES["ragged3-gqa-R25"], torch.float32)
    with pytest.raises(ValueError, match="R=12"):
        partial_qk(pq[..., :12], pk, seq_lens, slot_idx)
    with pytest.raises(ValueError, match="multiple"):
        partial_qk(pq[:, :5], pk, seq_lens, slot_idx)
    with pytest.raises(ValueError, match="int32"):
        partial_qk(pq, pk, seq_lens.long(), slot_idx)
    with pytest.raises(ValueError, match="out"):
        partial_qk(pq, pk, seq_lens, slot_idx, out=torch.empty(3, 6, 37, dtype=torch.float16))


# ---------------------------------------------------------------- GPU, realistic shapes
@pytest.mark.gpu
@pytest.mark.parametrize("dtype,atol,rtol", TOLERANCES[1:], ids=["fp16", "bf16"])
@pytest.mark.parametrize("T", [8192, 32768])
@pytest.mark.parametrize("Hkv", [32, 8])
def test_partial_qk_cuda(Hkv, T, dtype, atol, rtol):
    B, H, R = 8, 32, 25
    lens = [T, T - 1, T // 2 + 3, 1, 4097, T // 3, 257, T - 64]
    case = (lens, [7, 6, 5, 4, 3, 2, 1, 0], 8, T, H, Hkv, R)
    pq, pk, seq_lens, slot_idx = make_inputs(case, dtype, device="cuda")
    got = partial_qk(pq, pk, seq_lens, slot_idx, out=poison((B, H, T), torch.float32, "cuda"))
    want = partial_qk_ref(pq, pk, seq_lens, slot_idx)
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    assert_close(got, want, atol, rtol, "partial_qk cuda")
