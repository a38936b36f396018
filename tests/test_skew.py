"""Skewing (InfiniGen section 1): orthogonal, energy-ordered matrices per (layer, KV head) that
leave attention unchanged, folded into OPT's projections, stored as a reusable artifact."""
from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import minigen.kv.skew as artifact
from minigen import calibrate as S
from minigen.engine import Engine
from minigen.kv.dense import DenseKV
from tests.helpers import (IdTokenizer, assert_close, minigen_from_hf, random_prompts, tiny_hf_model,
                           tiny_llama_config, tiny_opt_config)

REPO = Path(__file__).resolve().parent.parent
MODELS = {
    "llama-mha": lambda: tiny_llama_config(num_key_value_heads=4),
    "llama-gqa": lambda: tiny_llama_config(),                         # 4 heads / 2 KV heads, D=16
    "opt": lambda: tiny_opt_config(),
    "opt-post-ln": lambda: tiny_opt_config(do_layer_norm_before=False, word_embed_proj_dim=32),
}
CALIB_IDS = random_prompts(320, [160], seed=1)[0]
PROMPT = random_prompts(320, [37], seed=2)[0]


def build(name):
    return minigen_from_hf(tiny_hf_model(MODELS[name]()))


class IdTokenizer320:
    """Text -> ids in [3, 320): enough for calibration plumbing."""

    def encode(self, text, add_special_tokens=True):
        return [3 + b % 317 for b in text.encode()]


# what a run-time policy does for Llama: the skew applied after RoPE
def skew_q(skew, layer: int, q: torch.Tensor) -> torch.Tensor:
    """Post-RoPE q (N, H, D) -> q A per head (N, H, D); query head h uses its KV head's A[h // G]."""
    if skew.folded:
        return q
    N, H, D = q.shape
    Hkv = skew.num_kv_heads
    A = skew.matrices[layer].to(device=q.device, dtype=q.dtype)       # (Hkv, D, D), no-op if there
    q4 = q.view(N, Hkv, H // Hkv, D)                                  # (N, Hkv, G, D)
    return torch.einsum("ngxd,gde->ngxe", q4, A).reshape(N, H, D)     # (N, H, D)


def skew_k(skew, layer: int, k: torch.Tensor) -> torch.Tensor:
    """Post-RoPE k (N, Hkv, D) -> k A per KV head (N, Hkv, D)."""
    if skew.folded:
        return k
    A = skew.matrices[layer].to(device=k.device, dtype=k.dtype)       # (Hkv, D, D)
    return torch.einsum("ngd,gde->nge", k, A)                         # (N, Hkv, D)


class Recorder(DenseKV):
    """Dense attention that keeps the q, k every layer hands to the policy; with a skew, applies
    skew_q/skew_k first (what a run-time policy does for Llama)."""

    def __init__(self, model, skew=None):
        cfg = model.config
        super().__init__(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, dtype=torch.float32,
                         device="cpu", ops=model.ops, sm_scale=model.sm_scale)
        self.skew, self.q, self.k = skew, {}, {}

    def attend(self, layer, q, k, v):
        if self.skew is not None:
            q, k = skew_q(self.skew, layer, q), skew_k(self.skew, layer, k)
        self.q.setdefault(layer, []).append(q.clone())
        self.k.setdefault(layer, []).append(k.clone())
        return super().attend(layer, q, k, v)


def run(model, ids, skew=None, chunk=16):
    """Chunked prefill of ids; returns (all logits (T, V), {layer: q (T, H, D)}, {layer: k})."""
    eng = Engine(model, IdTokenizer(), max_seq_len=len(ids) + 1, cuda_graph=False, max_prefill_tokens=chunk)
    eng.kv = rec = Recorder(model, skew)
    rec.allocate(1, eng.capacity)
    logits = eng.prefill([eng.new_sequence(ids)], all_logits=True)[0]
    cat = lambda d: {l: torch.cat(v) for l, v in d.items()}           # noqa: E731
    return logits, cat(rec.q), cat(rec.k)


# ---------------------------------------------------------------------------------------------
# 1. orthogonal, ordered, energy concentrated
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["llama-mha", "llama-gqa", "opt"])
def test_orthogonal_and_ordered(name):
    model = build(name)
    cfg = model.config
    sk = S.calibrate(model, CALIB_IDS, chunk=64, progress=False)
    L, Hkv, D, G = cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, cfg.num_heads // cfg.num_kv_heads
    assert sk.matrices.shape == (L, Hkv, D, D) and sk.matrices.dtype == torch.float32
    assert (sk.arch, sk.num_layers, sk.num_kv_heads, sk.head_dim, sk.calib_tokens, sk.folded) == \
        (cfg.arch, L, Hkv, D, len(CALIB_IDS), False)
    eye = torch.eye(D).expand(L, Hkv, D, D)
    A = sk.matrices
    assert_close(A.transpose(-1, -2) @ A, eye, atol=1e-5, rtol=0, what="A^T A")
    assert_close(A @ A.transpose(-1, -2), eye, atol=1e-5, rtol=0, what="A A^T")

    _, qs, _ = run(model, CALIB_IDS)                                  # the calibration queries
    R = int(0.2 * D)
    l1_before = l1_after = 0.0
    for l in range(L):
        q = qs[l].view(-1, Hkv, G, D).transpose(0, 1).reshape(Hkv, -1, D).double()   # (Hkv, G*T, D)
        qa = q @ A[l].double()                                        # (Hkv, G*T, D) skewed
        col = (qa ** 2).sum(1)                                        # (Hkv, D) column energy
        # columns come in decreasing singular value order: energy S_j^2, non-increasing
        assert_close(col.sqrt(), sk.singular_values[l].double(), atol=1e-3, rtol=1e-4, what="col norms = S")
        assert (col[:, 1:] <= col[:, :-1] * (1 + 1e-6) + 1e-9).all()
        # the first 20% of columns hold more energy than the first 20% of raw dims (Ky Fan)
        assert (col[:, :R].sum(-1) > (q ** 2).sum(1)[:, :R].sum(-1)).all()
        l1_before += q.abs()[..., :R].sum().item() / q.abs().sum().item()
        l1_after += qa.abs()[..., :R].sum().item() / qa.abs().sum().item()
    assert l1_after > l1_before, f"|q| mass in the first 20% columns: {l1_after / L:.3f} vs {l1_before / L:.3f}"
    assert sk.energy_share(0.2) > R / D


