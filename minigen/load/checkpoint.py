"""What every loader returns: a `Checkpoint` (config, tokenizer, HF parameter names and a lazy
tensor iterator the model assigns by name), and the progress bar loaders show for big files."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch
from tqdm import tqdm

from minigen.config import ModelConfig
from minigen.load.tokenizer import Tokenizer

# a progress bar is worth showing past this many tensors or bytes
_BAR_MIN_TENSORS = 100
_BAR_MIN_BYTES = 256 << 20


@dataclass
class Checkpoint:
    config: ModelConfig
    tokenizer: Tokenizer
    tensor_names: list[str]               # HF names, e.g. "model.layers.0.self_attn.q_proj.weight"
    source: str                           # "hf" | "gguf"
    path: Path
    _open: Callable[..., Iterator[tuple[str, torch.Tensor]]] = field(repr=False, default=None)

    def tensors(self, device: torch.device | str = "cpu") -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (hf_name, tensor on `device`) one at a time, in tensor_names order. HF: the stored
        dtype; GGUF: quantized tensors dequantized to fp32 (on `device`: fast on a GPU). Each call
        re-reads the file."""
        return self._open(device)


def progress_bar(total: int, nbytes: int, desc: str):
    """A tqdm bar over tensors for big checkpoints; a no-op bar for small ones (and tqdm itself
    hides it when stderr is not a tty)."""
    small = total < _BAR_MIN_TENSORS and nbytes < _BAR_MIN_BYTES
    return tqdm(total=total, desc=desc, unit="tensor", leave=False, disable=True if small else None)
