"""Build a few-shot long-context multiple-choice set from the fetched essays (make data).

    python bench/make_tasks.py                     # -> data/tasks/choice.jsonl
    python bench/make_tasks.py --lengths 1024 --per-length 20 --out /tmp/choice.jsonl
    python -m minigen.eval choice --tasks data/tasks/choice.jsonl --policy infinigen --json

Each task ("what comes next"): a passage of whole essays cut at a sentence end so that the context
is about `length` tokens (the model's tokenizer counts them), two solved examples of the question,
then the question. Every question quotes a sentence of the passage; the answer is the sentence that
followed it there. The asked sentence lies at a depth of 25-75% of the passage, the examples' near
its start and its end, so a policy that forgets the middle of the context cannot copy the answer.
The three distractors are sentences of about the same token length from the answer's own essay,
taken out of the passage ("removed"; essays outside the passage fill up when it has too few): same
topic and style, so only the memory of the passage tells the answer, and never seen in the context.
Choices start with a space (the context ends with "Next sentence:"); the line records "length"
(target), "tokens" (context) and "depth" (of the asked sentence in the passage).

Deterministic: the essays are read in sorted order and every draw comes from --seed.
"""
from __future__ import annotations

import argparse
import json
import random
import re
import sys
from pathlib import Path

from minigen.eval.text import clean_essay, text_files

ROOT = Path(__file__).resolve().parents[1]

INSTRUCTIONS = ("Read the text below. After it come questions: each quotes a sentence of the text, and the "
                "answer is the sentence that comes right after it in the text.\n\n")
QUESTION = 'Quote: "{quote}"\nNext sentence:'
SENT_SPLIT = re.compile(r"(?<=[.?!])\s+(?=[A-Z\"'(])")


def sentences(text: str) -> list[str]:
    return [s.strip() for s in SENT_SPLIT.split(text) if s.strip()]


def usable(s: str) -> bool:
    """A sentence that reads as one: 6-40 words, ends with . ? or !, no quote marks to confuse the
    question's quoting."""
    n = len(s.split())
    return 6 <= n <= 40 and s[-1] in ".?!" and '"' not in s


class Essay:
    def __init__(self, path: Path, tok):
        self.name = path.stem
        self.sents = sentences(clean_essay(path.read_text(encoding="utf-8", errors="replace")))
        self.ntok = [len(tok.encode(" " + s, add_special_tokens=False)) for s in self.sents]


def question_block(quote: str, answer: str | None = None) -> str:
    q = QUESTION.format(quote=quote)
    return q if answer is None else f"{q} {answer}"


def pick_pair(sents: list[str], owner: list[int], lo: int, hi: int, rng: random.Random,
              taken: set[int]) -> int | None:
    """An index k in [lo, hi) with sentences k and k+1 usable and of one essay, sentence k unique in
    the passage, neither next to a pair already taken."""
    ks = [k for k in range(max(lo, 0), min(hi, len(sents) - 1))
          if not taken & {k - 1, k, k + 1} and owner[k] == owner[k + 1]
          and usable(sents[k]) and usable(sents[k + 1]) and sents.count(sents[k]) == 1]
    return rng.choice(ks) if ks else None


def distractors(pool: list[tuple[str, int]], answer: str, n_tok: int, passage: set[str],
                rng: random.Random, k: int = 3) -> list[str] | None:
    """k distinct sentences from outside the passage whose token counts are closest to the answer's."""
    unique = dict(pool)                                      # a sentence two essays share counts once
    cands = [(abs(n - n_tok), rng.random(), s) for s, n in unique.items() if s != answer and s not in passage]
    cands.sort()
    near = [s for d, _, s in cands[: max(4 * k, 12)]]      # the closest few, drawn from at random
    return rng.sample(near, k) if len(near) >= k else None


def make_task(essays: list[Essay], order: list[int], length: int, tok, rng: random.Random) -> dict | None:
    """One task from the essays in `order` (the passage takes them from the front) whose context
    plus longest choice is at most `length` - 8 tokens, and not far below: the passage budget
    shrinks by the overshoot until it fits (the same draws each try, so the result is seeded)."""
    budget = length - 8 - 3 * 60 - len(tok.encode(INSTRUCTIONS))   # 60: a question block, roughly
    for _ in range(6):
        state = rng.getstate()
        t = _make_task(essays, order, length, budget, tok, rng)
        if t is None:
            return None
        over = t["tokens"] + max(len(tok.encode(c, add_special_tokens=False)) for c in t["choices"]) - (length - 8)
        if over <= 0:
            return t
        rng.setstate(state)
        budget -= over
    return None


