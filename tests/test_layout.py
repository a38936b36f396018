"""The package's shape: one top-level import name that leaves Hugging Face's `kernels` alone, no
import cycles between minigen's modules, and runtime files short enough to read."""
from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "minigen"
MAX_LINES = 350


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def imports_of(path: Path, known: set[str]) -> set[str]:
    """The minigen modules `path` imports, at module level or inside functions (a lazy import is
    still a dependency). `from minigen.x import y` counts as minigen.x.y when that is a module."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module
                     for a in node.names]
        else:
            continue
        out |= {n for n in names if n in known}
    return out


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the directed graph as a list of nodes (first == last), or None."""
    state: dict[str, int] = {}          # 1 on the current path, 2 done
    path: list[str] = []

    def visit(n):
        state[n] = 1
        path.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                return path[path.index(m):] + [m]
            if m not in state and (c := visit(m)):
                return c
        path.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (c := visit(n)):
            return c
    return None


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles():
    mods = modules()
    graph = {m: imports_of(p, set(mods)) - {m} for m, p in mods.items()}
    assert "minigen.kv.infinigen" in graph["minigen.kv"]          # the walk sees real edges
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


def test_runtime_files_are_short():
    long = {str(p.relative_to(ROOT)): n for p in PKG.rglob("*.py")
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not long, f"runtime files over {MAX_LINES} lines: {long}"


def test_one_top_level_name():
    """The package ships only `minigen` (pyproject's find rule, and the installed metadata)."""
    setuptools = pytest.importorskip("setuptools")
    found = setuptools.find_packages(str(ROOT), include=["minigen", "minigen.*"])
    assert found and {p.split(".")[0] for p in found} == {"minigen"}
    assert not (ROOT / "kernels").exists() and not (ROOT / "models").exists()
    dist = importlib.metadata.distribution("minigen")
    top = dist.read_text("top_level.txt")
    if top is not None:
        assert top.split() == ["minigen"]


CLASH = r"""
import torch
from minigen.config import ModelConfig
from minigen.engine import Engine
from minigen.models import build_model, model_class
from minigen.sampler import SamplingParams

cfg = ModelConfig(arch="llama", vocab_size=64, dim=32, num_layers=2, num_heads=4, num_kv_heads=2,
                  hidden_dim=48, max_seq_len=64)
with torch.device("meta"):
    names = {n: p.shape for n, p in model_class(cfg)(cfg).named_parameters()}
g = torch.Generator().manual_seed(0)
model = build_model(cfg, ((n, torch.randn(s, generator=g) * 0.1) for n, s in names.items()),
                    device="cpu", dtype=torch.float32)

class Tok:
    eos_ids, bos_id = [], None
    def stream_decoder(self):
        class D:
            push = staticmethod(lambda t: "")
            flush = staticmethod(lambda: "")
        return D()

eng = Engine(model, Tok(), max_batch=1, max_seq_len=32)
seq = eng.new_sequence([1, 2, 3])
for _ in eng.generate([seq], SamplingParams(max_new_tokens=4, temperature=0, ignore_eos=True)):
    pass
assert len(seq.output_ids) == 4

import kernels
from kernels import get_kernel
import transformers.integrations.hub_kernels
print(kernels.__file__)
"""


def test_hf_kernels_is_not_shadowed():
    """From the repo root, after building and running a model, `kernels` is Hugging Face's package
    (transformers >= 5.25 depends on it) and transformers' hub-kernels integration imports."""
    try:
        importlib.metadata.version("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("Hugging Face's `kernels` is not installed here (transformers < 5.25 does not need it)")
    r = subprocess.run([sys.executable, "-c", CLASH], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    origin = Path(r.stdout.strip().splitlines()[-1]).resolve()
    assert "site-packages" in origin.parts and origin.parent.name == "kernels", f"`kernels` is {origin}"
    spec = importlib.util.find_spec("minigen")
    assert Path(spec.origin).resolve().parent == PKG
