"""bench/peers/infinigen_artifact.py: the harness around the InfiniGen artifact, run against a fake
artifact tree (same layout, modules that print the artifact's summary): scheme selection by
symlink as run.sh does, run.sh's arguments, the tokenizer stand-in (no hub access), parsing; and
bench/fig14.py's side-by-side table. No artifact code is involved."""
import importlib.util
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"

FAKE_FLEX_OPT = '''
import argparse, sys
from transformers import AutoTokenizer
from flexgen.pytorch_backend import NAME
p = argparse.ArgumentParser()
p.add_argument("--gpu-batch-size", type=int); p.add_argument("--prompt-len", type=int); p.add_argument("--gen-len", type=int)
p.add_argument("--path"); p.add_argument("--compress-cache", action="store_true"); p.add_argument("--test-input-path")
a, _ = p.parse_known_args()
tok = AutoTokenizer.from_pretrained("facebook/opt-30b", padding_side="left")
ids = tok([open(a.test_input_path).read()], padding="max_length", max_length=a.prompt_len).input_ids[0][:a.prompt_len]
assert len(ids) == a.prompt_len and a.path == "_DUMMY_", (len(ids), a.path)
print("+" * 49)
print(NAME + (" + INT4" if a.compress_cache else ""))
print(f"input: {a.prompt_len} output: {a.gen_len} bsz: {a.gpu_batch_size}")
print("+" * 49)
print("Total: 12.5 Prefill: 2.5 Decode: 10.0")
'''


def load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def fake_artifact(tmp_path):
    root = tmp_path / "artifact"
    fg = root / "speedup" / "flexgen"
    (fg / "flexgen").mkdir(parents=True)
    (fg / "flexgen" / "__init__.py").write_text("")
    for folder, name in (("original", "FlexGen"), ("h2o", "FlexGen + H2O"), ("infinigen", "InfiniGen (Ours)")):
        (fg / folder).mkdir()
        (fg / folder / "flex_opt.py").write_text(FAKE_FLEX_OPT)
        (fg / folder / "pytorch_backend.py").write_text(f"NAME = {name!r}\n")
    (fg / "flexgen" / "flex_opt.py").symlink_to("../infinigen/flex_opt.py")   # as the checkout has it
    (root / "speedup" / "infinigen" / "infinigen").mkdir(parents=True)
    (root / "speedup" / "scripts" / "figure14").mkdir(parents=True)
    (root / "speedup" / "scripts" / "figure14" / "pg19_firstbook.txt").write_text("It was a dark night. " * 40)
    return root


def test_harness_runs_each_scheme(fake_artifact, tmp_path, capsys):
    pytest.importorskip("transformers")
    art = load("infinigen_artifact", BENCH / "peers" / "infinigen_artifact.py")
    out = tmp_path / "artifact.jsonl"
    art.main(["--artifact", str(fake_artifact), "--bsz", "3", "--prompt-len", "100", "--gen-len", "8",
              "--out", str(out), "--timeout", "120"])
    rows = {r["scheme"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert set(rows) == {"original", "int4", "h2o", "infinigen"}
    assert all(r["status"] == "ok" for r in rows.values()), rows
    assert {s: r["printed_name"] for s, r in rows.items()} == {
        "original": "FlexGen", "int4": "FlexGen + INT4", "h2o": "FlexGen + H2O", "infinigen": "InfiniGen (Ours)"}
    r = rows["infinigen"]
    assert (r["total_s"], r["prefill_s"], r["decode_s"], r["bsz"], r["prompt_len"]) == (12.5, 2.5, 10.0, 3, 100)
    assert r["tok_s"] == round(3 * 8 / 12.5, 2) and r["decode_tok_s"] == round(3 * 7 / 10.0, 2)
    # the fetched checkout is left as it was (schemes are selected in a scratch copy)
    assert (fake_artifact / "speedup" / "flexgen" / "flexgen" / "flex_opt.py").readlink() == Path("../infinigen/flex_opt.py")
    assert not (fake_artifact / "speedup" / "flexgen" / "flexgen" / "pytorch_backend.py").exists()


def test_harness_reports_a_failure(fake_artifact, tmp_path):
    art = load("infinigen_artifact", BENCH / "peers" / "infinigen_artifact.py")
    (fake_artifact / "speedup" / "flexgen" / "h2o" / "flex_opt.py").write_text("raise SystemExit('no GPU here')\n")
    out = tmp_path / "a.jsonl"
    art.main(["--artifact", str(fake_artifact), "--schemes", "h2o", "--out", str(out)])
    row = json.loads(out.read_text())
    assert row["status"] == "failed" and "no GPU here" in row["tail"][-1]
    with pytest.raises(SystemExit, match="not a checkout"):
        art.main(["--artifact", str(tmp_path), "--schemes", "h2o"])


def test_fig14_table(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    fig = load("fig14", BENCH / "fig14.py")
    a = tmp_path / "a.jsonl"
    m = tmp_path / "m.jsonl"
    a.write_text("\n".join(json.dumps(r) for r in [
        dict(system="artifact", scheme="infinigen", status="ok", tok_s=40.0, prefill_s=5.0, decode_s=59.0),
        dict(system="artifact", scheme="original", status="failed", reason="no summary")]) + "\n")
    m.write_text("\n".join(json.dumps(r) for r in [
        dict(header=dict(gpu="NVIDIA H200", torch="2.11", pinned_h2d_gbps=55.0, hbm_copy_gbps=4200.0)),
        dict(system="minigen", config="infinigen artifact", against="infinigen", tok_s=100.0, prefill_s=1.0, decode_s=24.6),
        dict(system="minigen", config="offload", against="original", tok_s=10.0, prefill_s=1.0, decode_s=255.0)]) + "\n")
    md = fig.render(a, m)
    assert "| infinigen | 40.0 | 5.00 / 59.00 | infinigen artifact | 100.0 | 1.00 / 24.60 | 2.50x |" in md
    assert "| original | failed | no summary | offload | 10.0 |" in md and "NVIDIA H200" in md
