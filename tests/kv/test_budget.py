"""h2o, window and quest baselines (CPU): budget 1.0 is dense, the kept sets are exactly the
algorithms' (against a direct formula, a brute-force H2O and brute-force Quest page bounds), counts
follow the budget, Triton = reference."""
import subprocess
import sys
from itertools import accumulate
from pathlib import Path

import pytest
import torch

from minigen.kernels.launch import interpreting
from minigen.kernels.ops import Ops
from minigen.kv.budget import kept_count
from minigen.kv.h2o import H2OKV
from minigen.kv.quest import QuestKV
from minigen.kv.window import WindowKV
from minigen.engine import Engine
from minigen.kv.base import StepMeta
from minigen.sampler import SamplingParams
from tests.helpers import (IdTokenizer, assert_close, kv_config, minigen_from_hf, random_prompts, tiny_hf_model,
                           tiny_llama_config, tiny_opt_config)

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = random_prompts(320, (9, 23, 1), seed=4)
POLICIES = ("h2o", "window", "quest")
PAGE = 4    # quest's page in the engine-level tests: prompts of 9-23 tokens span several pages


def with_page(policy, opts):
    return dict(opts, page_size=opts.get("page_size", PAGE)) if policy == "quest" else opts


# ---------------------------------------------------------------------------------------------
# engine-level: tiny random models
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=["llama-gqa", "opt"])
def model(request):
    hf = (tiny_hf_model(tiny_llama_config(num_hidden_layers=4, num_key_value_heads=2)) if request.param == "llama-gqa"
          else tiny_hf_model(tiny_opt_config(num_hidden_layers=4)))
    return minigen_from_hf(hf)


def step_logits(model, policy, prompts, steps=8, max_seq_len=96, cuda_graph=True, max_prefill_tokens=4096,
                phantom=False, **opts):
    """Teacher-forced decode logits: every step's (B, V) logits for a fixed token stream.
    phantom: first run two decode steps and rewind, as the engine's CUDA-graph capture does."""
    eng = Engine(model, IdTokenizer(), policy=policy, max_batch=len(prompts), max_seq_len=max_seq_len,
                 cuda_graph=cuda_graph, max_prefill_tokens=max_prefill_tokens, policy_opts=with_page(policy, opts))
    seqs = [eng.new_sequence(p) for p in prompts]
    out = [eng.prefill(seqs)]
    g = eng._decode_graph(seqs)
    if phantom:
        saved = g.positions.clone(), g.seq_lens.clone(), list(g.host_start)
        with torch.inference_mode():
            eng.kv.warmup(True)
            for t in range(2):
                g.tokens.fill_(100 + t)
                eng._decode_forward(g)
            eng.kv.warmup(False)
        g.positions.copy_(saved[0])
        g.seq_lens.copy_(saved[1])
        g.host_start = saved[2]
    for t in range(steps):
        g.tokens.copy_(torch.tensor([(7 * t + 3 * b) % 300 + 3 for b in range(len(prompts))], device=g.tokens.device))
        out.append(eng.decode_step(g).clone())
        for s in seqs:
            s.cached_ids.append(0)
    return torch.stack(out), eng


def greedy(model, policy, prompts=PROMPTS, steps=32, max_seq_len=96, cuda_graph=True, **opts):
    eng = Engine(model, IdTokenizer(), policy=policy, max_batch=len(prompts), max_seq_len=max_seq_len,
                 cuda_graph=cuda_graph, policy_opts=with_page(policy, opts))
    seqs = [eng.new_sequence(p) for p in prompts]
    for _ in eng.generate(seqs, SamplingParams(max_new_tokens=steps, temperature=0, ignore_eos=True)):
        pass
    return [s.output_ids for s in seqs], eng


@pytest.fixture(scope="module")
def dense_greedy(model):
    return greedy(model, "dense")[0]


@pytest.mark.parametrize("policy", POLICIES)
def test_budget_one_equals_dense(model, dense_greedy, policy):
    got, eng = greedy(model, policy, budget=1.0)
    assert got == dense_greedy
    assert eng.kv.stats() == {"fetched_fraction": 1.0, "kv_budget": 1.0}


