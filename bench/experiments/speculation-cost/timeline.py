"""Kernel timeline of captured infinigen decode steps (torch.profiler), to see what the step waits on.

    python bench/run_experiment.py speculation-cost/timeline.py BUDGET [CONTEXT]
    e.g.  python bench/run_experiment.py speculation-cost/timeline.py 0.1 8192

Llama-2-7B shape, random fp16 weights, batch 1, threshold off (alpha inf) and a fixed fetch
fraction BUDGET. Profiles three captured decode steps and prints, for the last one: the gather
kernels' durations and the gaps between them, how long each gather started after its select
ended, kernel time per (stream, kernel kind), and the raw timeline around the 11th-13th gathers
(start us from the step's first kernel, duration us, stream, kernel). A gather that starts right
after the previous one means the transfer is the bottleneck; a gap after a select means the
speculation is (timeline_b1_8k_10pct.txt, beside this script, reads one such run).
"""
import collections
import json
import os
import sys
import tempfile

import torch

from decode import random_model, warm_engine   # bench/decode.py (through bench/run_experiment.py)

KINDS = ("gather_kv", "select", "partial_qk", "sparse_attention", "rms_norm", "rope", "swiglu", "append_kv",
         "gemv", "gemm", "Kernel", "elementwise", "reduce")


def kind(name: str) -> str:
    """A kernel's short name: the first of KINDS it contains, else its first 30 characters."""
    return next((k for k in KINDS if k in name), name[:30])


def main(argv: list[str]) -> int:
    if not argv or not torch.cuda.is_available():
        print("usage: python bench/run_experiment.py speculation-cost/timeline.py BUDGET [CONTEXT]  (needs a CUDA GPU)",
              file=sys.stderr)
        return 2
    budget = float(argv[0])
    ctx = int(argv[1]) if len(argv) > 1 else 8192
    steps = 3
    model, _ = random_model("llama2-7b", torch.float16, ctx + steps + 8)
    eng, g, _, _ = warm_engine(model, policy="infinigen", batch=1, context=ctx, steps=steps,
                               opts={"alpha": float("inf"), "budget": budget})
    torch.cuda.synchronize()
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            eng.decode_step(g)
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            ev = [e for e in json.load(f)["traceEvents"] if e.get("cat") == "kernel"]
    ev.sort(key=lambda e: e["ts"])
    print("kernels traced:", len(ev))
    print("per stream:", dict(collections.Counter(e["tid"] for e in ev)))
    last = ev[-(len(ev) // steps):]          # every step launches the same kernels: the last third
    t0 = last[0]["ts"]
    gs = [e for e in last if "gather_kv" in e["name"]]
    sel = [e for e in last if "_select_kernel" in e["name"]]
    end = lambda e: e["ts"] + e["dur"]  # noqa: E731
    print(f"last step span {end(last[-1]) - t0:.0f} us, gathers {len(gs)}, selects {len(sel)}")
    print("gather durations:", [round(e["dur"]) for e in gs])
    print("gaps between gathers:", [round(b["ts"] - end(a)) for a, b in zip(gs, gs[1:])])
    print("select end -> gather start:", [round(gg["ts"] - end(s)) for s, gg in zip(sel, gs)])
    print("select durations:", [round(e["dur"]) for e in sel])
    print("first gather starts at", round(gs[0]["ts"] - t0), "last ends at", round(end(gs[-1]) - t0))
    agg = collections.defaultdict(float)      # kernel time per (stream, kind) within the step
    for e in last:
        agg[(e["tid"], kind(e["name"]))] += e["dur"]
    for k, v in sorted(agg.items(), key=lambda kv: -kv[1])[:25]:
        print(k, round(v))
    lo, hi = gs[10]["ts"] - 50, end(gs[12])   # the raw timeline around gathers 10-12
    for e in last:
        if lo <= e["ts"] <= hi:
            print(f"{e['ts'] - t0:9.1f} {e['dur']:7.1f} s{e['tid']} {kind(e['name'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
