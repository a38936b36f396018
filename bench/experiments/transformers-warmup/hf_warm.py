"""time_transformers after its full-length warm-up, then a loop of forward calls over
DynamicCache(offloading=True/False) -> hf_warm.txt; see NOTES.md.

    python bench/run_experiment.py transformers-warmup/hf_warm.py          (GPU machine)
"""
import time, torch
import decode as D   # bench/decode.py (through bench/run_experiment.py)
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache
hf = D.SHAPES["llama2-7b"]
for mode in ("dynamic", "offloaded", "offloaded", "dynamic"):
    t0 = time.perf_counter()
    t = D.time_transformers(hf, batch=1, context=8192, steps=16, mode=mode, dtype=torch.float16)
    D.free_gpu()
    print(mode, f"{t['step_ms']:.2f} ms/step ({time.perf_counter() - t0:.1f} s)", flush=True)
cfg = AutoConfig.for_model("llama", **{k: v for k, v in hf.items() if k != "model_type"})
with torch.device("cuda"):
    m = AutoModelForCausalLM.from_config(cfg, dtype=torch.float16, attn_implementation="sdpa").eval()
ids = torch.randint(3, cfg.vocab_size, (1, 8192), device="cuda")
for off in (True, False):
  for rep in range(3):
    cache = DynamicCache(config=cfg, offloading=off)
    am = torch.ones(1, 8192, dtype=torch.long, device="cuda")
    with torch.inference_mode():
        out = m(ids, past_key_values=cache, use_cache=True, attention_mask=am, logits_to_keep=1)
        tok = out.logits[:, -1:].argmax(-1)
        torch.cuda.synchronize(); t0 = time.perf_counter()
        for i in range(16):
            am = torch.cat([am, am[:, :1]], 1)
            out = m(tok, past_key_values=cache, use_cache=True, attention_mask=am)
            tok = out.logits[:, -1:].argmax(-1)
        torch.cuda.synchronize()
    print(f"forward loop offloading={off}: {(time.perf_counter() - t0) * 1000 / 16:.2f} ms/step", flush=True)
    del cache, out
