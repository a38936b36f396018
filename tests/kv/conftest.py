import pytest

from tests.helpers import minigen_from_hf, tiny_hf_model, tiny_llama_config, tiny_opt_config


@pytest.fixture(scope="module", params=["llama-gqa", "opt"])
def model(request):
    hf = (tiny_hf_model(tiny_llama_config(num_hidden_layers=4, num_key_value_heads=2)) if request.param == "llama-gqa"
          else tiny_hf_model(tiny_opt_config(num_hidden_layers=4)))
    return minigen_from_hf(hf)
