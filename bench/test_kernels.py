"""Kernel microbenchmarks: every Triton kernel in minigen/kernels/ against its torch `_ref`, fp16, at
the shapes minigen runs (bench/conftest.py: timing, ceilings, JSON fields).

    pytest bench --benchmark-only --benchmark-json bench/results/kernels.json      (GPU machine)

Models: Llama-2-7B (C 4096, H = Hkv = 32, D 128) and the default SmolLM2-135M (C 576, H 9,
Hkv 3, D 64). Steps: decode at batch 1 and 8 with 8192 cached tokens per sequence, and one
4096-token prefill chunk that ends at position 8192 (1 x 4096 or 8 x 512 new tokens). The
InfiniGen ops use the runtime's shapes: R = 20% of D partial dims, alpha 5, ~10% of the tokens
selected (gather_kv reads them from a pinned HostKVPool, the runtime's layout). quantize_kv and
dequantize_kv (minigen/kernels/quant_kv.py) skip with a reason when that module is absent.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

from minigen.kernels.append_kv import append_kv, append_kv_ref
from minigen.kernels.decode_attention import decode_attention, decode_attention_ref
from minigen.kernels.gather_kv import gather_kv, gather_kv_ref
from minigen.kernels.layer_norm import layer_norm, layer_norm_ref
from minigen.kernels.partial_qk import partial_qk, partial_qk_ref
from minigen.kernels.prefill_attention import prefill_attention, prefill_attention_ref
from minigen.kernels.rms_norm import rms_norm, rms_norm_ref
from minigen.kernels.rope import rope, rope_ref, rope_tables
from minigen.kernels.select import select, select_ref
from minigen.kernels.sparse_attention import sparse_attention, sparse_attention_ref
from minigen.kernels.swiglu import swiglu, swiglu_ref


@dataclass(frozen=True, slots=True)
class Model:
    C: int
    H: int
    Hkv: int
    D: int
    F: int
    rope_theta: float


MODELS = {"llama2-7b": Model(4096, 32, 32, 128, 11008, 1e4),
          "smollm2-135m": Model(576, 9, 3, 64, 1536, 1e5)}
CONTEXT = 8192                         # tokens per sequence once the step's tokens are in
# step -> (batch B, new tokens per sequence L); every sequence ends the step at CONTEXT tokens
STEPS = {"decode-b1": (1, 1), "decode-b8": (8, 1), "prefill-b1x4096": (1, 4096), "prefill-b8x512": (8, 512)}
DECODE, PREFILL = ["decode-b1", "decode-b8"], ["prefill-b1x4096", "prefill-b8x512"]
ROWS = ["decode-b1", "decode-b8", "prefill-b1x4096"]   # row-wise ops see only B * L tokens
FRACTION, ALPHA, PARTIAL_RATIO = 0.1, 5.0, 0.2
DTYPE, EPS = torch.float16, 1e-5

impls = pytest.mark.parametrize("impl", ["triton", "ref"])
models = pytest.mark.parametrize("model", MODELS)


def randn(*shape, scale: float = 1.0, dtype=DTYPE) -> torch.Tensor:
    return (torch.randn(shape, device="cuda") * scale).to(dtype)


def nb(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def i32(values) -> torch.Tensor:
    return torch.as_tensor(values, dtype=torch.int32, device="cuda")


def step_positions(step: str) -> torch.Tensor:
    """(B * L,) int64 positions of the step's new tokens, sequence-major."""
    B, L = STEPS[step]
    return torch.arange(CONTEXT - L, CONTEXT, device="cuda").repeat(B)


def case_of(model: str, step: str) -> str:
    return f"{model} {step}"


# ---------------------------------------------------------------------------------------------
# row-wise ops
# ---------------------------------------------------------------------------------------------
@impls
@pytest.mark.parametrize("step", ROWS)
@models
def test_rms_norm(kbench, model, step, impl):
    m, N = MODELS[model], math.prod(STEPS[step])
    x, w = randn(N, m.C), randn(m.C)
    kbench(rms_norm, rms_norm_ref, impl, (x, w, EPS), case=case_of(model, step),
           shape=f"x ({N}, {m.C})", nbytes=nb(x, w, x))


