"""infinigen with a host KV limit (cpu_kv_limit): the pool keeps P rows per (layer, slot) and
evicts by counter or FIFO outside a recent window (CPU, tiny random Llama, fp32)."""
import argparse

import pytest
import torch

from minigen.cli import add_model_args, policy_opts
from minigen.engine import Engine
from minigen.kv.eviction import parse_cpu_kv_limit
from minigen.kv.infinigen import InfiniGenKV
from tests.helpers import IdTokenizer, minigen_from_hf, random_prompts, tiny_hf_model, tiny_llama_config
from tests.helpers import EXACT, PROMPTS, greedy, step_logits

T = 96                                   # max_seq_len of the test_offload helpers
SPARSE = dict(alpha=2.0, budget=0.5)     # selections vary, so counters differ between rows


@pytest.fixture(scope="module")
def model():
    # 4 layers, 1 dense: three pooled layers; GQA (4 query heads over 2 KV heads)
    return minigen_from_hf(tiny_hf_model(tiny_llama_config(num_hidden_layers=4, num_key_value_heads=2)))


def row_bytes(model, num_slots):
    """Host bytes of P = 1 over the pooled layers (dense_layers=1) for num_slots sequences."""
    cfg = model.config
    return 2 * (cfg.num_layers - 1) * cfg.num_kv_heads * cfg.head_dim * 4 * num_slots


# ---- (1) a limit that is never reached changes nothing --------------------------------------
@pytest.mark.parametrize("opts", [EXACT, SPARSE])
def test_limit_above_context_equals_unlimited(model, opts):
    opts = dict(opts, dense_layers=1)
    # a limited pool runs without the recent window (its default there), so compare with recent=0
    want, _ = step_logits(model, "infinigen", PROMPTS, steps=12, recent=0, **opts)
    # 64 rows < 96 slot tokens: the limited (row-indexed) path runs, but 23 + 12 tokens never fill it
    for limit in (64 / T, 64 * row_bytes(model, len(PROMPTS))):
        got, eng = step_logits(model, "infinigen", PROMPTS, steps=12, cpu_kv_limit=limit, evict_window=4, **opts)
        assert eng.kv.limited and eng.kv.pool.k.shape[2] == 64 and eng.kv.pk.shape[4] == 64
        torch.testing.assert_close(got, want, atol=0, rtol=0)
    toks, _ = greedy(model, "infinigen", PROMPTS, recent=0, **opts)
    toks_lim, eng = greedy(model, "infinigen", PROMPTS, cpu_kv_limit=64 / T, evict_window=4, **opts)
    assert toks_lim == toks
    assert eng.kv.stats()["host_kv_tokens"] == 64


def test_limit_of_whole_pool_is_unlimited(model):
    _, eng = step_logits(model, "infinigen", PROMPTS, steps=2, cpu_kv_limit=1.0, dense_layers=1)
    assert not eng.kv.limited and eng.kv.pool.k.shape[2] == T


# ---- (2), (3) eviction ------------------------------------------------------------------------
P, W, STEPS = 24, 4, 40


