"""Multiple choice by log-likelihood through the policy's decode path (`python -m minigen.eval choice`).

Per task the context is prefilled into one slot per choice, and the choices' tokens are
teacher-forced through the policy's decode path as one batch; the prediction is the choice of
highest total log-likelihood (accuracy_norm: highest per-token log-likelihood).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm import tqdm

from minigen.errors import ContextOverflowError
from minigen.eval.text import read_text

if TYPE_CHECKING:
    from minigen.llm import LLM

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
    if len(ctx) < 2:
        raise ValueError(f"the context {context!r} encodes to {len(ctx)} token(s); choices are scored through the "
                         f"policy's decode path, which needs at least 2 context tokens: give a longer context")
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
        engine.release_all(seqs)
    return totals, [len(c) for c in conts]


def run_choice(llm: LLM, tasks: list[dict], progress: bool = False) -> dict:
    """Accuracy of the highest-likelihood choice over tasks (per "length" too where tasks carry one)."""
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
