"""The Python API: every prompt is checked before a KV slot is taken, slots come back on every error
path, and bad arguments are refused in one line before anything is loaded."""
import pytest
import torch

from minigen import LLM
from minigen.device import resolve_device
from minigen.errors import ContextOverflowError


@pytest.fixture
def llm(default_llm):
    yield default_llm
    default_llm.close()          # the next user gets a fresh engine


def free_slots(llm) -> list[int]:
    return list(llm.engine.free_slots)


def test_overlong_prompt_leaks_no_slot(llm):
    long = "word " * 9000                          # past the 8192-token slot
    with pytest.raises(ContextOverflowError, match="prompt 1"):
        llm.generate(["Hello", long], max_new_tokens=2, temperature=0)
    assert free_slots(llm) == list(range(llm.engine.max_batch))
    out = llm.generate(["Hello", "Hi"], max_new_tokens=2, temperature=0)   # the same engine still works
    assert len(out) == 2 and free_slots(llm) == list(range(llm.engine.max_batch))


@pytest.mark.parametrize("prompts,msg", [
    (["a", 5], "prompt 1 is a int"),
    ([], "non-empty list"),
    ("", "prompt 0 is empty"),
    (None, "prompt string"),
])
def test_bad_prompts_are_refused_before_any_slot(llm, prompts, msg):
    llm.get_engine(2)
    with pytest.raises(ValueError, match=msg):
        llm.generate(prompts, max_new_tokens=2)
    assert free_slots(llm) == list(range(llm.engine.max_batch))


def test_error_during_generation_gives_slots_back(llm, monkeypatch):
    engine = llm.get_engine(2)

    def boom(*a, **k):
        raise RuntimeError("boom")
    monkeypatch.setattr(engine, "prefill", boom)
    with pytest.raises(RuntimeError, match="boom"):
        llm.generate(["a", "b"], max_new_tokens=2)
    assert free_slots(llm) == list(range(llm.engine.max_batch))


def test_stop_string_is_one_string(llm):
    free = llm.generate("The capital of France is", max_new_tokens=12, temperature=0)[0]
    assert "Paris" in free.text
    stopped = llm.generate("The capital of France is", max_new_tokens=12, temperature=0, stop="Paris")[0]
    assert stopped.finish_reason == "stop" and stopped.text == free.text[:free.text.index("Paris")]


def test_tiny_temperature_is_greedy_not_nan(llm):
    greedy = llm.generate("The capital of France is", max_new_tokens=8, temperature=0)[0]
    tiny = llm.generate("The capital of France is", max_new_tokens=8, temperature=1e-40, seed=1)[0]
    assert tiny.token_ids == greedy.token_ids


@pytest.mark.parametrize("kw,msg", [
    (dict(seed=2**70), "seed must be"),
    (dict(seed=-1), "seed must be"),
    (dict(stop=[3]), "stop must be"),
])
def test_bad_sampling_values(llm, kw, msg):
    with pytest.raises(ValueError, match=msg):
        llm.generate("Hi", max_new_tokens=2, **kw)


@pytest.mark.parametrize("kw,msg", [
    (dict(max_seq_len=0), "--max-seq-len must be an integer >= 2"),
    (dict(max_seq_len=-5), "--max-seq-len must be an integer >= 2"),
    (dict(device="foo"), "device 'foo' is not supported"),
    (dict(policy="infinigen", policy_opts=dict(alpha=-1.0)), "--alpha must be > 0"),
    (dict(policy="h2o", policy_opts=dict(alpha=3.0)), "does not take alpha"),
    (dict(policy="window", policy_opts=dict(sinks=-2)), "--sinks must be an integer >= 0"),
    (dict(policy="dense", skew="x.pt"), "applies to policy 'infinigen' only"),
    (dict(policy="infinigen", skew="/nonexistent/skew.pt"), "does not exist"),
    (dict(policy="infinigen", policy_opts=dict(skew="x.pt")), "as skew= "),
])
def test_bad_arguments_refused_before_loading(kw, msg):
    """The model path does not exist: each error must come before any attempt to load it."""
    with pytest.raises((ValueError, FileNotFoundError), match=msg):
        LLM("/nonexistent/model", **kw)


def test_model_dependent_settings_refused_before_the_skew(monkeypatch):
    import minigen.llm
    monkeypatch.setattr(minigen.llm, "load_skew_for", lambda *a, **k: pytest.fail("skew computed first"))
    with pytest.raises(ValueError, match="--dense-layers must be in"):
        LLM(policy="infinigen", device="cpu", policy_opts=dict(dense_layers=99))


def test_resolve_device():
    assert resolve_device("CPU") == torch.device("cpu") and resolve_device(" cpu ") == torch.device("cpu")
    for bad in ("foo", "cpux", "tpu"):
        with pytest.raises(ValueError, match="is not supported"):
            resolve_device(bad)


def test_row_invariant_linear():
    """Every row of linear_row_invariant is the same whatever the number of rows it comes with."""
    from minigen.kernels.ops import MIN_GEMM_ROWS, linear_row_invariant
    torch.manual_seed(0)
    lin = torch.nn.Linear(576, 192)
    x = torch.randn(40, 576)
    with torch.no_grad():
        full = linear_row_invariant(x, lin)
        for n in range(1, MIN_GEMM_ROWS + 3):
            assert torch.equal(linear_row_invariant(x[:n], lin), full[:n]), n
        assert torch.allclose(full, lin(x), atol=1e-5)


def test_batch_invariant_is_cpu_only():
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="CPU only"):
            LLM(device="cuda", batch_invariant=True)
    llm = LLM(device="cpu", batch_invariant=True)
    assert llm.model.ops.linear.__name__ == "linear_row_invariant"


def test_use_policy_switches_the_loaded_model():
    """use_policy runs the same loaded model with another policy: window at budget 1.0 keeps every
    token, so it answers as dense; bad settings and a slot past the model's context are refused."""
    llm = LLM(policy="dense", max_seq_len=256)
    want = llm.generate("The capital of France is", max_new_tokens=8, temperature=0)[0].text
    llm.use_policy("window", {"budget": 1.0})
    assert (llm.policy, llm.engine) == ("window", None)
    assert llm.generate("The capital of France is", max_new_tokens=8, temperature=0)[0].text == want
    assert llm.engine.kv.name == "window"
    with pytest.raises(ValueError, match="does not take"):
        llm.use_policy("dense", {"budget": 0.5})
    with pytest.raises(ContextOverflowError, match="exceeds the model's context"):
        llm.use_policy("dense", max_seq_len=10**6)
    llm.close()
