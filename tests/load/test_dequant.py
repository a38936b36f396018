"""The torch dequantizers (minigen/load/dequant.py) against the gguf package's own numpy code, on
fresh random blocks of every format written there (random bytes are valid blocks, except for fp16
scales that decode to inf/NaN, which are replaced by finite random values)."""
import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as Q  # noqa: E402
from gguf.quants import dequantize as gguf_dequantize  # noqa: E402

from minigen.load.dequant import FORMATS, dequantize  # noqa: E402

# byte offsets of each format's fp16 fields inside a block
FP16_AT = {Q.Q8_0: (0,), Q.Q4_0: (0,), Q.Q4_1: (0, 2), Q.Q4_K: (0, 2), Q.Q6_K: (208,)}


def random_blocks(qtype, rows, cols, seed):
    block_bytes, block_weights, _ = FORMATS[int(qtype)]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(rows, cols // block_weights, block_bytes), dtype=np.uint8)
    for at in FP16_AT[qtype]:   # finite scales of a plausible size
        raw[..., at:at + 2] = (rng.standard_normal(raw.shape[:2]) * 0.05).astype(np.float16)[..., None].view(np.uint8)
    return raw.reshape(rows, -1)


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q4_K, Q.Q6_K])
@pytest.mark.parametrize("rows,cols", [(1, 256), (3, 512), (5, 768)])
def test_matches_gguf_numpy(qtype, rows, cols):
    raw = random_blocks(qtype, rows, cols, seed=rows * 7 + cols)
    want = torch.from_numpy(gguf_dequantize(raw, qtype).astype(np.float32)).reshape(rows, cols)
    got = dequantize(torch.from_numpy(raw.copy()).reshape(-1), int(qtype), (rows, cols))
    assert got.dtype == torch.float32 and got.shape == (rows, cols)
    torch.testing.assert_close(got, want, rtol=2e-6, atol=1e-7)
    # a test that can fail: a wrong sub-block order or nibble order shows
    assert not torch.equal(got, got.flip(-1))


def test_shape_mismatch_is_refused():
    raw = torch.zeros(144, dtype=torch.uint8)
    with pytest.raises(ValueError, match="blocks of 256 weights"):
        dequantize(raw, int(Q.Q4_K), (2, 256))
