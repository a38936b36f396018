"""Fixtures and hooks of the kernel microbenchmarks (bench/test_kernels.py).

    pytest bench --benchmark-only --benchmark-json bench/results/kernels.json      (GPU machine)

Timing: pytest-benchmark's own statistics, but its clock is replaced by CUDA events (cuda_clock),
so every round is the GPU time of one call. Before each round (untimed) L2 is flushed and the GPU
spins for about twice the host time one call takes to enqueue; the host has queued the whole call
before the GPU reaches the start event, so launch overhead is out of the figure (as in the
runtime, which replays captured CUDA graphs: the Triton launchers cost 40-130 us of host time per
call, more than most decode kernels take on the GPU). References that sync inside (lengths or
indices to the host) still pay their host gaps after the sync: that is their real cost.
extra_info["host_us"] records the host time of one eager call.

Ceilings, measured once per session in the same run (best of several 1 GiB copies):
    hbm        device-to-device copy, bytes read + written per second
    pcie_h2d   pinned host -> device copy        pcie_d2h   device -> pinned host copy
Each benchmark's extra_info has the compulsory bytes (inputs read once + outputs written once),
the bytes crossing the bounding link, GB/s on it and the fraction of that ceiling; the pair
(triton, ref) of one shape also gets speedup_vs_ref = ref median / triton median. The JSON's
top level has "ceilings"; machine_info has the GPU and the torch/triton versions.
"""
from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from tests.helpers import TOLERANCES, assert_close

SKIP_REASON = "needs a CUDA GPU: kernel microbenchmarks run on the GPU machine"
FP16_TOL = next((atol, rtol) for dtype, atol, rtol in TOLERANCES if dtype == torch.float16)
TARGET_S, MIN_ROUNDS, MAX_ROUNDS, WARMUP_ROUNDS = 0.2, 10, 100, 2

CEILINGS: dict[str, float] = {}            # GB/s by name, filled by the `ceilings` fixture
PAIRS: dict[str, dict[str, dict]] = {}     # group -> impl -> that benchmark's extra_info (shared dict)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """Every benchmark skips for one reason (one summary line) on a machine without CUDA."""
    if not torch.cuda.is_available() and Path(__file__).parent in item.path.parents:
        pytest.skip(SKIP_REASON)


# ---------------------------------------------------------------------------------------------
# GPU clock
# ---------------------------------------------------------------------------------------------
class _Stamp:
    """A CUDA event recorded on the current stream; `end - start` waits for `end` and returns the
    GPU time between the two stamps in seconds (what pytest-benchmark's runner computes)."""
    __slots__ = ("event",)

    def __init__(self):
        self.event = torch.cuda.Event(enable_timing=True)
        self.event.record()

    def __sub__(self, start: "_Stamp") -> float:
        self.event.synchronize()
        return start.event.elapsed_time(self.event) / 1e3


def cuda_clock() -> _Stamp:
    return _Stamp()


def gpu_seconds(fn) -> float:
    """GPU time of one call of fn."""
    start = cuda_clock()
    fn()
    return cuda_clock() - start


