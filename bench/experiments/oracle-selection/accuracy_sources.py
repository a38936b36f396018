"""Where does infinigen lose accuracy? Decode-path perplexity of the default model with the
selection made three ways, so the error sources separate:
    spec            minigen's speculation (previous layer's residual, partial keys)
    oracle          layer i's own query against its full keys (exact scores, same threshold/cap)
    oracle_partial  layer i's own query against the partial keys
and the skewed-column choice of spec varied (sum: |q|+|k| column sums, minigen's; prod; var).
A mode may carry "+lse" or "+mass" (spec+lse, oracle_partial+mass): the kv head group's tokens
ranked by a probability instead of the logit gap (GroupRank below; bench/experiments/group-rank/).

    python bench/run_experiment.py oracle-selection/accuracy_sources.py CONTEXT PREFIX DOCS \
        mode:alpha:budget:ratio[:score[:recent]] ...
    e.g. python bench/run_experiment.py oracle-selection/accuracy_sources.py 8000 6000 2 dense:0:0:0 \
        spec:5:0.2:0.5 oracle:inf:0.05:0.5:sum:64

DOCS: N (N of bench/fidelity.py's 8 texts, evenly spaced: 2 = hamlet and the essays from "gap")
or a slice a:b of them (1:2 = macbeth alone). oracle_partial with ratio 1.0 scores against every
skewed column, which is the exact q.k (the skew is orthogonal) computed by the GPU kernels: on the
GPU it is the fast way to the exact top-k (oracle gathers the full keys from the host pool).

recent (default 0: the paper's rule, as when the committed accuracy_*.jsonl were measured) is
select's window of last tokens always kept, minigen's --recent. Outputs one JSON line per
configuration. (accuracy_sources_*.jsonl beside this script, and the accuracy_*.jsonl of
bench/experiments/column-choice/ and speculation-norm/; the "renorm" rows of the latter were
measured with a subclass applying the next layer's norm gain to the previous layer's normalized
input, before minigen's speculation did so itself.)"""
import sys, math, json, time, torch
from minigen.device import resolve_device, resolve_dtype
from minigen.load import load_model
from minigen.calibrate import load_skew_for
from minigen.kv.infinigen import InfiniGenKV
from minigen.engine import Engine
import fidelity   # bench/fidelity.py (through bench/run_experiment.py): its texts, in its order

CTX, PREFIX, DOCS = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]   # DOCS: N, or a slice a:b
CONFIGS = [c.split(":") for c in sys.argv[4:]]   # mode:alpha:budget:ratio[:score[:recent]]
for c in CONFIGS:                                 # checked before the model loads
    m, _, r = c[0].partition("+")
    if m not in ("dense", "spec", "oracle", "oracle_partial") or r not in ("", "lse", "mass") or (m == "dense" and r):
        raise SystemExit(f"error: unknown mode {c[0]!r}")

class Oracle(InfiniGenKV):
    """Selection at layer i from its own q: full keys (oracle) or the partial keys (oracle_partial)."""
    graph_safe = False
    mode = "oracle"
    def pre_attention(self, layer, h):
        return
    def attend(self, layer, q, k, v):
        meta = self.meta
        if layer < self.dense_layers or meta.is_prefill:
            return super().attend(layer, q, k, v)
        j, buf, B, G = layer - self.dense_layers, layer % 2, q.shape[0], self.group
        n_valid = meta.seq_lens - 1
        qg = q.float().view(B, self.num_kv_heads, G, -1)
        if self.mode == "oracle":
            kp, _ = self.pool.heads(j)
            K = kp[meta.slot_idx.long().cpu()].to(q.device).float()
            s = (torch.einsum("bgjd,bgtd->bgjt", qg, K).reshape(B, -1, K.shape[2]) * self.sm_scale).contiguous()
        else:
            s = self.ops.partial_qk(q, self.a_sel[j], self.pk[j], n_valid, meta.slot_idx, self.sm_scale)
        idx, count = self.ops.select(s, n_valid, self.alpha, self.budget, G, self.max_select,
                                     out_idx=self.idx[buf, :B], out_count=self.count[buf, :B], recent=self.recent)
        self._num_fetched += count.sum()   # candidates: counted once per step in begin
        self._gather(layer)
        return super().attend(layer, q, k, v)

