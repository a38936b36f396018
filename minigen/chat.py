"""python -m minigen.chat: talk to a model.

    python -m minigen.chat                                 # interactive, embedded SmolLM2
    python -m minigen.chat --prompt "What is the capital of France?" --temperature 0

Interactive mode keeps one KV slot for the whole conversation: each turn renders the chat
template over all messages, finds how much of it is already in the cache (longest common token
prefix) and prefills only the rest. /reset starts over, /quit leaves, Ctrl-C stops a reply.
"""
from __future__ import annotations

import argparse
import sys
import time

from minigen.cli import add_model_args, add_sampling_args, policy_opts, run_main
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
        """Add a user message and set the slot's pending tokens; returns how many are new."""
        self.messages.append({"role": "user", "content": user_text})
        tok = self.llm.tokenizer
        if tok.has_chat_template:
            ids = tok.encode_chat(self.messages)
        else:   # no template: plain continuation of the running text
            ids = tok.encode("".join(m["content"] for m in self.messages))
        cached = self.seq.cached_ids
        lcp = 0
        while lcp < min(len(cached), len(ids)) and cached[lcp] == ids[lcp]:
            lcp += 1
        lcp = min(lcp, len(ids) - 1)            # at least one token to prefill (for its logits)
        try:
            self.engine.check_fits(len(ids))
        except ValueError:
            self.messages.pop()
            raise
        self.seq.cached_ids = cached[:lcp]      # reuse the common prefix, drop the rest
        self.seq.pending = ids[lcp:]
        return len(self.seq.pending)

    def reply(self, sp: SamplingParams, out=sys.stdout):
        """Stream the assistant's reply to `out`; Ctrl-C stops it early (kept as said so far)."""
        interrupted = False
        try:
            for events in self.engine.generate([self.seq], sp):
                for _, text in events:
                    out.write(text)
                    out.flush()
        except KeyboardInterrupt:
            interrupted = True
            self.seq.held = ""
        self.messages.append({"role": "assistant", "content": self.seq.text})
        return interrupted


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m minigen.chat", description=__doc__.split("\n")[0])
    add_model_args(p)
    add_sampling_args(p)
    p.add_argument("--prompt", default=None, help="print one reply to this prompt and exit")
    p.add_argument("--system", default=None, help="system message")
    p.add_argument("--stats", action="store_true", help="print prompt tokens, time to first token, tokens/s")
    args = p.parse_args(argv)

    sp = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                        top_p=args.top_p, top_k=args.top_k, seed=args.seed, stop=args.stop)
    t0 = time.perf_counter()
    llm = LLM(args.model, policy=args.policy, device=args.device, dtype=args.dtype,
              max_seq_len=args.max_seq_len, policy_opts=policy_opts(args), skew=args.skew)
    conv = Conversation(llm, args.system)
    info = f"{llm.model.config.arch}, {llm.model.config.num_layers} layers, {llm.device}, {str(llm.dtype).split('.')[-1]}"
    if args.prompt is not None:
        n_new = conv.prepare(args.prompt)
        conv.reply(sp)
        print()
        if args.stats:
            print(stats_line(conv, n_new), file=sys.stderr)
        return 0

    print(f"minigen chat ({info}; loaded in {time.perf_counter() - t0:.1f} s). "
          f"/reset clears the conversation, /quit exits, Ctrl-C stops a reply.", file=sys.stderr)
    while True:
        try:
            user = input("> ")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return 0
        cmd = user.strip()
        if not cmd:
            continue
        if cmd in ("/quit", "/exit"):
            return 0
        if cmd == "/reset":
            conv.reset()
            print("(conversation cleared)", file=sys.stderr)
            continue
        try:
            n_new = conv.prepare(user)
        except ValueError as e:
            print(f"error: {e}; /reset to start over", file=sys.stderr)
            continue
        if conv.reply(sp):
            print("\n(stopped)", file=sys.stderr)
        else:
            print()
        if args.stats:
            print(stats_line(conv, n_new), file=sys.stderr)


def stats_line(conv: Conversation, n_new: int) -> str:
    st, kv = conv.engine.stats, conv.engine.kv.stats()
    fetched = f" | fetched {kv['fetched_fraction']:.1%} of KV" if "fetched_fraction" in kv else ""
    return (f"[{n_new} new prompt tokens, {conv.seq.num_cached} in context | "
            f"first token {st.prefill_s * 1000:.0f} ms | {st.new_tokens} tokens, "
            f"{st.decode_tok_s:.1f} tok/s{fetched} | finish: {conv.seq.finish_reason}]")


if __name__ == "__main__":
    run_main(main)