@pytest.mark.parametrize("policy", POLICIES)
def test_small_budget_changes_logits(model, policy):
    """budget 1.0 reproduces dense logits; 0.2 really drops tokens (differs from dense)."""
    want, _ = step_logits(model, "dense", PROMPTS)
    full, _ = step_logits(model, policy, PROMPTS, budget=1.0)
    torch.testing.assert_close(full, want, atol=1e-5, rtol=0)
    sparse, _ = step_logits(model, policy, PROMPTS, budget=0.2, dense_layers=1)
    torch.testing.assert_close(sparse[0], want[0], atol=1e-5, rtol=0)   # prefill is dense
    assert (sparse[1:] - want[1:]).abs().max() > 1e-3    # 100x the tolerance budget 1.0 meets


@pytest.mark.parametrize("policy", POLICIES)
def test_rewound_steps_leave_no_trace(model, policy):
    """The CUDA-graph capture's two warm-up steps, then the rewind, on the CPU: the following
    steps equal a run without them (h2o's ring of kept lists; window is stateless), and so does
    fetched_fraction (warmup puts the counts back)."""
    opts = dict(budget=0.3, dense_layers=1)
    want, ref = step_logits(model, policy, PROMPTS, steps=12, **opts)
    got, eng = step_logits(model, policy, PROMPTS, steps=12, phantom=True, **opts)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    assert eng.kv.stats() == ref.kv.stats()


class Recorder:
    """Ops that record every gather's (idx, count): what the sparse attention really reads."""

    def __init__(self, ops):
        self.ops, self.calls = ops, []

    def gather_kv(self, k_pool, v_pool, idx, count, *args, **kw):
        self.calls.append((idx.clone(), count.clone()))
        return self.ops.gather_kv(k_pool, v_pool, idx, count, *args, **kw)

    def __getattr__(self, name):
        return getattr(self.ops, name)