def run_limited(model, evict):
    """Prompts of 30 (> P: prefill keeps 20 + 4) and 9 tokens, 40 teacher-forced decode steps with
    P = 24, W = 4; records every victim choice and counter update, and the invariants per step."""
    prompts = random_prompts(320, (30, 9), seed=3)
    eng = Engine(model, IdTokenizer(), policy="infinigen", max_batch=2, max_seq_len=T,
                 policy_opts=dict(SPARSE, dense_layers=1, cpu_kv_limit=P / T, evict_window=W, evict=evict))
    ref = Engine(model, IdTokenizer(), policy="infinigen", max_batch=2, max_seq_len=T,
                 policy_opts=dict(SPARSE, dense_layers=1))
    kv = eng.kv
    assert kv.limited and kv.rows == P and kv.graph_safe
    choices, updates = [], []
    decode_rows, speculate = kv._decode_rows, kv._speculate

    def rec_rows(j):
        slots = kv.meta.token_slot
        before = (kv.evictor.counter[j][slots].clone(), kv.evictor.row_pos[j][slots].clone())
        rows = decode_rows(j)
        choices.append((j, *before, kv.meta.positions.clone(), kv.meta.seq_lens.clone(), rows.clone()))
        return rows

    def rec_spec(i, h):
        j = i - kv.dense_layers
        before = kv.evictor.counter[j].clone()
        speculate(i, h)
        B = h.shape[0]
        updates.append((j, before, kv.evictor.counter[j].clone(), kv.idx[i % 2, :B].clone(), kv.count[i % 2, :B].clone()))

    kv._decode_rows, kv._speculate = rec_rows, rec_spec
    seqs = [eng.new_sequence(p) for p in prompts]
    rseqs = [ref.new_sequence(p) for p in prompts]
    eng.prefill(seqs)
    ref.prefill(rseqs)
    # prefill kept the first P - W and last W tokens of the long prompt, all of the short one
    live = [[set(kv.evictor.row_pos[j, b][kv.evictor.row_pos[j, b] >= 0].tolist()) for b in range(2)] for j in range(kv.pool_layers)]
    for j in range(kv.pool_layers):
        assert live[j][0] == set(range(P - W)) | set(range(30 - W, 30))
        assert live[j][1] == set(range(9))
        assert not kv.evictor.counter[j].any()                                  # kept rows start at 0
    evicted = [[set(), set()] for _ in range(kv.pool_layers)]
    stored = [[set(range(30)) - set(range(P - W, 30 - W)), set(range(9))] for _ in range(kv.pool_layers)]
    g, rg = eng._decode_graph(seqs), ref._decode_graph(rseqs)
    for t in range(STEPS):
        tok = torch.tensor([(7 * t + 3 * b) % 300 + 3 for b in range(2)])
        g.tokens.copy_(tok)
        rg.tokens.copy_(tok)
        eng.decode_step(g)
        ref.decode_step(rg)
        for s in seqs + rseqs:
            s.cached_ids.append(0)
        assert kv.pool.k.shape[2] == P and kv.pk.shape[4] == P          # never more than the limit
        for j in range(kv.pool_layers):
            for b, s in enumerate(seqs):
                c = s.num_cached                                      # positions 0..c-1 seen so far
                rp = kv.evictor.row_pos[j, s.slot]
                now = rp[rp >= 0].tolist()
                assert len(now) == len(set(now)) == min(c, P)          # no token stored twice
                now = set(now)
                assert set(range(max(0, c - 1 - W), c)) <= now         # the window and the new token
                assert kv.evictor.counter[j, s.slot][rp == c - 1].tolist() == [0]   # the new token's counter
                stored[j][b].add(c - 1)
                gone = live[j][b] - now
                assert len(gone) == (1 if c - 1 >= P else 0)           # one eviction per step once full
                assert not gone & evicted[j][b] and not now & evicted[j][b]   # none evicted twice
                evicted[j][b] |= gone
                assert now == stored[j][b] - evicted[j][b]             # every live row a stored token
                live[j][b] = now
    # rows hold the tokens they claim: the first pooled layer's K depends on the dense layer only,
    # so it equals the unlimited run's K at the recorded position
    for s in seqs:
        rp = kv.evictor.row_pos[0, s.slot]
        torch.testing.assert_close(kv.pool.k[0, s.slot], ref.kv.pool.k[0, s.slot, rp], atol=0, rtol=0)
    return kv, choices, updates


def brute_force_victim(counter, row_pos, pos, evict):
    """The victim row on the host: live, older than the window, min (counter, position) / min position."""
    best = None
    for r in range(len(row_pos)):
        p = int(row_pos[r])
        if p < 0 or p >= pos - W:
            continue
        key = (int(counter[r]), p) if evict == "counter" else (p,)
        if best is None or key < best[0]:
            best = (key, r)
    return best[1]


@pytest.mark.parametrize("evict", ["counter", "fifo"])
def test_eviction_choices(model, evict):
    kv, choices, updates = run_limited(model, evict)
    n_evict = n_not_oldest = 0
    for j, counter, row_pos, pos, seq_lens, rows in choices:
        for b in range(len(rows)):
            if int(seq_lens[b]) - 1 < P:                               # free rows: row = position
                assert int(rows[b]) == int(pos[b])
                continue
            n_evict += 1
            want = brute_force_victim(counter[b], row_pos[b], int(pos[b]), evict)
            assert int(rows[b]) == want
            oldest = brute_force_victim(counter[b], row_pos[b], int(pos[b]), "fifo")
            n_not_oldest += int(rows[b]) != oldest
    assert n_evict > 30
    if evict == "counter":
        assert n_not_oldest > 0        # the counters made a difference
        # each step adds, per row, the number of KV heads that selected it
        for j, before, after, idx, count in updates:
            want = before.clone()
            for b, slot in enumerate(kv.meta.host_slots):
                for g in range(idx.shape[1]):
                    for r in idx[b, g, :count[b, g]].tolist():
                        want[slot, r] += 1
            assert torch.equal(after, want)
    else:
        assert n_not_oldest == 0


