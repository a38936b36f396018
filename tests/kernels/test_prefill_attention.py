"""prefill_attention: Triton kernel vs its torch reference, and the reference vs an fp64 SDPA oracle.

Every case fills the cache past each sequence's keys (and unused slots) with large garbage, so a
masking slip shows up as a huge error rather than a rounding one.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import minigen.kernels.prefill_attention as mod
from minigen.kernels.prefill_attention import prefill_attention, prefill_attention_ref
from tests.helpers import TOLERANCES, assert_close, poison

GARBAGE = 1.0e4


# ---------------------------------------------------------------- cases
# id: (new tokens per sequence, start_pos, slot_idx, num_slots S, capacity T, H, Hkv, D)
CASES = {
    "T1-one-token":       ([1], [0], [0], 1, 1, 4, 4, 64),
    "fresh37-mqa-D48":    ([37], [0], [0], 1, 37, 3, 1, 48),
    "ragged3-gqa-D80":    ([1, 37, 5], [0, 4, 19], [2, 0, 3], 4, 64, 6, 2, 80),
    "continued-mha-D64":  ([20, 3], [70, 0], [1, 0], 3, 100, 4, 4, 64),
}


def make_inputs(case, dtype, device="cpu", garbage=GARBAGE, seed=0):
    """Random q and caches: keys [0, start + len) of each sequence's slot are randn, the rest of
    the cache (tail of every slot, unused slots) is `garbage`."""
    lens, starts, slots, S, T, H, Hkv, D = case
    gen = torch.Generator().manual_seed(seed)
    N = sum(lens)
    q = torch.randn(N, H, D, generator=gen).to(dtype)
    k_cache = torch.full((S, Hkv, T, D), garbage)
    v_cache = torch.full((S, Hkv, T, D), -garbage)
    for L, p0, slot in zip(lens, starts, slots):
        k_cache[slot, :, :p0 + L] = torch.randn(Hkv, p0 + L, D, generator=gen)
        v_cache[slot, :, :p0 + L] = torch.randn(Hkv, p0 + L, D, generator=gen)
    cu = torch.tensor([0] + np.cumsum(lens).tolist(), dtype=torch.int32)
    meta = (cu, torch.tensor(starts, dtype=torch.int32), torch.tensor(slots, dtype=torch.int32))
    to = lambda t: t.to(device)
    return (to(q), to(k_cache.to(dtype)), to(v_cache.to(dtype)), *map(to, meta),
            D ** -0.5, max(lens))


def small_blocks(monkeypatch):
    """16 x 16 tiles: several M blocks per sequence, GQA rows straddling blocks, and the unmasked
    key phase (keys wholly before the diagonal) even at these tiny lengths."""
    monkeypatch.setattr(mod, "_launch_config",
                        lambda rows, d, dtype: (16, 16, max(16, 1 << (d - 1).bit_length()), 4, 1))


# ---------------------------------------------------------------- kernel vs reference
@pytest.mark.parametrize("dtype,atol,rtol", TOLERANCES, ids=lambda x: str(x).replace("torch.", ""))
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_prefill_matches_ref(case, dtype, atol, rtol):
    args = make_inputs(case, dtype)
    N, H, D = args[0].shape
    out = poison((N, H, D), dtype)
    got = prefill_attention(*args, out=out)
    assert got is out
    assert_close(out, prefill_attention_ref(*args), atol, rtol, "prefill_attention")


@pytest.mark.parametrize("dtype,atol,rtol", TOLERANCES[:2], ids=["float32", "float16"])
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_prefill_small_blocks(case, dtype, atol, rtol, monkeypatch):
    small_blocks(monkeypatch)
    args = make_inputs(case, dtype, seed=1)
    N, H, D = args[0].shape
    out = prefill_attention(*args, out=poison((N, H, D), dtype))
    assert_close(out, prefill_attention_ref(*args), atol, rtol, "prefill_attention 16x16 tiles")


def test_prefill_nan_garbage_never_leaks(monkeypatch):
    """Cache rows past the sequence may hold anything, NaN included (torch.empty)."""
    small_blocks(monkeypatch)
    args = make_inputs(CASES["ragged3-gqa-D80"], torch.float16, garbage=float("nan"), seed=2)
    out = prefill_attention(*args)
    assert_close(out, prefill_attention_ref(*args), 2e-3, 2e-3, "prefill_attention NaN garbage")


def test_prefill_strided_q_and_out():
    """q sliced out of a fused qkv projection, out written into a wider buffer."""
    q, kc, vc, *meta = make_inputs(CASES["ragged3-gqa-D80"], torch.float16, seed=3)
    N, H, D = q.shape
    qkv = torch.randn(N, H + 4, D, dtype=q.dtype)
    qkv[:, :H] = q
    wide = poison((N, H + 1, D), q.dtype)
    prefill_attention(qkv[:, :H], kc, vc, *meta, out=wide[:, 1:])
    assert_close(wide[:, 1:], prefill_attention_ref(q, kc, vc, *meta), 2e-3, 2e-3, "strided q/out")
    assert torch.isnan(wide[:, 0]).all(), "wrote outside out="


def test_prefill_grid_larger_than_needed():
    """max_seqlen_q is only a grid bound: a larger value must not change the result."""
    q, kc, vc, cu, sp, slots, scale, max_q = make_inputs(CASES["ragged3-gqa-D80"], torch.float32)
    out = prefill_attention(q, kc, vc, cu, sp, slots, scale, max_q + 40)
    assert_close(out, prefill_attention_ref(q, kc, vc, cu, sp, slots, scale, max_q), 1e-4, 1e-4, "grid")


def test_prefill_rejects_bad_inputs():
    q, kc, vc, cu, sp, slots, scale, max_q = make_inputs(CASES["ragged3-gqa-D80"], torch.float32)
    with pytest.raises(ValueError, match="int32"):
        prefill_attention(q, kc, vc, cu.long(), sp, slots, scale, max_q)
    with pytest.raises(ValueError, match="kv heads"):
        prefill_attention(q[:, :5], kc, vc, cu, sp, slots, scale, max_q)
    with pytest.raises(ValueError, match="out must be"):
        prefill_attention(q, kc, vc, cu, sp, slots, scale, max_q, out=torch.empty_like(q).half())


# ---------------------------------------------------------------- reference vs fp64 oracle
def sdpa_oracle(q, k_cache, v_cache, cu, starts, slots, scale):
    """Per sequence, fp64 scaled_dot_product_attention with an explicit causal mask over the
    cached keys (query i of a run starting at p0 sees keys 0 .. p0 + i)."""
    N, H, D = q.shape
    G = H // k_cache.shape[1]
    out = torch.empty(N, H, D, dtype=torch.float64)
    cu, starts, slots = cu.tolist(), starts.tolist(), slots.tolist()
    for b, slot in enumerate(slots):
        q0, q1, p0 = cu[b], cu[b + 1], starts[b]
        P = p0 + q1 - q0
        qb = q[q0:q1].double().transpose(0, 1)                                  # (H, L, D)
        kb = k_cache[slot, :, :P].double().repeat_interleave(G, dim=0)          # (H, P, D)
        vb = v_cache[slot, :, :P].double().repeat_interleave(G, dim=0)
        mask = torch.arange(P)[None, :] <= (p0 + torch.arange(q1 - q0))[:, None]  # (L, P)
        ob = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, scale=scale)   # (H, L, D)
        out[q0:q1] = ob.transpose(0, 1)
    return out


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_prefill_ref_matches_sdpa_oracle(case):
    args = make_inputs(case, torch.float32, seed=4)
    assert_close(prefill_attention_ref(*args), sdpa_oracle(*args[:-1]), 1e-5, 1e-5, "ref vs sdpa")


def test_prefill_fresh_prompt_is_plain_causal_sdpa():
    """start_pos 0, contiguous slot: the textbook is_causal attention of one sequence."""
    args = make_inputs(CASES["fresh37-mqa-D48"], torch.float32, seed=5)
    q, kc, vc = args[:3]
    L, H, D = q.shape
    want = F.scaled_dot_product_attention(
        q.double().transpose(0, 1), kc[0, :, :L].double().expand(H, L, D),
        vc[0, :, :L].double().expand(H, L, D), is_causal=True).transpose(0, 1)
    assert_close(prefill_attention_ref(*args), want, 1e-5, 1e-5, "ref vs is_causal sdpa")


# ---------------------------------------------------------------- GPU, realistic shapes
GPU_CASES = {
    # Llama-2-7B: MHA, D 128; a fresh 2K prompt next to a chat turn continued at 5K cached tokens
    "llama2-7b": ([2048, 300, 77], [0, 5000, 1], [3, 0, 5], 6, 8192, 32, 32, 128),
    # SmolLM2-135M: 9 heads over 3 kv heads, D 64
    "smollm2": ([1500, 64], [0, 4000], [1, 0], 2, 8192, 9, 3, 64),
}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,atol,rtol", TOLERANCES[1:], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("case", GPU_CASES.values(), ids=GPU_CASES.keys())
def test_prefill_gpu_realistic(case, dtype, atol, rtol):
    args = make_inputs(case, dtype, device="cuda", garbage=float("nan"), seed=6)
    N, H, D = args[0].shape
    out = prefill_attention(*args, out=poison((N, H, D), dtype, "cuda"))
    assert_close(out, prefill_attention_ref(*args), atol, rtol, "prefill_attention gpu")


@pytest.mark.gpu
def test_prefill_gpu_fp32_and_graph_capture():
    """fp32 uses exact (ieee) dots, not tf32; the launcher records into a CUDA graph."""
    args = make_inputs(GPU_CASES["smollm2"], torch.float32, device="cuda", seed=7)
    N, H, D = args[0].shape
    out = poison((N, H, D), torch.float32, "cuda")
    prefill_attention(*args, out=out)                        # compile outside the capture
    out.fill_(float("nan"))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        prefill_attention(*args, out=out)
    graph.replay()
    assert_close(out, prefill_attention_ref(*args), 1e-4, 1e-4, "prefill_attention graph fp32")
