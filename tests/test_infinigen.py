"""InfiniGen on the real default model (CPU): selecting every token reproduces dense exactly;
a real selection fetches a fraction of the KV and still answers sensibly."""
import pytest

from minigen.engine import Engine
from minigen.sampler import SamplingParams

QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]


@pytest.fixture
def smollm(default_llm):
    return default_llm.model, default_llm.tokenizer


def run(model, tok, policy, steps=32, **opts):
    eng = Engine(model, tok, policy=policy, max_seq_len=256, policy_opts=opts)
    seq = eng.new_sequence(tok.encode_chat(QUESTION))
    for _ in eng.generate([seq], SamplingParams(max_new_tokens=steps, temperature=0, ignore_eos=True)):
        pass
    return seq, eng


def test_infinigen_select_all_equals_dense_on_default_model(smollm):
    model, tok = smollm
    dense, _ = run(model, tok, "dense")
    inf, eng = run(model, tok, "infinigen", alpha=1000.0, budget=1.0)
    assert inf.output_ids == dense.output_ids
    assert eng.kv.stats()["fetched_fraction"] == 1.0
    assert "Paris" in dense.text


def test_infinigen_sparse_on_default_model(smollm):
    model, tok = smollm
    seq, eng = run(model, tok, "infinigen", steps=12, alpha=5.0, budget=0.5)
    frac = eng.kv.stats()["fetched_fraction"]
    assert 0.0 < frac <= 0.5 + 1e-9
    assert "Paris" in seq.text
