"""The skew artifact: InfiniGen's per-layer orthogonal matrices (minigen/calibrate.py computes them), what
the infinigen policy runs with, and how it is stored.

    per layer l, per KV head g:  A = V of the SVD Q = U S V^T of g's post-RoPE calibration queries
    q~ = q A, k~ = k A  (row vectors)  =>  q~ k~^T = q A A^T k^T = q k^T: attention is unchanged,
    and column j of Q A = U S has energy S_j^2, so the leading columns hold the most.

Llama applies A after RoPE at run time (the infinigen policy projects on the kept columns of A);
OPT has it folded into W_q/W_k (`folded`), so the model hands already-skewed q, k to the policy.
The artifact is a torch.save of a dict, written atomically and checked against the model's shape
when read.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from minigen.config import ModelConfig

ARTIFACT_VERSION = 1


@dataclass(slots=True)
class Skew:
    matrices: torch.Tensor   # (L, Hkv, D, D) A[l, g], orthogonal, columns by decreasing singular value
    folded: bool             # OPT after fold_into_opt: q/k projections already emit skewed vectors
    arch: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    calib_tokens: int        # T, tokens of calibration text run through the model
    source: str              # provenance: calibration file name / description
    singular_values: torch.Tensor | None = None   # (L, Hkv, D) fp32 S, descending (diagnostics)

    def __post_init__(self):
        want = (self.num_layers, self.num_kv_heads, self.head_dim, self.head_dim)
        if tuple(self.matrices.shape) != want:
            raise ValueError(f"skew matrices have shape {tuple(self.matrices.shape)}, expected {want}")

    def to(self, device, dtype: torch.dtype = torch.float32) -> "Skew":
        """A copy with the matrices on `device` in `dtype`: do this once, not per step."""
        return Skew(self.matrices.to(device=device, dtype=dtype), self.folded, self.arch, self.num_layers,
                    self.num_kv_heads, self.head_dim, self.calib_tokens, self.source, self.singular_values)

    def energy_share(self, ratio: float = 0.2) -> float:
        """Mean over (layer, KV head) of the calibration query energy in the first int(D*ratio)
        skewed columns (sum S_j^2 over j < R / sum S_j^2); 1.0 = perfectly concentrated."""
        if self.singular_values is None:
            return float("nan")
        e = self.singular_values.double() ** 2                          # (L, Hkv, D)
        R = max(1, int(self.head_dim * ratio))
        return float((e[..., :R].sum(-1) / e.sum(-1).clamp_min(1e-300)).mean())


def save(skew: Skew, path: str | Path) -> None:
    """Write the artifact atomically (tmp file + rename; the tmp file is removed if that fails, and
    OSError says why). `folded` describes a model instance, not the file: a freshly loaded model is
    never folded, so it is not stored."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"'{path}' is a directory; give the skew artifact a file name, e.g. {path / 'skew.pt'}")
    path.parent.mkdir(parents=True, exist_ok=True)
    sv = skew.singular_values
    blob = {"version": ARTIFACT_VERSION,
            "matrices": skew.matrices.detach().float().cpu().contiguous(),   # sync: writing the artifact
            "singular_values": None if sv is None else sv.float().cpu(),     # sync: writing the artifact
            "arch": skew.arch, "num_layers": skew.num_layers, "num_kv_heads": skew.num_kv_heads,
            "head_dim": skew.head_dim, "calib_tokens": skew.calib_tokens, "source": skew.source}
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        torch.save(blob, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load(path: str | Path, cfg: ModelConfig) -> Skew:
    """Read an artifact and check it belongs to a model of config `cfg` (arch and shapes); ValueError
    otherwise."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"skew artifact '{path}' does not exist; create it with "
                                "`python -m minigen.skew --model PATH --out PATH`")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        skew = Skew(blob["matrices"].float(), False, blob["arch"], blob["num_layers"], blob["num_kv_heads"],
                    blob["head_dim"], blob["calib_tokens"], blob["source"], blob.get("singular_values"))
    except Exception as e:  # unpickling errors, truncated zip, missing keys, bad shapes
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"'{path}' is not a valid skew artifact ({reason}); delete it and recompute "
                         "with `python -m minigen.skew`") from None
    check_matches(skew, cfg, where=f"skew artifact '{path}'")
    return skew


def check_matches(skew: Skew, cfg: ModelConfig, where: str = "the skew") -> None:
    """ValueError unless the skew was computed for a model of config `cfg`."""
    for field in ("arch", "num_layers", "num_kv_heads", "head_dim"):
        have, want = getattr(skew, field), getattr(cfg, field)
        if have != want:
            raise ValueError(f"{where} was computed for a model with {field}={have}, this model has "
                             f"{field}={want}; recompute it with `python -m minigen.skew --model ...`")
