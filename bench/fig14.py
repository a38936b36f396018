"""minigen at the InfiniGen artifact's figure-14 setting, and the side-by-side table.

    python bench/fig14.py --out bench/results/peers/minigen.jsonl
    python bench/fig14.py --render bench/results/peers/artifact.jsonl bench/results/peers/minigen.jsonl

The setting (the artifact's scripts/figure14/run.sh): the OPT-13B shape with random fp16 weights
(the artifact runs FlexGen's dummy weights), batch 20, 1920 prompt tokens (random ids), 128
generated tokens, weights on the GPU, the KV cache in pinned host memory. Schemes, each against
the artifact's own:
    offload                  FlexGen (original)
    int4                     FlexGen + INT4 (--compress-cache)
    h2o                      FlexGen + H2O (--max-num-kv 415): minigen's h2o keeps the same share
                             (415 / 2048) but on the GPU, an accuracy baseline, not an offloading one
    infinigen artifact       InfiniGen at the artifact's settings: alpha 4, partial ratio 0.2, a cap
                             of 400 / 2048 of the context (400 tokens at 2048, 375 at the prompt's
                             1920: minigen's cap is a share of the tokens so far), no recent window
    infinigen                minigen's defaults
Time is measured as the artifact reports it: prefill (the prompts to the first token), decode (the
other 127 steps), total = both; throughput = batch x 128 / total. Compilation and graph capture
happen in a warm-up generation before the timed one.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

import decode as D

CONFIGS = {   # label -> (policy, options, the artifact scheme it stands against)
    "offload": ("offload", {}, "original"),
    "int4": ("int4", {}, "int4"),
    "h2o": ("h2o", {"budget": 415 / 2048}, "h2o"),
    "infinigen artifact": ("infinigen", {"alpha": 4.0, "partial_ratio": 0.2, "budget": 400 / 2048, "recent": 0}, "infinigen"),
    "infinigen": ("infinigen", {}, "infinigen"),
}


def run(model, label: str, bsz: int, prompt_len: int, gen_len: int) -> dict:
    from minigen.engine import Engine
    from minigen.sampler import SamplingParams
    policy, opts, _ = CONFIGS[label]
    torch.cuda.reset_peak_memory_stats()
    eng = Engine(model, D._NoTokenizer(), policy=policy, max_batch=bsz, max_seq_len=prompt_len + gen_len + 8,
                 max_prefill_tokens=16384, policy_opts=opts)
    gen = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    sp = SamplingParams(max_new_tokens=gen_len, temperature=0, ignore_eos=True)
    seqs, prefill, decode = D.timed_generate(
        eng, [torch.randint(4, vocab, (64,), generator=gen).tolist() for _ in range(bsz)],
        [torch.randint(4, vocab, (prompt_len,), generator=gen).tolist() for _ in range(bsz)], sp)
    assert all(len(s.output_ids) == gen_len for s in seqs)
    row = dict(system="minigen", config=label, policy=policy, opts=D.jsonable(opts), against=CONFIGS[label][2],
               bsz=bsz, prompt_len=prompt_len, gen_len=gen_len, total_s=round(prefill + decode, 3),
               prefill_s=round(prefill, 3), decode_s=round(decode, 3), tok_s=round(bsz * gen_len / (prefill + decode), 2),
               decode_tok_s=round(bsz * (gen_len - 1) / decode, 2), peak_gpu_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2),
               **{k: v for k, v in eng.kv.stats().items() if k in ("fetched_fraction", "host_pool_gib")})
    eng.close()
    D.free_gpu()
    return row


def render(artifact_file: Path, minigen_file: Path) -> str:
    """The side-by-side table (Markdown) from the two JSON-lines files of one GPU run (the artifact's
    harness, bench/peers/infinigen_artifact.py, and this script)."""
    # the last run of each file: the artifact's last row per scheme, minigen's rows after its last header
    art = {r["scheme"]: r for r in map(json.loads, artifact_file.read_text().splitlines()) if r.get("system") == "artifact"}
    lines = [json.loads(x) for x in minigen_file.read_text().splitlines() if x.strip()]
    last = max((i for i, r in enumerate(lines) if "header" in r), default=-1)
    head = lines[last]["header"] if last >= 0 else {}
    mg = [r for r in lines[last + 1:] if r.get("system") == "minigen"]
    md = ["# InfiniGen's artifact and minigen at the figure-14 setting", "",
          f"{head.get('gpu', '?')}; torch {head.get('torch', '?')}; pinned H2D {head.get('pinned_h2d_gbps', '?')} GB/s, "
          f"HBM copy {head.get('hbm_copy_gbps', '?')} GB/s (measured in minigen's run). OPT-13B shape, fp16, batch "
          f"{mg[0].get('bsz', '?') if mg else '?'}, {mg[0].get('prompt_len', '?') if mg else '?'} + "
          f"{mg[0].get('gen_len', '?') if mg else '?'} tokens; throughput = batch x generated tokens / (prefill + decode).", "",
          "| scheme | artifact tok/s | artifact prefill / decode s | minigen config | minigen tok/s | minigen prefill / decode s | minigen / artifact |",
          "|---|---|---|---|---|---|---|"]
    for r in mg:
        a = art.get(r["against"], {})
        if r.get("status") == "failed":
            md.append(f"| {r['against']} | {a.get('tok_s', a.get('status', 'not run'))} | | {r['config']} | failed: {r['reason']} | | |")
            continue
        if a.get("status") == "ok":
            acell, atime, ratio = a["tok_s"], f"{a['prefill_s']:.2f} / {a['decode_s']:.2f}", f"{r['tok_s'] / a['tok_s']:.2f}x"
        else:
            acell, atime, ratio = a.get("status", "not run"), a.get("reason", ""), ""
        md.append(f"| {r['against']} | {acell} | {atime} | {r['config']} | {r['tok_s']} | "
                  f"{r['prefill_s']:.2f} / {r['decode_s']:.2f} | {ratio} |")
    return "\n".join(md) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--bsz", type=int, default=20)
    p.add_argument("--prompt-len", type=int, default=1920)
    p.add_argument("--gen-len", type=int, default=128)
    p.add_argument("--out", default=None, help="append the JSON lines here")
    p.add_argument("--render", nargs=2, metavar=("ARTIFACT_JSONL", "MINIGEN_JSONL"), help="print the table only")
    args = p.parse_args(argv)
    if args.render:
        print(render(Path(args.render[0]), Path(args.render[1])), end="")
        return 0
    wrong = [c for c in args.configs.split(",") if c not in CONFIGS]
    if wrong:
        raise SystemExit(f"error: unknown --configs {', '.join(wrong)}; choose from {', '.join(CONFIGS)}")
    if not torch.cuda.is_available():
        raise SystemExit("error: the figure-14 comparison times CUDA generation; no GPU is visible")
    header = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, hbm_copy_gbps=round(D.hbm_copy_gbps(), 1),
                  pinned_h2d_gbps=round(D.pinned_h2d_gbps(), 1),
                  command="python bench/fig14.py " + " ".join(sys.argv[1:] if argv is None else argv))
    lines = [json.dumps(dict(header=header))]
    print(lines[0], flush=True)
    model, _ = D.random_model("opt-13b", torch.float16, args.prompt_len + args.gen_len + 8)
    for label in args.configs.split(","):
        print(f"minigen {label}: bsz {args.bsz}, {args.prompt_len} + {args.gen_len} tokens", file=sys.stderr)
        try:
            row = run(model, label, args.bsz, args.prompt_len, args.gen_len)
        except (torch.OutOfMemoryError, MemoryError, RuntimeError) as e:
            row = dict(system="minigen", config=label, against=CONFIGS[label][2], status="failed",
                       reason=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
        lines.append(json.dumps(row))
        print(lines[-1], flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "a") as f:
            f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