def test_fifo_keeps_the_most_recent(model):
    kv, _, _ = run_limited(model, "fifo")
    for j in range(kv.pool_layers):
        for slot in kv.meta.host_slots:
            rp = kv.evictor.row_pos[j, slot]
            c = int(rp.max()) + 1
            assert sorted(rp.tolist()) == list(range(c - P, c))


def test_generation_runs_past_the_limit(model):
    out, eng = greedy(model, "infinigen", PROMPTS, cpu_kv_limit=P / T, evict_window=W, dense_layers=1, **SPARSE)
    assert [len(o) for o in out] == [32] * len(PROMPTS)
    assert 0 < eng.kv.stats()["fetched_fraction"] <= 1.0


def test_continued_prefill(model):
    """A chat turn that still fits in P rows equals the unlimited policy; one past P is refused."""
    def two_turns(second, **opts):
        eng = Engine(model, IdTokenizer(), policy="infinigen", max_batch=1, max_seq_len=T,
                     policy_opts=dict(SPARSE, dense_layers=1, **opts))
        s = eng.new_sequence(PROMPTS[0])
        eng.prefill([s])
        s.pending = list(second)
        return eng.prefill([s], all_logits=True)[0]
    torch.testing.assert_close(two_turns(PROMPTS[1][:10], cpu_kv_limit=P / T, evict_window=W),
                               two_turns(PROMPTS[1][:10]), atol=0, rtol=0)
    with pytest.raises(NotImplementedError, match="host KV limit of 24 tokens"):
        two_turns(PROMPTS[1], cpu_kv_limit=P / T, evict_window=W)


def test_prompt_past_the_limit_is_prefilled_whole(model):
    """With prefill chunks shorter than a prompt that exceeds the pool (30 tokens > P = 24 rows,
    chunks of 8), the engine gives that prompt one chunk of its own (the rows it drops could not
    come back to a later chunk); the shorter prompt is chunked as usual. Same logits as one chunk."""
    prompts = random_prompts(320, (9, 30), seed=5)
    opts = dict(SPARSE, dense_layers=1, cpu_kv_limit=P / T, evict_window=W)
    want, _ = step_logits(model, "infinigen", prompts, steps=6, **opts)
    chunks = []
    begin = InfiniGenKV.begin

    def record(kv, meta):
        if meta.is_prefill:
            chunks.append(list(zip(meta.host_slots, meta.host_start, meta.host_new)))
        begin(kv, meta)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(InfiniGenKV, "begin", record)
        got, eng = step_logits(model, "infinigen", prompts, steps=6, max_prefill_tokens=8, **opts)
    assert eng.kv.whole_prompt_over == P
    # slot 0 (9 tokens): 8 + 1; slot 1 (30 tokens) waits for a chunk of its own
    assert chunks == [[(0, 0, 8)], [(0, 8, 1)], [(1, 0, 30)]]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def _pool_state(kv):
    return [t.clone() for t in (kv.pool.k, kv.pool.v, kv.pk, kv.evictor.counter, kv.evictor.row_pos)]


def _decode_steps(eng, g, seqs, steps):
    """`steps` teacher-forced decode steps of two sequences: their (steps, 2, V) logits."""
    logits = []
    for t in range(steps):
        g.tokens.copy_(torch.tensor([5 + t, 9 + 2 * t]))
        logits.append(eng.decode_step(g).clone())
        for s in seqs:
            s.cached_ids.append(0)
    return torch.stack(logits)


@pytest.mark.parametrize("window,select", [(W, SPARSE),
                                           # no window, every row selected alike: both warm-up
                                           # steps overwrite row 0, so the restore order matters
                                           (0, dict(alpha=float("inf"), budget=1.0))])
