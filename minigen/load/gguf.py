"""GGUF checkpoints (llama and qwen2 architectures): config and tokenizer from metadata, tensors
dequantized to fp32 under their Hugging Face names.

The pitfall this file exists to get right: for llama files, llama.cpp's converter permutes the rows
of attn_q and attn_k so that each head's (x[i], x[i + D/2]) rotate-half pairs become adjacent
(x[2i], x[2i+1]) interleaved pairs. minigen uses rotate-half RoPE, so `unpermute_rope_rows`
restores the HF row order (Q with H heads, K with Hkv heads). Mixing the two runs without error and
produces garbage. qwen2 files keep HF's order (their RoPE is rotate-half in llama.cpp too).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Iterator

import numpy as np
import tokenizers
import torch
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize
from tokenizers import AddedToken, Regex, decoders
from tokenizers import pre_tokenizers as pt

from minigen.config import ModelConfig
from minigen.errors import ConfigError, LoadError
from minigen.load import dequant as torch_dequant
from minigen.load.checkpoint import Checkpoint, progress_bar
from minigen.load.gguf_file import GGUFFile
from minigen.load.tokenizer import Tokenizer, set_bos_eos_processor

GGUF_MAGIC = b"GGUF"
TOKEN_CONTROL, TOKEN_USER_DEFINED = 3, 4    # tokenizer.ggml.token_type values

# GGUF name (after "blk.N.") -> HF name (after "model.layers.N.")
_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


# ---------------------------------------------------------------------------------------------
# names and the RoPE row permutation
# ---------------------------------------------------------------------------------------------

def gguf_to_hf_name(name: str) -> str | None:
    """'blk.3.attn_q.weight' -> 'model.layers.3.self_attn.q_proj.weight'; None if unknown."""
    if m := _BLOCK_RE.fullmatch(name):
        layer, part, kind = m.groups()
        hf = _BLOCK_NAMES.get(part)
        return None if hf is None else f"model.layers.{layer}.{hf}.{kind}"
    stem, _, kind = name.rpartition(".")
    hf = _TOP_NAMES.get(stem)
    return None if hf is None or kind not in ("weight", "bias") else f"{hf}.{kind}"


def permute_rope_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """What llama.cpp's converter does to HF q/k rows: per head, rows [first half | second half]
    -> interleaved (r0, r(D/2), r1, r(D/2+1), ...). Used by the tests to check the inverse."""
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, 2, half, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def unpermute_rope_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Inverse of permute_rope_rows: per head (H*D rows, or Hkv*D for K), rows stored as
    (D/2, 2) pairs go back to (2, D/2) halves, the order rotate-half RoPE expects."""
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)  # (H*D, ...)


# ---------------------------------------------------------------------------------------------
# metadata
# ---------------------------------------------------------------------------------------------

class _Meta:
    """Typed access to GGUF key/values, with LoadError for missing required keys."""

    def __init__(self, reader: GGUFFile, path: Path):
        self._fields, self._path = reader.fields, path

    def get(self, key: str, default=None):
        return self._fields.get(key, default)

    def req(self, key: str):
        v = self.get(key)
        if v is None:
            raise LoadError(f"GGUF file '{self._path.name}' lacks metadata '{key}'; re-convert it with a "
                            "current llama.cpp convert_hf_to_gguf.py")
        return v

    def num(self, key: str, default=None, kind=int):
        """A scalar hyper-parameter (required when default is None)."""
        v = self.req(key) if default is None else self.get(key, default)
        if isinstance(v, (list, tuple)):
            raise LoadError(f"GGUF metadata '{key}' varies per layer, which minigen does not support; "
                            "use the model's Hugging Face directory")
        return kind(v)


def _open_reader(path: Path):
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic != GGUF_MAGIC:
        raise LoadError(f"'{path}' is not a GGUF file (magic {magic!r}, expected b'GGUF'): "
                        "pass a real .gguf file or a Hugging Face model directory")
    try:
        return GGUFFile(path)
    except Exception as e:  # truncated or malformed header
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise LoadError(f"'{path}' is a corrupt GGUF file ({reason}); re-download it") from None


