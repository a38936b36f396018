"""Triton kernels, one op per file. Each file holds `_<op>_kernel` (@triton.jit), the launcher
`<op>(...)` and `<op>_ref(...)` in plain torch with the same signature.

The runtime calls the Triton launchers on CUDA tensors and the torch references elsewhere;
`Ops(use_triton=True)` on CPU tensors runs the kernels under TRITON_INTERPRET=1 (tests only: slow).
"""
from __future__ import annotations

import os


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


class Ops:
    """The set of ops a model calls: Triton launchers or their torch references.

    One object per model so that nothing is chosen through module-level state.
    """

    __slots__ = ("use_triton", "rms_norm", "layer_norm", "rope", "swiglu",
                 "prefill_attention", "decode_attention")

    def __init__(self, use_triton: bool):
        from kernels import decode_attention, layer_norm, prefill_attention, rms_norm, rope, swiglu
        self.use_triton = use_triton
        pick = (lambda mod, name: getattr(mod, name if use_triton else name + "_ref"))
        self.rms_norm = pick(rms_norm, "rms_norm")
        self.layer_norm = pick(layer_norm, "layer_norm")
        self.rope = pick(rope, "rope")
        self.swiglu = pick(swiglu, "swiglu")
        self.prefill_attention = pick(prefill_attention, "prefill_attention")
        self.decode_attention = pick(decode_attention, "decode_attention")

    @classmethod
    def for_device(cls, device) -> "Ops":
        import torch
        return cls(use_triton=torch.device(device).type == "cuda")
