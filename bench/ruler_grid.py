"""RULER over a grid of KV policies and lengths on a real model, one JSON file per run, and the
report rendered from those files: each configuration's mean over the 13 tasks with its standard
error, and the KV it read, by length; the accuracy-vs-KV-read plot.

    python bench/ruler_grid.py --model qwen2.5-coder-1.5b --lengths 8192,16384 --samples 20 --out bench/results/ruler
    python bench/ruler_grid.py --model qwen2.5-coder-1.5b --lengths 32768 --samples 20 \
        --configs "dense,infinigen,infinigen 2%,quest 5%" --out bench/results/ruler
    python bench/ruler_grid.py --render bench/results/ruler          # ruler.md and ruler.png only

The model is loaded once; each configuration gets a fresh engine (minigen.eval.ruler.run_ruler:
greedy, `--batch` prompts generated together). A run whose file exists in --out is skipped, so a
grid can be spread over several GPU sessions and the report always renders from every committed
run. Standard error of the mean over tasks: sqrt(sum_t var_t / n_t) / 13, var_t the variance of
task t's per-sample scores (0-100) over its n_t samples. Sparse policies are compared at equal
mean read: h2o, window and quest keep the same share of the tokens as infinigen fetches.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from pathlib import Path

import torch

import decode as D

INF = math.inf
CONFIGS = {   # label -> (policy, options)
    "dense": ("dense", {}),
    "infinigen": ("infinigen", {}),                                   # its defaults (4.9%, alpha off)
    **{f"infinigen {p}%": ("infinigen", {"alpha": INF, "budget": p / 100}) for p in (1, 2, 5, 10)},
    "infinigen a5": ("infinigen", {"alpha": 5.0, "budget": 0.2}),      # the paper's threshold, capped
    "infinigen a8": ("infinigen", {"alpha": 8.0, "budget": 0.2}),
    **{f"{p} {b}%": (p, {"budget": b / 100}) for p in ("quest", "h2o", "window") for b in (2, 5)},
    "int4": ("int4", {}),
}


def slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "_", label).strip("_")


def standard_error(res: dict, length: str) -> float:
    """SE of the mean over tasks from the per-sample scores."""
    tasks = [t[length] for t in res["tasks"].values() if length in t]
    var = 0.0
    for t in tasks:
        s = [x["score"] for x in t["samples"]]
        m = sum(s) / len(s)
        var += (sum((x - m) ** 2 for x in s) / (len(s) - 1) if len(s) > 1 else 0.0) / len(s)
    return math.sqrt(var) / len(tasks)


def run_grid(args) -> None:
    from minigen.eval.ruler import ruler, run_ruler
    from minigen.llm import LLM
    from minigen.device import resolve_device
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lengths = [int(x) for x in args.lengths.split(",")]
    tasks = list(ruler()) if args.tasks == "all" else args.tasks.split(",")
    key = dict(model=args.model or "default", samples=args.samples, seed=args.seed, tasks=tasks)
    todo = []
    for L in lengths:
        for c in args.configs.split(","):
            f = out / f"ruler_{L}_{slug(c)}.json"
            if not f.exists():
                todo.append((L, c))
                continue
            old = json.loads(f.read_text())   # a run already there must be of this grid
            have = dict(model=old["model"], samples=old["samples"], seed=old.get("seed"), tasks=list(old["tasks"]))
            if have != key:
                raise SystemExit(f"error: {f} holds a run of another grid ({have}); this one is {key}: "
                                 f"use another --out")
    if not todo:
        print("every run of the grid is in --out already", file=sys.stderr)
        return
    device = resolve_device(args.device)
    llm = LLM(args.model, device=str(device), dtype=args.dtype, max_seq_len=max(lengths),
              batch_invariant=device.type == "cpu")   # on the CPU, scores that do not depend on --batch
    llm.skew()          # before any run: for OPT it is folded into the weights, which every policy then shares
    for L, label in todo:
        policy, opts = CONFIGS[label]
        llm.use_policy(policy, opts)                  # a fresh engine for this configuration
        print(f"ruler {L} tokens, {label}", file=sys.stderr)
        t0 = time.perf_counter()
        res = run_ruler(llm, tasks, [L], args.samples, batch=args.batch, seed=args.seed, progress=not args.quiet)
        res.update(config=label, policy=policy, policy_opts={k: str(v) if v == INF else v for k, v in opts.items()},
                   model=args.model or "default", seed=args.seed, device=str(llm.device), dtype=str(llm.dtype).removeprefix("torch."),
                   gpu=torch.cuda.get_device_name() if llm.device.type == "cuda" else None, torch=torch.__version__,
                   seconds=round(time.perf_counter() - t0, 1),
                   command="python bench/ruler_grid.py " + " ".join(sys.argv[1:]))
        tmp = out / f".ruler_{L}_{slug(label)}.json.tmp"      # whole files only: a killed run leaves none
        tmp.write_text(json.dumps(res))
        tmp.replace(out / f"ruler_{L}_{slug(label)}.json")
        print(f"  mean {res['mean'][str(L)]:.2f} +- {standard_error(res, str(L)):.2f}, read "
              f"{res.get('fetched_fraction', 1.0):.4f} ({res['seconds']} s)", file=sys.stderr)
    llm.close()


def render(folder: Path) -> None:
    runs = [json.loads(p.read_text()) for p in sorted(folder.glob("ruler_*.json"))]
    if not runs:
        raise SystemExit(f"error: no ruler_*.json in {folder}")
    rows: dict = {}
    for r in runs:
        L = str(r["lengths"][0])
        rows.setdefault(r["config"], {})[L] = (r["mean"][L], standard_error(r, L), r.get("fetched_fraction", 1.0),
                                               r["samples"], r.get("gpu") or r["device"])
    lengths = sorted({L for by in rows.values() for L in by}, key=int)
    order = [c for c in CONFIGS if c in rows] + [c for c in rows if c not in CONFIGS]
    machines = sorted({v[4] for by in rows.values() for v in by.values()})
    md = ["# RULER by KV policy and length", "",
          f"{runs[0]['model']}, {runs[0]['dtype']}, {', '.join(machines)}; `bench/ruler_grid.py` (the command is in each "
          "run's file). Mean of the task scores (0-100; RULER's 13 tasks unless a run's file lists fewer) +- its standard error; read = the mean fraction of the "
          "cached KV a decode step reads (int4: its bytes relative to 16-bit KV); n = samples per task.", "",
          "| configuration | " + " | ".join(f"{L} tokens | read | n" for L in lengths) + " |",
          "|---|" + "---:|---:|---:|" * len(lengths)]
    for c in order:
        cells = []
        for L in lengths:
            v = rows[c].get(L)
            cells += [f"{v[0]:.2f} +- {v[1]:.2f}", f"{v[2]:.4f}", str(v[3])] if v else ["", "", ""]
        md.append(f"| {c} | " + " | ".join(cells) + " |")
    (folder / "ruler.md").write_text("\n".join(md) + "\n")
    plt = D.pyplot("ruler.png")
    if plt is None:
        return
    fig, axes = plt.subplots(1, len(lengths), figsize=(5.5 * len(lengths), 4.5), squeeze=False)
    for ax, L in zip(axes[0], lengths):
        for c in order:
            if L in rows[c]:
                m, se, read = rows[c][L][:3]
                ax.errorbar([read], [m], yerr=[se], marker="o", capsize=3, label=c)
        ax.set(xscale="log", xlabel="fraction of the KV read per step", ylabel="RULER mean", title=f"{L} tokens")
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(folder / "ruler.png", dpi=120)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="model path or alias (default: the embedded default model)")
    p.add_argument("--lengths", default="8192")
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma list of: {', '.join(CONFIGS)}")
    p.add_argument("--tasks", default="all")
    p.add_argument("--samples", type=int, default=20)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--out", default="bench/results/ruler")
    p.add_argument("--render", default=None, metavar="FOLDER", help="only render FOLDER's runs")
    args = p.parse_args(argv)
    if args.render:
        render(Path(args.render))
        return 0
    wrong = [c for c in args.configs.split(",") if c not in CONFIGS]
    if wrong:
        raise SystemExit(f"error: unknown --configs {', '.join(wrong)}; choose from {', '.join(CONFIGS)}")
    run_grid(args)
    render(Path(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
