"""python -m minigen.chat: talk to a model.

    python -m minigen.chat                                 # interactive, embedded SmolLM2
    python -m minigen.chat --prompt "What is the capital of France?" --temperature 0

Interactive mode keeps one KV slot for the whole conversation: each turn renders the chat
template over all messages, finds how much of it is already in the cache (longest common token
prefix) and prefills only the rest. /reset starts over, /quit or Ctrl-D leaves, Ctrl-C stops a reply
(kept as said so far; during the prompt's prefill it cancels the turn). A turn that fails (past the
context, past --cpu-kv-limit) is refused with one line and the conversation goes on without it.
"""
from __future__ import annotations

import argparse
import sys
import time

from minigen.cli import add_model_args, add_sampling_args, policy_opts, run_main, user_errors
from minigen.sequence import Sequence
from minigen.llm import LLM
from minigen.sampler import SamplingParams


class Conversation:
    """Messages plus the KV slot that holds their tokens."""

    def __init__(self, llm: LLM, system: str | None):
        self.llm, self.system = llm, system
        self.engine = llm.get_engine(1)
        self.seq: Sequence = self.engine.new_sequence([])
        self.reset()

    def close(self) -> None:
        """Give the KV slot back to the engine."""
        self.engine.release(self.seq)

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []
        self.seq.cached_ids = []   # the slot's old K/V is overwritten as new tokens arrive

    def prepare(self, user_text: str) -> int:
        """Add a user message and set the slot's pending tokens; returns how many are new. A turn
        that cannot run is refused here (ValueError) and leaves the conversation as it was."""
        self.messages.append({"role": "user", "content": user_text})
        try:
            ids = self._encode()
            cached = self.seq.cached_ids
            lcp = 0
            while lcp < min(len(cached), len(ids)) and cached[lcp] == ids[lcp]:
                lcp += 1
            lcp = min(lcp, len(ids) - 1)        # at least one token to prefill (for its logits)
            self.engine.check_fits(len(ids))
            rows = self.engine.kv.whole_prompt_over
            if rows is not None and lcp and len(ids) > rows:
                raise ValueError(f"this turn takes the conversation to {len(ids)} tokens, past the host KV limit of "
                                 f"{rows} tokens per sequence (--cpu-kv-limit): /reset, or raise the limit")
        except BaseException:
            self.messages.pop()
            raise
        self.seq.cached_ids = cached[:lcp]      # reuse the common prefix, drop the rest
        self.seq.pending = ids[lcp:]
        return len(self.seq.pending)

    def _encode(self) -> list[int]:
        tok = self.llm.tokenizer
        if tok.has_chat_template:
            return tok.encode_chat(self.messages)
        return tok.encode("".join(m["content"] for m in self.messages))   # plain running text

    def reply(self, sp: SamplingParams, out=sys.stdout) -> bool:
        """Stream the assistant's reply to `out`; returns True when Ctrl-C stopped it. Stopped during
        decoding, the reply is kept as said so far; stopped (or failed) before its first token, the
        turn is cancelled: the user message goes and the slot's tokens are back to before the turn
        (the engine restores the policy's state of an interrupted prefill chunk; a long message's
        chunks that completed before it keep what they added to a policy's running statistics,
        such as h2o's accumulated attention of the earlier tokens)."""
        gen = self.engine.generate([self.seq], sp)
        started = False
        try:
            for events in gen:
                started = True
                for _, text in events:
                    out.write(text)
                    out.flush()
        except BaseException as e:
            gen.close()
            if not started:
                self.messages.pop()
                self.seq.pending = []
                if isinstance(e, KeyboardInterrupt):
                    return True
                raise
            if not isinstance(e, KeyboardInterrupt):
                raise
            self.seq.held = ""
            self.messages.append({"role": "assistant", "content": self.seq.text})
            return True
        self.messages.append({"role": "assistant", "content": self.seq.text})
        return False


