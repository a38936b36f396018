"""quantize_kv / dequantize_kv: Triton (interpreter on CPU) vs ref, the format by hand, error bounds."""
import pytest
import torch

from minigen.kernels.quant_kv import dequantize_kv, dequantize_kv_ref, kv_group_size, quantize_kv, quantize_kv_ref
from tests.helpers import TOLERANCES, assert_close

FP16_REL = 2.0**-11     # fp16 rounding of scale and min, relative


def _x(shape, dtype, seed=0, device="cpu"):
    """Random K/V-like rows with some special groups: a constant row, a wide-range row, a row
    offset far from zero."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 2
    flat = x.view(-1, shape[-1])
    flat[0] = 0.75                                   # constant groups (scale 0)
    if flat.shape[0] > 2:
        flat[1] *= 40                                # wide range
        flat[2] += 9                                 # offset from zero
    return x.to(dtype).to(device)


def _codes(packed):
    """uint8 (..., D/2) -> the 4-bit codes (..., D), element 2j in the low nibble."""
    return torch.stack([packed & 15, packed >> 4], dim=-1).flatten(-2)


def _roundtrip_bound(x, scale, mn, G):
    """Per element: scale/2 + the fp16 rounding of scale (up to 15 steps) and of min + fp32 noise."""
    N, Hkv, D = x.shape
    s = scale.float().repeat_interleave(G, -1)
    m = mn.float().repeat_interleave(G, -1)
    return s / 2 + FP16_REL * (m.abs() + 15 * s) * 1.01 + 1e-6 * x.float().abs() + 1e-7


SHAPES = [(1, 1, 64), (37, 3, 32), (5, 3, 128), (4, 2, 192), (3, 3, 48)]   # D=192: 3 groups; 48: G=48


@pytest.mark.parametrize("dtype,atol,rtol", TOLERANCES)
@pytest.mark.parametrize("N,Hkv,D", SHAPES)
def test_quantize_matches_ref_and_bounds_error(N, Hkv, D, dtype, atol, rtol):
    x = _x((N, Hkv, D), dtype)
    got, want = quantize_kv(x), quantize_kv_ref(x)
    # same correctly-rounded fp32 ops and no FMA contraction: bit-identical, ties included
    for name, a, b in zip(("packed", "scale", "min"), got, want):
        assert a.dtype == b.dtype and torch.equal(a, b), f"{name} differs from the ref"
    G = kv_group_size(D)
    xr = dequantize_kv_ref(*want, dtype=torch.float32)
    err = (xr - x.float()).abs()
    bound = _roundtrip_bound(x, want[1], want[2], G)
    assert (err <= bound).all(), f"roundtrip error {float((err - bound).max()):.3g} over the bound"
    assert torch.equal(xr.view(-1, D)[0], x.float().view(-1, D)[0]), "a constant row must come back exactly"


@pytest.mark.parametrize("dtype,atol,rtol", TOLERANCES)
@pytest.mark.parametrize("S,T,Hkv,D", [(1, 1, 1, 64), (3, 7, 3, 32), (2, 5, 3, 128), (2, 3, 2, 48)])
def test_dequantize_matches_ref_on_staged_slice(S, T, Hkv, D, dtype, atol, rtol):
    """A staged layer (S, T, Hkv, D/2) sliced to [:S-?, :T] as the policy does, out= a strided view."""
    codes = quantize_kv_ref(_x((S * (T + 2), Hkv, D), torch.float32, seed=1))
    stage = [c.view(S, T + 2, Hkv, -1)[:, :T] for c in codes]          # strided: token rows skipped
    out = torch.full((S, T + 2, Hkv, D), float("nan"), dtype=dtype)[:, :T]
    got = dequantize_kv(*stage, out=out)
    want = dequantize_kv_ref(*stage, dtype=dtype)
    assert got.data_ptr() == out.data_ptr()
    # the interpreter casts fp32 -> bf16 by truncation (compiled kernels round to nearest): tolerance
    assert_close(got, want, atol=atol, rtol=rtol, what="dequantize_kv")
    if dtype != torch.bfloat16:
        assert torch.equal(got, want)


@pytest.mark.parametrize("S,T,Hkv,D,counts", [(3, 9, 3, 32, [0, 9, 4]), (2, 130, 2, 64, [1, 77]),
                                                (1, 5, 1, 128, [5])])
def test_dequantize_counts_leaves_the_rest(S, T, Hkv, D, counts):
    """counts (S,) on the device: rows t < counts[s] converted as without counts, the rest of out
    untouched (the NaN sentinel survives), for the kernel and the ref alike."""
    codes = [c.view(S, T, Hkv, -1) for c in quantize_kv_ref(_x((S * T, Hkv, D), torch.float32, seed=3))]
    full = dequantize_kv_ref(*codes, dtype=torch.float32)
    n = torch.tensor(counts, dtype=torch.int32)
    for fn in (dequantize_kv, dequantize_kv_ref):
        out = torch.full((S, T, Hkv, D), float("nan"))
        fn(*codes, out=out, counts=n)
        for s, c in enumerate(counts):
            assert torch.equal(out[s, :c], full[s, :c]), fn.__name__
            assert out[s, c:].isnan().all(), f"{fn.__name__} wrote past count {c} of sequence {s}"
    with pytest.raises(ValueError, match="counts must be"):
        dequantize_kv(*codes, counts=n.long())


def test_format_by_hand():
    """One group of 32 holding 0..15 and back: min 0, scale 1, codes = values, low nibble first."""
    row = torch.cat([torch.arange(16.0), torch.arange(15.0, -1.0, -1)])
    packed, scale, mn = quantize_kv_ref(row.view(1, 1, 32))
    assert scale.item() == 1.0 and mn.item() == 0.0
    assert packed[0, 0, 0].item() == 0 | (1 << 4) and packed[0, 0, 8].item() == 15 | (14 << 4)
    assert torch.equal(_codes(packed)[0, 0].float(), row)
    assert torch.equal(quantize_kv(row.view(1, 1, 32))[0], packed)
    # halves round up (floor(y + 0.5)), not to even: 0.5 -> 1 and 2.5 -> 3 with min 0, scale 1
    tie = torch.zeros(1, 1, 32)
    tie[0, 0, 1], tie[0, 0, 2], tie[0, 0, 3] = 0.5, 2.5, 15.0
    assert _codes(quantize_kv_ref(tie)[0])[0, 0, :4].tolist() == [0, 1, 3, 15]
    assert _codes(quantize_kv(tie)[0])[0, 0, :4].tolist() == [0, 1, 3, 15]


def test_quantize_into_record_views():
    """out= strided views into byte records [codes | scale | min] (what the int4 pool holds)."""
    x = _x((6, 3, 64), torch.float16, seed=2)
    rec = torch.zeros(6, 3, 32 + 4, dtype=torch.uint8)
    views = (rec[..., :32], rec[..., 32:34].view(torch.float16), rec[..., 34:].view(torch.float16))
    quantize_kv(x, out=views)
    for a, b in zip(views, quantize_kv_ref(x)):
        assert torch.equal(a, b)


def test_group_size_and_shape_errors():
    with pytest.raises(ValueError, match="not a multiple of the quantization group 64"):
        quantize_kv_ref(torch.zeros(2, 1, 80))
    x = _x((5, 3, 80), torch.float32)                               # D=80 handled with group_size=16
    got, want = quantize_kv(x, group_size=16), quantize_kv_ref(x, group_size=16)
    assert got[1].shape == (5, 3, 5) and all(torch.equal(a, b) for a, b in zip(got, want))
    err = (dequantize_kv(*got, dtype=torch.float32) - x).abs()
    assert (err <= _roundtrip_bound(x, *got[1:], 16)).all()
    with pytest.raises(ValueError, match="must be"):
        quantize_kv(x, group_size=16, out=(got[0], got[1].float(), got[2]))
    with pytest.raises(ValueError, match="must be"):
        dequantize_kv(got[0], got[1][:-1], got[2])
    with pytest.raises(ValueError, match="do not divide the head dim"):
        dequantize_kv(got[0][..., :-1], got[1], got[2])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_quant_kv_cuda_exact(dtype):
    """Compiled kernels (div_rn, no FMA contraction) are bit-identical to the ref, into a pinned pool too."""
    x = _x((333, 8, 128), dtype, device="cuda")
    got, want = quantize_kv(x), quantize_kv_ref(x)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    pinned = [torch.empty_like(t, device="cpu").pin_memory() for t in got]
    quantize_kv(x, out=pinned)
    torch.cuda.synchronize()
    assert all(torch.equal(a, b.cpu()) for a, b in zip(pinned, want))
    stage = [t.view(9, 37, 8, -1) for t in got]
    assert torch.equal(dequantize_kv(*stage, dtype=dtype), dequantize_kv_ref(*stage, dtype=dtype))


@pytest.mark.parametrize("fn", [quantize_kv, quantize_kv_ref])
def test_quantize_is_row_invariant(fn):
    """A row's codes, scale and min do not depend on the other rows of the call (the int4 policy's
    batch dependence comes from the K/V the model computes, not from quantizing them)."""
    torch.manual_seed(3)
    x = torch.randn(9, 3, 64)
    together = fn(x, 64)
    for i in range(9):
        alone = fn(x[i:i + 1].clone(), 64)
        for a, t in zip(alone, together):
            assert torch.equal(a[0], t[i])
