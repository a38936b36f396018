"""python -m minigen.eval: score a model on text, on multiple-choice tasks and on passkey retrieval.

    python -m minigen.eval ppl --text data/essays --context 2048 --mode decode --policy infinigen --json
    python -m minigen.eval choice --tasks data/tasks/choice.jsonl --policy infinigen --json
    python -m minigen.eval needle --lengths 2048,4096,8192 --policy infinigen --json
    python -m minigen.eval ruler --model qwen2.5-coder-1.5b --tasks all --lengths 8192 --samples 20 --json

ppl     the first --context tokens of every --text (a file, a directory's *.txt or a glob; BOS
        included where the tokenizer adds one). prefill mode: every token is scored inside chunked
        prefill (dense attention whatever the policy), one text at a time. decode mode: the first
        --prefix tokens are prefilled, every later token is fed one decode step at a time through
        the policy, --batch texts together (Engine.teacher_force). Reports exp(mean NLL) over all
        scored tokens, per text, and per --chunk-report positions along the context.
choice  per task the context is prefilled into one slot per choice, and the choices' tokens are
        teacher-forced through the policy's decode path as one batch; the prediction is the choice
        of highest total log-likelihood (accuracy_norm: highest per-token log-likelihood).
needle  a passkey sentence hidden at --depths of an essay haystack cut to --lengths tokens, then a
        question; greedy answer through the policy; found when the answer holds the passkey.
ruler   RULER's 13 tasks at --lengths tokens (minigen/eval/ruler.py), greedy through the policy,
        --batch prompts together; scores 0-100 per task and length, and their mean per length.
The last stdout line is JSON.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from minigen.cli import add_model_args, policy_opts
from minigen.device import resolve_device
from minigen.errors import ContextOverflowError
from minigen.eval.choice import TASK_FORMAT, load_tasks, run_choice
from minigen.eval.needle import run_needle
from minigen.eval.ppl import nll_report, token_nll, token_nll_decode
from minigen.eval.ruler import ruler, run_ruler
from minigen.eval.text import clean_essay, read_text, text_files
from minigen.llm import LLM

ROOT = Path(__file__).resolve().parents[2]


def make_llm(args, max_seq_len: int | None, sized_by: str | None = None) -> LLM:
    """The LLM for an evaluation; sized_by names the flag that set max_seq_len when --max-seq-len
    was not given, so an error about the length names what the user typed."""
    opts = policy_opts(args)
    try:
        # on the CPU the scores do not depend on --batch (on a GPU cuBLAS's kernel choice makes them
        # vary in the last bits, which a 4-bit quantizer or a near-tie in greedy decoding can amplify)
        return LLM(args.model, policy=args.policy, device=args.device, dtype=args.dtype,
                   max_seq_len=max_seq_len, policy_opts=opts, skew=args.skew, gpu_memory=args.gpu_memory,
                   max_batch=getattr(args, "batch", None) or 1, batch_invariant=resolve_device(args.device).type == "cpu")
    except ContextOverflowError as e:
        said = f"--max-seq-len {max_seq_len}"       # LLM's words: "--max-seq-len N exceeds the model's context ..."
        if args.max_seq_len is None and sized_by and str(e).startswith(said):
            raise ContextOverflowError(f"{sized_by} needs {max_seq_len} tokens, which{str(e)[len(said):]}") from None
        raise


def meta(args, llm: LLM, t0: float) -> dict:
    # the policy's settings as given (a non-finite alpha as a string: JSON has no inf)
    opts = {k: (str(v) if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in llm.policy_opts.items() if k != "skew"}
    return dict(model=args.model or "default", policy=llm.policy, policy_opts=opts, gpu_memory=llm.gpu_memory, device=str(llm.device),
                batch_invariant=llm.batch_invariant,
                dtype=str(llm.dtype).split(".")[-1], seconds=round(time.perf_counter() - t0, 2))


def ppl_mode(args) -> str:
    """--mode, checked: decode by default for a non-dense policy (prefill attends densely, so it
    cannot score a policy), and the flags of the other mode refused rather than ignored."""
    mode = args.mode or ("prefill" if args.policy == "dense" else "decode")
    if mode == "prefill" and args.policy != "dense":
        raise ValueError(f"--mode prefill scores every token in prefill, where every policy attends densely: "
                         f"use --mode decode (the default) to score --policy {args.policy}")
    wrong = [f for f, v, m in (("--prefix", args.prefix, "decode"), ("--batch", args.batch, "decode"),
                               ("--chunk", args.chunk, "prefill")) if v is not None and m != mode]
    if wrong:
        raise ValueError(f"{', '.join(wrong)} {'does' if len(wrong) == 1 else 'do'} not apply to --mode {mode}")
    return mode


def cmd_ppl(args) -> int:
    if args.context < 3:
        raise ValueError(f"--context must be >= 3, got {args.context}")
    decode = ppl_mode(args) == "decode"
    prefix = args.context // 2 if args.prefix is None else args.prefix
    if decode and not 2 <= prefix < args.context:
        raise ValueError(f"--prefix must be in [2, --context - 1 = {args.context - 1}], got {prefix}")
    batch, chunk = args.batch or 8, args.chunk or 1024
    if batch < 1 or chunk < 1 or args.chunk_report < 0:
        raise ValueError("--batch and --chunk must be >= 1, --chunk-report >= 0")
    files = text_files(args.text)
    t0 = time.perf_counter()
    llm = make_llm(args, args.max_seq_len or args.context + 1, f"--context {args.context}")
    docs, kept = [], []
    need = prefix + 1 if decode else 2
    for f in files:
        ids = llm.tokenizer.encode(read_text(f))
        if len(ids) < need:
            print(f"note: skipping {f}: {len(ids)} tokens, fewer than {need}"
                  + (f" (--prefix {prefix} plus one)" if decode else ""), file=sys.stderr)
            continue
        if len(ids) < args.context:
            print(f"note: {f} has {len(ids)} tokens, fewer than --context {args.context}; scoring all",
                  file=sys.stderr)
        docs.append(ids[: args.context])
        kept.append(f)
    if not docs:
        raise ValueError(f"no --text has the {need} tokens needed" + (": lower --prefix" if decode else ""))
    files = kept
    if decode:
        nlls = []
        for i in range(0, len(docs), batch):
            nlls += token_nll_decode(llm, docs[i: i + batch], prefix)
        res = nll_report(nlls, [prefix] * len(docs), args.chunk_report)
        res.update(mode="decode", prefix=prefix)
    else:
        res = nll_report([token_nll(llm, d, chunk) for d in docs], [1] * len(docs), args.chunk_report)
        res["mode"] = "prefill"
    for f, d, pt in zip(files, docs, res["per_text"]):
        pt.update(file=str(f), tokens=len(d))
    res.update(tokens=sum(map(len, docs)), texts=len(docs), context=args.context)
    if decode:
        res.update(llm.engine.kv.stats())
    res.update(meta(args, llm, t0))
    if not args.json:
        for pt in res["per_text"]:
            print(f"{pt['ppl']:10.3f}  {pt['file']} ({pt['scored']} tokens)")
        for c in res.get("chunks", []):
            print(f"  positions {c['start']:6d}-{c['end']:6d}: perplexity {c['ppl']:.3f}")
        print(f"perplexity {res['ppl']:.3f} over {res['scored']} tokens of {len(docs)} text(s) ({res['seconds']} s)")
    print(json.dumps(res))
    return 0


def cmd_choice(args) -> int:
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be >= 1, got {args.limit}")
    tasks = load_tasks(args.tasks, args.limit)
    t0 = time.perf_counter()
    llm = make_llm(args, args.max_seq_len)
    res = {**run_choice(llm, tasks, progress=not args.quiet), "tasks": args.tasks, **meta(args, llm, t0)}
    if not args.json:
        for k, v in res.get("by_length", {}).items():
            print(f"  length {k}: accuracy {v['accuracy']:.3f} ({v['n']} tasks)")
        print(f"accuracy {res['accuracy']:.3f} over {res['n']} tasks (chance {res['chance']:.3f}; "
              f"{res['seconds']} s)")
    print(json.dumps(res))
    return 0


def parse_list(s: str, typ, flag: str) -> list:
    try:
        out = [typ(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{flag} takes a comma-separated list of numbers, got '{s}'") from None
    if not out:
        raise ValueError(f"{flag} is empty")
    return out


def cmd_ruler(args) -> int:
    lengths = parse_list(args.lengths, int, "--lengths")
    names = list(ruler()) if args.tasks == "all" else [t.strip() for t in args.tasks.split(",") if t.strip()]
    if args.samples < 1 or args.batch < 1:
        raise ValueError("--samples and --batch must be >= 1")
    t0 = time.perf_counter()
    llm = make_llm(args, args.max_seq_len or max(lengths), f"--lengths {max(lengths)}")
    if max(lengths) > llm.max_seq_len:
        raise ValueError(f"--lengths {max(lengths)} exceeds the slot of {llm.max_seq_len} tokens: raise --max-seq-len")
    res = run_ruler(llm, names, lengths, args.samples, batch=args.batch, seed=args.seed, progress=not args.quiet)
    res.update(meta(args, llm, t0))
    if not args.json:
        for task, by_len in res["tasks"].items():
            print(f"{task:18s} " + " ".join(f"{L}: {v['score']:6.2f}" for L, v in by_len.items()))
        print("mean               " + " ".join(f"{L}: {v:6.2f}" for L, v in res["mean"].items()))
    print(json.dumps(res))
    return 0


def cmd_needle(args) -> int:
    lengths = parse_list(args.lengths, int, "--lengths")
    depths = parse_list(args.depths, float, "--depths")
    if any(not 0.0 <= d <= 1.0 for d in depths):
        raise ValueError(f"--depths must lie in [0, 1], got {args.depths}")
    if args.batch < 1 or args.max_new_tokens < 1:
        raise ValueError("--batch and --max-new-tokens must be >= 1")
    files = text_files([args.haystack], "--haystack")
    t0 = time.perf_counter()
    llm = make_llm(args, args.max_seq_len)
    cap = llm.max_seq_len - args.max_new_tokens - 1
    for L in lengths:
        if L > cap:
            print(f"note: --lengths {L} lowered to {cap}: a slot holds {llm.max_seq_len} tokens "
                  f"(prompt plus {args.max_new_tokens} answer tokens)", file=sys.stderr)
    lengths = list(dict.fromkeys(min(L, cap) for L in lengths))
    hay_ids = llm.tokenizer.encode(" ".join(clean_essay(read_text(f)) for f in files), add_special_tokens=False)
    res = run_needle(llm, hay_ids, lengths, depths, seed=args.seed, batch=args.batch,
                     max_new_tokens=args.max_new_tokens, chat=not args.raw, progress=not args.quiet)
    res.update(meta(args, llm, t0))
    if not args.json:
        print("length \\ depth " + " ".join(f"{d:5.2f}" for d in depths))
        for L, row in zip(lengths, res["grid"]):
            print(f"{L:14d} " + " ".join("   ok" if x else "   --" for x in row))
        print(f"passkey retrieval {res['accuracy']:.3f} over {res['n']} prompts ({res['seconds']} s)")
    print(json.dumps(res))
    return 0


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m minigen.eval", description="evaluate a model")
    sub = p.add_subparsers(dest="cmd", required=True)

    pp = sub.add_parser("ppl", help="perplexity of the first N tokens of text files")
    pp.add_argument("--text", action="append", required=True,
                    help="UTF-8 text file, directory (its *.txt) or glob; repeatable")
    pp.add_argument("--context", type=int, default=2048, help="tokens of each text (N)")
    pp.add_argument("--mode", choices=("prefill", "decode"), default=None,
                    help="prefill: score all tokens in prefill chunks (fast, dense attention; dense's default); "
                         "decode: the first --prefix tokens are context, every later token is scored one decode "
                         "step at a time through --policy (the default for every other policy)")
    pp.add_argument("--prefix", type=int, default=None, help="decode mode: tokens of context before scoring (default N/2)")
    pp.add_argument("--batch", type=int, default=None, help="decode mode: texts scored together (default 8)")
    pp.add_argument("--chunk", type=int, default=None, help="prefill mode: prefill chunk size (default 1024)")
    pp.add_argument("--chunk-report", type=int, default=512,
                    help="report perplexity per this many positions along the context (0: off)")

    pc = sub.add_parser("choice", help="multiple choice by log-likelihood through the policy's decode path")
    pc.add_argument("--tasks", required=True, help=f"JSONL, one task per line: {TASK_FORMAT}")
    pc.add_argument("--limit", type=int, default=None, help="score only the first N tasks")

    pn = sub.add_parser("needle", help="passkey retrieval from an essay haystack, greedy through the policy")
    pn.add_argument("--haystack", default=str(ROOT / "data" / "essays"), help="directory, file or glob of texts")
    pn.add_argument("--lengths", default="2048,4096,8192", help="prompt lengths in tokens (capped by the slot)")
    pn.add_argument("--depths", default="0,0.25,0.5,0.75,1.0", help="needle positions, fractions of the haystack")
    pn.add_argument("--seed", type=int, default=0, help="seeds the passkeys")
    pn.add_argument("--batch", type=int, default=8, help="prompts generated together")
    pn.add_argument("--max-new-tokens", type=int, default=16)
    pn.add_argument("--raw", action="store_true", help="plain text prompt even if the model has a chat template")

    pr = sub.add_parser("ruler", help="RULER's 13 long-context tasks, greedy through the policy")
    pr.add_argument("--tasks", default="all", help="comma-separated task names (default: all 13)")
    pr.add_argument("--lengths", default="4096", help="prompt plus answer lengths in tokens")
    pr.add_argument("--samples", type=int, default=20, help="samples per task and length")
    pr.add_argument("--batch", type=int, default=8, help="prompts generated together")
    pr.add_argument("--seed", type=int, default=0, help="sample i of every task uses seed + i")

    for sp in (pp, pc, pn, pr):
        add_model_args(sp)
        sp.add_argument("--json", action="store_true", help="only the JSON line on stdout")
        sp.add_argument("--quiet", action="store_true", help="no progress bar on stderr")
    args = p.parse_args(argv)
    return {"ppl": cmd_ppl, "choice": cmd_choice, "needle": cmd_needle, "ruler": cmd_ruler}[args.cmd](args)
