"""Llama family (Llama 1/2/3, SmolLM2, Mistral-style GQA, Qwen2: q/k/v biases), bottom-up in one file.

Parameter names follow Hugging Face's LlamaForCausalLM so checkpoints load by name.
Tokens are packed: a forward over B sequences sees N tokens as one (N, C) tensor; the KV policy
(minigen/kv/) owns the cache and attention, this file owns only the math around it.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from minigen.kernels.ops import Ops
from minigen.kernels.rope import rope_tables
from minigen.config import ModelConfig


# ---------------------------------------------------------------------------------------------
# RoPE frequencies (rotate-half convention; GGUF q/k rows are un-permuted by the loader)
# ---------------------------------------------------------------------------------------------
def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """(D/2,) fp32 inverse frequencies, with Llama-3.1 `llama3` scaling when configured."""
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    rs = cfg.rope_scaling
    if rs is None or rs.get("rope_type", rs.get("type")) != "llama3":
        return inv_freq
    # llama3: long wavelengths are slowed by `factor`, short ones kept, the band between blended
    factor, lo, hi = rs["factor"], rs.get("low_freq_factor", 1.0), rs.get("high_freq_factor", 4.0)
    old_ctx = rs["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_ctx / lo, old_ctx / hi
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - lo) / (hi - lo)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    is_mid = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(is_mid, blended, scaled)


# ---------------------------------------------------------------------------------------------
# Blocks
# ---------------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        H, Hkv, D, C = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.dim
        self.num_heads, self.num_kv_heads, self.head_dim = H, Hkv, D
        self.q_proj = nn.Linear(C, H * D, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(C, Hkv * D, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(C, Hkv * D, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(H * D, C, bias=cfg.o_bias)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.hidden_dim, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.dim, cfg.hidden_dim, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.hidden_dim, cfg.dim, bias=cfg.mlp_bias)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------
class Llama(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = LlamaModel(cfg)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.ops: Ops = Ops(use_triton=False)
        self.rope_cos = self.rope_sin = None

    def setup(self, device: torch.device, ops: Ops) -> None:
        """After weights are loaded: pick kernels and build the RoPE tables on `device`."""
        self.ops = ops
        cos, sin = rope_tables(rope_inv_freq(self.config), self.config.max_seq_len)  # (T, D/2)
        self.rope_cos, self.rope_sin = cos.to(device), sin.to(device)

    @property
    def sm_scale(self) -> float:
        return self.config.sm_scale

    def forward(self, tokens: torch.Tensor, meta, kv, logits_idx: torch.Tensor | None = None) -> torch.Tensor:
        """tokens (N,) packed; returns fp32 logits (len(logits_idx) or N, V)."""
        ops, cfg = self.ops, self.config
        N, H, Hkv, D = tokens.shape[0], cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        x = self.model.embed_tokens(tokens)                               # (N, C)
        for i, blk in enumerate(self.model.layers):
            # attention: norm -> q/k/v -> rope -> policy (stores KV, attends) -> o_proj
            at = blk.self_attn
            kv.pre_attention(i, x)
            h = ops.rms_norm(x, blk.input_layernorm.weight, cfg.norm_eps)
            q = ops.linear(h, at.q_proj).view(N, H, D)                    # (N, H, D)
            k = ops.linear(h, at.k_proj).view(N, Hkv, D)                  # (N, Hkv, D)
            v = ops.linear(h, at.v_proj).view(N, Hkv, D)
            q, k = ops.rope(q, k, meta.positions, self.rope_cos, self.rope_sin)
            o = kv.attend(i, q, k, v)                                     # (N, H, D)
            x = x + ops.linear(o.reshape(N, H * D), at.o_proj)
            # MLP: norm -> SwiGLU -> down
            h = ops.rms_norm(x, blk.post_attention_layernorm.weight, cfg.norm_eps)
            m = blk.mlp
            x = x + ops.linear(ops.swiglu(ops.linear(h, m.gate_proj), ops.linear(h, m.up_proj)), m.down_proj)
        if logits_idx is not None:
            x = x[logits_idx]                                             # (B, C)
        x = ops.rms_norm(x, self.model.norm.weight, cfg.norm_eps)
        return ops.linear(x, self.lm_head).float()                        # (*, V)

    def project_q(self, layer: int, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Layer `layer`'s post-RoPE queries (N, H, D) for the residual stream x (N, C), through
        the layer's own input norm. Speculative policies pass an earlier layer's residual to guess
        this layer's attention (the residual changes little from layer to layer; the norm gains
        do, so the layer's own gain is applied)."""
        cfg, blk = self.config, self.model.layers[layer]
        h = self.ops.rms_norm(x, blk.input_layernorm.weight, cfg.norm_eps)
        q = self.ops.linear(h, blk.self_attn.q_proj).view(x.shape[0], cfg.num_heads, cfg.head_dim)
        return self.ops.rope(q, q, positions, self.rope_cos, self.rope_sin)[0]

    def tie_weights(self) -> None:
        self.lm_head.weight = self.model.embed_tokens.weight

