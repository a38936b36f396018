"""How often infinigen's selected rows are already on the GPU: the hit rate of the resident set
(`--reuse`) on a real model and real text, over a long greedy generation, and the bytes a step then
moves over PCIe. A functional measurement (which rows, not how fast): it runs on any device.

    python bench/reuse_hits.py --model qwen2.5-coder-1.5b --text data/essays --context 8192 --new-tokens 256 \
        --budgets 0.02,0.049 --out bench/results/reuse

One greedy generation per --budgets entry records, at every decode step, every pooled layer's
selection (idx, count per sequence and KV head). The resident set is then replayed over those
selections with the runtime's own bookkeeping (plan_reuse_ref, least recently used) for each
--factors entry (resident rows = factor x the selection cap): the selections do not depend on reuse
(the gathered rows are the same bits), so one generation serves every size. Also reported: the
overlap of consecutive steps (the rows selected at step t that step t-1 selected too, the
resident set of one step's rows), and, as a check, the runtime's own hit counter from a second
generation with --check-factor, which must equal the replay's.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch


def read_text(path: str) -> str:
    p = Path(path)
    files = sorted(p.glob("*.txt")) if p.is_dir() else [p]
    return "\n\n".join(f.read_text(errors="replace") for f in files)


def generate(llm, ids: list[int], new_tokens: int, opts: dict, record: bool):
    """Greedy generation through infinigen with `opts`; the recorded selections [(layer j, idx, count)]
    per step when `record`, and the policy's stats."""
    from minigen.sampler import SamplingParams
    llm.use_policy("infinigen", opts, max_seq_len=len(ids) + new_tokens + 1)
    eng = llm.get_engine(1)
    kv, steps = eng.kv, []
    if record:
        gather = kv._gather

        def recording(layer):   # after the layer's speculation: its idx/count hold this step's selection
            buf, B, M = layer % 2, kv.meta.num_seqs, kv._m
            if layer == kv.dense_layers:
                steps.append([])
            steps[-1].append((kv.idx[buf, :B, :, :M].cpu().clone(), kv.count[buf, :B].cpu().clone()))
            gather(layer)
        kv._gather = recording
    seq = eng.new_sequence(ids)
    t0 = time.perf_counter()
    for i, _ in enumerate(eng.generate([seq], SamplingParams(max_new_tokens=new_tokens, temperature=0, ignore_eos=True))):
        if i % 64 == 0:
            print(f"    token {i}/{new_tokens} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    stats = kv.stats()
    info = dict(max_select=kv.max_select, rows=kv.rows, head_dim=kv.head_dim, elem=kv.dtype.itemsize,
                num_kv_heads=kv.num_kv_heads, pool_layers=kv.pool_layers)
    llm.close()
    return steps, stats, info


def replay(steps, info: dict, factor: float | None) -> dict:
    """Hit rate of a resident set of factor x max_select rows per head over recorded selections
    (per pooled layer too); factor None = the previous step's selection only (overlap)."""
    from minigen.kernels.reuse import plan_reuse_ref
    Lp, Hkv, T = info["pool_layers"], info["num_kv_heads"], info["rows"]
    sel = hit = 0
    per_layer = [[0, 0] for _ in range(Lp)]
    if factor is not None:
        C = min(T, max(info["max_select"], math.ceil(factor * info["max_select"])))
        state = [[torch.full(shape, -1, dtype=torch.int32) for shape in ((1, Hkv, T), (1, Hkv, C), (1, Hkv, C))]
                 for _ in range(Lp)]
    prev = [None] * Lp
    slot = torch.zeros(1, dtype=torch.int32)
    for t, layers in enumerate(steps):
        for j, (idx, count) in enumerate(layers):
            n = int(count.sum())
            if factor is None:
                cur = [set(idx[0, g, :int(count[0, g])].tolist()) for g in range(Hkv)]
                h = sum(len(c & p) for c, p in zip(cur, prev[j])) if prev[j] is not None else 0
                prev[j] = cur
            else:
                hits = torch.zeros((), dtype=torch.int64)
                plan_reuse_ref(idx, count, slot, *state[j], torch.tensor(t + 1, dtype=torch.int32), hits)
                h = int(hits)
            sel, hit = sel + n, hit + h
            per_layer[j][0] += n
            per_layer[j][1] += h
    row_bytes = 2 * info["head_dim"] * info["elem"]
    return dict(factor=factor, hit_rate=round(hit / sel, 4) if sel else 0.0,
                rows_per_step=round(sel / len(steps), 1), pcie_mb_per_step=round((sel - hit) * row_bytes / len(steps) / 1e6, 4),
                by_layer=[round(h / s, 3) if s else 0.0 for s, h in per_layer])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="model path or alias (default: the embedded default model)")
    p.add_argument("--text", required=True, help="a text file or a folder of .txt")
    p.add_argument("--context", type=int, default=8192)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--budgets", default="0.02,0.049", help="infinigen --budget values (alpha off)")
    p.add_argument("--factors", default="1,1.5,2,4,8")
    p.add_argument("--recent", type=int, default=None, help="infinigen --recent (default: the policy's, 64)")
    p.add_argument("--check-factor", type=float, default=2.0, help="runtime check of one factor (0: skip)")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--out", default=None, help="folder: the run is appended to hits.jsonl")
    args = p.parse_args(argv)
    from minigen.llm import LLM
    try:
        llm = LLM(args.model, policy="infinigen", device=args.device, dtype=args.dtype,
                  max_seq_len=args.context + args.new_tokens + 1, cuda_graph=False)
    except ValueError as e:   # e.g. --context + --new-tokens past the model's context
        raise SystemExit(f"error: {e} (--context + --new-tokens + 1)") from None
    ids = llm.tokenizer.encode(read_text(args.text))
    if len(ids) < args.context:
        raise SystemExit(f"error: --text has {len(ids)} tokens, fewer than --context {args.context}")
    ids = ids[:args.context]
    header = dict(model=args.model or "default", context=args.context, new_tokens=args.new_tokens, device=str(llm.device),
                  dtype=str(llm.dtype).removeprefix("torch."), torch=torch.__version__, text=args.text,
                  command="python bench/reuse_hits.py " + " ".join(sys.argv[1:] if argv is None else argv))
    runs = []
    for b in (float(x) for x in args.budgets.split(",")):
        opts = dict(alpha=math.inf, budget=b, **({} if args.recent is None else {"recent": args.recent}))
        print(f"budget {b}: generating {args.new_tokens} tokens after {args.context}", file=sys.stderr)
        steps, stats, info = generate(llm, ids, args.new_tokens, opts, record=True)
        run = dict(budget=b, recent=args.recent, fetched_fraction=round(stats["fetched_fraction"], 4), max_select=info["max_select"],
                   steps=len(steps), overlap=replay(steps, info, None),
                   resident=[replay(steps, info, float(f)) for f in args.factors.split(",")])
        if args.check_factor:
            print(f"budget {b}: the runtime with --reuse {args.check_factor}", file=sys.stderr)
            _, st, _ = generate(llm, ids, args.new_tokens, dict(opts, reuse=args.check_factor), record=False)
            want = replay(steps, info, args.check_factor)
            run["check"] = dict(factor=args.check_factor, runtime_hit_rate=round(st["reuse_hit_rate"], 4),
                                replay_hit_rate=want["hit_rate"])
        runs.append(run)
        r = {x["factor"]: x["hit_rate"] for x in run["resident"]}
        print(f"budget {b}: overlap with the previous step {run['overlap']['hit_rate']:.1%}; resident hit rate "
              + ", ".join(f"{f}x {h:.1%}" for f, h in r.items()), file=sys.stderr)
    line = json.dumps(dict(header=header, runs=runs))
    print(line)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        with open(Path(args.out) / "hits.jsonl", "a") as f:
            f.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
