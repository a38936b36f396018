"""RULER (minigen/eval/ruler.py): every task is generated within its length with its answers in the
prompt, deterministically per seed; RULER's metrics score it; and the whole run goes through the
policy and reports per task and length."""
import json

import pytest

from minigen.eval.ruler import fit, ruler, run_ruler, score, split_sentences

TASKS = ["niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multikey_2", "niah_multikey_3",
         "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe", "qa_1", "qa_2"]


def test_the_thirteen_tasks():
    assert list(ruler()) == TASKS
    assert ruler()["niah_single_1"]["tokens_to_generate"] == 128 and ruler()["qa_1"]["args"]["dataset"] == "squad"


@pytest.mark.parametrize("length", [2048, 4096])
def test_every_task_fits_and_holds_its_answers(default_llm, length):
    tok = default_llm.tokenizer
    for task in TASKS:
        ids, answers = fit(default_llm, task, length, seed=3)
        room = length - ruler()[task]["tokens_to_generate"]
        assert room * 0.8 < len(ids) <= room, (task, len(ids))      # filled, and not past the room
        text = tok.decode(ids)
        head = ruler()[task]["answer_prefix"].strip().split("{")[0].strip()        # the assistant's start
        assert answers and text.rsplit("assistant\n", 1)[-1].startswith(head), (task, text[-200:])
        if task != "qa_2":                                          # HotpotQA has yes/no answers
            assert all(a.lower() in text.lower() for a in answers), (task, answers)
        assert fit(default_llm, task, length, seed=3) == (ids, answers)                 # deterministic
        assert fit(default_llm, task, length, seed=4)[0] != ids


def test_niah_singular_phrasing(default_llm):
    text = default_llm.tokenizer.decode(fit(default_llm, "niah_single_2", 1024, seed=0)[0])
    assert "A special magic number is hidden" in text and "The special magic number for" in text
    text = default_llm.tokenizer.decode(fit(default_llm, "niah_multivalue", 1024, seed=0)[0])
    assert "Some special magic numbers are hidden" in text


def test_scores_are_rulers():
    assert score("niah_multivalue", ["1, 2, 3 and 4", "1 and 3", ""], [["1", "2", "3", "4"]] * 3) == [100.0, 50.0, 0.0]
    assert score("qa_1", ["It is France.", "Spain"], [["france", "French"], ["France"]]) == [100.0, 0.0]
    assert score("vt", ["\x07 A B\n"], [["A", "B"]]) == [100.0]


def test_split_sentences():
    assert split_sentences('One. "Two!" Three (four?) 5.5 is five. Six') == \
        ["One.", '"Two!"', "Three (four?)", "5.5 is five.", "Six"]


@pytest.fixture(scope="module")
def long_tiny(tmp_path_factory):
    """The tiny test model with a 2048-token context (its byte-level vocabulary spends a token a
    character: RULER's templates alone take a few hundred)."""
    from transformers import LlamaForCausalLM

    from tests.helpers import llama_config, save_model
    d = tmp_path_factory.mktemp("tiny-llama-2k")
    save_model(LlamaForCausalLM(llama_config(max_position_embeddings=2048, num_hidden_layers=4)), d)
    return d


def test_run_through_the_policy(long_tiny, tmp_path, monkeypatch):
    from minigen import LLM
    monkeypatch.setenv("MINIGEN_CACHE", str(tmp_path))
    llm = LLM(str(long_tiny), policy="infinigen", device="cpu", max_seq_len=1500,
              policy_opts=dict(dense_layers=1, budget=0.3))
    res = run_ruler(llm, ["niah_single_1", "vt"], [1500], samples=3, batch=2)
    for task in ("niah_single_1", "vt"):
        cell = res["tasks"][task]["1500"]
        assert cell["n"] == 3 and len(cell["samples"]) == 3 and 0 <= cell["score"] <= 100
        assert cell["score"] == sum(s["score"] for s in cell["samples"]) / 3
    assert res["mean"]["1500"] == (res["tasks"]["niah_single_1"]["1500"]["score"] + res["tasks"]["vt"]["1500"]["score"]) / 2
    assert 0 < res["fetched_fraction"] < 1
    with pytest.raises(ValueError, match="unknown RULER task"):
        run_ruler(llm, ["niah"], [1500], samples=1)
    llm.close()


def test_cli_json_last_line(long_tiny, tmp_path):
    import os
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-m", "minigen.eval", "ruler", "--model", str(long_tiny), "--device", "cpu",
                        "--tasks", "niah_multikey_2,vt", "--lengths", "1200,1600", "--samples", "2", "--json"],
                       capture_output=True, text=True, timeout=300, env={**os.environ, "MINIGEN_CACHE": str(tmp_path)})
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert set(out["tasks"]) == {"niah_multikey_2", "vt"} and set(out["mean"]) == {"1200", "1600"}
    assert out["policy"] == "dense"


def test_cwe_at_128k_fits(default_llm):
    """At 128K cwe's doubling search asks for more distinct words than its lists hold; the list then
    stops growing (here the whole list is already past the room, so the search still ends in it)."""
    ids, answers = fit(default_llm, "cwe", 131072, seed=0)
    assert 131072 * 0.8 < len(ids) <= 131072 - ruler()["cwe"]["tokens_to_generate"] and len(answers) == 10
