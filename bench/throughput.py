"""Aggregate decode throughput against batch size under a GPU memory budget: every policy at every
batch its memory plan fits, with the ceilings of the same run (HBM copy, pinned H2D), infinigen's
compute alone, and the PCIe floor of the bytes each policy moves per step.

    python bench/throughput.py --shape llama3-8b --context 32768 --gpu-memory 24G --out bench/results/throughput
    python bench/throughput.py --shape llama3-8b --context 131072 --batches 1 --gpu-memory 24G --out ...
    python bench/throughput.py --model qwen2.5-coder-1.5b --text FILE --context 32768 --gpu-memory 24G --out ...
    python bench/throughput.py --render bench/results/throughput      # throughput.md and throughput.png

Per policy (--configs): the batches of --batches whose plan (minigen/memory.py) fits the budget and
the host RAM are run on ONE engine allocated for the largest of them (the smaller batches use the
first sequences of it); the first batch that does not fit is recorded with the one-line refusal.
A shape (random weights) starts from a random-filled cache and samples at temperature 1 (random
weights give no meaningful selection overlap between steps: the reuse hit rate there is a lower
bound, not a prediction); --text prefills windows of real text and decodes greedily, the setting in
which hit rates mean something. Each batch: its decode graph captured, 2 warm-up steps, then
--steps steps timed with CUDA events (sampling included, one sync at the end).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import decode as D

CONFIGS = {   # label -> (policy, options)
    "dense": ("dense", {}),
    "offload": ("offload", {}),
    "int4": ("int4", {}),
    "infinigen": ("infinigen", {}),
    "infinigen+reuse": ("infinigen", {"reuse": 2.0}),
    "infinigen 2%": ("infinigen", {"budget": 0.02}),
    "infinigen 2%+reuse": ("infinigen", {"budget": 0.02, "reuse": 2.0}),
}


PREFILL_TOKENS = 16384   # the engine's prefill chunk, which the memory plan sizes activations for


def counters(kv) -> tuple[int, int]:
    """(rows selected, rows found resident) so far, for infinigen; (0, 0) otherwise (syncs)."""
    if not hasattr(kv, "_num_fetched"):
        return 0, 0
    return int(kv._num_fetched.item()), int(kv.reuse.hits.item()) if kv.reuse else 0


def pcie_bytes(kv, policy: str, batch: int, context: int, cfg, elem: int, rows: int) -> float:
    """Bytes one step moves host -> GPU: infinigen the missed rows (K and V of one head each),
    offload every layer's K/V, int4 its packed records."""
    if policy == "infinigen":
        return rows * 2 * cfg.head_dim * elem
    if policy in ("offload", "int4"):
        return batch * context * cfg.kv_bytes_per_token(elem) * kv.stats()["fetched_fraction"]
    return 0.0


