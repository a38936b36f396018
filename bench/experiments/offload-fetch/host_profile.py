"""cProfile of the eager decode step (copy-engine fetch) of int4 and offload, Llama-2-7B shape, batch 1,
2048 tokens: where the host time goes (-> host_profile_int4_offload_b1_2048.txt).

    python bench/run_experiment.py offload-fetch/host_profile.py          (GPU machine)
"""
import time, torch, cProfile, pstats
import decode as D   # bench/decode.py (through bench/run_experiment.py)
ctx = 2048
model, _ = D.random_model("llama2-7b", torch.float16, ctx + 200)
for policy in ("int4", "offload"):
    eng, g, seqs, reset = D.warm_engine(model, policy=policy, batch=1, context=ctx, steps=100)
    for _ in range(5):
        eng.decode_step(g)
    torch.cuda.synchronize()
    pr = cProfile.Profile()
    t0 = time.perf_counter()
    pr.enable()
    for _ in range(20):
        eng.decode_step(g)
    pr.disable()
    torch.cuda.synchronize()
    print(policy, "ms/step", (time.perf_counter() - t0) * 50, flush=True)
    st = pstats.Stats(pr); st.sort_stats("tottime").print_stats(25)
    st.sort_stats("cumtime").print_stats(30)
    eng.close(); D.free_gpu()
