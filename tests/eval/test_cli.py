"""`python -m minigen.eval`: the JSON last line and one-line errors (each call loads the model in a
subprocess)."""
import json
import subprocess
import sys
from pathlib import Path

from tests.helpers import COPY_TASK, EVAL_TEXT, FILLER

ROOT = Path(__file__).resolve().parents[2]


def run(args, timeout=300):
    return subprocess.run([sys.executable, "-m", "minigen.eval", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def test_cli_ppl_decode_json_last_line(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text(EVAL_TEXT)
    b.write_text("Once upon a time, " + EVAL_TEXT)
    r = run(["ppl", "--text", str(a), "--text", str(tmp_path / "*.txt"), "--context", "40", "--mode", "decode",
             "--chunk-report", "8", "--json"])
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["texts"] == 2 and out["prefix"] == 20 and out["scored"] == 40 and out["policy"] == "dense"
    assert [c["start"] for c in out["chunks"]] == [20, 24, 32] and out["chunks"][-1]["end"] == 40
    assert [t["file"] for t in out["per_text"]] == [str(a), str(b)] and out["ppl"] > 1.0


def test_cli_choice_and_needle_json_last_line(tmp_path):
    f = tmp_path / "t.jsonl"
    f.write_text(json.dumps(COPY_TASK) + "\n" + json.dumps(dict(COPY_TASK, label=0)) + "\n")
    r = run(["choice", "--tasks", str(f), "--policy", "offload", "--json", "--quiet"])
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["n"] == 2 and out["accuracy"] == 0.5 and out["fetched_fraction"] == 1.0 and out["policy"] == "offload"
    (tmp_path / "hay.txt").write_text(FILLER * 40)
    r = run(["needle", "--haystack", str(tmp_path / "hay.txt"), "--lengths", "150,100000", "--depths", "0.5",
             "--max-seq-len", "200", "--max-new-tokens", "10", "--json"])
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["lengths"] == [150, 189] and len(out["grid"]) == 2 and "lowered to 189" in r.stderr


def test_cli_errors(tmp_path):
    r = run(["ppl", "--text", str(tmp_path / "missing.txt")], timeout=120)
    assert r.returncode == 2 and "error: --text" in r.stderr and "Traceback" not in r.stderr
    r = run(["choice", "--tasks", str(tmp_path / "missing.jsonl")], timeout=120)
    assert r.returncode == 2 and "error: --tasks" in r.stderr and "Traceback" not in r.stderr
    (tmp_path / "bad.jsonl").write_text('{"context": "x", "choices": ["a", "b"], "label": 5}\n')
    r = run(["choice", "--tasks", str(tmp_path / "bad.jsonl")], timeout=120)
    assert r.returncode == 2 and "bad.jsonl:1:" in r.stderr and "Traceback" not in r.stderr
    r = run(["needle", "--depths", "0,2"], timeout=120)
    assert r.returncode == 2 and "error: --depths" in r.stderr
