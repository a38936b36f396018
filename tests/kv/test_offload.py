"""offload and infinigen policies against dense (CPU, tiny random models, fp32)."""
import pytest
import torch

from minigen.engine import Engine
from tests.helpers import (EXACT, PROMPTS, IdTokenizer, greedy, kv_config, minigen_from_hf, random_prompts, step_logits, tiny_hf_model,
                           tiny_llama_config, tiny_opt_config)

KERNEL_FETCH = dict(fetch="kernel")     # offload through gather_kv with device lengths (graph-capturable)


@pytest.mark.parametrize("policy,opts", [("offload", {}), ("offload", KERNEL_FETCH), ("infinigen", EXACT)])
def test_policy_logits_equal_dense(model, policy, opts):
    want, _ = step_logits(model, "dense", PROMPTS)
    got, _ = step_logits(model, policy, PROMPTS, **opts)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("policy,opts", [("offload", {}), ("offload", KERNEL_FETCH), ("infinigen", EXACT)])
def test_policy_greedy_equals_dense(model, policy, opts):
    want, _ = greedy(model, "dense", PROMPTS)
    got, eng = greedy(model, policy, PROMPTS, **opts)
    assert got == want
    assert eng.kv.stats()["fetched_fraction"] == 1.0


def test_infinigen_budget_caps_fetch(model):
    _, eng = greedy(model, "infinigen", PROMPTS, alpha=float("inf"), budget=0.25)
    frac = eng.kv.stats()["fetched_fraction"]
    # ceil(0.25 * n) per head: a little above a quarter for short contexts, never more than that
    assert 0.2 < frac <= 0.25 + 1 / 9 + 1e-9


