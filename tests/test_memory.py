"""The GPU memory budget (minigen/memory.py): plans that match what is allocated, refusals in one
line before loading with the way out, --policy auto, and the host pool against the RAM (CPU path,
fake budgets); the allocator held to the budget on a GPU."""
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

import minigen.llm
import minigen.load
import minigen.memory
from minigen import LLM
from minigen.config import ModelConfig
from minigen.errors import MemoryBudgetError
from minigen.kernels.ops import Ops
from minigen.kv import make_policy
from minigen.memory import activation_bytes, auto_policy, plan, policy_bytes, tensors_held, weight_bytes
from tests.helpers import minigen_from_hf, tiny_hf_model, tiny_llama_config, tiny_opt_config

LLAMA = ModelConfig.from_hf(tiny_llama_config(num_hidden_layers=4, num_key_value_heads=2).to_dict())
OPT = ModelConfig.from_hf(tiny_opt_config(num_hidden_layers=3).to_dict())
CASES = [("dense", {}), ("offload", {}), ("offload", {"fetch": "kernel"}), ("int4", {}), ("infinigen", {}),
         ("infinigen", {"cpu_kv_limit": 0.5, "recent": 0, "evict_window": 8}), ("infinigen", {"partial_ratio": 0.25, "dense_layers": 1}),
         ("infinigen", {"reuse": 2.0}), ("h2o", {}), ("window", {}), ("quest", {"page_size": 8})]


def allocated(cfg, policy, opts, slots, seq_len, dtype):
    """(device, host) bytes a policy really holds after allocate on the CPU."""
    opts = dict(opts)
    if policy == "infinigen":
        L, H, D = cfg.num_layers, cfg.num_kv_heads, cfg.head_dim
        opts["skew"] = SimpleNamespace(folded=cfg.arch == "opt", matrices=torch.randn(L, H, D, D))
    kv = make_policy(policy, cfg, ops=Ops.for_device(torch.device("cpu")), project_q=None,
                     device=torch.device("cpu"), dtype=dtype, **opts)
    kv.allocate(slots, seq_len)
    held = tensors_held(kv).values()
    return sum(n for n, h in held if not h), sum(n for n, h in held if h)


@pytest.mark.parametrize("cfg", [LLAMA, OPT], ids=["llama", "opt"])
@pytest.mark.parametrize("policy,opts", CASES, ids=[f"{p}{o}" for p, o in CASES])
def test_policy_plan_is_what_allocate_holds(cfg, policy, opts):
    for slots, seq_len, dtype in [(3, 77, torch.float32), (1, 200, torch.bfloat16)]:
        assert policy_bytes(policy, cfg, dtype, slots, seq_len, opts) == allocated(cfg, policy, opts, slots, seq_len, dtype)


def test_dense_plan_is_the_cache():
    L, S, H, T, D = LLAMA.num_layers, 5, LLAMA.num_kv_heads, 300, LLAMA.head_dim
    assert policy_bytes("dense", LLAMA, torch.float16, S, T) == (2 * L * S * H * T * D * 2, 0)
    dev, host = policy_bytes("offload", LLAMA, torch.float16, S, T)
    assert host == 2 * L * S * H * T * D * 2 and dev < host          # the pool is on the host


@pytest.mark.parametrize("hf", [tiny_llama_config(tie_word_embeddings=True), tiny_llama_config(), tiny_opt_config()],
                         ids=["llama-tied", "llama", "opt"])
def test_weight_bytes_are_the_loaded_model(hf):
    model = minigen_from_hf(tiny_hf_model(hf))
    held = {p.untyped_storage()._cdata: p.untyped_storage().nbytes() for p in model.parameters()}
    for name in ("rope_cos", "rope_sin"):
        t = getattr(model, name, None)
        if t is not None:
            held[t.untyped_storage()._cdata] = t.untyped_storage().nbytes()
    assert weight_bytes(model.config, torch.float32) == sum(held.values())


def test_activations_grow_with_the_chunk_and_batch():
    a = activation_bytes(LLAMA, torch.float16, 1, 1024)
    assert activation_bytes(LLAMA, torch.float16, 1, 2048) > a and activation_bytes(LLAMA, torch.float16, 8, 1024) > a


