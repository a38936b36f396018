"""ModelConfig: mapping from Hugging Face config.json and clear errors."""
import pytest

from minigen.config import ModelConfig
from minigen.errors import ConfigError
from tests.helpers import tiny_llama_config, tiny_opt_config


def test_llama_fields():
    c = ModelConfig.from_hf(tiny_llama_config(num_key_value_heads=2, tie_word_embeddings=True).to_dict())
    assert (c.arch, c.dim, c.num_heads, c.num_kv_heads, c.head_dim, c.group_size) == ("llama", 64, 4, 2, 16, 2)
    assert c.tie_embeddings and c.eos_token_ids == [2]


def test_opt_fields():
    c = ModelConfig.from_hf(tiny_opt_config(do_layer_norm_before=False, word_embed_proj_dim=32).to_dict())
    assert (c.arch, c.activation, c.do_layer_norm_before, c.word_embed_proj_dim) == ("opt", "relu", False, 32)
    assert not c.has_final_layer_norm   # post-LN OPT has no final layer norm


def test_unknown_architecture():
    with pytest.raises(ConfigError, match="unsupported architecture 'gpt_neox'"):
        ModelConfig.from_hf({"model_type": "gpt_neox", "architectures": ["GPTNeoXForCausalLM"]})



@pytest.mark.parametrize("cfg", [{"model_type": "qwen2_moe", "architectures": ["Qwen2MoeForCausalLM"]},
                                 {"architectures": ["Qwen2VLForConditionalGeneration"]}])
def test_a_family_sharing_a_prefix_is_not_taken_for_qwen2(cfg):
    with pytest.raises(ConfigError, match="unsupported architecture"):
        ModelConfig.from_hf(dict(cfg, vocab_size=10, hidden_size=8, num_attention_heads=2, num_hidden_layers=1,
                                 intermediate_size=16))


def test_the_family_from_the_class_name_without_model_type():
    c = ModelConfig.from_hf({"architectures": ["Qwen2ForCausalLM"], "vocab_size": 10, "hidden_size": 8,
                             "num_attention_heads": 2, "num_hidden_layers": 1, "intermediate_size": 16})
    assert (c.arch, c.qkv_bias, c.o_bias) == ("llama", True, False)

def test_missing_field():
    with pytest.raises(ConfigError, match="missing field 'hidden_size'"):
        ModelConfig.from_hf({"model_type": "llama", "vocab_size": 10, "num_attention_heads": 2})


@pytest.mark.parametrize("kw,msg", [
    (dict(dim=60, num_heads=7, num_kv_heads=7), "not divisible"),
    (dict(dim=64, num_heads=4, num_kv_heads=3), "not a multiple"),
    (dict(dim=64, num_heads=4, num_kv_heads=4, rope_scaling={"rope_type": "yarn"}), "not supported"),
])
def test_invalid_shapes(kw, msg):
    base = dict(arch="llama", vocab_size=10, num_layers=1, hidden_dim=8, max_seq_len=16)
    with pytest.raises(ConfigError, match=msg):
        ModelConfig(**base, **kw)


def test_sliding_window_caps_the_context_and_matches_transformers(capsys):
    """Mistral's sliding window is not implemented: the context is capped at it (said on stderr),
    where full attention is exactly the windowed one; a longer prompt is refused."""
    import torch
    from transformers import MistralConfig

    from minigen.engine import Engine
    from minigen.errors import ContextOverflowError
    from tests.helpers import IdTokenizer, assert_close, minigen_from_hf, random_prompts, tiny_hf_model
    hf = tiny_hf_model(MistralConfig(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                     sliding_window=16, bos_token_id=1, eos_token_id=2))
    model = minigen_from_hf(hf)
    assert (model.config.max_seq_len, model.config.sliding_window) == (16, 16)
    assert "sliding window of 16 tokens" in capsys.readouterr().err
    eng = Engine(model, IdTokenizer())
    prompt = random_prompts(320, (15,), seed=2)[0]
    got = eng.prefill([eng.new_sequence(prompt)], all_logits=True)[0]
    with torch.no_grad():
        want = hf(torch.tensor([prompt])).logits[0]
    assert_close(got, want, atol=1e-4, rtol=0, what="mistral logits inside the window")
    with pytest.raises(ContextOverflowError, match="context holds 16"):
        eng.new_sequence(random_prompts(320, (20,), seed=3)[0])


@pytest.mark.parametrize("field,value", [("attn_logit_softcapping", 50.0), ("final_logit_softcapping", 30.0),
                                         ("use_qk_norm", True), ("partial_rotary_factor", 0.5),
                                         ("query_pre_attn_scalar", 144)])
def test_unimplemented_fields_refused(field, value):
    cfg = {**tiny_llama_config().to_dict(), field: value}
    with pytest.raises(ConfigError, match=f"sets {field}="):
        ModelConfig.from_hf(cfg)
