"""Triton kernels, one op per file. Each file holds `_<op>_kernel` (@triton.jit), the launcher
`<op>(...)` and `<op>_ref(...)` in plain torch with the same signature.

The runtime calls the Triton launchers on CUDA tensors and the torch references elsewhere;
`Ops(use_triton=True)` on CPU tensors runs the kernels under TRITON_INTERPRET=1 (tests only: slow).
"""
from __future__ import annotations

import os


def rows_2d(t, C: int, what: str):
    """View (..., C) as (rows, C) without copying; the last dim must be contiguous."""
    try:
        return t.view(-1, C)
    except RuntimeError:
        raise ValueError(f"{what}: leading dims of shape {tuple(t.shape)} / strides {t.stride()} "
                         f"cannot be flattened without a copy; pass a row-strided tensor") from None


def row_launch_config(C: int, max_block: int) -> tuple[int, bool, int]:
    """(BLOCK_C, ONE_BLOCK, num_warps) of a row-wise kernel: a whole row per block when it fits
    in max_block, else chunks; ~16 elements per thread for C up to 4096."""
    import triton
    block = triton.next_power_of_2(C)
    one_block = block <= max_block
    block = min(block, max_block)
    return block, one_block, min(8, max(1, block // 512))


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


class Ops:
    """The set of ops a model calls: Triton launchers or their torch references.

    One object per model so that nothing is chosen through module-level state.
    """

    NAMES = ("rms_norm", "layer_norm", "rope", "swiglu", "prefill_attention", "decode_attention",
             "append_kv", "partial_qk", "select", "gather_kv", "sparse_attention", "quantize_kv", "dequantize_kv")
    MODULE = {"quantize_kv": "quant_kv", "dequantize_kv": "quant_kv"}   # ops sharing a file
    __slots__ = ("use_triton",) + NAMES

    def __init__(self, use_triton: bool):
        import importlib
        self.use_triton = use_triton
        for name in self.NAMES:
            mod = importlib.import_module(f"kernels.{self.MODULE.get(name, name)}")
            setattr(self, name, getattr(mod, name if use_triton else name + "_ref"))

    @classmethod
    def for_device(cls, device) -> "Ops":
        import torch
        return cls(use_triton=torch.device(device).type == "cuda")
