"""Performance report: every KV policy on the same work, with the measured ceilings and
transformers' decode in the same run.

    python bench/report.py                          # GPU machine; writes bench/results/report/
    python bench/report.py --parts batch --append   # add one part to an earlier run's results

Parts (each appends JSON lines to perf.jsonl; the markdown and plots are rebuilt from all lines):
  ceilings      HBM device copy and pinned host->device bandwidth (bench/decode.py's functions)
  context       Llama-2-7B shape (random fp16 weights), batch 1, contexts 2K..32K, every policy
  batch         the same shape at 8K context, batch 1/4/8
  transformers  transformers' generate on the same shape, batch 1, 8K: dynamic, static
                (compiled) and offloaded caches
  realtext      the default model on real text, batch 32, 8K context: the engine's own generation
                loop, tokens/s, mean fetched fraction, peak GPU memory
Sparse policies run at a fixed 10% of the context (infinigen with the threshold off, so that
random weights, whose attention is nearly uniform, fetch a known amount; h2o and window keep 10%);
on real text infinigen runs with its default threshold.
Outputs: perf.jsonl, perf.md, perf_context.png, perf_batch.png.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import decode as D

ROOT = Path(__file__).resolve().parents[1]

POLICIES = ("dense", "offload", "int4", "infinigen", "h2o", "window")
FIXED = {"infinigen": dict(alpha=float("inf"), budget=0.1), "h2o": dict(budget=0.1), "window": dict(budget=0.1)}
STEPS = {"offload": 6, "int4": 8}     # slow steps: fewer of them
SHAPE = "llama2-7b"


def run_shape(part: str, points: list[tuple[int, int]], ceil: dict, emit, policies=POLICIES) -> None:
    """minigen on the random-weight shape at each (batch, context), every policy."""
    dtype = torch.float16
    model, _ = D.random_model(SHAPE, dtype, max(c for _, c in points) + 64)
    for batch, context in points:
        for policy in policies:
            opts = FIXED.get(policy, {})
            t0 = time.perf_counter()
            try:
                m = D.measure_minigen(model, policy=policy, batch=batch, context=context,
                                      steps=STEPS.get(policy, 16), opts=dict(opts), hbm=ceil["hbm"], h2d=ceil["h2d"])
            except (torch.OutOfMemoryError, MemoryError) as e:   # reported, not hidden
                m = dict(error=f"{type(e).__name__}: {str(e).splitlines()[0][:160]}")
            D.free_gpu()
            emit(dict(part=part, model=SHAPE, policy=policy, opts=D.jsonable(opts), batch=batch, context=context,
                      seconds=round(time.perf_counter() - t0, 1), **m))
    del model
    D.free_gpu()


def run_transformers(ceil: dict, emit) -> None:
    hf = D.SHAPES[SHAPE]
    for mode in ("dynamic", "static", "offloaded"):
        t0 = time.perf_counter()
        try:
            t = D.time_transformers(hf, batch=1, context=8192, steps=16, mode=mode,
                                    dtype=torch.float16)
            t["tok_s"] = round(1000 / t["step_ms"], 1)
        except Exception as e:  # a baseline that cannot run here is reported, not hidden
            t = dict(error=f"{type(e).__name__}: {str(e)[:200]}")
        D.free_gpu()
        emit(dict(part="transformers", model=SHAPE, policy=f"transformers {mode}", batch=1, context=8192,
                  seconds=round(time.perf_counter() - t0, 1), **t))


def run_realtext(text: str, emit, policies=POLICIES) -> None:
    from minigen.load import load_model
    from minigen.calibrate import load_skew_for
    dtype = torch.bfloat16
    model, tok = load_model(None, device=torch.device("cuda"), dtype=dtype)
    skew = load_skew_for(model, tok, None)
    for policy in policies:
        opts = dict(skew=skew) if policy == "infinigen" else dict(budget=0.1) if policy in ("h2o", "window") else {}
        t0 = time.perf_counter()
        try:
            r = D.time_real_text(model, tok, policy=policy, batch=32, context=8000, steps=64, text=text, opts=opts)
        except (torch.OutOfMemoryError, MemoryError) as e:
            r = dict(error=f"{type(e).__name__}: {str(e).splitlines()[0][:160]}")
        D.free_gpu()
        opts.pop("skew", None)
        emit(dict(part="realtext", model="SmolLM2-135M-Instruct", policy=policy, opts=D.jsonable(opts), batch=32,
                  context=8000, seconds=round(time.perf_counter() - t0, 1), **r))


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------
def fmt(v, spec=".2f"):
    return format(v, spec) if isinstance(v, (int, float)) else "-"


def write_report(rows: list[dict], out: Path) -> None:
    ceil = [r for r in rows if r["part"] == "ceilings"]
    L = ["# Performance report", ""]
    if ceil:
        c = ceil[-1]
        L += [f"{c['gpu']}, torch {c['torch']}. Measured ceilings: HBM copy {c['hbm_copy_gbps']} GB/s, "
              f"pinned host-to-device {c['pinned_h2d_gbps']} GB/s.", ""]
    for part, title in (("context", "Llama-2-7B shape, batch 1, by context"),
                        ("batch", "Llama-2-7B shape, 8K context, by batch")):
        sub = [r for r in rows if r["part"] == part]
        if not sub:
            continue
        L += [f"## {title}", "", "Step = one decode step of the whole batch (CUDA events, captured graph where the "
              "policy allows). Floor = (weights + all K/V bytes) / HBM copy bandwidth (h2o and window read 10% of the K/V, so they can go below it); PCIe floor = bytes the "
              "policy moves per step / pinned H2D bandwidth (offload, int4). infinigen: compute alone and transfer "
              "alone are timed separately in the same run.", "",
              "| batch | context | policy | step ms | tok/s | x HBM floor | PCIe floor ms | KV read | infinigen compute / transfer ms | peak GPU GiB | host pool GiB |",
              "|---:|---:|---|---:|---:|---:|---:|---:|---|---:|---:|"]
        for r in sub:
            if "error" in r:
                L.append(f"| {r['batch']} | {r['context']} | {r['policy']} | {r['error']} | | | | | | | |")
                continue
            parts = f"{r['compute_ms']:.2f} / {r['transfer_ms']:.2f}" if "compute_ms" in r else ""
            L.append(f"| {r['batch']} | {r['context']} | {r['policy']} | {r['step_ms']:.2f} | {r['tok_s']:.1f} | "
                     f"{r['x_floor']:.2f} | {fmt(r.get('pcie_floor_ms'))} | {fmt(r.get('fetched_fraction', 1.0), '.3f')} | "
                     f"{parts} | {r['peak_gpu_gib']:.1f} | {r['host_pool_gib']:.1f} |")
        L.append("")
    sub = [r for r in rows if r["part"] == "transformers"]
    if sub:
        L += ["## transformers, Llama-2-7B shape, batch 1, 8K context", "", "| cache | step ms | tok/s |", "|---|---:|---:|"]
        L += [f"| {r['policy']} | {fmt(r.get('step_ms'))} | {fmt(r.get('tok_s'), '.1f')} |" + (f" {r['error']}" if "error" in r else "")
              for r in sub]
        L.append("")
    sub = [r for r in rows if r["part"] == "realtext"]
    if sub:
        L += ["## Default model, real text (essays), batch 32, 8000-token prompts, 64 generated tokens", "",
              "The engine's own generation loop after a warm-up generate (kernel compilation and CUDA-graph capture "
              "excluded); infinigen with its defaults (alpha 5, budget 0.2, partial ratio 0.5 for this D = 64 model, the last 64 tokens always fetched), "
              "h2o and window keeping 10%.", "",
              "| policy | decode tok/s | ms/step | mean KV fraction read | peak GPU GiB |", "|---|---:|---:|---:|---:|"]
        L += [f"| {r['policy']} | {fmt(r.get('decode_tok_s'), '.1f')} | {fmt(r.get('decode_ms_per_step'))} | "
              f"{fmt(r.get('fetched_fraction', 1.0), '.4f')} | {fmt(r.get('peak_gpu_gib'))} |" for r in sub]
        L.append("")
    L += [f"![tokens/s by {part}](perf_{part}.png)\n" for part in ("context", "batch")
          if any(r.get("part") == part for r in rows)]
    (out / "perf.md").write_text("\n".join(L))


def plot(rows: list[dict], out: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed; no plots written", file=sys.stderr)
        return
    for part, x, xlabel in (("context", "context", "context (tokens)"), ("batch", "batch", "batch")):
        sub = [r for r in rows if r["part"] == part and "step_ms" in r]
        if not sub:
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        for policy in POLICIES:
            pts = sorted((r[x], r["tok_s"]) for r in sub if r["policy"] == policy)
            if pts:
                ax.plot(*zip(*pts), "o-", label=policy + (" (10%)" if policy in FIXED else ""))
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("tokens/s")
        ax.set_title(f"Llama-2-7B shape, fp16, {'batch 1' if part == 'context' else '8K context'}")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / f"perf_{part}.png", dpi=120)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--parts", default="ceilings,context,batch,transformers,realtext")
    p.add_argument("--contexts", default="2048,8192,16384,32000")
    p.add_argument("--batches", default="1,4,8")
    p.add_argument("--policies", default=",".join(POLICIES), help="minigen policies to run (comma-separated)")
    p.add_argument("--text", default=str(ROOT / "data" / "essays"), help="real text: a file or a folder of .txt")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "report"))
    p.add_argument("--append", action="store_true", help="keep earlier lines of perf.jsonl")
    p.add_argument("--render", action="store_true", help="only rebuild perf.md and the plots from perf.jsonl")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "perf.jsonl"
    rows = [json.loads(x) for x in path.read_text().splitlines()] if (args.append or args.render) and path.exists() else []
    if not args.render:
        if not torch.cuda.is_available():
            print("error: bench/report.py measures CUDA decode; no GPU is visible", file=sys.stderr)
            return 2
        parts, pols = args.parts.split(","), args.policies.split(",")
        with open(path, "a" if args.append else "w") as f:
            def emit(r):
                rows.append(r)
                f.write(json.dumps(r) + "\n")
                f.flush()
                print(json.dumps(r), flush=True)
            ceil = dict(hbm=D.hbm_copy_gbps(), h2d=D.pinned_h2d_gbps())
            if "ceilings" in parts or not args.append:
                emit(dict(part="ceilings", gpu=torch.cuda.get_device_name(), torch=torch.__version__,
                          hbm_copy_gbps=round(ceil["hbm"], 1), pinned_h2d_gbps=round(ceil["h2d"], 1)))
            if "context" in parts:
                run_shape("context", [(1, int(c)) for c in args.contexts.split(",")], ceil, emit, pols)
            if "batch" in parts:
                run_shape("batch", [(int(b), 8192) for b in args.batches.split(",")], ceil, emit, pols)
            if "transformers" in parts:
                run_transformers(ceil, emit)
            if "realtext" in parts:
                src = Path(args.text)
                files = sorted(src.glob("*.txt")) if src.is_dir() else [src]
                if not files or not files[0].exists():
                    raise SystemExit(f"error: no text at {src}: run `make data`")
                run_realtext("\n\n".join(f.read_text(errors="replace") for f in files), emit, pols)
    write_report(rows, out)
    plot(rows, out)
    print(f"wrote {out}/perf.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
