"""Skewing, InfiniGen's offline step (once per model; `python -m minigen.skew` is its command line).

InfiniGen speculates the next layer's attention from a few query/key columns. That only works if
a few columns carry most of the energy, so every layer's q/k are first rotated by an orthogonal
matrix A found offline (docs/design.md; the artifact is minigen/kv/skew.py):

    per layer l, per KV head g:  Q = the post-RoPE calibration queries of g's G query heads,
                                 stacked over T tokens                        (G*T, D)
                                 Q = U S V^T  (SVD, S descending)
                                 A = V                                        (D, D), A^T A = I

Llama (RoPE): RoPE depends on the position, so A cannot be folded into W_q/W_k; the infinigen
policy applies it after RoPE at run time. OPT (no RoPE): A is folded into the projections once
(`fold_into_opt`); the model then hands already-skewed q, k to the KV policy.

The artifact lives in the cache dir ($MINIGEN_CACHE or ~/.cache/minigen)/skew/, keyed by the model
file; `load_or_calibrate` reuses it and `load_skew_for` is what LLM(policy="infinigen") calls.
"""
from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from minigen.engine import Engine
from minigen.kv.dense import DenseKV
from minigen.kv.skew import Skew, check_matches, load, save
from minigen.load import default_model_path
from minigen.load.pypi import cache_dir

REPO_DATA_DIR = Path(__file__).resolve().parent.parent / "data"   # git-ignored, fetched by make


# ---------------------------------------------------------------------------------------------
# Calibration
# ---------------------------------------------------------------------------------------------
class _RecordingKV(DenseKV):
    """Dense attention that also keeps every layer's post-RoPE queries (fp32, CPU)."""

    name = "record"

    def allocate(self, num_slots: int, max_seq_len: int) -> None:
        super().allocate(num_slots, max_seq_len)
        self.queries: list[list[torch.Tensor]] = [[] for _ in range(self.num_layers)]

    def attend(self, layer, q, k, v):
        # calibration (offline) keeps every layer's queries (N, H, D) on the host for the SVD
        self.queries[layer].append(q.detach().float().cpu())   # sync: offline calibration, no decode
        return super().attend(layer, q, k, v)


