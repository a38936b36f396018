"""Shared test helpers: comparison with readable failures, tiny random Hugging Face models and their
minigen twins, and the decode loops the policy tests compare."""
from __future__ import annotations

import torch

from minigen.engine import Engine
from minigen.sampler import SamplingParams

# (dtype, atol, rtol) used by kernel tests
TOLERANCES = [
    (torch.float32, 1e-4, 1e-4),
    (torch.float16, 2e-3, 2e-3),
    (torch.bfloat16, 1.6e-2, 1.6e-2),
]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float, what: str = ""):
    """torch.testing-style check that prints the worst mismatches (index, got, want)."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert not torch.isnan(a).any(), f"{what}: output has NaN"
    err = (a - e).abs()
    bad = err > atol + rtol * e.abs()
    if bad.any():
        flat = (err - rtol * e.abs()).flatten()
        worst = flat.topk(min(5, flat.numel())).indices
        lines = []
        for i in worst.tolist():
            idx = tuple(int(x) for x in torch.unravel_index(torch.tensor(i), a.shape))
            lines.append(f"  at {idx}: got {a[idx].item():.6g}, want {e[idx].item():.6g}")
        raise AssertionError(
            f"{what}: {int(bad.sum())}/{bad.numel()} elements off (max abs err {err.max().item():.3g}, "
            f"atol {atol}, rtol {rtol}); worst:\n" + "\n".join(lines))


def poison(shape, dtype, device="cpu") -> torch.Tensor:
    """An output buffer filled with NaN so unwritten elements fail the comparison."""
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


# ---------------------------------------------------------------------------------------------
# tiny random Hugging Face models, for exactness tests against transformers
# ---------------------------------------------------------------------------------------------
def tiny_llama_config(**over):
    from transformers import LlamaConfig
    kw = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
              rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
              bos_token_id=1, eos_token_id=2)
    kw.update(over)
    return LlamaConfig(**kw)


def tiny_opt_config(**over):
    from transformers import OPTConfig
    kw = dict(vocab_size=320, hidden_size=64, ffn_dim=96, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=256, word_embed_proj_dim=64, do_layer_norm_before=True,
              bos_token_id=1, eos_token_id=2, pad_token_id=0, dropout=0.0, attention_dropout=0.0)
    kw.update(over)
    return OPTConfig(**kw)


def tiny_hf_model(hf_config, seed: int = 0):
    """A transformers model with random weights (biases and norms randomized too)."""
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    m = AutoModelForCausalLM.from_config(hf_config, torch_dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return m.eval()


def hf_greedy(model, prompt: list[int], steps: int) -> list[int]:
    """Greedy tokens by re-running the whole sequence each step (no KV cache): independent of
    any caching logic."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            logits = model(torch.tensor([ids])).logits[0, -1]
            ids.append(int(logits.argmax()))
    return ids[len(prompt):]


class IdTokenizer:
    """Stand-in tokenizer for model tests that work on token ids only."""
    eos_ids: list[int] = []
    bos_id = None

    def stream_decoder(self):
        class _D:
            def push(self, t):
                return ""

            def flush(self):
                return ""
        return _D()


class CharTokenizer:
    """Token i decodes to one character; token 2 is EOS."""
    eos_ids = [2]
    bos_id = None

    def stream_decoder(self):
        class _D:
            def push(self, t):
                return chr(ord("a") + t % 26)

            def flush(self):
                return ""
        return _D()


def minigen_from_hf(hf_model, use_triton: bool = False, dtype=torch.float32, device="cpu"):
    """minigen's model for a transformers model, through the real path: save_pretrained
    (safetensors) to a temporary directory, then minigen's loader and build_model."""
    import tempfile

    from minigen.kernels.ops import Ops
    from minigen.load import load_checkpoint
    from minigen.models import build_model
    with tempfile.TemporaryDirectory() as d:
        hf_model.save_pretrained(d, safe_serialization=True)
        save_tiny_tokenizer(d)
        ckpt = load_checkpoint(d)
        return build_model(ckpt.config, ckpt.tensors(), device=device, dtype=dtype,
                           ops=Ops(use_triton=use_triton or device == "cuda"))


def kv_config(num_layers: int, num_kv_heads: int, group: int, head_dim: int, **over):
    """A ModelConfig of the given attention shape, for driving a KV policy without a model."""
    from minigen.config import ModelConfig
    H = num_kv_heads * group
    return ModelConfig(**{**dict(arch="llama", vocab_size=16, dim=H * head_dim, num_layers=num_layers, num_heads=H,
                                 num_kv_heads=num_kv_heads, hidden_dim=16, max_seq_len=4096, head_dim=head_dim),
                          **over})


