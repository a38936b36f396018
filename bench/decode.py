"""End-to-end decode benchmark: ms per decode step, tokens/s and achieved GB/s against the HBM
copy ceiling measured in the same run, with transformers' decode of the same shape side by side.

    python bench/decode.py --shape llama2-7b --batch 1 --context 8192 --steps 64 --json
    python bench/decode.py --model path/to/model.gguf --batch 8 --context 8192 --transformers none

The KV cache is filled with random values up to `--context` tokens (decode cost does not depend
on the values), then `--steps` decode steps are timed with CUDA events:
  step_ms   replay of the captured decode step (model + KV policy) alone
  loop_ms   the engine's full loop per step: step + sampling + the host sync for streaming
Bytes per step = weights read (embedding table excluded: only B rows are read) + K/V read for
every sequence; the floor is bytes / measured HBM copy bandwidth (read + write counted).
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import sys
import time
from pathlib import Path

import torch

from minigen.config import ModelConfig
from minigen.kv import POLICIES
from minigen.kv.offload import FETCHES

SHAPES = {   # Hugging Face config fields of real models, weights random
    "llama2-7b": dict(model_type="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                      num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                      max_position_embeddings=32768, rms_norm_eps=1e-5, rope_theta=10000.0),
    "llama2-13b": dict(model_type="llama", vocab_size=32000, hidden_size=5120, intermediate_size=13824,
                       num_hidden_layers=40, num_attention_heads=40, num_key_value_heads=40,
                       max_position_embeddings=32768, rms_norm_eps=1e-5, rope_theta=10000.0),
    "llama3-8b": dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                      num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                      max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0),
    "smollm2-135m": dict(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0,
                         tie_word_embeddings=True),
    "opt-13b": dict(model_type="opt", vocab_size=50272, hidden_size=5120, ffn_dim=20480,
                    num_hidden_layers=40, num_attention_heads=40, max_position_embeddings=32768,
                    word_embed_proj_dim=5120, do_layer_norm_before=True, activation_function="relu"),
}


# policies whose decode reads state that a prefill builds (which tokens are kept, accumulated
# attention): timed after a real prefill of random tokens instead of a random-filled cache
PREFILLED = ("h2o", "window")


class _NoTokenizer:
    eos_ids: list[int] = []


# ---------------------------------------------------------------------------------------------
# ceilings
# ---------------------------------------------------------------------------------------------
def hbm_copy_gbps(nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth, bytes read + written per second (GB/s)."""
    from triton.testing import do_bench
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=50, rep=200, return_mode="median")
    del src, dst
    return 2 * nbytes / ms / 1e6


# ---------------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------------
def shape_config(shape: str, max_seq_len: int) -> tuple[ModelConfig, dict]:
    """The ModelConfig and Hugging Face fields of a named shape whose context holds max_seq_len."""
    hf = dict(SHAPES[shape])
    hf["max_position_embeddings"] = max(hf["max_position_embeddings"], max_seq_len)
    return ModelConfig.from_hf(hf), hf


def random_model(shape: str, dtype: torch.dtype, max_seq_len: int):
    """minigen model of a named shape with random weights, built on the GPU."""
    from minigen.models import build_model, model_class
    cfg, hf = shape_config(shape, max_seq_len)
    with torch.device("meta"):
        names = [(n, p.shape) for n, p in model_class(cfg)(cfg).named_parameters()]
    gen = torch.Generator(device="cuda").manual_seed(0)

    def tensors():
        for n, shp in names:
            if n == "lm_head.weight" and cfg.tie_embeddings:
                continue
            t = torch.empty(shp, dtype=dtype, device="cuda")
            if n.endswith("norm.weight") or "layer_norm.weight" in n:
                t.fill_(1.0)
            else:
                t.normal_(0, 0.02, generator=gen)
            yield n, t
    return build_model(cfg, tensors(), device="cuda", dtype=dtype), hf


