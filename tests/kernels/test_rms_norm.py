"""rms_norm: Triton kernel (TRITON_INTERPRET=1 on CPU) vs rms_norm_ref vs transformers."""
import pytest
import torch

import minigen.kernels.rms_norm as rms_mod
from minigen.kernels.rms_norm import rms_norm, rms_norm_ref
from tests.helpers import TOLERANCES, assert_close, poison

SHAPES = [(1, 64), (37, 96), (4, 200), (3, 576)]   # (N, C): single row, odd N, non-power-of-two C


def _inputs(N, C, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(N, C, generator=g) * 2 + 0.5).to(dtype)
    w = (1 + 0.5 * torch.randn(C, generator=g)).to(dtype)
    return x, w


@pytest.mark.parametrize("dtype,atol,rtol", TOLERANCES)
@pytest.mark.parametrize("N,C", SHAPES)
def test_rms_norm_matches_ref(N, C, dtype, atol, rtol):
    x, w = _inputs(N, C, dtype)
    want = rms_norm_ref(x, w, 1e-5)
    assert want.dtype == dtype
    assert_close(rms_norm(x, w, 1e-5), want, atol, rtol, "rms_norm")
    out = poison((N, C), dtype)
    got = rms_norm(x, w, 1e-5, out=out)
    assert got is out
    assert_close(out, want, atol, rtol, "rms_norm out=")


@pytest.mark.parametrize("dtype,atol,rtol", TOLERANCES)
def test_rms_norm_chunked_rows(monkeypatch, dtype, atol, rtol):
    # rows wider than one block: the two-pass loop (C=200 over 64-wide chunks, ragged tail)
    monkeypatch.setattr(rms_mod, "_MAX_BLOCK_C", 64)
    assert not rms_mod._launch_config(200)[1]
    x, w = _inputs(5, 200, dtype, seed=1)
    out = poison((5, 200), dtype)
    assert_close(rms_norm(x, w, 1e-6, out=out), rms_norm_ref(x, w, 1e-6), atol, rtol, "rms_norm chunked")


def test_rms_norm_strided_and_3d():
    # row-strided input (a slice of a fused buffer) and a 3-D (B, T, C) input and out
    N, C = 7, 96
    big = torch.randn(N, 3 * C)
    x, w = big[:, C:2 * C], torch.randn(C)
    assert not x.is_contiguous()
    assert_close(rms_norm(x, w, 1e-5), rms_norm_ref(x, w, 1e-5), 1e-5, 1e-5, "strided")
    x3 = torch.randn(2, 5, 2 * C)[:, :, :C]                               # (B, T, C), row-strided
    out3 = poison((2, 5, C), torch.float32)
    rms_norm(x3, w, 1e-5, out=out3)
    assert_close(out3, rms_norm_ref(x3, w, 1e-5), 1e-5, 1e-5, "3d")


def test_rms_norm_ref_is_formula():
    # the ref against the textbook formula in float64
    x, w = _inputs(9, 200, torch.float32, seed=2)
    xd = x.double()
    want = xd / torch.sqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-5) * w.double()
    assert_close(rms_norm_ref(x, w, 1e-5), want, 1e-5, 1e-5, "ref vs formula")


def test_rms_norm_matches_transformers_fp32():
    modeling = pytest.importorskip("transformers.models.llama.modeling_llama")
    N, C, eps = 37, 200, 1e-6
    x, w = _inputs(N, C, torch.float32, seed=3)
    hf = modeling.LlamaRMSNorm(C, eps=eps)
    with torch.no_grad():
        hf.weight.copy_(w)
        want = hf(x)
    assert_close(rms_norm_ref(x, w, eps), want, 1e-6, 1e-6, "ref vs transformers")
    assert_close(rms_norm(x, w, eps), want, 1e-5, 1e-5, "kernel vs transformers")


def test_rms_norm_bad_shapes():
    x, w = _inputs(3, 64, torch.float32)
    with pytest.raises(ValueError, match="weight"):
        rms_norm(x, w[:32], 1e-5)
    with pytest.raises(ValueError, match="out"):
        rms_norm(x, w, 1e-5, out=torch.empty(3, 32))
    with pytest.raises(ValueError, match="out"):
        rms_norm(x, w, 1e-5, out=torch.empty(3, 64, dtype=torch.float16))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,atol,rtol", TOLERANCES)
@pytest.mark.parametrize("N,C", [(4096, 4096), (33, 5120), (7, 8192), (5, 12288)])
def test_rms_norm_cuda(N, C, dtype, atol, rtol):
    x, w = _inputs(N, C, dtype)
    x, w = x.cuda(), w.cuda()
    assert_close(rms_norm(x, w, 1e-5), rms_norm_ref(x, w, 1e-5), atol, rtol, "rms_norm cuda")