def test_fewer_calibration_rows_than_head_dim():
    """3 tokens x 1 head < D=16 rows: A must still be a full D x D orthogonal matrix."""
    model = build("llama-mha")
    sk = S.calibrate(model, CALIB_IDS[:3], progress=False)
    A = sk.matrices
    assert A.shape[-2:] == (16, 16)
    assert_close(A.transpose(-1, -2) @ A, torch.eye(16).expand_as(A), atol=1e-5, rtol=0, what="A^T A")
    assert (sk.singular_values[..., 3:] == 0).all()


def test_calibration_too_long_for_context():
    model = build("llama-gqa")                                        # context 256
    with pytest.raises(ValueError, match="do not fit the model's context of 256; use at most 255"):
        S.calibrate(model, [5] * 256, progress=False)


# ---------------------------------------------------------------------------------------------
# 2. attention logits unchanged
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["llama-mha", "llama-gqa"])
def test_llama_skew_preserves_qk(name):
    model = build(name)
    cfg = model.config
    H, Hkv, D, G = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.num_heads // cfg.num_kv_heads
    sk = S.calibrate(model, CALIB_IDS, progress=False)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(11, H, D, generator=g), torch.randn(13, Hkv, D, generator=g)
    for l in range(cfg.num_layers):
        qs, ks = skew_q(sk, l, q), skew_k(sk, l, k)
        assert qs.shape == q.shape and ks.shape == k.shape
        # one A per KV head serves its G query heads: head h uses A[h // G]
        for h in range(H):
            assert_close(qs[:, h], q[:, h] @ sk.matrices[l, h // G], atol=1e-5, rtol=0, what=f"q head {h}")
        logits = lambda q, k: torch.einsum("nhd,mhd->hnm", q, k.repeat_interleave(G, dim=1))  # noqa: E731
        assert_close(logits(qs, ks), logits(q, k), atol=1e-4, rtol=0, what=f"layer {l} q.k")


@pytest.mark.parametrize("name", ["llama-mha", "llama-gqa"])
def test_llama_skewed_attention_keeps_model_logits(name):
    """A policy that skews q and k after RoPE (what infinigen does) computes the same model."""
    model = build(name)
    sk = S.calibrate(model, CALIB_IDS, progress=False)
    want, _, _ = run(model, PROMPT)
    got, _, _ = run(model, PROMPT, skew=sk)
    assert_close(got, want, atol=1e-4, rtol=0, what="logits with skewed q/k")


@pytest.mark.parametrize("name", ["opt", "opt-post-ln"])
def test_opt_fold(name):
    hf = tiny_hf_model(MODELS[name]())
    # deepcopy: build_model keeps fp32 CPU tensors as they are, so two models built from one HF
    # model would share weights and folding one would fold both
    plain, folded = minigen_from_hf(hf), minigen_from_hf(copy.deepcopy(hf))
    sk = S.calibrate(folded, CALIB_IDS, progress=False)
    S.fold_into_opt(folded, sk)
    assert sk.folded and folded.skew_folded
    want, q0, k0 = run(plain, PROMPT)
    got, q1, k1 = run(folded, PROMPT)
    assert_close(got, want, atol=1e-4, rtol=0, what="OPT logits after folding")
    for l in range(plain.config.num_layers):
        A = sk.matrices[l]                                            # (H, D, D)
        # the model now hands q A, k A (column vectors: A^T q) to the policy, per head
        assert_close(q1[l], torch.einsum("nhd,hde->nhe", q0[l], A), atol=1e-4, rtol=0, what=f"q layer {l}")
        assert_close(k1[l], torch.einsum("nhd,hde->nhe", k0[l], A), atol=1e-4, rtol=0, what=f"k layer {l}")
        x = torch.randn(3, *q0[l].shape[1:])
        assert skew_q(sk, l, x) is x and skew_k(sk, l, x) is x    # folded: nothing at run time
    with pytest.raises(ValueError, match="already folded"):
        S.fold_into_opt(folded, sk)
    with pytest.raises(ValueError, match="already has a skew folded"):
        S.calibrate(folded, CALIB_IDS, progress=False)


def test_fold_refuses_llama():
    model = build("llama-gqa")
    sk = S.calibrate(model, CALIB_IDS[:20], progress=False)
    with pytest.raises(ValueError, match="OPT only"):
        S.fold_into_opt(model, sk)


# ---------------------------------------------------------------------------------------------
# 3. artifact
# ---------------------------------------------------------------------------------------------
def test_save_load_roundtrip(tmp_path):
    model = build("llama-gqa")
    sk = S.calibrate(model, CALIB_IDS[:40], progress=False, source="unit test ids")
    artifact.save(sk, tmp_path / "sub" / "a.pt")
    back = artifact.load(tmp_path / "sub" / "a.pt", model.config)
    assert torch.equal(back.matrices, sk.matrices) and torch.equal(back.singular_values, sk.singular_values)
    for f in ("folded", "arch", "num_layers", "num_kv_heads", "head_dim", "calib_tokens", "source"):
        assert getattr(back, f) == getattr(sk, f), f
    assert not list((tmp_path / "sub").glob("*.tmp*"))


def test_load_refuses_other_models(tmp_path):
    gqa = build("llama-gqa")
    artifact.save(S.calibrate(gqa, CALIB_IDS[:20], progress=False), tmp_path / "gqa.pt")
    with pytest.raises(ValueError, match=r"num_kv_heads=2, this model has num_kv_heads=4; recompute"):
        artifact.load(tmp_path / "gqa.pt", build("llama-mha").config)
    mha = build("llama-mha")
    artifact.save(S.calibrate(mha, CALIB_IDS[:20], progress=False), tmp_path / "mha.pt")
    with pytest.raises(ValueError, match=r"arch=llama, this model has arch=opt"):
        artifact.load(tmp_path / "mha.pt", build("opt").config)
    with pytest.raises(ValueError, match=r"num_layers=2, this model has num_layers=3"):
        artifact.load(tmp_path / "gqa.pt", minigen_from_hf(tiny_hf_model(tiny_llama_config(num_hidden_layers=3))).config)
    (tmp_path / "bad.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="is not a valid skew artifact") as e:
        artifact.load(tmp_path / "bad.pt", gqa.config)
    assert "\n" not in str(e.value)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        artifact.load(tmp_path / "none.pt", gqa.config)


def test_default_paths(tmp_path, monkeypatch):
    monkeypatch.setenv("MINIGEN_CACHE", str(tmp_path / "cache"))
    m = tmp_path / "model.gguf"
    m.write_bytes(b"x" * 10)
    p = S.default_skew_path(m)
    assert p.parent == tmp_path / "cache" / "skew" and p.name.startswith("model-") and p.suffix == ".pt"
    assert S.default_skew_path(m) == p
    m.write_bytes(b"y" * 11)                                          # re-saved model: new artifact
    assert S.default_skew_path(m) != p


def test_default_calibration_text(tmp_path, monkeypatch):
    monkeypatch.setattr(S, "REPO_DATA_DIR", tmp_path / "absent")
    text, desc = S.default_calibration_text()
    assert "pydoc" in desc and len(text) > 100_000
    (tmp_path / "data" / "essays").mkdir(parents=True)
    (tmp_path / "data" / "essays" / "a.txt").write_text("first essay")
    (tmp_path / "data" / "b.txt").write_text("second essay")
    monkeypatch.setattr(S, "REPO_DATA_DIR", tmp_path / "data")
    text, desc = S.default_calibration_text()
    assert "second essay" in text and "first essay" in text and desc.startswith("2 text files under")


# ---------------------------------------------------------------------------------------------
# 4. load_or_calibrate: once, then reuse; 5. CLI
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny Llama GQA saved with save_pretrained plus a byte-level BPE tokenizer."""
    from tests.helpers import llama_config, save_model
    transformers = pytest.importorskip("transformers")
    d = tmp_path_factory.mktemp("skew") / "tiny-llama"
    torch.manual_seed(0)
    save_model(transformers.LlamaForCausalLM(llama_config()), d)
    calib = d.parent / "calib.txt"
    calib.write_text("The quick brown fox jumps over the lazy dog. Hello world, hello tokenizer! " * 20)
    return d, calib


def test_load_or_calibrate_computes_once(hf_dir, tmp_path, monkeypatch, capsys):
    from minigen.load import load_model
    d, calib = hf_dir
    monkeypatch.setenv("MINIGEN_CACHE", str(tmp_path))
    model, tok = load_model(str(d), device=torch.device("cpu"), dtype=torch.float32)
    sk = S.load_or_calibrate(model, tok, d, calib_file=calib, num_tokens=100)
    art = S.default_skew_path(d)
    assert art.is_file() and art.parent == tmp_path / "skew"
    assert sk.calib_tokens == 100 and sk.source == "calib.txt"
    assert "computing InfiniGen skew" in capsys.readouterr().err

    def boom(*a, **kw):
        raise AssertionError("calibrate must not run when the artifact exists")
    monkeypatch.setattr(S, "calibrate", boom)
    again = S.load_or_calibrate(model, tok, d, calib_file=calib, num_tokens=100)
    assert torch.equal(again.matrices, sk.matrices)
    # a mismatched artifact: at an explicit path it raises, at the default path it is recomputed
    wrong = artifact.Skew(torch.eye(16).expand(2, 4, 16, 16).clone(), False, "llama", 2, 4, 16, 1, "x")
    artifact.save(wrong, tmp_path / "wrong.pt")
    with pytest.raises(ValueError, match="num_kv_heads=4, this model has num_kv_heads=2"):
        S.load_or_calibrate(model, tok, d, path=tmp_path / "wrong.pt")
    artifact.save(wrong, art)
    with pytest.raises(AssertionError, match="must not run"):
        S.load_or_calibrate(model, tok, d, calib_file=calib)
    assert "recomputing" in capsys.readouterr().err

def cli(*args, env_cache):
    import os
    env = dict(os.environ, MINIGEN_CACHE=str(env_cache))
    return subprocess.run([sys.executable, "-m", "minigen.skew", *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def test_cli(hf_dir, tmp_path):
    from minigen.load import load_model
    d, calib = hf_dir
    out = tmp_path / "tiny.pt"
    r = cli("--model", d, "--calib", calib, "--out", out, "--tokens", 120, "--device", "cpu", env_cache=tmp_path)
    assert r.returncode == 0, r.stderr
    assert f"wrote {out}" in r.stdout and "of the query energy" in r.stdout
    model, _ = load_model(str(d), device=torch.device("cpu"), dtype=torch.float32)
    sk = artifact.load(out, model.config)
    assert sk.calib_tokens == 120 and sk.source == "calib.txt"

    r = cli("--model", d, "--calib", tmp_path / "missing.txt", env_cache=tmp_path)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --calib ") and "no such file" in lines[0], r.stderr


def test_load_skew_for(tmp_path, monkeypatch):
    """The entry the infinigen policy uses: Llama's skew stays for run time, OPT's is folded."""
    monkeypatch.setattr(S, "REPO_DATA_DIR", tmp_path / "absent")     # pydoc text, no data/ needed
    monkeypatch.setenv("MINIGEN_CACHE", str(tmp_path))
    hf = tiny_hf_model(tiny_opt_config())
    plain, opt = minigen_from_hf(hf), minigen_from_hf(copy.deepcopy(hf))
    calls, real = [], S.calibrate
    monkeypatch.setattr(S, "calibrate", lambda m, ids, **kw: calls.append(len(ids)) or real(m, ids, **kw))
    sk = S.load_skew_for(opt, IdTokenizer320(), tmp_path / "opt-model.gguf")
    assert calls == [255] and sk.folded and opt.skew_folded           # context 256 -> 255 tokens
    assert_close(run(opt, PROMPT)[0], run(plain, PROMPT)[0], atol=1e-4, rtol=0, what="folded OPT logits")
    llama = build("llama-gqa")
    artifact.save(S.calibrate(build("llama-gqa"), CALIB_IDS[:20]), tmp_path / "l.pt")
    sk = S.load_skew_for(llama, None, None, tmp_path / "l.pt")
    assert not sk.folded and not getattr(llama, "skew_folded", False)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        S.load_skew_for(llama, None, None, tmp_path / "missing.pt")



def test_unwritable_cache_warns_and_runs_in_memory(hf_dir, tmp_path, monkeypatch, capsys):
    from minigen.load import load_model
    d, calib = hf_dir
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("MINIGEN_CACHE", str(blocker / "cache"))       # cannot be created
    model, tok = load_model(str(d), device=torch.device("cpu"), dtype=torch.float32)
    sk = S.load_or_calibrate(model, tok, d, calib_file=calib, num_tokens=60)
    assert sk.calib_tokens == 60
    err = capsys.readouterr().err
    assert err.count("could not cache the skew matrices") == 1 and "MINIGEN_CACHE" in err


def test_cli_out_directory_is_one_line_and_leaves_nothing(hf_dir, tmp_path):
    d, calib = hf_dir
    out = tmp_path / "outdir"
    out.mkdir()
    r = cli("--model", d, "--calib", calib, "--out", out, "--tokens", 50, "--device", "cpu", env_cache=tmp_path)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "is a directory" in lines[0], r.stderr
    assert list(out.iterdir()) == [] and not list(tmp_path.glob("*.tmp*"))


def test_save_failure_leaves_no_temporary_file(tmp_path, monkeypatch):
    sk = artifact.Skew(torch.eye(16).expand(2, 4, 16, 16).clone(), False, "llama", 2, 4, 16, 1, "x")

    def full_disk(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(artifact.os, "replace", full_disk)
    with pytest.raises(OSError, match="No space"):
        artifact.save(sk, tmp_path / "s.pt")
    assert list(tmp_path.iterdir()) == []
