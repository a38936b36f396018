"""`LLM`: the Python entry point. Loads a checkpoint (HF directory, GGUF, or the embedded default),
builds the model on the chosen device and runs batched generation through the engine.

    from minigen import LLM
    llm = LLM()                                   # SmolLM2-135M-Instruct, dense KV
    print(llm.generate(["The capital of France is"], max_new_tokens=8, temperature=0)[0].text)
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from minigen.device import resolve_device, resolve_dtype
from minigen.engine import Engine
from minigen.errors import ContextOverflowError
from minigen.kv import check_policy_opts, make_policy
from minigen.load import load_model
from minigen.sampler import SamplingParams
from minigen.calibrate import load_skew_for

DEFAULT_MAX_SEQ_LEN = 8192   # default slot capacity when the model's context is longer


@dataclass(slots=True)
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str


class LLM:
    def __init__(self, model: str | None = None, *, policy: str = "dense", device: str | None = None,
                 dtype: str | torch.dtype | None = None, max_seq_len: int | None = None,
                 cuda_graph: bool = True, policy_opts: dict | None = None, skew: str | None = None,
                 batch_invariant: bool = False):
        """batch_invariant (CPU only): every sequence's numbers independent of the batch it runs in
        (minigen/kernels/ops.py: linear_row_invariant), at some cost in CPU speed; the evaluations
        turn it on, so their numbers do not depend on --batch."""
        # what can be checked without the model, before spending time on loading it
        self.policy_opts = dict(policy_opts or {})
        if "skew" in self.policy_opts:
            raise ValueError("give the skew artifact as skew= (a file path), not in policy_opts: LLM loads it "
                             "for the model, or computes and caches it when skew= is left out")
        check_policy_opts(policy, self.policy_opts)
        if skew is not None and policy != "infinigen":
            raise ValueError(f"skew= (--skew) applies to policy 'infinigen' only, not '{policy}'")
        if skew is not None and not Path(skew).is_file():
            raise FileNotFoundError(f"skew artifact '{skew}' does not exist; leave it out to use the cached one, "
                                    f"or make it with `python -m minigen.skew --out FILE`")
        if max_seq_len is not None and (isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int)
                                        or max_seq_len < 2):
            raise ValueError(f"--max-seq-len must be an integer >= 2 (a prompt token and a new one), got {max_seq_len!r}")
        self.device = resolve_device(device)
        if batch_invariant and self.device.type != "cpu":
            raise ValueError("batch_invariant is implemented on the CPU only: cuBLAS picks its kernels by shape "
                             "and minigen has no batch-invariant GPU matmul")
        self.batch_invariant = batch_invariant
        self.dtype = resolve_dtype(dtype, self.device)
        self.model, self.tokenizer = load_model(model, device=self.device, dtype=self.dtype)
        self.model.ops.set_batch_invariant(batch_invariant)
        cfg = self.model.config
        if max_seq_len is not None and max_seq_len > cfg.max_seq_len:
            raise ContextOverflowError(f"--max-seq-len {max_seq_len} exceeds the model's context of {cfg.max_seq_len} tokens")
        self.max_seq_len = max_seq_len if max_seq_len is not None else min(cfg.max_seq_len, DEFAULT_MAX_SEQ_LEN)
        self.policy, self.cuda_graph = policy, cuda_graph
        # the settings that depend on the model (e.g. --dense-layers against its layers), before the
        # skew matrices are computed: build the policy once without allocating it
        make_policy(policy, cfg, ops=self.model.ops, project_q=self.model.project_q, device=self.device,
                    dtype=self.dtype, **self.policy_opts).close()
        if policy == "infinigen":   # the skew matrices: cached per model, computed on first use
            self.policy_opts["skew"] = load_skew_for(self.model, self.tokenizer, model, skew)
        self.engine: Engine | None = None

    def get_engine(self, max_batch: int) -> Engine:
        """The engine, (re)allocated when a larger batch is asked for."""
        if self.engine is None or self.engine.max_batch < max_batch:
            if self.engine is not None:
                self.engine.close()
            self.engine = Engine(self.model, self.tokenizer, policy=self.policy, max_batch=max_batch,
                                 max_seq_len=self.max_seq_len, cuda_graph=self.cuda_graph,
                                 policy_opts=self.policy_opts)
        return self.engine

    def encode_prompt(self, prompt: str, chat: bool, system: str | None = None) -> list[int]:
        if not chat:
            return self.tokenizer.encode(prompt)
        msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        return self.tokenizer.encode_chat(msgs)

    def generate(self, prompts: str | list[str], *, chat: bool = False, system: str | None = None,
                 **sampling) -> list[Completion]:
        """Generate for each prompt; `sampling` takes SamplingParams fields (temperature, ...). Every
        prompt is checked (type, length) before any KV slot is taken, and the slots are given back
        however generation ends."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise ValueError(f"generate needs a prompt string or a non-empty list of them, got {prompts!r}")
        for i, p in enumerate(prompts):
            if not isinstance(p, str):
                raise ValueError(f"prompt {i} is a {type(p).__name__}, not a string")
        sp = SamplingParams(**sampling)
        ids = [self.encode_prompt(p, chat, system) for p in prompts]
        engine = self.get_engine(len(ids))
        for i, x in enumerate(ids):
            if not x:
                raise ValueError(f"prompt {i} is empty (no tokens): give some text")
            try:
                engine.check_fits(len(x))
            except ContextOverflowError as e:
                raise ContextOverflowError(f"prompt {i}: {e}") from None
        seqs = []
        try:
            for x in ids:
                seqs.append(engine.new_sequence(x))
            for _ in engine.generate(seqs, sp):
                pass
        finally:
            engine.release_all(seqs)
        return [Completion(s.text, s.output_ids, s.finish_reason) for s in seqs]

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
            self.engine = None
