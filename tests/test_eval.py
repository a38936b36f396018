"""minigen.eval ppl: chunked teacher-forced NLL equals one full pass; the CLI's last line is JSON."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minigen.eval import perplexity

ROOT = Path(__file__).resolve().parents[1]
TEXT = ("The history of the printing press begins in the fifteenth century, when Johannes "
        "Gutenberg combined movable metal type, oil-based ink and a wooden press. Within decades "
        "printing spread across Europe, books became cheaper, and literacy rose. ") * 3


@pytest.fixture
def llm(default_llm):
    return default_llm


def test_chunked_ppl_equals_single_pass(llm):
    ids = llm.tokenizer.encode(TEXT)[:100]
    res = perplexity(llm, ids, chunk=17)
    # one pass over all tokens, log-softmax by hand
    eng = llm.get_engine(1)
    eng.max_prefill_tokens = 4096
    seq = eng.new_sequence(ids)
    logits = eng.prefill([seq], all_logits=True)[0]
    eng.release(seq)
    lp = torch.log_softmax(logits[:-1], -1).gather(1, torch.tensor(ids[1:])[:, None])
    want = math.exp(-lp.mean().item())
    assert res["tokens"] == 100 and res["scored"] == 99
    assert abs(res["ppl"] - want) / want < 1e-4
    assert 1.0 < res["ppl"] < 50.0     # coherent English under a real model


def test_cli_json_last_line(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text(TEXT)
    r = subprocess.run([sys.executable, "-m", "minigen.eval", "ppl", "--text", str(f), "--context", "64",
                        "--json"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["tokens"] == 64 and out["ppl"] > 1.0 and out["policy"] == "dense"


def test_cli_errors(tmp_path):
    r = subprocess.run([sys.executable, "-m", "minigen.eval", "ppl", "--text", str(tmp_path / "missing.txt")],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "error: --text" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "minigen.eval", "choice"], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and "not implemented" in r.stderr
