"""Qwen2 (Llama with q/k/v biases and no o_proj bias) against transformers: a tiny random
Qwen2ForCausalLM saved with save_pretrained and loaded by minigen gives fp32 logits within 1e-4 and
32 identical greedy tokens; the biases really are where minigen puts them."""
import pytest

from tests.helpers import check_against_hf, tiny_hf_model


def tiny_qwen2_config(**over):
    from transformers import Qwen2Config
    kw = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6, rope_theta=1e6,
              tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, use_sliding_window=False)
    kw.update(over)
    return Qwen2Config(**kw)


@pytest.mark.parametrize("over", [{}, dict(tie_word_embeddings=True, num_key_value_heads=1),
                                  dict(hidden_size=96, num_attention_heads=3, num_key_value_heads=3)])
def test_qwen2_matches_transformers(over):
    hf = tiny_hf_model(tiny_qwen2_config(**over))
    names = dict(hf.named_parameters())
    assert "model.layers.0.self_attn.q_proj.bias" in names and "model.layers.0.self_attn.o_proj.bias" not in names
    eng = check_against_hf(hf, steps=32)
    cfg = eng.model.config
    assert cfg.qkv_bias and not cfg.o_bias and cfg.rope_theta == 1e6
