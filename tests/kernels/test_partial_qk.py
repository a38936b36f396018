"""partial_qk: Triton kernel (TRITON_INTERPRET=1 on CPU) vs partial_qk_ref vs an fp64 loop oracle.

Every case fills the partial key cache past each sequence's tokens (and unused slots) with NaN
and huge values, and the skew columns of unused slots likewise, so a masking or slot slip shows
up as NaN / a huge error rather than a rounding one.
"""
from __future__ import annotations

import pytest
import torch

import minigen.kernels.partial_qk as mod
from minigen.kernels.partial_qk import partial_qk, partial_qk_ref
from tests.helpers import TOLERANCES, assert_close, poison

# id: (seq_lens, slot_idx, num_slots S, capacity T, H, Hkv, D, R)
CASES = {
    "T1-mha-D16-R16":      ([1], [0], 1, 1, 4, 4, 16, 16),
    "ragged3-gqa-D64-R25": ([37, 5, 1], [2, 0, 3], 4, 37, 6, 2, 64, 25),
    "mqa-D48-R12-cap50":   ([12, 30], [1, 0], 3, 50, 3, 1, 48, 12),
    "mha-D128-R25-slot1":  ([300], [1], 2, 301, 4, 4, 128, 25),
    "gqa3-D64-R32-long":   ([700, 513], [0, 1], 2, 777, 9, 3, 64, 32),
}


def make_inputs(case, dtype, device="cpu", seed=0, pad=0):
    """randn q, skew columns and partial keys for tokens [0, seq_lens[b]) of each used slot;
    NaN / +-1e4 everywhere else. pad > 0 stores pk with a token stride of T + pad (a view)."""
    lens, slots, S, T, H, Hkv, D, R = case
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(len(lens), H, D, generator=gen)
    cols = torch.full((S, Hkv, D, R), float("nan"))
    pk = torch.full((S, Hkv, R, T + pad), float("nan"))
    pk[..., ::2] = 1.0e4                                   # a mix of NaN and huge finite garbage
    for n, slot in zip(lens, slots):
        cols[slot] = torch.randn(Hkv, D, R, generator=gen) / D ** 0.5
        pk[slot, :, :, :n] = torch.randn(Hkv, R, n, generator=gen)
    pk = pk.to(dtype).to(device)[..., :T]
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=device)
    slot_idx = torch.tensor(slots, dtype=torch.int32, device=device)
    return q.to(dtype).to(device), cols.to(dtype).to(device), pk, seq_lens, slot_idx, D ** -0.5


