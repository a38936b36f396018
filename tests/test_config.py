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
