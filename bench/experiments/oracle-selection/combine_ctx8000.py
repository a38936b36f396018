"""The 8-text perplexities of accuracy_sources_ctx8000_h100.jsonl (its oracle rows are split over
runs of one or two texts; the order of the texts is bench/fidelity.py's) -> ctx8000_8texts.txt.

    python bench/experiments/oracle-selection/combine_ctx8000.py"""
import json, math
from pathlib import Path
L = [json.loads(x) for x in open(Path(__file__).resolve().parent / "accuracy_sources_ctx8000_h100.jsonl")]
texts = lambda *ps: [p for ps_ in ps for p in ps_]
oracle = texts(L[6]["per"][:1], *(L[i]["per"] for i in (7, 8, 9)), L[6]["per"][1:], *(L[i]["per"] for i in (10, 11, 12)))
g = lambda per: math.exp(sum(map(math.log, per)) / len(per))
d = g(L[0]["per"])
for name, per in (("dense", L[0]["per"]), ("speculation r0.5 window 64", L[1]["per"]), ("exact top 5% window 64", oracle)):
    print(f"{name:28s} {len(per)} texts  ppl {g(per):.3f}  {100 * (g(per) / d - 1):+.2f}%")
