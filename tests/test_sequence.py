"""Accepting sampled tokens: eos, stop strings (held back while they may still match) and limits."""
from minigen.sampler import SamplingParams
from minigen.sequence import Sequence, accept_token
from tests.helpers import CharTokenizer


def test_accept_stop_strings_and_eos():
    """Stop strings end the sequence and are cut from the text, even when split over tokens;
    text that could start a stop string is held back until it cannot."""
    tok = CharTokenizer()
    sp = SamplingParams(max_new_tokens=50, stop=["cde"])
    s = Sequence(slot=0, pending=[], cached_ids=[0] * 10, decoder=tok.stream_decoder())
    shown = [accept_token(s, t, sp, {2}, 1000) for t in (0, 1, 2 + 26, 3, 4)]   # a b c d e
    assert shown == ["", "", "a", "b", ""]       # two characters held back: "cde" may still come
    assert s.finished and s.finish_reason == "stop" and s.text == "ab" and s.held == ""
    s2 = Sequence(slot=0, pending=[], cached_ids=[0] * 10, decoder=tok.stream_decoder())
    out = [accept_token(s2, t, SamplingParams(), {2}, 1000) for t in (0, 1, 2)]
    assert out == ["a", "b", ""] and s2.finish_reason == "eos" and s2.output_ids == [0, 1]


def test_accept_length_and_context():
    tok = CharTokenizer()
    s = Sequence(slot=0, pending=[], cached_ids=[0] * 10, decoder=tok.stream_decoder())
    assert [accept_token(s, t, SamplingParams(max_new_tokens=2), set(), 1000) for t in (0, 1)] == ["a", "b"]
    assert s.finish_reason == "length" and s.output_ids == [0, 1]
    full = Sequence(slot=0, pending=[], cached_ids=[0] * 8, decoder=tok.stream_decoder())
    assert accept_token(full, 0, SamplingParams(), set(), 8) == "a" and full.finish_reason == "context"