def random_prompts(vocab: int, lengths, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


def check_against_hf(hf_model, lengths=(7, 19), steps: int = 32, use_triton: bool = False,
                     atol: float = 1e-4, max_prefill_tokens: int = 4096, device: str = "cpu"):
    """Prefill logits of a ragged batch within atol of transformers, then `steps` greedy tokens
    identical to a cache-free transformers loop (on CUDA: Triton kernels, CUDA-graph decode)."""
    model = minigen_from_hf(hf_model, use_triton=use_triton, device=device)
    prompts = random_prompts(hf_model.config.vocab_size, lengths)
    eng = Engine(model, IdTokenizer(), max_batch=len(prompts), max_seq_len=128,
                 max_prefill_tokens=max_prefill_tokens)
    seqs = [eng.new_sequence(p) for p in prompts]
    logits = eng.prefill(seqs, all_logits=True)
    for p, lg in zip(prompts, logits):
        with torch.no_grad():
            want = hf_model(torch.tensor([p])).logits[0]
        assert_close(lg, want, atol=atol, rtol=0, what="prefill logits")
    if steps:
        for s, p in zip(seqs, prompts):   # start over: same slots, cache overwritten
            s.cached_ids, s.pending = [], list(p)
        sp = SamplingParams(max_new_tokens=steps, temperature=0, ignore_eos=True)
        for _ in eng.generate(seqs, sp):
            pass
        for s, p in zip(seqs, prompts):
            assert s.output_ids == hf_greedy(hf_model, p, steps), "greedy tokens differ from transformers"
    return eng


# ---------------------------------------------------------------------------------------------
# Hugging Face directories on disk (loader tests)
# ---------------------------------------------------------------------------------------------
TEXT = ["The quick brown fox jumps over the lazy dog.", "Hello world, hello tokenizer!",
        "Numbers 12345 and 678.", "def main():\n    print('hi')  # done\n"] * 10
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def save_tiny_tokenizer(d, vocab_size=300):
    """A byte-level BPE trained on TEXT, saved the way transformers saves tokenizers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(TEXT, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok = __import__("transformers").PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|im_start|>",
                                               eos_token="<|im_end|>")
    tok.chat_template = CHATML
    tok.save_pretrained(d)
    return tok


def llama_config(**kw):
    args = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    args.update(kw)
    from transformers import LlamaConfig
    return LlamaConfig(**args)


def opt_config(**kw):
    args = dict(vocab_size=300, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=128, word_embed_proj_dim=64)
    args.update(kw)
    from transformers import OPTConfig
    return OPTConfig(**args)


def save_model(model, d, **kw):
    torch.manual_seed(0)
    model.save_pretrained(d, **kw)
    save_tiny_tokenizer(d)
    return {k: v for k, v in model.state_dict().items()}


# ---------------------------------------------------------------------------------------------
# KV policies against each other (tiny models, CPU)
# ---------------------------------------------------------------------------------------------
GREEDY = SamplingParams(max_new_tokens=32, temperature=0, ignore_eos=True)
EXACT = dict(alpha=1000.0, budget=1.0)    # infinigen that selects every token




def step_logits(model, policy, prompts, steps=8, max_prefill_tokens=4096, **opts):
    """Teacher-forced decode logits: every step's (B, V) logits for a fixed token stream."""
    eng = Engine(model, IdTokenizer(), policy=policy, max_batch=len(prompts), max_seq_len=96,
                 max_prefill_tokens=max_prefill_tokens, policy_opts=opts)
    seqs = [eng.new_sequence(p) for p in prompts]
    out = [eng.prefill(seqs)]
    g = eng._decode_graph(seqs)
    for t in range(steps):
        g.tokens.copy_(torch.tensor([(7 * t + 3 * b) % 300 + 3 for b in range(len(prompts))]))
        out.append(eng.decode_step(g).clone())
        for s in seqs:
            s.cached_ids.append(0)
    return torch.stack(out), eng


def greedy(model, policy, prompts, **opts):
    eng = Engine(model, IdTokenizer(), policy=policy, max_batch=len(prompts), max_seq_len=96, policy_opts=opts)
    seqs = [eng.new_sequence(p) for p in prompts]
    for _ in eng.generate(seqs, GREEDY):
        pass
    return [s.output_ids for s in seqs], eng


PROMPTS = random_prompts(320, (9, 23, 1), seed=4)


# ---------------------------------------------------------------------------------------------
# GPU: pinned pools and selections for gather/sparse-attention checks
# ---------------------------------------------------------------------------------------------
BAD_IDX = 1 << 28   # idx entries past count: would fault (or read garbage) if dereferenced


def pinned_pools(S, Hkv, Tcap, D, dtype, seed):
    """randn pools in pinned host memory (filled on the GPU: randn of GBs on the CPU is slow)."""
    torch.manual_seed(seed)
    pools = []
    for _ in range(2):
        pool = torch.empty((S, Hkv, Tcap, D), dtype=dtype, pin_memory=True)
        for s in range(S):
            pool[s].copy_(torch.randn((Hkv, Tcap, D), dtype=dtype, device="cuda"))
        pools.append(pool)
    return pools


def gpu_selection(B, Hkv, S, Tcap, N, seed):
    """Random ascending idx on the GPU, counts in [1, N] (one head at 1, one at N)."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    count = torch.randint(1, N + 1, (B, Hkv), generator=gen, device="cuda", dtype=torch.int32)
    count[0, 0], count[-1, -1] = 1, N
    keys = torch.rand((B, Hkv, Tcap), generator=gen, device="cuda")
    idx = keys.topk(N, dim=-1).indices                                   # N distinct tokens, random order
    # keep the first count of them, ascending: park the rest at int64 max, sort, then BAD_IDX
    valid = torch.arange(N, device="cuda") < count[..., None]
    idx = torch.where(valid, idx, torch.iinfo(torch.int64).max).sort(dim=-1).values
    idx = torch.where(valid, idx, BAD_IDX).to(torch.int32)
    slot_idx = torch.randperm(S, device="cuda")[:B].to(torch.int32)
    return idx, count, slot_idx


# ---------------------------------------------------------------------------------------------
# Evaluation texts
# ---------------------------------------------------------------------------------------------
EVAL_TEXT = ("The history of the printing press begins in the fifteenth century, when Johannes "
        "Gutenberg combined movable metal type, oil-based ink and a wooden press. Within decades "
        "printing spread across Europe, books became cheaper, and literacy rose. ") * 3
# the passkey papers' filler: retrieval then depends on the needle alone
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
COPY_TASK = {"context": "Remember the password: tangerine. The password is",
             "choices": [" tractor", " tangerine", " purple"], "label": 1}
