"""The chat CLI: one-shot answers, multi-turn KV reuse, Ctrl-C, and one-line errors."""
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from minigen.chat import Conversation, stats_line
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
    (["--alpha", "3", "--prompt", "hi"], "does not apply to --policy auto (it applies to: infinigen)"),
    (["--policy", "infinigen", "--cpu-kv-limit", "1.5", "--prompt", "hi"], "--cpu-kv-limit"),
    (["--policy", "offload", "--cpu-kv-limit", "0.5", "--prompt", "hi"], "does not apply to --policy offload"),
    (["--policy", "h2o", "--recent", "8", "--prompt", "hi"], "--recent does not apply to --policy h2o"),
    (["--max-seq-len", "-5", "--prompt", "hi"], "--max-seq-len must be an integer >= 2"),
    (["--max-seq-len", "0", "--prompt", "hi"], "--max-seq-len must be an integer >= 2"),
    (["--device", "foo", "--prompt", "hi"], "device 'foo' is not supported"),
    (["--skew", "x.pt", "--prompt", "hi"], "--skew does not apply to --policy auto"),
    (["--policy", "infinigen", "--skew", "/nonexistent.pt", "--prompt", "hi"], "--skew /nonexistent.pt: no such file"),
])
def test_cli_errors_are_one_line(args, msg):
    r = chat(*args)
    assert r.returncode == 2
    assert msg in r.stderr and "Traceback" not in r.stderr, r.stderr


# ---------------------------------------------------------------------------------------------
# a session survives what a user does to it (a tiny random model: fast to load in a subprocess)
# ---------------------------------------------------------------------------------------------
def test_session_survives_refused_turns_bad_bytes_and_unknown_commands(tiny_dir, tmp_path):
    """A turn past --cpu-kv-limit is refused and the next turn answers; a line that is not UTF-8 is
    replaced and said once; /rest is an unknown command, not a model turn; exit status 0."""
    long = "qz" * 70             # 140 tokens: with the first turn, past the 128-row host pool, inside the context
    stdin = b"hello\n/rest\n" + long.encode() + b"\n\xff\xfehello again\nhi\n/quit\n"
    r = subprocess.run([sys.executable, "-m", "minigen.chat", "--model", str(tiny_dir), "--device", "cpu",
                        "--policy", "infinigen", "--cpu-kv-limit", "0.5", "--max-seq-len", "256",
                        "--max-new-tokens", "4", "--temperature", "0", "--stats"],
                       input=stdin, cwd=ROOT, capture_output=True, timeout=300,
                       env={**os.environ, "MINIGEN_CACHE": str(tmp_path)})
    err = r.stderr.decode()
    assert r.returncode == 0 and "Traceback" not in err, err
    assert "unknown command /rest" in err
    assert "past the host KV limit of 128 tokens" in err and "the turn was not added" in err
    assert err.count("not valid UTF-8") == 1
    assert err.count("finish:") == 3                    # hello, the replaced line, hi: three replies


def test_ctrl_c_at_the_prompt_does_not_quit(tiny_dir, monkeypatch, capsys):
    from minigen import chat as chat_mod
    lines = iter([KeyboardInterrupt, "hi", KeyboardInterrupt, "/quit"])

    def fake_input(prompt=""):
        x = next(lines)
        if x is KeyboardInterrupt:
            raise KeyboardInterrupt
        return x
    monkeypatch.setattr("builtins.input", fake_input)
    code = chat_mod.main(["--model", str(tiny_dir), "--device", "cpu", "--max-new-tokens", "3",
                          "--temperature", "0", "--stats"])
    err = capsys.readouterr().err
    assert code == 0 and err.count("(/quit or Ctrl-D leaves)") == 2 and "finish:" in err


def test_stats_after_ctrl_c_count_the_tokens(llm):
    conv = Conversation(llm, system=None)
    conv.prepare("Count from 1 to 100.")

    class StopAfter:
        n = 0

        def write(self, text):
            self.n += 1
            if self.n == 4:
                raise KeyboardInterrupt

        def flush(self):
            pass
    assert conv.reply(SamplingParams(max_new_tokens=50, temperature=0), out=StopAfter())
    assert conv.engine.stats.new_tokens >= 4
    assert f" {conv.engine.stats.new_tokens} tokens," in stats_line(conv, 0)
    conv.close()


def test_ctrl_c_in_prefill_cancels_the_turn(llm, monkeypatch):
    conv = Conversation(llm, system=None)
    conv.prepare("What is the capital of France?")
    conv.reply(GREEDY, out=open("/dev/null", "w"))
    before = list(conv.messages)
    conv.prepare("And of Italy?")
    real = conv.engine.kv.attend

    def interrupt(layer, q, k, v):
        if layer == 3:
            raise KeyboardInterrupt
        return real(layer, q, k, v)
    monkeypatch.setattr(conv.engine.kv, "attend", interrupt)
    assert conv.reply(GREEDY, out=open("/dev/null", "w"))       # stopped
    assert conv.messages == before and not conv.seq.pending       # the turn is gone
    monkeypatch.undo()
    conv.prepare("And of Italy?")
    conv.reply(GREEDY, out=open("/dev/null", "w"))
    assert "Rome" in conv.seq.text
    conv.close()


def test_unknown_command_is_not_a_model_turn(llm, capsys):
    from minigen.chat import turn
    conv = Conversation(llm, system=None)
    turn(conv, "/rest", GREEDY, stats=False)
    assert "unknown command /rest" in capsys.readouterr().err and conv.messages == []
    conv.close()


def test_stats_line_reports_reuse():
    """--stats with --reuse: the fetched share and how much of it was already on the GPU."""
    from minigen import LLM
    llm = LLM(policy="infinigen", policy_opts={"reuse": 2.0})
    conv = Conversation(llm, system=None)
    conv.prepare("Tell me about the history of printing in three sentences.")
    conv.reply(SamplingParams(max_new_tokens=12, temperature=0), out=io.StringIO())
    line = stats_line(conv, 0)
    assert "of KV, " in line and "already on the GPU" in line
    conv.close()
