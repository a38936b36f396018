"""The maintained benchmark scripts' own logic (bench/): task building and the fidelity report's
labels. They run on the GPU machine; what is checked here needs no GPU."""
import importlib.util
import random
import sys
from pathlib import Path

import pytest

from minigen.eval.choice import load_tasks

BENCH = Path(__file__).resolve().parents[1] / "bench"
IMPORTS = {"fidelity": ("decode",), "report": ("decode",), "throughput": ("decode",), "capacity": ("decode",),
           "ruler_grid": ("decode",)}   # the bench modules a script imports by name


@pytest.fixture
def bench_module(monkeypatch):
    """bench/<name>.py imported from its file (bench/ is scripts, not a package), after the bench
    modules it imports by plain name; each goes into sys.modules for this test only."""
    def load(name: str):
        for dep in IMPORTS.get(name, ()):
            load(dep)
        spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        monkeypatch.setitem(sys.modules, name, module)
        spec.loader.exec_module(module)
        return module
    return load


def synthetic_essays(d: Path, n_essays=6, n_sents=80):
    rng = random.Random(0)
    words = "apple river stone cloud market engine garden letter window silver painter doctor".split()
    for e in range(n_essays):
        sents = [f"Essay {e} line {i} says the {' '.join(rng.choices(words, k=rng.randint(6, 14)))}."
                 for i in range(n_sents)]
        (d / f"e{e}.txt").write_text(" ".join(sents))


def test_make_tasks_schema(tmp_path, bench_module):
    make_tasks = bench_module("make_tasks")
    synthetic_essays(tmp_path)
    out1, out2 = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    for out in (out1, out2):
        assert make_tasks.main(["--essays", str(tmp_path), "--lengths", "600,1024", "--per-length", "3",
                                "--out", str(out), "--seed", "3"]) == 0
    assert out1.read_text() == out2.read_text()                        # deterministic
    tasks = load_tasks(str(out1))
    assert [t["length"] for t in tasks] == [600] * 3 + [1024] * 3
    for t in tasks:
        assert len(t["choices"]) == 4 and len(set(t["choices"])) == 4 and t["tokens"] <= t["length"]
        quote = t["context"].rsplit('Quote: "', 1)[1].split('"')[0]
        answer = t["choices"][t["label"]]
        assert t["context"].endswith("Next sentence:") and answer.startswith(" ")
        assert quote + answer in t["context"]                           # the answer follows the quote
        # distractors never appear in the context: taken out of the passage, or from other essays
        assert all(c.strip() not in t["context"] for i, c in enumerate(t["choices"]) if i != t["label"])
        assert 0.15 <= t["depth"] <= 0.85 and t["removed"] == 3


def test_fidelity_labels_parse_back(monkeypatch, bench_module):
    fidelity = bench_module("fidelity")
    for policy, opts in fidelity.CONFIGS + fidelity.TASK_CONFIGS:     # every label the report writes
        text = fidelity.label(policy, opts)
        assert fidelity.parse_label(text) == (policy, opts) and fidelity.label(*fidelity.parse_label(text)) == text
    assert fidelity.parse_label("infinigen a=5 b=0.1 r=0.5 recent=64") == (
        "infinigen", dict(alpha=5, budget=0.1, partial_ratio=0.5, recent=64))
    assert fidelity.parse_label("  window b=1  sinks=0 ") == ("window", dict(budget=1, sinks=0))
    text = "infinigen recent=0 cpu_kv_limit=0.8 evict=fifo"
    assert fidelity.parse_label(text) == ("infinigen", dict(recent=0, cpu_kv_limit=0.8, evict="fifo"))
    assert fidelity.label(*fidelity.parse_label(text)) == text
    for bad in ("infinigen a=5 recnt=64", "h2o a=5", "dense b=0.1", "infini b=0.1", "infinigen b=x",
                "infinigen b=0.1 b=0.2", "window budget", "infinigen a=nan", "infinigen a=-inf", "infinigen b=0",
                "infinigen b=1.5", "infinigen b=-0.1", "infinigen recent=64.0", "infinigen recent=1e2",
                "window sinks=4.5", "infinigen b=1_0", "infinigen a=+5", "infinigen r=inf", "infinigen evict=lru",
                "infinigen evict=1", "h2o evict=fifo", "infinigen cpu_kv_limit=fifo", "infinigen evict=fifo"):
        with pytest.raises(ValueError):
            fidelity.parse_label(bad)
    # --labels: distinct configurations in order; none, or one --policies leaves out, is an error
    assert fidelity.parse_labels("dense, dense,infinigen a=5 b=0.1,infinigen b=0.1 a=5.0", None) == [
        ("dense", {}), ("infinigen", dict(alpha=5, budget=0.1))]
    for labels, policies in ((",", None), ("", None), ("h2o b=0.1", "infinigen")):
        with pytest.raises(ValueError):
            fidelity.parse_labels(labels, policies)

    def no_model(*a, **k):
        raise AssertionError("the model was loaded before --labels was checked")
    import minigen.llm
    monkeypatch.setattr(minigen.llm, "LLM", no_model)
    for labels in ("dense,infinigen a=5 recnt=64", ",", "dense"):
        policies = ["--policies", "infinigen"] if labels == "dense" else []
        with pytest.raises(SystemExit, match="--labels"):
            fidelity.main(["--labels", labels, "--parts", "ppl"] + policies)


