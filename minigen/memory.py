"""The GPU memory budget (`--gpu-memory`, `LLM(gpu_memory=...)`): what a run will allocate on the
device, and in pinned host memory, planned from the model's config before anything is loaded, and
a one-line refusal naming the numbers and the way out when it does not fit.

    weights      the parameters in the run dtype and the RoPE tables: the model built on the meta
                 device, where a parameter has a shape and no storage
    kv           the policy's device buffers (caches, partial keys, staging, selections, counters):
                 its own `allocate` run on the meta device, so no second formula can drift from it
    activations  the transients around them: one prefill chunk's per-token tensors, the batch's
                 logits and sampling, kernel workspaces (an upper estimate, activation_bytes)
    host         the pinned host pool of the offloading policies (meta too), checked against the
                 RAM the machine has available

On CUDA the budget becomes torch's per-process memory fraction, so the caching allocator enforces
it and a smaller card can be emulated on a larger one. The CUDA context (about 0.5 GiB) lives
outside that allocator: a real card of the budget's size has that much less.
"""
from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass
from types import SimpleNamespace

import torch

from minigen.config import ModelConfig
from minigen.device import parse_size
from minigen.errors import MemoryBudgetError

GiB = 2**30


def gib(n: int) -> str:
    return f"{n / GiB:.1f} GiB" if n >= GiB / 10 else f"{n / 2**20:.0f} MiB"


def device_total(device: torch.device) -> int:
    """The device's memory: the GPU's, or on the CPU (where "GPU memory" is RAM) the machine's."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def host_available() -> int | None:
    """RAM available for new allocations (Linux MemAvailable), or None where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


