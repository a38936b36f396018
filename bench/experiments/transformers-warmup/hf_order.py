"""bench/decode.py's time_transformers called six times in one process (cold first calls of the
dynamic and offloaded caches) -> hf_order.txt; see NOTES.md.

    python bench/run_experiment.py transformers-warmup/hf_order.py          (GPU machine)
"""
import time, torch
import decode as D   # bench/decode.py (through bench/run_experiment.py)
hf = D.SHAPES["llama2-7b"]
for mode, steps in (("dynamic", 16), ("dynamic", 16), ("dynamic", 6), ("offloaded", 6), ("offloaded", 16), ("dynamic", 16)):
    t0 = time.perf_counter()
    t = D.time_transformers(hf, batch=1, context=8192, steps=steps, mode=mode, dtype=torch.float16)
    D.free_gpu()
    print(mode, steps, f"{t['step_ms']:.2f} ms/step ({time.perf_counter() - t0:.1f} s)", flush=True)
