"""sparse_attention: split-K Triton kernels vs the torch reference, the reference vs an fp64
explicit-softmax oracle, the sparse path tied to dense decode when everything is selected, and the
split heuristic. (tests/conftest.py patches the triton 3.6 interpreter's bf16 tl.dot.)

Rows of k_sel/v_sel past each head's count hold large garbage (or NaN), so a masking slip shows up
as a huge error rather than a rounding one.
"""
from __future__ import annotations

import pytest
import torch

import minigen.kernels.sparse_attention as mod
from minigen.kernels.decode_attention import decode_attention_ref
from minigen.kernels.gather_kv import gather_kv
from minigen.kernels.sparse_attention import sparse_attention, sparse_attention_ref, sparse_num_splits
from tests.helpers import TOLERANCES, assert_close, poison

GARBAGE = 1.0e4


# ---------------------------------------------------------------- cases
# id: (B, H, Hkv, D, max_select N)
CASES = {
    "gqa6-2-D48-N37":  (3, 6, 2, 48, 37),
    "mqa3-1-D80-N17":  (2, 3, 1, 80, 17),
    "mha4-4-D64-N5":   (2, 4, 4, 64, 5),
}


def make_inputs(case, dtype, device="cpu", garbage=GARBAGE, seed=0, counts=None):
    """Random q, k_cur/v_cur and gathered rows: rows [0, count[b, g]) of k_sel/v_sel are randn,
    the rest `garbage` (+ for K, - for V). Counts random in [1, N], first head 1, last head N."""
    B, H, Hkv, D, N = case
    gen = torch.Generator().manual_seed(seed)
    if counts is None:
        count = torch.randint(1, N + 1, (B, Hkv), generator=gen, dtype=torch.int32)
        count[0, 0], count[-1, -1] = 1, N
    else:
        count = torch.full((B, Hkv), counts, dtype=torch.int32)
    valid = (torch.arange(N) < count[..., None])[..., None]                     # (B, Hkv, N, 1)
    k_sel = torch.where(valid, torch.randn(B, Hkv, N, D, generator=gen), garbage)
    v_sel = torch.where(valid, torch.randn(B, Hkv, N, D, generator=gen), -garbage)
    q = torch.randn(B, H, D, generator=gen)
    k_cur, v_cur = torch.randn(B, Hkv, D, generator=gen), torch.randn(B, Hkv, D, generator=gen)
    to = lambda t: t.to(dtype).to(device)
    return to(q), to(k_sel), to(v_sel), count.to(device), to(k_cur), to(v_cur), D ** -0.5


def small_tiles(monkeypatch):
    """BLOCK_N 16: N=37 spans 3 blocks; 3 splits all hold rows of the long heads, 8 leave the
    later ones empty (and every split but 0 is empty for the count=1 head)."""
    real = mod.attention_tiles
    monkeypatch.setattr(mod, "attention_tiles", lambda d, g, dtype: {**real(d, g, dtype), "BLOCK_N": 16})


# ---------------------------------------------------------------- kernel vs reference
@pytest.mark.parametrize("num_splits", [None, 1, 3, 8])
@pytest.mark.parametrize("tiles", ["default", "16"])
@pytest.mark.parametrize("dtype,atol,rtol", TOLERANCES, ids=lambda x: str(x).replace("torch.", ""))
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_sparse_matches_ref(case, dtype, atol, rtol, tiles, num_splits, monkeypatch):
    if tiles == "16":
        small_tiles(monkeypatch)
    args = make_inputs(case, dtype)
    B, H, Hkv, D, N = case
    out = poison((B, H, D), dtype)
    got = sparse_attention(*args, num_splits=num_splits, out=out)
    assert got is out
    assert_close(out, sparse_attention_ref(*args), atol, rtol, f"sparse_attention splits={num_splits}")


@pytest.mark.parametrize("counts", ["one", "max"])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_sparse_uniform_counts(counts, num_splits, monkeypatch):
    """Every head at count 1 (splits 1.. all empty) or at count = max_select."""
    small_tiles(monkeypatch)
    case = CASES["gqa6-2-D48-N37"]
    args = make_inputs(case, torch.float32, seed=1, counts=1 if counts == "one" else case[-1])
    out = sparse_attention(*args, num_splits=num_splits, out=poison(args[0].shape, torch.float32))
    assert_close(out, sparse_attention_ref(*args), 1e-4, 1e-4, f"count={counts}, splits={num_splits}")


def test_sparse_nan_garbage_never_leaks(monkeypatch):
    """Rows past count may hold anything, NaN included (gather_kv leaves them); empty splits too."""
    small_tiles(monkeypatch)
    args = make_inputs(CASES["gqa6-2-D48-N37"], torch.float16, garbage=float("nan"), seed=2)
    want = sparse_attention_ref(*args)
    assert_close(want, softmax_oracle(*args), 2e-3, 2e-3, "NaN garbage, ref vs oracle")
    for num_splits in (1, 3, 8):
        out = sparse_attention(*args, num_splits=num_splits)
        assert_close(out, want, 2e-3, 2e-3, f"NaN garbage, splits={num_splits}")