# ---- refusals before loading, with the way out ----------------------------------------------
@pytest.fixture
def no_loading(monkeypatch):
    """Any attempt to build the model fails the test: refusals must come first."""
    monkeypatch.setattr(minigen.llm, "build_model", lambda *a, **k: pytest.fail("the model was loaded"))


def default_plan(policy, slots=1, seq=8192, **opts):
    cfg = minigen.load.load_checkpoint(None).config
    return cfg, plan(cfg, torch.float32, policy, slots, seq, opts)


def test_over_budget_is_refused_before_loading(no_loading):
    _, p = default_plan("dense", 8)
    budget = p.weights + p.activations + 2 * (p.kv // 8) + 2**20      # room for two sequences' KV
    with pytest.raises(MemoryBudgetError) as e:
        LLM(device="cpu", max_batch=8, gpu_memory=budget)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("dense needs ") and "for 8 x 8192 tokens" in msg
    assert "the budget is" in msg and "at most 2 sequences" in msg


def test_the_way_out_can_be_infinigen(no_loading):
    _, inf = default_plan("infinigen", 4)
    _, dense = default_plan("dense", 4)
    assert inf.device < dense.device
    with pytest.raises(MemoryBudgetError, match="use --policy infinigen"):
        LLM(device="cpu", max_batch=4, gpu_memory=inf.device + 2**20)


def test_weights_over_budget_name_the_weights(no_loading):
    with pytest.raises(MemoryBudgetError, match=r"the weights alone take 0\.5 GiB"):
        LLM(device="cpu", gpu_memory="300M")
    with pytest.raises(MemoryBudgetError, match="more than the cpu has"):
        LLM(device="cpu", gpu_memory=2**50)
    with pytest.raises(ValueError, match="--gpu-memory"):
        LLM(device="cpu", gpu_memory="lots")


def test_a_larger_batch_is_planned_again():
    _, p = default_plan("dense", 1, 512)
    llm = LLM(device="cpu", max_seq_len=512, gpu_memory=p.device + p.kv // 2)        # one sequence fits
    assert llm.generate("Hi", max_new_tokens=2, temperature=0)[0].token_ids
    with pytest.raises(MemoryBudgetError, match="for 3 x 512 tokens"):
        llm.generate(["a", "b", "c"], max_new_tokens=2)
    assert llm.engine.max_batch == 1 and llm.engine.free_slots == [0]


# ---- --policy auto ---------------------------------------------------------------------------
def test_auto_is_dense_when_it_fits_else_infinigen(capsys):
    cfg, dense = default_plan("dense", 4)
    cpu = torch.device("cpu")
    assert auto_policy(cfg, torch.float32, cpu, 4, 8192, dense.device) == "dense"
    assert capsys.readouterr().err == ""
    assert auto_policy(cfg, torch.float32, cpu, 4, 8192, dense.device - 1) == "infinigen"
    assert "auto runs infinigen: dense needs" in capsys.readouterr().err


def test_auto_takes_no_policy_settings():
    with pytest.raises(ValueError, match="auto' takes no policy settings"):
        LLM(device="cpu", policy="auto", policy_opts={"budget": 0.1})


def test_auto_runs_dense_without_a_budget():
    assert LLM(device="cpu", policy="auto", max_seq_len=256).policy == "dense"


# ---- the host pool -----------------------------------------------------------------------------
def test_host_pool_over_the_ram_is_refused(no_loading, monkeypatch):
    monkeypatch.setattr(minigen.memory, "host_available", lambda: 2**20)
    with pytest.raises(MemoryBudgetError, match="host KV pool needs .* of RAM available"):
        LLM(device="cpu", policy="offload")


# ---- the command lines -------------------------------------------------------------------------
def test_cli_refusals_are_one_line():
    r = subprocess.run([sys.executable, "-m", "minigen.chat", "--gpu-memory", "300M", "--prompt", "hi"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.count("error:") == 1 and "Traceback" not in r.stderr
    assert "needs" in r.stderr and "the budget is 0.3 GiB" in r.stderr
    r = subprocess.run([sys.executable, "-m", "minigen.eval", "ruler", "--policy", "auto", "--budget", "0.1"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--budget does not apply to --policy auto" in r.stderr


GPU_CHECK = """
import torch
from minigen import LLM
from minigen.load import load_checkpoint
from minigen.memory import plan
cfg = load_checkpoint(None).config
p = plan(cfg, torch.float32, "dense", 2, 4096)
budget = p.device + 2**28
llm = LLM(device="cuda", dtype="float32", max_seq_len=4096, max_batch=2, gpu_memory=budget)
before = torch.cuda.memory_allocated()
llm.get_engine(2)
assert torch.cuda.memory_allocated() - before == llm.memory_plan.kv, (torch.cuda.memory_allocated() - before, p.kv)
llm.generate(["Hello"] * 2, max_new_tokens=4, temperature=0)
assert torch.cuda.max_memory_allocated() <= budget, (torch.cuda.max_memory_allocated(), budget)
try:
    torch.empty(budget, dtype=torch.uint8, device="cuda")
    raise SystemExit("the budget was not enforced")
except torch.OutOfMemoryError:
    pass
print("ok", torch.cuda.max_memory_allocated(), budget)
"""


@pytest.mark.gpu
def test_the_allocator_is_held_to_the_budget():
    """On CUDA the plan's KV is what the engine allocates, the run's peak stays within the budget,
    and an allocation past it fails (in a subprocess: the budget holds for the whole process)."""
    r = subprocess.run([sys.executable, "-c", GPU_CHECK], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-2000:]


def test_large_pinned_pool_says_so(monkeypatch, capsys):
    """A pinned pool from PIN_NOTE_BYTES on announces the wait on stderr before it starts; a pool
    that cannot be pinned (here: no CUDA) is refused in one line naming its size."""
    import minigen.kv.pool as pool
    if torch.cuda.is_available():
        pytest.skip("checks the refusal on a machine without CUDA")
    monkeypatch.setattr(pool, "PIN_NOTE_BYTES", 0)
    with pytest.raises(MemoryError, match=r"pinned host KV pool of 0\.0 GiB \(2 sequences x 16 tokens x 3 layers\)"):
        pool.HostKVPool(3, 2, 16, 2, 8, dtype=torch.float16, pin=True)
    assert "pinning 0.0 GiB of host memory for the KV pool (2 sequences x 16 tokens x 3 layers)" in capsys.readouterr().err
    pool.HostKVPool(3, 2, 16, 2, 8, dtype=torch.float16, pin=False)      # unpinned: quiet
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("policy,opts", CASES)
def test_a_plan_allocates_nothing(policy, opts):
    """Planning 512 sequences of 32K tokens on the Llama-3-8B shape (hundreds of GiB of pool) takes
    no memory: every tensor of the plan, host pool included, is on the meta device."""
    big = ModelConfig.from_hf(dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                                   num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                                   max_position_embeddings=32768, rms_norm_eps=1e-5, rope_theta=5e5))
    gpu, host = policy_bytes(policy, big, torch.float16, 512, 32768, opts)
    assert gpu + host > 100 * 2**30


@pytest.mark.parametrize("policy,opts", [("offload", {}), ("int4", {}), ("infinigen", {}), ("infinigen", {"reuse": 2.0})])
def test_plan_covers_what_a_prefill_adds(policy, opts):
    """What the policy holds after a real prefill (staging buffers included) is what the plan said."""
    from minigen.engine import Engine
    from tests.helpers import IdTokenizer, random_prompts
    model = minigen_from_hf(tiny_hf_model(tiny_llama_config(num_hidden_layers=4, num_key_value_heads=2)))
    eng = Engine(model, IdTokenizer(), policy=policy, max_batch=2, max_seq_len=64, policy_opts=dict(opts))
    eng.prefill([eng.new_sequence(p) for p in random_prompts(320, (9, 23), seed=1)])
    held = sum(n for n, host in tensors_held(eng.kv).values() if not host)
    skew = 0    # the skew matrices: random ones here, a placeholder of the same size in the plan
    # beyond the plan only the chunk's small index tensors (positions, rows, slots: the plan's activations)
    assert held - skew <= policy_bytes(policy, model.config, torch.float32, 2, 64, opts)[0] - skew + 4096
