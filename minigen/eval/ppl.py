"""Perplexity (`python -m minigen.eval ppl`): per-token NLL through the engine's chunked prefill
(dense attention whatever the policy) or through the policy's decode path (Engine.teacher_force),
and the report (overall, per text, per span of positions along the context).
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from minigen.llm import LLM


def token_nll(llm: LLM, ids: list[int], chunk: int = 1024) -> torch.Tensor:
    """NLL of ids[1:] given everything before, through the engine's chunked prefill: (len - 1,)
    on the device. One prefill call per chunk, so (chunk, V) logits never pile up for the text."""
    if len(ids) < 2:
        raise ValueError(f"need at least 2 tokens to score, the text has {len(ids)}")
    engine = llm.get_engine(1)
    seq = engine.new_sequence(ids)
    target = torch.tensor(ids, device=engine.device)
    parts, pos, todo = [], 0, list(ids)
    try:
        with torch.inference_mode():
            while todo:
                seq.pending, todo = todo[:chunk], todo[chunk:]
                n_chunk = len(seq.pending)
                logits = engine.prefill([seq], all_logits=True)[0]            # (n_chunk, V)
                nxt = target[pos + 1: pos + n_chunk + 1]                       # logits at p predict p+1
                lp = torch.log_softmax(logits[: nxt.shape[0]].float(), dim=-1)
                parts.append(-lp.gather(1, nxt[:, None])[:, 0])
                pos += n_chunk
    finally:
        engine.release(seq)
    return torch.cat(parts)


def token_nll_decode(llm: LLM, docs: list[list[int]], prefix: int) -> list[torch.Tensor]:
    """NLL of every doc[prefix:] through the decode path, the docs as one batch: doc[:prefix] is
    prefilled, each later token is fed one decode step at a time, so the KV policy decides what
    every scored token sees. One (len(doc) - prefix,) tensor per doc, on the device."""
    for d in docs:
        if not 2 <= prefix < len(d):
            raise ValueError(f"--prefix must be in [2, {len(d) - 1}] for a text of {len(d)} tokens, got {prefix}")
    engine, seqs = llm.get_engine(len(docs)), []
    try:
        for d in docs:
            seqs.append(engine.new_sequence(d[:prefix]))
        lp = engine.teacher_force(seqs, [d[prefix:] for d in docs])           # (B, n)
    finally:
        engine.release_all(seqs)
    return [-lp[b, : len(d) - prefix] for b, d in enumerate(docs)]


def nll_report(nlls: list[torch.Tensor], starts: list[int], chunk: int = 0) -> dict:
    """Overall, per-text and per-chunk NLL/perplexity. nlls[i][j] is the NLL of token starts[i] + j
    of text i. Chunks are the positions [k * chunk, (k + 1) * chunk) clipped to the scored range,
    pooled over the texts (perplexity along the context, as InfiniGen's Fig. 12)."""
    lens = [int(n.shape[0]) for n in nlls]
    host = torch.cat(nlls).double().cpu()      # sync: the one host read, after all scoring
    pos = torch.cat([torch.arange(s, s + n) for s, n in zip(starts, lens)])
    nll = host.mean().item()                   # sync: none, host is a CPU tensor
    per_text, off = [], 0
    for n in lens:
        m = host[off: off + n].mean().item()   # sync: none (CPU tensor)
        per_text.append({"scored": n, "nll": m, "ppl": math.exp(m)})
        off += n
    res = {"ppl": math.exp(nll), "nll": nll, "scored": len(host), "per_text": per_text}
    if chunk > 0:
        lo, hi = int(pos.min()), int(pos.max()) + 1
        res["chunks"] = []
        for a in range(lo - lo % chunk, hi, chunk):
            sel = (pos >= a) & (pos < a + chunk)
            if sel.any():
                m = host[sel].mean().item()   # sync: none (CPU tensor)
                res["chunks"].append({"start": max(a, lo), "end": min(a + chunk, hi), "tokens": int(sel.sum()),
                                      "nll": m, "ppl": math.exp(m)})
    return res


def perplexity(llm: LLM, ids: list[int], chunk: int = 1024) -> dict:
    """Teacher-forced perplexity of ids[1:] through chunked prefill (dense attention)."""
    res = nll_report([token_nll(llm, ids, chunk)], [1])
    del res["per_text"]
    return {**res, "tokens": len(ids)}


def perplexity_decode(llm: LLM, docs: list[list[int]], prefix: int, chunk_report: int = 0) -> dict:
    """Perplexity of every doc[prefix:] through the policy's decode path, the docs as one batch."""
    res = nll_report(token_nll_decode(llm, docs, prefix), [prefix] * len(docs), chunk_report)
    return {**res, "tokens": sum(map(len, docs)), "mode": "decode", "prefix": prefix}
