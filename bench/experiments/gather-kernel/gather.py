"""Selected-row fetch from the pinned host pool: minigen's GPU gather kernel against the copy-engine
route (indices to the host, CPU index_select into a pinned staging buffer, one H2D memcpy), for one
layer of InfiniGen's selection, with the pinned H2D ceiling measured in the same run.

    python bench/run_experiment.py gather-kernel/gather.py --context 8192 --fraction 0.1 --batch 1 --json

The copy-engine route needs the selected indices on the host: a device sync per layer, which the
decode step cannot afford inside a CUDA graph; its time here is the best case (no graph, no
overlap) and is reported to show what the kernel saves in bandwidth alone.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--context", type=int, default=8192)
    p.add_argument("--kv-heads", type=int, default=32)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--fraction", type=float, default=0.1)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: gather.py needs a GPU", file=sys.stderr)
        return 2
    from triton.testing import do_bench
    from decode import pinned_h2d_gbps   # bench/decode.py (through bench/run_experiment.py)
    from minigen.kernels.gather_kv import gather_kv, gather_kv_ref
    B, T, Hkv, D = args.batch, args.context, args.kv_heads, args.head_dim
    n = max(1, int(args.fraction * T))
    pool_k = torch.randn(B, T, Hkv, D, dtype=torch.float16).pin_memory()
    pool_v = torch.randn(B, T, Hkv, D, dtype=torch.float16).pin_memory()
    kp, vp = pool_k.permute(0, 2, 1, 3), pool_v.permute(0, 2, 1, 3)            # (S, Hkv, T, D) views
    idx = torch.stack([torch.stack([torch.randperm(T)[:n].sort().values for _ in range(Hkv)]) for _ in range(B)])
    idx = idx.to(torch.int32).cuda()                                            # (B, Hkv, n)
    count = torch.full((B, Hkv), n, dtype=torch.int32, device="cuda")
    slots = torch.arange(B, dtype=torch.int32, device="cuda")
    out_k = torch.empty(B, Hkv, n, D, dtype=torch.float16, device="cuda")
    out_v = torch.empty_like(out_k)
    useful = 2 * B * Hkv * n * D * 2                                            # bytes of K and V rows

    # (a) the kernel: SM loads straight from pinned memory
    ms_kernel = do_bench(lambda: gather_kv(kp, vp, idx, count, slots, out_k=out_k, out_v=out_v),
                         warmup=20, rep=200, return_mode="median")
    ref_k, ref_v = gather_kv_ref(kp, vp, idx, count, slots)
    exact = bool(torch.equal(out_k.cpu(), ref_k.cpu()) and torch.equal(out_v.cpu(), ref_v.cpu()))

    # (b) the copy engine: indices to the host, CPU row gather into pinned staging, one memcpy
    flat_k, flat_v = pool_k.view(-1, D), pool_v.view(-1, D)                     # rows of (b, t, g)
    stage_k = torch.empty(B * Hkv * n, D, dtype=torch.float16).pin_memory()
    stage_v = torch.empty_like(stage_k).pin_memory()
    heads = torch.arange(Hkv)[None, :, None]
    base = torch.arange(B)[:, None, None] * T * Hkv

    def copy_engine():
        rows = (base + idx.cpu().long() * Hkv + heads).view(-1)                 # sync: indices to host
        torch.index_select(flat_k, 0, rows, out=stage_k)
        torch.index_select(flat_v, 0, rows, out=stage_v)
        out_k.view(-1, D).copy_(stage_k, non_blocking=True)
        out_v.view(-1, D).copy_(stage_v, non_blocking=True)
        torch.cuda.synchronize()

    copy_engine()
    exact_ce = bool(torch.equal(out_k.cpu(), ref_k.cpu()))
    times = []
    for _ in range(args.reps):
        t0 = time.perf_counter()
        copy_engine()
        times.append(time.perf_counter() - t0)
    ms_ce = sorted(times)[len(times) // 2] * 1000
    h2d = pinned_h2d_gbps()
    res = dict(bench="gather", batch=B, context=T, kv_heads=Hkv, head_dim=D, fraction=args.fraction,
               rows_per_head=n, useful_bytes=useful, pinned_h2d_gbps=round(h2d, 1),
               kernel=dict(ms=round(ms_kernel, 3), gbps=round(useful / ms_kernel / 1e6, 1), exact=exact),
               copy_engine=dict(ms=round(ms_ce, 3), gbps=round(useful / ms_ce / 1e6, 1), exact=exact_ce,
                                cpu_threads=torch.get_num_threads()))
    if not args.json:
        print(f"{B}x{Hkv} heads, {n} of {T} rows each ({useful / 1e6:.1f} MB): kernel {ms_kernel:.3f} ms "
              f"({res['kernel']['gbps']} GB/s), copy engine {ms_ce:.3f} ms ({res['copy_engine']['gbps']} GB/s), "
              f"pinned H2D ceiling {h2d:.1f} GB/s")
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
