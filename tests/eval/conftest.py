import pytest

from tests.helpers import minigen_from_hf, tiny_hf_model, tiny_llama_config


@pytest.fixture
def llm(default_llm):
    return default_llm


@pytest.fixture(scope="module")
def tiny():
    return minigen_from_hf(tiny_hf_model(tiny_llama_config(num_hidden_layers=4, num_key_value_heads=2)))
