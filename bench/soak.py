"""Soak: long generation with a KV policy; GPU and pinned host memory must stay flat after
warm-up, and closing the engine must release the pinned pool.

    python bench/soak.py --policy infinigen --batch 8 --new-tokens 4096 --text data/essays/avg.txt
Prints a JSON line: memory samples every --every steps, and host memory before/after close.
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch


def rss_gib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def host_pinned_gib() -> float:
    stats = torch.cuda.host_memory_stats() if hasattr(torch.cuda, "host_memory_stats") else {}
    return stats.get("allocated_bytes.current", stats.get("reserved_bytes.current", float("nan") * 0)) / 2**30


def main(argv=None) -> int:
    from minigen.llm import LLM
    from minigen.sampler import SamplingParams
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None)
    p.add_argument("--policy", default="infinigen")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt-tokens", type=int, default=1024)
    p.add_argument("--new-tokens", type=int, default=4096)
    p.add_argument("--every", type=int, default=256)
    p.add_argument("--text", required=True)
    p.add_argument("--gpu-memory", default=None, help="GPU memory budget (bytes, e.g. 24G, or a fraction): the run "
                   "is planned against it and refused when it does not fit, the allocator held to it")
    args = p.parse_args(argv)
    llm = LLM(args.model, policy=args.policy, device="cuda", max_seq_len=args.prompt_tokens + args.new_tokens + 1,
              gpu_memory=args.gpu_memory, max_batch=args.batch)
    ids = llm.tokenizer.encode(Path(args.text).read_text(errors="replace"))
    prompts = [ids[i * 97:][: args.prompt_tokens] for i in range(args.batch)]
    eng = llm.get_engine(args.batch)
    seqs = [eng.new_sequence(pr) for pr in prompts]
    samples, step, t0 = [], 0, time.perf_counter()
    sp = SamplingParams(max_new_tokens=args.new_tokens, temperature=0.8, seed=0, ignore_eos=True)
    for _ in eng.generate(seqs, sp):
        if step % args.every == 0:
            samples.append(dict(step=step, gpu_gib=round(torch.cuda.memory_allocated() / 2**30, 4),
                                gpu_reserved_gib=round(torch.cuda.memory_reserved() / 2**30, 4),
                                rss_gib=round(rss_gib(), 3), pinned_gib=round(host_pinned_gib(), 4)))
        step += 1
    elapsed = time.perf_counter() - t0
    stats = eng.kv.stats()
    before = dict(rss_gib=round(rss_gib(), 3), pinned_gib=round(host_pinned_gib(), 4))
    llm.close()
    gc.collect()
    after = dict(rss_gib=round(rss_gib(), 3), pinned_gib=round(host_pinned_gib(), 4),
                 gpu_gib=round(torch.cuda.memory_allocated() / 2**30, 4))
    warm = samples[1:] if len(samples) > 1 else samples
    flat = {k: round(max(s[k] for s in warm) - min(s[k] for s in warm), 4) for k in ("gpu_gib", "rss_gib", "pinned_gib")}
    print(json.dumps(dict(bench="soak", policy=args.policy, batch=args.batch, new_tokens=step, gpu_memory=llm.gpu_memory,
                          gpu=torch.cuda.get_device_name(), torch=torch.__version__,
                          seconds=round(elapsed, 1), tok_s=round(args.batch * step / elapsed, 1), kv=stats,
                          growth_after_warmup=flat, samples=samples, before_close=before, after_close=after)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
