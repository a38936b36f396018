"""A Hugging Face model directory: config.json (-> ModelConfig), the safetensors weights (one file or
an index of shards; headers checked before anything is read) and the tokenizer files
(minigen/load/hf_tokenizer.py)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open

from minigen.config import ModelConfig
from minigen.errors import ConfigError, LoadError
from minigen.load.checkpoint import Checkpoint, progress_bar
from minigen.load.hf_tokenizer import load_hf_tokenizer
from minigen.load.tokenizer import Tokenizer


def load_hf_dir(d: Path) -> Checkpoint:
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

    def open_tensors(device: torch.device | str = "cpu") -> Iterator[tuple[str, torch.Tensor]]:
        return _iter_safetensors(shards, nbytes, d.name, torch.device(device))

    return Checkpoint(config=config, tokenizer=tokenizer, tensor_names=names, source="hf", path=d,
                      _open=open_tensors)


def _merge_special_ids(config: ModelConfig, tokenizer: Tokenizer):
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
    try:
        with safe_open(str(f), framework="pt") as sf:
            return list(sf.keys())
    except Exception as e:  # SafetensorError (header), OSError
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise LoadError(f"'{f}' is not a valid safetensors file ({reason}); it is truncated or corrupt: "
                        "re-download or re-save it") from None


def _iter_safetensors(shards: dict[str, Path], nbytes: int, desc: str,
                      device: torch.device) -> Iterator[tuple[str, torch.Tensor]]:
    by_file: dict[Path, list[str]] = {}
    for hf, f in shards.items():
        by_file.setdefault(f, []).append(hf)
    with progress_bar(len(shards), nbytes, f"loading {desc}") as bar:
        for f, hf_names in by_file.items():
            try:
                with safe_open(str(f), framework="pt", device=str(device)) as sf:
                    stored = {normalize_name(k): k for k in sf.keys()}
                    for hf in hf_names:
                        t = sf.get_tensor(stored[hf])
                        bar.update()
                        yield hf, t
            except Exception as e:  # data truncated after the header, I/O errors
                reason = str(e).splitlines()[0] if str(e) else type(e).__name__
                raise LoadError(f"reading '{f}' failed ({reason}); the file is corrupt: re-download it") from None
