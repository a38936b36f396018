"""KV policies: where the KV cache lives and how attention over it is computed (minigen/kv/base.py
has the interface), and `make_policy`, the registry the engine and the CLIs build them from.

    dense      whole cache on the GPU, exact attention                              dense.py
    offload    whole cache in pinned host memory, every layer fetched each step     offload.py (pool.py)
    int4       offload of 4-bit records (FlexGen+INT4)                              int4.py
    infinigen  host pool; only the speculated tokens fetched each step              infinigen.py (skew.py,
                                                                                    eviction.py)
    h2o        heavy hitters + recent tokens (on the GPU, the baseline's accuracy)  h2o.py (budget.py)
    quest      pages with the largest key-bound logit + the newest page (the same)  quest.py (budget.py)
    window     attention sinks + recent tokens                                      window.py (budget.py)
"""
from __future__ import annotations

from minigen.config import ModelConfig
from minigen.kv.base import KVPolicy
from minigen.kv.dense import DenseKV
from minigen.kv.eviction import host_limit
from minigen.kv.h2o import H2OKV
from minigen.kv.infinigen import InfiniGenKV
from minigen.kv.int4 import Int4KV
from minigen.kv.offload import FETCHES, OffloadKV
from minigen.kv.quest import QuestKV
from minigen.kv.window import WindowKV

POLICIES = ("dense", "offload", "infinigen", "h2o", "window", "int4", "quest")
# the settings each policy takes (LLM(policy_opts=...), the command lines' policy flags)
POLICY_OPTIONS = {
    "dense": (), "offload": ("fetch",), "int4": ("fetch", "group_size"),
    "infinigen": ("alpha", "budget", "partial_ratio", "dense_layers", "recent", "cpu_kv_limit", "evict",
                  "evict_window", "skew", "reuse"),
    "h2o": ("budget", "dense_layers"),
    "quest": ("budget", "dense_layers", "page_size"),
    "window": ("budget", "sinks", "dense_layers"),
}


def _count(lo: int, hi: int | None = None):
    def ok(v):
        return not isinstance(v, bool) and isinstance(v, int) and v >= lo and (hi is None or v < hi)
    return ok, f"an integer >= {lo}" + (f" and < {hi}" if hi else "")


def _fraction(v):
    return not isinstance(v, bool) and isinstance(v, (int, float)) and 0.0 < v <= 1.0


# option -> (test, what a valid value is); cpu_kv_limit and evict are checked by their parsers
_CHECKS = {
    "alpha": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0,
              "> 0 (a logit margin; inf turns the threshold off)"),
    "budget": (_fraction, "in (0, 1]"),
    "partial_ratio": (_fraction, "in (0, 1]"),
    "dense_layers": _count(0),
    "recent": _count(0, 2**23),
    "evict_window": _count(0),
    "sinks": _count(0),
    "group_size": _count(1),
    "page_size": _count(1),
    "reuse": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and (v == 0 or 1 <= v <= 64),
              "0 (off) or in [1, 64] (rows kept on the GPU per KV head, as a multiple of the selection cap)"),
    "fetch": (lambda v: v in FETCHES, f"one of {', '.join(FETCHES)}"),
}


def check_policy_opts(name: str, opts: dict) -> None:
    """Refuse, in one line, an unknown policy, a setting the policy does not take, or a value out of
    range: before a model is loaded (what depends on the model, e.g. --dense-layers against its
    layer count, is checked when the policy is built)."""
    if name not in POLICIES:
        raise ValueError(f"unknown policy '{name}'; choose one of {', '.join(POLICIES)}")
    wrong = sorted(set(opts) - set(POLICY_OPTIONS[name]))
    if wrong:
        takes = ", ".join(POLICY_OPTIONS[name]) or "no options"
        raise ValueError(f"policy '{name}' does not take {', '.join(wrong)} (it takes: {takes})")
    for key, value in opts.items():
        if key in _CHECKS and value is not None and not _CHECKS[key][0](value):
            name = key if key in ("evict_window", "group_size") else "--" + key.replace("_", "-")   # no flag
            raise ValueError(f"{name} must be {_CHECKS[key][1]}, got {value!r}")
    if name == "infinigen":
        host_limit(opts.get("cpu_kv_limit"), opts.get("evict"), opts.get("evict_window", 64), opts.get("recent"))


def make_policy(name: str, cfg: ModelConfig, *, ops, device, dtype, project_q=None, **opts) -> KVPolicy:
    """The KV policy `name` for a model of config `cfg`; opts are the policy's own settings (alpha,
    budget, ...). project_q is the model's query projection, which infinigen speculates with."""
    check_policy_opts(name, opts)
    common = dict(dtype=dtype, device=device, ops=ops)
    if name == "infinigen":
        return InfiniGenKV(cfg, project_q=project_q, **common, **opts)
    if name in ("h2o", "window", "quest"):
        return {"h2o": H2OKV, "window": WindowKV, "quest": QuestKV}[name](cfg, **common, **opts)
    if name == "int4":
        return Int4KV(cfg, **common, **opts)
    shape = dict(num_layers=cfg.num_layers, num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
                 sm_scale=cfg.sm_scale)
    if name == "offload":
        return OffloadKV(**shape, **common, **opts)
    return DenseKV(**shape, **common)
