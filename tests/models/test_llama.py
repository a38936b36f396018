"""Llama against transformers: fp32 logits within 1e-4 and 32 greedy tokens identical."""
import pytest
import torch

from tests.helpers import check_against_hf, tiny_hf_model, tiny_llama_config

LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                  "high_freq_factor": 4.0, "original_max_position_embeddings": 32}

CASES = {
    "mha-untied": dict(num_key_value_heads=4),
    "gqa-tied": dict(num_key_value_heads=2, tie_word_embeddings=True),
    "gqa-1kv-llama3-rope": dict(num_key_value_heads=1, rope_theta=500000.0, rope_scaling=LLAMA3_SCALING),
    "biases-odd-dims": dict(hidden_size=48, num_attention_heads=3, num_key_value_heads=3,
                            intermediate_size=80, attention_bias=True, mlp_bias=True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_llama_matches_transformers(case):
    check_against_hf(tiny_hf_model(tiny_llama_config(**CASES[case])))


def test_llama_chunked_prefill_matches():
    """Prefill in chunks of 5 tokens (each chunk continues the cache) gives the same logits."""
    check_against_hf(tiny_hf_model(tiny_llama_config()), lengths=(13, 4), steps=0, max_prefill_tokens=5)


def test_llama_triton_kernels_interpreted():
    """The same model with the Triton kernels (interpreter on CPU): catches stride/layout bugs
    in the model <-> kernel plumbing that per-kernel tests cannot."""
    from minigen.kernels.launch import interpreting
    if not interpreting():
        pytest.skip("set TRITON_INTERPRET=1 to run Triton kernels on the CPU")
    check_against_hf(tiny_hf_model(tiny_llama_config(num_hidden_layers=1)), lengths=(5, 3), steps=3,
                     use_triton=True, atol=1e-3)


def test_llama_rope_scaling_frequencies():
    """llama3 inverse frequencies equal transformers' own."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from minigen.config import ModelConfig
    from minigen.models.llama import rope_inv_freq
    hf_cfg = tiny_llama_config(rope_scaling=LLAMA3_SCALING, rope_theta=500000.0)
    want, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_cfg, "cpu")
    got = rope_inv_freq(ModelConfig.from_hf(hf_cfg.to_dict()))
    torch.testing.assert_close(got, want.float(), rtol=1e-6, atol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("case", list(CASES))
def test_llama_matches_transformers_cuda(case):
    """Compiled Triton kernels and the CUDA-graph decode step, fp32, against transformers."""
    eng = check_against_hf(tiny_hf_model(tiny_llama_config(**CASES[case])), device="cuda", atol=1e-4)
    assert eng._graphs and all(g.graph is not None for g in eng._graphs.values())