@impls
@pytest.mark.parametrize("step", ROWS)
@models
def test_layer_norm(kbench, model, step, impl):
    """OPT's norm, at the same widths (C 4096 is also OPT-6.7B's)."""
    m, N = MODELS[model], math.prod(STEPS[step])
    x, w, b = randn(N, m.C), randn(m.C), randn(m.C)
    kbench(layer_norm, layer_norm_ref, impl, (x, w, b, EPS), case=case_of(model, step),
           shape=f"x ({N}, {m.C}) + bias", nbytes=nb(x, w, b, x))


@impls
@pytest.mark.parametrize("step", ROWS)
@models
def test_rope(kbench, model, step, impl):
    m, N = MODELS[model], math.prod(STEPS[step])
    q, k, pos = randn(N, m.H, m.D), randn(N, m.Hkv, m.D), step_positions(step)
    inv_freq = 1.0 / m.rope_theta ** (torch.arange(0, m.D, 2, device="cuda").float() / m.D)
    cos, sin = rope_tables(inv_freq, CONTEXT)                                   # (T, D/2) fp32
    kbench(rope, rope_ref, impl, (q, k, pos, cos, sin), case=case_of(model, step),
           shape=f"q ({N}, {m.H}, {m.D}), k ({N}, {m.Hkv}, {m.D})",
           nbytes=2 * nb(q, k) + nb(pos) + 2 * N * (m.D // 2) * 4)           # + the cos/sin rows read


@impls
@pytest.mark.parametrize("step", ROWS)
@models
def test_swiglu(kbench, model, step, impl):
    m, N = MODELS[model], math.prod(STEPS[step])
    gate, up = randn(N, m.F), randn(N, m.F)
    kbench(swiglu, swiglu_ref, impl, (gate, up), case=case_of(model, step),
           shape=f"gate, up ({N}, {m.F})", nbytes=nb(gate, up, gate))


# ---------------------------------------------------------------------------------------------
# attention over the GPU cache (S, Hkv, T, D), every sequence at CONTEXT tokens
# ---------------------------------------------------------------------------------------------
def gpu_cache(m: Model, B: int) -> tuple[torch.Tensor, torch.Tensor]:
    return randn(B, m.Hkv, CONTEXT, m.D), randn(B, m.Hkv, CONTEXT, m.D)        # (S, Hkv, T, D)


@impls
@pytest.mark.parametrize("step", PREFILL)
@models
def test_prefill_attention(kbench, model, step, impl):
    m, (B, L) = MODELS[model], STEPS[step]
    q, (kc, vc) = randn(B * L, m.H, m.D), gpu_cache(m, B)
    cu, start, slots = i32(range(0, B * L + 1, L)), i32([CONTEXT - L] * B), i32(range(B))
    flops = 4 * B * m.H * m.D * (L * (CONTEXT - L) + L * L / 2)              # QK^T and PV, causal
    kbench(prefill_attention, prefill_attention_ref, impl, (q, kc, vc, cu, start, slots, m.D ** -0.5, L),
           case=case_of(model, step), shape=f"q ({B * L}, {m.H}, {m.D}), {B} x {L} new over {CONTEXT} keys",
           nbytes=2 * nb(q) + nb(kc, vc), flops=flops)


@impls
@pytest.mark.parametrize("step", DECODE)
@models
def test_decode_attention(kbench, model, step, impl):
    m, (B, _) = MODELS[model], STEPS[step]
    q, (kc, vc) = randn(B, m.H, m.D), gpu_cache(m, B)
    kbench(decode_attention, decode_attention_ref, impl, (q, kc, vc, i32([CONTEXT] * B), i32(range(B)), m.D ** -0.5),
           case=case_of(model, step), shape=f"q ({B}, {m.H}, {m.D}), K/V ({B}, {m.Hkv}, {CONTEXT}, {m.D})",
           nbytes=2 * nb(q) + nb(kc, vc))


# ---------------------------------------------------------------------------------------------
# the offloaded path: pinned host pool (L, S, T, Hkv, D), one layer used
# ---------------------------------------------------------------------------------------------
def host_pool(m: Model, B: int, fill: bool):
    from minigen.kv.pool import HostKVPool
    pool = HostKVPool(1, B, CONTEXT, m.Hkv, m.D, dtype=DTYPE, pin=True)
    if fill:
        from bench.decode import fill_random
        fill_random(pool.k), fill_random(pool.v)
    return pool


@impls
@pytest.mark.parametrize("step", STEPS)
@models
def test_append_kv(kbench, model, step, impl):
    """The step's new K/V rows from the GPU into the pinned pool (posted PCIe writes)."""
    m, (B, L) = MODELS[model], STEPS[step]
    k, v, pool = randn(B * L, m.Hkv, m.D), randn(B * L, m.Hkv, m.D), host_pool(m, B, fill=False)
    slot, pos = torch.arange(B, device="cuda").repeat_interleave(L), step_positions(step)
    kp, vp = pool.k[0], pool.v[0]                                                # (S, T, Hkv, D)
    slot_h, pos_h = slot.cpu(), pos.cpu()
    kbench(append_kv, append_kv_ref, impl, (k, v, kp, vp, slot, pos), case=case_of(model, step),
           shape=f"k, v ({B * L}, {m.Hkv}, {m.D}) -> pinned ({B}, {CONTEXT}, {m.Hkv}, {m.D})",
           nbytes=2 * nb(k, v) + nb(slot, pos), ceiling="pcie_d2h", link_bytes=nb(k, v),
           outputs=lambda _: (kp[slot_h, pos_h], vp[slot_h, pos_h]), exact=True)


@impls
@pytest.mark.parametrize("step", DECODE)
@models
def test_gather_kv(kbench, model, step, impl):
    m, (B, _) = MODELS[model], STEPS[step]
    N = math.ceil(FRACTION * CONTEXT)
    kp, vp = host_pool(m, B, fill=True).heads(0)                                # (S, Hkv, T, D) views
    idx = torch.rand(B, m.Hkv, CONTEXT, device="cuda").topk(N).indices.sort().values.to(torch.int32)
    count = i32([[N] * m.Hkv] * B)                                                # every head at the cap
    out_k, out_v = randn(B, m.Hkv, N, m.D), randn(B, m.Hkv, N, m.D)
    rows = 2 * B * m.Hkv * N * m.D * kp.element_size()                          # K + V rows over PCIe
    kbench(gather_kv, gather_kv_ref, impl, (kp, vp, idx, count, i32(range(B)), out_k, out_v),
           case=case_of(model, step), shape=f"{N} of {CONTEXT} rows per head, ({B}, {m.Hkv}, {N}, {m.D}) x 2",
           nbytes=2 * rows + nb(idx, count), ceiling="pcie_h2d", link_bytes=rows, exact=True)


# ---------------------------------------------------------------------------------------------
# InfiniGen speculation and sparse attention (all on the GPU)
# ---------------------------------------------------------------------------------------------
@impls
@pytest.mark.parametrize("step", DECODE)
@models
def test_partial_qk(kbench, model, step, impl):
    m, (B, _) = MODELS[model], STEPS[step]
    R = int(m.D * PARTIAL_RATIO)
    q, cols, pk = randn(B, m.H, m.D), randn(B, m.Hkv, m.D, R), randn(B, m.Hkv, R, CONTEXT)
    kbench(partial_qk, partial_qk_ref, impl, (q, cols, pk, i32([CONTEXT] * B), i32(range(B)), m.D ** -0.5),
           case=case_of(model, step),
           shape=f"q ({B}, {m.H}, {m.D}), cols ({B}, {m.Hkv}, {m.D}, {R}), pk ({B}, {m.Hkv}, {R}, {CONTEXT})",
           nbytes=nb(q, cols, pk) + B * m.H * CONTEXT * 4)                      # + fp32 scores written


@impls
@pytest.mark.parametrize("step", DECODE)
@models
def test_select(kbench, model, step, impl):
    m, (B, _) = MODELS[model], STEPS[step]
    N = math.ceil(FRACTION * CONTEXT)
    scores = randn(B, m.H, CONTEXT, scale=3.0, dtype=torch.float32)             # logit-like spread
    kbench(select, select_ref, impl, (scores, i32([CONTEXT] * B), ALPHA, FRACTION, m.H // m.Hkv, N),
           case=case_of(model, step), shape=f"scores ({B}, {m.H}, {CONTEXT}) fp32 -> idx ({B}, {m.Hkv}, {N})",
           nbytes=nb(scores) + B * m.Hkv * (N + 1) * 4, exact=True)


@impls
@pytest.mark.parametrize("step", DECODE)
@models
def test_sparse_attention(kbench, model, step, impl):
    m, (B, _) = MODELS[model], STEPS[step]
    N = math.ceil(FRACTION * CONTEXT)
    q, k_sel, v_sel = randn(B, m.H, m.D), randn(B, m.Hkv, N, m.D), randn(B, m.Hkv, N, m.D)
    k_cur, v_cur = randn(B, m.Hkv, m.D), randn(B, m.Hkv, m.D)
    count = i32([[N] * m.Hkv] * B)
    kbench(sparse_attention, sparse_attention_ref, impl, (q, k_sel, v_sel, count, k_cur, v_cur, m.D ** -0.5),
           case=case_of(model, step), shape=f"q ({B}, {m.H}, {m.D}), {N} gathered rows per kv head",
           nbytes=2 * nb(q) + nb(k_sel, v_sel, k_cur, v_cur, count))


# ---------------------------------------------------------------------------------------------
# int4 KV (minigen/kernels/quant_kv.py, when present)
# ---------------------------------------------------------------------------------------------
def quant_kv_module():
    mod = pytest.importorskip("minigen.kernels.quant_kv", reason="minigen/kernels/quant_kv.py is not in this tree")
    if not all(hasattr(mod, f) for f in ("quantize_kv", "quantize_kv_ref", "dequantize_kv", "dequantize_kv_ref")):
        pytest.skip("minigen.kernels.quant_kv has no quantize_kv/dequantize_kv (+ _ref) pair")
    return mod


@impls
@pytest.mark.parametrize("step", ROWS)
@models
def test_quantize_kv(kbench, model, step, impl):
    """The step's new K rows (N, Hkv, D) -> 4-bit codes + fp16 scale/min per group."""
    mod, m, N = quant_kv_module(), MODELS[model], math.prod(STEPS[step])
    x = randn(N, m.Hkv, m.D)
    packed, scale, mn = mod.quantize_kv(x)
    kbench(mod.quantize_kv, mod.quantize_kv_ref, impl, (x,), case=case_of(model, step),
           shape=f"x ({N}, {m.Hkv}, {m.D}) -> codes {tuple(packed.shape)}", nbytes=nb(x, packed, scale, mn), exact=True)


@impls
@pytest.mark.parametrize("step", DECODE)
@models
def test_dequantize_kv(kbench, model, step, impl):
    """A decode step's whole cache, (B, CONTEXT, Hkv, D/2) codes -> fp16."""
    mod, m, (B, _) = quant_kv_module(), MODELS[model], STEPS[step]
    packed, scale, mn = (t.view(B, CONTEXT, m.Hkv, -1) for t in mod.quantize_kv(randn(B * CONTEXT, m.Hkv, m.D)))
    out = torch.empty(B, CONTEXT, m.Hkv, m.D, dtype=DTYPE, device="cuda")
    kbench(mod.dequantize_kv, mod.dequantize_kv_ref, impl, (packed, scale, mn, out), case=case_of(model, step),
           shape=f"codes {tuple(packed.shape)} -> ({B}, {CONTEXT}, {m.Hkv}, {m.D})",
           nbytes=nb(packed, scale, mn, out), exact=True)
