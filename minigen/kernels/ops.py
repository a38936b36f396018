"""`Ops`: the set of kernels a model and its KV policy call, each either the Triton launcher or its
plain-torch reference (`<op>_ref`, same signature). The runtime takes the launchers on CUDA and the
references elsewhere; `Ops(use_triton=True)` on CPU tensors runs the kernels under
TRITON_INTERPRET=1 (tests only: slow). One object per model, so nothing is chosen through
module-level state."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from minigen.kernels.append_kv import append_kv, append_kv_ref
from minigen.kernels.decode_attention import decode_attention, decode_attention_ref
from minigen.kernels.gather_kv import gather_kv, gather_kv_ref
from minigen.kernels.layer_norm import layer_norm, layer_norm_ref
from minigen.kernels.partial_qk import partial_qk, partial_qk_ref
from minigen.kernels.prefill_attention import prefill_attention, prefill_attention_ref
from minigen.kernels.reuse import plan_reuse, plan_reuse_ref
from minigen.kernels.quant_kv import dequantize_kv, dequantize_kv_ref, quantize_kv, quantize_kv_ref
from minigen.kernels.rms_norm import rms_norm, rms_norm_ref
from minigen.kernels.rope import rope, rope_ref
from minigen.kernels.select import select, select_ref
from minigen.kernels.sparse_attention import sparse_attention, sparse_attention_ref
from minigen.kernels.swiglu import swiglu, swiglu_ref


# CPU BLAS computes a product of fewer than this many rows with other kernels, whose rounding
# differs from the many-row kernel's (measured with torch 2.13's MKL: 1-3, 5-7 and 9-11 rows)
MIN_GEMM_ROWS = 12


def linear(x: torch.Tensor, mod: torch.nn.Linear) -> torch.Tensor:
    """x (N, C_in) through an nn.Linear's weight and bias: F.linear (cuBLAS, MKL)."""
    return F.linear(x, mod.weight, mod.bias)


def linear_row_invariant(x: torch.Tensor, mod: torch.nn.Linear) -> torch.Tensor:
    """F.linear whose rows do not depend on how many rows come with them, on the CPU: fewer than
    MIN_GEMM_ROWS rows are padded with zero rows, so every row goes through the same BLAS kernel and
    a sequence's numbers do not depend on the batch it runs in. Costs a 12-row product per decode
    step of one sequence (slower than the one-row kernel on the CPU)."""
    n = x.shape[0]
    if x.dim() != 2 or n >= MIN_GEMM_ROWS:
        return F.linear(x, mod.weight, mod.bias)
    padded = torch.cat([x, x.new_zeros(MIN_GEMM_ROWS - n, x.shape[1])])
    return F.linear(padded, mod.weight, mod.bias)[:n]


class Ops:
    __slots__ = ("use_triton", "linear", "rms_norm", "layer_norm", "rope", "swiglu", "prefill_attention",
                 "decode_attention", "append_kv", "partial_qk", "select", "gather_kv", "plan_reuse", "sparse_attention",
                 "quantize_kv", "dequantize_kv")

    def __init__(self, use_triton: bool):
        t = self.use_triton = use_triton
        # model
        self.linear = linear
        self.rms_norm = rms_norm if t else rms_norm_ref
        self.layer_norm = layer_norm if t else layer_norm_ref
        self.rope = rope if t else rope_ref
        self.swiglu = swiglu if t else swiglu_ref
        # attention and the KV cache
        self.prefill_attention = prefill_attention if t else prefill_attention_ref
        self.decode_attention = decode_attention if t else decode_attention_ref
        self.append_kv = append_kv if t else append_kv_ref
        # infinigen: speculation, selection, gather, sparse attention
        self.partial_qk = partial_qk if t else partial_qk_ref
        self.select = select if t else select_ref
        self.gather_kv = gather_kv if t else gather_kv_ref
        self.plan_reuse = plan_reuse if t else plan_reuse_ref
        self.sparse_attention = sparse_attention if t else sparse_attention_ref
        # int4
        self.quantize_kv = quantize_kv if t else quantize_kv_ref
        self.dequantize_kv = dequantize_kv if t else dequantize_kv_ref

    def set_batch_invariant(self, on: bool) -> None:
        """Make every row's numbers independent of the batch (CPU only; cuBLAS picks kernels by
        shape too, and minigen has no batch-invariant GPU matmul)."""
        self.linear = linear_row_invariant if on else linear

    @classmethod
    def for_device(cls, device) -> "Ops":
        return cls(use_triton=torch.device(device).type == "cuda")
