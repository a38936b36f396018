"""Sampling: greedy, temperature, top-k, top-p, seeded. Runs on the logits' device without host
syncs (Gumbel-max via exponential noise instead of torch.multinomial)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


@dataclass(slots=True)
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.7       # 0 = greedy
    top_p: float = 1.0             # nucleus: keep the smallest set with mass >= top_p
    top_k: int = 0                 # 0 = off
    seed: int | None = None
    stop: list[str] = field(default_factory=list)   # stop strings (not included in the output); a str is one
    ignore_eos: bool = False

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop)
        if any(not isinstance(s, str) for s in self.stop):
            raise ValueError(f"stop must be a string or a list of strings, got {self.stop!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not 0 <= self.seed < 2**63):
            raise ValueError(f"seed must be an integer in [0, 2^63), got {self.seed!r}")
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int):
            raise ValueError(f"max_new_tokens must be an integer, got {self.max_new_tokens!r}")
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)) or self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


def make_generator(seed: int | None, device: torch.device) -> torch.Generator:
    g = torch.Generator(device=device)
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed)
    return g


def sample_no_sync(logits: torch.Tensor, sp: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """logits (B, V) fp32 -> next tokens (B,) int64, on the same device."""
    if sp.is_greedy:
        return logits.argmax(dim=-1)
    # subtract the row's max before dividing: logits / T overflows to inf (then NaN) for tiny T,
    # while (logits - max) / T only goes to -inf, so T -> 0 tends to greedy as it should
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / sp.temperature
    if sp.top_k > 0 and sp.top_k < logits.shape[-1]:
        kth = torch.topk(logits, sp.top_k, dim=-1).values[:, -1:]                  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sp.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)       # (B, V)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token when the mass before it already reaches top_p (the top token always stays)
        drop = (probs.cumsum(dim=-1) - probs) >= sp.top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.empty_like(logits).scatter_(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    # Gumbel-max: argmax(p / E), E ~ Exp(1), is a draw from p, with no host sync
    noise = torch.empty_like(probs).exponential_(generator=generator)
    return (probs / noise).argmax(dim=-1)
