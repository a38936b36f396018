"""python -m minigen.eval: score a model on text.

    python -m minigen.eval ppl --model PATH --text FILE --context 2048 --json

ppl: the first N tokens of FILE (as the model's tokenizer encodes it, BOS included where the
tokenizer adds one) are fed through the engine in prefill chunks that continue the cache; the
perplexity is exp(mean NLL) of tokens 1..N-1 given everything before them. The last stdout line
is JSON.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from minigen.cli import add_model_args, policy_opts, run_main
from minigen.llm import LLM


def perplexity(llm: LLM, ids: list[int], chunk: int = 1024) -> dict:
    """Teacher-forced NLL of ids[1:] given the prefix, through the engine's chunked prefill."""
    if len(ids) < 2:
        raise ValueError(f"need at least 2 tokens to score, the text has {len(ids)}")
    engine = llm.get_engine(1)
    seq = engine.new_sequence(ids)
    try:
        nll_sum, n, pos = torch.zeros((), dtype=torch.float64, device=engine.device), 0, 0
        target = torch.tensor(ids, device=engine.device)
        # one prefill call per chunk so the (chunk, V) logits never pile up for the whole text
        with torch.inference_mode():
            todo = list(ids)
            seq.pending = []
            while todo:
                seq.pending, todo = todo[:chunk], todo[chunk:]
                n_chunk = len(seq.pending)
                logits = engine.prefill([seq], all_logits=True)[0]            # (n_chunk, V)
                # logits at position p predict token p+1
                nxt = target[pos + 1: pos + n_chunk + 1]
                lp = torch.log_softmax(logits[: nxt.shape[0]].float(), dim=-1)
                nll_sum -= lp.gather(1, nxt[:, None]).sum().double()
                n += nxt.shape[0]
                pos += n_chunk
    finally:
        engine.release(seq)
    nll = nll_sum.item() / n          # sync: the one host read, after the last chunk
    return {"ppl": math.exp(nll), "nll": nll, "tokens": len(ids), "scored": n}


def perplexity_decode(llm: LLM, ids: list[int], prefix: int) -> dict:
    """NLL of ids[prefix:] scored through the decode path: ids[:prefix] is prefilled, every later
    token is fed one decode step at a time, so the KV policy decides what each scored token sees."""
    if not 1 <= prefix < len(ids):
        raise ValueError(f"--prefix must be in [1, {len(ids) - 1}] for {len(ids)} tokens, got {prefix}")
    engine = llm.get_engine(1)
    seq = engine.new_sequence(ids[:prefix])
    try:
        lp = engine.teacher_force(seq, ids[prefix:])
    finally:
        engine.release(seq)
    nll = -lp.double().mean().item()  # sync: once, after the whole teacher-forced run
    res = {"ppl": math.exp(nll), "nll": nll, "tokens": len(ids), "scored": len(ids) - prefix,
           "mode": "decode", "prefix": prefix}
    res.update(engine.kv.stats())
    return res


def cmd_ppl(args) -> int:
    path = Path(args.text)
    if not path.is_file():
        raise FileNotFoundError(f"--text {path}: no such file")
    if args.context < 2:
        raise ValueError(f"--context must be >= 2, got {args.context}")
    t0 = time.perf_counter()
    llm = LLM(args.model, policy=args.policy, device=args.device, dtype=args.dtype,
              max_seq_len=args.max_seq_len or args.context + 1, policy_opts=policy_opts(args), skew=args.skew)
    ids = llm.tokenizer.encode(path.read_text(encoding="utf-8", errors="replace"))
    if len(ids) < args.context:
        print(f"note: {path} has {len(ids)} tokens, fewer than --context {args.context}; scoring all",
              file=sys.stderr)
    ids = ids[: args.context]
    if args.mode == "decode":
        res = perplexity_decode(llm, ids, args.prefix if args.prefix is not None else min(256, len(ids) // 2))
    else:
        if args.policy != "dense":
            print("note: --mode prefill scores every token in prefill, where all policies attend densely; "
                  "use --mode decode to score through the policy", file=sys.stderr)
        res = perplexity(llm, ids, chunk=args.chunk)
    res.update(model=args.model or "default", policy=args.policy, context=args.context,
               device=str(llm.device), dtype=str(llm.dtype).split(".")[-1],
               seconds=round(time.perf_counter() - t0, 2))
    if not args.json:
        print(f"perplexity {res['ppl']:.3f} over {res['scored']} tokens ({res['seconds']} s)")
    print(json.dumps(res))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m minigen.eval", description="evaluate a model")
    sub = p.add_subparsers(dest="cmd", required=True)
    pp = sub.add_parser("ppl", help="perplexity of the first N tokens of a text file")
    add_model_args(pp)
    pp.add_argument("--text", required=True, help="UTF-8 text file")
    pp.add_argument("--context", type=int, default=2048, help="tokens to score (N)")
    pp.add_argument("--chunk", type=int, default=1024, help="prefill chunk size")
    pp.add_argument("--mode", choices=("prefill", "decode"), default="prefill",
                    help="prefill: score all tokens in prefill chunks (fast, dense attention); decode: prefill "
                         "--prefix tokens, then score the rest one decode step at a time through --policy")
    pp.add_argument("--prefix", type=int, default=None, help="decode mode: tokens prefilled before scoring (default min(256, N/2))")
    pp.add_argument("--json", action="store_true", help="only the JSON line")
    for name in ("choice", "needle"):
        sub.add_parser(name, help=f"{name} evaluation (not implemented in this version)")
    args = p.parse_args(argv)
    if args.cmd == "ppl":
        return cmd_ppl(args)
    raise NotImplementedError(f"`minigen.eval {args.cmd}` is not implemented in this version; "
                              f"available: ppl")


if __name__ == "__main__":
    run_main(main)
