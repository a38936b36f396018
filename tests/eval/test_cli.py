"""`python -m minigen.eval`: the JSON last line and one-line errors (each call loads the model in a
subprocess)."""
import json
import os
import subprocess
import sys
from pathlib import Path

from tests.helpers import COPY_TASK, EVAL_TEXT, FILLER

ROOT = Path(__file__).resolve().parents[2]


def run(args, timeout=300, env=None):
    return subprocess.run([sys.executable, "-m", "minigen.eval", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


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
    r = run(["ruler", "--lengths", "200000", "--tasks", "niah_single_1"], timeout=120)
    assert r.returncode == 2 and "error: --lengths 200000 needs 200000 tokens, which exceeds the model's context" \
        in r.stderr and "--max-seq-len" not in r.stderr


def test_ppl_scores_a_policy_through_decode_by_default(tiny_dir, tmp_path):
    """--policy infinigen without --mode: every scored token goes through the policy's decode path
    (the JSON says so and counts what was fetched); prefill mode is for dense only."""
    text = tmp_path / "t.txt"
    text.write_text(EVAL_TEXT)
    r = run(["ppl", "--model", str(tiny_dir), "--device", "cpu", "--text", str(text), "--context", "48",
             "--policy", "infinigen", "--dense-layers", "1", "--budget", "0.3", "--json"],
            env={"MINIGEN_CACHE": str(tmp_path)})
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["policy"] == "infinigen" and out["mode"] == "decode" and 0 < out["fetched_fraction"] < 1


def test_ppl_flags_of_the_other_mode_and_bad_text_refused(tiny_dir, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text(EVAL_TEXT)
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\u00e9 au lait ".encode("latin-1") * 20)
    base = ["ppl", "--model", str(tiny_dir), "--device", "cpu", "--context", "48"]
    for args, msg in ((["--text", str(text), "--policy", "h2o", "--mode", "prefill"], "--mode prefill scores"),
                      (["--text", str(text), "--mode", "prefill", "--prefix", "8"], "--prefix does not apply to --mode prefill"),
                      (["--text", str(text), "--mode", "prefill", "--batch", "2"], "--batch does not apply"),
                      (["--text", str(text), "--mode", "decode", "--chunk", "8"], "--chunk does not apply to --mode decode"),
                      (["--text", str(text), "--skew", "x.pt"], "--skew does not apply to --policy dense"),
                      (["--text", str(latin1)], "is not UTF-8 text (byte 0xe9 at offset 3)")):
        r = run(base + args, timeout=120)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and msg in lines[0], r.stderr
