"""rope: Triton kernel (TRITON_INTERPRET=1 on CPU) vs rope_ref; rope_ref vs a complex rotation and
vs transformers' apply_rotary_pos_emb."""
import pytest
import torch

from minigen.kernels.rope import rope, rope_ref, rope_tables
from tests.helpers import TOLERANCES, assert_close, poison

MAX_POS = 64
# (N, H, Hkv, D): one token, GQA, MQA, non-power-of-two D (48, 80), SmolLM2-like 9/3 heads
SHAPES = [(1, 4, 4, 64), (37, 6, 2, 48), (5, 3, 1, 80), (8, 9, 3, 64)]


def _inv_freq(D, theta=10000.0):
    return 1.0 / (theta ** (torch.arange(0, D, 2, dtype=torch.float32) / D))   # (D/2,)


def _inputs(N, H, Hkv, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(N, H, D, generator=g).to(dtype)
    k = torch.randn(N, Hkv, D, generator=g).to(dtype)
    positions = torch.randint(0, MAX_POS, (N,), generator=g)                   # unsorted, int64
    cos, sin = rope_tables(_inv_freq(D), MAX_POS)
    return q, k, positions, cos, sin


def _complex_rope(x, positions, theta=10000.0):
    """Independent float64 RoPE: pair (x[i], x[i + D/2]) as x[i] + j*x[i + D/2], times e^{j p w_i}."""
    D = x.shape[-1]
    w = 1.0 / (theta ** (torch.arange(0, D, 2, dtype=torch.float64) / D))     # (D/2,)
    rot = torch.polar(torch.ones(len(positions), D // 2, dtype=torch.float64),
                      positions.double()[:, None] * w[None, :])[:, None, :]    # (N, 1, D/2)
    xd = x.double()
    z = torch.complex(xd[..., :D // 2], xd[..., D // 2:]) * rot               # (N, h, D/2)
    return torch.cat((z.real, z.imag), dim=-1)                                 # (N, h, D)


@pytest.mark.parametrize("dtype,atol,rtol", TOLERANCES)
@pytest.mark.parametrize("N,H,Hkv,D", SHAPES)
def test_rope_matches_ref(N, H, Hkv, D, dtype, atol, rtol):
    q, k, pos, cos, sin = _inputs(N, H, Hkv, D, dtype)
    q_want, k_want = rope_ref(q, k, pos, cos, sin)
    assert q_want.dtype == dtype and k_want.dtype == dtype
    q_got, k_got = rope(q, k, pos, cos, sin)
    assert_close(q_got, q_want, atol, rtol, "rope q")
    assert_close(k_got, k_want, atol, rtol, "rope k")
    out = (poison((N, H, D), dtype), poison((N, Hkv, D), dtype))
    got = rope(q, k, pos, cos, sin, out=out)
    assert got[0] is out[0] and got[1] is out[1]
    assert_close(out[0], q_want, atol, rtol, "rope q out=")
    assert_close(out[1], k_want, atol, rtol, "rope k out=")


@pytest.mark.parametrize("N,H,Hkv,D", SHAPES)
def test_rope_ref_is_complex_rotation(N, H, Hkv, D):
    q, k, pos, cos, sin = _inputs(N, H, Hkv, D, torch.float32, seed=1)
    q_ref, k_ref = rope_ref(q, k, pos, cos, sin)
    assert_close(q_ref, _complex_rope(q, pos), 1e-5, 1e-5, "ref q vs complex")
    assert_close(k_ref, _complex_rope(k, pos), 1e-5, 1e-5, "ref k vs complex")


def test_rope_ref_matches_transformers_fp32():
    modeling = pytest.importorskip("transformers.models.llama.modeling_llama")
    N, H, Hkv, D = 11, 4, 2, 64
    q, k, pos, cos, sin = _inputs(N, H, Hkv, D, torch.float32, seed=2)
    c, s = cos[pos], sin[pos]
    c_full, s_full = torch.cat((c, c), -1)[None], torch.cat((s, s), -1)[None]    # (1, N, D)
    q_hf, k_hf = modeling.apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                               c_full, s_full)                  # (1, h, N, D)
    q_ref, k_ref = rope_ref(q, k, pos, cos, sin)
    assert_close(q_ref, q_hf[0].transpose(0, 1), 1e-6, 1e-6, "ref q vs transformers")
    assert_close(k_ref, k_hf[0].transpose(0, 1), 1e-6, 1e-6, "ref k vs transformers")


def test_rope_tables():
    cos, sin = rope_tables(_inv_freq(48), 10)
    assert cos.shape == sin.shape == (10, 24) and cos.dtype == torch.float32
    theta = torch.arange(10, dtype=torch.float64)[:, None] * _inv_freq(48).double()[None, :]
    assert_close(cos, theta.cos(), 1e-6, 1e-6, "cos table")
    assert_close(sin, theta.sin(), 1e-6, 1e-6, "sin table")


@pytest.mark.parametrize("dtype,atol,rtol", TOLERANCES)
def test_rope_in_place(dtype, atol, rtol):
    N, H, Hkv, D = 37, 6, 2, 80
    q, k, pos, cos, sin = _inputs(N, H, Hkv, D, dtype, seed=3)
    q_want, k_want = rope_ref(q, k, pos, cos, sin)
    q_got, k_got = rope(q, k, pos, cos, sin, out=(q, k))
    assert q_got is q and k_got is k
    assert_close(q, q_want, atol, rtol, "in-place q")
    assert_close(k, k_want, atol, rtol, "in-place k")
    # the ref in place too
    q2, k2, *_ = _inputs(N, H, Hkv, D, dtype, seed=3)
    rope_ref(q2, k2, pos, cos, sin, out=(q2, k2))
    assert_close(q2, q_want, 0, 0, "ref in-place q")


@pytest.mark.parametrize("in_place", [False, True])
def test_rope_views_of_fused_qkv(in_place):
    # q and k as row-strided views into one (N, (H + 2*Hkv) * D) projection output
    N, H, Hkv, D = 7, 4, 2, 48
    qkv = torch.randn(N, (H + 2 * Hkv) * D)
    q = qkv[:, :H * D].view(N, H, D)                                      # (N, H, D), row stride (H+2Hkv)*D
    k = qkv[:, H * D:(H + Hkv) * D].view(N, Hkv, D)                       # (N, Hkv, D)
    assert not q.is_contiguous() and not k.is_contiguous()
    pos = torch.tensor([0, 5, 63, 2, 2, 17, 40])
    cos, sin = rope_tables(_inv_freq(D), MAX_POS)
    q_want, k_want = rope_ref(q, k, pos, cos, sin)
    v_before = qkv[:, (H + Hkv) * D:].clone()
    q_got, k_got = rope(q, k, pos, cos, sin, out=(q, k) if in_place else None)
    assert_close(q_got, q_want, 1e-5, 1e-5, "fused q")
    assert_close(k_got, k_want, 1e-5, 1e-5, "fused k")
    assert torch.equal(qkv[:, (H + Hkv) * D:], v_before), "v part of qkv was written"
    if in_place:
        assert_close(qkv[:, :H * D].view(N, H, D), q_want, 1e-5, 1e-5, "qkv holds rotated q")


def test_rope_position_zero_is_identity():
    q, k, _, cos, sin = _inputs(3, 2, 1, 64, torch.float32)
    q_got, k_got = rope(q, k, torch.zeros(3, dtype=torch.int64), cos, sin)
    assert_close(q_got, q, 0, 0, "p=0 q")
    assert_close(k_got, k, 0, 0, "p=0 k")


def test_rope_bad_shapes():
    q, k, pos, cos, sin = _inputs(3, 4, 2, 64, torch.float32)
    with pytest.raises(ValueError, match="cos/sin"):
        rope(q, k, pos, cos[:, :16], sin[:, :16])
    with pytest.raises(ValueError, match="positions"):
        rope(q, k, pos[:2], cos, sin)
    with pytest.raises(ValueError, match="out k"):
        rope(q, k, pos, cos, sin, out=(q, torch.empty(3, 4, 64)))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,atol,rtol", TOLERANCES)
@pytest.mark.parametrize("N,H,Hkv,D", [(4096, 32, 8, 128), (1, 64, 8, 128), (333, 9, 3, 64), (17, 40, 40, 80)])
def test_rope_cuda(N, H, Hkv, D, dtype, atol, rtol):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(N, H, D, generator=g).to(dtype).cuda()
    k = torch.randn(N, Hkv, D, generator=g).to(dtype).cuda()
    pos = torch.randint(0, 8192, (N,), generator=g).cuda()
    cos, sin = rope_tables(_inv_freq(D).cuda(), 8192)
    q_want, k_want = rope_ref(q, k, pos, cos, sin)
    q_got, k_got = rope(q, k, pos, cos, sin)
    assert_close(q_got, q_want, atol, rtol, "rope cuda q")
    assert_close(k_got, k_want, atol, rtol, "rope cuda k")
    rope(q, k, pos, cos, sin, out=(q, k))
    assert_close(q, q_want, atol, rtol, "rope cuda in-place q")
