"""python -m minigen.skew: compute InfiniGen's skew matrices for a model once (minigen/calibrate.py).

    python -m minigen.skew --model PATH [--calib FILE] [--out PATH] [--tokens 2048]

Without --out the artifact goes to the cache path that `--policy infinigen` looks up, so later runs
load it instead of calibrating.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from minigen.calibrate import calibrate, calibration_ids, default_calibration_text, default_skew_path
from minigen.cli import run_main
from minigen.device import resolve_device, resolve_dtype
from minigen.kv.skew import save
from minigen.load import default_model_path, load_model


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m minigen.skew",
                                description="compute InfiniGen's skew matrices for a model (offline, once)")
    p.add_argument("--model", default=None,
                   help="HF model directory or .gguf file (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--calib", default=None, help="UTF-8 calibration text (default: data/*.txt, else "
                                                 "Python's pydoc topics)")
    p.add_argument("--out", default=None, help="artifact path (default: the cache path that the "
                                               "infinigen policy looks up)")
    p.add_argument("--tokens", type=int, default=2048, help="calibration tokens (T)")
    p.add_argument("--chunk", type=int, default=1024, help="prefill chunk size")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: bf16 on cuda, fp32 on cpu)")
    args = p.parse_args(argv)

    # user mistakes first, before the model loads
    if args.tokens < 2:
        raise ValueError(f"--tokens must be >= 2, got {args.tokens}")
    if args.calib is not None and not Path(args.calib).is_file():
        raise FileNotFoundError(f"--calib {args.calib}: no such file; pass a UTF-8 text file")
    if args.chunk < 1:
        raise ValueError(f"--chunk must be >= 1, got {args.chunk}")
    if args.out and Path(args.out).is_dir():
        raise ValueError(f"--out {args.out} is a directory; give the artifact a file name, e.g. "
                         f"{Path(args.out) / 'skew.pt'}")
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    model_path = Path(args.model) if args.model else default_model_path()
    out = Path(args.out) if args.out else default_skew_path(model_path)
    model, tokenizer = load_model(str(model_path), device=device, dtype=dtype)
    if args.calib is not None:
        text, source = Path(args.calib).read_text(encoding="utf-8", errors="replace"), Path(args.calib).name
    else:
        text, source = default_calibration_text()
    cfg = model.config
    ids = calibration_ids(tokenizer, text, min(args.tokens, cfg.max_seq_len - 1))
    if len(ids) < 2:
        raise ValueError(f"calibration text {source} has {len(ids)} tokens; pass a longer --calib file")
    if len(ids) < args.tokens:
        print(f"note: {source} gives {len(ids)} tokens, fewer than --tokens {args.tokens}", file=sys.stderr)
    skew = calibrate(model, ids, chunk=args.chunk, source=source)
    try:
        save(skew, out)
    except OSError as e:
        raise ValueError(f"could not write {out}: {e.strerror or e}") from None
    print(f"wrote {out}: {cfg.arch}, {skew.num_layers} layers x {skew.num_kv_heads} KV heads, D={skew.head_dim}, "
          f"{skew.calib_tokens} tokens of {source}; the first 20% of skewed columns hold "
          f"{100 * skew.energy_share(0.2):.1f}% of the query energy")
    return 0


if __name__ == "__main__":
    run_main(main)