def _orthogonal_basis(Q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q (Hkv, M, D) stacked queries -> A (Hkv, D, D) = V of Q = U S V^T, and S (Hkv, D).

    float64: the SVD of a (G*T, D) matrix with a wide spread of singular values keeps the small
    directions orthogonal to the big ones only to ~1e-6 in fp32; in double A^T A = I to ~1e-15
    before the final cast."""
    Hkv, M, D = Q.shape
    # full_matrices=False gives Vh of (min(M, D), D): with fewer rows than D (tiny calibration sets)
    # ask for the full V so A stays D x D (U is then only M x M, cheap)
    _, S, Vh = torch.linalg.svd(Q.double(), full_matrices=M < D)
    A = Vh.transpose(-1, -2)                                          # (Hkv, D, D), columns = v_j
    if S.shape[-1] < D:                                               # null-space columns: S_j = 0
        S = torch.cat([S, S.new_zeros(Hkv, D - S.shape[-1])], -1)
    # an SVD fixes each v_j only up to sign; make each column's largest entry positive so the
    # artifact is reproducible (any sign keeps A orthogonal and q~ k~^T = q k^T)
    sign = torch.sign(A.gather(1, A.abs().argmax(dim=1, keepdim=True)))  # (Hkv, 1, D)
    A = A * sign.masked_fill(sign == 0, 1.0)
    return A.float(), S.float()


@torch.inference_mode()
def calibrate(model, ids: list[int], *, chunk: int = 1024, progress: bool = True,
              source: str = "token ids") -> Skew:
    """Run `ids` densely through `model`, record post-RoPE queries, SVD per (layer, KV head).

    Cost: one prefill of len(ids) tokens, L*T*H*D*4 bytes of host memory for the queries
    (1 GiB for a 7B model at T=2048) and L batched SVDs of (Hkv, G*T, D) in float64."""

    cfg = model.config
    if getattr(model, "skew_folded", False):
        raise ValueError("this model already has a skew folded into its q/k projections; "
                         "calibrate on a freshly loaded model")
    if len(ids) < 1:
        raise ValueError("calibration text is empty after tokenization; pass a longer --calib file")
    if len(ids) + 1 > cfg.max_seq_len:
        raise ValueError(f"{len(ids)} calibration tokens do not fit the model's context of "
                         f"{cfg.max_seq_len}; use at most {cfg.max_seq_len - 1} (--tokens)")
    L, H, Hkv, D = cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    G = H // Hkv

    # an engine whose dense policy is swapped for the recording one, same shape
    engine = Engine(model, None, policy="dense", max_batch=1, max_seq_len=len(ids) + 1,
                    cuda_graph=False, max_prefill_tokens=chunk)
    engine.kv.close()
    rec = engine.kv = _RecordingKV(L, Hkv, D, dtype=engine.dtype, device=engine.device,
                                   ops=model.ops, sm_scale=model.sm_scale)
    rec.allocate(1, engine.capacity)
    chunks = [ids[i:i + chunk] for i in range(0, len(ids), chunk)]
    bar = tqdm(total=len(chunks) + L, desc="skew calibration", unit="step", leave=False,
               disable=None if progress else True)
    try:
        seq = engine.new_sequence([])
        for part in chunks:                       # one prefill per chunk: each continues the cache
            seq.pending = list(part)
            engine.prefill([seq])
            bar.update()
        engine.close()                            # the K/V cache is not needed for the SVDs
        mats, svals = [], []
        for layer in range(L):
            q = torch.cat(rec.queries[layer])                         # (T, H, D)
            rec.queries[layer] = []
            T = q.shape[0]
            # a KV head's G query heads are consecutive (head h -> KV head h // G)
            Q = q.view(T, Hkv, G, D).permute(1, 2, 0, 3).reshape(Hkv, G * T, D)  # (Hkv, G*T, D)
            A, S = _orthogonal_basis(Q)
            mats.append(A)
            svals.append(S)
            bar.update()
    finally:
        bar.close()
        engine.close()
    return Skew(torch.stack(mats), False, cfg.arch, L, Hkv, D, len(ids), source, torch.stack(svals))


@torch.no_grad()


def fold_into_opt(model, skew: Skew) -> None:
    """In place: W_q, W_k, b_q, b_k of every OPT head h become A^T W_h, A^T b_h, so the model's
    q_proj/k_proj emit q A, k A directly. Sets skew.folded (run time then applies nothing).

    nn.Linear computes y = x W^T + b with W (C_out, C_in). Head h's rows W_h = W[hD:(h+1)D] (D, C):
        q_h A = (x W_h^T + b_h) A = x (A^T W_h)^T + (A^T b_h)^T
    minigen scales logits by D^-0.5 inside attention (sm_scale), not in q_proj, so this is exact;
    an orthogonal A also leaves |q|, and so any scale, unchanged."""
    if model.config.arch != "opt":
        raise ValueError(f"fold_into_opt is for OPT only; {model.config.arch} applies the skew after "
                         "RoPE at run time (the infinigen policy does)")
    check_matches(skew, model.config)
    if skew.folded or getattr(model, "skew_folded", False):
        raise ValueError("the skew is already folded into this model; folding twice would rotate twice")
    D = skew.head_dim
    for layer, blk in enumerate(model.model.decoder.layers):
        A = skew.matrices[layer].double()                             # (H, D, D), H == Hkv for OPT
        for lin in (blk.self_attn.q_proj, blk.self_attn.k_proj):
            W = lin.weight.double().view(-1, D, lin.weight.shape[1])  # (H, D, C)
            W = A.to(W.device).transpose(1, 2) @ W                    # (H, D, C)  A^T W_h
            lin.weight.copy_(W.reshape_as(lin.weight).to(lin.weight.dtype))
            if lin.bias is not None:
                b = lin.bias.double().view(-1, D, 1)                  # (H, D, 1)
                b = A.to(b.device).transpose(1, 2) @ b                # (H, D, 1)  A^T b_h
                lin.bias.copy_(b.reshape_as(lin.bias).to(lin.bias.dtype))
    model.skew_folded = True
    skew.folded = True


# ---------------------------------------------------------------------------------------------
# The cache
# ---------------------------------------------------------------------------------------------
def default_skew_path(model_path: str | Path) -> Path:
    """<cache>/skew/<model stem>-<hash>.pt; the hash covers the resolved path and the size and
    mtime of the weights, so a re-downloaded or re-saved model gets a fresh artifact."""
    p = Path(model_path).expanduser().resolve()
    files = sorted([*p.glob("*.safetensors"), p / "config.json"]) if p.is_dir() else [p]
    h = hashlib.sha1(str(p).encode())
    for f in files:
        if f.exists():
            st = f.stat()
            h.update(f"|{f.name}|{st.st_size}|{st.st_mtime_ns}".encode())
    stem = p.name if p.is_dir() else p.stem
    return cache_dir() / "skew" / f"{stem}-{h.hexdigest()[:12]}.pt"


def default_calibration_text() -> tuple[str, str]:
    """(text, description): the repo's data/ texts (the needle-in-a-haystack essays, fetched by a
    make target) when there are any, else the stdlib's pydoc topic pages (English prose, always
    installed, no download)."""
    files = sorted(REPO_DATA_DIR.rglob("*.txt")) if REPO_DATA_DIR.is_dir() else []
    if files:
        text = "\n\n".join(f.read_text(encoding="utf-8", errors="replace") for f in files)
        return text, f"{len(files)} text files under {REPO_DATA_DIR}"
    from pydoc_data.topics import topics   # lazy: a megabyte of text, needed only without data/
    return "\n\n".join(topics[k] for k in sorted(topics)), "Python's pydoc topics (pydoc_data.topics)"


def calibration_ids(tokenizer, text: str, num_tokens: int) -> list[int]:
    """The first num_tokens token ids of text; encodes a prefix first (big files, slow tokenizers)."""
    cut = num_tokens * 16                      # English runs ~4 chars/token; 16 is a wide margin
    ids = tokenizer.encode(text[:cut])
    if len(ids) < num_tokens and len(text) > cut:
        ids = tokenizer.encode(text)
    return ids[:num_tokens]


def load_or_calibrate(model, tokenizer, model_path, *, calib_file=None, num_tokens: int = 2048,
                      path=None) -> Skew:
    """The skew for `model`: the artifact at `path` (default: the cache path of model_path; None:
    the default model) when it exists and matches the model, else calibrate once and save it.
    A stale or corrupt artifact at the default path is recomputed; at an explicit path it raises.
    The result is never folded: for OPT call fold_into_opt(model, skew) before running."""
    if path is None:
        if model_path is None:
            model_path = default_model_path()
        art = default_skew_path(model_path)
    else:
        art = Path(path)
    if art.is_file():
        try:
            return load(art, model.config)
        except ValueError as e:
            if path is not None:
                raise
            print(f"note: {e}; recomputing", file=sys.stderr)
    if calib_file is not None:
        f = Path(calib_file)
        if not f.is_file():
            raise FileNotFoundError(f"calibration file '{f}' does not exist; pass a UTF-8 text file")
        text, source = f.read_text(encoding="utf-8", errors="replace"), f.name
    else:
        text, source = default_calibration_text()
    num_tokens = min(num_tokens, model.config.max_seq_len - 1)
    ids = calibration_ids(tokenizer, text, num_tokens)
    if len(ids) < 2:
        raise ValueError(f"calibration text '{source}' has {len(ids)} tokens; pass a longer text")
    print(f"note: computing InfiniGen skew matrices for this model once ({len(ids)} tokens of "
          f"{source}) -> {art}", file=sys.stderr)
    skew = calibrate(model, ids, progress=True, source=source)
    try:
        save(skew, art)
    except OSError as e:        # a read-only cache (or HOME): run with the matrices in memory
        print(f"note: could not cache the skew matrices at {art} ({e.strerror or e}); using them without "
              f"saving (set MINIGEN_CACHE to a writable directory to keep them)", file=sys.stderr)
    return skew


def load_skew_for(model, tokenizer, model_path, skew_path=None) -> Skew:
    """What the infinigen policy runs with (LLM(..., policy="infinigen", skew=...)): the artifact at
    skew_path (must exist), else the cached one for model_path (computed on first use); for OPT it
    is then folded into `model` (returned with folded=True, nothing to apply at run time)."""
    if skew_path is not None:
        skew = load(skew_path, model.config)
    else:
        skew = load_or_calibrate(model, tokenizer, model_path)
    if model.config.arch == "opt":
        fold_into_opt(model, skew)
    return skew