def prepare(model, policy, opts, bmax, context, steps, text_ids):
    """An engine for bmax sequences of `context` tokens: random K/V, or real windows prefilled; and
    the first decode tokens (the prefill's greedy ones for real text, else None)."""
    from minigen.engine import Engine
    eng = Engine(model, D._NoTokenizer(), policy=policy, max_batch=bmax, max_seq_len=context + steps + 8,
                 max_prefill_tokens=PREFILL_TOKENS, policy_opts=opts)
    if text_ids is None:
        seqs = [eng.new_sequence([]) for _ in range(bmax)]
        D.fill_cache(eng.kv)
        for s in seqs:
            s.cached_ids = [0] * context
        return eng, seqs, None
    else:
        stride = max(1, (len(text_ids) - context) // max(1, bmax - 1))
        seqs = [eng.new_sequence(text_ids[(b * stride) % (len(text_ids) - context + 1):][:context]) for b in range(bmax)]
        first = eng.prefill(seqs).argmax(-1)
    return eng, seqs, first


def time_batch(eng, seqs, steps: int, greedy: bool, first: torch.Tensor | None = None) -> dict:
    """Decode steps of these sequences: ms per step (sampling included), rows selected and resident."""
    from minigen.sampler import SamplingParams, sample_no_sync
    sp = SamplingParams(temperature=0 if greedy else 1.0, top_p=1.0)
    gen = torch.Generator(device=eng.device).manual_seed(0)
    g = eng._decode_graph(seqs)                 # captured here (its warm-up undone)
    start = (g.positions.clone(), g.seq_lens.clone(), list(g.host_start))
    tok = first[:len(seqs)].clone() if first is not None else g.tokens.random_(0, eng.model.config.vocab_size).clone()

    def run(n):
        nonlocal tok
        for _ in range(n):
            g.tokens.copy_(tok)
            tok = sample_no_sync(eng.decode_step(g), sp, gen)
    run(2)
    sel0, hit0 = counters(eng.kv)
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    run(steps)
    e1.record()
    torch.cuda.synchronize()
    sel1, hit1 = counters(eng.kv)
    g.positions.copy_(start[0])                 # the next batch starts from the same context
    g.seq_lens.copy_(start[1])
    g.host_start = start[2]
    return dict(step_ms=e0.elapsed_time(e1) / steps, selected=(sel1 - sel0) / steps, hits=(hit1 - hit0) / steps)


def compute_alone_ms(eng, seqs, steps: int) -> float:
    """infinigen's step without its PCIe gathers (captured as the step is)."""
    with D.without_gather(eng.kv):
        eng._graphs.clear()
        ms = time_batch(eng, seqs, steps, greedy=True)["step_ms"]
    eng._graphs.clear()
    return ms


def run_config(model, label, cfg, dtype, budget, batches, context, steps, text_ids, h2d) -> list[dict]:
    from minigen.errors import MemoryBudgetError
    from minigen.memory import check, plan
    policy, opts = CONFIGS[label]
    rows, fits = [], []
    for b in batches:
        p = plan(cfg, dtype, policy, b, context + steps + 8, opts, prefill_tokens=PREFILL_TOKENS)
        try:
            check(p, budget, cfg, dtype, opts)
            fits.append((b, p))
        except MemoryBudgetError as e:
            rows.append(dict(config=label, batch=b, status="refused", reason=str(e)))
            break
    if not fits:
        return rows
    bmax = fits[-1][0]
    elem = dtype.itemsize
    t0 = time.perf_counter()
    try:
        eng, seqs, first = prepare(model, policy, opts, bmax, context, steps, text_ids)
    except torch.OutOfMemoryError as e:
        return rows + [dict(config=label, batch=bmax, status="oom", reason=str(e).splitlines()[0])]
    print(f"  {label}: engine for {bmax} x {context} tokens in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    torch.cuda.reset_peak_memory_stats()
    out = []
    for b, p in fits:
        r = time_batch(eng, seqs[:b], steps, greedy=text_ids is not None, first=first)
        missed = r["selected"] - r["hits"]
        moved = pcie_bytes(eng.kv, policy, b, context, model.config, elem, missed)
        row = dict(config=label, policy=policy, opts=D.jsonable(opts), batch=b, status="ok",
                   step_ms=round(r["step_ms"], 3), tok_s=round(b * 1000 / r["step_ms"], 1),
                   plan_gpu_gib=round(p.device / 2**30, 2), plan_host_gib=round(p.host / 2**30, 2),
                   pcie_mb_per_step=round(moved / 1e6, 2), pcie_floor_ms=round(moved / (h2d * 1e6), 3))
        if policy == "infinigen":
            row.update(fetched_fraction=round(eng.kv.stats()["fetched_fraction"], 4),
                       rows_per_step=round(r["selected"], 1),
                       hit_rate=round(r["hits"] / r["selected"], 4) if r["selected"] else 0.0)
        out.append(row)
        print(f"  {label} B={b}: {row['step_ms']:.2f} ms, {row['tok_s']:.0f} tok/s"
              + (f", hit {row['hit_rate']:.1%}" if "hit_rate" in row and opts.get("reuse") else ""), file=sys.stderr)
    peak = torch.cuda.max_memory_allocated() / 2**30
    for row in out:
        row["peak_gpu_gib"] = round(peak, 2)     # the engine of the largest batch, which all of them share
    if policy == "infinigen":   # at the largest batch: compute alone, and the step against its parts
        c = compute_alone_ms(eng, seqs, steps)
        last = out[-1]
        last.update(compute_ms=round(c, 3), x_max_parts=round(last["step_ms"] / max(c, last["pcie_floor_ms"]), 3))
    eng.close()
    del eng, seqs
    D.free_gpu()
    return out + rows


def render(folder: Path) -> None:
    """throughput.md (a table per run) and throughput.png (tok/s against batch) from results.jsonl."""
    runs = [json.loads(line) for line in (folder / "results.jsonl").read_text().splitlines() if line.strip()]
    md = ["# Aggregate decode throughput under a GPU memory budget", "",
          "From `bench/throughput.py` (the command in each header); tok/s = batch / step time, sampling included.", ""]
    for run in runs:
        h = run["header"]
        md += [f"## {h['model']}, {h['context']} tokens, budget {h['budget_gib']} GiB ({h['gpu']})", "",
               f"`{h['command']}`  ", f"HBM copy {h['hbm_copy_gbps']} GB/s, pinned H2D {h['pinned_h2d_gbps']} GB/s, "
               f"torch {h['torch']}, weights {h['weights_gib']} GiB.", "",
               "| policy | batch | tok/s | ms/step | fetched | hit rate | PCIe MB/step | PCIe floor ms | compute alone ms | peak GiB |",
               "|---|---|---|---|---|---|---|---|---|---|"]
        for r in run["rows"]:
            if r["status"] != "ok":
                md.append(f"| {r['config']} | {r['batch']} | {r['status']}: {r['reason']} |||||||| ")
                continue
            fmt = lambda k, f="{}": f.format(r[k]) if k in r else ""   # noqa: E731
            md.append(f"| {r['config']} | {r['batch']} | {r['tok_s']} | {r['step_ms']} | {fmt('fetched_fraction', '{:.1%}')} "
                      f"| {fmt('hit_rate', '{:.1%}') if r['opts'].get('reuse') else ''} | {r['pcie_mb_per_step']} "
                      f"| {r['pcie_floor_ms']} | {fmt('compute_ms')} | {r['peak_gpu_gib']} |")
        best = {}
        for r in run["rows"]:
            if r["status"] == "ok" and r["tok_s"] > best.get(r["config"], (0,))[0]:
                best[r["config"]] = (r["tok_s"], r["batch"])
        if "dense" in best:
            d = best["dense"][0]
            md += ["", "Best of each against the best dense batch that fits: " + ", ".join(
                f"{k} {v[0]} tok/s at batch {v[1]} ({v[0] / d:.2f}x)" for k, v in best.items())]
        elif any(r["config"] == "dense" for r in run["rows"]):
            md += ["", "dense does not fit this budget at any batch (refused before loading)."]
        md.append("")
    (folder / "throughput.md").write_text("\n".join(md))
    plt = D.pyplot("throughput.png")
    if plt is None:
        return
    fig, axes = plt.subplots(1, len(runs), figsize=(6 * len(runs), 4.5), squeeze=False)
    for ax, run in zip(axes[0], runs):
        h = run["header"]
        for label in dict.fromkeys(r["config"] for r in run["rows"]):
            pts = [(r["batch"], r["tok_s"]) for r in run["rows"] if r["config"] == label and r["status"] == "ok"]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=label)
        ax.set(xlabel="batch", ylabel="tokens/s (all sequences)", xscale="log", yscale="log",
               title=f"{h['model']} {h['context'] // 1024}K, {h['budget_gib']} GiB ({h['gpu']})")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(folder / "throughput.png", dpi=120)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", choices=sorted(D.SHAPES), help="named shape with random weights")
    p.add_argument("--model", help="a real model (path or alias); with --text")
    p.add_argument("--text", help="with --model: prefill windows of this text, decode greedily")
    p.add_argument("--context", type=int, default=32768)
    p.add_argument("--gpu-memory", default="24G", help="the budget (bytes, e.g. 24G, or a fraction)")
    p.add_argument("--batches", default="1,2,4,8,16")
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma list of: {', '.join(CONFIGS)}")
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--dtype", default="float16")
    p.add_argument("--out", default=None, help="folder: the run is appended to results.jsonl, then rendered")
    p.add_argument("--render", default=None, help="only render FOLDER's results.jsonl")
    args = p.parse_args(argv)
    if args.render:
        render(Path(args.render))
        return 0
    if bool(args.shape) == bool(args.model) or bool(args.text) != bool(args.model):
        raise SystemExit("error: give --shape, or --model with --text")
    wrong = [c for c in args.configs.split(",") if c not in CONFIGS]
    if wrong:
        raise SystemExit(f"error: unknown --configs {', '.join(wrong)}; choose from {', '.join(CONFIGS)}")
    if not torch.cuda.is_available():
        raise SystemExit("error: bench/throughput.py times CUDA decode; no GPU is visible")
    from minigen.device import resolve_dtype
    from minigen.memory import hold_to_budget, resolve_budget
    dev = torch.device("cuda")
    dtype = resolve_dtype(args.dtype, dev)
    budget = resolve_budget(args.gpu_memory, dev)
    hbm, h2d = D.hbm_copy_gbps(), D.pinned_h2d_gbps()
    max_len = args.context + args.steps + 8
    text_ids = None
    if args.shape:
        model, _ = D.random_model(args.shape, dtype, max_len)
        name = args.shape
    else:
        from minigen.load import load_model
        model, tok = load_model(args.model, device=dev, dtype=dtype)
        text_ids = tok.encode(Path(args.text).read_text(errors="replace"))
        if len(text_ids) < args.context:
            raise SystemExit(f"error: --text has {len(text_ids)} tokens, fewer than --context {args.context}")
        name = args.model
    hold_to_budget(budget, dev)
    cfg = model.config
    rows = []
    for label in args.configs.split(","):
        rows += run_config(model, label, cfg, dtype, budget, [int(b) for b in args.batches.split(",")],
                           args.context, args.steps, text_ids, h2d)
    header = dict(model=name, context=args.context, budget_gib=round(budget / 2**30, 1), steps=args.steps,
                  dtype=args.dtype, gpu=torch.cuda.get_device_name(), torch=torch.__version__,
                  hbm_copy_gbps=round(hbm, 1), pinned_h2d_gbps=round(h2d, 1),
                  weights_gib=round(D.weight_bytes(model) / 2**30, 2),
                  command="python bench/throughput.py " + " ".join(sys.argv[1:] if argv is None else argv))
    line = json.dumps(dict(header=header, rows=rows))
    print(line)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "results.jsonl", "a") as f:
            f.write(line + "\n")
        render(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
