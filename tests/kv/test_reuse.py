"""infinigen with reuse of fetched rows: the same logits as without it, bit for bit (the resident
set only changes where a row is read from), on the CPU reference path, the Triton kernels under
the interpreter, a limited pool that overwrites rows, a continued prompt, and CUDA graphs."""
import argparse

import pytest
import torch

from minigen.cli import add_model_args, policy_opts
from minigen.engine import Engine
from minigen.kv import check_policy_opts
from tests.helpers import IdTokenizer, PROMPTS, greedy, minigen_from_hf, step_logits, tiny_hf_model, tiny_llama_config

SPARSE = dict(alpha=2.0, budget=0.5, dense_layers=1)
T = 96


def hf():
    return tiny_hf_model(tiny_llama_config(num_hidden_layers=4, num_key_value_heads=2))


@pytest.fixture(scope="module")
def model():
    return minigen_from_hf(hf())


def _hit_rate(eng) -> float:
    st = eng.kv.stats()
    assert 0 < st["pcie_bytes"] and "reuse_hit_rate" in st
    return st["reuse_hit_rate"]


@pytest.mark.parametrize("reuse", [1.0, 3.0])
def test_reuse_gives_the_same_logits(model, reuse):
    want, base = step_logits(model, "infinigen", PROMPTS, steps=16, **SPARSE)
    got, eng = step_logits(model, "infinigen", PROMPTS, steps=16, reuse=reuse, **SPARSE)
    assert torch.equal(got, want)
    assert 0 < _hit_rate(eng) <= 1
    # fewer bytes cross PCIe, the same rows are selected
    assert eng.kv.stats()["pcie_bytes"] < base.kv.stats()["pcie_bytes"]
    assert eng.kv.stats()["fetched_fraction"] == base.kv.stats()["fetched_fraction"]
    assert eng.kv.reuse.cache_rows == max(eng.kv.max_select, min(eng.kv.rows, int(reuse * eng.kv.max_select + 0.999)))


def test_reuse_under_the_interpreter():
    """The Triton path (plan_reuse and gather_kv kernels) on the CPU interpreter: same logits."""
    m = minigen_from_hf(hf(), use_triton=True)
    want, _ = step_logits(m, "infinigen", PROMPTS[:2], steps=6, **SPARSE)
    got, eng = step_logits(m, "infinigen", PROMPTS[:2], steps=6, reuse=2.0, **SPARSE)
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    assert _hit_rate(eng) > 0


def test_reuse_with_a_limited_pool(model):
    """A full limited pool overwrites rows every step: a resident copy of an overwritten row must
    not be used (the decode step clears its loc)."""
    opts = dict(SPARSE, cpu_kv_limit=24 / T, evict_window=4)
    want, _ = greedy(model, "infinigen", PROMPTS, **opts)
    got, eng = greedy(model, "infinigen", PROMPTS, reuse=2.0, **opts)
    assert got == want and eng.kv.limited and _hit_rate(eng) > 0


def test_reuse_with_a_continued_prompt(model):
    """A second turn prefills more tokens into the slot: the same logits after it."""
    def two_turns(**opts):
        eng = Engine(model, IdTokenizer(), policy="infinigen", max_batch=1, max_seq_len=T,
                     policy_opts=dict(SPARSE, **opts))
        s = eng.new_sequence(PROMPTS[0])
        out = list(eng.generate([s], _greedy(8)))
        s.pending = list(PROMPTS[1][:10])
        out += list(eng.generate([s], _greedy(8)))
        return s.output_ids, eng
    want, _ = two_turns()
    got, eng = two_turns(reuse=2.0)
    assert got == want and _hit_rate(eng) > 0


