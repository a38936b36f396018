"""GGUF block formats dequantized with torch, on whatever device the raw bytes are on: on a GPU a
1.5B model's K-quants take well under a second instead of tens of seconds of numpy on the host.
Formats not written here fall back to the gguf package's numpy code (minigen/load/gguf.py).

Block layouts (ggml's, little-endian; QK_K = 256 weights per super-block):
    Q8_0   34 B / 32 w    d fp16 | q int8[32]                         w = d * q
    Q4_0   18 B / 32 w    d fp16 | qs u8[16]                          w = d * (nibble - 8)
    Q4_1   20 B / 32 w    d fp16 | m fp16 | qs u8[16]                 w = d * nibble + m
           (byte j holds weight j in its low nibble and weight j + 16 in its high nibble)
    Q4_K  144 B / 256 w   d fp16 | dmin fp16 | scales u8[12] | qs u8[128]
           8 sub-blocks of 32 with 6-bit scale sc and min m packed in `scales`:
           j < 4: sc = s[j] & 63, m = s[j+4] & 63;  j >= 4: sc = s[j+4] & 15 | (s[j-4] >> 6) << 4,
           m = s[j+4] >> 4 | (s[j] >> 6) << 4.   Each 64 weights share 32 bytes of qs: the low
           nibbles are sub-block 2i, the high nibbles 2i+1.   w = (d * sc) * q - dmin * m
    Q6_K  210 B / 256 w   ql u8[128] | qh u8[64] | scales int8[16] | d fp16
           two halves of 128 weights; in half h, weight l (l < 32) of quarter k (k < 4) takes the
           low nibble (k even) or high nibble (k odd) of ql[64h + l + 32 (k % 2)] and bits
           2k..2k+1 of qh[32h + l] as its top 2 bits; q6 - 32, scale scales[8h + 2k + l // 16].
           w = (d * scale) * (q6 - 32)
Cost: one read of the raw bytes and one write of fp32 weights, a few elementwise ops per weight.
"""
from __future__ import annotations

import torch

QK_K = 256


def _f16(raw: torch.Tensor) -> torch.Tensor:
    """(..., 2) bytes -> (...) fp32 from little-endian fp16."""
    return raw.contiguous().view(torch.float16)[..., 0].float()


def _q8_0(b: torch.Tensor) -> torch.Tensor:                       # b (n, 34)
    return _f16(b[:, :2])[:, None] * b[:, 2:].view(torch.int8).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """(n, 16) bytes -> (n, 32) weights in block order: low nibbles first, then high nibbles."""
    return torch.cat([qs & 15, qs >> 4], dim=-1).float()


def _q4_0(b: torch.Tensor) -> torch.Tensor:                       # b (n, 18)
    return _f16(b[:, :2])[:, None] * (_nibbles(b[:, 2:]) - 8)


def _q4_1(b: torch.Tensor) -> torch.Tensor:                       # b (n, 20)
    return _f16(b[:, :2])[:, None] * _nibbles(b[:, 4:]) + _f16(b[:, 2:4])[:, None]


def _q4_k(b: torch.Tensor) -> torch.Tensor:                       # b (n, 144)
    n = b.shape[0]
    d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])                    # (n,)
    s = b[:, 4:16].long()                                          # (n, 12)
    lo, hi = s[:, :4], s[:, 4:8]                                   # scales' first and second groups
    sc = torch.cat([lo & 63, (s[:, 8:12] & 15) | ((lo >> 6) << 4)], dim=1)          # (n, 8)
    mn = torch.cat([hi & 63, (s[:, 8:12] >> 4) | ((hi >> 6) << 4)], dim=1)          # (n, 8)
    qs = b[:, 16:].view(n, 4, 32)                                  # 4 groups of 64 weights
    q = torch.stack([qs & 15, qs >> 4], dim=2).view(n, 8, 32).float()              # (n, 8 sub, 32)
    return ((d[:, None] * sc.float())[..., None] * q - (dmin[:, None] * mn.float())[..., None]).view(n, QK_K)


def _q6_k(b: torch.Tensor) -> torch.Tensor:                       # b (n, 210)
    n = b.shape[0]
    ql = b[:, :128].view(n, 2, 2, 32)                              # (half, ql offset 0 / 32, l)
    qh = b[:, 128:192].view(n, 2, 1, 32)                           # (half, -, l)
    scales = b[:, 192:208].view(torch.int8).float().view(n, 2, 8)  # (half, 8)
    d = _f16(b[:, 208:210])                                        # (n,)
    low = torch.stack([ql[:, :, 0] & 15, ql[:, :, 1] & 15, ql[:, :, 0] >> 4, ql[:, :, 1] >> 4], dim=2)  # (n, 2, 4, 32)
    shift = torch.tensor([0, 2, 4, 6], device=b.device, dtype=torch.uint8)[None, None, :, None]
    top = (qh >> shift) & 3                                        # (n, 2, 4, 32)
    q = (low | (top << 4)).float() - 32                            # (n, 2, 4, 32)
    sc = scales.view(n, 2, 4, 2)                                   # (half, quarter, l // 16)
    w = (d[:, None, None, None] * sc)[..., None] * q.view(n, 2, 4, 2, 16)
    return w.view(n, QK_K)


# GGMLQuantizationType value -> (bytes per block, weights per block, function)
FORMATS = {8: (34, 32, _q8_0), 2: (18, 32, _q4_0), 3: (20, 32, _q4_1), 12: (144, QK_K, _q4_k), 14: (210, QK_K, _q6_k)}


def dequantize(raw: torch.Tensor, qtype: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Raw GGUF bytes (uint8, any shape, on any device) of a tensor of `shape` in format `qtype`
    -> fp32 weights of that shape on the same device. KeyError for a format not written here."""
    block_bytes, block_weights, fn = FORMATS[qtype]
    blocks = raw.reshape(-1, block_bytes)
    numel = 1
    for x in shape:
        numel *= x
    if blocks.shape[0] * block_weights != numel:
        raise ValueError(f"{blocks.shape[0]} blocks of {block_weights} weights do not make a {tuple(shape)} tensor")
    return fn(blocks).reshape(shape)
