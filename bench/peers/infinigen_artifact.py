"""Run the InfiniGen authors' artifact (github.com/snu-comparch/InfiniGen, `speedup/`) at its
figure-14 setting, offline, and parse what it prints. The artifact's code is never copied into
minigen: this script works on a fetched checkout (bench/peers/fetch_artifact.sh), copies its
`speedup/flexgen` and `speedup/infinigen` into a scratch folder, selects each scheme there the
way the artifact's scripts/figure14/run.sh does (the two symlinks flexgen/flex_opt.py and
flexgen/pytorch_backend.py), and starts `python -m flexgen.flex_opt` with run.sh's arguments plus
two changes that let it run without a network (bench/peers/README.md says why):

  --path _DUMMY_        FlexGen's own dummy-weight path: no OPT-13B download (weights all ones)
  a tokenizer stand-in  run_flexgen asks the Hugging Face hub for facebook/opt-30b's tokenizer;
                        a launcher replaces transformers.AutoTokenizer.from_pretrained, for that
                        process only, by a byte-level stand-in (token ids do not matter with
                        dummy weights; the prompt length does, and get_inputs pads/cuts to it)

    python bench/peers/infinigen_artifact.py --artifact bench/peers/artifact --out bench/results/peers/artifact.jsonl
    python bench/peers/infinigen_artifact.py --artifact DIR --schemes infinigen --bsz 2 --prompt-len 384  # a quick one

Each scheme's result is one JSON line: the artifact's own Total / Prefill / Decode seconds and the
throughputs as the artifact defines them (generated tokens / total; decode: bsz x (gen - 1) / decode).
The UVM schemes of run.sh (uvm, uvm_h2o) are not run: they need a C++ build against CUDA headers.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# scheme -> (run.sh's source folder for the two modules, extra arguments from run.sh, the name it prints)
SCHEMES = {
    "original": ("original", [], "FlexGen"),
    "int4": ("original", ["--compress-cache"], "FlexGen + INT4"),
    "h2o": ("h2o", ["--max-num-kv", "415", "--hh-ratio", "0.1", "--hh-all"], "FlexGen + H2O"),
    "infinigen": ("infinigen", ["--alpha", "4", "--partial-weight-ratio", "0.2", "--max-num-kv", "400"], "InfiniGen (Ours)"),
}

# the process that runs the artifact: the tokenizer stand-in, then flexgen.flex_opt as __main__
LAUNCHER = r'''
import runpy, sys
import transformers

class StandInTokenizer:
    """Byte-level ids (+ 4, past OPT's special tokens), padded on the left with OPT's pad id 1."""
    pad_token_id = 1
    def __call__(self, texts, padding=None, max_length=None, **kw):
        ids = [[b + 4 for b in t.encode("utf-8")] for t in texts]
        if padding == "max_length" and max_length:
            ids = [[1] * (max_length - len(x)) + x if len(x) < max_length else x for x in ids]
        return type("Encoding", (), {"input_ids": ids})()
    def decode(self, ids, **kw):
        return ""
    def batch_decode(self, seqs, **kw):
        return ["" for _ in seqs]

def from_pretrained(name, *a, **kw):
    print(f"[harness] tokenizer {name}: byte-level stand-in (no hub access)", file=sys.stderr)
    return StandInTokenizer()

transformers.AutoTokenizer.from_pretrained = from_pretrained
sys.argv = ["flexgen.flex_opt"] + sys.argv[1:]
runpy.run_module("flexgen.flex_opt", run_name="__main__", alter_sys=True)
'''


def prepare(artifact: Path, work: Path) -> Path:
    """A scratch copy of the artifact's speedup/flexgen and speedup/infinigen (the checkout stays as
    fetched); returns the copy's speedup folder."""
    src = artifact / "speedup"
    if not (src / "flexgen" / "infinigen" / "flex_opt.py").is_file():
        raise SystemExit(f"error: {artifact} is not a checkout of snu-comparch/InfiniGen (no speedup/flexgen); "
                         f"run bench/peers/fetch_artifact.sh first")
    dst = work / "speedup"
    for part in ("flexgen", "infinigen"):
        shutil.copytree(src / part, dst / part, symlinks=True, dirs_exist_ok=True)
    for text in (src / "scripts" / "figure14").glob("*.txt"):
        shutil.copy(text, dst / text.name)
    return dst


