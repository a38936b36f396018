"""Model architectures, one file each, and `build_model`: construct on the meta device, then
assign checkpoint tensors by their Hugging Face names (no random init, no double allocation)."""
from __future__ import annotations

from typing import Iterable

import torch

from minigen.config import ModelConfig
from minigen.errors import ConfigError
from minigen.kernels.ops import Ops
from minigen.models.llama import Llama
from minigen.models.opt import OPT

# names a checkpoint may carry that hold no parameter here (buffers HF recomputes)
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "masked_bias", ".attn.bias")


def model_class(cfg: ModelConfig):
    if cfg.arch == "llama":
        if cfg.activation not in ("silu", "swish"):
            raise ConfigError(f"llama with hidden_act '{cfg.activation}' is not supported (only silu)")
        return Llama
    if cfg.activation != "relu":
        raise ConfigError(f"OPT with activation '{cfg.activation}' is not supported (only relu)")
    return OPT


def build_model(cfg: ModelConfig, tensors: Iterable[tuple[str, torch.Tensor]], *,
                device: torch.device | str, dtype: torch.dtype, ops: Ops | None = None):
    """Build the model for `cfg` and fill it from (hf_name, tensor) pairs.

    Raises ValueError naming the first missing tensor or a shape mismatch."""
    device = torch.device(device)
    with torch.device("meta"):
        model = model_class(cfg)(cfg)
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    for name, t in tensors:
        if name not in params:
            if name.endswith(_IGNORED_SUFFIXES) or (name == "lm_head.weight" and cfg.tie_embeddings):
                continue
            raise ValueError(f"checkpoint tensor '{name}' has no place in the {cfg.arch} model; "
                             f"is config.json the one that belongs to these weights?")
        p = params[name]
        if tuple(t.shape) != tuple(p.shape):
            raise ValueError(f"checkpoint tensor '{name}' has shape {tuple(t.shape)}, "
                             f"the config implies {tuple(p.shape)}")
        _assign(model, name, torch.nn.Parameter(t.to(device=device, dtype=dtype), requires_grad=False))
        loaded.add(name)
    if "lm_head.weight" not in loaded and cfg.tie_embeddings:
        model.tie_weights()
        loaded.add("lm_head.weight")
    missing = [n for n in params if n not in loaded]
    if missing:
        raise ValueError(f"checkpoint is missing tensor '{missing[0]}'"
                         + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                         + "; the file is incomplete or belongs to a different model")
    model.eval()
    model.setup(device, ops or Ops.for_device(device))
    return model


def _assign(model: torch.nn.Module, name: str, value: torch.nn.Parameter) -> None:
    mod_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(mod_name), attr, value)