def _make_task(essays: list[Essay], order: list[int], length: int, budget: int, tok,
               rng: random.Random) -> dict | None:
    sents, ntok, owner, used, total = [], [], [], [], 0    # owner: the essay of each passage sentence
    for i in order:
        used.append(i)
        full = False
        for s, n in zip(essays[i].sents, essays[i].ntok):
            if total + n > budget:   # the passage is full: it ends inside this essay
                full = True
                break
            sents.append(s)
            ntok.append(n)
            owner.append(i)
            total += n
        if full:
            break
    n = len(sents)
    if n < 12:
        return None
    k = pick_pair(sents, owner, int(0.25 * n), int(0.75 * n), rng, set())
    shots = []
    for lo, hi in ((int(0.02 * n), int(0.2 * n)), (int(0.8 * n), n - 1)):
        j = pick_pair(sents, owner, lo, hi, rng, {k} if k is not None else set())
        if j is not None:
            shots.append(j)
    if k is None or len(shots) < 2:
        return None
    answer = sents[k + 1]
    # distractors: sentences of the answer's own essay (its topic, so no prior gives the answer away),
    # closest in token count, taken OUT of the passage; essays outside the passage fill up
    near = {k - 2, k - 1, k, k + 1, k + 2, k + 3} | {j + d for j in shots for d in (-1, 0, 1, 2)}
    same = [j for j in range(n) if owner[j] == owner[k] and j not in near and usable(sents[j])
            and sents.count(sents[j]) == 1 and sents[j] != answer]
    same.sort(key=lambda j: (abs(ntok[j] - ntok[k + 1]), j))
    removed = sorted(rng.sample(same[:6], min(3, len(same[:6]))))
    wrong = [sents[j] for j in removed]
    if len(wrong) < 3:
        pool = [(s, c) for i, e in enumerate(essays) if i not in used for s, c in zip(e.sents, e.ntok) if usable(s)]
        more = distractors(pool, answer, ntok[k + 1], set(sents), rng, k=3 - len(wrong))
        if more is None:
            return None
        wrong += more
    choices = [answer] + wrong
    rng.shuffle(choices)
    keep = [j for j in range(n) if j not in removed]
    body = "".join(("\n\n" if a and owner[j] != owner[keep[a - 1]] else " " if a else "") + sents[j]
                   for a, j in enumerate(keep))
    context = (INSTRUCTIONS + body + "\n\n"
               + "\n\n".join(question_block(sents[j], sents[j + 1]) for j in shots) + "\n\n"
               + question_block(sents[k]))
    return {"context": context, "choices": [" " + c for c in choices], "label": choices.index(answer),
            "length": length, "tokens": len(tok.encode(context)), "depth": round(keep.index(k) / len(keep), 3),
            "removed": len(removed), "essays": [essays[i].name for i in used]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--essays", default=str(ROOT / "data" / "essays"), help="directory, file or glob of essays")
    p.add_argument("--out", default=str(ROOT / "data" / "tasks" / "choice.jsonl"))
    p.add_argument("--lengths", default="2048,4096,8192", help="target context lengths in tokens")
    p.add_argument("--per-length", type=int, default=50, help="tasks per length")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default=None, help="model whose tokenizer counts tokens (default: embedded SmolLM2)")
    args = p.parse_args(argv)
    try:
        lengths = [int(x) for x in args.lengths.split(",") if x.strip()]
        files = text_files([args.essays], "--essays")
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not lengths or min(lengths) < 512 or args.per_length < 1:
        print("error: --lengths must be >= 512 tokens each and --per-length >= 1", file=sys.stderr)
        return 2
    from minigen.load import load_checkpoint
    tok = load_checkpoint(args.model).tokenizer
    essays = [Essay(f, tok) for f in files]
    if len(essays) < 4:
        print(f"error: {len(essays)} essays in {args.essays}; need several (make data)", file=sys.stderr)
        return 2
    rng = random.Random(args.seed)
    tasks = []
    for L in lengths:
        made, tries = 0, 0
        while made < args.per_length and tries < 20 * args.per_length:
            tries += 1
            order = list(range(len(essays)))
            rng.shuffle(order)
            t = make_task(essays, order, L, tok, rng)
            if t is not None:
                tasks.append(t)
                made += 1
        if made < args.per_length:
            print(f"note: only {made} tasks of length {L}", file=sys.stderr)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(t) + "\n" for t in tasks), encoding="utf-8")
    print(f"{len(tasks)} tasks in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