def hf_shape_of(cfg: ModelConfig) -> dict | None:
    """Hugging Face config fields of a loaded model's shape (for the transformers baselines)."""
    if cfg.arch != "llama":
        return None
    return dict(model_type="llama", vocab_size=cfg.vocab_size, hidden_size=cfg.dim,
                intermediate_size=cfg.hidden_dim, num_hidden_layers=cfg.num_layers,
                num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
                head_dim=cfg.head_dim, max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
                rope_theta=cfg.rope_theta, tie_word_embeddings=cfg.tie_embeddings)


def weight_bytes(model) -> int:
    """Bytes of weights a decode step reads (the input embedding table is gathered, not read)."""
    seen, total = set(), 0
    emb = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        if id(p) in emb and p is not getattr(model.lm_head, "weight", None):
            continue
        total += p.numel() * p.element_size()
    return total


# ---------------------------------------------------------------------------------------------
# minigen
# ---------------------------------------------------------------------------------------------
def pinned_h2d_gbps(nbytes: int = 1 << 30) -> float:
    """Pinned host -> device copy bandwidth (GB/s), one large copy."""
    from triton.testing import do_bench
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    ms = do_bench(lambda: dst.copy_(src, non_blocking=True), warmup=20, rep=100, return_mode="median")
    del src, dst
    return nbytes / ms / 1e6


def fill_random(t: torch.Tensor, chunk: int = 1 << 27) -> None:
    """Fill a GPU or pinned-host tensor with N(0, 1) values through device copies (fast for
    tens of GB of pinned pool; decode cost does not depend on the values). GPU tensors, views
    included (the padded partial key cache), are filled in place."""
    if t.is_cuda:
        t.normal_()
        torch.cuda.synchronize()
        return
    flat = t.view(-1)
    src = torch.randn(min(chunk, flat.numel()), device="cuda").to(t.dtype)
    for i in range(0, flat.numel(), chunk):
        n = min(chunk, flat.numel() - i)
        flat[i:i + n].copy_(src[:n], non_blocking=True)
    torch.cuda.synchronize()


def fill_cache(kv) -> None:
    """Random K/V everywhere a policy keeps them, as if the context had been prefilled."""
    for owner in (kv, getattr(kv, "dense", None)):
        for name in ("k_cache", "v_cache", "pk", "a_sel"):
            t = getattr(owner, name, None) if owner is not None else None
            if t is not None:
                fill_random(t)
    pool = getattr(kv, "pool", None)
    if pool is not None:
        fill_random(pool.k)
        fill_random(pool.v)


def pyplot(png: str):
    """matplotlib's pyplot on the Agg backend, or None (saying that `png` is not drawn) without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib not installed: {png} not drawn", file=sys.stderr)
        return None
    return plt


def jsonable(opts: dict) -> dict:
    """Policy options for a JSON line (alpha inf as the string "inf")."""
    return {k: (str(v) if v == float("inf") else v) for k, v in opts.items()}


def cuda_ms(fn, n: int) -> float:
    """Mean time of n calls of fn, CUDA events around the whole run (host gaps included)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(n):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / n


def graph_ms(fn, n: int, repeat: int = 1) -> float:
    """Mean ms per replay (n replays) of a CUDA graph holding `repeat` calls of fn: what a captured
    decode step pays for the same kernels, without Python's launch overhead."""
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(repeat):
            fn()
    g.replay()
    ms = cuda_ms(g.replay, n)
    del g
    return ms


# ---------------------------------------------------------------------------------------------
# infinigen's parts, timed apart: the PCIe gathers alone, and the step without them
# ---------------------------------------------------------------------------------------------
def gather_all(kv) -> None:
    """Every pooled layer's gather of an InfiniGenKV with the last step's selections: the transfer
    alone (what kv._gather does per layer inside a step)."""
    meta, B = kv.meta, kv.meta.num_seqs
    for j in range(kv.pool_layers):
        buf = (j + kv.dense_layers) % 2
        kp, vp = kv.pool.heads(j)
        kv.ops.gather_kv(kp, vp, kv.idx[buf, :B], kv.count[buf, :B], meta.slot_idx,
                         out_k=kv.sel_k[buf, :B], out_v=kv.sel_v[buf, :B])


