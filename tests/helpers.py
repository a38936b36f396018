"""Shared test helpers."""
from __future__ import annotations

import torch

# (dtype, atol, rtol) used by kernel tests
TOLERANCES = [
    (torch.float32, 1e-4, 1e-4),
    (torch.float16, 2e-3, 2e-3),
    (torch.bfloat16, 1.6e-2, 1.6e-2),
]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float, what: str = ""):
    """torch.testing-style check that prints the worst mismatches (index, got, want)."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert not torch.isnan(a).any(), f"{what}: output has NaN"
    err = (a - e).abs()
    bad = err > atol + rtol * e.abs()
    if bad.any():
        flat = (err - rtol * e.abs()).flatten()
        worst = flat.topk(min(5, flat.numel())).indices
        lines = []
        for i in worst.tolist():
            idx = tuple(int(x) for x in torch.unravel_index(torch.tensor(i), a.shape))
            lines.append(f"  at {idx}: got {a[idx].item():.6g}, want {e[idx].item():.6g}")
        raise AssertionError(
            f"{what}: {int(bad.sum())}/{bad.numel()} elements off (max abs err {err.max().item():.3g}, "
            f"atol {atol}, rtol {rtol}); worst:\n" + "\n".join(lines))


def poison(shape, dtype, device="cpu") -> torch.Tensor:
    """An output buffer filled with NaN so unwritten elements fail the comparison."""
    return torch.full(shape, float("nan"), dtype=dtype, device=device)
