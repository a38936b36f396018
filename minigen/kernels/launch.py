"""What the kernel launchers share: the interpreter switch, row views, launch heuristics and the
`out=` convention (allocate, or check what the caller passed)."""
from __future__ import annotations

import functools
import os

import torch
import triton


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of `device`; the interpreter pretends to be an H100 (132) so tests
    exercise the same launch heuristics."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132


def rows_2d(t: torch.Tensor, C: int, what: str) -> torch.Tensor:
    """View (..., C) as (rows, C) without copying; the last dim must be contiguous."""
    try:
        return t.view(-1, C)
    except RuntimeError:
        raise ValueError(f"{what}: leading dims of shape {tuple(t.shape)} / strides {t.stride()} "
                         f"cannot be flattened without a copy; pass a row-strided tensor") from None


def row_launch_config(C: int, max_block: int) -> tuple[int, bool, int]:
    """(BLOCK_C, ONE_BLOCK, num_warps) of a row-wise kernel: a whole row per block when it fits
    in max_block, else chunks; ~16 elements per thread for C up to 4096."""
    block = triton.next_power_of_2(C)
    one_block = block <= max_block
    block = min(block, max_block)
    return block, one_block, min(8, max(1, block // 512))


def output(out: torch.Tensor | None, shape: tuple, dtype: torch.dtype, device: torch.device,
           what: str) -> torch.Tensor:
    """The launcher's output: a fresh tensor, or the caller's `out=` checked for shape, dtype and a
    contiguous last dim (ValueError naming the op otherwise)."""
    shape = tuple(shape)
    if out is None:
        return torch.empty(shape, dtype=dtype, device=device)
    if tuple(out.shape) != shape or out.dtype != dtype or out.stride(-1) != 1:
        raise ValueError(f"{what}: out must be {shape} {dtype} with stride(-1) 1, "
                         f"got {tuple(out.shape)} {out.dtype} strides {out.stride()}")
    return out