def test_sparse_strided_q_cur_and_out():
    """q and k_cur/v_cur sliced out of fused projections, out written into a wider buffer."""
    q, k_sel, v_sel, count, k_cur, v_cur, scale = make_inputs(CASES["gqa6-2-D48-N37"], torch.float16, seed=3)
    B, H, D = q.shape
    Hkv = k_cur.shape[1]
    qkv = torch.randn(B, H + 2 * Hkv, D, dtype=q.dtype)
    qkv[:, :H], qkv[:, H:H + Hkv], qkv[:, H + Hkv:] = q, k_cur, v_cur
    wide = poison((B, H + 1, D), q.dtype)
    sparse_attention(qkv[:, :H], k_sel, v_sel, count, qkv[:, H:H + Hkv], qkv[:, H + Hkv:], scale,
                     num_splits=3, out=wide[:, 1:])
    want = sparse_attention_ref(q, k_sel, v_sel, count, k_cur, v_cur, scale)
    assert_close(wide[:, 1:], want, 2e-3, 2e-3, "strided q/cur/out")
    assert torch.isnan(wide[:, 0]).all(), "wrote outside out="


def test_sparse_rejects_bad_inputs():
    q, k_sel, v_sel, count, k_cur, v_cur, scale = make_inputs(CASES["gqa6-2-D48-N37"], torch.float32)
    with pytest.raises(ValueError, match="int32"):
        sparse_attention(q, k_sel, v_sel, count.long(), k_cur, v_cur, scale)
    with pytest.raises(ValueError, match="kv heads"):
        sparse_attention(q[:, :5], k_sel, v_sel, count, k_cur, v_cur, scale)
    with pytest.raises(ValueError, match="k_cur"):
        sparse_attention(q, k_sel, v_sel, count, k_cur[:, :1], v_cur, scale)
    with pytest.raises(ValueError, match="num_splits"):
        sparse_attention(q, k_sel, v_sel, count, k_cur, v_cur, scale, num_splits=0)


def test_num_splits_heuristic():
    """About one wave of programs on 132 SMs (rounded up), from shapes only."""
    tile = 64 * 128 * 2                                                   # BLOCK_N 64, D 128, fp16
    assert sparse_num_splits(8, 32, 3277, tile, 64) == 2                  # Llama-2-7B, B 8, 10% of 32K
    assert sparse_num_splits(1, 32, 3277, tile, 64) == 9                  # batch 1
    assert sparse_num_splits(1, 8, 820, tile, 64) == 6                    # Llama-3-8B: 2 tiles a split
    assert sparse_num_splits(64, 32, 3277, tile, 64) == 1                 # big batch: no split-K
    assert sparse_num_splits(1, 32, 5, tile, 64) == 1                     # tiny selection: one chunk


