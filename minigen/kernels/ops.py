"""`Ops`: the set of kernels a model and its KV policy call, each either the Triton launcher or its
plain-torch reference (`<op>_ref`, same signature). The runtime takes the launchers on CUDA and the
references elsewhere; `Ops(use_triton=True)` on CPU tensors runs the kernels under
TRITON_INTERPRET=1 (tests only: slow). One object per model, so nothing is chosen through
module-level state."""
from __future__ import annotations

import torch

from minigen.kernels.append_kv import append_kv, append_kv_ref
from minigen.kernels.decode_attention import decode_attention, decode_attention_ref
from minigen.kernels.gather_kv import gather_kv, gather_kv_ref
from minigen.kernels.layer_norm import layer_norm, layer_norm_ref
from minigen.kernels.partial_qk import partial_qk, partial_qk_ref
from minigen.kernels.prefill_attention import prefill_attention, prefill_attention_ref
from minigen.kernels.quant_kv import dequantize_kv, dequantize_kv_ref, quantize_kv, quantize_kv_ref
from minigen.kernels.rms_norm import rms_norm, rms_norm_ref
from minigen.kernels.rope import rope, rope_ref
from minigen.kernels.select import select, select_ref
from minigen.kernels.sparse_attention import sparse_attention, sparse_attention_ref
from minigen.kernels.swiglu import swiglu, swiglu_ref


class Ops:
    __slots__ = ("use_triton", "rms_norm", "layer_norm", "rope", "swiglu", "prefill_attention",
                 "decode_attention", "append_kv", "partial_qk", "select", "gather_kv", "sparse_attention",
                 "quantize_kv", "dequantize_kv")

    def __init__(self, use_triton: bool):
        t = self.use_triton = use_triton
        # model
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
        self.sparse_attention = sparse_attention if t else sparse_attention_ref
        # int4
        self.quantize_kv = quantize_kv if t else quantize_kv_ref
        self.dequantize_kv = dequantize_kv if t else dequantize_kv_ref

    @classmethod
    def for_device(cls, device) -> "Ops":
        return cls(use_triton=torch.device(device).type == "cuda")
