"""Shared command-line plumbing: model/policy/sampling flags and one-line errors."""
from __future__ import annotations

import argparse
import sys

from minigen.engine import POLICIES


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="HF model directory or .gguf file (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--policy", default="dense", choices=POLICIES, help="KV cache policy")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: bf16 on cuda, fp32 on cpu)")
    p.add_argument("--max-seq-len", type=int, default=None,
                   help="KV slot capacity in tokens (default: the model's context, at most 8192)")


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def user_errors():
    """Exception types that are the user's to fix: printed as one line, no traceback."""
    import torch
    from minigen.config import ConfigError
    from minigen.kv import ContextOverflowError
    errs = [ConfigError, ContextOverflowError, ValueError, NotImplementedError, FileNotFoundError,
            torch.OutOfMemoryError]
    try:
        from minigen.loader import LoadError
        errs.append(LoadError)
    except ImportError:
        pass
    return tuple(errs)


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
