"""Device, dtype and sizes from the user's words (`--device`, `--dtype`, LLM(device=..., dtype=...),
`--gpu-memory`, `--cpu-kv-limit`)."""
from __future__ import annotations

import torch

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def resolve_device(device: str | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(str(device).strip().lower())
    except RuntimeError:
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device '{device}' is not supported; use cpu or cuda (or cuda:N)")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"--device {device}: there are {torch.cuda.device_count()} CUDA devices")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype '{dtype}' is not supported; use one of float32, bfloat16, float16")
    return DTYPES[dtype]


_SUFFIX = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def parse_size(text, flag: str, fraction_of: str) -> int | float:
    """A size flag: bytes as an int (suffixes K/M/G/T, powers of 1024, e.g. "24G") or a fraction in
    (0, 1] of `fraction_of` (a number with a decimal point, e.g. "0.5")."""
    if isinstance(text, bool):
        raise ValueError(f"{flag} must be bytes or a fraction in (0, 1], got {text!r}")
    if isinstance(text, (int, float)):
        value = text
    else:
        t = str(text).strip().upper().removesuffix("B").removesuffix("I")
        mult = _SUFFIX.get(t[-1:], 1)
        num = t[:-1] if mult > 1 else t
        try:
            value = int(num) * mult
        except ValueError:
            try:
                value = float(num) * mult if mult > 1 else float(num)
            except ValueError:
                raise ValueError(f"{flag} must be bytes (e.g. 2000000000 or 2G) or a fraction in "
                                 f"(0, 1] (e.g. 0.5), got {text!r}") from None
            if mult > 1:
                value = int(value)
    if isinstance(value, int):
        if value <= 0:
            raise ValueError(f"{flag} in bytes must be > 0, got {text!r}")
    elif not 0.0 < value <= 1.0:
        raise ValueError(f"{flag} as a fraction of {fraction_of} must be in (0, 1], got {text!r} "
                         f"(give bytes as a whole number, e.g. 2000000000 or 2G)")
    return value
