"""python -m minigen.eval: score a model on text, on multiple-choice tasks and on passkey retrieval.

    python -m minigen.eval ppl --text data/essays --context 2048 --mode decode --policy infinigen --json
    python -m minigen.eval choice --tasks data/tasks/choice.jsonl --policy infinigen --json
    python -m minigen.eval needle --lengths 2048,4096,8192 --policy infinigen --json

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
The last stdout line is JSON.
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import random
import re
import sys
import time
from pathlib import Path

import torch

from minigen.cli import add_model_args, policy_opts, run_main
from minigen.kv import ContextOverflowError
from minigen.llm import LLM
from minigen.sampler import SamplingParams

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------
def text_files(specs: list[str], flag: str = "--text") -> list[Path]:
    """The files named by specs: each a file, a directory (its *.txt, sorted) or a glob pattern."""
    out: list[Path] = []
    for spec in specs:
        p = Path(spec)
        if p.is_file():
            out.append(p)
        elif p.is_dir():
            got = sorted(p.glob("*.txt"))
            if not got:
                raise FileNotFoundError(f"{flag} {spec}: the directory has no *.txt files")
            out += got
        elif any(c in spec for c in "*?["):
            got = sorted(Path(f) for f in glob.glob(spec) if Path(f).is_file())
            if not got:
                raise FileNotFoundError(f"{flag} {spec}: no file matches the pattern")
            out += got
        else:
            hint = "; `make data` fetches data/essays and data/shakespeare" if "data" in p.parts else ""
            raise FileNotFoundError(f"{flag} {spec}: no such file or directory{hint}")
    return list(dict.fromkeys(out))


def read_text(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


MONTHS = "January|February|March|April|May|June|July|August|September|October|November|December"


def clean_essay(text: str) -> str:
    """One essay as one paragraph. The archive lost its paragraph breaks ("once.Like chess"): a
    space goes back after a sentence end glued to a capital, line wraps become spaces, and the
    banner and date line ("May 2004When ...") go."""
    text = re.sub(r"^\s*Want to start a startup\?\s*Get funded by\s*Y Combinator\.", "", text)
    text = re.sub(rf"^\s*(?:{MONTHS}) \d{{4}}(?:,? *\(?rev\. (?:{MONTHS}) \d{{4}}\)?)?", "", text)
    text = re.sub(r"([.?!][)\"]?)(?=[A-Z])", r"\1 ", text)
    return re.sub(r"\s+", " ", text).strip()


def make_llm(args, max_seq_len: int | None) -> LLM:
    opts = policy_opts(args)
    return LLM(args.model, policy=args.policy, device=args.device, dtype=args.dtype,
               max_seq_len=max_seq_len, policy_opts=opts, skew=args.skew)


def meta(args, llm: LLM, t0: float) -> dict:
    return dict(model=args.model or "default", policy=args.policy, device=str(llm.device),
                dtype=str(llm.dtype).split(".")[-1], seconds=round(time.perf_counter() - t0, 2))


def _release(engine, seqs) -> None:
    for s in seqs:
        engine.release(s)


# ---------------------------------------------------------------------------------------------
# ppl: per-token NLL (prefill or decode path), then one report
# ---------------------------------------------------------------------------------------------
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
        if not 1 <= prefix < len(d):
            raise ValueError(f"--prefix must be in [1, {len(d) - 1}] for a text of {len(d)} tokens, got {prefix}")
    engine, seqs = llm.get_engine(len(docs)), []
    try:
        for d in docs:
            seqs.append(engine.new_sequence(d[:prefix]))
        lp = engine.teacher_force(seqs, [d[prefix:] for d in docs])           # (B, n)
    finally:
        _release(engine, seqs)
    return [-lp[b, : len(d) - prefix] for b, d in enumerate(docs)]


def nll_report(nlls: list[torch.Tensor], starts: list[int], chunk: int = 0) -> dict:
    """Overall, per-text and per-chunk NLL/perplexity. nlls[i][j] is the NLL of token starts[i] + j
    of text i. Chunks are the positions [k * chunk, (k + 1) * chunk) clipped to the scored range,
    pooled over the texts (perplexity along the context, as InfiniGen's Fig. 12)."""
    lens = [int(n.shape[0]) for n in nlls]
    host = torch.cat(nlls).double().cpu()      # sync: the one host read, after all scoring
    pos = torch.cat([torch.arange(s, s + n) for s, n in zip(starts, lens)])
    nll = host.mean().item()
    per_text, off = [], 0
    for n in lens:
        m = host[off: off + n].mean().item()
        per_text.append({"scored": n, "nll": m, "ppl": math.exp(m)})
        off += n
    res = {"ppl": math.exp(nll), "nll": nll, "scored": len(host), "per_text": per_text}
    if chunk > 0:
        lo, hi = int(pos.min()), int(pos.max()) + 1
        res["chunks"] = []
        for a in range(lo - lo % chunk, hi, chunk):
            sel = (pos >= a) & (pos < a + chunk)
            if sel.any():
                m = host[sel].mean().item()
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


def cmd_ppl(args) -> int:
    files = text_files(args.text)
    if args.context < 2:
        raise ValueError(f"--context must be >= 2, got {args.context}")
    decode = args.mode == "decode"
    prefix = args.context // 2 if args.prefix is None else args.prefix
    if decode and not 1 <= prefix < args.context:
        raise ValueError(f"--prefix must be in [1, --context - 1 = {args.context - 1}], got {prefix}")
    if args.batch < 1 or args.chunk < 1 or args.chunk_report < 0:
        raise ValueError("--batch and --chunk must be >= 1, --chunk-report >= 0")
    t0 = time.perf_counter()
    llm = make_llm(args, args.max_seq_len or args.context + 1)
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
        for i in range(0, len(docs), args.batch):
            nlls += token_nll_decode(llm, docs[i: i + args.batch], prefix)
        res = nll_report(nlls, [prefix] * len(docs), args.chunk_report)
        res.update(mode="decode", prefix=prefix)
    else:
        if args.policy != "dense":
            print("note: --mode prefill scores every token in prefill, where all policies attend densely; "
                  "use --mode decode to score through the policy", file=sys.stderr)
        res = nll_report([token_nll(llm, d, args.chunk) for d in docs], [1] * len(docs), args.chunk_report)
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


# ---------------------------------------------------------------------------------------------
# choice: log-likelihood of each choice through the decode path
# ---------------------------------------------------------------------------------------------
TASK_FORMAT = '{"context": str, "choices": [str, str, ...], "label": int index into choices}'


def _task_error(t) -> str | None:
    """What is wrong with one parsed task line, or None."""
    if not isinstance(t, dict):
        return "not an object"
    if not isinstance(t.get("context"), str):
        return '"context" is not a string'
    ch = t.get("choices")
    if not (isinstance(ch, list) and len(ch) >= 2 and all(isinstance(c, str) and c for c in ch)):
        return '"choices" is not a list of 2 or more non-empty strings'
    if not (type(t.get("label")) is int and 0 <= t["label"] < len(ch)):
        return '"label" is not an index into "choices"'
    return None


def load_tasks(path: str, limit: int | None = None) -> list[dict]:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--tasks {p}: no such file (`make data` writes data/tasks/choice.jsonl)")
    tasks = []
    for i, line in enumerate(read_text(p).splitlines(), 1):
        if not line.strip():
            continue
        try:
            t = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{p}:{i}: not JSON ({e.msg}); each line must be {TASK_FORMAT}") from None
        bad = _task_error(t)
        if bad:
            raise ValueError(f"{p}:{i}: {bad}; each line must be {TASK_FORMAT}")
        tasks.append(t)
        if limit and len(tasks) >= limit:
            break
    if not tasks:
        raise ValueError(f"--tasks {p}: the file holds no tasks; each line must be {TASK_FORMAT}")
    return tasks


def continuation_ids(tok, context: str, ctx_ids: list[int], choice: str) -> list[int]:
    """The choice's tokens as they continue the context: the whole text is encoded and the tokens
    past the context's own encoding are kept (lm-eval's split); if a merge crosses the boundary,
    the choice alone."""
    whole = tok.encode(context + choice)
    if whole[: len(ctx_ids)] == ctx_ids and len(whole) > len(ctx_ids):
        return whole[len(ctx_ids):]
    return tok.encode(choice, add_special_tokens=False)


def score_choices(llm: LLM, context: str, choices: list[str]) -> tuple[list[float], list[int]]:
    """Total log-likelihood of every choice after the context, and its token count. The context is
    prefilled once per choice (one slot each) and all choices are teacher-forced as one batch
    through the policy's decode path."""
    tok = llm.tokenizer
    ctx = tok.encode(context)
    conts = [continuation_ids(tok, context, ctx, c) for c in choices]
    engine = llm.get_engine(len(choices))
    need = len(ctx) + max(map(len, conts))
    if need > engine.capacity:
        raise ContextOverflowError(f"a task needs {need} tokens (context plus its longest choice) but a slot holds "
                                   f"{engine.capacity}: raise --max-seq-len (up to the model's context) or "
                                   f"drop the longer tasks")
    seqs = []
    try:
        for _ in choices:
            seqs.append(engine.new_sequence(ctx))
        totals = engine.teacher_force(seqs, conts).sum(1).tolist()   # sync: once per task
    finally:
        _release(engine, seqs)
    return totals, [len(c) for c in conts]


def run_choice(llm: LLM, tasks: list[dict], progress: bool = False) -> dict:
    """Accuracy of the highest-likelihood choice over tasks (per "length" too where tasks carry one)."""
    from tqdm import tqdm
    llm.get_engine(max(len(t["choices"]) for t in tasks))     # one engine for the widest task
    hits, hits_norm, by_len = [], [], {}
    for t in tqdm(tasks, desc="choice", unit="task", file=sys.stderr, mininterval=2.0, disable=not progress):
        ll, n = score_choices(llm, t["context"], t["choices"])
        hit = max(range(len(ll)), key=ll.__getitem__) == t["label"]
        hits.append(hit)
        hits_norm.append(max(range(len(ll)), key=lambda i: ll[i] / n[i]) == t["label"])
        if "length" in t:
            by_len.setdefault(t["length"], []).append(hit)
    res = {"accuracy": sum(hits) / len(hits), "accuracy_norm": sum(hits_norm) / len(hits), "n": len(hits),
           "chance": sum(1 / len(t["choices"]) for t in tasks) / len(tasks)}
    if by_len:
        res["by_length"] = {str(k): {"accuracy": sum(v) / len(v), "n": len(v)}
                            for k, v in sorted(by_len.items(), key=lambda kv: str(kv[0]).zfill(12))}
    res.update(llm.engine.kv.stats())
    return res


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


# ---------------------------------------------------------------------------------------------
# needle: a passkey hidden in essays, retrieved with greedy decoding through the policy
# ---------------------------------------------------------------------------------------------
# The phrasing that the 135M default model answers with dense attention (see the tests): the
# intro says what to look for, the needle repeats the key, the answer is started for the model.
INTRO = "There is a pass key hidden in the text below. Find it and remember it.\n\n"
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? Answer with the number only."
ANSWER_PREFIX = "The pass key is"


def passkey_found(answer: str, key: int | str) -> bool:
    """Whether the answer holds the key as a whole number (digit groups "71,432" joined)."""
    joined = re.sub(r"(?<=\d)[ ,](?=\d)", "", answer)
    return re.search(rf"(?<!\d){key}(?!\d)", joined) is not None


def needle_prompt(tok, hay_ids: list[int], length: int, depth: float, key: int, chat: bool) -> list[int]:
    """About `length` prompt tokens: the haystack cut at a sentence end to fit, the needle sentence
    inserted at the sentence boundary at or before depth * its length, then the question."""
    def build(body: str) -> list[int]:
        if chat:
            ids = tok.encode_chat([{"role": "user", "content": INTRO + body + "\n\n" + QUESTION}])
            return ids + tok.encode(ANSWER_PREFIX, add_special_tokens=False)
        return tok.encode(INTRO + body + "\n\n" + QUESTION + "\n" + ANSWER_PREFIX)
    needle = NEEDLE.format(key=key)
    room = length - len(build(needle)) - 8          # a little slack for re-encoding at the joins
    if room < 32:
        raise ValueError(f"--lengths {length} leaves no room for a haystack around the needle and "
                         f"question ({length - room} tokens): use longer lengths")
    text = tok.decode(hay_ids[:room])
    end = text.rfind(". ")
    text = text[: end + 1] if end > 0 else text     # the haystack ends at a sentence end
    at = int(depth * len(text))
    if 0 < at < len(text):
        j = text.rfind(". ", 0, at)
        at = j + 1 if j >= 0 else 0
    body = (text[:at] + " " + needle + " " + text[at:]).strip()
    return build(body)


def parse_list(s: str, typ, flag: str) -> list:
    try:
        out = [typ(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{flag} takes a comma-separated list of numbers, got '{s}'") from None
    if not out:
        raise ValueError(f"{flag} is empty")
    return out


def run_needle(llm: LLM, hay_ids: list[int], lengths: list[int], depths: list[float], *, seed: int = 0,
               batch: int = 8, max_new_tokens: int = 16, chat: bool = True, progress: bool = False) -> dict:
    """Passkey retrieval for every (length, depth): a seeded 5-7 digit key per cell, greedy answers
    through the policy, `batch` prompts generated together."""
    from tqdm import tqdm
    tok = llm.tokenizer
    chat = chat and tok.has_chat_template
    rng = random.Random(seed)
    cells = []
    for L in lengths:
        for d in depths:
            digits = rng.choice((5, 6, 7))
            cells.append({"length": L, "depth": d, "key": rng.randint(10 ** (digits - 1), 10 ** digits - 1)})
    engine = llm.get_engine(min(batch, len(cells)))
    sp = SamplingParams(max_new_tokens=max_new_tokens, temperature=0, stop=["\n"])
    bar = tqdm(total=len(cells), desc="needle", unit="prompt", file=sys.stderr, disable=not progress)
    for i in range(0, len(cells), batch):
        part, seqs = cells[i: i + batch], []
        try:
            for c in part:
                ids = needle_prompt(tok, hay_ids, c["length"], c["depth"], c["key"], chat)
                c["tokens"] = len(ids)
                seqs.append(engine.new_sequence(ids))
            for _ in engine.generate(seqs, sp):
                pass
        finally:
            _release(engine, seqs)
        for c, s in zip(part, seqs):
            c["answer"] = s.text.strip()
            c["found"] = passkey_found(s.text, c["key"])
        bar.update(len(part))
    bar.close()
    grid = [[int(c["found"]) for c in cells if c["length"] == L] for L in lengths]   # (lengths, depths)
    res = {"accuracy": sum(c["found"] for c in cells) / len(cells), "n": len(cells),
           "lengths": lengths, "depths": depths, "grid": grid,
           "by_length": {str(L): sum(row) / len(row) for L, row in zip(lengths, grid)},
           "chat": chat, "seed": seed, "cells": cells}
    res.update(engine.kv.stats())
    return res


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
    pp.add_argument("--mode", choices=("prefill", "decode"), default="prefill",
                    help="prefill: score all tokens in prefill chunks (fast, dense attention); decode: prefill "
                         "--prefix tokens, then score the rest one decode step at a time through --policy")
    pp.add_argument("--prefix", type=int, default=None, help="decode mode: tokens prefilled before scoring (default N/2)")
    pp.add_argument("--batch", type=int, default=8, help="decode mode: texts scored together")
    pp.add_argument("--chunk", type=int, default=1024, help="prefill mode: prefill chunk size")
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

    for sp in (pp, pc, pn):
        add_model_args(sp)
        sp.add_argument("--json", action="store_true", help="only the JSON line on stdout")
        sp.add_argument("--quiet", action="store_true", help="no progress bar on stderr")
    args = p.parse_args(argv)
    return {"ppl": cmd_ppl, "choice": cmd_choice, "needle": cmd_needle}[args.cmd](args)


if __name__ == "__main__":
    run_main(main)
