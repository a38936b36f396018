"""`LLM`: the Python entry point. Loads a checkpoint (HF directory, GGUF, or the embedded default),
builds the model on the chosen device and runs batched generation through the engine.

    from minigen import LLM
    llm = LLM()                                   # SmolLM2-135M-Instruct, dense KV
    print(llm.generate(["The capital of France is"], max_new_tokens=8, temperature=0)[0].text)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from minigen.device import resolve_device, resolve_dtype
from minigen.engine import Engine
from minigen.kv import POLICIES
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
                 cuda_graph: bool = True, policy_opts: dict | None = None, skew: str | None = None):
        if policy not in POLICIES:   # say so before spending time on loading
            raise ValueError(f"unknown policy '{policy}'; choose one of {', '.join(POLICIES)}")
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.model, self.tokenizer = load_model(model, device=self.device, dtype=self.dtype)
        self.policy, self.cuda_graph = policy, cuda_graph
        self.policy_opts = dict(policy_opts or {})
        if policy == "infinigen":   # the skew matrices: cached per model, computed on first use
            self.policy_opts["skew"] = load_skew_for(self.model, self.tokenizer, model, skew)
        self.max_seq_len = max_seq_len or min(self.model.config.max_seq_len, DEFAULT_MAX_SEQ_LEN)
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
        """Generate for each prompt; `sampling` takes SamplingParams fields (temperature, ...)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        sp = SamplingParams(**sampling)
        engine = self.get_engine(len(prompts))
        seqs = [engine.new_sequence(self.encode_prompt(p, chat, system)) for p in prompts]
        try:
            for _ in engine.generate(seqs, sp):
                pass
        finally:
            for s in seqs:
                engine.release(s)
        return [Completion(s.text, s.output_ids, s.finish_reason) for s in seqs]

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
            self.engine = None
