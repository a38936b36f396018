"""Shared command-line plumbing: model/policy/sampling flags and one-line errors."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from minigen.kv import POLICIES, POLICY_OPTIONS, check_policy_opts
from minigen.kv.eviction import EVICT_POLICIES, parse_cpu_kv_limit
from minigen.kv.offload import FETCHES


def add_model_args(p: argparse.ArgumentParser, default_policy: str = "dense") -> None:
    p.add_argument("--model", default=None,
                   help="HF model directory or .gguf file (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--policy", default=default_policy, choices=POLICIES + ("auto",),
                   help=f"KV cache policy; auto: dense when it fits the GPU memory, else infinigen "
                        f"(default: {default_policy})")
    p.add_argument("--gpu-memory", default=None,
                   help="GPU memory budget: bytes (e.g. 24G) or a fraction of the device's memory (e.g. 0.5); "
                        "a run that does not fit is refused before loading (default: no budget)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: bf16 on cuda, fp32 on cpu)")
    p.add_argument("--max-seq-len", type=int, default=None,
                   help="KV slot capacity in tokens (default: the model's context, at most 8192)")
    g = p.add_argument_group("policy settings (infinigen unless the help says otherwise)")
    g.add_argument("--alpha", type=float, default=None,
                   help="keep only tokens whose speculated logit is within alpha of the head's max, under the "
                        "budget cap (default: inf, no threshold: each KV head's top --budget; the paper's 5 for "
                        "Llama and 4 for OPT)")
    g.add_argument("--budget", type=float, default=None,
                   help="fraction of the context per KV head: infinigen's cap (default 0.049, at most 5%% read), "
                        "the tokens h2o, window and quest keep (default 0.2; quest in whole pages, at least the newest)")
    g.add_argument("--partial-ratio", type=float, default=None,
                   help="skewed columns kept per head, as a fraction of D (default 0.5)")
    g.add_argument("--dense-layers", type=int, default=None, help="first layers kept dense on the GPU (default 2)")
    g.add_argument("--recent", type=int, default=None,
                   help="infinigen: the last N cached tokens are always fetched, taking at most half of the "
                        "budget (default 64; 0 = the paper's selection, and the only choice with --cpu-kv-limit)")
    g.add_argument("--cpu-kv-limit", default=None,
                   help="host KV pool limit: bytes (e.g. 2000000000 or 2G) or a fraction in (0, 1] of the full pool "
                        "(e.g. 0.8); when full, the least-selected token outside the last 64 is overwritten")
    g.add_argument("--evict", choices=EVICT_POLICIES, default=None,
                   help="with --cpu-kv-limit: which row a new token overwrites when the pool is full: the "
                        "least-selected (counter, the default, as InfiniGen) or the oldest (fifo, for comparison)")
    g.add_argument("--reuse", type=float, default=None,
                   help="keep recently fetched K/V rows on the GPU, reuse x the selection cap per KV head (e.g. 4), "
                        "and fetch only the selected rows not already there (default 0: off)")
    g.add_argument("--sinks", type=int, default=None, help="window policy: first tokens always kept (default 4)")
    g.add_argument("--page-size", type=int, default=None, help="quest policy: tokens per page (default 16)")
    g.add_argument("--fetch", choices=FETCHES, default=None,
                   help="offload / int4: how the host pool reaches the GPU each step: the copy engine (an eager "
                        "step; offload's default) or the gather_kv kernel (a CUDA-graph step; int4's default on CUDA)")
    g.add_argument("--skew", default=None, help="skew artifact (.pt) from `python -m minigen.skew` (default: cached per model, computed on first use)")


# the policy settings that have a command-line flag, and which of them each policy takes
FLAGS = ("alpha", "budget", "partial_ratio", "dense_layers", "recent", "cpu_kv_limit", "evict", "sinks", "fetch",
         "skew", "reuse", "page_size")
POLICY_FLAGS = {p: tuple(o for o in opts if o in FLAGS) for p, opts in POLICY_OPTIONS.items()} | {"auto": ()}


def policy_opts(args) -> dict:
    """The policy settings given on the command line (only those set), checked against --policy and
    their ranges, before anything is loaded. --skew is checked here but passed to LLM on its own."""
    opts = {n: getattr(args, n) for n in FLAGS if getattr(args, n, None) is not None}
    if "cpu_kv_limit" in opts:
        opts["cpu_kv_limit"] = parse_cpu_kv_limit(opts["cpu_kv_limit"])
    wrong = [n for n in opts if n not in POLICY_FLAGS[args.policy]]
    if wrong:
        flags = ", ".join("--" + n.replace("_", "-") for n in wrong)
        takes = [p for p, f in POLICY_FLAGS.items() if all(n in f for n in wrong)]
        one = len(wrong) == 1
        raise ValueError(f"{flags} {'does' if one else 'do'} not apply to --policy {args.policy}"
                         + (f" ({'it applies' if one else 'they apply'} to: {', '.join(takes)})" if takes else ""))
    skew = opts.pop("skew", None)
    if skew is not None and not Path(skew).is_file():
        raise FileNotFoundError(f"--skew {skew}: no such file; leave --skew out to use the cached matrices "
                                f"(computed on first use) or make them with `python -m minigen.skew --out FILE`")
    if args.policy != "auto":
        check_policy_opts(args.policy, opts)
    return opts


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def user_errors():
    """Exception types that are the user's to fix: printed as one line, no traceback."""
    # ConfigError, LoadError and ContextOverflowError (minigen/errors.py) are ValueErrors
    return (ValueError, NotImplementedError, FileNotFoundError, torch.OutOfMemoryError, MemoryError)


def run_main(main) -> None:
    """Call main(); turn user errors into `error: ...` on stderr and exit status 2."""
    try:
        code = main()
    except user_errors() as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)
