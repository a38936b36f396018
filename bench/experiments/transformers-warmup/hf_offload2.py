"""generate's offloaded and dynamic caches against loops of forward calls over
DynamicCache(offloading=True/False), with and without the attention mask -> hf_offload2.txt; see NOTES.md.

    python bench/run_experiment.py transformers-warmup/hf_offload2.py          (GPU machine)
"""
import time, torch
from decode import SHAPES   # bench/decode.py (through bench/run_experiment.py)
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache
hf = SHAPES["llama2-7b"]
ctx, steps = 8192, 12
cfg = AutoConfig.for_model("llama", **{k: v for k, v in hf.items() if k != "model_type"})
torch.manual_seed(0)
with torch.device("cuda"):
    m = AutoModelForCausalLM.from_config(cfg, dtype=torch.float16, attn_implementation="sdpa").eval()
ids = torch.randint(3, cfg.vocab_size, (1, ctx), device="cuda")

def gen(n, **kw):
    torch.cuda.synchronize(); t0 = time.perf_counter()
    with torch.inference_mode():
        out = m.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=None, **kw)
    torch.cuda.synchronize()
    return out[0, ctx:].tolist(), time.perf_counter() - t0

def loop(off, mask):
    cache = DynamicCache(config=cfg, offloading=off)
    am = torch.ones(1, ctx, dtype=torch.long, device="cuda")
    toks, times = [], []
    with torch.inference_mode():
        out = m(ids, past_key_values=cache, use_cache=True, attention_mask=am if mask else None, logits_to_keep=1)
        tok = out.logits[:, -1:].argmax(-1); toks.append(tok.item())
        for i in range(steps):
            torch.cuda.synchronize(); t0 = time.perf_counter()
            if mask:
                am = torch.cat([am, am[:, :1]], 1)
            out = m(tok, past_key_values=cache, use_cache=True, attention_mask=am if mask else None)
            tok = out.logits[:, -1:].argmax(-1)
            torch.cuda.synchronize(); times.append((time.perf_counter() - t0) * 1000)
            toks.append(tok.item())
            if i == steps // 2:
                devs = [l.keys.device.type for l in cache.layers]
    return toks, sorted(times)[len(times) // 2], devs

for kw, name in (({"cache_implementation": "offloaded"}, "generate offloaded"), ({}, "generate dynamic")):
    gen(2, **kw)
    t1 = min(gen(1, **kw)[1] for _ in range(2))
    tg, tn = gen(steps + 1, **kw)
    print(f"{name}: {(tn - t1) * 1000 / steps:.2f} ms/step, tokens {tg[:6]}", flush=True)
torch.cuda.reset_peak_memory_stats()
for off in (True, False):
    for mask in (False, True):
        loop(off, mask)
        torch.cuda.reset_peak_memory_stats()
        toks, med, devs = loop(off, mask)
        print(f"loop offloading={off} mask={mask}: median {med:.2f} ms/step, tokens {toks[:6]} equal-generate={toks == tg}, "
              f"layers on cpu mid-step {devs.count('cpu')}/{len(devs)}, peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB", flush=True)