def test_warmup_leaves_a_full_pool_as_it_was(model, window, select):
    """The engine's graph capture runs two decode steps first (kv.warmup(True) ... warmup(False)
    around them); on a full pool each overwrites a victim row per layer and sequence. warmup puts
    the rows, partial keys, counters, row positions and fetch counts back, so the steps after it
    are those of a run without warm-up."""
    prompts = random_prompts(320, (30, 26), seed=6)       # both past P = 24: the pool is full
    opts = dict(select, dense_layers=1, cpu_kv_limit=P / T, evict_window=window)

    def run(warm: bool, hooks: bool = True):
        eng = Engine(model, IdTokenizer(), policy="infinigen", max_batch=2, max_seq_len=T, policy_opts=opts)
        seqs = [eng.new_sequence(p) for p in prompts]
        eng.prefill(seqs)
        g = eng._decode_graph(seqs)
        before = _pool_state(eng.kv)
        if warm:                                          # what Engine._capture does on CUDA
            saved = (g.positions.clone(), g.seq_lens.clone(), list(g.host_start))
            eng.kv.warmup(True) if hooks else None
            for _ in range(2):
                eng._decode_forward(g)
            eng.kv.warmup(False) if hooks else None
            g.positions.copy_(saved[0]), g.seq_lens.copy_(saved[1])
            g.host_start = saved[2]
        after = _pool_state(eng.kv)
        if warm and hooks:
            assert eng.kv._num_fetched.item() == 0 and eng.kv._num_candidates.item() == 0
        return before, after, _decode_steps(eng, g, seqs, 6), eng.kv.stats()

    before, after, got, stats = run(warm=True)
    for a, b in zip(before, after):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    _, _, want, want_stats = run(warm=False)
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    assert stats == want_stats
    before, after, _, _ = run(warm=True, hooks=False)     # the premise: the warm-up steps do evict
    assert not all(torch.equal(a, b) for a, b in zip(before, after))


# ---- (4) options -------------------------------------------------------------------------------
@pytest.mark.parametrize("text,want", [("2000000000", 2000000000), ("2G", 2 * 2**30), ("512M", 512 * 2**20),
                                       ("0.5", 0.5), ("1.0", 1.0), (0.25, 0.25), (4096, 4096)])
def test_parse_cpu_kv_limit(text, want):
    got = parse_cpu_kv_limit(text)
    assert got == want and type(got) is type(want)


@pytest.mark.parametrize("text", ["abc", "", "0", "-5", "1.5", "0.0", "-0.5", "G", "nan"])
def test_parse_cpu_kv_limit_invalid(text):
    with pytest.raises(ValueError, match="--cpu-kv-limit"):
        parse_cpu_kv_limit(text)


def test_policy_opts_cpu_kv_limit():
    ns = dict(alpha=None, budget=None, partial_ratio=None, dense_layers=None, sinks=None)
    assert policy_opts(argparse.Namespace(policy="infinigen", cpu_kv_limit="0.5", **ns)) == {"cpu_kv_limit": 0.5}
    assert policy_opts(argparse.Namespace(policy="infinigen", cpu_kv_limit="2G", **ns)) == {"cpu_kv_limit": 2**31}
    with pytest.raises(ValueError, match="does not apply to --policy offload"):
        policy_opts(argparse.Namespace(policy="offload", cpu_kv_limit="0.5", **ns))
    with pytest.raises(ValueError, match="--cpu-kv-limit"):
        policy_opts(argparse.Namespace(policy="infinigen", cpu_kv_limit="lots", **ns))


def test_policy_opts_evict(model):
    p = argparse.ArgumentParser()
    add_model_args(p)
    opts = policy_opts(p.parse_args(["--policy", "infinigen", "--cpu-kv-limit", "0.5", "--recent", "0", "--evict", "fifo"]))
    assert opts == {"cpu_kv_limit": 0.5, "recent": 0, "evict": "fifo"}
    assert Engine(model, IdTokenizer(), policy="infinigen", max_seq_len=256, policy_opts=opts).kv.evict == "fifo"
    assert Engine(model, IdTokenizer(), policy="infinigen", max_seq_len=256,
                  policy_opts=dict(cpu_kv_limit=0.5)).kv.evict == "counter"
    with pytest.raises(ValueError, match="does not apply to --policy h2o"):
        policy_opts(p.parse_args(["--policy", "h2o", "--evict", "fifo"]))
    with pytest.raises(SystemExit):                                        # argparse: not a choice
        p.parse_args(["--policy", "infinigen", "--evict", "lru"])
    # without a limit nothing is ever overwritten: asking for a rule is an error, not ignored
    with pytest.raises(ValueError, match="needs --cpu-kv-limit"):
        Engine(model, IdTokenizer(), policy="infinigen", max_seq_len=256,
               policy_opts=policy_opts(p.parse_args(["--policy", "infinigen", "--evict", "counter"])))