def clean_text(text: str, warn: list) -> str:
    """Text from the terminal or the command line as valid Unicode: bytes that were not UTF-8 arrive
    as lone surrogates (Python's surrogateescape), which no tokenizer takes; they become U+FFFD, said
    once (warn: a one-element flag list)."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        if not warn[0]:
            print("note: the input is not valid UTF-8; its bad bytes were replaced with U+FFFD", file=sys.stderr)
            warn[0] = True
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m minigen.chat", description=__doc__.split("\n")[0])
    add_model_args(p, default_policy="auto")
    add_sampling_args(p)
    p.add_argument("--prompt", default=None, help="print one reply to this prompt and exit")
    p.add_argument("--system", default=None, help="system message")
    p.add_argument("--stats", action="store_true", help="print prompt tokens, time to first token, tokens/s")
    args = p.parse_args(argv)

    warned = [False]
    sp = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                        top_p=args.top_p, top_k=args.top_k, seed=args.seed, stop=args.stop)
    opts = policy_opts(args)
    t0 = time.perf_counter()
    llm = LLM(args.model, policy=args.policy, device=args.device, dtype=args.dtype,
              max_seq_len=args.max_seq_len, policy_opts=opts, skew=args.skew, gpu_memory=args.gpu_memory)
    system = None if args.system is None else clean_text(args.system, warned)
    conv = Conversation(llm, system)
    info = (f"{llm.model.config.arch}, {llm.model.config.num_layers} layers, {llm.policy}, {llm.device}, "
            f"{str(llm.dtype).split('.')[-1]}")
    if args.prompt is not None:
        n_new = conv.prepare(clean_text(args.prompt, warned))
        stopped = conv.reply(sp)
        print()
        if args.stats:
            print(stats_line(conv, n_new), file=sys.stderr)
        return 130 if stopped else 0

    print(f"minigen chat ({info}; loaded in {time.perf_counter() - t0:.1f} s). "
          f"/reset clears the conversation, /quit or Ctrl-D exits, Ctrl-C stops a reply.", file=sys.stderr)
    while True:
        try:
            user = input("> ")
        except EOFError:
            print(file=sys.stderr)
            return 0
        except KeyboardInterrupt:
            print("\n(/quit or Ctrl-D leaves)", file=sys.stderr)
            continue
        except UnicodeDecodeError:
            print("error: that line is not valid UTF-8 text; type it again", file=sys.stderr)
            continue
        try:
            turn(conv, clean_text(user, warned), sp, args.stats)
        except KeyboardInterrupt:      # outside the reply (tokenizing, printing): nothing half-done
            print("\n(stopped)", file=sys.stderr)
        except SystemExit as e:
            return e.code


def turn(conv: Conversation, user: str, sp: SamplingParams, stats: bool) -> None:
    """One line typed at the prompt: a command or a user message and its reply."""
    cmd = user.strip()
    if not cmd:
        return
    if cmd.startswith("/"):
        if cmd in ("/quit", "/exit"):
            raise SystemExit(0)
        if cmd == "/reset":
            conv.reset()
            print("(conversation cleared)", file=sys.stderr)
            return
        print(f"unknown command {cmd.split()[0]}: /reset clears the conversation, /quit exits", file=sys.stderr)
        return
    try:
        n_new = conv.prepare(user)
        stopped = conv.reply(sp)
    except user_errors() as e:
        print(f"error: {e} (the turn was not added; /reset starts over)", file=sys.stderr)
        return
    print("\n(stopped)" if stopped else "", file=sys.stderr if stopped else sys.stdout)
    if stats:
        print(stats_line(conv, n_new), file=sys.stderr)


def stats_line(conv: Conversation, n_new: int) -> str:
    st, kv = conv.engine.stats, conv.engine.kv.stats()
    fetched = f" | fetched {kv['fetched_fraction']:.1%} of KV" if "fetched_fraction" in kv else ""
    if "reuse_hit_rate" in kv:   # the share of the fetched rows found resident on the GPU (--reuse)
        fetched += f", {kv['reuse_hit_rate']:.0%} of it already on the GPU"
    return (f"[{n_new} new prompt tokens, {conv.seq.num_cached} in context | "
            f"first token {st.prefill_s * 1000:.0f} ms | {st.new_tokens} tokens, "
            f"{st.decode_tok_s:.1f} tok/s{fetched} | finish: {conv.seq.finish_reason or 'stopped'}]")


if __name__ == "__main__":
    run_main(main)