def gather_bytes(kv) -> int:
    """Bytes gather_all moves over PCIe (reads the counts to the host: not for the decode path)."""
    B, rows = kv.meta.num_seqs, 0
    for j in range(kv.pool_layers):
        rows += int(kv.count[(j + kv.dense_layers) % 2, :B].sum())
    return 2 * rows * kv.head_dim * (torch.finfo(kv.dtype).bits // 8)


@contextlib.contextmanager
def without_gather(kv):
    """Inside: the InfiniGenKV instance's per-layer gather is a no-op, so a step captured (or run)
    here is the compute alone; the class's _gather is back afterwards."""
    kv._gather = lambda layer: None
    try:
        yield kv
    finally:
        del kv._gather


def warm_engine(model, *, policy: str, batch: int, context: int, steps: int, opts: dict | None = None):
    """An Engine whose `batch` sequences hold `context` tokens (random K/V, or a real prefill where
    the policy keeps state beyond K/V), its decode graph captured and warmed up. Returns
    (engine, graph, sequences, reset); reset(graph) puts a decode graph of this engine (the one
    returned, or one captured later for the same sequences) back at `context` tokens."""
    from minigen.engine import Engine
    cfg = model.config
    eng = Engine(model, _NoTokenizer(), policy=policy, max_batch=batch, max_seq_len=context + steps + 8,
                 policy_opts=opts)
    if policy in PREFILLED:   # state beyond the K/V values (kept sets, scores): a real prefill builds it
        gen = torch.Generator().manual_seed(0)
        seqs = [eng.new_sequence(torch.randint(0, cfg.vocab_size, (context,), generator=gen).tolist())
                for _ in range(batch)]
        eng.prefill(seqs)
    else:
        seqs = [eng.new_sequence([]) for _ in range(batch)]
        fill_cache(eng.kv)
        for s in seqs:
            s.cached_ids = [0] * context
    g = eng._decode_graph(seqs)
    g.tokens.random_(0, cfg.vocab_size)

    def reset(graph):   # back to a context of `context` tokens before each timed run
        graph.positions.fill_(context)
        graph.seq_lens.fill_(context + 1)
        graph.host_start = [context] * batch

    for _ in range(3):          # warm-up (kernel compilation, graph capture)
        eng.decode_step(g)
    reset(g)
    return eng, g, seqs, reset


def time_minigen(model, *, policy: str, batch: int, context: int, steps: int, opts: dict | None = None) -> dict:
    from minigen.sampler import SamplingParams, sample_no_sync
    cfg = model.config
    eng, g, seqs, reset = warm_engine(model, policy=policy, batch=batch, context=context, steps=steps, opts=opts)
    step_ms = cuda_ms(lambda: eng.decode_step(g), steps)      # (a) the decode step alone
    res = dict(step_ms=step_ms)
    kv = eng.kv
    if "fetched_fraction" in kv.stats():
        res["fetched_fraction"] = kv.stats()["fetched_fraction"]
    if policy == "infinigen":   # (b) its parts: compute without the PCIe gather, and the gather alone
        # both captured in a graph, as in the step, so that launch overhead does not count (eager
        # launches of 30 small gathers take longer than the gathers themselves at 2%)
        res["transfer_ms"] = graph_ms(lambda: gather_all(kv), steps)
        res["transfer_bytes"] = gather_bytes(kv)
        # the speculation alone (q projection, partial_qk, select), which shares the side
        # stream with the gather: side-stream time per step = speculate + transfer
        h = torch.randn(batch, cfg.dim, dtype=model.lm_head.weight.dtype, device="cuda")
        res["speculate_ms"] = graph_ms(lambda: [kv._speculate(i, h) for i in range(kv.dense_layers, cfg.num_layers)],
                                       steps)
        # a step without the gather: recapture, time, recapture
        with without_gather(kv):
            eng._graphs.clear()
            g = eng._decode_graph(seqs)
            g.tokens.random_(0, cfg.vocab_size)
            eng.decode_step(g)
            reset(g)
            res["compute_ms"] = cuda_ms(lambda: eng.decode_step(g), steps)
        eng._graphs.clear()
        g = eng._decode_graph(seqs)
        g.tokens.random_(0, cfg.vocab_size)
        eng.decode_step(g)
    # (c) the engine loop: step + sampling + one host sync per token
    reset(g)
    sp = SamplingParams(temperature=0)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    tok = g.tokens.clone()
    for _ in range(steps):
        g.tokens.copy_(tok)
        tok = sample_no_sync(eng.decode_step(g), sp, None)
        tok.tolist()            # sync: the streaming loop's per-token host read
    res["loop_ms"] = (time.perf_counter() - t0) * 1000 / steps
    res.update(weight_bytes=weight_bytes(model),
               kv_bytes=batch * (context + 1) * cfg.kv_bytes_per_token(model.lm_head.weight.element_size()),
               peak_gpu_gib=torch.cuda.max_memory_allocated() / 2**30, graph=g.graph is not None,
               host_pool_gib=round(kv.stats().get("host_pool_gib", 0.0), 2))
    eng.close()
    return res


def measure_minigen(model, *, policy: str, batch: int, context: int, steps: int, opts: dict,
                    hbm: float, h2d: float) -> dict:
    """time_minigen plus the derived figures: bytes per step (weights + K/V), the HBM floor,
    achieved GB/s, and the PCIe floor for policies that move the whole KV each step."""
    r = time_minigen(model, policy=policy, batch=batch, context=context, steps=steps, opts=opts)
    nbytes = r["weight_bytes"] + r["kv_bytes"]
    floor_ms = nbytes / (hbm * 1e9) * 1e3
    m = dict(step_ms=round(r["step_ms"], 3), loop_ms=round(r["loop_ms"], 3),
             tok_s=round(batch * 1000 / r["loop_ms"], 1), achieved_gbps=round(nbytes / r["step_ms"] / 1e6, 1),
             x_floor=round(r["step_ms"] / floor_ms, 3), cuda_graph=r["graph"],
             peak_gpu_gib=round(r["peak_gpu_gib"], 2), host_pool_gib=r["host_pool_gib"],
             bytes_per_step=nbytes, floor_ms=round(floor_ms, 3))
    if "fetched_fraction" in r:
        m["fetched_fraction"] = round(r["fetched_fraction"], 4)
    if policy in ("offload", "int4"):   # everything (int4: its packed bytes) crosses PCIe each step
        moved = r["kv_bytes"] * r.get("fetched_fraction", 1.0)
        m["pcie_floor_ms"] = round(moved / (h2d * 1e9) * 1e3, 3)
        m["x_pcie_floor"] = round(r["step_ms"] / m["pcie_floor_ms"], 3)
    if policy == "infinigen":
        m.update(compute_ms=round(r["compute_ms"], 3),
                 transfer_ms=round(r["transfer_ms"], 3), transfer_gb=round(r["transfer_bytes"] / 1e9, 3),
                 speculate_ms=round(r["speculate_ms"], 3),
                 transfer_gbps=round(r["transfer_bytes"] / r["transfer_ms"] / 1e6, 1),
                 x_max_parts=round(r["step_ms"] / max(r["compute_ms"], r["transfer_ms"]), 3))
    return m


def timed_generate(eng, warm: list[list[int]], prompts: list[list[int]], sp) -> tuple[list, float, float]:
    """A warm-up generation of `warm` (kernel compilation and the batch's CUDA-graph capture happen
    there, not in the timed run: a batch size's decode graph is reused across generate calls), then
    `prompts` generated with sp: (their sequences, seconds to the first token, seconds for the rest)."""
    from minigen.sampler import SamplingParams
    ws = [eng.new_sequence(p) for p in warm]
    for _ in eng.generate(ws, SamplingParams(max_new_tokens=4, temperature=0, ignore_eos=True)):
        pass
    for s in ws:
        eng.release(s)
    seqs = [eng.new_sequence(p) for p in prompts]
    torch.cuda.synchronize()
    t0, first = time.perf_counter(), None
    for _ in eng.generate(seqs, sp):
        if first is None:
            torch.cuda.synchronize()
            first = time.perf_counter()
    torch.cuda.synchronize()
    return seqs, first - t0, time.perf_counter() - first


def time_real_text(model, tokenizer, *, policy: str, batch: int, context: int, steps: int, text: str,
                   opts: dict | None = None) -> dict:
    """Real prefill of `batch` windows of `context` tokens of text, then `steps` greedy tokens
    through the engine's own loop: tokens/s, the policy's fetched fraction, peak GPU memory."""
    from minigen.engine import Engine
    from minigen.sampler import SamplingParams
    ids = tokenizer.encode(text)
    if len(ids) < context:
        raise ValueError(f"--text has {len(ids)} tokens, fewer than --context {context}")
    stride = max(1, (len(ids) - context) // max(1, batch - 1))
    torch.cuda.reset_peak_memory_stats()
    eng = Engine(model, tokenizer, policy=policy, max_batch=batch, max_seq_len=context + steps + 1,
                 max_prefill_tokens=16384, policy_opts=opts)
    sp = SamplingParams(max_new_tokens=steps, temperature=0, ignore_eos=True)
    _, prefill_s, decode_s = timed_generate(eng, [ids[b: b + 64] for b in range(batch)],
                                            [ids[(b * stride) % (len(ids) - context + 1):][:context] for b in range(batch)], sp)
    res = dict(prefill_s=round(prefill_s, 3), decode_tok_s=round(batch * (steps - 1) / decode_s, 1),
               decode_ms_per_step=round(decode_s * 1000 / (steps - 1), 3),
               peak_gpu_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2), **eng.kv.stats())
    eng.close()
    return res


# ---------------------------------------------------------------------------------------------
# transformers baselines: the same shape through its own generate()
# ---------------------------------------------------------------------------------------------
def time_transformers(hf_cfg: dict, *, batch: int, context: int, steps: int, mode: str, dtype,
                      reps: int = 3) -> dict:
    """Per-step decode time of transformers' generate: (t(1 + steps) - t(1)) / steps, where t(n)
    generates n tokens after a `context`-token prompt (the difference removes the prefill). Every
    mode is first run once at full length (allocator growth, kernel selection, the static cache's
    compilation), then t(1) and t(1 + steps) are each the best of `reps` runs: one cold run in a
    process had measured the dynamic cache at 63 ms per step where warm runs take 21-34 ms."""
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM
    cfg = AutoConfig.for_model(hf_cfg["model_type"], **{k: v for k, v in hf_cfg.items() if k != "model_type"})
    torch.manual_seed(0)
    with torch.device("cuda"):
        m = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa").eval()
    ids = torch.randint(3, cfg.vocab_size, (batch, context), device="cuda")
    kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
    if mode == "static":
        kw["cache_implementation"] = "static"
    elif mode == "offloaded":
        kw["cache_implementation"] = "offloaded"

    def run(n):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = m.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)
        torch.cuda.synchronize()
        assert out.shape[1] == context + n
        return time.perf_counter() - t0
    run(2)                      # warm-up (and compilation, for the static cache)
    run(steps + 1)
    t1 = min(run(1) for _ in range(reps))
    tn = min(run(steps + 1) for _ in range(reps))
    res = dict(step_ms=(tn - t1) * 1000 / steps, transformers=transformers.__version__,
               peak_gpu_gib=torch.cuda.max_memory_allocated() / 2**30)
    del m
    return res


