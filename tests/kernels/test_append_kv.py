"""append_kv: Triton (interpreter on CPU; pinned pool on CUDA) vs ref, bit-exact copies."""
import pytest
import torch

from minigen.kernels.append_kv import append_kv, append_kv_ref


def _case(N, S, T, Hkv, D, dtype, device="cpu", pool_device="cpu", pin=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(N, Hkv, D, generator=g).to(dtype).to(device)
    v = torch.randn(N, Hkv, D, generator=g).to(dtype).to(device)
    # distinct (slot, pos) pairs
    flat = torch.randperm(S * T, generator=g)[:N]
    slot, pos = (flat // T).to(device), (flat % T).to(device)
    pools = [torch.full((S, T, Hkv, D), float("nan"), dtype=dtype, device=pool_device) for _ in range(2)]
    if pin:
        pools = [p.pin_memory() for p in pools]
    return k, v, pools, slot, pos


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("N,S,T,Hkv,D", [(1, 1, 1, 1, 64), (37, 3, 20, 3, 48), (5, 2, 9, 9, 80), (8, 4, 16, 32, 128)])
def test_append_kv_matches_ref(N, S, T, Hkv, D, dtype):
    k, v, (kp, vp), slot, pos = _case(N, S, T, Hkv, D, dtype)
    kr, vr = kp.clone(), vp.clone()
    append_kv(k, v, kp, vp, slot, pos)
    append_kv_ref(k, v, kr, vr, slot, pos)
    # NaN outside the written rows stays NaN: compare bit patterns
    assert torch.equal(torch.nan_to_num(kp, nan=7.0), torch.nan_to_num(kr, nan=7.0))
    assert torch.equal(torch.nan_to_num(vp, nan=7.0), torch.nan_to_num(vr, nan=7.0))
    assert torch.equal(kp[slot, pos], k) and torch.equal(vp[slot, pos], v)
    assert int(torch.isnan(kp).any(-1).any(-1).sum()) == S * T - N   # untouched rows


def test_append_kv_rejects_bad_shapes():
    k, v, (kp, vp), slot, pos = _case(3, 2, 4, 2, 16, torch.float32)
    with pytest.raises(ValueError, match="must be"):
        append_kv(k, v, kp[..., :8], vp[..., :8], slot, pos)


@pytest.mark.gpu
def test_append_kv_into_pinned_pool():
    k, v, (kp, vp), slot, pos = _case(64, 8, 512, 32, 128, torch.float16, device="cuda", pin=True)
    append_kv(k, v, kp, vp, slot, pos)
    torch.cuda.synchronize()
    assert torch.equal(kp[slot.cpu(), pos.cpu()], k.cpu()) and torch.equal(vp[slot.cpu(), pos.cpu()], v.cpu())
