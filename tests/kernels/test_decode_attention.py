"""decode_attention: split-K Triton kernels vs the torch reference, the reference vs an fp64 SDPA
oracle, and the split heuristic.

Every case fills the cache past each sequence's keys (and unused slots) with large garbage, so a
masking slip shows up as a huge error rather than a rounding one.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import minigen.kernels.decode_attention as mod
from minigen.kernels.decode_attention import decode_attention, decode_attention_ref, decode_num_splits
from tests.helpers import TOLERANCES, assert_close, poison

GARBAGE = 1.0e4


# ---------------------------------------------------------------- cases
# id: (seq_lens, slot_idx, num_slots S, capacity T, H, Hkv, D)
CASES = {
    "T1-one-token":      ([1], [0], 1, 1, 4, 4, 64),
    "ragged3-gqa-D48":   ([1, 37, 5], [2, 0, 1], 3, 37, 6, 2, 48),
    "mqa-slots-D80":     ([37, 12], [2, 0], 3, 50, 3, 1, 80),
}


def make_inputs(case, dtype, device="cpu", garbage=GARBAGE, seed=0):
    """Random q and caches: keys [0, seq_lens[b]) of each sequence's slot are randn, the rest of
    the cache (tail of every slot, unused slots) is `garbage`."""
    lens, slots, S, T, H, Hkv, D = case
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(len(lens), H, D, generator=gen).to(dtype)
    k_cache = torch.full((S, Hkv, T, D), garbage)
    v_cache = torch.full((S, Hkv, T, D), -garbage)
    for P, slot in zip(lens, slots):
        k_cache[slot, :, :P] = torch.randn(Hkv, P, D, generator=gen)
        v_cache[slot, :, :P] = torch.randn(Hkv, P, D, generator=gen)
    seq_lens, slot_idx = torch.tensor(lens, dtype=torch.int32), torch.tensor(slots, dtype=torch.int32)
    to = lambda t: t.to(device)
    return to(q), to(k_cache.to(dtype)), to(v_cache.to(dtype)), to(seq_lens), to(slot_idx), D ** -0.5


def small_tiles(monkeypatch):
    """BLOCK_N 16: at these lengths 3 splits all hold keys and 8 leave the last ones empty."""
    real = mod.attention_tiles
    monkeypatch.setattr(mod, "attention_tiles", lambda d, g, dtype: {**real(d, g, dtype), "BLOCK_N": 16})


# ---------------------------------------------------------------- kernel vs reference
@pytest.mark.parametrize("num_splits", [None, 1, 3, 8])
@pytest.mark.parametrize("tiles", ["default", "16"])
@pytest.mark.parametrize("dtype,atol,rtol", TOLERANCES, ids=lambda x: str(x).replace("torch.", ""))
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_decode_matches_ref(case, dtype, atol, rtol, tiles, num_splits, monkeypatch):
    if tiles == "16":
        small_tiles(monkeypatch)
    args = make_inputs(case, dtype)
    B, H, D = args[0].shape
    out = poison((B, H, D), dtype)
    got = decode_attention(*args, num_splits=num_splits, out=out)
    assert got is out
    assert_close(out, decode_attention_ref(*args), atol, rtol, f"decode_attention splits={num_splits}")


def test_decode_nan_garbage_never_leaks(monkeypatch):
    """Cache rows past seq_lens may hold anything, NaN included (torch.empty); empty splits too."""
    small_tiles(monkeypatch)
    args = make_inputs(CASES["ragged3-gqa-D48"], torch.float16, garbage=float("nan"), seed=1)
    for num_splits in (1, 3, 8):
        out = decode_attention(*args, num_splits=num_splits)
        assert_close(out, decode_attention_ref(*args), 2e-3, 2e-3, f"NaN garbage, splits={num_splits}")


def test_decode_strided_q_and_out():
    """q sliced out of a fused qkv projection, out written into a wider buffer."""
    q, kc, vc, seq_lens, slot_idx, scale = make_inputs(CASES["ragged3-gqa-D48"], torch.float16, seed=2)
    B, H, D = q.shape
    qkv = torch.randn(B, H + 4, D, dtype=q.dtype)
    qkv[:, :H] = q
    wide = poison((B, H + 1, D), q.dtype)
    decode_attention(qkv[:, :H], kc, vc, seq_lens, slot_idx, scale, num_splits=3, out=wide[:, 1:])
    want = decode_attention_ref(q, kc, vc, seq_lens, slot_idx, scale)
    assert_close(wide[:, 1:], want, 2e-3, 2e-3, "strided q/out")
    assert torch.isnan(wide[:, 0]).all(), "wrote outside out="


def test_decode_rejects_bad_inputs():
    q, kc, vc, seq_lens, slot_idx, scale = make_inputs(CASES["ragged3-gqa-D48"], torch.float32)
    with pytest.raises(ValueError, match="int32"):
        decode_attention(q, kc, vc, seq_lens.long(), slot_idx, scale)
    with pytest.raises(ValueError, match="kv heads"):
        decode_attention(q[:, :5], kc, vc, seq_lens, slot_idx, scale)
    with pytest.raises(ValueError, match="num_splits"):
        decode_attention(q, kc, vc, seq_lens, slot_idx, scale, num_splits=0)


def test_num_splits_heuristic():
    """About one wave of programs on 132 SMs, from shapes only; 1 when B*Hkv fills the GPU."""
    tile = 64 * 128 * 2                                               # BLOCK_N 64, D 128, fp16
    assert decode_num_splits(1, 32, 8192, tile, 64) == 8              # Llama-2-7B, batch 1
    assert decode_num_splits(1, 8, 8192, tile, 64) == 33              # Llama-3-8B, batch 1
    assert decode_num_splits(64, 32, 8192, tile, 64) == 1             # big batch: no split-K
    assert decode_num_splits(1, 3, 8192, 64 * 64 * 2, 64) == 64       # SmolLM2: capped
    assert decode_num_splits(1, 32, 37, tile, 64) == 1                # tiny cache: one chunk


# ---------------------------------------------------------------- reference vs fp64 oracle
def sdpa_oracle(q, k_cache, v_cache, seq_lens, slot_idx, scale):
    """Per sequence, fp64 scaled_dot_product_attention of the one query over its cached keys."""
    B, H, D = q.shape
    G = H // k_cache.shape[1]
    out = torch.empty(B, H, D, dtype=torch.float64)
    for b, (slot, P) in enumerate(zip(slot_idx.tolist(), seq_lens.tolist())):
        kb = k_cache[slot, :, :P].double().repeat_interleave(G, dim=0)          # (H, P, D)
        vb = v_cache[slot, :, :P].double().repeat_interleave(G, dim=0)
        out[b] = F.scaled_dot_product_attention(q[b, :, None].double(), kb, vb, scale=scale)[:, 0]
    return out


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_decode_ref_matches_sdpa_oracle(case):
    args = make_inputs(case, torch.float32, seed=3)
    assert_close(decode_attention_ref(*args), sdpa_oracle(*args), 1e-5, 1e-5, "ref vs sdpa")


# ---------------------------------------------------------------- GPU, realistic shapes
def gpu_case(B, S, T, H, Hkv, D, seed):
    """Random lengths in [1, T] (one at T, one at 1), random distinct slots."""
    gen = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, T + 1, (B,), generator=gen).tolist()
    lens[0], lens[-1] = T, 1
    slots = torch.randperm(S, generator=gen)[:B].tolist()
    return lens, slots, S, T, H, Hkv, D


GPU_CASES = {
    "llama2-7b-b8": gpu_case(8, 10, 8192, 32, 32, 128, seed=0),     # MHA, G = 1
    "llama3-8b-b4": gpu_case(4, 4, 8192, 32, 8, 128, seed=1),       # G = 4
    "smollm2-b5": gpu_case(5, 7, 8192, 9, 3, 64, seed=2),           # G = 3, D 64
}


@pytest.mark.gpu
@pytest.mark.parametrize("num_splits", [None, 1, 13])
@pytest.mark.parametrize("dtype,atol,rtol", TOLERANCES[1:], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("case", GPU_CASES.values(), ids=GPU_CASES.keys())
def test_decode_gpu_realistic(case, dtype, atol, rtol, num_splits):
    args = make_inputs(case, dtype, device="cuda", garbage=float("nan"), seed=4)
    B, H, D = args[0].shape
    out = decode_attention(*args, num_splits=num_splits, out=poison((B, H, D), dtype, "cuda"))
    assert_close(out, decode_attention_ref(*args), atol, rtol, "decode_attention gpu")


@pytest.mark.gpu
def test_decode_gpu_graph_replay_with_new_lengths():
    """Captured once, replayed after the lengths (and fp32 inputs) change in place: the split
    count comes from shapes only and each chunk from the device-side seq_lens."""
    lens, *rest = GPU_CASES["smollm2-b5"]
    full = ([rest[2]] * len(lens), *rest)                                    # every key is randn
    q, kc, vc, seq_lens, slot_idx, scale = make_inputs(full, torch.float32, device="cuda", seed=5)
    out = torch.empty_like(q)
    decode_attention(q, kc, vc, seq_lens, slot_idx, scale, out=out)         # compile outside
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        decode_attention(q, kc, vc, seq_lens, slot_idx, scale, out=out)
    for new_lens in ([8192, 1, 77, 4000, 2], [3, 8000, 64, 65, 1]):
        seq_lens.copy_(torch.tensor(new_lens, dtype=torch.int32))
        q.copy_(torch.randn_like(q))
        out.fill_(float("nan"))
        graph.replay()
        want = decode_attention_ref(q, kc, vc, seq_lens, slot_idx, scale)
        assert_close(out, want, 1e-4, 1e-4, f"graph replay, lens {new_lens}")
