"""OPT against transformers: fp32 logits within 1e-4 and 32 greedy tokens identical."""
import pytest

from tests.helpers import check_against_hf, tiny_hf_model, tiny_opt_config

CASES = {
    "pre-ln": dict(),
    # opt-350m style: post-LN, no final layer norm, 32-wide embeddings projected in and out
    "post-ln-project-in-out": dict(do_layer_norm_before=False, word_embed_proj_dim=32),
    "odd-dims": dict(hidden_size=48, num_attention_heads=3, ffn_dim=80),
}


@pytest.mark.parametrize("case", list(CASES))
def test_opt_matches_transformers(case):
    check_against_hf(tiny_hf_model(tiny_opt_config(**CASES[case])))


def test_opt_chunked_prefill_matches():
    check_against_hf(tiny_hf_model(tiny_opt_config()), lengths=(11, 3), steps=0, max_prefill_tokens=4)


def test_opt_triton_kernels_interpreted():
    from minigen.kernels.launch import interpreting
    if not interpreting():
        pytest.skip("set TRITON_INTERPRET=1 to run Triton kernels on the CPU")
    check_against_hf(tiny_hf_model(tiny_opt_config(num_hidden_layers=1)), lengths=(5, 3), steps=3,
                     use_triton=True, atol=1e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("case", list(CASES))
def test_opt_matches_transformers_cuda(case):
    eng = check_against_hf(tiny_hf_model(tiny_opt_config(**CASES[case])), device="cuda", atol=1e-4)
    assert eng._graphs and all(g.graph is not None for g in eng._graphs.values())
