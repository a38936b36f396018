"""Shared test helpers."""
from __future__ import annotations

import torch

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


def minigen_from_hf(hf_model, use_triton: bool = False, dtype=torch.float32, device="cpu"):
    """minigen's model for a transformers model, through the real path: save_pretrained
    (safetensors) to a temporary directory, then minigen's loader and build_model."""
    import tempfile

    from kernels import Ops
    from minigen.loader import load_checkpoint
    from models import build_model
    from tests.test_loader import save_tiny_tokenizer
    with tempfile.TemporaryDirectory() as d:
        hf_model.save_pretrained(d, safe_serialization=True)
        save_tiny_tokenizer(d)
        ckpt = load_checkpoint(d)
        return build_model(ckpt.config, ckpt.tensors(), device=device, dtype=dtype,
                           ops=Ops(use_triton=use_triton or device == "cuda"))


def random_prompts(vocab: int, lengths, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


def check_against_hf(hf_model, lengths=(7, 19), steps: int = 32, use_triton: bool = False,
                     atol: float = 1e-4, max_prefill_tokens: int = 4096, device: str = "cpu"):
    """Prefill logits of a ragged batch within atol of transformers, then `steps` greedy tokens
    identical to a cache-free transformers loop (on CUDA: Triton kernels, CUDA-graph decode)."""
    from minigen.engine import Engine
    from minigen.sampler import SamplingParams
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
