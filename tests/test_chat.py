"""The chat CLI: one-shot answers, multi-turn KV reuse, Ctrl-C, and one-line errors."""
import subprocess
import sys
from pathlib import Path

import pytest

from minigen.chat import Conversation
from minigen.sampler import SamplingParams

ROOT = Path(__file__).resolve().parents[1]
GREEDY = SamplingParams(max_new_tokens=24, temperature=0)


def chat(*args, stdin=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "minigen.chat", *args], input=stdin, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def llm(default_llm):
    return default_llm


def test_prompt_answers_paris():
    r = chat("--prompt", "What is the capital of France?", "--temperature", "0", "--stats")
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
    assert "first token" in r.stderr and "tok/s" in r.stderr


def test_interactive_session():
    r = chat("--temperature", "0", "--max-new-tokens", "16",
             stdin="What is the capital of France?\n/reset\nWhat is 2+2?\n/quit\n")
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout and "4" in r.stdout
    assert "(conversation cleared)" in r.stderr


def test_second_turn_reuses_cache_and_matches_fresh_prefill(llm):
    conv = Conversation(llm, system=None)
    first = conv.prepare("What is the capital of France?")
    conv.reply(GREEDY, out=open("/dev/null", "w"))
    cached_before = conv.seq.num_cached
    new = conv.prepare("And of Italy?")
    # only the new turn (plus the end-of-turn marker the cache did not see) is prefilled
    assert 0 < new < 20 and conv.seq.num_cached >= cached_before - 1
    conv.reply(GREEDY, out=open("/dev/null", "w"))
    reused = conv.seq.text
    # the same conversation prefilled from scratch answers identically
    history = conv.messages[:-2]         # both turns up to the first answer
    conv.reset()                         # empties the cache
    conv.messages = history
    total = conv.prepare("And of Italy?")
    assert total > first + new
    conv.reply(GREEDY, out=open("/dev/null", "w"))
    assert conv.seq.text == reused
    assert "Rome" in reused
    conv.close()


def test_ctrl_c_stops_reply_and_keeps_conversation(llm, monkeypatch):
    conv = Conversation(llm, system=None)
    conv.prepare("Count from 1 to 100.")
    real = conv.engine.generate

    def interrupted(seqs, sp):
        for i, ev in enumerate(real(seqs, sp)):
            if i == 3:
                raise KeyboardInterrupt
            yield ev
    monkeypatch.setattr(conv.engine, "generate", interrupted)
    assert conv.reply(SamplingParams(max_new_tokens=50, temperature=0), out=open("/dev/null", "w"))
    assert conv.messages[-1]["role"] == "assistant" and conv.messages[-1]["content"]
    monkeypatch.undo()
    assert conv.prepare("Thanks.") > 0
    conv.reply(GREEDY, out=open("/dev/null", "w"))
    assert conv.seq.text
    conv.close()


@pytest.mark.parametrize("args,msg", [
    (["--model", "/nonexistent/model", "--prompt", "hi"], "error: "),
    (["--temperature", "-1", "--prompt", "hi"], "error: temperature must be >= 0"),
    (["--top-p", "0", "--prompt", "hi"], "error: top_p must be in"),
    (["--policy", "h2o", "--alpha", "3", "--prompt", "hi"], "--alpha does not apply to --policy h2o"),
    (["--alpha", "3", "--prompt", "hi"], "does not apply to --policy dense (it applies to: infinigen)"),
    (["--policy", "infinigen", "--cpu-kv-limit", "1.5", "--prompt", "hi"], "--cpu-kv-limit"),
    (["--policy", "offload", "--cpu-kv-limit", "0.5", "--prompt", "hi"], "does not apply to --policy offload"),
    (["--policy", "h2o", "--recent", "8", "--prompt", "hi"], "--recent does not apply to --policy h2o"),
])
def test_cli_errors_are_one_line(args, msg):
    r = chat(*args)
    assert r.returncode == 2
    assert msg in r.stderr and "Traceback" not in r.stderr, r.stderr