ARCHS = ("llama", "qwen2")     # general.architecture values minigen reads (Qwen2 runs as Llama)


def _config_from_meta(meta: _Meta, tensors: dict, path: Path) -> ModelConfig:
    arch = meta.req("general.architecture")
    if arch not in ARCHS:
        raise LoadError(f"GGUF architecture '{arch}' is not supported: minigen reads {' and '.join(ARCHS)} GGUF "
                        "files; for OPT or other models pass a Hugging Face directory")
    k = arch + "."                                   # metadata keys are prefixed by the architecture
    if meta.get(k + "expert_count"):
        raise LoadError(f"mixture-of-experts {arch} GGUF files are not supported; use a dense model")
    if "rope_freqs.weight" in tensors:
        raise LoadError("this GGUF stores Llama-3.1 rope scaling as a rope_freqs tensor, which minigen does "
                        "not read; use the Hugging Face directory of the model")
    dim = meta.num(k + "embedding_length")
    nh = meta.num(k + "attention.head_count")
    nkv = meta.num(k + "attention.head_count_kv", nh)
    head_dim = meta.num(k + "attention.key_length", dim // nh)
    rot = meta.num(k + "rope.dimension_count", head_dim)
    if rot != head_dim:
        raise LoadError(f"partial rotary embedding (rope dims {rot} of head dim {head_dim}) is not supported")
    ctx = meta.num(k + "context_length", 2048)
    window = meta.num(k + "attention.sliding_window", 0)
    window = window if 0 < window < ctx else None     # capped as for Hugging Face configs (config.py)
    rope_scaling = None
    kind = meta.get(k + "rope.scaling.type")
    if kind not in (None, "none"):
        rope_scaling = {"rope_type": kind, "factor": meta.num(k + "rope.scaling.factor", 1.0, float)}
    emb = tensors.get("token_embd.weight")
    if emb is None:
        raise LoadError(f"GGUF file '{path.name}' has no token_embd.weight tensor; re-convert it")
    vocab = int(emb.shape[-1])          # GGUF shape is reversed: (C, V)
    try:
        return ModelConfig(
            arch="llama", vocab_size=vocab, dim=dim, num_layers=meta.num(k + "block_count"),
            num_heads=nh, num_kv_heads=nkv, hidden_dim=meta.num(k + "feed_forward_length"),
            max_seq_len=window or ctx, sliding_window=window, head_dim=head_dim,
            norm_eps=meta.num(k + "attention.layer_norm_rms_epsilon", 1e-5, float),
            rope_theta=meta.num(k + "rope.freq_base", 10000.0, float), rope_scaling=rope_scaling,
            tie_embeddings="output.weight" not in tensors,
            qkv_bias="blk.0.attn_q.bias" in tensors, o_bias="blk.0.attn_output.bias" in tensors,
            mlp_bias="blk.0.ffn_up.bias" in tensors, activation="silu")
    except ConfigError as e:
        raise LoadError(f"GGUF file '{path.name}': {e}") from None


# ---------------------------------------------------------------------------------------------
# tokenizer
# ---------------------------------------------------------------------------------------------

# llama.cpp pre-tokenizer names (tokenizer.ggml.pre) -> how to split text before BPE
_DIGITS_THEN_GPT2 = {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"}
_GPT2 = {"gpt-2", "phi-2", "mpt", "olmo", "jais", "trillion"}
_LLAMA3 = {"llama3", "llama-v3", "llama-bpe", "falcon3", "smaug-bpe", "dbrx"}
_QWEN2 = {"qwen2", "deepseek-r1-qwen"}
# Llama 3's split (tiktoken cl100k-style): digits in groups of up to 3; Qwen2's: every digit alone
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")
# control tokens that end generation whatever the file names as eos (what llama.cpp treats as EOG)
_END_TOKENS = {"<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<|end|>"}


def _pre_tokenizer(pre: str | None):
    if pre is None:
        raise LoadError("GGUF file has no tokenizer.ggml.pre (made by an old llama.cpp): re-convert it with a "
                        "current convert_hf_to_gguf.py or use the model's Hugging Face directory")
    if pre in _DIGITS_THEN_GPT2:
        # every digit its own piece, then GPT-2's split + byte mapping (SmolLM2's tokenizer.json)
        return pt.Sequence([pt.Digits(individual_digits=True), pt.ByteLevel(add_prefix_space=False)])
    if pre in _GPT2:
        return pt.ByteLevel(add_prefix_space=False)
    if pre in _LLAMA3 or pre in _QWEN2:
        split = _LLAMA3_SPLIT if pre in _LLAMA3 else _QWEN2_SPLIT
        return pt.Sequence([pt.Split(Regex(split), behavior="isolated"),
                            pt.ByteLevel(add_prefix_space=False, use_regex=False)])
    raise LoadError(f"GGUF pre-tokenizer '{pre}' is not supported (supported: smollm, gpt-2, llama-bpe, qwen2); "
                    "use the model's Hugging Face directory")


def gguf_tokenizer(meta: _Meta, path: Path):
    """Build the Tokenizer a GGUF describes (byte-level BPE, tokenizer.ggml.model == "gpt2")."""
    model = meta.get("tokenizer.ggml.model")
    if model == "llama":
        raise LoadError("GGUF sentencepiece vocab not supported yet; use the HF directory")
    if model != "gpt2":
        raise LoadError(f"GGUF tokenizer model '{model}' is not supported (byte-level BPE 'gpt2' only); "
                        "use the model's Hugging Face directory")
    tokens: list[str] = meta.req("tokenizer.ggml.tokens")
    types: list[int] = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    merges = [tuple(m.split(" ", 1)) for m in meta.req("tokenizer.ggml.merges")]
    vocab = {t: i for i, t in enumerate(tokens)}
    bad = next((m for m in merges if len(m) != 2 or m[0] not in vocab or m[1] not in vocab
                or m[0] + m[1] not in vocab), None)
    if bad is not None:
        raise LoadError(f"GGUF file '{path.name}' has a tokenizer merge {' '.join(bad)!r} whose tokens are not in "
                        f"its vocabulary: the file is corrupt or was converted wrongly; re-convert it")

    pre = meta.get("tokenizer.ggml.pre")
    # Llama 3's BPE takes a pre-token that is itself in the vocab whole (llama.cpp does the same)
    bpe = tokenizers.models.BPE(vocab=vocab, merges=merges,
                                fuse_unk=False, byte_fallback=False, ignore_merges=pre in _LLAMA3)
    tk = tokenizers.Tokenizer(bpe)
    tk.pre_tokenizer = _pre_tokenizer(pre)
    tk.decoder = decoders.ByteLevel()
    # control tokens (<|im_start|>, <|endoftext|>) are matched whole and skippable; user-defined
    # ones are matched whole but are ordinary text when decoding
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False)
                           for t, ty in zip(tokens, types) if ty == TOKEN_CONTROL])
    tk.add_tokens([AddedToken(t, special=False, normalized=False)
                   for t, ty in zip(tokens, types) if ty == TOKEN_USER_DEFINED])

    def tok_at(key):
        i = meta.get(key)
        return (int(i), tokens[int(i)]) if i is not None and 0 <= int(i) < len(tokens) else (None, None)

    bos_id, bos = tok_at("tokenizer.ggml.bos_token_id")
    eos_id, eos = tok_at("tokenizer.ggml.eos_token_id")
    eos_ids = [i for i in (eos_id, tok_at("tokenizer.ggml.eot_token_id")[0],
                           tok_at("tokenizer.ggml.eom_token_id")[0]) if i is not None]
    eos_ids += [i for i, (t, ty) in enumerate(zip(tokens, types)) if ty == TOKEN_CONTROL and t in _END_TOKENS]
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False))
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
    set_bos_eos_processor(tk, bos, eos, add_bos, add_eos)
    extra = {k: tokens[i] for k, key in (("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id"))
             if (i := meta.get(f"tokenizer.ggml.{key}")) is not None and 0 <= int(i) < len(tokens)}
    return Tokenizer(backend=tk, bos_token=bos, eos_token=eos, bos_id=bos_id, eos_ids=eos_ids,
                     chat_template=meta.get("tokenizer.chat_template"), extra_template_vars=extra)


