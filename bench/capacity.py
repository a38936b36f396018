"""What fits: for a model (or a named shape) at a context, the most sequences each policy can serve
under a GPU memory budget and a host RAM limit, from minigen's memory plan (minigen/memory.py: the
policy allocated on the meta device, the weights and the activations), and the bytes each
sequence then moves over PCIe per decode step. Arithmetic, not a measurement: runs anywhere.

    python bench/capacity.py --shape llama3-8b --contexts 32768,131072 --budgets 24G,48G --host-ram 100G \
        --out bench/results/throughput
    python bench/capacity.py --model qwen2.5-coder-1.5b --contexts 32768 --budgets 24G,48G

Per policy and budget: `batch` = min(GPU cap, host cap); `binds` says which; per sequence the GPU
state (KV, or infinigen's partial keys, selection buffers, resident rows and its two dense layers),
the host pool, and the PCIe bytes of one step (infinigen at its selection cap with no row resident;
offload everything; int4 its packed records).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

CONFIGS = {   # label -> (policy, options): bench/throughput.py's
    "dense": ("dense", {}), "offload": ("offload", {}), "int4": ("int4", {}),
    "infinigen": ("infinigen", {}), "infinigen+reuse": ("infinigen", {"reuse": 2.0}),
    "infinigen 2%": ("infinigen", {"budget": 0.02}), "infinigen 2%+reuse": ("infinigen", {"budget": 0.02, "reuse": 2.0}),
}


def pcie_bytes_per_seq(policy: str, opts: dict, cfg, dtype: torch.dtype, context: int) -> int:
    """Host -> GPU bytes of one decode step of one sequence at `context` tokens."""
    from minigen.kv import make_policy
    from minigen.kernels.ops import Ops
    from minigen.memory import policy_bytes
    elem = dtype.itemsize
    if policy == "dense":
        return 0
    if policy == "offload":
        return context * cfg.kv_bytes_per_token(elem)
    if policy == "int4":   # its records: K and V of every layer, packed (the pool's bytes per token)
        return policy_bytes("int4", cfg, dtype, 1, context)[1]
    kv = make_policy("infinigen", cfg, ops=Ops(use_triton=False), device=torch.device("meta"), dtype=dtype,
                     skew=None, **opts)
    kv.allocate(1, context)                                   # on the meta device: sizes only, its cap
    return kv.pool_layers * cfg.num_kv_heads * kv.max_select * 2 * cfg.head_dim * elem


def capacity(cfg, dtype, context: int, budget: int, host_ram: int, labels) -> list[dict]:
    from minigen.memory import most_slots, plan
    rows = []
    for label in labels:
        policy, opts = CONFIGS[label]
        one, two = plan(cfg, dtype, policy, 1, context, opts), plan(cfg, dtype, policy, 2, context, opts)
        gpu_cap = most_slots(cfg, dtype, policy, budget, context, opts)
        host_per_seq = two.host - one.host
        host_cap = host_ram // host_per_seq if host_per_seq else None
        batch = gpu_cap if host_cap is None else min(gpu_cap, host_cap)
        rows.append(dict(config=label, batch=batch, gpu_cap=gpu_cap, host_cap=host_cap,
                         binds="GPU" if host_cap is None or gpu_cap <= host_cap else "host RAM",
                         weights_gib=round(one.weights / 2**30, 2),
                         gpu_per_seq_gib=round((two.kv - one.kv) / 2**30, 3),
                         host_per_seq_gib=round(host_per_seq / 2**30, 2),
                         pcie_mb_per_seq_step=round(pcie_bytes_per_seq(policy, opts, cfg, dtype, context) / 1e6, 1)))
    return rows


def render(runs: list[dict]) -> str:
    md = ["# What fits: the memory plan by policy", "",
          "From `bench/capacity.py` (minigen's memory plan: allocation sizes, not measurements). batch = the most "
          "sequences under both the GPU budget and the host RAM limit; PCIe MB per sequence and step: infinigen at "
          "its selection cap with no row resident (with --reuse, times 1 - the hit rate).", ""]
    for r in runs:
        h = r["header"]
        md += [f"## {h['model']}, {h['context']} tokens, GPU budget {h['budget_gib']} GiB, host RAM {h['host_ram_gib']} GiB",
               "", f"`{h['command']}`", "",
               "| policy | batch | binds | GPU cap | host cap | weights GiB | GPU GiB / seq | host GiB / seq | PCIe MB / seq / step |",
               "|---|---|---|---|---|---|---|---|---|"]
        for x in r["rows"]:
            md.append(f"| {x['config']} | {x['batch']} | {x['binds']} | {x['gpu_cap']} | {x['host_cap'] if x['host_cap'] is not None else '-'} "
                      f"| {x['weights_gib']} | {x['gpu_per_seq_gib']} | {x['host_per_seq_gib']} | {x['pcie_mb_per_seq_step']} |")
        md.append("")
    return "\n".join(md)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--shape", help="a named shape of bench/decode.py")
    src.add_argument("--model", help="a model path or alias (its config only is read)")
    p.add_argument("--contexts", default="32768")
    p.add_argument("--budgets", default="24G,48G")
    p.add_argument("--host-ram", default="100G", help="host RAM the pinned pools may take")
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--dtype", default="float16")
    p.add_argument("--out", default=None, help="folder: capacity.jsonl appended, capacity.md rendered from it")
    args = p.parse_args(argv)
    from minigen.device import parse_size, resolve_dtype
    dtype = resolve_dtype(args.dtype, torch.device("cuda"))
    if args.shape:
        import decode as D
        cfg, name = D.shape_config(args.shape, max(int(c) for c in args.contexts.split(",")))[0], args.shape
    else:
        from minigen.load import load_checkpoint
        cfg, name = load_checkpoint(args.model).config, args.model
    host_ram = parse_size(args.host_ram, "--host-ram", "")
    if isinstance(host_ram, float):
        raise SystemExit("error: --host-ram must be bytes (e.g. 100G)")
    runs = []
    for context in (int(c) for c in args.contexts.split(",")):
        if context > cfg.max_seq_len:
            raise SystemExit(f"error: {name} has a context of {cfg.max_seq_len} tokens, less than {context}")
        for b in args.budgets.split(","):
            budget = parse_size(b, "--budgets", "")
            if isinstance(budget, float):
                raise SystemExit("error: --budgets must be bytes (e.g. 24G)")
            header = dict(model=name, context=context, budget_gib=round(budget / 2**30, 1),
                          host_ram_gib=round(host_ram / 2**30, 1), dtype=args.dtype,
                          command="python bench/capacity.py " + " ".join(sys.argv[1:] if argv is None else argv))
            runs.append(dict(header=header, rows=capacity(cfg, dtype, context, budget, host_ram, args.configs.split(","))))
    for r in runs:
        print(json.dumps(r))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "capacity.jsonl", "a") as f:
            for r in runs:
                f.write(json.dumps(r) + "\n")
        lines = [json.loads(x) for x in (out / "capacity.jsonl").read_text().splitlines() if x.strip()]
        (out / "capacity.md").write_text(render(lines))
    else:
        print(render(runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