# ---------------------------------------------------------------- reference vs fp64 oracle
def softmax_oracle(q, k_sel, v_sel, count, k_cur, v_cur, scale):
    """Per (b, h), fp64: explicit softmax over the concatenated rows [k_sel[:count], k_cur]."""
    B, H, D = q.shape
    G = H // k_sel.shape[1]
    out = torch.empty(B, H, D, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            g, n = h // G, int(count[b, h // G])
            k = torch.cat([k_sel[b, g, :n], k_cur[b, g, None]]).double()              # (n+1, D)
            v = torch.cat([v_sel[b, g, :n], v_cur[b, g, None]]).double()
            s = (k @ q[b, h].double()) * scale                                          # (n+1,)
            e = torch.exp(s - s.max())
            out[b, h] = (e / e.sum()) @ v
    return out


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_sparse_ref_matches_oracle(case):
    args = make_inputs(case, torch.float32, seed=4)
    assert_close(sparse_attention_ref(*args), softmax_oracle(*args), 1e-5, 1e-5, "ref vs oracle")


# ---------------------------------------------------------------- selecting everything == dense
@pytest.mark.parametrize("dtype,atol,rtol", TOLERANCES, ids=lambda x: str(x).replace("torch.", ""))
def test_select_all_equals_dense_decode(dtype, atol, rtol, monkeypatch):
    """idx = every cached token [0, n_b) of each sequence: gather_kv + sparse_attention with the
    current token == dense decode over the cache with the current token written at position n_b
    (seq_lens = n_b + 1). Ties the sparse path (gather, masks, current-token fold) to dense."""
    small_tiles(monkeypatch)
    B, H, Hkv, D, S, Tcap = 3, 6, 2, 48, 4, 40
    gen = torch.Generator().manual_seed(5)
    lens = [1, 39, 17]                                                # cached tokens before this step
    slot_idx = torch.tensor([2, 0, 3], dtype=torch.int32)
    k_cache = torch.randn(S, Hkv, Tcap, D, generator=gen).to(dtype)
    v_cache = torch.randn(S, Hkv, Tcap, D, generator=gen).to(dtype)
    q = torch.randn(B, H, D, generator=gen).to(dtype)
    k_cur = torch.randn(B, Hkv, D, generator=gen).to(dtype)
    v_cur = torch.randn(B, Hkv, D, generator=gen).to(dtype)
    N = max(lens)
    idx = torch.full((B, Hkv, N), 1 << 28, dtype=torch.int32)
    for b, n in enumerate(lens):
        idx[b, :, :n] = torch.arange(n, dtype=torch.int32)
    count = torch.tensor(lens, dtype=torch.int32)[:, None].repeat(1, Hkv).contiguous()   # (B, Hkv)
    scale = D ** -0.5

    # sparse: the pool holds only the cached tokens; the current one comes in k_cur/v_cur
    k_sel, v_sel = gather_kv(k_cache, v_cache, idx, count, slot_idx,       # rows past count: NaN
                             out_k=poison((B, Hkv, N, D), dtype), out_v=poison((B, Hkv, N, D), dtype))
    got = sparse_attention(q, k_sel, v_sel, count, k_cur, v_cur, scale, num_splits=3)
    got_ref = sparse_attention_ref(q, k_sel, v_sel, count, k_cur, v_cur, scale)

    # dense: write the current token at position n_b of its slot, attend over n_b + 1 keys
    k_full, v_full = k_cache.clone(), v_cache.clone()
    for b, (slot, n) in enumerate(zip(slot_idx.tolist(), lens)):
        k_full[slot, :, n], v_full[slot, :, n] = k_cur[b], v_cur[b]
    seq_lens = torch.tensor(lens, dtype=torch.int32) + 1
    want = decode_attention_ref(q, k_full, v_full, seq_lens, slot_idx, scale)
    assert_close(got, want, atol, rtol, "sparse kernel (all selected) vs dense decode")
    assert_close(got_ref, want, atol, rtol, "sparse ref (all selected) vs dense decode")


# ---------------------------------------------------------------- GPU, realistic shapes
REAL = dict(B=8, H=32, Hkv=32, D=128, N=3277)                      # Llama-2-7B heads, 10% of 32K


@pytest.mark.gpu
@pytest.mark.parametrize("num_splits", [None, 1, 13])
@pytest.mark.parametrize("dtype,atol,rtol", TOLERANCES[1:], ids=["float16", "bfloat16"])
def test_sparse_gpu_realistic(dtype, atol, rtol, num_splits):
    args = make_inputs(tuple(REAL.values()), dtype, device="cuda", garbage=float("nan"), seed=6)
    B, H, D = args[0].shape
    out = sparse_attention(*args, num_splits=num_splits, out=poison((B, H, D), dtype, "cuda"))
    assert_close(out, sparse_attention_ref(*args), atol, rtol, "sparse_attention gpu")


@pytest.mark.gpu
def test_gather_then_sparse_gpu_graph_replay():
    """gather_kv from a pinned pool + sparse_attention captured once in a CUDA graph, replayed
    after idx/count/q change in place: grid from shapes only, work from the device-side counts."""
    from tests.helpers import gpu_selection, pinned_pools
    B, Hkv, D, S, Tcap, N = 4, 8, 128, 5, 4096, 410
    H, dtype, scale = 32, torch.float16, 128 ** -0.5
    k_pool, v_pool = pinned_pools(S, Hkv, Tcap, D, dtype, seed=7)
    idx, count, slot_idx = gpu_selection(B, Hkv, S, Tcap, N, seed=7)
    q = torch.randn(B, H, D, dtype=dtype, device="cuda")
    k_cur, v_cur = torch.randn(2, B, Hkv, D, dtype=dtype, device="cuda")
    k_sel, v_sel = torch.empty(2, B, Hkv, N, D, dtype=dtype, device="cuda")
    out = torch.empty(B, H, D, dtype=dtype, device="cuda")

    def step():
        gather_kv(k_pool, v_pool, idx, count, slot_idx, out_k=k_sel, out_v=v_sel)
        sparse_attention(q, k_sel, v_sel, count, k_cur, v_cur, scale, out=out)

    step()                                                            # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for seed in (8, 9):
        new_idx, new_count, _ = gpu_selection(B, Hkv, S, Tcap, N, seed=seed)
        idx.copy_(new_idx), count.copy_(new_count), q.copy_(torch.randn_like(q))
        k_sel.fill_(float("nan")), v_sel.fill_(float("nan")), out.fill_(float("nan"))
        graph.replay()
        # independent of the kernels: gather on the host, attend with the reference
        want_k = k_pool[slot_idx.long().cpu()[:, None, None], torch.arange(Hkv)[None, :, None],
                        idx.clamp(max=Tcap - 1).long().cpu()].cuda()
        want_v = v_pool[slot_idx.long().cpu()[:, None, None], torch.arange(Hkv)[None, :, None],
                        idx.clamp(max=Tcap - 1).long().cpu()].cuda()
        want = sparse_attention_ref(q, want_k, want_v, count, k_cur, v_cur, scale)
        assert_close(out, want, 2e-3, 2e-3, f"graph replay, seed {seed}")
