"""OPT (Meta's Open Pre-trained Transformers), bottom-up in one file.

Learned positions (table offset 2), ReLU MLP, biases everywhere, pre-LN (most sizes) or post-LN
(opt-350m: `do_layer_norm_before=False`, which also has project_in/project_out between a
512-wide embedding and the 1024-wide decoder). Parameter names follow OPTForCausalLM.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from minigen.kernels.ops import Ops
from minigen.config import ModelConfig

POSITION_OFFSET = 2   # OPT's learned position table reserves its first two rows


class LayerNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.eps = eps


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        C, b = cfg.dim, cfg.qkv_bias
        self.q_proj, self.k_proj = nn.Linear(C, C, bias=b), nn.Linear(C, C, bias=b)
        self.v_proj, self.out_proj = nn.Linear(C, C, bias=b), nn.Linear(C, C, bias=cfg.o_bias)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.self_attn_layer_norm = LayerNorm(cfg.dim, cfg.norm_eps)
        self.fc1 = nn.Linear(cfg.dim, cfg.hidden_dim, bias=cfg.mlp_bias)
        self.fc2 = nn.Linear(cfg.hidden_dim, cfg.dim, bias=cfg.mlp_bias)
        self.final_layer_norm = LayerNorm(cfg.dim, cfg.norm_eps)


class Decoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        P = cfg.word_embed_proj_dim
        self.embed_tokens = nn.Embedding(cfg.vocab_size, P)
        self.embed_positions = nn.Embedding(cfg.max_seq_len + POSITION_OFFSET, cfg.dim)
        self.project_in = nn.Linear(P, cfg.dim, bias=False) if P != cfg.dim else None
        self.project_out = nn.Linear(cfg.dim, P, bias=False) if P != cfg.dim else None
        self.final_layer_norm = LayerNorm(cfg.dim, cfg.norm_eps) if cfg.has_final_layer_norm else None
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))


class OPTModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.decoder = Decoder(cfg)


class OPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = OPTModel(cfg)
        self.lm_head = nn.Linear(cfg.word_embed_proj_dim, cfg.vocab_size, bias=False)
        self.ops: Ops = Ops(use_triton=False)

    def setup(self, device: torch.device, ops: Ops) -> None:
        self.ops = ops

    @property
    def sm_scale(self) -> float:
        return self.config.sm_scale   # HF scales q after its projection; same product

    def _ln(self, ln: LayerNorm, x: torch.Tensor) -> torch.Tensor:
        return self.ops.layer_norm(x, ln.weight, ln.bias, ln.eps)

    def forward(self, tokens: torch.Tensor, meta, kv, logits_idx: torch.Tensor | None = None) -> torch.Tensor:
        """tokens (N,) packed; returns fp32 logits (len(logits_idx) or N, V)."""
        cfg, dec = self.config, self.model.decoder
        N, H, D = tokens.shape[0], cfg.num_heads, cfg.head_dim
        pre = cfg.do_layer_norm_before
        x = dec.embed_tokens(tokens)                                      # (N, P)
        if dec.project_in is not None:
            x = self.ops.linear(x, dec.project_in)                        # (N, C)
        x = x + dec.embed_positions(meta.positions + POSITION_OFFSET)
        for i, blk in enumerate(dec.layers):
            # attention (pre-LN: norm first; post-LN: norm after the residual add)
            at = blk.self_attn
            kv.pre_attention(i, x)
            h = self._ln(blk.self_attn_layer_norm, x) if pre else x
            q = self.ops.linear(h, at.q_proj).view(N, H, D)               # (N, H, D)
            k = self.ops.linear(h, at.k_proj).view(N, H, D)
            v = self.ops.linear(h, at.v_proj).view(N, H, D)
            o = kv.attend(i, q, k, v)                                     # (N, H, D)
            x = x + self.ops.linear(o.reshape(N, H * D), at.out_proj)
            if not pre:
                x = self._ln(blk.self_attn_layer_norm, x)
            # MLP: fc1 -> ReLU -> fc2
            h = self._ln(blk.final_layer_norm, x) if pre else x
            x = x + self.ops.linear(F.relu(self.ops.linear(h, blk.fc1)), blk.fc2)
            if not pre:
                x = self._ln(blk.final_layer_norm, x)
        if logits_idx is not None:
            x = x[logits_idx]                                             # (B, C)
        if dec.final_layer_norm is not None:
            x = self._ln(dec.final_layer_norm, x)
        if dec.project_out is not None:
            x = self.ops.linear(x, dec.project_out)                       # (*, P)
        return self.ops.linear(x, self.lm_head).float()                   # (*, V)

    def project_q(self, layer: int, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Layer `layer`'s queries (N, H, D) for the residual stream x (N, C), through the layer's
        own attention input norm (pre-LN; post-LN attends to x itself). No RoPE in OPT."""
        cfg, blk = self.config, self.model.decoder.layers[layer]
        h = self._ln(blk.self_attn_layer_norm, x) if cfg.do_layer_norm_before else x
        return self.ops.linear(h, blk.self_attn.q_proj).view(x.shape[0], cfg.num_heads, cfg.head_dim)

    def tie_weights(self) -> None:
        self.lm_head.weight = self.model.decoder.embed_tokens.weight
