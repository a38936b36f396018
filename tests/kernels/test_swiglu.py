"""swiglu: Triton kernel (TRITON_INTERPRET=1 on CPU) vs swiglu_ref vs the formula."""
import pytest
import torch

from minigen.kernels.swiglu import swiglu, swiglu_ref
from tests.helpers import TOLERANCES, assert_close, poison

# (N, F): single row, odd N, non-power-of-two F, several column blocks with a ragged tail
SHAPES = [(1, 64), (37, 200), (4, 1000), (20, 1536)]


def _inputs(N, F, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    gate = (torch.randn(N, F, generator=g) * 3).to(dtype)
    up = torch.randn(N, F, generator=g).to(dtype)
    return gate, up


@pytest.mark.parametrize("dtype,atol,rtol", TOLERANCES)
@pytest.mark.parametrize("N,F", SHAPES)
def test_swiglu_matches_ref(N, F, dtype, atol, rtol):
    gate, up = _inputs(N, F, dtype)
    want = swiglu_ref(gate, up)
    assert want.dtype == dtype
    assert_close(swiglu(gate, up), want, atol, rtol, "swiglu")
    out = poison((N, F), dtype)
    got = swiglu(gate, up, out=out)
    assert got is out
    assert_close(out, want, atol, rtol, "swiglu out=")


def test_swiglu_fused_gate_up_and_3d():
    # gate and up as the two halves of one fused (N, 2F) projection: row-strided views
    N, F = 9, 200
    gate_up = torch.randn(N, 2 * F)
    gate, up = gate_up[:, :F], gate_up[:, F:]
    assert not gate.is_contiguous()
    assert_close(swiglu(gate, up), swiglu_ref(gate, up), 1e-5, 1e-5, "fused gate_up")
    g3 = torch.randn(2, 5, 2 * F)                                         # (B, T, 2F)
    out3 = poison((2, 5, F), torch.float32)
    swiglu(g3[..., :F], g3[..., F:], out=out3)
    assert_close(out3, swiglu_ref(g3[..., :F], g3[..., F:]), 1e-5, 1e-5, "3d")


def test_swiglu_ref_is_formula():
    gate, up = _inputs(5, 300, torch.float32, seed=1)
    gd = gate.double()
    want = gd / (1 + torch.exp(-gd)) * up.double()
    assert_close(swiglu_ref(gate, up), want, 1e-5, 1e-5, "ref vs formula")


def test_swiglu_bad_shapes():
    gate, up = _inputs(3, 64, torch.float32)
    with pytest.raises(ValueError, match="same shape"):
        swiglu(gate, up[:, :32])
    with pytest.raises(ValueError, match="out"):
        swiglu(gate, up, out=torch.empty(3, 64, dtype=torch.float16))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,atol,rtol", TOLERANCES)
@pytest.mark.parametrize("N,F", [(4096, 11008), (1, 14336), (33, 2816)])
def test_swiglu_cuda(N, F, dtype, atol, rtol):
    gate, up = (t.cuda() for t in _inputs(N, F, dtype))
    assert_close(swiglu(gate, up), swiglu_ref(gate, up), atol, rtol, "swiglu cuda")