class Scored(InfiniGenKV):
    """Column choice variants: sum |q| + sum |k| (minigen's), product, E[q_d^2] * Var(k_d); each
    scored per prefill chunk and summed over the chunks, as minigen sums its own (the committed
    column-choice results predate that: they scored a prompt's first chunk only)."""
    score = "sum"
    def _column_score(self, q_sk, k_sk):
        if self.score == "sum":
            return super()._column_score(q_sk, k_sk)
        if self.score == "prod":
            return q_sk.abs().sum((0, 2)) * k_sk.abs().sum(0)
        return q_sk.pow(2).mean((0, 2)) * k_sk.var(0)

class GroupRank:
    """ops proxy for the "+lse" / "+mass" modes: select ranks a KV head group's tokens by a
    probability instead of the logit gap to each head's max. +lse: ns_t = max_h log p_ht (each
    head's softmax over the n cached tokens), +mass: ns_t = log sum_h p_ht (the group's attention
    mass on t); both minus their max over t, so ns <= 0 with 0 at the top token and alpha keeps its
    meaning for the sharpest head. Handed to the select kernel as one row per KV head (G = 1)."""
    def __init__(self, ops, how):
        self._ops, self._how = ops, how
    def __getattr__(self, name):
        return getattr(self._ops, name)
    def select(self, scores, n_valid, alpha, budget, G, max_select, **kw):
        B, H, P = scores.shape
        live = torch.arange(P, device=scores.device) < n_valid[:, None, None, None]
        lp = torch.log_softmax(scores.view(B, H // G, G, P).masked_fill(~live, -math.inf), dim=-1)
        ns = lp.amax(2) if self._how == "lse" else torch.logsumexp(lp, dim=2)
        ns = (ns - ns.amax(-1, keepdim=True)).masked_fill(~live[:, :, 0], 0.0).contiguous()
        return self._ops.select(ns, n_valid, alpha, budget, 1, max_select, **kw)

dev = resolve_device(None); dt = resolve_dtype(None, dev)
model, tok = load_model(None, device=dev, dtype=dt)
skew = load_skew_for(model, tok, None)
docs = list(fidelity.documents(tok, fidelity.ROOT / "data", CTX).items())   # the report's 8, in its order
if ":" in DOCS:                                      # a:b, those of the 8 (one GPU process each)
    docs = docs[slice(*(int(x) if x else None for x in DOCS.split(":")))]
else:                                                # N of them, evenly spaced
    docs = docs[:: max(1, 8 // int(DOCS))][:int(DOCS)]
for mode, a, b, r, *rest in CONFIGS:
    col_score, recent = rest[0] if rest else "", int(rest[1]) if len(rest) > 1 else 0
    mode, _, rank = mode.partition("+")     # spec+lse, oracle_partial+mass, ...: see GroupRank
    t0 = time.time(); nlls = []; fr = []
    for name, ids in docs:
        if mode == "dense":
            eng = Engine(model, tok, policy="dense", max_batch=1, max_seq_len=CTX + 1)
        else:
            opts = dict(alpha=float(a), budget=float(b), partial_ratio=float(r), recent=recent, skew=skew)
            eng = Engine(model, tok, policy="dense", max_batch=1, max_seq_len=CTX + 1)
            eng.kv.close()
            if mode == "spec":
                Scored.score = col_score or "sum"
                kv = Scored(model.config, project_q=model.project_q, dtype=dt, device=dev, ops=model.ops, **opts)
            else:
                Oracle.mode = mode
                kv = Oracle(model.config, project_q=model.project_q, dtype=dt, device=dev, ops=model.ops, **opts)
            if rank:
                kv.ops = GroupRank(model.ops, rank)
            kv.allocate(1, CTX + 1); eng.kv = kv; eng.use_graph = eng.use_graph and kv.graph_safe
        seq = eng.new_sequence(ids[:PREFIX])
        lp = eng.teacher_force(seq, ids[PREFIX:CTX])
        nlls.append(-lp.double().mean().item())
        fr.append(eng.kv.stats().get("fetched_fraction", 1.0))
        eng.close()
    nll = sum(nlls) / len(nlls)
    print(json.dumps(dict(mode=mode + (rank and "+" + rank), score=col_score, recent=recent, alpha=a, budget=b, ratio=r, ctx=CTX, ppl=round(math.exp(nll), 3),
                          per=[round(math.exp(x), 3) for x in nlls], frac=round(sum(fr) / len(fr), 4),
                          s=round(time.time() - t0, 1))), flush=True)
