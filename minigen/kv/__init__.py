"""KV policies: where the KV cache lives and how attention over it is computed (minigen/kv/base.py
has the interface), and `make_policy`, the registry the engine and the CLIs build them from.

    dense      whole cache on the GPU, exact attention                              dense.py
    offload    whole cache in pinned host memory, every layer fetched each step     offload.py (pool.py)
    int4       offload of 4-bit records (FlexGen+INT4)                              int4.py
    infinigen  host pool; only the speculated tokens fetched each step              infinigen.py (skew.py,
                                                                                    eviction.py)
    h2o        heavy hitters + recent tokens (on the GPU, the baseline's accuracy)  h2o.py (budget.py)
    window     attention sinks + recent tokens                                      window.py (budget.py)
"""
from __future__ import annotations

from minigen.config import ModelConfig
from minigen.kv.base import KVPolicy
from minigen.kv.dense import DenseKV
from minigen.kv.h2o import H2OKV
from minigen.kv.infinigen import InfiniGenKV
from minigen.kv.int4 import Int4KV
from minigen.kv.offload import OffloadKV
from minigen.kv.window import WindowKV

POLICIES = ("dense", "offload", "infinigen", "h2o", "window", "int4")


def make_policy(name: str, cfg: ModelConfig, *, ops, device, dtype, project_q=None, **opts) -> KVPolicy:
    """The KV policy `name` for a model of config `cfg`; opts are the policy's own settings (alpha,
    budget, ...). project_q is the model's query projection, which infinigen speculates with."""
    if name not in POLICIES:
        raise ValueError(f"unknown policy '{name}'; choose one of {', '.join(POLICIES)}")
    common = dict(dtype=dtype, device=device, ops=ops)
    if name == "infinigen":
        return InfiniGenKV(cfg, project_q=project_q, **common, **opts)
    if name in ("h2o", "window"):
        return (H2OKV if name == "h2o" else WindowKV)(cfg, **common, **opts)
    if name == "int4":
        return Int4KV(cfg, **common, **opts)
    shape = dict(num_layers=cfg.num_layers, num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
                 sm_scale=cfg.sm_scale)
    if name == "offload":
        if set(opts) - {"fetch"}:
            raise ValueError(f"policy 'offload' takes only fetch=, got {', '.join(sorted(opts))}")
        return OffloadKV(**shape, **common, **opts)
    if opts:
        raise ValueError(f"policy '{name}' takes no options, got {', '.join(sorted(opts))}")
    return DenseKV(**shape, **common)
