"""Append new tokens' K/V rows to a KV pool that may live in pinned host memory.

Math, for every new token n (slot s = token_slot[n], position p = positions[n]):
    k_pool[s, p, :, :] = k[n, :, :]        v_pool[s, p, :, :] = v[n, :, :]
Pool layout (S, T, Hkv, D): one token of one slot is a contiguous row of Hkv * D elements, so a
whole-sequence fetch [s, :n] is one contiguous block and a token append is one row.

On CUDA the pools are pinned host tensors and the kernel stores straight into them through their
device-visible address (UVA): posted PCIe writes, no host involvement, no sync, graph-capturable.
torch's `pool[slot, pos] = k` would instead pull k to the host first (a sync) or need one
cudaMemcpy per token.

Cost per call: reads N * Hkv * D * elem * 2 (K and V) from HBM; writes the same over PCIe.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _append_kv_kernel(
    # pointers
    K, V, K_pool, V_pool, TokenSlot, Positions,
    # sizes
    num_kv_heads,
    # strides (elements; the head dim is contiguous everywhere)
    stride_kn, stride_kh, stride_vn, stride_vh,
    stride_kps, stride_kpt, stride_kph,
    stride_vps, stride_vpt, stride_vph,
    # constexprs
    HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # ---- one program per (token, block of heads); int64 before stride products
    n = tl.program_id(0).to(tl.int64)
    h0 = tl.program_id(1).to(tl.int64) * BLOCK_H
    slot = tl.load(TokenSlot + n).to(tl.int64)
    pos = tl.load(Positions + n).to(tl.int64)
    offs_h = h0 + tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_h[:, None] < num_kv_heads) & (offs_d[None, :] < HEAD_DIM)
    # ---- load the token's (BLOCK_H, D) tile of K and V, then store both rows into the pools
    k = tl.load(K + n * stride_kn + offs_h[:, None] * stride_kh + offs_d[None, :], mask=mask)
    v = tl.load(V + n * stride_vn + offs_h[:, None] * stride_vh + offs_d[None, :], mask=mask)
    tl.store(K_pool + slot * stride_kps + pos * stride_kpt + offs_h[:, None] * stride_kph + offs_d[None, :],
             k, mask=mask)
    tl.store(V_pool + slot * stride_vps + pos * stride_vpt + offs_h[:, None] * stride_vph + offs_d[None, :],
             v, mask=mask)


def _check(k, v, k_pool, v_pool, token_slot, positions):
    N, Hkv, D = k.shape
    if v.shape != k.shape or k_pool.shape != v_pool.shape or k_pool.shape[2:] != (Hkv, D):
        raise ValueError(f"append_kv: k/v {tuple(k.shape)} and pools {tuple(k_pool.shape)} must be "
                         f"(N, Hkv, D) and (S, T, Hkv, D)")
    if k_pool.dtype != k.dtype or v_pool.dtype != v.dtype:
        raise ValueError(f"append_kv: pool dtype {k_pool.dtype} != k dtype {k.dtype}")
    if token_slot.shape != (N,) or positions.shape != (N,):
        raise ValueError("append_kv: token_slot and positions must be (N,)")
    for t in (k, v, k_pool, v_pool):
        if t.stride(-1) != 1:
            raise ValueError("append_kv: the head dim must be contiguous")


def append_kv(k: torch.Tensor, v: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
              token_slot: torch.Tensor, positions: torch.Tensor) -> None:
    """k, v (N, Hkv, D) on the GPU -> rows (token_slot[n], positions[n]) of the pools (S, T, Hkv, D),
    pinned host or GPU memory. In place, no return value."""
    _check(k, v, k_pool, v_pool, token_slot, positions)
    N, Hkv, D = k.shape
    if N == 0:
        return
    BLOCK_D = triton.next_power_of_2(D)
    BLOCK_H = max(1, min(triton.next_power_of_2(Hkv), 4096 // BLOCK_D))
    grid = (N, triton.cdiv(Hkv, BLOCK_H))
    _append_kv_kernel[grid](
        k, v, k_pool, v_pool, token_slot, positions,
        Hkv,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_pool.stride(0), k_pool.stride(1), k_pool.stride(2),
        v_pool.stride(0), v_pool.stride(1), v_pool.stride(2),
        HEAD_DIM=D, BLOCK_H=BLOCK_H, BLOCK_D=BLOCK_D, num_warps=4,
    )


def append_kv_ref(k: torch.Tensor, v: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                  token_slot: torch.Tensor, positions: torch.Tensor) -> None:
    _check(k, v, k_pool, v_pool, token_slot, positions)
    slot, pos = token_slot.to(k_pool.device), positions.to(k_pool.device)
    k_pool[slot, pos] = k.to(k_pool.device)
    v_pool[slot, pos] = v.to(v_pool.device)
