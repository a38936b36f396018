"""int4 policy (FlexGen+INT4) against a plain-torch reference: dense attention over int4-roundtripped
cached K/V plus the exact tokens of the current forward (CPU, tiny random models, fp32)."""
import itertools
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minigen.kernels.ops import Ops
from minigen.engine import Engine
from minigen.kv.int4 import Int4KV
from minigen.kv.dense import DenseKV
from minigen.sampler import SamplingParams
from tests.helpers import (IdTokenizer, assert_close, kv_config, minigen_from_hf, random_prompts, tiny_hf_model,
                           tiny_llama_config, tiny_opt_config)

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = random_prompts(320, (9, 23, 1), seed=4)


def fake_int4(x: torch.Tensor, G: int) -> torch.Tensor:
    """The format's definition, independently: per group of G, fp16 scale (max-min)/15 and min,
    codes floor((x - min) / scale + 0.5) clamped to [0, 15] (0 for constant groups)."""
    xg = x.float().unflatten(-1, (-1, G))                                    # (..., D/G, G)
    mn = xg.amin(-1, keepdim=True)
    scale = ((xg.amax(-1, keepdim=True) - mn) / 15).half().float()
    mn = mn.half().float()
    inv = torch.where(scale > 0, 1 / scale.where(scale > 0, 1.0), 0.0)
    q = torch.floor((xg - mn) * inv + 0.5).clamp(0, 15)
    return (q * scale + mn).flatten(-2).to(x.dtype)


class QuantizedPrefixDense(DenseKV):
    """Reference policy: each forward's queries see the tokens cached BEFORE it through fake_int4
    and its own tokens exactly (causal), in plain torch, one sequence at a time."""

    def __init__(self, model, group_size: int):
        cfg = model.config
        super().__init__(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, dtype=torch.float32, device="cpu",
                         ops=model.ops, sm_scale=model.sm_scale)
        self.G = group_size

    def attend(self, layer, q, k, v):
        meta, kc, vc = self.meta, self.k_cache[layer], self.v_cache[layer]   # (S, Hkv, T, D)
        kc[meta.token_slot, :, meta.positions] = k
        vc[meta.token_slot, :, meta.positions] = v
        rep = q.shape[1] // k.shape[1]
        out = torch.empty_like(q)
        cu = [0, *itertools.accumulate(meta.host_new)]
        for b, (slot, n0, n) in enumerate(zip(meta.host_slots, meta.host_start, meta.host_new)):
            keys = torch.cat([fake_int4(kc[slot, :, :n0], self.G), kc[slot, :, n0:n0 + n]], 1)   # (Hkv, n0+n, D)
            vals = torch.cat([fake_int4(vc[slot, :, :n0], self.G), vc[slot, :, n0:n0 + n]], 1)
            keys, vals = keys.repeat_interleave(rep, 0), vals.repeat_interleave(rep, 0)         # (H, n0+n, D)
            s = torch.einsum("nhd,htd->hnt", q[cu[b]:cu[b + 1]], keys) * self.sm_scale          # (H, n, n0+n)
            causal = torch.arange(n0 + n)[None, :] > n0 + torch.arange(n)[:, None]              # (n, n0+n)
            p = s.masked_fill(causal, float("-inf")).softmax(-1)
            out[cu[b]:cu[b + 1]] = torch.einsum("hnt,htd->nhd", p, vals)
        return out


@pytest.fixture(scope="module", params=["llama-gqa", "opt"])
def model(request):
    hf = (tiny_hf_model(tiny_llama_config(num_hidden_layers=3, num_key_value_heads=2)) if request.param == "llama-gqa"
          else tiny_hf_model(tiny_opt_config(num_hidden_layers=3)))
    return minigen_from_hf(hf)


def engine(model, policy, prompts, max_prefill_tokens=4096, **opts):
    """An engine on `policy` ("reference" installs QuantizedPrefixDense)."""
    eng = Engine(model, IdTokenizer(), policy="dense" if policy == "reference" else policy, max_batch=len(prompts),
                 max_seq_len=64, max_prefill_tokens=max_prefill_tokens, policy_opts=opts)
    if policy == "reference":
        eng.kv = QuantizedPrefixDense(model, min(64, model.config.head_dim))
        eng.kv.allocate(len(prompts), 64)
    return eng


def step_logits(model, policy, prompts, steps=6, max_prefill_tokens=4096, **opts):
    """Prefill logits of every prompt token, then teacher-forced decode logits (B, V) per step."""
    eng = engine(model, policy, prompts, max_prefill_tokens, **opts)
    seqs = [eng.new_sequence(p) for p in prompts]
    prefill = eng.prefill(seqs, all_logits=True)
    g = eng._decode_graph(seqs)
    out = []
    for t in range(steps):
        g.tokens.copy_(torch.tensor([(7 * t + 3 * b) % 300 + 3 for b in range(len(prompts))]))
        out.append(eng.decode_step(g).clone())
        for s in seqs:
            s.cached_ids.append(0)
    return torch.cat(prefill), torch.stack(out), eng


@pytest.mark.parametrize("fetch", ["kernel", "copy"])
def test_int4_equals_quantized_reference(model, fetch):
    want_p, want_d, _ = step_logits(model, "reference", PROMPTS)
    got_p, got_d, eng = step_logits(model, "int4", PROMPTS, fetch=fetch)
    assert eng.kv.fetch == fetch
    assert_close(got_p, want_p, atol=1e-5, rtol=0, what="prefill logits")
    assert_close(got_d, want_d, atol=1e-5, rtol=0, what="decode logits")
    D = model.config.head_dim
    assert eng.kv.stats()["fetched_fraction"] == (D / 2 + 2 * 2 * D / min(64, D)) / (2 * D)