def host_seconds(fn, reps: int = 5) -> float:
    """Host time one call of fn takes to return, the GPU idle beforehand (median of reps)."""
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    torch.cuda.synchronize()
    return sorted(times)[reps // 2]


# ---------------------------------------------------------------------------------------------
# session fixtures: ceilings and the per-round setup
# ---------------------------------------------------------------------------------------------
def _best_gbps(copy, nbytes: int, reps: int = 10) -> float:
    copy()
    return nbytes / min(gpu_seconds(copy) for _ in range(reps)) / 1e9


@pytest.fixture(scope="session")
def ceilings() -> dict[str, float]:
    n = 1 << 30
    src = torch.empty(n, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    host = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    CEILINGS.update(hbm=_best_gbps(lambda: dst.copy_(src), 2 * n),                   # read + write
                    pcie_h2d=_best_gbps(lambda: dst.copy_(host, non_blocking=True), n),
                    pcie_d2h=_best_gbps(lambda: host.copy_(src, non_blocking=True), n))
    return CEILINGS


@pytest.fixture(scope="session")
def round_setup():
    """round_setup(host_s) -> a setup for pedantic: flush L2 (256 MB, 5x the H100's L2, as triton's
    do_bench), then spin the GPU for 2 * host_s + 50 us so the timed call is fully enqueued first."""
    buf = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    torch.cuda._sleep(1000)
    cycles_per_s = 10**7 / gpu_seconds(lambda: torch.cuda._sleep(10**7))      # the spin's clock

    def make(host_s: float):
        cycles = int(cycles_per_s * min(2 * host_s + 50e-6, 10e-3))

        def setup() -> None:     # returns None: pytest-benchmark would take a return value as arguments
            buf.zero_()
            torch.cuda._sleep(cycles)
        return setup
    return make


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ---------------------------------------------------------------------------------------------
# the per-benchmark helper
# ---------------------------------------------------------------------------------------------
def _clone(out):
    return tuple(t.clone() for t in out) if isinstance(out, (tuple, list)) else out.clone()


def _check(kernel, ref, args, outputs, exact: bool) -> None:
    """Kernel output vs reference output on the same inputs (both write any out= buffers in args,
    so the kernel's result is copied before the reference runs)."""
    ret = kernel(*args)
    torch.cuda.synchronize()                        # outputs may read pinned host memory
    got = _clone(outputs(ret))
    ret = ref(*args)
    torch.cuda.synchronize()
    want = outputs(ret)
    got, want = (got, want) if isinstance(got, tuple) else ((got,), (want,))
    for i, (g, w) in enumerate(zip(got, want)):
        what = f"{kernel.__name__} output {i} vs {ref.__name__}"
        if exact:
            assert torch.equal(g, w), f"{what}: not bit-identical"
        else:
            assert_close(g, w, *FP16_TOL, what=what)


@pytest.fixture
def kbench(benchmark, ceilings, round_setup):
    """kbench(kernel, ref, impl, args, case=, shape=, nbytes=, ...): check kernel(*args) against
    ref(*args), then time `impl` ("triton": kernel, "ref": ref) and fill benchmark.extra_info.

    nbytes: compulsory bytes (inputs read once + outputs written once). ceiling: "hbm",
    "pcie_h2d" or "pcie_d2h"; link_bytes: the part of nbytes that crosses that link (default all).
    outputs: maps a call's return value to the tensors compared (e.g. rows of a pool for an
    in-place op); exact: bit equality instead of the fp16 tolerances; flops: adds TFLOP/s."""
    def run(kernel, ref, impl: str, args: tuple, *, case: str, shape: str, nbytes: int,
            ceiling: str = "hbm", link_bytes: int | None = None, flops: float | None = None,
            outputs=lambda out: out, exact: bool = False) -> None:
        _check(kernel, ref, args, outputs, exact)
        fn = (lambda: kernel(*args)) if impl == "triton" else (lambda: ref(*args))
        host_s = host_seconds(fn)
        setup = round_setup(host_s)
        setup()
        once = gpu_seconds(fn)                                             # sizes the run
        rounds = max(MIN_ROUNDS, min(MAX_ROUNDS, int(TARGET_S / (once + 2 * host_s + 2e-4))))
        assert hasattr(benchmark, "_timer"), "pytest-benchmark internals changed: cannot set the CUDA clock"
        benchmark._timer = cuda_clock     # pytest-benchmark has no public per-test timer switch
        benchmark.group = f"{kernel.__name__} {case}"
        benchmark.pedantic(fn, setup=setup, rounds=rounds, warmup_rounds=WARMUP_ROUNDS)
        if benchmark.stats is None:                                        # --benchmark-disable
            return
        median = benchmark.stats.stats.median
        link = nbytes if link_bytes is None else link_bytes
        gbps = link / median / 1e9
        info = benchmark.extra_info
        info.update(op=kernel.__name__, impl=impl, case=case, shape=shape, median_us=round(median * 1e6, 2),
                    host_us=round(host_s * 1e6, 1),
                    bytes=nbytes, ceiling=ceiling, ceiling_gbps=round(ceilings[ceiling], 1),
                    ceiling_bytes=link, gbps=round(gbps, 1), fraction_of_ceiling=round(gbps / ceilings[ceiling], 3))
        if flops is not None:
            info["tflops"] = round(flops / median / 1e12, 1)
        pair = PAIRS.setdefault(benchmark.group, {})
        pair[impl] = info
        if "triton" in pair and "ref" in pair:                             # both dicts end up in the JSON
            speedup = round(pair["ref"]["median_us"] / pair["triton"]["median_us"], 2)
            pair["triton"]["speedup_vs_ref"] = pair["ref"]["speedup_vs_ref"] = speedup
    return run


# ---------------------------------------------------------------------------------------------
# JSON and terminal output
# ---------------------------------------------------------------------------------------------
def pytest_benchmark_update_machine_info(config, machine_info):
    import triton
    machine_info.update(torch=torch.__version__, triton=triton.__version__,
                        gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else None)


def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json["ceilings"] = {k: round(v, 1) for k, v in CEILINGS.items()}   # GB/s
    output_json["timing"] = ("CUDA events around one call per round; before each round L2 flushed and the GPU "
                             "held until the call is enqueued (launch overhead excluded); stats in seconds")


def pytest_terminal_summary(terminalreporter):
    rows = [info for pair in PAIRS.values() for info in pair.values()]
    if not rows:
        return
    w = terminalreporter.write_line
    w("")
    w("ceilings (GB/s): " + ", ".join(f"{k} {v:.1f}" for k, v in CEILINGS.items()))
    w(f"{'op':<18}{'case':<30}{'impl':<8}{'median us':>11}{'host us':>9}{'GB/s':>9}{'ceiling':>10}"
      f"{'of ceil':>9}{'speedup':>9}")
    for r in rows:
        w(f"{r['op']:<18}{r['case']:<30}{r['impl']:<8}{r['median_us']:>11.1f}{r['host_us']:>9.1f}{r['gbps']:>9.1f}"
          f"{r['ceiling']:>10}{r['fraction_of_ceiling']:>9.1%}{r.get('speedup_vs_ref', float('nan')):>8.2f}x")