def test_reuse_with_a_new_sequence_in_a_used_slot(model):
    """A slot freed and taken by another prompt: its resident rows belong to the old sequence."""
    def one_slot(**opts):
        eng = Engine(model, IdTokenizer(), policy="infinigen", max_batch=1, max_seq_len=T,
                     policy_opts=dict(SPARSE, **opts))
        outs = []
        for p in (PROMPTS[0], PROMPTS[1]):
            s = eng.new_sequence(p)
            list(eng.generate([s], _greedy(16)))
            outs.append(s.output_ids)
            eng.release(s)
        return outs, eng
    want, _ = one_slot()
    got, eng = one_slot(reuse=2.0)
    assert got == want and _hit_rate(eng) > 0


def _greedy(n):
    from minigen.sampler import SamplingParams
    return SamplingParams(max_new_tokens=n, temperature=0, ignore_eos=True)


def test_reuse_option_checks():
    for bad in (0.5, -1, True, "2"):
        with pytest.raises(ValueError, match="--reuse must be 0"):
            check_policy_opts("infinigen", {"reuse": bad})
    p = argparse.ArgumentParser()
    add_model_args(p)
    with pytest.raises(ValueError, match="--reuse does not apply to --policy dense"):
        policy_opts(p.parse_args(["--reuse", "2"]))
    assert policy_opts(p.parse_args(["--policy", "infinigen", "--reuse", "2"])) == {"reuse": 2.0}


def test_reuse_is_planned(model):
    """The memory plan counts the resident set: rows (K and V), tag and stamp per cache row, loc per token."""
    from minigen.memory import policy_bytes
    cfg = model.config
    base, _ = policy_bytes("infinigen", cfg, torch.float16, 2, 4096, {})
    more, _ = policy_bytes("infinigen", cfg, torch.float16, 2, 4096, {"reuse": 4.0})
    C = 4 * 201                             # 4 x the cap of ceil(0.049 x 4096) = 201 rows per head
    per_head = C * (2 * cfg.head_dim * 2 + 8) + 4096 * 4
    assert more - base == (cfg.num_layers - 2) * 2 * cfg.num_kv_heads * per_head + 2 * cfg.num_kv_heads * 201 * 4 + 4 + 8


@pytest.mark.gpu
def test_reuse_on_cuda_graphs_equals_without():
    """Pinned pool, side streams, captured decode step: greedy tokens with reuse equal those without,
    with and without a limited pool; hits are counted."""
    m = minigen_from_hf(hf(), device="cuda")
    for extra in ({}, dict(cpu_kv_limit=24 / T, evict_window=4)):
        want, _ = greedy(m, "infinigen", PROMPTS, **SPARSE, **extra)
        got, eng = greedy(m, "infinigen", PROMPTS, reuse=2.0, **SPARSE, **extra)
        assert got == want and _hit_rate(eng) > 0


def test_warmup_before_capture_leaves_no_resident_rows(model):
    """The engine's warm-up steps before a CUDA-graph capture (emulated here on the CPU, as _capture
    runs them) fetch rows whose fetches are not counted: the resident set they filled must go, or
    the next steps report hits (and PCIe bytes) that a run without warm-up does not."""
    def run(warm: bool):
        eng = Engine(model, IdTokenizer(), policy="infinigen", max_batch=2, max_seq_len=T,
                     policy_opts=dict(SPARSE, reuse=2.0))
        seqs = [eng.new_sequence(p) for p in PROMPTS[:2]]
        eng.prefill(seqs)
        g = eng._decode_graph(seqs)
        if warm:
            saved = (g.positions.clone(), g.seq_lens.clone(), list(g.host_start))
            eng.kv.warmup(True)
            for _ in range(2):
                eng._decode_forward(g)
            eng.kv.warmup(False)
            g.positions.copy_(saved[0]), g.seq_lens.copy_(saved[1])
            g.host_start = saved[2]
        out = []
        for t in range(4):
            g.tokens.copy_(torch.tensor([5 + t, 9 + t]))
            out.append(eng.decode_step(g).clone())
        return torch.stack(out), eng.kv.stats()
    (want, st0), (got, st1) = run(False), run(True)
    assert torch.equal(got, want)
    assert st1["reuse_hit_rate"] == st0["reuse_hit_rate"] and st1["pcie_bytes"] == st0["pcie_bytes"]
