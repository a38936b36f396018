"""Kernel timeline of captured infinigen decode steps (torch.profiler), to see what the step waits on.

    python bench/timeline.py BUDGET [CONTEXT]      e.g.  python bench/timeline.py 0.1 8192

Llama-2-7B shape, random fp16 weights, batch 1, threshold off (alpha inf) and a fixed fetch
fraction BUDGET. Profiles three captured decode steps and prints, for the last one: the gather
kernels' durations and the gaps between them, how long each gather started after its select
ended, kernel time per (stream, kernel kind), and the raw timeline around the 11th-13th gathers
(start us from the step's first kernel, duration us, stream, kernel). A gather that starts right
after the previous one means the transfer is the bottleneck; a gap after a select means the
speculation is (bench/results/issue3/timeline_b1_8k_10pct.txt reads one such run).
"""
import collections
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402

from bench import decode as D  # noqa: E402
from minigen.engine import Engine  # noqa: E402

if len(sys.argv) < 2 or not torch.cuda.is_available():
    sys.exit("usage: python bench/timeline.py BUDGET [CONTEXT]  (needs a CUDA GPU)")
budget = float(sys.argv[1])
ctx = int(sys.argv[2]) if len(sys.argv) > 2 else 8192
model, _ = D.random_model("llama2-7b", torch.float16, ctx + 40)
cfg = model.config
eng = Engine(model, D._NoTokenizer(), policy="infinigen", max_batch=1, max_seq_len=ctx + 40,
             policy_opts={"alpha": float("inf"), "budget": budget})
seqs = [eng.new_sequence([])]
D.fill_cache(eng.kv)
for s in seqs:
    s.cached_ids = [0] * ctx
g = eng._decode_graph(seqs)
g.tokens.random_(0, cfg.vocab_size)
def reset():
    g.positions.fill_(ctx); g.seq_lens.fill_(ctx + 1); g.host_start = [ctx]
for _ in range(3):
    eng.decode_step(g)
reset()
torch.cuda.synchronize()
from torch.profiler import profile, ProfilerActivity
with profile(activities=[ProfilerActivity.CUDA]) as prof:
    for _ in range(3):
        eng.decode_step(g)
    torch.cuda.synchronize()
path = "/tmp/trace.json"
prof.export_chrome_trace(path)
ev = [e for e in json.load(open(path))["traceEvents"] if e.get("cat") == "kernel"]
print("kernels traced:", len(ev))
ev.sort(key=lambda e: e["ts"])
streams = collections.Counter(e["tid"] for e in ev)
print("per stream:", dict(streams))
def short(n):
    for k in ("gather_kv", "select", "partial_qk", "sparse_attention", "rms_norm", "rope", "swiglu", "append_kv", "gemv", "gemm", "Kernel", "elementwise", "reduce"):
        if k in n: return k
    return n[:30]
# the last step only: find step boundaries by the embedding / first kernel... use 1/3 of events
n = len(ev) // 3
last = ev[-n:]
t0 = last[0]["ts"]
gs = [e for e in last if "gather_kv" in e["name"]]
sel = [e for e in last if "_select_kernel" in e["name"]]
print(f"last step span {last[-1]['ts'] + last[-1]['dur'] - t0:.0f} us, gathers {len(gs)}, selects {len(sel)}")
print("gather durations:", [round(e["dur"]) for e in gs])
print("gaps between gathers:", [round(b["ts"] - (a["ts"] + a["dur"])) for a, b in zip(gs, gs[1:])])
print("select end -> gather start:", [round(gg["ts"] - (s["ts"] + s["dur"])) for s, gg in zip(sel, gs)])
print("select durations:", [round(e["dur"]) for e in sel])
print("first gather starts at", round(gs[0]["ts"] - t0), "last ends at", round(gs[-1]["ts"] + gs[-1]["dur"] - t0))
# main stream: per kernel type total time within the step
agg = collections.defaultdict(float)
for e in last:
    agg[(e["tid"], short(e["name"]))] += e["dur"]
for k, v in sorted(agg.items(), key=lambda kv: -kv[1])[:25]:
    print(k, round(v))
# print a window of the timeline around gathers 10-12
lo, hi = gs[10]["ts"] - 50, gs[12]["ts"] + gs[12]["dur"]
for e in last:
    if lo <= e["ts"] <= hi:
        print(f"{e['ts'] - t0:9.1f} {e['dur']:7.1f} s{e['tid']} {short(e['name'])}")