def free_gpu():
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


def hold_budget(args, dtype: torch.dtype, opts: dict) -> int:
    """--gpu-memory: the run planned against the budget from the model's config (refused, one line,
    when it does not fit), then the CUDA allocator held to it (minigen/memory.py)."""
    from minigen.memory import check, hold_to_budget, plan, resolve_budget
    dev = torch.device("cuda")
    try:
        budget = resolve_budget(args.gpu_memory, dev)
        if args.shape:
            cfg = shape_config(args.shape, args.context + args.steps + 8)[0]
        else:
            from minigen.load import load_checkpoint
            cfg = load_checkpoint(None if args.model == "default" else args.model).config
        check(plan(cfg, dtype, args.policy, args.batch, args.context + args.steps + 8, opts), budget, cfg, dtype, opts)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    hold_to_budget(budget, dev)
    return budget


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="model path (HF directory or .gguf); 'default' = SmolLM2 GGUF")
    src.add_argument("--shape", choices=sorted(SHAPES), help="named shape with random weights")
    p.add_argument("--policy", default="dense", choices=POLICIES)
    p.add_argument("--alpha", type=float, default=None, help="infinigen threshold ('inf': off, fixed budget)")
    p.add_argument("--budget", type=float, default=None, help="infinigen: max fraction of the context per KV head; "
                   "h2o/window: the fraction kept")
    p.add_argument("--sinks", type=int, default=None, help="window: first tokens always kept")
    p.add_argument("--partial-ratio", type=float, default=None)
    p.add_argument("--dense-layers", type=int, default=None)
    p.add_argument("--recent", type=int, default=None, help="infinigen: last N cached tokens always fetched")
    p.add_argument("--cpu-kv-limit", default=None, help="infinigen: host pool limit, bytes or a fraction")
    p.add_argument("--fetch", choices=FETCHES, default=None,
                   help="offload/int4: copy engine (eager step) or gather_kv kernel (CUDA-graph step)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--gpu-memory", default=None, help="GPU memory budget, bytes (e.g. 24G) or a fraction of the "
                   "GPU's: minigen's run is planned against it (refused when it does not fit) and the allocator "
                   "held to it, the transformers baselines too")
    p.add_argument("--context", type=int, default=8192)
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--dtype", default="float16")
    p.add_argument("--transformers", default="auto",
                   help="comma list of transformers baselines: dynamic,static,offloaded; 'none'; "
                        "'auto' = all three when transformers is importable")
    p.add_argument("--text", default=None, help="with --model: prefill real text (windows of --context tokens) "
                   "and time the engine's own generation loop instead of a random-filled cache")
    p.add_argument("--json", action="store_true", help="print only the JSON line")
    args = p.parse_args(argv)
    from minigen.cli import policy_opts
    try:
        opts = policy_opts(args)                   # the settings given, checked against --policy
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    if not torch.cuda.is_available():
        print("error: bench/decode.py times CUDA decode; no GPU is visible", file=sys.stderr)
        return 2
    from minigen.device import resolve_dtype
    dtype = resolve_dtype(args.dtype, torch.device("cuda"))
    budget = hold_budget(args, dtype, opts) if args.gpu_memory is not None else None
    ceiling = hbm_copy_gbps()
    h2d = pinned_h2d_gbps()
    if args.text:
        from minigen.llm import LLM
        if not args.model:
            raise SystemExit("error: --text needs --model (a real tokenizer)")
        llm = LLM(None if args.model == "default" else args.model, device="cuda", dtype=dtype, policy=args.policy,
                  policy_opts=opts, max_seq_len=args.context + args.steps + 1, gpu_memory=budget,
                  max_batch=args.batch)
        r = time_real_text(llm.model, llm.tokenizer, policy=args.policy, batch=args.batch, context=args.context,
                           steps=args.steps, text=Path(args.text).read_text(errors="replace"),
                           opts=llm.policy_opts)
        out = dict(bench="decode-real-text", model=args.model, text=args.text, policy=args.policy, batch=args.batch,
                   context=args.context, steps=args.steps, dtype=args.dtype, gpu=torch.cuda.get_device_name(),
                   gpu_memory=budget, policy_opts=jsonable(opts), minigen=r)
        print(json.dumps(out))
        return 0
    if args.shape:
        model, hf_cfg = random_model(args.shape, dtype, args.context + args.steps + 8)
        name = args.shape
    else:
        from minigen.load import load_model
        model, _ = load_model(None if args.model == "default" else args.model, device="cuda", dtype=dtype)
        hf_cfg, name = hf_shape_of(model.config), args.model
    m = measure_minigen(model, policy=args.policy, batch=args.batch, context=args.context, steps=args.steps,
                        opts=opts, hbm=ceiling, h2d=h2d)
    floor_ms = m.pop("floor_ms")
    out = dict(bench="decode", model=name, policy=args.policy, batch=args.batch, context=args.context,
               steps=args.steps, dtype=args.dtype, gpu=torch.cuda.get_device_name(),
               torch=torch.__version__, hbm_copy_gbps=round(ceiling, 1), pinned_h2d_gbps=round(h2d, 1),
               gpu_memory=budget, policy_opts=jsonable(opts),
               bytes_per_step=m.pop("bytes_per_step"), floor_ms=floor_ms, minigen=m)
    del model
    free_gpu()
    modes = []
    if args.transformers == "auto":
        try:
            import transformers  # noqa: F401
            modes = (["offloaded"] if args.policy != "dense" else ["dynamic", "static", "offloaded"]) if hf_cfg else []
        except ImportError:
            modes = []
    elif args.transformers != "none":
        modes = args.transformers.split(",")
    for mode in modes:
        try:
            t = time_transformers(hf_cfg, batch=args.batch, context=args.context,
                                  steps=min(args.steps, 16 if mode == "offloaded" else args.steps),
                                  mode=mode, dtype=dtype)
            t["step_ms"] = round(t["step_ms"], 3)
            t["tok_s"] = round(args.batch * 1000 / t["step_ms"], 1)
            t["minigen_speedup"] = round(t["step_ms"] / m["step_ms"], 2)
        except Exception as e:  # a baseline that cannot run here is reported, not hidden
            t = dict(error=f"{type(e).__name__}: {str(e)[:200]}")
        out[f"transformers_{mode}"] = t
        free_gpu()
    if not args.json:
        m = out["minigen"]
        print(f"{name} {args.policy} B={args.batch} T={args.context}: step {m['step_ms']:.2f} ms "
              f"(floor {floor_ms:.2f} ms at {ceiling:.0f} GB/s, x{m['x_floor']:.2f}), loop {m['loop_ms']:.2f} ms, "
              f"{m['tok_s']:.0f} tok/s, {m['achieved_gbps']:.0f} GB/s")
        if "pcie_floor_ms" in m:
            print(f"  PCIe floor {m['pcie_floor_ms']:.2f} ms at {h2d:.1f} GB/s pinned H2D: x{m['x_pcie_floor']:.2f}")
        if "transfer_ms" in m:
            print(f"  fetched {m['fetched_fraction']:.1%}: compute alone {m['compute_ms']:.2f} ms, transfer alone "
                  f"{m['transfer_ms']:.2f} ms ({m['transfer_gbps']:.1f} GB/s), speculation alone {m['speculate_ms']:.2f} ms, "
                  f"step / max(parts) x{m['x_max_parts']:.2f}")
        for mode in modes:
            t = out[f"transformers_{mode}"]
            print(f"  transformers {mode}: " + (f"{t['step_ms']:.2f} ms/step" if "step_ms" in t else t["error"]))
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