def select_scheme(speedup: Path, scheme: str) -> None:
    """run.sh's switch: flexgen/flexgen/{flex_opt,pytorch_backend}.py -> ../<folder>/..."""
    folder = SCHEMES[scheme][0]
    pkg = speedup / "flexgen" / "flexgen"
    for module in ("flex_opt.py", "pytorch_backend.py"):
        link = pkg / module
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(Path("..") / folder / module)


def arguments(scheme: str, bsz: int, prompt_len: int, gen_len: int, speedup: Path, offload: Path) -> list[str]:
    """run.sh's command line for the scheme, with the dummy-weight path and a scratch offload folder."""
    text = str(speedup / "pg19_firstbook.txt")
    return (["--model", "huggingface/opt-13b", "--percent", "100", "0", "0", "100", "100", "0", "--overlap", "false",
             "--gpu-batch-size", str(bsz), "--num-gpu-batches", "1", "--prompt-len", str(prompt_len),
             "--gen-len", str(gen_len), "--warmup-input-path", text, "--test-input-path", text,
             "--path", "_DUMMY_", "--offload-dir", str(offload)] + SCHEMES[scheme][1])


RESULT = re.compile(r"Total: ([0-9.eE+-]+) Prefill: ([0-9.eE+-]+) Decode: ([0-9.eE+-]+)")
SHAPE = re.compile(r"input: (\d+) output: (\d+) bsz: (\d+)")


def parse(stdout: str) -> dict:
    """The artifact's summary block -> seconds and throughputs (its definitions)."""
    m, s = RESULT.search(stdout), SHAPE.search(stdout)
    if not m or not s:
        raise ValueError("no 'Total: .. Prefill: .. Decode: ..' summary in the artifact's output")
    total, prefill, decode = (float(x) for x in m.groups())
    prompt_len, gen_len, bsz = (int(x) for x in s.groups())
    block = stdout[:m.start()].rstrip().splitlines()
    name = next((line for line in reversed(block) if line and not line.startswith(("+", "input:"))), "")
    return dict(printed_name=name.strip(), total_s=total, prefill_s=prefill, decode_s=decode, bsz=bsz,
                prompt_len=prompt_len, gen_len=gen_len, tok_s=round(bsz * gen_len / total, 2),
                decode_tok_s=round(bsz * (gen_len - 1) / decode, 2) if decode > 0 else None)


def run_scheme(speedup: Path, scheme: str, args, python: str = sys.executable) -> dict:
    select_scheme(speedup, scheme)
    offload = Path(tempfile.mkdtemp(prefix="flexgen_offload_"))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(speedup / "flexgen"), str(speedup / "infinigen")]),
               PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    cmd = [python, "-c", LAUNCHER] + arguments(scheme, args.bsz, args.prompt_len, args.gen_len, speedup, offload)
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, env=env, cwd=speedup, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return dict(scheme=scheme, status="timeout", seconds=args.timeout)
    finally:
        shutil.rmtree(offload, ignore_errors=True)
    row = dict(scheme=scheme, wall_s=round(time.perf_counter() - t0, 1), returncode=p.returncode)
    try:
        row.update(status="ok", **parse(p.stdout))
    except ValueError as e:
        tail = (p.stderr or p.stdout).strip().splitlines()[-12:]
        row.update(status="failed", reason=str(e), tail=tail)
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--artifact", required=True, help="a checkout of snu-comparch/InfiniGen (fetch_artifact.sh)")
    p.add_argument("--schemes", default=",".join(SCHEMES))
    p.add_argument("--bsz", type=int, default=20)
    p.add_argument("--prompt-len", type=int, default=1920)
    p.add_argument("--gen-len", type=int, default=128)
    p.add_argument("--timeout", type=int, default=1800, help="seconds per scheme")
    p.add_argument("--out", default=None, help="append the JSON lines here")
    args = p.parse_args(argv)
    wrong = [s for s in args.schemes.split(",") if s not in SCHEMES]
    if wrong:
        raise SystemExit(f"error: unknown --schemes {', '.join(wrong)}; choose from {', '.join(SCHEMES)}")
    with tempfile.TemporaryDirectory(prefix="infinigen_artifact_") as work:
        speedup = prepare(Path(args.artifact), Path(work))
        for scheme in args.schemes.split(","):
            print(f"artifact {scheme}: bsz {args.bsz}, {args.prompt_len} + {args.gen_len} tokens", file=sys.stderr)
            row = run_scheme(speedup, scheme, args)
            line = json.dumps(dict(system="artifact", **row))
            print(line, flush=True)
            if args.out:
                Path(args.out).parent.mkdir(parents=True, exist_ok=True)
                with open(args.out, "a") as f:
                    f.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
