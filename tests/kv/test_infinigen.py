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
    # at most ceil(0.5 * n) of n cached tokens per head: <= 0.5 + 1/n, n >= the prompt's length - 1
    n_min = len(tok.encode_chat(QUESTION)) - 1
    assert 0.0 < frac <= 0.5 + 1 / n_min
    assert "Paris" in seq.text


class _Recorder:
    """A dense policy that also records the residual each layer's hook sees and each layer's q."""

    def __init__(self, inner):
        self.inner, self.x, self.q = inner, {}, {}

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def pre_attention(self, layer, x):
        self.x[layer] = x.clone()

    def attend(self, layer, q, k, v):
        self.q[layer] = q.clone()
        return self.inner.attend(layer, q, k, v)


@pytest.mark.parametrize("arch", ["llama", "opt", "opt-post-ln"])
def test_project_q_of_the_hooked_residual_is_the_layers_query(arch):
    """Speculation's building block: project_q(i, x) on the residual that pre_attention(i) sees
    reproduces layer i's own query, so it applies layer i's norm (gain, and for OPT bias) itself;
    fed layer i-1's residual it differs (what speculation approximates)."""
    import torch
    from tests.helpers import minigen_from_hf, tiny_hf_model, tiny_llama_config, tiny_opt_config
    cfg = (tiny_llama_config() if arch == "llama"
           else tiny_opt_config(do_layer_norm_before=arch == "opt"))
    model = minigen_from_hf(tiny_hf_model(cfg))
    with torch.no_grad():   # norm gains far from 1 and different per layer, as in real models
        for name, p in model.named_parameters():
            if "norm" in name and p.ndim == 1 and name.endswith("weight"):
                p.copy_(torch.rand_like(p) * 2 + 0.1)
    eng = Engine(model, None, policy="dense", max_seq_len=64, cuda_graph=False)
    rec = eng.kv = _Recorder(eng.kv)
    seq = eng.new_sequence(list(range(3, 14)))
    eng.prefill([seq])
    pos = torch.arange(11)
    L = model.config.num_layers
    for i in range(L):
        torch.testing.assert_close(model.project_q(i, rec.x[i], pos), rec.q[i], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(model.project_q(L - 1, rec.x[L - 2], pos), rec.q[L - 1], atol=1e-3)


def test_default_partial_ratio_by_head_dim(smollm):
    from minigen.kv.infinigen import InfiniGenKV, default_partial_ratio
    assert default_partial_ratio(128) == 0.5 and default_partial_ratio(64) == 0.5
    model, _ = smollm
    kv = InfiniGenKV(model.config, project_q=model.project_q, dtype=model.lm_head.weight.dtype, device="cpu", ops=model.ops)
    assert kv.R == model.config.head_dim // 2 == 32
    kv = InfiniGenKV(model.config, project_q=model.project_q, dtype=model.lm_head.weight.dtype, device="cpu", ops=model.ops, partial_ratio=0.2)
    assert kv.R == 12