@pytest.mark.parametrize("opts,msg", [
    (dict(cpu_kv_limit=0.05), "fewer than the eviction window"),          # 4 rows < 64 + 1
    (dict(cpu_kv_limit=1000), "fewer than the eviction window"),          # bytes: 0 rows
    (dict(cpu_kv_limit=2.0), "must be in \\(0, 1\\]"),
    (dict(cpu_kv_limit=0.5, evict="lru"), "evict must be one of"),
    (dict(cpu_kv_limit=0.5, evict_window=-1), "evict_window must be"),
])
def test_bad_limit_options(model, opts, msg):
    with pytest.raises(ValueError, match=msg):
        Engine(model, IdTokenizer(), policy="infinigen", max_seq_len=T, policy_opts=opts)


def test_recent_with_limit_is_refused(model):
    with pytest.raises(NotImplementedError, match="--recent with --cpu-kv-limit"):
        Engine(model, IdTokenizer(), policy="infinigen", max_seq_len=T, policy_opts=dict(cpu_kv_limit=0.5, recent=4))


def test_offload_refuses_limit(model):
    with pytest.raises(ValueError, match="policy 'offload' does not take cpu_kv_limit \\(it takes: fetch\\)"):
        Engine(model, IdTokenizer(), policy="offload", max_seq_len=T, policy_opts=dict(cpu_kv_limit=0.5))


@pytest.mark.gpu
def test_limited_pool_runs_on_cuda():
    """Pinned P-row pool, side stream and counters on the GPU: a limit above the context equals
    the unlimited policy; a tight limit runs and keeps distinct live rows."""
    hf = tiny_hf_model(tiny_llama_config(num_hidden_layers=4, num_key_value_heads=2))
    m = minigen_from_hf(hf, device="cuda")
    opts = dict(SPARSE, dense_layers=1)
    want, _ = step_logits(m, "infinigen", PROMPTS, steps=12, recent=0, **opts)   # a limited pool: recent 0
    got, eng = step_logits(m, "infinigen", PROMPTS, steps=12, cpu_kv_limit=64 / T, evict_window=4, **opts)
    assert eng.kv.limited and eng.kv.pool.k.is_pinned()
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    out, eng = greedy(m, "infinigen", PROMPTS, cpu_kv_limit=P / T, evict_window=W, **opts)
    assert all(len(o) == 32 for o in out)
    for rows in eng.kv.evictor.row_pos.cpu().reshape(-1, P):     # (layer, slot) rows
        live = rows[rows >= 0]
        assert live.unique().numel() == live.numel()


@pytest.mark.gpu
def test_limited_pool_captured_equals_uncaptured():
    """A full limited pool on CUDA: the captured decode step (its warm-up undone by warmup) gives
    the logits, row positions and counters of the same steps run without a graph."""
    hf = tiny_hf_model(tiny_llama_config(num_hidden_layers=4, num_key_value_heads=2))
    m = minigen_from_hf(hf, device="cuda")
    prompts = random_prompts(320, (30, 26), seed=6)
    opts = dict(SPARSE, dense_layers=1, cpu_kv_limit=P / T, evict_window=W)

    def run(graph: bool):
        eng = Engine(m, IdTokenizer(), policy="infinigen", max_batch=2, max_seq_len=T, cuda_graph=graph,
                     policy_opts=opts)
        seqs = [eng.new_sequence(p) for p in prompts]
        eng.prefill(seqs)
        g = eng._decode_graph(seqs)
        assert (g.graph is not None) == graph
        return _decode_steps(eng, g, seqs, 12), eng.kv.evictor.row_pos.cpu(), eng.kv.evictor.counter.cpu()

    got, want = run(True), run(False)
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=0)
    assert torch.equal(got[1], want[1]) and torch.equal(got[2], want[2])

