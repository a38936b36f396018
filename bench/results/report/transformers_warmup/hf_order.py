import sys, time, torch
sys.path.insert(0, "bench")
import decode as D
hf = D.SHAPES["llama2-7b"]
for mode, steps in (("dynamic", 16), ("dynamic", 16), ("dynamic", 6), ("offloaded", 6), ("offloaded", 16), ("dynamic", 16)):
    t0 = time.perf_counter()
    t = D.time_transformers(hf, batch=1, context=8192, steps=steps, mode=mode, dtype=torch.float16)
    D.free_gpu()
    print(mode, steps, f"{t['step_ms']:.2f} ms/step ({time.perf_counter() - t0:.1f} s)", flush=True)
