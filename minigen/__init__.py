"""minigen: a compact LLM inference runtime for Llama and OPT, with Triton kernels on the hot
paths and the KV cache managed by explicit policies."""
from minigen.llm import LLM, Completion
from minigen.sampler import SamplingParams

__all__ = ["LLM", "Completion", "SamplingParams"]
__version__ = "0.1.0"