def oracle(q, cols, pk, lens, slots, scale):
    """Independent fp64 loops over (b, h, t): the definition, nothing vectorized."""
    B, H, D = q.shape
    Hkv, R, T = pk.shape[1:]
    G = H // Hkv
    out = torch.full((B, H, T), float("-inf"), dtype=torch.float64)
    q, c, k = q.double(), cols.double(), pk.double()
    for b in range(B):
        s = slots[b]
        for h in range(H):
            pq = [scale * float((q[b, h] * c[s, h // G, :, r]).sum()) for r in range(R)]
            for t in range(lens[b]):
                out[b, h, t] = sum(pq[r] * float(k[s, h // G, r, t]) for r in range(R))
    return out


def check_tails(scores, lens):
    """-inf exactly at t >= seq_lens[b], finite before."""
    for b, n in enumerate(lens):
        assert torch.isfinite(scores[b, :, :n]).all(), f"seq {b}: non-finite score before seq_len {n}"
        assert (scores[b, :, n:] == float("-inf")).all(), f"seq {b}: tail past seq_len {n} is not -inf"


# ---------------------------------------------------------------- kernel vs reference
@pytest.mark.parametrize("tiles", ["default", "16x3"])
@pytest.mark.parametrize("dtype,atol,rtol", TOLERANCES, ids=lambda x: str(x).replace("torch.", ""))
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_partial_qk_matches_ref(case, dtype, atol, rtol, tiles, monkeypatch):
    if tiles == "16x3":
        # 16-token tiles, several per program: the tile loop, runs ending mid-tile and tiles
        # wholly past seq_lens (masked loads, -inf writes)
        monkeypatch.setattr(mod, "_BLOCK_T", 16)
        monkeypatch.setattr(mod, "_TARGET_PROGRAMS", 1)
        T, H, B = case[3], case[4], len(case[0])
        assert T <= 16 or mod._launch_config(T, H, B)["tokens_per_prog"] >= 32   # several tiles a run
    q, cols, pk, seq_lens, slot_idx, scale = make_inputs(case, dtype, pad=5)
    want = partial_qk_ref(q, cols, pk, seq_lens, slot_idx, scale)
    assert want.dtype == torch.float32
    got = partial_qk(q, cols, pk, seq_lens, slot_idx, scale)
    check_tails(got, case[0])
    assert_close(got, want, atol, rtol, "partial_qk")
    out = poison(want.shape, torch.float32)                                # every element written
    assert partial_qk(q, cols, pk, seq_lens, slot_idx, scale, out=out) is out
    check_tails(out, case[0])
    assert_close(out, want, atol, rtol, "partial_qk out=")


def test_partial_qk_ref_is_formula():
    # the reference against fp64 loops, fp32 and fp16 inputs
    for dtype in (torch.float32, torch.float16):
        case = CASES["ragged3-gqa-D64-R25"]
        q, cols, pk, seq_lens, slot_idx, scale = make_inputs(case, dtype, seed=1)
        ref = partial_qk_ref(q, cols, pk, seq_lens, slot_idx, scale)
        check_tails(ref, case[0])
        assert_close(ref, oracle(q, cols, pk, case[0], case[1], scale), 1e-5, 1e-5, f"ref vs fp64 loops {dtype}")


def test_partial_qk_scale_and_columns_matter():
    # the projection is not the identity, the scale is applied once: scores move with both
    case = CASES["mqa-D48-R12-cap50"]
    q, cols, pk, seq_lens, slot_idx, scale = make_inputs(case, torch.float32, seed=3)
    base = partial_qk(q, cols, pk, seq_lens, slot_idx, scale)
    n = case[0][0]
    assert_close(partial_qk(q, cols, pk, seq_lens, slot_idx, 2 * scale)[0, :, :n], 2 * base[0, :, :n],
                 1e-5, 1e-5, "scale")
    swapped = cols.clone()
    swapped[:, :, :, [0, 1]] = cols[:, :, :, [1, 0]]
    other = partial_qk(q, swapped, pk, seq_lens, slot_idx, scale)
    assert (other[0, :, :n] - base[0, :, :n]).abs().max() > 1e-3


def test_partial_qk_strided_views():
    # q as a slice of a wider projection (row-strided), out as a slice of a wider buffer
    case = CASES["mqa-D48-R12-cap50"]
    q, cols, pk, seq_lens, slot_idx, scale = make_inputs(case, torch.float32, seed=2)
    B, H, D = q.shape
    wide = torch.randn(B, H, 2 * D)
    wide[..., D:] = q
    q_view = wide[..., D:]
    assert not q_view.is_contiguous()
    big = poison((B, H + 2, pk.shape[-1]), torch.float32)
    out = big[:, 1:H + 1]
    partial_qk(q_view, cols, pk, seq_lens, slot_idx, scale, out=out)
    assert_close(out, partial_qk_ref(q, cols, pk, seq_lens, slot_idx, scale), 1e-5, 1e-5, "strided")
    assert torch.isnan(big[:, 0]).all() and torch.isnan(big[:, -1]).all(), "wrote outside out"


def test_partial_qk_bad_shapes():
    q, cols, pk, seq_lens, slot_idx, scale = make_inputs(CASES["ragged3-gqa-D64-R25"], torch.float32)
    with pytest.raises(ValueError, match="R=25"):
        partial_qk(q, cols[..., :12], pk, seq_lens, slot_idx, scale)
    with pytest.raises(ValueError, match="D=32"):
        partial_qk(q[..., :32], cols, pk, seq_lens, slot_idx, scale)
    with pytest.raises(ValueError, match="multiple"):
        partial_qk(q[:, :5], cols, pk, seq_lens, slot_idx, scale)
    with pytest.raises(ValueError, match="int32"):
        partial_qk(q, cols, pk, seq_lens.long(), slot_idx, scale)
    with pytest.raises(ValueError, match="out"):
        partial_qk(q, cols, pk, seq_lens, slot_idx, scale, out=torch.empty(3, 6, 37, dtype=torch.float16))
    with pytest.raises(ValueError, match="contiguous"):
        partial_qk(q, cols, pk.transpose(2, 3).contiguous().transpose(2, 3), seq_lens, slot_idx, scale)


# ---------------------------------------------------------------- GPU, realistic shapes
@pytest.mark.gpu
@pytest.mark.parametrize("dtype,atol,rtol", TOLERANCES[1:], ids=["fp16", "bf16"])
@pytest.mark.parametrize("T", [8192, 32768])
@pytest.mark.parametrize("Hkv", [32, 8])
def test_partial_qk_cuda(Hkv, T, dtype, atol, rtol):
    B, H, D, R = 8, 32, 128, 25
    lens = [T, T - 1, T // 2 + 3, 1, 4097, T // 3, 257, T - 64]
    case = (lens, [7, 6, 5, 4, 3, 2, 1, 0], 8, T, H, Hkv, D, R)
    q, cols, pk, seq_lens, slot_idx, scale = make_inputs(case, dtype, device="cuda", pad=3)
    got = partial_qk(q, cols, pk, seq_lens, slot_idx, scale, out=poison((B, H, T), torch.float32, "cuda"))
    want = partial_qk_ref(q, cols, pk, seq_lens, slot_idx, scale)
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    assert_close(got, want, atol, rtol, "partial_qk cuda")
