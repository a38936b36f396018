"""minigen.eval: batched teacher forcing, ppl (prefill and decode), choice, needle, make_tasks and the
CLI's JSON last line. Tiny random models where numbers are compared; the default model where the
task must be meaningful (CPU, fp32)."""
import json
import math
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minigen.engine import Engine
from minigen.eval import nll_report, perplexity, token_nll, token_nll_decode
from minigen.tasks import (continuation_ids, load_tasks, needle_prompt, passkey_found, run_choice, run_needle,
                           score_choices)
from tests.helpers import IdTokenizer, minigen_from_hf, random_prompts, tiny_hf_model, tiny_llama_config

ROOT = Path(__file__).resolve().parents[1]
TEXT = ("The history of the printing press begins in the fifteenth century, when Johannes "
        "Gutenberg combined movable metal type, oil-based ink and a wooden press. Within decades "
        "printing spread across Europe, books became cheaper, and literacy rose. ") * 3
# the passkey papers' filler: retrieval then depends on the needle alone
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


@pytest.fixture
def llm(default_llm):
    return default_llm


@pytest.fixture(scope="module")
def tiny():
    return minigen_from_hf(tiny_hf_model(tiny_llama_config(num_hidden_layers=4, num_key_value_heads=2)))


def run(args, timeout=300):
    return subprocess.run([sys.executable, "-m", "minigen.eval", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


# ---- batched teacher forcing ------------------------------------------------------------------
PROMPTS = random_prompts(320, (9, 23, 4), seed=5)
TARGETS = random_prompts(320, (12, 5, 1), seed=6)          # ragged: the shorter rows are padded


def forced(model, policy, prompts, targets, **opts):
    eng = Engine(model, IdTokenizer(), policy=policy, max_batch=len(prompts), max_seq_len=64, policy_opts=opts)
    seqs = [eng.new_sequence(p) for p in prompts]
    return eng.teacher_force(seqs, targets), eng, seqs


@pytest.mark.parametrize("policy,opts", [("dense", {}), ("offload", {}), ("infinigen", dict(alpha=2.0, budget=0.5))])
def test_batched_teacher_force_equals_per_sequence(tiny, policy, opts):
    opts = dict(opts, dense_layers=1) if policy == "infinigen" else opts
    got, eng, seqs = forced(tiny, policy, PROMPTS, TARGETS, **opts)
    assert got.shape == (3, 12) and got.dtype == torch.float32
    for b, (p, t) in enumerate(zip(PROMPTS, TARGETS)):
        assert (got[b, len(t):] == 0).all()                   # padding adds nothing to a row's sum
        assert seqs[b].cached_ids == p + t[:-1]
        one, _, _ = forced(tiny, policy, [p], [t], **opts)
        torch.testing.assert_close(got[b, : len(t)], one[0], atol=1e-5, rtol=0)
    # the compatible form: one Sequence and one list -> (n,)
    eng = Engine(tiny, IdTokenizer(), policy="dense", max_batch=1, max_seq_len=64)
    single = eng.teacher_force(eng.new_sequence(PROMPTS[0]), TARGETS[0])
    assert single.shape == (12,)


def test_teacher_force_equals_prefill_logprobs(tiny):
    got, _, _ = forced(tiny, "dense", PROMPTS, TARGETS)
    eng = Engine(tiny, IdTokenizer(), policy="dense", max_batch=1, max_seq_len=64)
    for b, (p, t) in enumerate(zip(PROMPTS, TARGETS)):
        seq = eng.new_sequence(p + t)
        logits = eng.prefill([seq], all_logits=True)[0]                       # (len, V)
        eng.release(seq)
        lp = torch.log_softmax(logits[len(p) - 1: -1], -1).gather(1, torch.tensor(t)[:, None])[:, 0]
        torch.testing.assert_close(got[b, : len(t)], lp, atol=1e-5, rtol=0)


def test_teacher_force_errors(tiny):
    eng = Engine(tiny, IdTokenizer(), policy="dense", max_batch=2, max_seq_len=32)
    a, b = eng.new_sequence([5] * 20), eng.new_sequence([6] * 4)
    with pytest.raises(ValueError, match="one target list per sequence"):
        eng.teacher_force([a, b], [[1, 2]])
    with pytest.raises(ValueError, match="exceed"):
        eng.teacher_force([a, b], [[7] * 13, [8]])
    eng.teacher_force([a, b], [[7] * 12, [8]])           # 20 + 12 fits exactly; b pads at the slot end


# ---- ppl --------------------------------------------------------------------------------------
def test_chunked_ppl_equals_single_pass(llm):
    ids = llm.tokenizer.encode(TEXT)[:100]
    res = perplexity(llm, ids, chunk=17)
    # one pass over all tokens, log-softmax by hand
    eng = llm.get_engine(1)
    seq = eng.new_sequence(ids)
    logits = eng.prefill([seq], all_logits=True)[0]
    eng.release(seq)
    lp = torch.log_softmax(logits[:-1], -1).gather(1, torch.tensor(ids[1:])[:, None])
    want = math.exp(-lp.mean().item())
    assert res["tokens"] == 100 and res["scored"] == 99
    assert abs(res["ppl"] - want) / want < 1e-4
    assert 1.0 < res["ppl"] < 50.0     # coherent English under a real model


def test_decode_mode_equals_prefill_mode_for_dense(llm):
    tok = llm.tokenizer
    docs = [tok.encode(TEXT)[:40], tok.encode("Once upon a time, " + TEXT)[:31]]    # ragged batch
    prefix = 24
    dec = token_nll_decode(llm, docs, prefix)
    for d, nll in zip(docs, dec):
        assert nll.shape == (len(d) - prefix,)
        want = token_nll(llm, d, chunk=16)[prefix - 1:]          # token_nll[j] scores token j + 1
        torch.testing.assert_close(nll, want, atol=2e-4, rtol=0)


def test_chunk_report_consistent_with_overall():
    g = torch.Generator().manual_seed(0)
    nlls = [torch.rand(300, generator=g) * 4, torch.rand(170, generator=g) * 4]
    res = nll_report(nlls, [100, 100], chunk=64)
    chunks = res["chunks"]
    assert chunks[0]["start"] == 100 and chunks[0]["end"] == 128 and chunks[-1]["end"] == 400
    assert all(c["end"] == n["start"] for c, n in zip(chunks, chunks[1:]))
    assert sum(c["tokens"] for c in chunks) == res["scored"] == 470
    pooled = sum(c["tokens"] * c["nll"] for c in chunks) / res["scored"]
    assert abs(pooled - res["nll"]) < 1e-9 and abs(math.exp(res["nll"]) - res["ppl"]) < 1e-9
    both = torch.cat([nlls[0][28:92], nlls[1][28:92]]).double().mean().item()   # positions 128..191
    assert abs(chunks[1]["nll"] - both) < 1e-9 and chunks[1]["tokens"] == 128
    assert [t["scored"] for t in res["per_text"]] == [300, 170]
    assert abs(res["per_text"][1]["nll"] - nlls[1].double().mean().item()) < 1e-9


# ---- choice -----------------------------------------------------------------------------------
COPY_TASK = {"context": "Remember the password: tangerine. The password is",
             "choices": [" tractor", " tangerine", " purple"], "label": 1}


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
def test_passkey_found():
    assert passkey_found("The pass key is 71432.", 71432)
    assert passkey_found(" 71,432", 71432) and passkey_found("71 432!", 71432)
    assert not passkey_found("714329", 71432) and not passkey_found("171432", 71432)
    assert not passkey_found("I don't know", 71432)


def test_needle_grid(llm):
    tok = llm.tokenizer
    hay = tok.encode(FILLER * 60, add_special_tokens=False)
    ids = needle_prompt(tok, hay, 300, 0.5, 123456, chat=True)
    assert abs(len(ids) - 300) <= 16 and "123456" in tok.decode(ids)
    res = run_needle(llm, hay, [160, 240], [0.0, 0.5, 1.0], seed=1, batch=3, max_new_tokens=10)
    assert res["lengths"] == [160, 240] and res["depths"] == [0.0, 0.5, 1.0]
    assert len(res["grid"]) == 2 and all(len(row) == 3 for row in res["grid"]) and res["n"] == 6
    for c in res["cells"]:
        assert c["found"] == passkey_found(c["answer"], c["key"]) and 10_000 <= c["key"] < 10_000_000
    assert res["accuracy"] == sum(map(sum, res["grid"])) / 6
    assert res["accuracy"] >= 5 / 6, res["cells"]         # dense retrieves at short lengths


# ---- make_tasks -------------------------------------------------------------------------------
def synthetic_essays(d: Path, n_essays=6, n_sents=80):
    rng = random.Random(0)
    words = "apple river stone cloud market engine garden letter window silver painter doctor".split()
    for e in range(n_essays):
        sents = [f"Essay {e} line {i} says the {' '.join(rng.choices(words, k=rng.randint(6, 14)))}."
                 for i in range(n_sents)]
        (d / f"e{e}.txt").write_text(" ".join(sents))


def test_make_tasks_schema(tmp_path):
    sys.path.insert(0, str(ROOT / "bench"))
    import make_tasks
    synthetic_essays(tmp_path)
    out1, out2 = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    for out in (out1, out2):
        assert make_tasks.main(["--essays", str(tmp_path), "--lengths", "600,1024", "--per-length", "3",
                                "--out", str(out), "--seed", "3"]) == 0
    assert out1.read_text() == out2.read_text()                        # deterministic
    tasks = load_tasks(str(out1))
    assert [t["length"] for t in tasks] == [600] * 3 + [1024] * 3
    for t in tasks:
        assert len(t["choices"]) == 4 and len(set(t["choices"])) == 4 and t["tokens"] <= t["length"]
        quote = t["context"].rsplit('Quote: "', 1)[1].split('"')[0]
        answer = t["choices"][t["label"]]
        assert t["context"].endswith("Next sentence:") and answer.startswith(" ")
        assert quote + answer in t["context"]                           # the answer follows the quote
        # distractors never appear in the context: taken out of the passage, or from other essays
        assert all(c.strip() not in t["context"] for i, c in enumerate(t["choices"]) if i != t["label"])
        assert 0.15 <= t["depth"] <= 0.85 and t["removed"] == 3


# ---- CLI (each loads the model in a subprocess) ------------------------------------------------
def test_cli_ppl_decode_json_last_line(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text(TEXT)
    b.write_text("Once upon a time, " + TEXT)
    r = run(["ppl", "--text", str(a), "--text", str(tmp_path / "*.txt"), "--context", "40", "--mode", "decode",
             "--chunk-report", "8", "--json"])
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["texts"] == 2 and out["prefix"] == 20 and out["scored"] == 40 and out["policy"] == "dense"
    assert [c["start"] for c in out["chunks"]] == [20, 24, 32] and out["chunks"][-1]["end"] == 40
    assert [t["file"] for t in out["per_text"]] == [str(a), str(b)] and out["ppl"] > 1.0


def test_cli_choice_and_needle_json_last_line(tmp_path):
    f = tmp_path / "t.jsonl"
    f.write_text(json.dumps(COPY_TASK) + "\n" + json.dumps(dict(COPY_TASK, label=0)) + "\n")
    r = run(["choice", "--tasks", str(f), "--policy", "offload", "--json", "--quiet"])
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["n"] == 2 and out["accuracy"] == 0.5 and out["fetched_fraction"] == 1.0 and out["policy"] == "offload"
    (tmp_path / "hay.txt").write_text(FILLER * 40)
    r = run(["needle", "--haystack", str(tmp_path / "hay.txt"), "--lengths", "150,100000", "--depths", "0.5",
             "--max-seq-len", "200", "--max-new-tokens", "10", "--json"])
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["lengths"] == [150, 189] and len(out["grid"]) == 2 and "lowered to 189" in r.stderr


def test_cli_errors(tmp_path):
    r = run(["ppl", "--text", str(tmp_path / "missing.txt")], timeout=120)
    assert r.returncode == 2 and "error: --text" in r.stderr and "Traceback" not in r.stderr
    r = run(["choice", "--tasks", str(tmp_path / "missing.jsonl")], timeout=120)
    assert r.returncode == 2 and "error: --tasks" in r.stderr and "Traceback" not in r.stderr
    (tmp_path / "bad.jsonl").write_text('{"context": "x", "choices": ["a", "b"], "label": 5}\n')
    r = run(["choice", "--tasks", str(tmp_path / "bad.jsonl")], timeout=120)
    assert r.returncode == 2 and "bad.jsonl:1:" in r.stderr and "Traceback" not in r.stderr
    r = run(["needle", "--depths", "0,2"], timeout=120)
    assert r.returncode == 2 and "error: --depths" in r.stderr


def test_fidelity_labels_parse_back(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import fidelity
    for policy, opts in fidelity.CONFIGS + fidelity.TASK_CONFIGS:     # every label the report writes
        text = fidelity.label(policy, opts)
        assert fidelity.parse_label(text) == (policy, opts) and fidelity.label(*fidelity.parse_label(text)) == text
    assert fidelity.parse_label("infinigen a=5 b=0.1 r=0.5 recent=64") == (
        "infinigen", dict(alpha=5, budget=0.1, partial_ratio=0.5, recent=64))
    assert fidelity.parse_label("  window b=1  sinks=0 ") == ("window", dict(budget=1, sinks=0))
    text = "infinigen recent=0 cpu_kv_limit=0.8 evict=fifo"
    assert fidelity.parse_label(text) == ("infinigen", dict(recent=0, cpu_kv_limit=0.8, evict="fifo"))
    assert fidelity.label(*fidelity.parse_label(text)) == text
    for bad in ("infinigen a=5 recnt=64", "h2o a=5", "dense b=0.1", "infini b=0.1", "infinigen b=x",
                "infinigen b=0.1 b=0.2", "window budget", "infinigen a=nan", "infinigen a=-inf", "infinigen b=0",
                "infinigen b=1.5", "infinigen b=-0.1", "infinigen recent=64.0", "infinigen recent=1e2",
                "window sinks=4.5", "infinigen b=1_0", "infinigen a=+5", "infinigen r=inf", "infinigen evict=lru",
                "infinigen evict=1", "h2o evict=fifo", "infinigen cpu_kv_limit=fifo", "infinigen evict=fifo"):
        with pytest.raises(ValueError):
            fidelity.parse_label(bad)
    # --labels: distinct configurations in order; none, or one --policies leaves out, is an error
    assert fidelity.parse_labels("dense, dense,infinigen a=5 b=0.1,infinigen b=0.1 a=5.0", None) == [
        ("dense", {}), ("infinigen", dict(alpha=5, budget=0.1))]
    for labels, policies in ((",", None), ("", None), ("h2o b=0.1", "infinigen")):
        with pytest.raises(ValueError):
            fidelity.parse_labels(labels, policies)

    def no_model(*a, **k):
        raise AssertionError("the model was loaded before --labels was checked")
    import minigen.llm
    monkeypatch.setattr(minigen.llm, "LLM", no_model)
    for labels in ("dense,infinigen a=5 recnt=64", ",", "dense"):
        policies = ["--policies", "infinigen"] if labels == "dense" else []
        with pytest.raises(SystemExit, match="--labels"):
            fidelity.main(["--labels", labels, "--parts", "ppl"] + policies)
