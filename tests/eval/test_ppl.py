"""Perplexity through prefill and through the policy's decode path (minigen/eval/ppl.py)."""
import math

import torch

from minigen.eval.ppl import nll_report, perplexity, token_nll, token_nll_decode
from tests.helpers import EVAL_TEXT


def test_chunked_ppl_equals_single_pass(llm):
    ids = llm.tokenizer.encode(EVAL_TEXT)[:100]
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
    docs = [tok.encode(EVAL_TEXT)[:40], tok.encode("Once upon a time, " + EVAL_TEXT)[:31]]    # ragged batch
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
