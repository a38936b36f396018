"""A sequence being generated: its slot, tokens and text, and how each sampled token is accepted
(eos, stop strings held back until they cannot match, length and context limits)."""
from __future__ import annotations

from dataclasses import dataclass, field

from minigen.sampler import SamplingParams


@dataclass(slots=True)
class Sequence:
    slot: int
    pending: list[int]                     # tokens to prefill next
    cached_ids: list[int] = field(default_factory=list)   # tokens whose K/V are in the cache
    output_ids: list[int] = field(default_factory=list)
    text: str = ""                         # text emitted so far (stop strings removed)
    held: str = ""                         # decoded text held back: may be a stop string's start
    finished: bool = False
    finish_reason: str | None = None       # "eos" | "stop" | "length" | "context"
    decoder: object = None

    @property
    def num_cached(self) -> int:
        return len(self.cached_ids)


@dataclass(slots=True)
class GenStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_s: float = 0.0     # time to first token
    decode_s: float = 0.0      # the decode steps after the first token (graph capture excluded)
    decode_tokens: int = 0

    @property
    def decode_tok_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s > 0 else 0.0


def accept_token(s: Sequence, tok: int, sp: SamplingParams, eos: set[int], capacity: int) -> str:
    """Append a sampled token to `s` (its slot holds `capacity` tokens); returns the text that can be
    shown now. Ends the sequence on eos, a stop string, max_new_tokens or a full slot."""
    if tok in eos:
        s.finished, s.finish_reason = True, "eos"
        s.held += s.decoder.flush()
        return _release_held(s)
    s.output_ids.append(tok)
    s.held += s.decoder.push(tok)
    for stop in sp.stop:
        at = s.held.find(stop)
        if at >= 0:
            s.held = s.held[:at]
            s.finished, s.finish_reason = True, "stop"
            return _release_held(s)
    # "context": the token would be fed at position num_cached, past the slot's end
    reason = ("length" if len(s.output_ids) >= sp.max_new_tokens
              else "context" if s.num_cached >= capacity else None)
    if reason:
        s.finished, s.finish_reason = True, reason
        s.held += s.decoder.flush()
        return _release_held(s)
    # keep back the longest tail that could still grow into a stop string
    keep = max((len(x) - 1 for x in sp.stop), default=0)
    out = s.held[:len(s.held) - keep] if keep else s.held
    s.held = s.held[len(out):]
    s.text += out
    return out


def _release_held(s: Sequence) -> str:
    out, s.held = s.held, ""
    s.text += out
    return out
