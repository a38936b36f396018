"""Where one layer's InfiniGen speculation spends its time, piece by piece, on the GPU.

    python bench/run_experiment.py speculation-cost/speculation.py [--shape llama2-7b] [--batch 1] \
        [--context 8192] [--budget 0.1]

The speculation for layer i runs on a side stream during layer i-1, and layer i's gather cannot
start before it ends, so its latency sits on the critical path of every pooled layer. This times
its pieces on random tensors of a model shape (no model is built), each captured in a CUDA graph
of `--repeat` back-to-back calls (one per pooled layer, as in a decode step), so launch overhead
is what a captured step pays, not what Python pays:
    norm+q_proj+rope   the layer's input norm, the W_q GEMV and RoPE (model.project_q)
    partial_qk         q projected on the kept skew columns, scaled, and scored against the
                       partial key cache (minigen/kernels/partial_qk.py: projection and scores in one)
    select             threshold + cap + compaction (minigen/kernels/select.py), the cap binding
                       (alpha inf: a fixed fetch of --budget) and not binding (alpha 5, budget 1),
                       with the fetched-rows counter inside
    all                the whole speculation as InfiniGenKV._speculate runs it
plus, for scale, the layer's gather at the same fetch fraction (minigen/kernels/gather_kv.py, from
a pinned pool) and the HBM copy ceiling. Prints a table and one JSON line.
"""
from __future__ import annotations

import argparse
import json
import math
import sys

import torch

from decode import SHAPES, graph_ms, hbm_copy_gbps   # bench/decode.py (through bench/run_experiment.py)
from minigen.kernels.ops import Ops


def graph_us(fn, repeat: int, iters: int = 20) -> float:
    """Mean microseconds per call of fn, replayed from a CUDA graph of `repeat` calls."""
    return graph_ms(fn, iters, repeat) * 1000 / repeat


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="llama2-7b", choices=sorted(SHAPES))
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--context", type=int, default=8192)
    p.add_argument("--budget", type=float, default=0.1, help="fixed fetch fraction for the binding-cap select")
    p.add_argument("--partial-ratio", type=float, default=None)
    p.add_argument("--recent", type=int, default=None,
                   help="select's recent window (default: InfiniGenKV's, 64; the runs committed before it existed: 0)")
    p.add_argument("--repeat", type=int, default=30, help="calls per captured graph (pooled layers)")
    p.add_argument("--json", action="store_true", help="print only the JSON line")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: speculation.py times CUDA kernels; no GPU is visible", file=sys.stderr)
        return 2
    from minigen.config import ModelConfig
    from minigen.kernels.partial_qk import token_stride
    from minigen.kv.infinigen import DEFAULT_RECENT, default_partial_ratio
    from minigen.kernels.rope import rope_tables
    from minigen.models.llama import rope_inv_freq
    cfg = ModelConfig.from_hf(dict(SHAPES[args.shape]))
    B, T, H, Hkv, D, C = args.batch, args.context, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.dim
    G = H // Hkv
    R = max(1, int(D * (args.partial_ratio or default_partial_ratio(D))))
    dev, dt = torch.device("cuda"), torch.float16
    ops = Ops(use_triton=True)
    torch.manual_seed(0)
    x = torch.randn(B, C, device=dev, dtype=dt)
    norm_w = torch.ones(C, device=dev, dtype=dt)
    wq = torch.nn.Linear(C, H * D, bias=False, device=dev, dtype=dt)
    cos, sin = rope_tables(rope_inv_freq(cfg), T + 1)
    cos, sin = cos.to(dev), sin.to(dev)
    positions = torch.full((B,), T, dtype=torch.int64, device=dev)
    a_sel = torch.randn(B, Hkv, D, R, device=dev, dtype=dt) / math.sqrt(D)
    pk = torch.randn(B, Hkv, R, token_stride(T + 1), device=dev, dtype=dt)[..., :T + 1]   # as InfiniGenKV
    seq_lens = torch.full((B,), T, dtype=torch.int32, device=dev)
    slots = torch.arange(B, dtype=torch.int32, device=dev)
    M = max(1, math.ceil(args.budget * T))
    idx = torch.zeros(B, Hkv, M, dtype=torch.int32, device=dev)
    idx_all = torch.zeros(B, Hkv, T, dtype=torch.int32, device=dev)
    count = torch.zeros(B, Hkv, dtype=torch.int32, device=dev)
    fetched = torch.zeros((), dtype=torch.int64, device=dev)
    sm = D ** -0.5
    recent = DEFAULT_RECENT if args.recent is None else args.recent

    def project_q():
        h = ops.rms_norm(x, norm_w, 1e-5)
        q = wq(h).view(B, H, D)
        return ops.rope(q, q, positions, cos, sin)[0]

    q = project_q()
    scores = ops.partial_qk(q, a_sel, pk, seq_lens, slots, sm)
    pieces = {
        "norm+q_proj+rope": project_q,
        "partial_qk": lambda: ops.partial_qk(q, a_sel, pk, seq_lens, slots, sm, out=scores),
        f"select, cap binds ({args.budget:g})":
            lambda: ops.select(scores, seq_lens, math.inf, args.budget, G, M, out_idx=idx, out_count=count,
                               total=fetched, recent=recent),
        "select, cap free (alpha 5)":
            lambda: ops.select(scores, seq_lens, 5.0, 1.0, G, T, out_idx=idx_all, out_count=count,
                               total=fetched, recent=recent),
    }

    def speculate():
        s = ops.partial_qk(project_q(), a_sel, pk, seq_lens, slots, sm)
        ops.select(s, seq_lens, math.inf, args.budget, G, M, out_idx=idx, out_count=count, total=fetched,
                   recent=recent)

    pieces["all (cap binds)"] = speculate
    res = {name: round(graph_us(fn, args.repeat), 2) for name, fn in pieces.items()}
    # the gather of the same fraction, for scale: what the speculation must hide behind
    from minigen.kv.pool import HostKVPool
    ops.select(scores, seq_lens, math.inf, args.budget, G, M, out_idx=idx, out_count=count)
    pool = HostKVPool(1, B, T + 1, Hkv, D, dtype=dt, pin=True)
    kp, vp = pool.heads(0)
    out_k = torch.empty(B, Hkv, M, D, device=dev, dtype=dt)
    out_v = torch.empty_like(out_k)
    gather_us = graph_us(lambda: ops.gather_kv(kp, vp, idx, count, slots, out_k=out_k, out_v=out_v), 4, iters=10)
    pool.close()
    res["gather (same fraction)"] = round(gather_us, 2)
    out = dict(bench="speculation", shape=args.shape, batch=B, context=T, heads=H, kv_heads=Hkv, head_dim=D,
               partial_cols=R, budget=args.budget, recent=recent, max_select=M, gpu=torch.cuda.get_device_name(),
               torch=torch.__version__, hbm_copy_gbps=round(hbm_copy_gbps(), 1), us_per_layer=res)
    if not args.json:
        print(f"{args.shape} B={B} T={T}: speculation pieces, us per layer (graph of {args.repeat} calls)")
        for name, us in res.items():
            print(f"  {name:<28} {us:9.2f}")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