# ---------------------------------------------------------------------------------------------
# tensors
# ---------------------------------------------------------------------------------------------

def _to_torch(t, device: torch.device) -> torch.Tensor:
    """One GGUF tensor -> torch in HF layout: (out, in) rows; F16/BF16 kept, quantized -> fp32. The
    formats minigen/load/dequant.py knows are dequantized on `device` (fast on a GPU); the others
    with the gguf package's numpy code on the host."""
    shape = tuple(int(x) for x in reversed(t.shape))     # GGUF lists ne0 (the fastest dim) first
    if int(t.tensor_type) in torch_dequant.FORMATS:
        raw = torch.from_numpy(np.array(t.data, copy=True).reshape(-1)).to(device)   # the bytes, once
        return torch_dequant.dequantize(raw, int(t.tensor_type), shape)
    if t.tensor_type == Q.F16:
        arr = np.array(t.data).view(np.float16)          # a copy out of the read-only memory map
    elif t.tensor_type == Q.BF16:
        raw = torch.from_numpy(np.array(t.data).view(np.int16))
        return raw.view(torch.bfloat16).reshape(shape)
    elif t.tensor_type == Q.F32:
        arr = np.array(t.data).view(np.float32)
    else:
        arr = dequantize(t.data, t.tensor_type)          # a fresh fp32 array
    return torch.from_numpy(arr).reshape(shape)