# ---------------------------------------------------------------------------------------------
# the parts of a plan
# ---------------------------------------------------------------------------------------------
def weight_bytes(cfg: ModelConfig, dtype: torch.dtype) -> int:
    """The parameters in `dtype` (a tied head counted once) and the RoPE tables (fp32 cos and sin)."""
    from minigen.models import model_class
    with torch.device("meta"):
        model = model_class(cfg)(cfg)
    if cfg.tie_embeddings:
        model.tie_weights()
    params = {id(p): p.numel() for p in model.parameters()}
    rope = 2 * cfg.max_seq_len * (cfg.head_dim // 2) * 4 if cfg.arch == "llama" else 0
    return sum(params.values()) * dtype.itemsize + rope


def tensors_held(obj, host: bool = False, seen: set | None = None, out: dict | None = None) -> dict:
    """Every tensor a KV policy holds, {storage id: (bytes, is_host)}: its attributes, followed
    into lists, tuples, dicts and the minigen.kv objects it owns (the dense part of infinigen, the
    host pool, the evictor), not into the model (project_q, ops)."""
    from minigen.kv.pool import HostKVPool
    seen = set() if seen is None else seen
    out = {} if out is None else out
    if id(obj) in seen:
        return out
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        st = obj.untyped_storage()
        out[st._cdata] = (st.nbytes(), host)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            tensors_held(v, host, seen, out)
    elif isinstance(obj, dict):
        for v in obj.values():
            tensors_held(v, host, seen, out)
    elif type(obj).__module__.startswith("minigen.kv"):
        fields = vars(obj) if hasattr(obj, "__dict__") else {s: getattr(obj, s, None) for s in obj.__slots__}
        for v in fields.values():
            tensors_held(v, host or isinstance(obj, HostKVPool), seen, out)
    return out


def policy_bytes(policy: str, cfg: ModelConfig, dtype: torch.dtype, num_slots: int, max_seq_len: int,
                 opts: dict | None = None) -> tuple[int, int]:
    """(device bytes, host bytes) of `policy` for num_slots x max_seq_len tokens: the policy built and
    allocated on the meta device (its host pool too), then every tensor it holds summed."""
    from minigen.kernels.ops import Ops
    from minigen.kv import make_policy
    opts = dict(opts or {})
    if policy == "infinigen":   # the skew matrices (L, Hkv, D, D) fp32 the policy keeps on the device
        shape = (cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, cfg.head_dim)
        opts["skew"] = SimpleNamespace(folded=cfg.arch == "opt", matrices=torch.empty(shape, device="meta"))
    kv = make_policy(policy, cfg, ops=Ops.for_device(torch.device("cpu")), project_q=None,
                     device=torch.device("meta"), dtype=dtype, **opts)
    kv.allocate(num_slots, max_seq_len)
    held = tensors_held(kv).values()
    return sum(n for n, h in held if not h), sum(n for n, h in held if h)


def activation_bytes(cfg: ModelConfig, dtype: torch.dtype, num_slots: int, prefill_tokens: int) -> int:
    """An upper estimate of the transients: a prefill chunk of `prefill_tokens` tokens holding every
    per-token tensor of a layer at once (residual, normed input, q/k/v before and after RoPE,
    attention output, the MLP's gate, up, product and output), the batch's fp32 logits three
    times over (logits, softmax, sampling), and 64 MiB of kernel workspaces (split-K partials,
    CUDA-graph pools of the small decode tensors)."""
    H, Hkv, D, C, F = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.dim, cfg.hidden_dim
    per_token = (4 * C + 3 * H * D + 4 * Hkv * D + 3 * F) * dtype.itemsize
    logits = 3 * num_slots * cfg.vocab_size * 4
    return prefill_tokens * per_token + logits + 64 * 2**20


@dataclass(frozen=True)
class MemoryPlan:
    policy: str
    num_slots: int
    max_seq_len: int
    weights: int
    kv: int
    activations: int
    host: int

    @property
    def device(self) -> int:
        return self.weights + self.kv + self.activations

    def describe(self) -> str:
        return (f"{self.policy} needs {gib(self.device)} for {self.num_slots} x {self.max_seq_len} tokens "
                f"(weights {gib(self.weights)}, KV {gib(self.kv)}, activations {gib(self.activations)})")


def plan(cfg: ModelConfig, dtype: torch.dtype, policy: str, num_slots: int, max_seq_len: int,
         opts: dict | None = None, prefill_tokens: int = 4096) -> MemoryPlan:
    """What `policy` allocates for num_slots sequences of max_seq_len tokens (see the module)."""
    kv, host = policy_bytes(policy, cfg, dtype, num_slots, max_seq_len, opts)
    if (opts or {}).get("cpu_kv_limit") is not None:   # a limited pool prefills a long prompt whole
        prefill_tokens = max(prefill_tokens, max_seq_len)
    acts = activation_bytes(cfg, dtype, num_slots, min(prefill_tokens, num_slots * max_seq_len))
    return MemoryPlan(policy, num_slots, max_seq_len, weight_bytes(cfg, dtype), kv, acts, host)


def most_slots(cfg, dtype, policy: str, budget: int, max_seq_len: int, opts: dict | None = None,
               upto: int = 1024) -> int:
    """The most sequences of max_seq_len tokens `policy` fits in `budget` bytes (0: not even one)."""
    lo, hi = 0, upto
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if plan(cfg, dtype, policy, mid, max_seq_len, opts).device <= budget else (lo, mid - 1)
    return lo


def check(p: MemoryPlan, budget: int | None, cfg: ModelConfig, dtype: torch.dtype, opts: dict | None = None) -> None:
    """Refuse, in one line, a plan over the GPU budget (with the way out) or a host pool over the
    RAM available."""
    if budget is not None and p.device > budget:
        ways = []
        if p.policy != "infinigen" and plan(cfg, dtype, "infinigen", p.num_slots, p.max_seq_len).device <= budget:
            ways.append("use --policy infinigen")
        n = most_slots(cfg, dtype, p.policy, budget, p.max_seq_len, opts, upto=p.num_slots - 1) if p.num_slots > 1 else 0
        if n:
            ways.append(f"at most {n} sequence{'s' if n > 1 else ''}")
        elif p.weights + activation_bytes(cfg, dtype, 1, 1) > budget:
            alone = p.weights + activation_bytes(cfg, dtype, 1, 1)
            ways.append(f"a smaller model or dtype (the weights alone take {gib(p.weights)}" +
                        (f", with the workspaces of one short sequence {gib(alone)})" if p.weights <= budget else ")"))
        else:
            ways.append("a shorter --max-seq-len")
        raise MemoryBudgetError(f"{p.describe()}; the budget is {gib(budget)}: {', or '.join(ways)}")
    avail = host_available()
    if p.host and avail is not None and p.host > avail:
        raise MemoryBudgetError(f"the {p.policy} host KV pool needs {gib(p.host)} for {p.num_slots} x {p.max_seq_len} "
                                f"tokens; the machine has {gib(avail)} of RAM available: fewer sequences, a shorter "
                                f"--max-seq-len, or --policy infinigen --cpu-kv-limit")


def resolve_budget(value, device: torch.device) -> int | None:
    """--gpu-memory as bytes (a fraction is of the device's memory, device_total); more than the
    device has is refused."""
    if value is None:
        return None
    v = parse_size(value, "--gpu-memory", "the device's memory")
    total = device_total(device)
    if isinstance(v, float):
        return math.floor(v * total)
    if v > total:
        raise MemoryBudgetError(f"--gpu-memory {gib(v)} is more than the {device.type} has ({gib(total)})")
    return v


def hold_to_budget(budget: int, device: torch.device) -> None:
    """Make torch's CUDA caching allocator refuse to grow past `budget` bytes in this process."""
    torch.cuda.set_per_process_memory_fraction(min(1.0, budget / device_total(device)), device)


def auto_policy(cfg: ModelConfig, dtype: torch.dtype, device: torch.device, num_slots: int, max_seq_len: int,
                budget: int | None) -> str:
    """`--policy auto`: dense when its plan fits the budget (without one: what the device has free),
    else infinigen, saying why on stderr."""
    if budget is None:
        budget = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else (host_available() or device_total(device))
    dense = plan(cfg, dtype, "dense", num_slots, max_seq_len)
    if dense.device <= budget:
        return "dense"
    print(f"note: --policy auto runs infinigen: {dense.describe()}, more than the {gib(budget)} available",
          file=sys.stderr)
    return "infinigen"