def test_throughput_render(tmp_path, bench_module):
    """throughput.md from results.jsonl: one table per run, refusals with their reason, and each
    policy's best batch against the best dense batch."""
    import json
    tp = bench_module("throughput")
    header = dict(model="llama3-8b", context=32768, budget_gib=24.0, steps=32, dtype="float16", gpu="G",
                  torch="t", hbm_copy_gbps=1.0, pinned_h2d_gbps=2.0, weights_gib=15.0, command="python x")
    ok = dict(status="ok", opts={}, step_ms=10.0, pcie_mb_per_step=0.0, pcie_floor_ms=0.0, peak_gpu_gib=20.0)
    rows = [dict(ok, config="dense", batch=1, tok_s=100.0),
            dict(config="dense", batch=2, status="refused", reason="dense needs 25.0 GiB"),
            dict(ok, config="infinigen+reuse", opts={"reuse": 2.0}, batch=1, tok_s=90.0, hit_rate=0.5,
                 fetched_fraction=0.05),
            dict(ok, config="infinigen+reuse", opts={"reuse": 2.0}, batch=4, tok_s=330.0, hit_rate=0.6,
                 fetched_fraction=0.05, compute_ms=9.0)]
    (tmp_path / "results.jsonl").write_text(json.dumps(dict(header=header, rows=rows)) + "\n")
    tp.render(tmp_path)
    md = (tmp_path / "throughput.md").read_text()
    assert "| dense | 2 | refused: dense needs 25.0 GiB |" in md
    assert "| infinigen+reuse | 4 | 330.0 | 10.0 | 5.0% | 60.0% |" in md
    assert "infinigen+reuse 330.0 tok/s at batch 4 (3.30x)" in md


def test_capacity_arithmetic(bench_module):
    """capacity.py: the batch is the smaller of the GPU cap (the memory plan) and the host cap (RAM
    over the pool per sequence), and says which binds; infinigen moves its selection cap per step."""
    import torch
    from minigen.memory import most_slots
    cap = bench_module("capacity")
    cfg = bench_module("decode").shape_config("llama3-8b", 32768)[0]
    rows = {r["config"]: r for r in cap.capacity(cfg, torch.float16, 32768, 24 * 2**30, 40 * 2**30,
                                                 ["dense", "offload", "infinigen"])}
    assert rows["dense"]["batch"] == most_slots(cfg, torch.float16, "dense", 24 * 2**30, 32768) >= 1
    assert rows["dense"]["host_cap"] is None and rows["dense"]["binds"] == "GPU"
    assert rows["offload"]["host_cap"] == 10 and rows["offload"]["binds"] == "host RAM"   # 4 GiB per sequence
    inf = rows["infinigen"]
    assert inf["batch"] == min(inf["gpu_cap"], inf["host_cap"]) and inf["batch"] > rows["dense"]["batch"]
    # 30 pooled layers x 8 KV heads x ceil(0.049 x 32768) = 1606 rows x (K and V of 128 fp16)
    assert inf["pcie_mb_per_seq_step"] == round(30 * 8 * 1606 * 512 / 1e6, 1)


def test_ruler_grid_render(tmp_path, bench_module):
    """ruler_grid.py: the table from per-run files, mean +- the standard error from per-sample scores."""
    import json
    import math
    rg = bench_module("ruler_grid")

    def run(config, length, scores, read=None):
        tasks = {f"t{i}": {str(length): {"score": sum(s) / len(s), "samples": [{"score": x} for x in s]}}
                 for i, s in enumerate(scores)}
        mean = sum(sum(s) / len(s) for s in scores) / len(scores)
        r = dict(tasks=tasks, lengths=[length], mean={str(length): mean}, samples=len(scores[0]), config=config,
                 model="m", dtype="bfloat16", device="cuda", gpu="NVIDIA H200")
        if read is not None:
            r["fetched_fraction"] = read
        (tmp_path / f"ruler_{length}_{rg.slug(config)}.json").write_text(json.dumps(r))
        return r
    d = run("dense", 8192, [[100, 100], [0, 100]])
    run("quest 5%", 8192, [[100, 0], [0, 0]], read=0.0483)
    run("dense", 16384, [[100, 100], [100, 100]])
    # task variances 0 and 5000 (n = 2 each): SE = sqrt(0 / 2 + 5000 / 2) / 2
    assert rg.standard_error(d, "8192") == pytest.approx(math.sqrt(2500) / 2)
    rg.render(tmp_path)
    md = (tmp_path / "ruler.md").read_text()
    assert "| dense | 75.00 +- 25.00 | 1.0000 | 2 | 100.00 +- 0.00 | 1.0000 | 2 |" in md
    assert "| quest 5% | 25.00 +- 25.00 | 0.0483 | 2 |  |  |  |" in md
