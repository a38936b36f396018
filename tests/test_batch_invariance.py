"""Every policy gives a sequence the same tokens and scores alone or in any batch, on the CPU with
batch_invariant (what the evaluations run with)."""
import pytest
import torch

from minigen import LLM
from minigen.eval.ppl import token_nll_decode

PROMPTS = ["The history of the printing press begins in the fifteenth century, when Johannes Gutenberg "
           "combined movable metal type with oil-based ink and a wooden press.",
           "Explain in detail how a bicycle stays upright while it is moving, and why it falls over.",
           "Hi", "What is 2+2?"]


@pytest.mark.parametrize("policy,opts", [("int4", {}), ("infinigen", {}), ("h2o", {"budget": 0.3}),
                                         ("window", {"budget": 0.3})])
def test_results_do_not_depend_on_the_batch(policy, opts):
    """Without batch_invariant, int4's 4-bit codes of a few K/V values flip between the two (the K/V
    differ in their last bits with the row count of CPU BLAS's products) and greedy tokens diverge;
    the sparse policies' decode NLL moved with the width of the batch's widest selection."""
    llm = LLM(policy=policy, device="cpu", max_seq_len=256, batch_invariant=True, policy_opts=opts)
    together = [c.token_ids for c in llm.generate(PROMPTS, max_new_tokens=32, temperature=0)]
    alone = [llm.generate([p], max_new_tokens=32, temperature=0)[0].token_ids for p in PROMPTS]
    assert together == alone
    docs = [llm.tokenizer.encode(p * 3)[:60] for p in PROMPTS[:2]]
    batched = token_nll_decode(llm, docs, 30)
    for d, nll in zip(docs, batched):
        assert torch.equal(token_nll_decode(llm, [d], 30)[0], nll)
    llm.close()