def test_int4_differs_from_dense_a_little(model):
    """Prefill is exact; decode sees every cached token perturbed: close to dense, not equal."""
    dense_p, dense_d, _ = step_logits(model, "dense", PROMPTS)
    got_p, got_d, _ = step_logits(model, "int4", PROMPTS)
    assert_close(got_p, dense_p, atol=1e-5, rtol=0, what="prefill logits")
    diff = (got_d - dense_d).abs().max().item()
    assert 1e-4 < diff < 0.1 * dense_d.abs().max().item(), f"int4 vs dense decode logits differ by {diff}"


def test_int4_chunked_and_continued_prefill(model):
    """Prefill in chunks of 8 (later chunks attend over the quantized earlier ones), then a second
    turn on the first sequence, then decode: all equal the reference, and chunking matters."""
    def run(policy, chunk):
        return step_logits(model, policy, PROMPTS[:2], steps=3, max_prefill_tokens=chunk)[:2]
    for chunk in (8, 4096):
        for got, want in zip(run("int4", chunk), run("reference", chunk)):
            assert_close(got, want, atol=1e-5, rtol=0, what=f"logits, prefill chunks of {chunk}")
    assert not torch.allclose(run("int4", 8)[0], run("int4", 4096)[0], atol=1e-4)

    def two_turns(policy):
        eng = engine(model, policy, PROMPTS[:1])
        s = eng.new_sequence(PROMPTS[1])
        eng.prefill([s])
        s.pending = list(PROMPTS[0])
        return eng.prefill([s], all_logits=True)[0]
    assert_close(two_turns("int4"), two_turns("reference"), atol=1e-5, rtol=0, what="second turn logits")


def test_int4_greedy_runs(model):
    eng = engine(model, "int4", PROMPTS)
    seqs = [eng.new_sequence(p) for p in PROMPTS]
    for _ in eng.generate(seqs, SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True)):
        pass
    assert all(len(s.output_ids) == 12 for s in seqs)
    cfg = model.config
    R = cfg.head_dim // 2 + 4 * (cfg.head_dim // min(64, cfg.head_dim))
    assert eng.kv.stats()["host_pool_gib"] * 2**30 == 2 * cfg.num_layers * 3 * 64 * cfg.num_kv_heads * R


def test_int4_head_dim_80():
    with pytest.raises(ValueError, match="not a multiple of the quantization group 64"):
        Int4KV(kv_config(2, 2, 1, 80), dtype=torch.float32, device="cpu", ops=Ops(False))
    kv = Int4KV(kv_config(2, 2, 1, 80), dtype=torch.float32, device="cpu", ops=Ops(False), group_size=16)
    kv.allocate(1, 8)
    assert kv.stats()["fetched_fraction"] == (40 + 4 * 5) / 160


@pytest.mark.parametrize("fetch", ["kernel", "copy"])
def test_int4_triton_kernels_interpreted(fetch):
    """The policy's kernel plumbing (record views, strided staging slices, uint8 append_kv) with the
    Triton kernels under the interpreter, against the same policy on the torch references."""
    from minigen.kernels.launch import interpreting
    if not interpreting():
        pytest.skip("set TRITON_INTERPRET=1 to run Triton kernels on the CPU")
    hf = tiny_hf_model(tiny_llama_config(num_hidden_layers=2, num_key_value_heads=2))
    prompts = random_prompts(320, (5, 3), seed=6)
    want = step_logits(minigen_from_hf(hf), "int4", prompts, steps=3, max_prefill_tokens=4, fetch=fetch)
    got = step_logits(minigen_from_hf(hf, use_triton=True), "int4", prompts, steps=3, max_prefill_tokens=4,
                      fetch=fetch)
    for g, w in zip(got[:2], want[:2]):
        assert_close(g, w, atol=1e-3, rtol=0, what="interpreted vs ref logits")


def test_chat_cli_int4():
    r = subprocess.run([sys.executable, "-m", "minigen.chat", "--policy", "int4", "--prompt", "hi",
                        "--max-new-tokens", "4", "--temperature", "0"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip()


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["llama-gqa", "opt"])
@pytest.mark.parametrize("fetch", ["kernel", "copy"])
def test_int4_cuda_equals_cpu_reference(arch, fetch):
    """On the GPU: pinned record pool, copy stream and events, compiled kernels; fp32 logits of
    every step equal the CPU reference policy's (fetch=kernel: replayed from a CUDA graph), and
    greedy generation runs."""
    hf = (tiny_hf_model(tiny_llama_config(num_hidden_layers=4, num_key_value_heads=2)) if arch == "llama-gqa"
          else tiny_hf_model(tiny_opt_config(num_hidden_layers=4)))
    want = step_logits(minigen_from_hf(hf), "reference", PROMPTS, steps=12, max_prefill_tokens=8)
    cuda = minigen_from_hf(hf, device="cuda")
    got = step_logits(cuda, "int4", PROMPTS, steps=12, max_prefill_tokens=8, fetch=fetch)
    assert got[2].kv.pool.k.is_pinned()
    assert (next(iter(got[2]._graphs.values())).graph is not None) == (fetch == "kernel")
    for g, w in zip(got[:2], want[:2]):
        assert_close(g, w, atol=2e-3, rtol=0, what="CUDA int4 vs CPU reference logits")
    eng = engine(cuda, "int4", PROMPTS, fetch=fetch)
    seqs = [eng.new_sequence(p) for p in PROMPTS]
    for _ in eng.generate(seqs, SamplingParams(max_new_tokens=16, temperature=0, ignore_eos=True)):
        pass
    assert all(len(s.output_ids) == 16 for s in seqs)
