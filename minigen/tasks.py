"""The evaluation tasks behind `python -m minigen.eval`: text inputs, multiple choice scored
through the decode path, and passkey retrieval (needle in a haystack). minigen/eval.py holds the
command line and perplexity.

choice  per task the context is prefilled into one slot per choice, and the choices' tokens are
        teacher-forced through the policy's decode path as one batch; the prediction is the choice
        of highest total log-likelihood (accuracy_norm: highest per-token log-likelihood).
needle  a passkey sentence hidden at depths of an essay haystack cut to given lengths, then a
        question; greedy answer through the policy; found when the answer holds the passkey.
"""
from __future__ import annotations

import glob
import json
import random
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from minigen.kv import ContextOverflowError
from minigen.sampler import SamplingParams

if TYPE_CHECKING:
    from minigen.llm import LLM

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


def release_all(engine, seqs) -> None:
    for s in seqs:
        engine.release(s)


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
        release_all(engine, seqs)
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
            release_all(engine, seqs)
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

