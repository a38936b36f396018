"""Sampling: greedy, temperature, top-k, top-p, seeds, and invalid values."""
import pytest
import torch

from minigen.sampler import SamplingParams, make_generator, sample_no_sync

PROBS = torch.tensor([0.5, 0.3, 0.15, 0.05])


def draw(sp, n=20000, logits=None, seed=0):
    logits = (PROBS.log() if logits is None else logits).expand(n, -1).clone()
    return sample_no_sync(logits, sp, make_generator(seed, torch.device("cpu")))


def test_greedy_is_argmax():
    logits = torch.randn(5, 100)
    out = sample_no_sync(logits, SamplingParams(temperature=0), None)
    assert torch.equal(out, logits.argmax(-1))
    assert torch.equal(sample_no_sync(logits, SamplingParams(temperature=1.0, top_k=1), None), out)


def test_temperature_one_matches_distribution():
    freq = torch.bincount(draw(SamplingParams(temperature=1.0)), minlength=4).float() / 20000
    assert torch.allclose(freq, PROBS, atol=0.015), freq


def test_temperature_sharpens():
    freq = torch.bincount(draw(SamplingParams(temperature=0.5)), minlength=4).float() / 20000
    want = torch.softmax(PROBS.log() / 0.5, -1)
    assert torch.allclose(freq, want, atol=0.015), (freq, want)


def test_top_k_support():
    out = draw(SamplingParams(temperature=1.0, top_k=2))
    assert set(out.unique().tolist()) == {0, 1}
    freq = torch.bincount(out, minlength=2).float() / out.numel()
    assert abs(freq[0] - 0.5 / 0.8) < 0.015


def test_top_p_support():
    # cumulative mass before token: 0, .5, .8, .95 -> top_p .7 keeps {0, 1}; .85 keeps {0, 1, 2}
    assert set(draw(SamplingParams(temperature=1.0, top_p=0.7)).unique().tolist()) == {0, 1}
    assert set(draw(SamplingParams(temperature=1.0, top_p=0.85)).unique().tolist()) == {0, 1, 2}
    assert set(draw(SamplingParams(temperature=1.0, top_p=0.3)).unique().tolist()) == {0}


def test_seed_reproducible_and_varies():
    sp = SamplingParams(temperature=1.0)
    logits = torch.randn(1, 1000)
    a = [int(sample_no_sync(logits, sp, g)) for g in [make_generator(7, torch.device("cpu"))] * 20]
    b = [int(sample_no_sync(logits, sp, g)) for g in [make_generator(7, torch.device("cpu"))] * 20]
    assert a == b
    assert len(set(a)) > 1


@pytest.mark.parametrize("kw,msg", [
    (dict(temperature=-0.1), "temperature must be >= 0"),
    (dict(temperature=float("nan")), "temperature must be >= 0"),
    (dict(top_p=0.0), "top_p must be in"),
    (dict(top_p=1.5), "top_p must be in"),
    (dict(top_k=-1), "top_k must be >= 0"),
    (dict(max_new_tokens=0), "max_new_tokens must be >= 1"),
    (dict(stop=[""]), "stop strings"),
])
def test_invalid_values(kw, msg):
    with pytest.raises(ValueError, match=msg):
        SamplingParams(**kw)


def test_tiny_temperature_is_greedy_without_nan():
    """(logits - max) / T: T -> 0 tends to greedy; logits / T alone overflows to inf, then NaN."""
    logits = torch.randn(6, 50) * 30
    for t in (1e-40, 1e-30, 1e-8):
        out = sample_no_sync(logits, SamplingParams(temperature=t, top_p=0.9), make_generator(0, torch.device("cpu")))
        assert torch.equal(out, logits.argmax(-1)), t


def test_stop_string_and_seed_values():
    assert SamplingParams(stop="Paris").stop == ["Paris"]
    assert SamplingParams(stop=("a", "b")).stop == ["a", "b"]
    for bad in (dict(stop=[1]), dict(seed=2**70), dict(seed=-3), dict(seed=1.5), dict(max_new_tokens=2.5)):
        with pytest.raises(ValueError):
            SamplingParams(**bad)
