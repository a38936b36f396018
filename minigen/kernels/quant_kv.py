"""Group-wise asymmetric 4-bit K/V quantization (the FlexGen+INT4 baseline's format).

Math, for every (token, KV head) row x of D elements, cut into groups of G elements (G = 64, or
G = D when D < 64), per group:
    mn = min(x_g)    scale = fp16((max(x_g) - mn) / 15)    min = fp16(mn)
    q  = clamp(floor((x - min) * (1 / scale) + 0.5), 0, 15)      (q = 0 where scale == 0)
    x' = q * scale + min                                          (dequantize, in fp32, then cast)
so |x - x'| <= scale / 2 + the fp16 rounding of scale and min (the min's is |mn| * 2^-11: a group
far from zero relative to its range loses accuracy; real K/V groups are not like that).
Constant groups have scale 0: every q is 0 and x' = min exactly (no 0/0). Rounding is half-up
(floor(y + 0.5)), not torch.round's half-to-even, so the kernel and the reference agree.
Scale and min are stored as fp16 whatever the KV dtype: FlexGen's choice, and it keeps the
bytes per row constant, (D/2 + 4 D/G) bytes vs 2 D for fp16 K/V (0.28x at G = 64).

Packing: element 2j in the low nibble of byte j, element 2j+1 in the high nibble. G is even, so
both halves of a byte are in the same group.
    packed (..., D/2) uint8     scale, min (..., D/G) fp16
Both launchers take strided tensors (the head dim contiguous), so `quantize_kv(out=...)` can write
straight into views of a pool's token records and `dequantize_kv` can read a staged slice.

Exactness: the per-group divisions use IEEE division (div_rn) and the kernels are compiled without
FMA contraction (enable_fp_fusion=False), so every op is the same correctly-rounded fp32 op as in
the torch reference: codes, scales and dequantized values are bit-identical to the `_ref` (on the
GPU too; with contraction, floor(y + 0.5) could flip a code where y sits on a .5 tie).

Kernel layout: one program per BLOCK_R rows of one sequence, row = token * Hkv + head (rows past
2^31 rejected: int32 index math). Quantize works on a (BLOCK_R, groups, G/2) tile of element
pairs, so a group's range is one reduction over the last axis. Dequantize works on a
(BLOCK_R, D/2) tile of bytes and joins the two nibbles' values back into element order, so each
output row is one contiguous (vectorized) store: it runs on every decode step over the whole
cached KV, quantize only on the new tokens. Cost per call (bytes):
    quantize    reads N*Hkv*D*elem, writes N*Hkv*(D/2 + 4*D/G)
    dequantize  reads S*T*Hkv*(D/2 + 4*D/G), writes S*T*Hkv*D*elem
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

DEFAULT_GROUP = 64


@triton.jit
def _quantize_kv_kernel(
    # pointers
    X, Packed, Scale, Min,
    # sizes
    num_tokens, num_kv_heads,
    # strides (elements; (sequence, token, head), the last dim contiguous everywhere)
    stride_xs, stride_xt, stride_xh,
    stride_ps, stride_pt, stride_ph,
    stride_ss, stride_st, stride_sh,
    # constexprs
    GROUP: tl.constexpr, NUM_GROUPS: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_J: tl.constexpr,
):
    # ---- rows of this program (row = token * Hkv + head; int32 index math, int64 offsets)
    s = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    t, h = (rows // num_kv_heads).to(tl.int64), (rows % num_kv_heads).to(tl.int64)
    offs_g = tl.arange(0, BLOCK_G)
    offs_j = tl.arange(0, BLOCK_J)
    rg_mask = (rows < num_tokens * num_kv_heads)[:, None] & (offs_g < NUM_GROUPS)[None, :]  # (R, G)
    mask = rg_mask[:, :, None] & (offs_j < GROUP // 2)[None, None, :]                       # (R, G, J)

    # ---- load the even and odd elements of every pair: x[g * G + 2j] and x[g * G + 2j + 1]
    x_ptr = (X + s * stride_xs + t * stride_xt + h * stride_xh)[:, None, None] \
        + (offs_g[:, None] * GROUP + 2 * offs_j[None, :])[None, :, :]
    xe = tl.load(x_ptr, mask=mask, other=0.0).to(tl.float32)
    xo = tl.load(x_ptr + 1, mask=mask, other=0.0).to(tl.float32)

    # ---- group range -> fp16 scale and min (padding lanes/rows: 0, so no inf - inf below)
    mx = tl.max(tl.maximum(tl.where(mask, xe, float("-inf")), tl.where(mask, xo, float("-inf"))), axis=2)
    mn = tl.min(tl.minimum(tl.where(mask, xe, float("inf")), tl.where(mask, xo, float("inf"))), axis=2)
    mx = tl.where(rg_mask, mx, 0.0)
    mn = tl.where(rg_mask, mn, 0.0)
    scale = tl.math.div_rn(mx - mn, tl.full(mx.shape, 15.0, tl.float32)).to(tl.float16)
    min16 = mn.to(tl.float16)
    sf, mf = scale.to(tl.float32), min16.to(tl.float32)
    # 1/scale, 0 for constant groups (the divisor is made 1 there: no division by zero)
    nonzero = sf > 0
    inv = tl.where(nonzero, tl.math.div_rn(tl.full(sf.shape, 1.0, tl.float32), tl.where(nonzero, sf, 1.0)), 0.0)

    # ---- codes: round half up, clamp (fp16 rounding of scale/min can push y just outside [0, 15])
    ye = (xe - mf[:, :, None]) * inv[:, :, None]
    yo = (xo - mf[:, :, None]) * inv[:, :, None]
    qe = tl.minimum(tl.maximum(tl.floor(ye + 0.5), 0.0), 15.0).to(tl.uint8)
    qo = tl.minimum(tl.maximum(tl.floor(yo + 0.5), 0.0), 15.0).to(tl.uint8)

    # ---- store: byte g * G/2 + j = q_even | q_odd << 4; scale and min per group
    p_ptr = (Packed + s * stride_ps + t * stride_pt + h * stride_ph)[:, None, None] \
        + (offs_g[:, None] * (GROUP // 2) + offs_j[None, :])[None, :, :]
    tl.store(p_ptr, qe | (qo << 4), mask=mask)
    s_off = (s * stride_ss + t * stride_st + h * stride_sh)[:, None] + offs_g[None, :]
    tl.store(Scale + s_off, scale, mask=rg_mask)
    tl.store(Min + s_off, min16, mask=rg_mask)


@triton.jit
def _dequantize_kv_kernel(
    # pointers
    Packed, Scale, Min, Out, Count,
    # sizes
    num_tokens, num_kv_heads,
    # strides (elements; (sequence, token, head), the last dim contiguous everywhere)
    stride_ps, stride_pt, stride_ph,
    stride_ss, stride_st, stride_sh,
    stride_os, stride_ot, stride_oh,
    stride_c,
    # constexprs
    GROUP: tl.constexpr, HALF_D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
    HAS_COUNT: tl.constexpr,
):
    # ---- rows of this program (row = token * Hkv + head; int32 index math, int64 offsets)
    s = tl.program_id(1).to(tl.int64)
    n_tok = num_tokens
    if HAS_COUNT:   # this sequence's live tokens, read on the device (graph-capturable)
        n_tok = tl.minimum(tl.load(Count + s * stride_c), num_tokens)
    if tl.program_id(0) * BLOCK_R >= n_tok * num_kv_heads:
        return
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    t, h = (rows // num_kv_heads).to(tl.int64), (rows % num_kv_heads).to(tl.int64)
    r_mask = rows < n_tok * num_kv_heads
    cols = tl.arange(0, BLOCK_C)                          # byte j: elements 2j and 2j + 1
    mask = r_mask[:, None] & (cols < HALF_D)[None, :]     # (BLOCK_R, BLOCK_C)

    # ---- load a (rows, bytes) tile of codes, and each byte's group scale and min (a gather
    # that hits the same few addresses per row: L1 broadcasts)
    p = tl.load((Packed + s * stride_ps + t * stride_pt + h * stride_ph)[:, None] + cols[None, :],
                mask=mask, other=0)
    s_ptr = (s * stride_ss + t * stride_st + h * stride_sh)[:, None] + (cols // (GROUP // 2))[None, :]
    sf = tl.load(Scale + s_ptr, mask=mask, other=0.0).to(tl.float32)
    mf = tl.load(Min + s_ptr, mask=mask, other=0.0).to(tl.float32)

    # ---- x' = q * scale + min; interleave (low nibble, high nibble) back into element order so
    # each row is stored as one contiguous run
    lo = (p & 15).to(tl.float32) * sf + mf
    hi = (p >> 4).to(tl.float32) * sf + mf
    x = tl.reshape(tl.join(lo, hi), (BLOCK_R, 2 * BLOCK_C))                 # element 2j + {0, 1}
    offs_d = tl.arange(0, 2 * BLOCK_C)
    tl.store((Out + s * stride_os + t * stride_ot + h * stride_oh)[:, None] + offs_d[None, :],
             x.to(Out.dtype.element_ty), mask=r_mask[:, None] & (offs_d < 2 * HALF_D)[None, :])


# ---------------------------------------------------------------------------------------------
# shapes, checks, launch configuration
# ---------------------------------------------------------------------------------------------
def kv_group_size(head_dim: int, group_size: int = DEFAULT_GROUP) -> int:
    """The group size used for head_dim: group_size, or head_dim itself when smaller."""
    G = min(group_size, head_dim)
    if G < 2 or G % 2 or head_dim % G:
        raise ValueError(f"int4 KV: head dim {head_dim} is not a multiple of the quantization group {G} "
                         f"(an even number); pass a group_size that divides it (e.g. 16 for D=80) "
                         f"or use another KV policy")
    return G


def _quantize_config(rows: int, head_dim: int, group: int) -> dict:
    """~4K elements per program (16 per thread at 4 warps), fewer when there are fewer rows."""
    block_g, block_j = triton.next_power_of_2(head_dim // group), triton.next_power_of_2(group // 2)
    block_r = max(1, min(triton.next_power_of_2(max(rows, 1)), 4096 // (2 * block_g * block_j)))
    return dict(BLOCK_R=block_r, BLOCK_G=block_g, BLOCK_J=block_j, num_warps=4)


def _check_codes(packed, scale, mn, head_dim: int, group: int, lead: tuple, what: str) -> None:
    want = (*lead, head_dim // 2), (*lead, head_dim // group)
    if packed.shape != want[0] or scale.shape != want[1] or mn.shape != want[1]:
        raise ValueError(f"{what}: packed {tuple(packed.shape)} / scale {tuple(scale.shape)} / min {tuple(mn.shape)} "
                         f"must be {want[0]} uint8 and {want[1]} float16")
    if packed.dtype != torch.uint8 or scale.dtype != torch.float16 or mn.dtype != torch.float16:
        raise ValueError(f"{what}: packed must be uint8 and scale/min float16, got "
                         f"{packed.dtype}, {scale.dtype}, {mn.dtype}")
    if any(t.stride(-1) != 1 for t in (packed, scale, mn)) or scale.stride() != mn.stride():
        raise ValueError(f"{what}: packed/scale/min need a contiguous last dim, and scale and min the same strides")


def _check_quantize(x, group_size, out):
    if x.dim() != 3 or not x.is_floating_point() or x.stride(-1) != 1:
        raise ValueError(f"quantize_kv: x must be (N, Hkv, D) floating point with a contiguous head dim, "
                         f"got {tuple(x.shape)} {x.dtype} strides {x.stride()}")
    N, Hkv, D = x.shape
    G = kv_group_size(D, group_size)
    if out is None:
        out = (torch.empty((N, Hkv, D // 2), dtype=torch.uint8, device=x.device),
               torch.empty((N, Hkv, D // G), dtype=torch.float16, device=x.device),
               torch.empty((N, Hkv, D // G), dtype=torch.float16, device=x.device))
    _check_codes(*out, D, G, (N, Hkv), "quantize_kv")
    return G, out


def _check_dequantize(packed, scale, mn, out, dtype):
    if packed.dim() not in (3, 4):
        raise ValueError(f"dequantize_kv: packed must be (N, Hkv, D/2) or (S, T, Hkv, D/2), got {tuple(packed.shape)}")
    D, num_groups = 2 * packed.shape[-1], scale.shape[-1]
    if num_groups < 1 or D % num_groups:
        raise ValueError(f"dequantize_kv: {num_groups} scale groups do not divide the head dim {D}")
    G = kv_group_size(D, D // num_groups)         # even: both nibbles of a byte share a group
    _check_codes(packed, scale, mn, D, G, tuple(packed.shape[:-1]), "dequantize_kv")
    shape = (*packed.shape[:-1], D)
    if out is None:
        out = torch.empty(shape, dtype=dtype, device=packed.device)
    elif out.shape != shape or not out.is_floating_point() or out.stride(-1) != 1:
        raise ValueError(f"dequantize_kv: out must be {shape} floating point with a contiguous last dim, "
                         f"got {tuple(out.shape)} {out.dtype} strides {out.stride()}")
    return G, out


def _check_counts(counts: torch.Tensor | None, packed: torch.Tensor) -> None:
    if counts is None:
        return
    S = 1 if packed.dim() == 3 else packed.shape[0]
    if counts.shape != (S,) or counts.dtype != torch.int32 or counts.device != packed.device:
        raise ValueError(f"dequantize_kv: counts must be ({S},) int32 on {packed.device}, got "
                         f"{tuple(counts.shape)} {counts.dtype} on {counts.device}")


def _check_rows(rows: int, what: str) -> None:
    if rows >= 2**31:
        raise ValueError(f"{what}: {rows} (token, head) rows per sequence exceed int32 indexing; split the call")


def _seq_token_head(t: torch.Tensor) -> tuple[int, int, int]:
    """(sequence, token, head) strides of a 3-D (one sequence) or 4-D tensor."""
    return (0, *t.stride()[:2]) if t.dim() == 3 else t.stride()[:3]


# ---------------------------------------------------------------------------------------------
# launchers and references
# ---------------------------------------------------------------------------------------------
def quantize_kv(x: torch.Tensor, group_size: int = DEFAULT_GROUP, out=None):
    """x (N, Hkv, D) -> (packed (N, Hkv, D/2) uint8, scale (N, Hkv, D/G) fp16, min (N, Hkv, D/G) fp16).
    out: an optional (packed, scale, min) of those shapes, any row strides (pool record views)."""
    G, out = _check_quantize(x, group_size, out)
    packed, scale, mn = out
    N, Hkv, D = x.shape
    if N * Hkv == 0:
        return out
    _check_rows(N * Hkv, "quantize_kv")
    cfg = _quantize_config(N * Hkv, D, G)
    _quantize_kv_kernel[(triton.cdiv(N * Hkv, cfg["BLOCK_R"]), 1)](
        x, packed, scale, mn,
        N, Hkv,
        *_seq_token_head(x), *_seq_token_head(packed), *_seq_token_head(scale),
        GROUP=G, NUM_GROUPS=D // G, enable_fp_fusion=False, **cfg,
    )
    return out


def dequantize_kv(packed: torch.Tensor, scale: torch.Tensor, mn: torch.Tensor, out: torch.Tensor | None = None,
                  dtype: torch.dtype = torch.float16, counts: torch.Tensor | None = None) -> torch.Tensor:
    """packed (S, T, Hkv, D/2) (or (N, Hkv, D/2)), scale/min (..., D/G) -> (..., D) in out's dtype
    (or `dtype`). Without counts every row is converted, stale ones too: callers slice to the rows
    they need. counts (S,) int32 on the device: only sequence s's first counts[s] tokens are
    converted and the rest of out is left as it was (no host read: a CUDA graph can hold it)."""
    G, out = _check_dequantize(packed, scale, mn, out, dtype)
    _check_counts(counts, packed)
    S, (T, Hkv) = (1 if packed.dim() == 3 else packed.shape[0]), packed.shape[-3:-1]
    D = 2 * packed.shape[-1]
    if S * T * Hkv == 0:
        return out
    _check_rows(T * Hkv, "dequantize_kv")
    block_c = triton.next_power_of_2(D // 2)
    block_r = max(1, min(triton.next_power_of_2(T * Hkv), 4096 // (2 * block_c)))
    _dequantize_kv_kernel[(triton.cdiv(T * Hkv, block_r), S)](
        packed, scale, mn, out, packed if counts is None else counts,
        T, Hkv,
        *_seq_token_head(packed), *_seq_token_head(scale), *_seq_token_head(out),
        0 if counts is None else counts.stride(0),
        GROUP=G, HALF_D=D // 2, BLOCK_R=block_r, BLOCK_C=block_c, HAS_COUNT=counts is not None,
        num_warps=4, enable_fp_fusion=False,
    )
    return out


def quantize_kv_ref(x: torch.Tensor, group_size: int = DEFAULT_GROUP, out=None):
    """Plain torch, the definition (see the module docstring)."""
    G, out = _check_quantize(x, group_size, out)
    N, Hkv, D = x.shape
    xg = x.float().reshape(N, Hkv, D // G, G)                                   # (N, Hkv, D/G, G)
    mx, mn = xg.amax(-1), xg.amin(-1)
    scale, min16 = ((mx - mn) / 15).half(), mn.half()                          # (N, Hkv, D/G)
    sf, mf = scale.float(), min16.float()
    inv = torch.where(sf > 0, 1 / torch.where(sf > 0, sf, 1.0), 0.0)
    q = torch.floor((xg - mf[..., None]) * inv[..., None] + 0.5).clamp(0, 15).to(torch.uint8)
    q = q.reshape(N, Hkv, D)                                                    # (N, Hkv, D)
    out[0].copy_(q[..., 0::2] | (q[..., 1::2] << 4))
    out[1].copy_(scale)
    out[2].copy_(min16)
    return out


def dequantize_kv_ref(packed: torch.Tensor, scale: torch.Tensor, mn: torch.Tensor, out: torch.Tensor | None = None,
                      dtype: torch.dtype = torch.float16, counts: torch.Tensor | None = None) -> torch.Tensor:
    G, out = _check_dequantize(packed, scale, mn, out, dtype)
    _check_counts(counts, packed)
    lead, D = packed.shape[:-1], 2 * packed.shape[-1]
    q = torch.stack([packed & 15, packed >> 4], dim=-1).float()                # (..., D/2, 2)
    x = (q.reshape(*lead, D // G, G) * scale.float()[..., None] + mn.float()[..., None]).reshape(*lead, D)
    if counts is None:
        out.copy_(x)
    else:   # rows past a sequence's count stay as they were
        for s, n in enumerate(counts.tolist()):   # sync: CPU-path reference
            o, xs = (out, x) if packed.dim() == 3 else (out[s], x[s])
            o[:max(n, 0)].copy_(xs[:max(n, 0)])
    return out
