"""layer_norm: Triton kernel (TRITON_INTERPRET=1 on CPU) vs layer_norm_ref vs the formula."""
import pytest
import torch

import minigen.kernels.layer_norm as ln_mod
from minigen.kernels.layer_norm import layer_norm, layer_norm_ref
from tests.helpers import TOLERANCES, assert_close, poison

SHAPES = [(1, 64), (37, 96), (4, 200), (3, 768)]   # (N, C): single row, odd N, non-power-of-two C


def _inputs(N, C, dtype, seed=0, shift=0.5):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(N, C, generator=g) * 2 + shift).to(dtype)
    w = (1 + 0.5 * torch.randn(C, generator=g)).to(dtype)
    b = (0.5 * torch.randn(C, generator=g)).to(dtype)
    return x, w, b


@pytest.mark.parametrize("has_bias", [True, False])
@pytest.mark.parametrize("dtype,atol,rtol", TOLERANCES)
@pytest.mark.parametrize("N,C", SHAPES)
def test_layer_norm_matches_ref(N, C, dtype, atol, rtol, has_bias):
    x, w, b = _inputs(N, C, dtype)
    b = b if has_bias else None
    want = layer_norm_ref(x, w, b, 1e-5)
    assert want.dtype == dtype
    assert_close(layer_norm(x, w, b, 1e-5), want, atol, rtol, "layer_norm")
    out = poison((N, C), dtype)
    got = layer_norm(x, w, b, 1e-5, out=out)
    assert got is out
    assert_close(out, want, atol, rtol, "layer_norm out=")


@pytest.mark.parametrize("dtype,atol,rtol", TOLERANCES)
def test_layer_norm_chunked_rows(monkeypatch, dtype, atol, rtol):
    # rows wider than one block: the three-pass loop (C=200 over 64-wide chunks, ragged tail)
    monkeypatch.setattr(ln_mod, "_MAX_BLOCK_C", 64)
    assert not ln_mod._launch_config(200)[1]
    x, w, b = _inputs(5, 200, dtype, seed=1)
    out = poison((5, 200), dtype)
    layer_norm(x, w, b, 1e-5, out=out)
    assert_close(out, layer_norm_ref(x, w, b, 1e-5), atol, rtol, "layer_norm chunked")


@pytest.mark.parametrize("chunked", [False, True])
def test_layer_norm_large_mean(monkeypatch, chunked):
    # mean >> std: a one-pass E[x^2] - E[x]^2 variance would lose most digits in fp32
    if chunked:
        monkeypatch.setattr(ln_mod, "_MAX_BLOCK_C", 64)
    x, w, b = _inputs(6, 200, torch.float32, seed=2, shift=300.0)
    assert_close(layer_norm(x, w, b, 1e-5), layer_norm_ref(x, w, b, 1e-5), 2e-4, 2e-4, "large mean")


def test_layer_norm_strided_and_3d():
    N, C = 7, 96
    big = torch.randn(N, 3 * C)
    x, w, b = big[:, C:2 * C], torch.randn(C), torch.randn(C)
    assert not x.is_contiguous()
    assert_close(layer_norm(x, w, b, 1e-5), layer_norm_ref(x, w, b, 1e-5), 1e-5, 1e-5, "strided")
    x3 = torch.randn(2, 5, 2 * C)[:, :, :C]                               # (B, T, C), row-strided
    out3 = poison((2, 5, C), torch.float32)
    layer_norm(x3, w, b, 1e-5, out=out3)
    assert_close(out3, layer_norm_ref(x3, w, b, 1e-5), 1e-5, 1e-5, "3d")


def test_layer_norm_ref_is_formula():
    # the ref against the textbook formula in float64, and against nn.LayerNorm (what OPT uses)
    x, w, b = _inputs(9, 200, torch.float32, seed=3)
    xd = x.double()
    mean = xd.mean(-1, keepdim=True)
    var = (xd - mean).pow(2).mean(-1, keepdim=True)
    want = (xd - mean) / torch.sqrt(var + 1e-5) * w.double() + b.double()
    assert_close(layer_norm_ref(x, w, b, 1e-5), want, 1e-5, 1e-5, "ref vs formula")
    ln = torch.nn.LayerNorm(200, eps=1e-5)
    with torch.no_grad():
        ln.weight.copy_(w)
        ln.bias.copy_(b)
        assert_close(layer_norm_ref(x, w, b, 1e-5), ln(x), 1e-6, 1e-6, "ref vs nn.LayerNorm")


def test_layer_norm_bad_shapes():
    x, w, b = _inputs(3, 64, torch.float32)
    with pytest.raises(ValueError, match="bias"):
        layer_norm(x, w, b[:32], 1e-5)
    with pytest.raises(ValueError, match="out"):
        layer_norm(x, w, b, 1e-5, out=torch.empty(3, 32))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,atol,rtol", TOLERANCES)
@pytest.mark.parametrize("N,C", [(4096, 4096), (33, 5120), (7, 7168), (5, 12288)])
def test_layer_norm_cuda(N, C, dtype, atol, rtol):
    x, w, b = (t.cuda() for t in _inputs(N, C, dtype))
    assert_close(layer_norm(x, w, b, 1e-5), layer_norm_ref(x, w, b, 1e-5), atol, rtol, "layer_norm cuda")
    assert_close(layer_norm(x, w, None, 1e-5), layer_norm_ref(x, w, None, 1e-5), atol, rtol, "no bias")
