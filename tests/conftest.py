import numpy as np
import pytest
import torch

from minigen.kernels.launch import interpreting


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A tiny random Llama (4 layers, GQA) saved as a Hugging Face directory with a byte-level BPE
    tokenizer and a ChatML template: loads in a fraction of a second, for command-line tests."""
    from transformers import LlamaForCausalLM

    from tests.helpers import llama_config, save_model
    d = tmp_path_factory.mktemp("tiny-llama")
    save_model(LlamaForCausalLM(llama_config(max_position_embeddings=512, num_hidden_layers=4)), d)
    return d


@pytest.fixture(scope="session")
def default_llm():
    """The embedded default model (SmolLM2-135M, fp32, CPU), loaded once for every test using it."""
    from minigen import LLM
    return LLM(device="cpu")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True, scope="session")
def _fix_triton_interpreter():
    """Two triton 3.6 interpreter bugs (CPU only; compiled kernels are unaffected).
    1. numpy >= 2.4 refuses int() of the 1-element arrays the interpreter uses for scalars, so
       `for n in range(lo, hi, step)` with runtime bounds raises (triton-lang/triton#9171).
    2. tl.dot on bf16 operands multiplies their raw uint16 storage."""
    if not interpreting():
        yield
        return
    import triton.language as tl
    import triton.runtime.interpreter as interp
    patch_tensor, create_dot = interp._patch_lang_tensor, interp.InterpreterBuilder.create_dot

    def patched_tensor(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    def as_fp32(h):
        if h.dtype.scalar != tl.bfloat16:
            return h
        return interp.TensorHandle(
            interp._convert_float(h.data, tl.bfloat16, tl.float32, None).view(np.float32), tl.float32)

    def patched_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return create_dot(self, as_fp32(a), as_fp32(b), d, input_precision, max_num_imprecise_acc)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(interp, "_patch_lang_tensor", patched_tensor)
        mp.setattr(interp.InterpreterBuilder, "create_dot", patched_dot)
        yield