def load_gguf(path: Path) -> Checkpoint:
    reader = _open_reader(path)
    meta = _Meta(reader, path)
    by_name = {t.name: t for t in reader.tensors}
    config = _config_from_meta(meta, by_name, path)
    tokenizer = gguf_tokenizer(meta, path)
    config.bos_token_id = tokenizer.bos_id
    config.eos_token_ids = list(tokenizer.eos_ids)

    names: list[tuple[str, str]] = []      # (gguf name, hf name)
    for t in reader.tensors:
        hf = gguf_to_hf_name(t.name)
        if hf is None:
            raise LoadError(f"GGUF tensor '{t.name}' is not part of a {'/'.join(ARCHS)} model minigen knows; "
                            "use the model's Hugging Face directory")
        names.append((t.name, hf))
    nbytes = sum(int(t.n_bytes) for t in reader.tensors)
    # llama.cpp permutes q/k rows for interleaved RoPE in llama files only (qwen2 files keep HF's order)
    heads = {"attn_q": config.num_heads, "attn_k": config.num_kv_heads} if meta.get("general.architecture") == "llama" else {}

    def open_tensors(device: torch.device | str = "cpu") -> Iterator[tuple[str, torch.Tensor]]:
        device = torch.device(device)
        with progress_bar(len(names), nbytes, f"loading {path.name}") as bar:
            for gname, hf in names:
                t = by_name[gname]
                try:
                    w = _to_torch(t, device)
                except (NotImplementedError, ValueError) as e:
                    raise LoadError(f"GGUF tensor '{gname}' ({t.tensor_type.name}) cannot be dequantized "
                                    f"({e}); use a Q4_0/Q4_1/Q5/Q8_0/K-quant/F16 file") from None
                part = gname.split(".")[2] if gname.startswith("blk.") else ""
                if part in heads:       # llama.cpp's interleaved-RoPE row order -> HF rotate-half
                    w = unpermute_rope_rows(w, heads[part])
                bar.update()
                yield hf, w

    return Checkpoint(config=config, tokenizer=tokenizer, tensor_names=[hf for _, hf in names],
                      source="gguf", path=path, _open=open_tensors)
