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
from minigen.kv import check_policy_opts
from minigen.load import load_checkpoint
from minigen.memory import MemoryPlan, auto_policy, check, hold_to_budget, plan, resolve_budget
from minigen.models import build_model
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
                 batch_invariant: bool = False, gpu_memory: int | float | str | None = None, max_batch: int = 1):
        """policy: a KV policy (minigen/kv), or "auto": dense when it fits the memory (gpu_memory, else
        what the device has free), infinigen at its defaults when it does not.
        gpu_memory: the GPU memory budget, bytes (e.g. "24G") or a fraction of the device's memory;
        what the run needs for max_batch sequences of max_seq_len tokens is planned from the
        model's config and refused, in one line, before loading when it does not fit; on CUDA the
        allocator is held to it (minigen/memory.py). generate with more prompts than max_batch
        plans again. The pinned host pool of the offloading policies is checked against the RAM
        available, with or without a budget.
        batch_invariant (CPU only): every sequence's numbers independent of the batch it runs in
        (minigen/kernels/ops.py: linear_row_invariant), at some cost in CPU speed; the evaluations
        turn it on, so their numbers do not depend on --batch."""
        # what can be checked without the model, before spending time on loading it
        self.policy_opts = dict(policy_opts or {})
        if "skew" in self.policy_opts:
            raise ValueError("give the skew artifact as skew= (a file path), not in policy_opts: LLM loads it "
                             "for the model, or computes and caches it when skew= is left out")
        if policy == "auto" and self.policy_opts:
            raise ValueError(f"policy 'auto' takes no policy settings (got {', '.join(self.policy_opts)}): it picks "
                             "dense or infinigen at its defaults; name the policy to tune it")
        if policy != "auto":
            check_policy_opts(policy, self.policy_opts)
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch must be an integer >= 1, got {max_batch!r}")
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
        self.gpu_memory = resolve_budget(gpu_memory, self.device)
        ckpt = load_checkpoint(model)                   # config and tokenizer; the tensors stay on disk
        cfg = ckpt.config
        if max_seq_len is not None and max_seq_len > cfg.max_seq_len:
            raise ContextOverflowError(f"--max-seq-len {max_seq_len} exceeds the model's context of {cfg.max_seq_len} tokens")
        self.max_seq_len = max_seq_len if max_seq_len is not None else min(cfg.max_seq_len, DEFAULT_MAX_SEQ_LEN)
        self.policy, self.cuda_graph, self.max_batch = policy, cuda_graph, max_batch
        if policy == "auto":
            self.policy = auto_policy(cfg, self.dtype, self.device, max_batch, self.max_seq_len, self.gpu_memory)
        self.memory_plan = self._plan(cfg, max_batch)      # refused here, before loading, when it does not fit
        if self.gpu_memory is not None and self.device.type == "cuda":
            hold_to_budget(self.gpu_memory, self.device)
        self.model = build_model(cfg, ckpt.tensors(self.device), device=self.device, dtype=self.dtype)
        self.tokenizer = ckpt.tokenizer
        self.model.ops.set_batch_invariant(batch_invariant)
        # (the settings that depend on the model, e.g. --dense-layers against its layers, were checked
        # by the plan, which builds the policy on the meta device)
        self.model_path, self.skew_path, self._skew = model, skew, None
        if self.policy == "infinigen":
            self.policy_opts["skew"] = self.skew()
        self.engine: Engine | None = None

    def skew(self):
        """infinigen's skew matrices for this model: the skew= file, else the ones cached per model
        (computed on first use). Loaded once: for OPT they are folded into the weights then, which
        every policy run on this LLM afterwards shares."""
        if self._skew is None:
            self._skew = load_skew_for(self.model, self.tokenizer, self.model_path, self.skew_path)
        return self._skew

    def use_policy(self, policy: str, policy_opts: dict | None = None, *, max_seq_len: int | None = None) -> None:
        """Run the loaded model with another KV policy (and slot capacity), as evaluations and
        benchmarks comparing policies do: checked and planned against the budget like the
        constructor's, the engine rebuilt on next use."""
        opts = dict(policy_opts or {})
        check_policy_opts(policy, opts)
        cfg = self.model.config
        if max_seq_len is not None and max_seq_len > cfg.max_seq_len:
            raise ContextOverflowError(f"--max-seq-len {max_seq_len} exceeds the model's context of {cfg.max_seq_len} tokens")
        self.close()
        self.policy, self.policy_opts = policy, opts
        self.max_seq_len = max_seq_len or self.max_seq_len
        self.memory_plan = self._plan(cfg, self.max_batch)
        if policy == "infinigen":
            self.policy_opts["skew"] = self.skew()

    def _plan(self, cfg, max_batch: int) -> MemoryPlan:
        opts = {k: v for k, v in self.policy_opts.items() if k != "skew"}
        p = plan(cfg, self.dtype, self.policy, max_batch, self.max_seq_len, opts)
        check(p, self.gpu_memory, cfg, self.dtype, opts)
        return p

    def get_engine(self, max_batch: int) -> Engine:
        """The engine, (re)allocated when a larger batch is asked for (planned against the budget
        first when it is larger than the one planned so far)."""
        if self.engine is None or self.engine.max_batch < max_batch:
            if max_batch > self.memory_plan.num_slots:
                self.memory_plan = self._plan(self.model.config, max_batch)
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