@pytest.mark.parametrize("policy", ("h2o", "window"))
def test_counts_follow_budget_on_long_run(model, policy):
    """Every gather keeps ceil(budget * n) tokens per head; fetched_fraction is exactly their
    share of the cached rows, and close to the budget on a long run."""
    budget, steps, prompts = 0.25, 64, random_prompts(320, (57, 40), seed=1)
    eng = Engine(model, IdTokenizer(), policy=policy, max_batch=2, max_seq_len=128, policy_opts=dict(budget=budget))
    eng.kv.ops = rec = Recorder(eng.kv.ops)
    seqs = [eng.new_sequence(p) for p in prompts]
    for _ in eng.generate(seqs, SamplingParams(max_new_tokens=steps, temperature=0, ignore_eos=True)):
        pass
    Lsp = eng.kv.sparse_layers
    assert len(rec.calls) == (steps - 1) * Lsp
    for i, (_, count) in enumerate(rec.calls):
        n = [len(p) + i // Lsp for p in prompts]
        want = torch.tensor([kept_count(x, budget) for x in n], dtype=torch.int32)[:, None].expand_as(count)
        assert torch.equal(count, want), f"step {i // Lsp}"
    kept = sum(kept_count(len(p) + t, budget) for p in prompts for t in range(steps - 1))
    cached = sum(len(p) + t for p in prompts for t in range(steps - 1))
    frac = eng.kv.stats()["fetched_fraction"]
    assert frac == pytest.approx(kept / cached, abs=1e-12)
    assert abs(frac - budget) < 0.01


@pytest.mark.parametrize("policy", ("h2o", "quest"))
def test_chunked_prefill_equals_one_prefill(model, policy):
    """A prompt fed in prefill chunks (5 tokens: chunks start mid-page for quest's pages of 4) leaves
    the same state as one chunk (h2o's attention mass, quest's page bounds): same kept sets."""
    want, _ = step_logits(model, policy, PROMPTS, budget=0.3, dense_layers=1)
    got, _ = step_logits(model, policy, PROMPTS, budget=0.3, dense_layers=1, max_prefill_tokens=5)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("policy,opts,msg", [
    ("h2o", dict(budget=0.0), r"--budget must be in \(0, 1\]"),
    ("window", dict(budget=1.5), r"--budget must be in \(0, 1\]"),
    ("h2o", dict(dense_layers=4), r"--dense-layers must be in \[0, 3\]"),
    ("window", dict(sinks=-1), "--sinks must be an integer >= 0"),
    ("window", dict(sinks=2.5), "--sinks must be an integer >= 0"),
])
def test_bad_options(model, policy, opts, msg):
    with pytest.raises(ValueError, match=msg):
        Engine(model, IdTokenizer(), policy=policy, max_seq_len=32, policy_opts=opts)


# ---------------------------------------------------------------------------------------------
# kept sets, driving a policy directly with hand-built steps (no model)
# ---------------------------------------------------------------------------------------------
def attention_ref(q, keys, vals, scale):
    """q (G, D) over keys/vals (m, D), float64 -> (out (G, D), probabilities (G, m))."""
    p = (q.double() @ keys.double().T * scale).softmax(-1)
    return p @ vals.double(), p


class Driver:
    """Random q/k/v streams for a policy over L layers; keeps the whole K/V for the references.
    `on_decode(layer, b, n, q, k_cur, v_cur, K, V, out, idx, count)` checks each sparse layer."""

    def __init__(self, policy, num_slots, T, seed=0):
        cfg = policy.num_layers, policy.num_kv_heads, policy.head_dim
        self.pol, (self.L, self.Hkv, self.D), self.G = policy, cfg, policy.group
        self.rec = policy.ops = Recorder(policy.ops)
        policy.allocate(num_slots, T)
        self.K = torch.zeros(self.L, num_slots, self.Hkv, T, self.D)       # (L, S, Hkv, T, D)
        self.V = torch.zeros_like(self.K)
        self.gen = torch.Generator().manual_seed(seed)

    def qkv(self, N):
        r = lambda *s: torch.randn(*s, generator=self.gen) * 2   # noqa: E731  (peaky attention)
        return r(N, self.Hkv * self.G, self.D), r(N, self.Hkv, self.D), r(N, self.Hkv, self.D)

    def prefill(self, slots, starts, news, on_prefill=None):
        pos = [p for s0, n in zip(starts, news) for p in range(s0, s0 + n)]
        tslot = [s for s, n in zip(slots, news) for _ in range(n)]
        i32 = torch.int32
        meta = StepMeta(is_prefill=True, positions=torch.tensor(pos), token_slot=torch.tensor(tslot),
                        slot_idx=torch.tensor(slots, dtype=i32),
                        seq_lens=torch.tensor([a + b for a, b in zip(starts, news)], dtype=i32),
                        cu_seqlens_q=torch.tensor([0, *accumulate(news)], dtype=i32),
                        start_pos=torch.tensor(starts, dtype=i32), max_seqlen_q=max(news),
                        host_slots=list(slots), host_start=list(starts), host_new=list(news))
        self.pol.begin(meta)
        for layer in range(self.L):
            q, k, v = self.qkv(len(pos))
            self.K[layer, tslot, :, pos], self.V[layer, tslot, :, pos] = k, v
            self.pol.attend(layer, q, k, v)
            if on_prefill and layer >= self.pol.dense_layers:
                start = 0
                for b, (s, n0, n) in enumerate(zip(slots, starts, news)):
                    on_prefill(layer, b, n0, q[start:start + n], self.K[layer, s, :, :n0 + n])
                    start += n

    def decode(self, slots, n, on_decode):
        i32, B = torch.int32, len(slots)
        meta = StepMeta(is_prefill=False, positions=torch.tensor(n), token_slot=torch.tensor(slots),
                        slot_idx=torch.tensor(slots, dtype=i32), seq_lens=torch.tensor(n, dtype=i32) + 1,
                        host_slots=list(slots), host_start=list(n), host_new=[1] * B)
        self.pol.begin(meta)
        for layer in range(self.L):
            q, k, v = self.qkv(B)
            self.rec.calls.clear()
            out = self.pol.attend(layer, q, k, v)
            if layer < self.pol.dense_layers:
                assert not self.rec.calls, "a dense layer gathered"
            else:
                (idx, count), = self.rec.calls
                for b, s in enumerate(slots):
                    on_decode(layer, b, n[b], q[b], k[b], v[b], self.K[layer, s, :, :n[b]],
                              self.V[layer, s, :, :n[b]], out[b], idx[b], count[b])
            for b, s in enumerate(slots):
                self.K[layer, s, :, n[b]], self.V[layer, s, :, n[b]] = k[b], v[b]


def check_attention(G, q, k_cur, v_cur, K, V, out, kept_per_head, scale):
    """out (H, D) = attention of each head over its KV head's kept tokens + the current one."""
    probs = []
    for g, kept in enumerate(kept_per_head):
        t = sorted(kept)
        want, p = attention_ref(q[g * G:(g + 1) * G], torch.cat([K[g, t], k_cur[g, None]]),
                                torch.cat([V[g, t], v_cur[g, None]]), scale)
        assert_close(out[g * G:(g + 1) * G], want, atol=1e-5, rtol=1e-5, what="sparse attention output")
        probs.append((t, p.sum(0)))        # summed over the group
    return probs


def kept_sets(idx, count):
    """Per KV head, the set of token indices the gather read (and that they are distinct)."""
    out = []
    for row, c in zip(idx, count.tolist()):
        s = set(row[:c].tolist())
        assert len(s) == c, f"duplicate kept tokens {row[:c].tolist()}"
        out.append(s)
    return out


@pytest.mark.parametrize("budget,sinks", [(0.3, 4), (0.06, 4), (0.5, 0), (0.2, 50), (1.0, 4)])
def test_window_kept_sets_are_sinks_plus_recent(budget, sinks):
    L, Hkv, G, D, T = 3, 2, 3, 8, 80
    pol = WindowKV(kv_config(L, Hkv, G, D), dtype=torch.float32, device="cpu", ops=Ops(use_triton=False),
                   budget=budget, sinks=sinks, dense_layers=1)
    drv, slots, lens = Driver(pol, 3, T), [2, 0], [17, 3]
    drv.prefill(slots, [0, 0], lens)

    def on_decode(layer, b, n, q, k_cur, v_cur, K, V, out, idx, count):
        k = kept_count(n, budget)
        s = min(sinks, k)
        want = set(range(s)) | set(range(n - (k - s), n))
        assert count.tolist() == [k] * Hkv
        assert kept_sets(idx, count) == [want] * Hkv, f"n={n}"
        check_attention(G, q, k_cur, v_cur, K, V, out, [want] * Hkv, pol.sm_scale)

    for _ in range(40):
        drv.decode(slots, lens, on_decode)
        lens = [x + 1 for x in lens]


class H2OSim:
    """Plain H2O, written for clarity: per (layer, sequence) a Python set of kept tokens per KV
    head and the accumulated probability of every cached token (float64)."""

    def __init__(self, budget, Hkv, G, scale, T):
        self.budget, self.Hkv, self.G, self.scale, self.T = budget, Hkv, G, scale, T
        self.kept, self.acc = {}, {}

    def prefill(self, key, n0, q, K):
        """q (n, H, D) at positions n0.., K (Hkv, n0 + n, D): dense causal attention adds its
        probabilities to acc (positions >= n0 start over), then the kept sets are rebuilt."""
        A = self.acc.setdefault(key, torch.zeros(self.Hkv, self.T, dtype=torch.float64))
        A[:, n0:] = 0
        total = K.shape[1]
        for i in range(q.shape[0]):
            seen = K[:, :n0 + i + 1]                                   # causal: up to this query
            for g in range(self.Hkv):
                _, p = attention_ref(q[i, g * self.G:(g + 1) * self.G], seen[g], seen[g], self.scale)
                A[g, :n0 + i + 1] += p.sum(0)
        k = kept_count(total, self.budget)
        r = (k + 1) // 2
        heavy = [A[g, :total - r].argsort(descending=True)[:k - r].tolist() for g in range(self.Hkv)]
        self.kept[key] = [set(h) | set(range(total - r, total)) for h in heavy]

    def decode(self, key, n, probs):
        """probs: per KV head (kept tokens sorted, group-summed probabilities incl. the current
        token last). Accumulate, join, evict the lowest acc outside the recent window."""
        A = self.acc[key]
        k_next = kept_count(n + 1, self.budget)
        recent = n + 1 - (k_next + 1) // 2
        for g, (t, p) in enumerate(probs):
            A[g, t] += p[:-1]
            A[g, n] = p[-1]
            kept = self.kept[key][g]
            kept.add(n)
            if len(kept) > k_next:
                kept.remove(min((x for x in kept if x < recent), key=lambda x: A[g, x].item()))


@pytest.mark.parametrize("G,budget", [(3, 0.3), (2, 0.45), (1, 0.17)])
def test_h2o_kept_sets_match_bruteforce(G, budget):
    """The policy's kept sets (what its gathers read) and outputs equal a brute-force H2O over
    the same q/k/v stream: a ragged batch, 20 steps, a chat-like continued prefill (one sequence
    drops its last 3 tokens first), 12 steps, a new sequence in a used slot, 8 steps."""
    L, Hkv, D, T = 3, 2, 8, 80
    pol = H2OKV(kv_config(L, Hkv, G, D), dtype=torch.float32, device="cpu", ops=Ops(use_triton=False),
                budget=budget, dense_layers=1)
    sim = H2OSim(budget, Hkv, G, pol.sm_scale, T)
    drv, slots, lens = Driver(pol, 3, T, seed=G), [2, 0], [13, 7]

    def on_prefill(layer, b, n0, q, K):
        sim.prefill((layer, b), n0, q, K)

    def on_decode(layer, b, n, q, k_cur, v_cur, K, V, out, idx, count):
        assert count.tolist() == [kept_count(n, budget)] * Hkv
        want = sim.kept[(layer, b)]
        assert kept_sets(idx, count) == want, f"layer {layer} seq {b} n={n}"
        sim.decode((layer, b), n, check_attention(G, q, k_cur, v_cur, K, V, out, want, pol.sm_scale))

    drv.prefill(slots, [0, 0], lens, on_prefill)
    evicted = 0
    for _ in range(20):
        drv.decode(slots, lens, on_decode)
        evicted += sum(kept_count(n + 1, budget) == kept_count(n, budget) for n in lens)
        lens = [x + 1 for x in lens]
    assert evicted > 5     # the eviction path really ran
    starts = [lens[0] - 3, lens[1]]
    drv.prefill(slots, starts, [16, 3], on_prefill)
    lens = [starts[0] + 16, starts[1] + 3]
    for _ in range(12):
        drv.decode(slots, lens, on_decode)
        lens = [x + 1 for x in lens]
    # a new sequence takes the second slot (nothing of the old one may leak into it)
    drv.prefill(slots[1:], [0], [9], lambda layer, b, n0, q, K: on_prefill(layer, 1, n0, q, K))
    lens[1] = 9
    for _ in range(8):
        drv.decode(slots, lens, on_decode)
        lens = [x + 1 for x in lens]


# ---------------------------------------------------------------------------------------------
# kernels, CLI, GPU
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("policy", POLICIES)
def test_policy_triton_kernels_interpreted(policy):
    """gather_kv over the GPU-resident (here CPU) cache and sparse_attention, as Triton kernels
    under the interpreter, against the same policy on the torch references."""
    if not interpreting():
        pytest.skip("set TRITON_INTERPRET=1 to run Triton kernels on the CPU")
    hf = tiny_hf_model(tiny_llama_config(num_hidden_layers=3, num_key_value_heads=2))
    prompts, opts = random_prompts(320, (7, 4), seed=6), dict(budget=0.4, dense_layers=1)
    want, _ = step_logits(minigen_from_hf(hf), policy, prompts, steps=3, max_seq_len=32, **opts)
    got, _ = step_logits(minigen_from_hf(hf, use_triton=True), policy, prompts, steps=3, max_seq_len=32, **opts)
    torch.testing.assert_close(got, want, atol=1e-3, rtol=0)


def test_chat_cli_runs():
    r = subprocess.run([sys.executable, "-m", "minigen.chat", "--policy", "h2o", "--budget", "0.5", "--prompt", "hi",
                        "--max-new-tokens", "4", "--temperature", "0", "--stats"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() and "fetched" in r.stderr


def test_cli_flags_reach_the_policy(model):
    """--budget/--sinks from the command line end up in the policy (no model load: cheap)."""
    import argparse

    from minigen.cli import add_model_args, policy_opts
    p = argparse.ArgumentParser()
    add_model_args(p)
    opts = policy_opts(p.parse_args(["--policy", "window", "--budget", "0.5", "--sinks", "2"]))
    kv = Engine(model, IdTokenizer(), policy="window", max_seq_len=32, policy_opts=opts).kv
    assert (kv.name, kv.budget, kv.sinks) == ("window", 0.5, 2)
    with pytest.raises(ValueError, match="--sinks"):
        policy_opts(p.parse_args(["--policy", "h2o", "--sinks", "2"]))


@pytest.mark.gpu
@pytest.mark.parametrize("policy", POLICIES)
def test_cuda_graph_decode_equals_eager(policy):
    """On CUDA the engine captures decode steps (after two warm-up steps it rewinds): the
    replayed steps equal uncaptured ones, evictions included, and greedy tokens match."""
    hf = tiny_hf_model(tiny_llama_config(num_hidden_layers=4, num_key_value_heads=2))
    model = minigen_from_hf(hf, device="cuda")
    opts = dict(budget=0.3, dense_layers=1)
    want, eager = step_logits(model, policy, PROMPTS, steps=24, cuda_graph=False, **opts)
    got, eng = step_logits(model, policy, PROMPTS, steps=24, **opts)
    assert eng.use_graph and not eager.use_graph
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert (got[1:] - step_logits(model, "dense", PROMPTS, steps=24)[0][1:]).abs().max() > 1e-3
    assert greedy(model, policy, **opts)[0] == greedy(model, policy, cuda_graph=False, **opts)[0]


def quest_count(n, budget, P):
    """Quest's kept tokens for n cached ones: the newest page (r tokens) + whole pages within k(n)."""
    r = n - P * ((n - 1) // P)
    return max(kept_count(n, budget) - r, 0) // P * P + r


def test_quest_counts_follow_budget_on_long_run(model):
    """Every gather keeps the newest page plus floor((k - r) / P) whole pages; fetched_fraction is
    their share of the cached rows, within a page of the budget on a long run."""
    budget, steps, prompts, P = 0.25, 64, random_prompts(320, (57, 40), seed=1), 4
    eng = Engine(model, IdTokenizer(), policy="quest", max_batch=2, max_seq_len=128,
                 policy_opts=dict(budget=budget, page_size=P))
    eng.kv.ops = rec = Recorder(eng.kv.ops)
    seqs = [eng.new_sequence(p) for p in prompts]
    for _ in eng.generate(seqs, SamplingParams(max_new_tokens=steps, temperature=0, ignore_eos=True)):
        pass
    Lsp = eng.kv.sparse_layers
    for i, (_, count) in enumerate(rec.calls):
        n = [len(p) + i // Lsp for p in prompts]
        want = torch.tensor([quest_count(x, budget, P) for x in n], dtype=torch.int32)[:, None].expand_as(count)
        assert torch.equal(count, want), f"step {i // Lsp}"
    kept = sum(quest_count(len(p) + t, budget, P) for p in prompts for t in range(steps - 1))
    cached = sum(len(p) + t for p in prompts for t in range(steps - 1))
    assert eng.kv.stats()["fetched_fraction"] == pytest.approx(kept / cached, abs=1e-12)
    assert budget - 0.05 < kept / cached <= budget + 1e-9


@pytest.mark.parametrize("G,budget,P", [(3, 0.3, 4), (1, 0.5, 5), (2, 0.12, 3), (3, 1.0, 4)])
def test_quest_kept_sets_match_bruteforce(G, budget, P):
    """Each KV head keeps the newest page and the whole pages with the largest upper bound
    sum_d max(q_d min_d, q_d max_d) (the max over its query heads), from bounds recomputed from
    the keys in float64; the attention is over exactly those tokens."""
    L, Hkv, D, T = 3, 2, 8, 80
    pol = QuestKV(kv_config(L, Hkv, G, D), dtype=torch.float32, device="cpu", ops=Ops(use_triton=False),
                  budget=budget, dense_layers=1, page_size=P)
    drv, slots, lens = Driver(pol, 3, T, seed=3), [2, 0], [17, 6]
    drv.prefill(slots, [0, 0], lens)

    def on_decode(layer, b, n, q, k_cur, v_cur, K, V, out, idx, count):
        r = n - P * ((n - 1) // P)
        full = (n - r) // P
        pages = K[:, :full * P].double().view(Hkv, full, P, D)
        lo, hi = pages.amin(2), pages.amax(2)                          # (Hkv, full, D)
        qg = q.double().view(Hkv, G, D)
        bound = (torch.maximum(qg[:, :, None] * lo[:, None], qg[:, :, None] * hi[:, None])).sum(-1).amax(1)
        keep = max(kept_count(n, budget) - r, 0) // P
        got = kept_sets(idx, count)
        for g in range(Hkv):
            want = set(range(n - r, n))
            if keep:
                top = bound[g].topk(keep).indices.tolist()
                want |= {p * P + i for p in top for i in range(P)}
            assert got[g] == want, f"layer {layer} seq {b} head {g}: n={n}"
        check_attention(G, q, k_cur, v_cur, K, V, out, got, pol.sm_scale)
    for step in range(10):
        drv.decode(slots, [x + step for x in lens], on_decode)
    # the bounds the policy keeps are the pages' min / max of everything cached
    for layer in range(1, L):
        for s, n in zip(slots, [x + 10 for x in lens]):
            npg = -(-n // P)
            keys = torch.cat([drv.K[layer, s, :, :n], torch.full((Hkv, npg * P - n, D), float("nan"))], 1)
            keys = keys.view(Hkv, npg, P, D)
            want_lo = torch.where(keys.isnan(), float("inf"), keys).amin(2)
            assert torch.equal(pol.kmin[layer - 1, s, :, :npg], want_lo)
