"""Passkey retrieval (minigen/eval/needle.py)."""
from minigen.eval.needle import needle_prompt, passkey_found, run_needle
from tests.helpers import FILLER


def test_passkey_found():
    assert passkey_found("The pass key is 71432.", 71432)
    assert passkey_found(" 71,432", 71432) and passkey_found("71 432!", 71432)
    assert not passkey_found("714329", 71432) and not passkey_found("171432", 71432)
    assert not passkey_found("I don't know", 71432)


def test_needle_grid(llm):
    tok = llm.tokenizer
    hay = tok.encode(FILLER * 60, add_special_tokens=False)
    ids = needle_prompt(tok, hay, 300, 0.5, 123456, chat=True)
    assert abs(len(ids) - 300) <= 16 and "123456" in tok.decode(ids)
    res = run_needle(llm, hay, [160, 240], [0.0, 0.5, 1.0], seed=1, batch=3, max_new_tokens=10)
    assert res["lengths"] == [160, 240] and res["depths"] == [0.0, 0.5, 1.0]
    assert len(res["grid"]) == 2 and all(len(row) == 3 for row in res["grid"]) and res["n"] == 6
    for c in res["cells"]:
        assert c["found"] == passkey_found(c["answer"], c["key"]) and 10_000 <= c["key"] < 10_000_000
    assert res["accuracy"] == sum(map(sum, res["grid"])) / 6
    assert res["accuracy"] >= 5 / 6, res["cells"]         # dense retrieves at short lengths


# ---- CLI (each loads the model in a subprocess) ------------------------------------------------
