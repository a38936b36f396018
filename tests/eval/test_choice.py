"""Multiple choice by log-likelihood through the decode path (minigen/eval/choice.py)."""
import json

import pytest
import torch

from minigen.eval.choice import continuation_ids, load_tasks, run_choice, score_choices
from tests.helpers import COPY_TASK


def test_score_choices_equals_direct_computation(llm):
    tok = llm.tokenizer
    ll, n = score_choices(llm, COPY_TASK["context"], COPY_TASK["choices"])
    ctx = tok.encode(COPY_TASK["context"])
    eng = llm.get_engine(1)
    for total, k, c in zip(ll, n, COPY_TASK["choices"]):
        cont = continuation_ids(tok, COPY_TASK["context"], ctx, c)
        assert k == len(cont) >= 1
        seq = eng.new_sequence(ctx + cont)
        logits = eng.prefill([seq], all_logits=True)[0]
        eng.release(seq)
        want = torch.log_softmax(logits[len(ctx) - 1: -1], -1).gather(1, torch.tensor(cont)[:, None]).sum().item()
        assert abs(total - want) < 1e-3, (c, total, want)
    assert max(range(3), key=ll.__getitem__) == 1                    # the copyable answer wins
    res = run_choice(llm, [COPY_TASK, dict(COPY_TASK, length=7)])
    assert res["accuracy"] == 1.0 and res["n"] == 2 and res["by_length"] == {"7": {"accuracy": 1.0, "n": 1}}


def test_a_context_too_short_for_the_decode_path_is_refused(llm):
    with pytest.raises(ValueError, match="needs at least 2 context tokens"):
        score_choices(llm, "", ["yes", "no"])
    eng = llm.get_engine(2)
    assert len(eng.free_slots) == eng.max_batch                   # refused before taking a slot

def test_load_tasks_errors(tmp_path):
    f = tmp_path / "t.jsonl"
    for line, msg in [('{"context": "a", "choices": ["b"], "label": 0}', "2 or more"),
                      ('{"context": "a", "choices": ["b", "c"], "label": 2}', "label"),
                      ('{"context": 1, "choices": ["b", "c"], "label": 0}', "context"),
                      ("not json", "not JSON")]:
        f.write_text(json.dumps(COPY_TASK) + "\n" + line + "\n")
        with pytest.raises(ValueError, match=rf"t.jsonl:2: .*{msg}"):
            load_tasks(str(f))
    f.write_text("\n".join(json.dumps(COPY_TASK) for _ in range(5)))
    assert len(load_tasks(str(f), limit=3)) == 3


# ---- needle -----------------------------------------------------------------------------------


def test_single_token_choices_are_scored_through_the_policy(tiny_dir, tmp_path, monkeypatch):
    """Every choice token, the first included, comes from a decode step of the policy: with one-token
    choices infinigen fetches rows (it used to score them from the dense prefill: fetched 0.0)."""
    from minigen import LLM
    monkeypatch.setenv("MINIGEN_CACHE", str(tmp_path))
    llm = LLM(str(tiny_dir), policy="infinigen", device="cpu", max_seq_len=128,
              policy_opts=dict(dense_layers=1, budget=0.3))
    tasks = [{"context": "The quick brown fox jumps over the lazy dog. Hello world, hello",
              "choices": ["!", "?", "."], "label": 0}] * 2
    ctx = llm.tokenizer.encode(tasks[0]["context"])
    assert all(len(continuation_ids(llm.tokenizer, tasks[0]["context"], ctx, c)) == 1 for c in tasks[0]["choices"])
    res = run_choice(llm, tasks)
    assert res["fetched_fraction"] > 0, res
    llm.close()
