"""Passkey retrieval (needle in a haystack, `python -m minigen.eval needle`): a passkey sentence hidden
at depths of an essay haystack cut to given lengths, then a question; greedy answer through the
policy; found when the answer holds the passkey.
"""
from __future__ import annotations

import random
import re
import sys
from typing import TYPE_CHECKING

from tqdm import tqdm

from minigen.sampler import SamplingParams

if TYPE_CHECKING:
    from minigen.llm import LLM

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
            engine.release_all(seqs)
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