def test_infinigen_recent_tokens_always_fetched(model):
    # recent=4 (under half the cap of 11+): in every pooled layer the last 4 cached tokens are
    # among the fetched rows, and the cap still holds
    prompts = random_prompts(320, (60, 41), seed=9)
    _, eng = step_logits(model, "infinigen", prompts, steps=3, alpha=float("inf"), budget=0.25, recent=4)
    kv, n = eng.kv, eng.kv._n_valid.tolist()
    for layer in range(kv.dense_layers, kv.num_layers):
        idx, count = kv.idx[layer % 2], kv.count[layer % 2]
        for b, nb in enumerate(n):
            for g in range(kv.num_kv_heads):
                got = set(idx[b, g, :count[b, g]].tolist())
                assert set(range(nb - 4, nb)) <= got, (layer, b, g)
                assert count[b, g] == -(-nb // 4)        # ceil(0.25 * n): the window is inside the cap


def test_infinigen_columns_do_not_depend_on_prefill_chunks(model):
    """The skewed columns come from every prompt token, however the engine packs prompts into
    prefill chunks: with 7-token chunks the second and third prompts start with 1 and 3 tokens
    in a chunk (the rest of the previous prompt fills it), yet columns, partial keys and the
    sparse decode match one whole-prompt chunk."""
    prompts = random_prompts(320, (41, 23, 31), seed=11)
    opts = dict(alpha=float("inf"), budget=0.25, partial_ratio=0.5, recent=0)
    whole, eng1 = step_logits(model, "infinigen", prompts, steps=4, **opts)
    chunked, eng2 = step_logits(model, "infinigen", prompts, steps=4, max_prefill_tokens=7, **opts)
    kv1, kv2 = eng1.kv, eng2.kv
    assert kv1.R < kv1.head_dim                  # a real choice of columns
    assert torch.equal(kv1.a_sel, kv2.a_sel)
    for slot, p in enumerate(prompts):           # the prompt's partial keys (decode steps appended more)
        n = len(p)
        torch.testing.assert_close(kv2.pk[:, slot, ..., :n], kv1.pk[:, slot, ..., :n], atol=1e-5, rtol=0)
    torch.testing.assert_close(chunked, whole, atol=1e-4, rtol=0)


def test_continued_prefill_from_pool_equals_dense(model):
    """A second prefill that continues a sequence (a chat turn) reads the earlier tokens back
    from the host pool: logits equal dense."""
    def two_turns(policy, **opts):
        eng = Engine(model, IdTokenizer(), policy=policy, max_batch=1, max_seq_len=96, policy_opts=opts)
        s = eng.new_sequence(PROMPTS[1])
        eng.prefill([s])
        s.pending = list(PROMPTS[0])
        return eng.prefill([s], all_logits=True)[0]
    want = two_turns("dense")
    for policy, opts in [("offload", {}), ("infinigen", EXACT)]:
        torch.testing.assert_close(two_turns(policy, **opts), want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("opts,msg", [
    (dict(dense_layers=0), "--dense-layers must be in"),
    (dict(dense_layers=4), "--dense-layers must be in"),
    (dict(budget=0.0), "--budget must be in"),
    (dict(alpha=-1.0), "--alpha must be > 0"),
    (dict(partial_ratio=1.5), "--partial-ratio must be in"),
    (dict(recent=-1), "--recent must be"),
])
def test_infinigen_bad_options(model, opts, msg):
    with pytest.raises(ValueError, match=msg):
        Engine(model, IdTokenizer(), policy="infinigen", max_seq_len=32, policy_opts=opts)


def test_fetch_flag(model):
    """--fetch on the shared command line: offload and int4 take it (the engine builds that fetch),
    the others refuse it."""
    import argparse
    from minigen.cli import add_model_args, policy_opts
    p = argparse.ArgumentParser()
    add_model_args(p)
    for policy in ("offload", "int4"):
        opts = policy_opts(p.parse_args(["--policy", policy, "--fetch", "kernel"]))
        assert opts == {"fetch": "kernel"}
        assert Engine(model, IdTokenizer(), policy=policy, max_seq_len=32, policy_opts=opts).kv.graph_safe
    for policy in ("offload", "int4"):   # the CPU path defaults to copy (int4 takes the kernel on CUDA)
        assert Engine(model, IdTokenizer(), policy=policy, max_seq_len=32).kv.fetch == "copy"
    with pytest.raises(ValueError, match="does not apply to --policy infinigen"):
        policy_opts(p.parse_args(["--policy", "infinigen", "--fetch", "copy"]))


def test_offload_takes_only_fetch(model):
    with pytest.raises(ValueError, match="policy 'offload' does not take alpha \\(it takes: fetch\\)"):
        Engine(model, IdTokenizer(), policy="offload", max_seq_len=32, policy_opts=dict(alpha=1.0))
    with pytest.raises(ValueError, match="fetch must be one of copy, kernel"):
        Engine(model, IdTokenizer(), policy="offload", max_seq_len=32, policy_opts=dict(fetch="dma"))


@pytest.mark.parametrize("policy,opts", [("offload", {}), ("offload", KERNEL_FETCH), ("infinigen", EXACT),
                                         ("infinigen", dict(alpha=2.0, budget=0.5)),
                                         ("infinigen", dict(alpha=float("inf"), budget=0.2, recent=3))])
def test_policy_triton_kernels_interpreted(policy, opts):
    """The policies' kernel plumbing (strided pool views, parity buffers) with the Triton kernels
    under the interpreter, against the same policy on the torch references."""
    from minigen.kernels.launch import interpreting
    if not interpreting():
        pytest.skip("set TRITON_INTERPRET=1 to run Triton kernels on the CPU")
    hf = tiny_hf_model(tiny_llama_config(num_hidden_layers=3, num_key_value_heads=2))
    prompts = random_prompts(320, (5, 3), seed=6)
    want, _ = step_logits(minigen_from_hf(hf), policy, prompts, steps=3, **opts)
    got, _ = step_logits(minigen_from_hf(hf, use_triton=True), policy, prompts, steps=3, **opts)
    torch.testing.assert_close(got, want, atol=1e-3, rtol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["llama-gqa", "opt"])
@pytest.mark.parametrize("policy,opts", [("offload", {}), ("offload", KERNEL_FETCH), ("infinigen", EXACT)])
def test_policy_equals_dense_cuda(arch, policy, opts):
    """On the GPU: pinned pool, copy/side streams and events, compiled kernels; fp32 logits of
    every teacher-forced step equal dense, and greedy tokens match (fetch=kernel: the decode step
    replayed from a CUDA graph)."""
    hf = (tiny_hf_model(tiny_llama_config(num_hidden_layers=4, num_key_value_heads=2)) if arch == "llama-gqa"
          else tiny_hf_model(tiny_opt_config(num_hidden_layers=4)))
    model = minigen_from_hf(hf, device="cuda")
    want, _ = step_logits(model, "dense", PROMPTS, steps=12)
    got, eng = step_logits(model, policy, PROMPTS, steps=12, **opts)
    assert eng.kv.pool.k.is_pinned()
    captured = next(iter(eng._graphs.values())).graph is not None
    assert captured == (policy == "infinigen" or opts.get("fetch") == "kernel")
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    assert greedy(model, policy, PROMPTS, **opts)[0] == greedy(model, "dense", PROMPTS)[0]


@pytest.mark.gpu
def test_infinigen_sparse_runs_cuda():
    hf = tiny_hf_model(tiny_llama_config(num_hidden_layers=4, num_key_value_heads=2))
    model = minigen_from_hf(hf, device="cuda")
    out, eng = greedy(model, "infinigen", PROMPTS, alpha=3.0, budget=0.3)
    assert all(len(o) == 32 for o in out)
    assert 0 < eng.kv.stats()["fetched_fraction"] <= 0.3 + 1 / 9


@pytest.mark.parametrize("row_elems,elem,chunk", [(1024, 4, 128), (4096, 2, 256), (576, 1, 288), (27, 4, 27),
                                                  (130, 4, 65)])
def test_chunk_elems(row_elems, elem, chunk):
    from minigen.kv.pool import chunk_elems
    assert chunk_elems(row_elems, elem) == chunk


@pytest.mark.parametrize("policy", ["offload", "int4"])
def test_kernel_fetch_stages_what_copy_stages(policy):
    """Decode staging by fetch=kernel (gather_kv over row chunks, device lengths) equals fetch=copy
    on every live row: rows over 512 bytes (several chunks per token), a batch whose rows are not
    its slots (slots 2, 0 of 3), different lengths; Triton kernels under the interpreter when set."""
    from minigen.kernels.launch import interpreting
    from minigen.kernels.ops import Ops
    from minigen.kv.int4 import Int4KV
    from minigen.kv.base import StepMeta
    from minigen.kv.offload import OffloadKV
    L, Hkv, D, S, T = 3, 8, 128, 3, 40        # offload fp32 row 4096 B: 8 chunks; int4 record row 576 B: 2
    ops = Ops(use_triton=interpreting())
    cfg = kv_config(L, Hkv, 1, D)

    def make(fetch):
        kv = (Int4KV(cfg, dtype=torch.float32, device="cpu", ops=ops, fetch=fetch) if policy == "int4" else
              OffloadKV(L, Hkv, D, dtype=torch.float32, device="cpu", ops=ops, sm_scale=D**-0.5, fetch=fetch))
        kv.allocate(S, T)
        return kv

    copy, kernel = make("copy"), make("kernel")
    gen = torch.Generator().manual_seed(0)
    for pool in ("k", "v"):
        src = getattr(copy.pool, pool)
        src.copy_(torch.randint(0, 256, src.shape, generator=gen).to(src.dtype) if src.dtype == torch.uint8
                  else torch.randn(src.shape, generator=gen))
        getattr(kernel.pool, pool).copy_(src)
    slots, cached = [2, 0], [31, 7]
    meta = StepMeta(is_prefill=False, positions=torch.tensor(cached), token_slot=torch.tensor(slots),
                    slot_idx=torch.tensor(slots, dtype=torch.int32),
                    seq_lens=torch.tensor([n + 1 for n in cached], dtype=torch.int32),
                    host_slots=slots, host_start=cached, host_new=[1, 1])
    for kv in (copy, kernel):
        kv.begin(meta)                        # fetches layers 0 and 1 into staging buffers 0 and 1
    assert kernel._chunk < Hkv * (kernel.record_bytes if policy == "int4" else D)
    for buf in (0, 1):
        for b, n in enumerate(cached):
            for name in ("stage_k", "stage_v"):
                want, got = getattr(copy, name)[buf, b, :n], getattr(kernel, name)[buf, b, :n]
                assert torch.equal(got, want), f"{name}[{buf}] batch row {b} (slot {slots[b]})"
                assert torch.equal(want, getattr(copy.pool, name[-1])[buf, slots[b], :n])
